import { eq } from 'drizzle-orm';
import type { FastifyInstance } from 'fastify';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { sessions } from '../../src/db/schema/index.js';
import { form } from '../clients/helpers.js';
import { buildTestApp } from '../support/app.js';
import { createTestClock } from '../support/clock.js';
import { login, registerUser } from '../support/factories.js';
import { type FakeGoTrue, startFakeGoTrue, supabaseEnv } from '../support/fake-gotrue.js';
import { bearer } from '../support/http.js';
import { captureLogs } from '../support/logs.js';

const RECHECK_SECONDS = 300;
const SUPABASE_TIMEOUT_MS = 1000;

const refreshAt = (app: FastifyInstance, refreshToken: string) =>
  app.inject({ method: 'POST', url: '/v1/auth/refresh', payload: { refresh_token: refreshToken } });

/** Refreshes, expecting 200; the new refresh token. */
async function refreshedAt(app: FastifyInstance, refreshToken: string): Promise<string> {
  const res = await refreshAt(app, refreshToken);
  expect(res.statusCode, res.body).toBe(200);
  return res.json().session.refresh_token as string;
}

/**
 * A user banned or deleted in Supabase directly (its dashboard, its admin API), not through this
 * service: their next refresh past SUPABASE_USER_RECHECK_SECONDS asks Supabase, is refused, and ends
 * their sessions here.
 */
describe('refresh through Supabase: the user is confirmed at GoTrue every SUPABASE_USER_RECHECK_SECONDS', () => {
  let gotrue: FakeGoTrue;
  let app: FastifyInstance;
  const clock = createTestClock();
  const { lines, logger } = captureLogs('warn');

  beforeAll(async () => {
    gotrue = await startFakeGoTrue();
    app = await buildTestApp({
      env: {
        ...supabaseEnv(gotrue),
        SUPABASE_TIMEOUT_MS: String(SUPABASE_TIMEOUT_MS),
        SUPABASE_USER_RECHECK_SECONDS: String(RECHECK_SECONDS),
      },
      deps: { clock, logger },
    });
  });

  afterEach(() => {
    gotrue.setDown(false);
    gotrue.setDelayMs(0);
  });

  afterAll(async () => {
    await gotrue?.close();
  });

  /** The admin API's reads of this user: what the check asks GoTrue. */
  const lookups = (userId: string) =>
    gotrue.requests.filter((r) => r.method === 'GET' && r.path === `/auth/v1/admin/users/${userId}`).length;

  const refresh = (refreshToken: string) => refreshAt(app, refreshToken);
  const refreshed = (refreshToken: string) => refreshedAt(app, refreshToken);

  const me = (accessToken: string) =>
    app.inject({ method: 'GET', url: '/v1/auth/me', headers: bearer(accessToken) });

  const banAtSupabase = (userId: string) => {
    gotrue.users.get(userId)!.bannedUntil = new Date(Date.now() + 86400_000).toISOString();
  };

  it('a user not banned refreshes with no GoTrue call within the interval, and one past it', async () => {
    const user = await registerUser(app, 'sb-recheck-fine');
    // Never confirmed on this instance: the first refresh asks.
    let token = await refreshed(user.refreshToken);
    expect(lookups(user.id)).toBe(1);
    for (let i = 0; i < 4; i++) token = await refreshed(token);
    clock.advance(RECHECK_SECONDS - 10);
    token = await refreshed(token);
    expect(lookups(user.id)).toBe(1);
    // Past the interval: asked again, once.
    clock.advance(20);
    token = await refreshed(token);
    token = await refreshed(token);
    expect(lookups(user.id)).toBe(2);
  });

  it('a ban at Supabase stops the next refresh past the interval, and ends every session of the user', async () => {
    const user = await registerUser(app, 'sb-recheck-ban');
    const other = (await login(app, user.email)).session;
    let token = await refreshed(user.refreshToken);
    banAtSupabase(user.id);
    // Within the interval the service goes by its last confirmation.
    token = await refreshed(token);
    expect(lookups(user.id)).toBe(1);

    clock.advance(RECHECK_SECONDS + 1);
    const refused = await refresh(token);
    expect(refused.statusCode, refused.body).toBe(401);
    expect(refused.json()).toMatchObject({ code: 'invalid_refresh_token' });
    expect(lookups(user.id)).toBe(2);
    // The other session ended too (its access token revoked, its refresh token refused), with no
    // further question to GoTrue.
    expect((await me(other.access_token)).statusCode).toBe(401);
    const otherRefresh = await refresh(other.refresh_token);
    expect(otherRefresh.statusCode).toBe(401);
    expect(otherRefresh.json()).toMatchObject({ code: 'invalid_refresh_token' });
    expect(lookups(user.id)).toBe(2);
    const rows = await app.services.db.select().from(sessions).where(eq(sessions.userId, user.id));
    expect(rows.map((s) => s.revokedReason)).toEqual(['banned_at_provider', 'banned_at_provider']);

    const events = await app.services.audit.list({
      subjectId: user.id,
      type: 'user.sessions_ended',
      limit: 10,
    });
    expect(events).toHaveLength(1);
    expect(events[0]).toMatchObject({ actorType: 'system', outcome: 'success' });
    expect(events[0]!.data).toMatchObject({ scope: 'all', reason: 'banned_at_provider' });
    expect((events[0]!.data as { sessions: string[] }).sessions).toHaveLength(2);
    // The account here is left as it is: once the ban is lifted at Supabase, the user signs in again.
    expect((await app.services.repos.users.findById(user.id))?.status).toBe('active');
    gotrue.users.get(user.id)!.bannedUntil = null;
    const again = await login(app, user.email);
    expect((await refresh(again.session.refresh_token)).statusCode).toBe(200);
  });

  it('a user deleted at Supabase is refused at the next refresh past the interval, and their sessions end', async () => {
    const user = await registerUser(app, 'sb-recheck-deleted');
    const token = await refreshed(user.refreshToken);
    gotrue.users.delete(user.id);
    clock.advance(RECHECK_SECONDS + 1);
    const refused = await refresh(token);
    expect(refused.statusCode, refused.body).toBe(401);
    expect(refused.json()).toMatchObject({ code: 'invalid_refresh_token' });
    expect((await me(user.accessToken)).statusCode).toBe(401);
    const events = await app.services.audit.list({
      subjectId: user.id,
      type: 'user.sessions_ended',
      limit: 10,
    });
    expect(events.map((e) => (e.data as { reason: string }).reason)).toEqual(['deleted_at_provider']);
  });

  it('the refresh_token grant at /oauth/token is checked alike', async () => {
    const user = await registerUser(app, 'sb-recheck-oauth');
    const token = await refreshed(user.refreshToken);
    banAtSupabase(user.id);
    clock.advance(RECHECK_SECONDS + 1);
    const res = await form(app, '/oauth/token', { grant_type: 'refresh_token', refresh_token: token });
    expect(res.statusCode, res.body).toBe(400);
    expect(res.json().error).toBe('invalid_grant');
    expect((await me(user.accessToken)).statusCode).toBe(401);
  });

  it('GoTrue down or hanging locks nobody out: the refresh goes through, with a warning', async () => {
    const user = await registerUser(app, 'sb-recheck-down');
    let token = user.refreshToken;
    banAtSupabase(user.id);
    gotrue.setDown(true);
    token = await refreshed(token);
    const warning = lines
      .map((l) => JSON.parse(l) as { msg: string; userId?: string; reqId?: string })
      .find((l) => l.userId === user.id);
    expect(warning?.msg).toBe(
      'could not confirm the user at the identity provider: their refresh goes through',
    );
    expect(warning?.reqId).toBeTruthy();
    // Not asked again at every refresh after an outage: once per interval.
    gotrue.setDown(false);
    token = await refreshed(token);
    expect(lookups(user.id)).toBe(0);

    // Hanging past SUPABASE_TIMEOUT_MS: the refresh waits that long, then goes through.
    clock.advance(RECHECK_SECONDS + 1);
    gotrue.setDelayMs(SUPABASE_TIMEOUT_MS * 3);
    const started = Date.now();
    token = await refreshed(token);
    expect(Date.now() - started).toBeLessThan(SUPABASE_TIMEOUT_MS + 2000);
    expect(lookups(user.id)).toBe(1);
    gotrue.setDelayMs(0);

    // Answering again, past the interval: the ban reaches the sessions.
    clock.advance(RECHECK_SECONDS + 1);
    expect((await refresh(token)).statusCode).toBe(401);
  });
});

describe('SUPABASE_USER_RECHECK_SECONDS=0', () => {
  it('asks GoTrue at every refresh', async () => {
    const gotrue = await startFakeGoTrue();
    try {
      const app = await buildTestApp({
        env: { ...supabaseEnv(gotrue), SUPABASE_USER_RECHECK_SECONDS: '0' },
      });
      const user = await registerUser(app, 'sb-recheck-zero');
      let token = user.refreshToken;
      for (let i = 0; i < 3; i++) token = await refreshedAt(app, token);
      expect(gotrue.requests.filter((r) => r.path === `/auth/v1/admin/users/${user.id}`)).toHaveLength(3);
      gotrue.users.get(user.id)!.bannedUntil = new Date(Date.now() + 60_000).toISOString();
      expect((await refreshAt(app, token)).statusCode).toBe(401);
    } finally {
      await gotrue.close();
    }
  });
});
