import { sql } from 'drizzle-orm';
import type { FastifyInstance } from 'fastify';
import { decodeJwt } from 'jose';
import { beforeAll, describe, expect, inject, it } from 'vitest';
import { selectRows } from '../../src/db/client.js';
import { buildTestApp } from '../support/app.js';
import { createTestClock } from '../support/clock.js';
import { secondWhileFirstCalls } from '../support/database.js';
import { createAdmin, login, registerUser, type TestUser } from '../support/factories.js';
import { bearer } from '../support/http.js';
import { turnOnMfa } from '../support/mfa.js';

/** MAX_SESSIONS_PER_USER for this file: small, so that a few sign-ins reach it. */
const CAP = 3;

interface Opened {
  id: string;
  accessToken: string;
  refreshToken: string;
}

describe('MAX_SESSIONS_PER_USER: a sign-in beyond it ends the user’s least recently used sessions', () => {
  const clock = createTestClock();
  let app: FastifyInstance;
  let admin: TestUser;

  beforeAll(async () => {
    app = await buildTestApp({ env: { MAX_SESSIONS_PER_USER: String(CAP) }, deps: { clock } });
    admin = await createAdmin(app);
  });

  const opened = (session: { access_token: string; refresh_token: string }): Opened => ({
    id: decodeJwt(session.access_token).sid as string,
    accessToken: session.access_token,
    refreshToken: session.refresh_token,
  });
  /** A sign-in a second after the last, so that sessions are told apart by when they were used. */
  const signIn = async (user: TestUser) => {
    clock.advance(1);
    return opened((await login(app, user.email)).session);
  };
  /** A user with `count` sessions: the registration's, then sign-ins, oldest first. */
  async function userWithSessions(tag: string, count: number) {
    const user = await registerUser(app, tag);
    const sessions = [opened({ access_token: user.accessToken, refresh_token: user.refreshToken })];
    while (sessions.length < count) sessions.push(await signIn(user));
    return { user, sessions };
  }
  /** The user's live sessions as support sees them (GET /v1/users/{id}/sessions), newest first. */
  const liveIds = async (userId: string) => {
    const res = await app.inject({
      method: 'GET',
      url: `/v1/users/${userId}/sessions?limit=100`,
      headers: bearer(admin.accessToken),
    });
    expect(res.statusCode, res.body).toBe(200);
    return (res.json().data as Array<{ id: string }>).map((s) => s.id);
  };
  const me = (token: string) => app.inject({ method: 'GET', url: '/v1/auth/me', headers: bearer(token) });
  const introspect = async (token: string) => {
    const res = await app.inject({
      method: 'POST',
      url: '/oauth/introspect',
      headers: { ...bearer(admin.accessToken), 'content-type': 'application/x-www-form-urlencoded' },
      payload: `token=${encodeURIComponent(token)}`,
    });
    expect(res.statusCode, res.body).toBe(200);
    return res.json() as { active: boolean };
  };
  const refresh = (refreshToken: string) =>
    app.inject({ method: 'POST', url: '/v1/auth/refresh', payload: { refresh_token: refreshToken } });
  const refreshGrant = (refreshToken: string) =>
    app.inject({
      method: 'POST',
      url: '/oauth/token',
      headers: { 'content-type': 'application/x-www-form-urlencoded' },
      payload: `grant_type=refresh_token&refresh_token=${encodeURIComponent(refreshToken)}`,
    });
  /** The `auth.session_ended` events about the user, as an administrator reads them, newest first. */
  const endedEvents = async (userId: string) => {
    const res = await app.inject({
      method: 'GET',
      url: `/v1/audit-events?subject_id=${userId}&type=auth.session_ended`,
      headers: bearer(admin.accessToken),
    });
    expect(res.statusCode, res.body).toBe(200);
    return res.json().data as Array<{
      actor_type: string;
      actor_id: string | null;
      ip: string | null;
      data: Record<string, unknown>;
    }>;
  };

  it('signing in once more than the limit leaves exactly the limit: the oldest ends as a session end does, audited', async () => {
    const { user, sessions } = await userWithSessions('cap-oldest', CAP);
    const [oldest] = sessions as [Opened];
    // Working before: what is refused below is refused because of the limit.
    expect((await me(oldest.accessToken)).statusCode).toBe(200);
    expect((await introspect(oldest.accessToken)).active).toBe(true);
    expect(await liveIds(user.id)).toHaveLength(CAP);

    const newest = await signIn(user);

    const live = await liveIds(user.id);
    expect(live).toHaveLength(CAP);
    expect(live).not.toContain(oldest.id);
    expect(live.sort()).toEqual([...sessions.slice(1), newest].map((s) => s.id).sort());
    // Its tokens are refused as an ended session's are: the refresh token (both ways of using it) and
    // the access token it had been given.
    const refused = await refresh(oldest.refreshToken);
    expect(refused.statusCode, refused.body).toBe(401);
    expect(refused.json().code).toBe('invalid_refresh_token');
    const grant = await refreshGrant(oldest.refreshToken);
    expect(grant.statusCode, grant.body).toBe(400);
    expect(grant.json().error).toBe('invalid_grant');
    expect((await me(oldest.accessToken)).statusCode).toBe(401);
    expect(await introspect(oldest.accessToken)).toEqual({ active: false });
    // Audited, by the sign-in that ended it.
    const events = await endedEvents(user.id);
    expect(events).toHaveLength(1);
    expect(events[0]).toMatchObject({
      actor_type: 'user',
      actor_id: user.id,
      data: { session_id: oldest.id, reason: 'session_limit', limit: CAP },
    });
    // And shown to the user in their activity, with the reason.
    const activity = await app.inject({
      method: 'GET',
      url: '/v1/auth/activity',
      headers: bearer(newest.accessToken),
    });
    expect(activity.json().data).toContainEqual(
      expect.objectContaining({
        type: 'auth.session_ended',
        by: 'you',
        details: { session_id: oldest.id, reason: 'session_limit' },
      }),
    );
    // Every other session works, the new one included.
    for (const session of [...sessions.slice(1), newest]) {
      expect((await me(session.accessToken)).statusCode, session.id).toBe(200);
      expect((await introspect(session.accessToken)).active, session.id).toBe(true);
      const next = await refresh(session.refreshToken);
      expect(next.statusCode, next.body).toBe(200);
    }
  });

  it('keeps the sessions in use: the one refreshed least recently ends, not the one opened first', async () => {
    const { user, sessions } = await userWithSessions('cap-lru', CAP);
    const [first, second] = sessions as [Opened, Opened];
    clock.advance(1);
    const refreshed = await refresh(first.refreshToken);
    expect(refreshed.statusCode, refreshed.body).toBe(200);

    await signIn(user);

    const live = await liveIds(user.id);
    expect(live).toHaveLength(CAP);
    expect(live).toContain(first.id);
    expect(live).not.toContain(second.id);
    expect((await me(refreshed.json().session.access_token)).statusCode).toBe(200);
    expect((await refresh(refreshed.json().session.refresh_token)).statusCode).toBe(200);
    expect((await me(second.accessToken)).statusCode).toBe(401);
    expect((await refresh(second.refreshToken)).statusCode).toBe(401);
  });

  it('a sign-in that completes with a second factor counts too', async () => {
    const user = await registerUser(app, 'cap-mfa');
    // Turning it on ends the other sessions: the one that did is the user's one session.
    const { code } = await turnOnMfa(app, user.accessToken, clock.nowMs);
    const first = opened({ access_token: user.accessToken, refresh_token: user.refreshToken });
    const verified: Opened[] = [];
    for (let i = 0; i < CAP; i++) {
      clock.advance(30); // a code is good once: each sign-in's from the next step
      const res = await app.inject({
        method: 'POST',
        url: '/v1/auth/login',
        payload: { email: user.email, password: user.password },
      });
      expect(res.statusCode, res.body).toBe(403);
      const done = await app.inject({
        method: 'POST',
        url: '/v1/auth/mfa/verify',
        payload: { mfa_token: res.json().mfa_token, code: code() },
      });
      expect(done.statusCode, done.body).toBe(200);
      verified.push(opened(done.json().session));
    }
    const live = await liveIds(user.id);
    expect(live.sort()).toEqual(verified.map((s) => s.id).sort());
    expect((await me(first.accessToken)).statusCode).toBe(401);
    expect((await refresh(first.refreshToken)).statusCode).toBe(401);
    expect((await endedEvents(user.id)).map((e) => e.data)).toEqual([
      { session_id: first.id, reason: 'session_limit', limit: CAP },
    ]);
  });

  it('a limit lowered since the user signed in: the next sign-in ends every session beyond it, each audited', async () => {
    // Opened under the default limit, by another instance on the same database.
    const roomy = await buildTestApp({ deps: { clock } });
    const user = await registerUser(roomy, 'cap-lowered');
    const sessions = [opened({ access_token: user.accessToken, refresh_token: user.refreshToken })];
    for (let i = 0; i < CAP + 2; i++) {
      clock.advance(1);
      sessions.push(opened((await login(roomy, user.email)).session));
    }
    expect(await liveIds(user.id)).toHaveLength(CAP + 3);

    const newest = await signIn(user);

    const kept = [...sessions.slice(-(CAP - 1)), newest];
    expect((await liveIds(user.id)).sort()).toEqual(kept.map((s) => s.id).sort());
    const ended = sessions.slice(0, sessions.length - (CAP - 1));
    expect(ended).toHaveLength(4);
    for (const session of ended) {
      expect((await me(session.accessToken)).statusCode, session.id).toBe(401);
      expect((await refresh(session.refreshToken)).statusCode, session.id).toBe(401);
    }
    const events = await endedEvents(user.id);
    expect(events.map((e) => e.data.session_id).sort()).toEqual(ended.map((s) => s.id).sort());
    expect(events.every((e) => e.data.reason === 'session_limit')).toBe(true);
  });

  it('counts a user’s live sessions through sessions_user_live_idx, without the sessions ended before', async () => {
    const plan = await app.services.db.transaction(async (tx) => {
      // On a table this small a scan is cheaper, so the planner is told to use an index if one fits.
      await tx.execute(sql`set local enable_seqscan = off`);
      const [row] = await selectRows<{ 'QUERY PLAN': unknown }>(
        tx,
        // The query of sessions.repository's revokeLeastRecentlyUsed.
        sql`explain (format json) select id from sessions
              where user_id = ${admin.id} and revoked_at is null and expires_at > now() and idle_expires_at > now()
              order by last_used_at desc, created_at desc, id desc offset ${CAP - 1}`,
      );
      return JSON.stringify(row?.['QUERY PLAN']);
    });
    expect(plan).toContain('sessions_user_live_idx');
  });

  // On PostgreSQL: a second sign-in of the user starts while the first, past its count, has not
  // committed; PGlite has one connection, and runs them one after the other anyway.
  it.skipIf(!inject('databaseUrl'))(
    'two sign-ins at once leave the user at the limit, not above it: the second waits and counts the first’s session',
    async () => {
      const { user } = await userWithSessions('cap-race', CAP);
      const byPassword = () =>
        app.inject({
          method: 'POST',
          url: '/v1/auth/login',
          payload: { email: user.email, password: user.password },
        });
      clock.advance(1);
      // The first sign-in has counted and opened its session, uncommitted, when the second starts;
      // the first commits once the second waits on it.
      const { first, second } = await secondWhileFirstCalls(
        inject('databaseUrl')!,
        app.services.repos.sessions,
        'insertSession',
        byPassword,
        byPassword,
      );
      expect(first.statusCode, first.body).toBe(200);
      expect(second.statusCode, second.body).toBe(200);
      const live = await liveIds(user.id);
      expect(live).toHaveLength(CAP);
      expect(live).toContain(decodeJwt(JSON.parse(first.body).session.access_token).sid);
      expect(live).toContain(decodeJwt(JSON.parse(second.body).session.access_token).sid);
      // Each pushed out a session of its own: two ended, neither twice.
      const ended = (await endedEvents(user.id)).map((e) => e.data.session_id);
      expect(ended).toHaveLength(2);
      expect(new Set(ended).size).toBe(2);
    },
  );
});
