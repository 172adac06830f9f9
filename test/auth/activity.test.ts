import type { FastifyInstance } from 'fastify';
import { beforeAll, describe, expect, it } from 'vitest';
import { buildTestApp } from '../support/app.js';
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
  details: Record<string, string>;
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
