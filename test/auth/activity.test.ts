import type { FastifyInstance } from 'fastify';
import { beforeAll, describe, expect, it } from 'vitest';
import { encodeCursor } from '../../src/lib/pagination.js';
import { buildTestApp } from '../support/app.js';
import { createTestClock } from '../support/clock.js';
import { createAdmin, login, PASSWORD, registerUser, type TestUser } from '../support/factories.js';
import { bearer } from '../support/http.js';
import { clientToken, createClient } from '../clients/helpers.js';
import { turnOnMfa } from '../support/mfa.js';

interface Activity {
  type: string;
  outcome: string;
  by: string;
  ip: string | null;
  user_agent: string | null;
  details: Record<string, string | string[]>;
}

describe('GET /v1/auth/activity: a user’s own account activity', () => {
  let app: FastifyInstance;
  let admin: TestUser;

  beforeAll(async () => {
    app = await buildTestApp();
    admin = await createAdmin(app);
  });

  const activity = (token: string, query = '') =>
    app.inject({ method: 'GET', url: `/v1/auth/activity${query}`, headers: bearer(token) });

  it('shows sign-ins, attempts and security changes, saying who and (for the user or someone unknown) where from', async () => {
    const user = await registerUser(app, 'activity');
    const other = await registerUser(app, 'activity-other');
    const wrong = await app.inject({
      method: 'POST',
      url: '/v1/auth/login',
      headers: { 'user-agent': 'guesser/1.0', 'x-forwarded-for': '203.0.113.9' },
      payload: { email: user.email, password: 'not the password at all' },
    });
    expect(wrong.statusCode).toBe(401);
    await login(app, user.email);
    const changed = await app.inject({
      method: 'POST',
      url: '/v1/auth/password',
      headers: { ...bearer(user.accessToken), 'user-agent': 'my-browser/2.0' },
      payload: { current_password: PASSWORD, new_password: 'another long passphrase' },
    });
    expect(changed.statusCode).toBe(204);
    const granted = await app.inject({
      method: 'PUT',
      url: `/v1/users/${user.id}/roles/admin`,
      headers: bearer(admin.accessToken),
    });
    expect(granted.statusCode).toBe(200);
    // Another user's doings are not this user's activity.
    await login(app, other.email);

    const res = await activity(user.accessToken);
    expect(res.statusCode, res.body).toBe(200);
    const events: Activity[] = res.json().data;
    const byType = (type: string, outcome = 'success') =>
      events.find((e) => e.type === type && e.outcome === outcome);
    expect(byType('auth.login', 'failure')).toMatchObject({
      by: 'anonymous',
      user_agent: 'guesser/1.0',
      details: { reason: 'wrong_password' },
    });
    expect(byType('auth.login')).toMatchObject({ by: 'you' });
    expect(byType('auth.password_changed')).toMatchObject({ by: 'you', user_agent: 'my-browser/2.0' });
    // What an administrator did is shown without where they were.
    expect(byType('role.granted')).toMatchObject({
      by: 'administrator',
      ip: null,
      user_agent: null,
      details: { role: 'admin' },
    });
    expect(events.map((e) => e.type)).not.toContain('authorization.denied');
    // Newest first: the grant came last.
    expect(events[0]!.type).toBe('role.granted');
    const otherEvents: Activity[] = (await activity(other.accessToken)).json().data;
    expect(otherEvents.some((e) => e.type === 'auth.password_changed')).toBe(false);
    expect(otherEvents.some((e) => e.type === 'role.granted')).toBe(false);
  });

  it('shows a sign-in waiting for its second factor (the password is known), wrong codes by someone unknown, and revoked tokens', async () => {
    const user = await registerUser(app, 'activity-mfa');
    const mfa = await turnOnMfa(app, user.accessToken);
    const signedIn = await app.inject({
      method: 'POST',
      url: '/v1/auth/login',
      headers: { 'x-forwarded-for': '198.51.100.7' },
      payload: { email: user.email, password: PASSWORD },
    });
    expect(signedIn.statusCode).toBe(403);
    const wrongCode = mfa.code(20) === mfa.code() ? '000000' : mfa.code(20);
    const verify = await app.inject({
      method: 'POST',
      url: '/v1/auth/mfa/verify',
      headers: { 'x-forwarded-for': '198.51.100.7', 'user-agent': 'guesser/2.0' },
      payload: { mfa_token: signedIn.json().mfa_token, code: wrongCode },
    });
    expect(verify.statusCode, verify.body).toBe(400);
    const current = (
      await app.inject({
        method: 'POST',
        url: '/v1/auth/mfa/verify',
        // The app's current code went to turning it on (a code works once): a recovery code.
        payload: { mfa_token: signedIn.json().mfa_token, code: mfa.recoveryCodes[0] },
      })
    ).json().session.access_token as string;
    const revoked = await app.inject({
      method: 'POST',
      url: '/oauth/revoke',
      headers: { ...bearer(current), 'content-type': 'application/x-www-form-urlencoded' },
      payload: `token=${user.accessToken}`,
    });
    expect(revoked.statusCode).toBe(200);
    const events = (await activity(current)).json().data as Activity[];
    expect(events.find((e) => e.type === 'access_token.revoked')).toMatchObject({
      outcome: 'success',
      by: 'you',
    });
    expect(events.find((e) => e.type === 'auth.login' && e.outcome === 'failure')).toMatchObject({
      by: 'anonymous',
      user_agent: 'guesser/2.0',
    });
    // The password was given, not yet the second factor: someone (maybe not the user), with where from.
    expect(events.find((e) => e.type === 'auth.mfa_challenge')).toMatchObject({
      outcome: 'success',
      by: 'anonymous',
      ip: '127.0.0.1',
    });
  });

  it('shows the user’s profile changes with which fields changed, not their values, and not in another user’s feed', async () => {
    const user = await registerUser(app, 'activity-profile');
    const other = await registerUser(app, 'activity-profile-other');
    const changed = await app.inject({
      method: 'PATCH',
      url: '/v1/profiles/me',
      headers: { ...bearer(user.accessToken), 'user-agent': 'profile-editor/1.0' },
      payload: { display_name: 'Secret Name', bio: 'private bio' },
    });
    expect(changed.statusCode, changed.body).toBe(200);

    const res = await activity(user.accessToken);
    expect(res.statusCode, res.body).toBe(200);
    const events: Activity[] = res.json().data;
    expect(events[0]).toEqual({
      id: expect.any(String),
      type: 'profile.updated',
      outcome: 'success',
      by: 'you',
      ip: '127.0.0.1',
      user_agent: 'profile-editor/1.0',
      details: { fields: ['display_name', 'bio'] },
      created_at: expect.any(String),
    });
    expect(res.body).not.toContain('Secret Name');
    expect(res.body).not.toContain('private bio');
    const otherEvents: Activity[] = (await activity(other.accessToken)).json().data;
    expect(otherEvents.map((e) => e.type)).not.toContain('profile.updated');
  });

  it('pages with limit and cursor', async () => {
    const user = await registerUser(app, 'activity-pages');
    for (let i = 0; i < 3; i++) await login(app, user.email);
    const first = await activity(user.accessToken, '?limit=2');
    expect(first.json().data).toHaveLength(2);
    const cursor = first.json().next_cursor;
    expect(cursor).toBeTruthy();
    const second = await activity(user.accessToken, `?limit=2&cursor=${encodeURIComponent(cursor)}`);
    expect(second.statusCode).toBe(200);
    const ids = [...first.json().data, ...second.json().data].map((e: { id: string }) => e.id);
    expect(new Set(ids).size).toBe(ids.length);
    expect((await activity(user.accessToken, '?limit=0')).statusCode).toBe(400);
  });

  it('is for users: an API key of the user reads it, a service token gets 403', async () => {
    const user = await registerUser(app, 'activity-key');
    const key = await app.inject({
      method: 'POST',
      url: '/v1/api-keys',
      headers: bearer(user.accessToken),
      payload: { name: 'activity reader', scopes: ['account:read'] },
    });
    expect(key.statusCode, key.body).toBe(201);
    const byKey = await app.inject({
      method: 'GET',
      url: '/v1/auth/activity',
      headers: { 'x-api-key': key.json().key },
    });
    expect(byKey.statusCode, byKey.body).toBe(200);
    expect(
      byKey.json().data.some((e: Activity) => e.type === 'user.registered' || e.type === 'auth.login'),
    ).toBe(true);
    const client = await createClient(app, admin.accessToken, { scopes: ['account:read'] });
    const service = await clientToken(app, client);
    expect((await activity(service.access_token)).statusCode).toBe(403);
  });
});

describe('GET /v1/auth/activity?since=&settled=: followed as the audit log is, with complete_until', () => {
  const clock = createTestClock();
  let app: FastifyInstance;

  beforeAll(async () => {
    app = await buildTestApp({ deps: { clock } });
  });

  interface Page {
    data: Array<Activity & { id: string; created_at: string }>;
    next_cursor: string | null;
    complete_until: string;
  }

  const read = (token: string, query: string) =>
    app.inject({ method: 'GET', url: `/v1/auth/activity?${query}`, headers: bearer(token) });
  const at = (instant: string) => encodeURIComponent(instant);

  it('since= reads what happened at or after the instant, newest first, page by page; every page answers the complete_until of the first', async () => {
    const user = await registerUser(app, 'activity-since');
    clock.advance(10);
    const since = clock.now().toISOString();
    for (let i = 0; i < 3; i++) {
      clock.advance(1);
      await login(app, user.email);
    }
    const pages: Page[] = [];
    let cursor: string | null = null;
    do {
      const res = await read(
        user.accessToken,
        `since=${at(since)}&limit=2${cursor ? `&cursor=${encodeURIComponent(cursor)}` : ''}`,
      );
      expect(res.statusCode, res.body).toBe(200);
      pages.push(res.json());
      cursor = pages.at(-1)!.next_cursor;
      // Written while the read goes on: a later read's, not this one's complete_until.
      if (pages.length === 1) clock.advance(60);
    } while (cursor);
    expect(pages).toHaveLength(2);
    const events = pages.flatMap((p) => p.data);
    // The registration came before `since`.
    expect(events.map((e) => e.type)).toEqual(['auth.login', 'auth.login', 'auth.login']);
    const stamps = events.map((e) => e.created_at);
    expect(stamps).toEqual([...stamps].sort().reverse());
    expect(new Set(pages.map((p) => p.complete_until)).size).toBe(1);
    // At or after to the last digit sent: a fraction past the newest event's millisecond leaves it out.
    const newest = stamps[0]!;
    const past = await read(user.accessToken, `since=${at(newest.replace('Z', '1Z'))}`);
    expect(past.json().data).toEqual([]);
    expect((await read(user.accessToken, `since=${at(newest)}`)).json().data).toHaveLength(1);
  });

  it('settled=true stops at complete_until, the default reads up to now; every answer says complete_until, and following it misses nothing', async () => {
    const user = await registerUser(app, 'activity-settled');
    const since = new Date(clock.nowMs() - 1000).toISOString();
    const before = clock.nowMs();
    const settled = await read(user.accessToken, `settled=true&since=${at(since)}`);
    const after = clock.nowMs();
    expect(settled.statusCode, settled.body).toBe(200);
    const settleMs = app.services.audit.settleMs;
    const completeUntil = Date.parse(settled.json().complete_until);
    expect(completeUntil).toBeGreaterThanOrEqual(before - settleMs);
    expect(completeUntil).toBeLessThanOrEqual(after - settleMs);
    const types = (res: { json(): Page }) => res.json().data.map((e) => e.type);
    // Just written: within the window on PostgreSQL, not yet settled (PGlite has none).
    expect(types(settled)).toEqual(settleMs > 0 ? [] : ['user.registered']);
    expect(types(await read(user.accessToken, 'settled=true'))).toEqual(
      settleMs > 0 ? [] : ['user.registered'],
    );
    // Up to now by default, with since= or without, and with settled=false.
    for (const query of [`since=${at(since)}`, `since=${at(since)}&settled=false`, '']) {
      const res = await read(user.accessToken, query);
      expect(types(res), query).toEqual(['user.registered']);
      expect(res.json().complete_until, query).toEqual(expect.any(String));
    }
    // Followed: each read from the last one's complete_until (or its own since when later).
    clock.advance(settleMs / 1000 + 1);
    const first = await read(user.accessToken, `settled=true&since=${at(since)}`);
    expect(types(first)).toEqual(['user.registered']);
    clock.advance(1);
    await login(app, user.email);
    clock.advance(settleMs / 1000 + 1);
    const next = [since, first.json().complete_until].sort().at(-1)!;
    expect(types(await read(user.accessToken, `settled=true&since=${at(next)}`))).toEqual(['auth.login']);
  });

  it('a cursor of the plain (created_at, id) kind, as the feed gave before, still pages', async () => {
    const user = await registerUser(app, 'activity-old-cursor');
    clock.advance(1);
    await login(app, user.email);
    const all = (await read(user.accessToken, '')).json() as Page;
    expect(all.data.map((e) => e.type)).toEqual(['auth.login', 'user.registered']);
    const newest = all.data[0]!;
    const cursor = encodeCursor({ at: new Date(newest.created_at), id: newest.id });
    const rest = await read(user.accessToken, `cursor=${encodeURIComponent(cursor)}`);
    expect(rest.statusCode, rest.body).toBe(200);
    expect(rest.json().data.map((e: { type: string }) => e.type)).toEqual(['user.registered']);
  });

  it('refuses a since or settled it cannot read (400 naming it), as the audit log does', async () => {
    const user = await registerUser(app, 'activity-bad-since');
    const admin = await createAdmin(app);
    for (const [query, field] of [
      ['since=yesterday', 'query.since'],
      ['since=2026-13-01T00:00:00Z', 'query.since'],
      [`since=${at('9999-12-31T23:59:59-23:59')}`, 'query.since'],
      ['settled=yes', 'query.settled'],
      ['until=2026-01-01T00:00:00Z', 'query.until'],
    ]) {
      const res = await read(user.accessToken, query!);
      expect(res.statusCode, query).toBe(400);
      expect(res.headers['content-type']).toContain('application/problem+json');
      expect(res.json().errors, query).toEqual([expect.objectContaining({ field })]);
      const audit = await app.inject({
        method: 'GET',
        url: `/v1/audit-events?${query}`,
        headers: bearer(admin.accessToken),
      });
      expect(audit.json().errors, `audit: ${query}`).toEqual(res.json().errors);
    }
  });
});
