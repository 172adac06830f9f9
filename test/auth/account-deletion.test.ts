import type { FastifyInstance } from 'fastify';
import { beforeAll, describe, expect, it, vi } from 'vitest';
import { buildTestApp } from '../support/app.js';
import { createTestClock } from '../support/clock.js';
import { PASSWORD, registerUser, type TestUser } from '../support/factories.js';
import { bearer } from '../support/http.js';
import { turnOnMfa } from '../support/mfa.js';

describe('DELETE /v1/auth/me: deleting one’s own account', () => {
  let app: FastifyInstance;
  const clock = createTestClock();
  beforeAll(async () => {
    app = await buildTestApp({ deps: { clock } });
  });

  const remove = (
    token: string,
    payload: Record<string, unknown>,
    headers: Record<string, string> = bearer(token),
  ) => app.inject({ method: 'DELETE', url: '/v1/auth/me', headers, payload });
  const signIn2 = (user: TestUser) =>
    app.inject({
      method: 'POST',
      url: '/v1/auth/login',
      payload: { email: user.email, password: user.password },
    });

  it('deletes the account with the current password: sessions, keys and profile go, audited as the user', async () => {
    const user = await registerUser(app, 'delete-self');
    const key = await app.inject({
      method: 'POST',
      url: '/v1/api-keys',
      headers: bearer(user.accessToken),
      payload: { name: 'k', scopes: ['account:read'] },
    });
    expect(key.statusCode).toBe(201);
    const res = await remove(user.accessToken, { password: PASSWORD });
    expect(res.statusCode, res.body).toBe(204);
    expect((await signIn2(user)).statusCode).toBe(401);
    expect(
      (await app.inject({ method: 'GET', url: '/v1/auth/me', headers: bearer(user.accessToken) })).statusCode,
    ).toBe(401);
    expect(
      (await app.inject({ method: 'GET', url: '/v1/auth/me', headers: { 'x-api-key': key.json().key } }))
        .statusCode,
    ).toBe(401);
    expect(await app.services.repos.users.findById(user.id)).toBeUndefined();
    const [event] = await app.services.audit.list({ subjectId: user.id, type: 'user.deleted', limit: 5 });
    expect(event).toMatchObject({ outcome: 'success', actorId: user.id });
    // The address is free again.
    const again = await app.inject({
      method: 'POST',
      url: '/v1/auth/register',
      payload: { email: user.email, password: PASSWORD },
    });
    expect(again.statusCode).toBe(201);
  });

  it('sent several times at once, deletes once; the others are told the session went with it (401)', async () => {
    const user = await registerUser(app, 'delete-race');
    const answers = await Promise.all([1, 2, 3].map(() => remove(user.accessToken, { password: PASSWORD })));
    const statuses = answers.map((r) => r.statusCode).sort();
    expect(statuses).toEqual([204, 401, 401]);
    for (const r of answers.filter((a) => a.statusCode === 401)) expect(r.json().code).toBe('invalid_token');
    const events = await app.services.audit.list({ subjectId: user.id, type: 'user.deleted', limit: 5 });
    expect(events.filter((e) => e.outcome === 'success')).toHaveLength(1);
    // A password change that was under way as it went is told the same (not a 404 it does not declare).
    const context = {
      actorType: 'user' as const,
      actorId: user.id,
      ip: null,
      userAgent: null,
      requestId: null,
    };
    await expect(
      app.services.auth.changePassword(
        user.id,
        undefined,
        { currentPassword: PASSWORD, newPassword: 'another long passphrase' },
        context,
      ),
    ).rejects.toMatchObject({ code: 'invalid_token' });
  });

  it('refuses a wrong password (400 naming it, counted, audited) and an API key (403), deleting nothing', async () => {
    const user = await registerUser(app, 'delete-wrong');
    const wrong = await remove(user.accessToken, { password: `${PASSWORD}!` });
    expect(wrong.statusCode).toBe(400);
    // Not a 401: the session is good, and a 401 would tell the client to sign in again.
    expect(wrong.headers['www-authenticate']).toBeUndefined();
    expect(wrong.json()).toMatchObject({ code: 'incorrect_password', errors: [{ field: 'body.password' }] });
    const key = await app.inject({
      method: 'POST',
      url: '/v1/api-keys',
      headers: bearer(user.accessToken),
      payload: { name: 'k', scopes: ['account:read', 'account:write'] },
    });
    const byKey = await remove('', { password: PASSWORD }, { 'x-api-key': key.json().key });
    expect(byKey.statusCode).toBe(403);
    expect((await remove(user.accessToken, {})).statusCode).toBe(400);
    expect(await app.services.repos.users.findById(user.id)).toBeDefined();
    const [event] = await app.services.audit.list({ subjectId: user.id, type: 'user.deleted', limit: 5 });
    expect(event).toMatchObject({ outcome: 'failure', data: { reason: 'wrong_password' } });
  });

  it('a sign-in whose password was checked as the account was deleted does not bring it back', async () => {
    const user = await registerUser(app, 'delete-racing-login');
    const { provider } = app.services;
    const signIn = provider.signIn.bind(provider);
    // The deletion commits while the password is being checked.
    const spy = vi.spyOn(provider, 'signIn').mockImplementationOnce(async (email, password) => {
      const identity = await signIn(email, password);
      expect((await remove(user.accessToken, { password: PASSWORD })).statusCode).toBe(204);
      return identity;
    });
    try {
      const res = await signIn2(user);
      expect(res.statusCode, res.body).toBe(401);
      expect(await app.services.repos.users.findById(user.id)).toBeUndefined();
    } finally {
      spy.mockRestore();
    }
    // The same token again: the account no longer exists (401, as for any credential gone).
    const again = await remove(user.accessToken, { password: PASSWORD });
    expect(again.statusCode).toBe(401);
  });

  it('asks for a current code too when two-step verification is on', async () => {
    const user = await registerUser(app, 'delete-mfa');
    const { code } = await turnOnMfa(app, user.accessToken, clock.nowMs);
    clock.advance(30);
    const missing = await remove(user.accessToken, { password: PASSWORD });
    expect(missing.statusCode).toBe(400);
    expect(missing.json().errors).toEqual([
      { field: 'body.code', message: expect.stringContaining('required') },
    ]);
    const wrong = await remove(user.accessToken, {
      password: PASSWORD,
      code: '000000' === code() ? '111111' : '000000',
    });
    expect(wrong.statusCode).toBe(400);
    expect(wrong.json().code).toBe('invalid_mfa_code');
    expect(await app.services.repos.users.findById(user.id)).toBeDefined();
    const ok = await remove(user.accessToken, { password: PASSWORD, code: code() });
    expect(ok.statusCode, ok.body).toBe(204);
    expect(await app.services.repos.users.findById(user.id)).toBeUndefined();
  });
});
