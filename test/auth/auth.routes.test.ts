import type { FastifyInstance } from 'fastify';
import { createRemoteJWKSet, customFetch, decodeJwt, decodeProtectedHeader, jwtVerify, SignJWT } from 'jose';
import { beforeAll, describe, expect, it, vi } from 'vitest';
import { atTime } from '../support/clock.js';
import { buildTestApp, uniqueEmail } from '../support/app.js';
import { login, PASSWORD, registerUser, type TestUser } from '../support/factories.js';
import { allPages, bearer, injectFetch } from '../support/http.js';
import { captureLogs } from '../support/logs.js';
import { createKey, withKey } from '../api-keys/helpers.js';
import { clientToken, createClient, form, userWith } from '../clients/helpers.js';
import { turnOnMfa } from '../support/mfa.js';

describe('auth: register, login, me, refresh, logout (local provider)', () => {
  let app: FastifyInstance;
  beforeAll(async () => {
    app = await buildTestApp();
  });

  it('registers, logs in and answers /me with user, roles, permissions and profile', async () => {
    const email = uniqueEmail('flow');
    const reg = await app.inject({
      method: 'POST',
      url: '/v1/auth/register',
      payload: { email, password: PASSWORD, display_name: 'Ada' },
    });
    expect(reg.statusCode).toBe(201);
    const body = reg.json();
    expect(body.user).toMatchObject({ email, status: 'active', email_confirmed_at: null });
    expect(body.user.id).toMatch(/^[0-9a-f-]{36}$/);
    expect(body.session).toMatchObject({ token_type: 'Bearer', expires_in: 900 });
    expect(body.session.refresh_token).toMatch(/^prt_/);
    expect(JSON.stringify(body)).not.toContain('password');

    const loggedIn = await login(app, email);
    const me = await app.inject({
      method: 'GET',
      url: '/v1/auth/me',
      headers: bearer(loggedIn.session.access_token),
    });
    expect(me.statusCode).toBe(200);
    expect(me.json()).toMatchObject({
      user: { id: body.user.id, email },
      roles: ['user'],
      profile: { display_name: 'Ada', user_id: body.user.id },
    });
    expect(me.json().permissions).toEqual(expect.arrayContaining(['account:read', 'account:write']));
  });

  it('refuses a duplicate email (409, any case) and weak passwords (422)', async () => {
    const user = await registerUser(app);
    const dup = await app.inject({
      method: 'POST',
      url: '/v1/auth/register',
      payload: { email: user.email.toUpperCase(), password: PASSWORD },
    });
    expect(dup.statusCode).toBe(409);
    expect(dup.json().code).toBe('email_taken');
    // API.md: under 8 characters is a weak password, 0 included.
    for (const password of ['', 'short', 'password1234', 'x'.repeat(129), 'x'.repeat(4000), 'baseball']) {
      const res = await app.inject({
        method: 'POST',
        url: '/v1/auth/register',
        payload: { email: uniqueEmail('weak'), password },
      });
      expect(res.statusCode, password).toBe(422);
      expect(res.json().code).toBe('weak_password');
    }
  });

  it('answers a sign-in with a password of thousands of characters as a wrong password (401)', async () => {
    const user = await registerUser(app, 'long-guess');
    const res = await app.inject({
      method: 'POST',
      url: '/v1/auth/login',
      payload: { email: user.email, password: 'x'.repeat(4000) },
    });
    expect(res.statusCode).toBe(401);
    expect(res.json().code).toBe('invalid_credentials');
  });

  it('refuses a password that is not well-formed Unicode (400), which would hash like a different one', async () => {
    // A lone surrogate is encoded as U+FFFD for hashing: '\ud800', '\udfff' and '\ufffd' would all match.
    const email = uniqueEmail('surrogate');
    const lone = 'correct horse \ud800 battery';
    const register = await app.inject({
      method: 'POST',
      url: '/v1/auth/register',
      payload: { email, password: lone },
    });
    expect(register.statusCode, register.body).toBe(400);
    expect(register.json().errors).toEqual([expect.objectContaining({ field: 'body.password' })]);
    const user = await registerUser(app);
    const surrogateLogin = await app.inject({
      method: 'POST',
      url: '/v1/auth/login',
      payload: { email: user.email, password: `${PASSWORD}\udfff` },
    });
    expect(surrogateLogin.statusCode).toBe(400);
    const change = await app.inject({
      method: 'POST',
      url: '/v1/auth/password',
      headers: bearer(user.accessToken),
      payload: { current_password: PASSWORD, new_password: lone },
    });
    expect(change.statusCode).toBe(400);
    expect(change.json().errors).toEqual([expect.objectContaining({ field: 'body.new_password' })]);
    // Nothing was created or changed: the email is free, the old password still works.
    const later = await app.inject({
      method: 'POST',
      url: '/v1/auth/register',
      payload: { email, password: 'correct horse \u{1F40E} battery' },
    });
    expect(later.statusCode, later.body).toBe(201);
    expect((await login(app, user.email)).session.access_token).toBeTruthy();
  });

  it('answers unknown email and wrong password identically', async () => {
    const user = await registerUser(app);
    const wrong = await app.inject({
      method: 'POST',
      url: '/v1/auth/login',
      payload: { email: user.email, password: 'not the password at all' },
    });
    const unknown = await app.inject({
      method: 'POST',
      url: '/v1/auth/login',
      payload: { email: uniqueEmail('ghost'), password: 'not the password at all' },
    });
    expect(wrong.statusCode).toBe(401);
    expect(unknown.statusCode).toBe(401);
    const strip = (b: Record<string, unknown>) => ({ ...b, request_id: undefined });
    expect(strip(wrong.json())).toEqual(strip(unknown.json()));
    expect(wrong.json().code).toBe('invalid_credentials');
  });

  it('refuses an access token past its expiry and the 30 s leeway, whether it was seen before or not', async () => {
    const user = await registerUser(app);
    const seen = user.accessToken;
    const unseen = (await login(app, user.email)).session.access_token;
    // The first is verified now, so it is in the verified-token cache when its expiry comes.
    const now = await app.inject({ method: 'GET', url: '/v1/auth/me', headers: bearer(seen) });
    expect(now.statusCode).toBe(200);

    const ttl = app.services.config.tokens.accessTtl;
    // Inside the leeway both are still accepted; past it, both are refused as expired.
    await atTime(app, new Date(Date.now() + (ttl + 20) * 1000), async () => {
      const within = await app.inject({ method: 'GET', url: '/v1/auth/me', headers: bearer(seen) });
      expect(within.statusCode).toBe(200);
    });
    await atTime(app, new Date(Date.now() + (ttl + 31) * 1000), async () => {
      for (const token of [seen, unseen]) {
        const res = await app.inject({ method: 'GET', url: '/v1/auth/me', headers: bearer(token) });
        expect(res.statusCode).toBe(401);
        expect(res.json()).toMatchObject({ code: 'invalid_token', detail: 'The access token has expired' });
      }
    });
  });

  it('rotates the refresh token, and replaying a rotated one kills the whole family', async () => {
    const user = await registerUser(app);
    const first = await app.inject({
      method: 'POST',
      url: '/v1/auth/refresh',
      payload: { refresh_token: user.refreshToken },
    });
    expect(first.statusCode).toBe(200);
    const rotated = first.json().session;
    expect(rotated.refresh_token).not.toBe(user.refreshToken);
    const me = await app.inject({ method: 'GET', url: '/v1/auth/me', headers: bearer(rotated.access_token) });
    expect(me.statusCode).toBe(200);

    // Past the grace window, the old token is a replay.
    const grace = app.services.config.tokens.reuseGraceSeconds;
    await atTime(app, new Date(Date.now() + (grace + 1) * 1000), async () => {
      const replay = await app.inject({
        method: 'POST',
        url: '/v1/auth/refresh',
        payload: { refresh_token: user.refreshToken },
      });
      expect(replay.statusCode).toBe(401);
      expect(replay.json().code).toBe('invalid_refresh_token');
    });
    // The family is dead: the newest refresh token and the access token of the session both fail.
    const after = await app.inject({
      method: 'POST',
      url: '/v1/auth/refresh',
      payload: { refresh_token: rotated.refresh_token },
    });
    expect(after.statusCode).toBe(401);
    const meAfter = await app.inject({
      method: 'GET',
      url: '/v1/auth/me',
      headers: bearer(rotated.access_token),
    });
    expect(meAfter.statusCode).toBe(401);
    expect(meAfter.headers['www-authenticate']).toContain('invalid_token');
    const events = await app.services.audit.list({
      actorId: undefined,
      type: 'refresh_token.reused',
      limit: 200,
    });
    expect(events.some((e) => e.subjectId === user.id)).toBe(true);
  });

  it('lets concurrent refreshes of one token within the grace all succeed in one family', async () => {
    const user = await registerUser(app);
    const results = await Promise.all(
      Array.from({ length: 10 }, () =>
        app.inject({
          method: 'POST',
          url: '/v1/auth/refresh',
          payload: { refresh_token: user.refreshToken },
        }),
      ),
    );
    for (const r of results) expect(r.statusCode).toBe(200);
    // One successor, whoever asked: the family has one live chain, not ten.
    expect(new Set(results.map((r) => r.json().session.refresh_token)).size).toBe(1);
    const sessions = await app.inject({
      method: 'GET',
      url: '/v1/auth/sessions',
      headers: bearer(user.accessToken),
    });
    expect(sessions.json().data).toHaveLength(1);
  });

  it('a refresh token replayed within the grace gets the successor already handed out, so a thief never holds a chain of their own', async () => {
    const user = await registerUser(app);
    const refresh = (token: string) =>
      app.inject({ method: 'POST', url: '/v1/auth/refresh', payload: { refresh_token: token } });
    const client = (await refresh(user.refreshToken)).json().session;
    // A second redemption a moment later (the thief, within the grace): the same successor.
    const thief = await refresh(user.refreshToken);
    expect(thief.statusCode).toBe(200);
    expect(thief.json().session.refresh_token).toBe(client.refresh_token);
    expect(thief.json().session.access_token).not.toBe(client.access_token);
    // The client rotates on; past the grace the thief's copy is a used token, and ends the family.
    const next = (await refresh(client.refresh_token)).json().session;
    const grace = app.services.config.tokens.reuseGraceSeconds;
    await atTime(app, new Date(Date.now() + (grace + 1) * 1000), async () => {
      const replay = await refresh(thief.json().session.refresh_token);
      expect(replay.statusCode).toBe(401);
      expect(replay.json().detail).toContain('already used');
    });
    expect((await refresh(next.refresh_token)).statusCode).toBe(401);
  });

  it('logout ends the session; logout all ends every session', async () => {
    const user = await registerUser(app);
    const second = await login(app, user.email);
    const third = await login(app, user.email);
    const out = await app.inject({
      method: 'POST',
      url: '/v1/auth/logout',
      headers: bearer(user.accessToken),
    });
    expect(out.statusCode).toBe(204);
    expect(
      (await app.inject({ method: 'GET', url: '/v1/auth/me', headers: bearer(user.accessToken) })).statusCode,
    ).toBe(401);
    expect(
      (await app.inject({ method: 'GET', url: '/v1/auth/me', headers: bearer(second.session.access_token) }))
        .statusCode,
    ).toBe(200);

    const all = await app.inject({
      method: 'POST',
      url: '/v1/auth/logout',
      headers: bearer(second.session.access_token),
      payload: { scope: 'all' },
    });
    expect(all.statusCode).toBe(204);
    for (const s of [second.session, third.session]) {
      expect(
        (await app.inject({ method: 'GET', url: '/v1/auth/me', headers: bearer(s.access_token) })).statusCode,
      ).toBe(401);
      const r = await app.inject({
        method: 'POST',
        url: '/v1/auth/refresh',
        payload: { refresh_token: s.refresh_token },
      });
      expect(r.statusCode).toBe(401);
    }
  });

  it('logout with the refresh token of a session already ended ends the current one, as an unknown token does', async () => {
    const user = await registerUser(app, 'stale-logout');
    const first = await app.inject({
      method: 'POST',
      url: '/v1/auth/logout',
      headers: bearer(user.accessToken),
    });
    expect(first.statusCode).toBe(204);
    const again = await login(app, user.email);
    const out = await app.inject({
      method: 'POST',
      url: '/v1/auth/logout',
      headers: bearer(again.session.access_token),
      payload: { refresh_token: user.refreshToken },
    });
    expect(out.statusCode).toBe(204);
    const me = await app.inject({
      method: 'GET',
      url: '/v1/auth/me',
      headers: bearer(again.session.access_token),
    });
    expect(me.statusCode).toBe(401);
    const refreshed = await app.inject({
      method: 'POST',
      url: '/v1/auth/refresh',
      payload: { refresh_token: again.session.refresh_token },
    });
    expect(refreshed.statusCode).toBe(401);
  });

  it('a session’s token without account:read (narrowed at a refresh, or of a user holding nothing) ends its own session, and only it', async () => {
    const user = await registerUser(app, 'narrowed-logout');
    const other = await login(app, user.email);
    // RFC 6749 §6: the refresh grant narrows that one access token to part of the user's permissions.
    const narrowing = await form(app, '/oauth/token', {
      grant_type: 'refresh_token',
      refresh_token: user.refreshToken,
      scope: 'api_keys:own',
    });
    expect(narrowing.statusCode, narrowing.body).toBe(200);
    const narrowed = narrowing.json() as { access_token: string; refresh_token: string };
    const logout = (token: string, payload?: Record<string, string>) =>
      app.inject({ method: 'POST', url: '/v1/auth/logout', headers: bearer(token), payload });
    const me = (token: string) => app.inject({ method: 'GET', url: '/v1/auth/me', headers: bearer(token) });
    expect((await me(narrowed.access_token)).statusCode).toBe(403); // no account:read

    // An API key has no session of its own: without account:read it ends none, even one it names.
    const writeOnly = await createKey(app, other.session.access_token, { scopes: ['account:write'] });
    for (const payload of [{ refresh_token: other.session.refresh_token }, { scope: 'all' }]) {
      const byKey = await app.inject({
        method: 'POST',
        url: '/v1/auth/logout',
        headers: withKey(writeOnly.key),
        payload,
      });
      expect(byKey.statusCode, byKey.body).toBe(403);
    }
    // Not every session: that takes account:read, named in the challenge; nothing ends.
    const all = await logout(narrowed.access_token, { scope: 'all' });
    expect(all.statusCode, all.body).toBe(403);
    expect(all.headers['www-authenticate']).toBe(
      'Bearer realm="paservices", error="insufficient_scope", scope="account:read"',
    );
    expect((await me(other.session.access_token)).statusCode).toBe(200);
    // Its own session, even when a refresh token names another one of the user's.
    const out = await logout(narrowed.access_token, { refresh_token: other.session.refresh_token });
    expect(out.statusCode, out.body).toBe(204);
    expect((await logout(narrowed.access_token)).statusCode).toBe(401);
    for (const refreshToken of [narrowed.refresh_token, user.refreshToken]) {
      const refreshed = await app.inject({
        method: 'POST',
        url: '/v1/auth/refresh',
        payload: { refresh_token: refreshToken },
      });
      expect(refreshed.statusCode, refreshed.body).toBe(401);
    }
    const left = await app.inject({
      method: 'GET',
      url: '/v1/auth/sessions',
      headers: bearer(other.session.access_token),
    });
    expect((left.json().data as Array<{ current: boolean }>).map((s) => s.current)).toEqual([true]);
    const [event] = await app.services.audit.list({ subjectId: user.id, type: 'auth.logout', limit: 5 });
    expect(event?.data).toEqual({ scope: 'session', sessions: [decodeJwt(narrowed.access_token).sid] });

    // A user who holds no permission at all signs out too.
    const bare = await registerUser(app, 'holds-nothing');
    await app.services.repos.users.removeRole(bare.id, 'user');
    const signedIn = await login(app, bare.email);
    expect(decodeJwt(signedIn.session.access_token).scope ?? '').toBe('');
    expect((await logout(signedIn.session.access_token)).statusCode).toBe(204);
    expect((await logout(signedIn.session.access_token)).statusCode).toBe(401);
  });

  it('a service’s token has no session to end: logout is 403 for it, worded for a service, whatever the scope', async () => {
    const owner = await userWith(app, ['clients:write'], 'service-logout');
    for (const scopes of [['account:read'], ['account:read', 'account:write']]) {
      const client = await createClient(app, owner.accessToken, { scopes });
      const { access_token } = await clientToken(app, client);
      for (const payload of [{ scope: 'all' }, { scope: 'session' }, {}]) {
        const res = await app.inject({
          method: 'POST',
          url: '/v1/auth/logout',
          headers: bearer(access_token),
          payload,
        });
        const label = `${scopes.join(' ')} ${JSON.stringify(payload)}`;
        expect(res.statusCode, label).toBe(403);
        expect(res.json().detail, label).toBe('This route is for users, not services');
      }
    }
    // Its creator's sessions were not its to end.
    expect(
      (await app.inject({ method: 'GET', url: '/v1/auth/me', headers: bearer(owner.accessToken) }))
        .statusCode,
    ).toBe(200);
  });

  it('bootstraps one admin when instances try at once: the one whose account loses the race finds it made', async () => {
    const email = uniqueEmail('bootstrap-race');
    const context = {
      actorType: 'system' as const,
      actorId: null,
      credentialId: null,
      ip: null,
      userAgent: null,
      requestId: null,
    };
    // `force`, as an empty database would: each finds no admin and no account, and makes one.
    const results = await Promise.all(
      [1, 2, 3].map(() =>
        app.services.auth.bootstrapAdmin({ email, password: 'a bootstrap passphrase', force: true }, context),
      ),
    );
    expect(results.filter((r) => r.created)).toHaveLength(1);
    const ids = new Set(results.map((r) => r.user?.id));
    expect(ids.size).toBe(1);
    const { roles } = await app.services.repos.users.rolesAndPermissions([...ids][0]!);
    expect(roles).toEqual(expect.arrayContaining(['admin', 'user']));
    await login(app, email, 'a bootstrap passphrase');
  });

  it('keeps at most 512 characters of a User-Agent on the session and the audit event', async () => {
    const user = await registerUser(app, 'long-agent');
    const agent = `agent/${'x'.repeat(10_000)}`;
    const current = await sessionOfLogin(app, user, { 'user-agent': agent });
    expect(current.user_agent).toBe(agent.slice(0, 512));
    // By subject: other files' clocks run ahead, and their newer events would crowd a plain list.
    const events = await app.services.audit.list({ subjectId: user.id, type: 'auth.login', limit: 50 });
    expect(events.find((e) => e.userAgent?.startsWith('agent/'))?.userAgent).toBe(agent.slice(0, 512));
  });

  it('lists sessions with the current one marked, and ends another one (another user’s is 404)', async () => {
    const user = await registerUser(app);
    const other = await login(app, user.email);
    const list = await app.inject({
      method: 'GET',
      url: '/v1/auth/sessions',
      headers: bearer(user.accessToken),
    });
    expect(list.statusCode).toBe(200);
    const data = list.json().data as Array<{ id: string; current: boolean }>;
    expect(data).toHaveLength(2);
    expect(data.filter((s) => s.current)).toHaveLength(1);
    const otherId = data.find((s) => !s.current)!.id;

    const stranger = await registerUser(app, 'stranger');
    const idor = await app.inject({
      method: 'DELETE',
      url: `/v1/auth/sessions/${otherId}`,
      headers: bearer(stranger.accessToken),
    });
    expect(idor.statusCode).toBe(404);

    const del = await app.inject({
      method: 'DELETE',
      url: `/v1/auth/sessions/${otherId}`,
      headers: bearer(user.accessToken),
    });
    expect(del.statusCode).toBe(204);
    expect(
      (await app.inject({ method: 'GET', url: '/v1/auth/me', headers: bearer(other.session.access_token) }))
        .statusCode,
    ).toBe(401);
    const badId = await app.inject({
      method: 'DELETE',
      url: '/v1/auth/sessions/not-a-uuid',
      headers: bearer(user.accessToken),
    });
    expect(badId.statusCode).toBe(400);
  });

  it('ends one of its sessions once when asked several times at once: one 204, the others 404, one event', async () => {
    const user = await registerUser(app, 'end-race');
    const other = await login(app, user.email);
    const sid = JSON.parse(
      Buffer.from(other.session.access_token.split('.')[1]!, 'base64url').toString(),
    ).sid;
    const end = () =>
      app.inject({ method: 'DELETE', url: `/v1/auth/sessions/${sid}`, headers: bearer(user.accessToken) });
    // The second request ends the session after the first has found it live, and before the first
    // ends it: deterministically the race of two sent at once.
    const sessions = app.services.sessions;
    const findSession = sessions.findSession;
    let second: { statusCode: number } | undefined;
    sessions.findSession = async (...args: Parameters<typeof findSession>) => {
      const found = await findSession.apply(sessions, args);
      if (!second) {
        second = { statusCode: 0 };
        second = await end();
      }
      return found;
    };
    let first: { statusCode: number };
    try {
      first = await end();
    } finally {
      sessions.findSession = findSession;
    }
    expect([first.statusCode, second?.statusCode]).toEqual([404, 204]);
    const statuses = (await Promise.all([1, 2, 3].map(() => end()))).map((r) => r.statusCode);
    expect(statuses).toEqual([404, 404, 404]);
    const events = await app.services.audit.list({
      type: 'auth.session_ended',
      subjectId: user.id,
      limit: 10,
    });
    expect(events).toHaveLength(1);
  });

  it('changes the password, ending the other sessions but not this one', async () => {
    const user = await registerUser(app);
    const other = await login(app, user.email);
    // Not with an API key, even one holding account:write and sent with the right password.
    const key = await createKey(app, user.accessToken, { scopes: ['account:read', 'account:write'] });
    for (const headers of [withKey(key.key), bearer(key.key)]) {
      const byKey = await app.inject({
        method: 'POST',
        url: '/v1/auth/password',
        headers,
        payload: { current_password: PASSWORD, new_password: 'a key’s chosen passphrase' },
      });
      expect(byKey.statusCode, byKey.body).toBe(403);
      expect(byKey.json().detail).toContain('signed-in session');
    }
    expect((await login(app, user.email)).session.access_token).toBeTruthy();
    // The same password again is no change: 400 naming it, and no session ends.
    const same = await app.inject({
      method: 'POST',
      url: '/v1/auth/password',
      headers: bearer(user.accessToken),
      payload: { current_password: PASSWORD, new_password: PASSWORD },
    });
    expect(same.statusCode).toBe(400);
    expect(same.json().errors).toEqual([
      { field: 'body.new_password', message: 'must differ from the current password' },
    ]);
    const otherMe = await app.inject({
      method: 'GET',
      url: '/v1/auth/me',
      headers: bearer(other.session.access_token),
    });
    expect(otherMe.statusCode).toBe(200);
    const wrong = await app.inject({
      method: 'POST',
      url: '/v1/auth/password',
      headers: bearer(user.accessToken),
      payload: { current_password: 'wrong wrong wrong', new_password: 'a brand new passphrase' },
    });
    expect(wrong.statusCode).toBe(400);
    expect(wrong.json().code).toBe('incorrect_password');
    const res = await app.inject({
      method: 'POST',
      url: '/v1/auth/password',
      headers: bearer(user.accessToken),
      payload: { current_password: PASSWORD, new_password: 'a brand new passphrase' },
    });
    expect(res.statusCode).toBe(204);
    expect(
      (await app.inject({ method: 'GET', url: '/v1/auth/me', headers: bearer(user.accessToken) })).statusCode,
    ).toBe(200);
    expect(
      (await app.inject({ method: 'GET', url: '/v1/auth/me', headers: bearer(other.session.access_token) }))
        .statusCode,
    ).toBe(401);
    const old = await app.inject({
      method: 'POST',
      url: '/v1/auth/login',
      payload: { email: user.email, password: PASSWORD },
    });
    expect(old.statusCode).toBe(401);
    await login(app, user.email, 'a brand new passphrase');
  });

  it('names new_password, the field at fault, when the new password is weak', async () => {
    const user = await registerUser(app);
    for (const [newPassword, message] of [
      ['', 'must be 8 to 128 characters'],
      ['short', 'must be 8 to 128 characters'],
      ['baseball', 'is a commonly used password'],
    ]) {
      const res = await app.inject({
        method: 'POST',
        url: '/v1/auth/password',
        headers: bearer(user.accessToken),
        payload: { current_password: PASSWORD, new_password: newPassword },
      });
      expect(res.statusCode, newPassword).toBe(422);
      expect(res.json()).toMatchObject({
        code: 'weak_password',
        errors: [{ field: 'body.new_password', message }],
      });
    }
    await login(app, user.email, PASSWORD);
  });

  it('of concurrent password changes that give the same current password, one wins; the others are refused and leave nothing', async () => {
    const user = await registerUser(app);
    const sessions = [user.accessToken];
    for (let i = 0; i < 2; i++) sessions.push((await login(app, user.email)).session.access_token);
    const newPasswords = ['first new passphrase', 'second new passphrase', 'third new passphrase'];
    const results = await Promise.all(
      newPasswords.map((newPassword, i) =>
        app.inject({
          method: 'POST',
          url: '/v1/auth/password',
          headers: bearer(sessions[i]!),
          payload: { current_password: PASSWORD, new_password: newPassword },
        }),
      ),
    );
    const statuses = results.map((r) => r.statusCode);
    expect(
      statuses.filter((s) => s === 204),
      JSON.stringify(statuses),
    ).toHaveLength(1);
    expect(statuses.filter((s) => s === 400)).toHaveLength(2);
    const winner = statuses.indexOf(204);
    // The winner's password is the password; the winner's session alone is left.
    await login(app, user.email, newPasswords[winner]);
    for (const [i, password] of newPasswords.entries()) {
      if (i === winner) continue;
      const res = await app.inject({
        method: 'POST',
        url: '/v1/auth/login',
        payload: { email: user.email, password },
      });
      expect(res.statusCode).toBe(401);
    }
    for (const [i, token] of sessions.entries()) {
      const me = await app.inject({ method: 'GET', url: '/v1/auth/me', headers: bearer(token) });
      expect(me.statusCode).toBe(i === winner ? 200 : 401);
    }
    const changes = await app.services.audit.list({
      subjectId: user.id,
      type: 'auth.password_changed',
      limit: 100,
    });
    expect(changes).toHaveLength(1);
  });

  /**
   * A sign-in with the current password, whose password is changed (by the user's session) after the
   * provider has checked it and before anything else: the race of a sign-in and a change, made certain.
   */
  async function signInWhilePasswordChanges(user: TestUser) {
    const provider = app.services.provider;
    const signIn = provider.signIn;
    let changed: { statusCode: number } | undefined;
    provider.signIn = async (...args) => {
      const result = await signIn.apply(provider, args);
      changed ??= await app.inject({
        method: 'POST',
        url: '/v1/auth/password',
        headers: bearer(user.accessToken),
        payload: { current_password: PASSWORD, new_password: 'the passphrase after' },
      });
      return result;
    };
    try {
      const res = await app.inject({
        method: 'POST',
        url: '/v1/auth/login',
        payload: { email: user.email, password: PASSWORD },
      });
      expect(changed?.statusCode).toBe(204);
      return res;
    } finally {
      provider.signIn = signIn;
    }
  }

  it('a sign-in with the old password checked while a change committed opens no session (401, audited)', async () => {
    const user = await registerUser(app, 'inflight');
    const res = await signInWhilePasswordChanges(user);
    expect(res.statusCode, res.body).toBe(401);
    expect(res.json().code).toBe('invalid_credentials');
    const sessions = await app.inject({
      method: 'GET',
      url: '/v1/auth/sessions',
      headers: bearer(user.accessToken),
    });
    expect(sessions.json().data).toHaveLength(1);
    const failures = await app.services.audit.list({ subjectId: user.id, outcome: 'failure', limit: 10 });
    expect(failures.map((e) => [e.type, e.data.reason])).toEqual([['auth.login', 'password_changed']]);
    // The new password signs in.
    await login(app, user.email, 'the passphrase after');
  });

  it('nor a second factor’s challenge, for a user who has one', async () => {
    const user = await registerUser(app, 'inflight-mfa');
    await turnOnMfa(app, user.accessToken);
    const res = await signInWhilePasswordChanges(user);
    expect(res.statusCode, res.body).toBe(401);
    expect(res.json()).not.toHaveProperty('mfa_token');
    const challenges = await app.services.audit.list({
      subjectId: user.id,
      type: 'auth.mfa_challenge',
      limit: 5,
    });
    expect(challenges).toHaveLength(0);
  });

  it('a disabled user loses every session and their tokens stop at once; login answers like a wrong password', async () => {
    const user = await registerUser(app);
    await app.services.db.transaction(async (tx) => {
      await app.services.repos.users.update(user.id, { status: 'disabled' }, tx);
      const event = await app.services.auth.subjectRevocation(tx, user.id);
      app.services.events.applyLocally([event]);
    });
    expect(
      (await app.inject({ method: 'GET', url: '/v1/auth/me', headers: bearer(user.accessToken) })).statusCode,
    ).toBe(401);
    const refresh = await app.inject({
      method: 'POST',
      url: '/v1/auth/refresh',
      payload: { refresh_token: user.refreshToken },
    });
    expect(refresh.statusCode).toBe(401);
    const res = await app.inject({
      method: 'POST',
      url: '/v1/auth/login',
      payload: { email: user.email, password: PASSWORD },
    });
    expect(res.statusCode).toBe(401);
    expect(res.json().code).toBe('invalid_credentials');
  });

  it('requires credentials on /me (401 with WWW-Authenticate) and refuses garbage tokens', async () => {
    const none = await app.inject({ method: 'GET', url: '/v1/auth/me' });
    expect(none.statusCode).toBe(401);
    expect(none.headers['www-authenticate']).toMatch(/^Bearer/);
    const garbage = await app.inject({ method: 'GET', url: '/v1/auth/me', headers: bearer('not.a.jwt') });
    expect(garbage.statusCode).toBe(401);
    expect(garbage.headers['www-authenticate']).toContain('error="invalid_token"');
    const basic = await app.inject({
      method: 'GET',
      url: '/v1/auth/me',
      headers: { authorization: 'Basic Zm9vOmJhcg==' },
    });
    expect(basic.statusCode).toBe(401);
  });

  it('writes audit events for registration, login success and failure, logout and password change', async () => {
    const user = await registerUser(app);
    await app.inject({
      method: 'POST',
      url: '/v1/auth/login',
      payload: { email: user.email, password: 'wrong password here' },
    });
    await login(app, user.email);
    await app.inject({ method: 'POST', url: '/v1/auth/logout', headers: bearer(user.accessToken) });
    const events = await app.services.audit.list({ subjectId: user.id, limit: 200 });
    const mine = events.map((e) => `${e.type}:${e.outcome}`);
    expect(mine).toEqual(
      expect.arrayContaining([
        'user.registered:success',
        'auth.login:failure',
        'auth.login:success',
        'auth.logout:success',
      ]),
    );
  });
});

describe('tokens: JWKS, discovery, forgeries and key rotation', () => {
  let app: FastifyInstance;
  beforeAll(async () => {
    app = await buildTestApp();
  });

  it('publishes discovery metadata with the issuer equal to PUBLIC_URL', async () => {
    for (const path of ['/.well-known/openid-configuration', '/.well-known/oauth-authorization-server']) {
      const res = await app.inject({ method: 'GET', url: path });
      expect(res.statusCode).toBe(200);
      const meta = res.json();
      expect(meta.issuer).toBe('http://auth.test');
      expect(meta.jwks_uri).toBe('http://auth.test/.well-known/jwks.json');
      expect(meta.token_endpoint).toBe('http://auth.test/oauth/token');
      expect(meta.token_endpoint_auth_methods_supported).toEqual([
        'client_secret_basic',
        'client_secret_post',
        'none',
      ]);
      expect(meta.scopes_supported).toContain('users:read');
    }
  });

  it('publishes only public key members with kid, alg and use, and a Cache-Control', async () => {
    const res = await app.inject({ method: 'GET', url: '/.well-known/jwks.json' });
    expect(res.statusCode).toBe(200);
    expect(res.headers['cache-control']).toMatch(/max-age=\d+/);
    const { keys } = res.json();
    expect(keys.length).toBeGreaterThanOrEqual(2); // active + the published next key
    for (const k of keys) {
      expect(k).toMatchObject({ use: 'sig', alg: 'ES256', kty: 'EC', crv: 'P-256' });
      expect(k.kid).toBeTruthy();
      for (const secret of ['d', 'p', 'q', 'dp', 'dq', 'qi', 'oth', 'k'])
        expect(k).not.toHaveProperty(secret);
    }
  });

  it('issues RFC 9068 tokens that verify with jose createRemoteJWKSet and the discovered issuer and audience', async () => {
    const user = await registerUser(app);
    const meta = (await app.inject({ method: 'GET', url: '/.well-known/openid-configuration' })).json();
    const jwks = createRemoteJWKSet(new URL(meta.jwks_uri), { [customFetch]: injectFetch(app) });
    const { payload, protectedHeader } = await jwtVerify(user.accessToken, jwks, {
      issuer: meta.issuer,
      audience: meta.default_audience,
      typ: 'at+jwt',
      algorithms: ['ES256'],
    });
    expect(protectedHeader).toMatchObject({ typ: 'at+jwt', alg: 'ES256' });
    expect(protectedHeader.kid).toBeTruthy();
    expect(payload).toMatchObject({ sub: user.id, client_id: 'paservices-frontend', roles: ['user'] });
    for (const claim of ['iss', 'sub', 'aud', 'exp', 'iat', 'jti', 'client_id', 'scope'])
      expect(payload).toHaveProperty(claim);
    expect(String(payload.scope).split(' ')).toContain('account:read');
  });

  it('refuses forged tokens: alg none, HS256 with the public key, tampered payload, foreign key with our kid, jku', async () => {
    const { SignJWT, generateKeyPair, exportJWK, UnsecuredJWT } = await import('jose');
    const user = await registerUser(app);
    const kid = decodeProtectedHeader(user.accessToken).kid!;
    const [h, p, s] = user.accessToken.split('.');
    const claims = JSON.parse(Buffer.from(p!, 'base64url').toString());
    const forgeries: Record<string, string> = {};

    forgeries.none = new UnsecuredJWT(claims).encode();
    const noneWithTyp = `${Buffer.from(JSON.stringify({ alg: 'none', typ: 'at+jwt', kid })).toString('base64url')}.${p}.`;
    forgeries.noneWithTyp = noneWithTyp;

    const jwks = (await app.inject({ method: 'GET', url: '/.well-known/jwks.json' })).json();
    const publicJwk = JSON.stringify(jwks.keys.find((k: { kid: string }) => k.kid === kid));
    forgeries.hs256 = await new SignJWT(claims)
      .setProtectedHeader({ alg: 'HS256', typ: 'at+jwt', kid })
      .sign(new TextEncoder().encode(publicJwk));

    const tampered = Buffer.from(JSON.stringify({ ...claims, scope: '*', roles: ['admin'] })).toString(
      'base64url',
    );
    forgeries.tampered = `${h}.${tampered}.${s}`;

    const foreign = await generateKeyPair('ES256');
    forgeries.foreignKey = await new SignJWT(claims)
      .setProtectedHeader({ alg: 'ES256', typ: 'at+jwt', kid })
      .sign(foreign.privateKey);

    const foreignJwk = await exportJWK(foreign.publicKey);
    forgeries.jku = await new SignJWT(claims)
      .setProtectedHeader({
        alg: 'ES256',
        typ: 'at+jwt',
        kid: 'attacker',
        jku: 'https://attacker.example/jwks.json',
      })
      .sign(foreign.privateKey);
    forgeries.embeddedJwk = await new SignJWT(claims)
      .setProtectedHeader({ alg: 'ES256', typ: 'at+jwt', jwk: foreignJwk })
      .sign(foreign.privateKey);

    forgeries.wrongTyp = await new SignJWT(claims)
      .setProtectedHeader({ alg: 'ES256', typ: 'JWT', kid })
      .sign(foreign.privateKey);

    for (const [name, token] of Object.entries(forgeries)) {
      const res = await app.inject({ method: 'GET', url: '/v1/auth/me', headers: bearer(token) });
      expect(res.statusCode, name).toBe(401);
    }
    // The genuine token still works.
    expect(
      (await app.inject({ method: 'GET', url: '/v1/auth/me', headers: bearer(user.accessToken) })).statusCode,
    ).toBe(200);
  });

  it('refuses, even under its own key, what it never issues: iat ahead, a lifetime over the maximum, non-string ids', async () => {
    const user = await registerUser(app, 'own-key-claims');
    const [, p] = user.accessToken.split('.');
    const claims = JSON.parse(Buffer.from(p!, 'base64url').toString()) as Record<string, unknown>;
    const key = app.services.keys.activeKey();
    const now = Math.floor(Date.now() / 1000);
    const me = (token: string) => app.inject({ method: 'GET', url: '/v1/auth/me', headers: bearer(token) });
    const sign = (changes: Record<string, unknown>) =>
      new SignJWT({ ...claims, ...changes })
        .setProtectedHeader({ alg: key.alg, typ: 'at+jwt', kid: key.kid })
        .sign(key.privateKey);
    // As issued, it passes: the check is on the claims.
    expect((await me(await sign({}))).statusCode).toBe(200);
    for (const [name, changes] of Object.entries({
      iatAhead: { iat: now + 3600, nbf: now },
      tenYears: { iat: now, exp: now + 10 * 365 * 86_400 },
      numericJti: { jti: 12345 },
      numericSub: { sub: 42 },
    })) {
      const res = await me(await sign(changes));
      expect(res.statusCode, name).toBe(401);
    }
  });

  it('refuses a tampered payload under the signature of a token it has already verified and cached', async () => {
    const user = await registerUser(app, 'cached-signature');
    const admin = await registerUser(app, 'cached-signature-admin');
    await app.services.repos.users.assignRole(admin.id, 'admin', null);
    const adminToken = (await login(app, admin.email)).session.access_token;
    const introspect = (token: string) =>
      app.inject({
        method: 'POST',
        url: '/oauth/introspect',
        headers: { ...bearer(adminToken), 'content-type': 'application/x-www-form-urlencoded' },
        payload: `token=${encodeURIComponent(token)}`,
      });
    // Verified once through each path, so both caches hold it.
    expect(
      (await app.inject({ method: 'GET', url: '/v1/auth/me', headers: bearer(user.accessToken) })).statusCode,
    ).toBe(200);
    expect((await introspect(user.accessToken)).json().active).toBe(true);
    const [h, p, s] = user.accessToken.split('.');
    const claims = JSON.parse(Buffer.from(p!, 'base64url').toString());
    const payload = Buffer.from(JSON.stringify({ ...claims, scope: '*', roles: ['admin'] })).toString(
      'base64url',
    );
    const tampered = `${h}.${payload}.${s}`;
    const me = await app.inject({ method: 'GET', url: '/v1/auth/me', headers: bearer(tampered) });
    expect(me.statusCode).toBe(401);
    expect((await introspect(tampered)).json()).toEqual({ active: false });
    // The genuine token is still the one cached.
    expect(
      (await app.inject({ method: 'GET', url: '/v1/auth/me', headers: bearer(user.accessToken) })).statusCode,
    ).toBe(200);
  });

  it('after a rotation, older tokens still verify and new ones carry the new kid, which was published before', async () => {
    const admin = await registerUser(app, 'keys-admin');
    await app.services.repos.users.assignRole(admin.id, 'admin', null);
    const adminSession = await login(app, admin.email);
    const before = (await app.inject({ method: 'GET', url: '/.well-known/jwks.json' }))
      .json()
      .keys.map((k: { kid: string }) => k.kid);
    const oldKid = decodeProtectedHeader(adminSession.session.access_token).kid;

    // Forced: on this shared database the next key may have been published only seconds ago.
    const rotate = await app.inject({
      method: 'POST',
      url: '/v1/signing-keys/rotate',
      headers: bearer(adminSession.session.access_token),
      payload: { force: true },
    });
    expect(rotate.statusCode).toBe(200);
    const { active_kid: newKid } = rotate.json();
    expect(newKid).not.toBe(oldKid);
    expect(before).toContain(newKid); // published as `next` before it ever signed

    const fresh = await login(app, admin.email);
    expect(decodeProtectedHeader(fresh.session.access_token).kid).toBe(newKid);
    expect(
      (
        await app.inject({
          method: 'GET',
          url: '/v1/auth/me',
          headers: bearer(adminSession.session.access_token),
        })
      ).statusCode,
    ).toBe(200);

    // Every page: on the shared database other files' rotations add keys too.
    const list = await allPages<{ kid: string; state: string }>(
      app,
      '/v1/signing-keys',
      bearer(fresh.session.access_token),
    );
    const states = Object.fromEntries(list.map((k) => [k.kid, k.state]));
    expect(states[oldKid!]).toBe('retiring');
    expect(states[newKid]).toBe('active');
    expect(Object.values(states)).toContain('next');
    const after = (await app.inject({ method: 'GET', url: '/.well-known/jwks.json' }))
      .json()
      .keys.map((k: { kid: string }) => k.kid);
    expect(after).toContain(oldKid);
  });

  it('a rotation that revokes the previous key (a leaked key) ends its tokens at once, cached or not', async () => {
    // Its own database: revoking the shared one's key would end other files' tokens.
    const pino = (await import('pino')).default;
    const { openMemoryDatabase } = await import('../../src/db/client.js');
    const own = await buildTestApp({
      deps: { database: await openMemoryDatabase(pino({ level: 'silent' })) },
    });
    const admin = await registerUser(own, 'keys-revoke');
    await own.services.repos.users.assignRole(admin.id, 'admin', null);
    const me = (token: string) => own.inject({ method: 'GET', url: '/v1/auth/me', headers: bearer(token) });
    // The key that leaked was rotated out already (forced): it is retiring, and still verifies.
    const leakedToken = (await login(own, admin.email)).session.access_token;
    const leakedKid = decodeProtectedHeader(leakedToken).kid!;
    await own.services.keys.rotate(
      { actorType: 'system', actorId: null, ip: null, userAgent: null, requestId: null },
      { force: true },
    );
    expect((await own.services.keys.find(leakedKid))?.state).toBe('retiring');
    const session = await login(own, admin.email);
    const oldToken = session.session.access_token;
    const oldKid = decodeProtectedHeader(oldToken).kid!;
    const publishedBefore = JSON.parse(own.services.keys.jwks()).keys.map((k: { kid: string }) => k.kid);
    // Verified once, so the tokens are in the verified-token cache.
    expect((await me(oldToken)).statusCode).toBe(200);
    expect((await me(leakedToken)).statusCode).toBe(200);

    const rotate = await own.inject({
      method: 'POST',
      url: '/v1/signing-keys/rotate',
      headers: bearer(oldToken),
      payload: { revoke_previous: true },
    });
    expect(rotate.statusCode, rotate.body).toBe(200);
    expect(rotate.json().previous_kid).toBe(oldKid);

    expect((await me(oldToken)).statusCode).toBe(401);
    // Every key published before goes (they are stored alike), the retiring one included; a key made
    // now signs, and the next key published before does not.
    expect((await me(leakedToken)).statusCode).toBe(401);
    expect(publishedBefore).not.toContain(rotate.json().active_kid);
    const publishedAfter = JSON.parse(own.services.keys.jwks()).keys.map((k: { kid: string }) => k.kid);
    expect(publishedAfter.filter((kid: string) => publishedBefore.includes(kid))).toEqual([]);
    const introspected = await own.inject({
      method: 'POST',
      url: '/oauth/introspect',
      headers: { authorization: bearer(oldToken).authorization },
      payload: { token: oldToken },
    });
    expect(introspected.statusCode === 401 || introspected.json().active === false).toBe(true);
    const jwks = (await own.inject({ method: 'GET', url: '/.well-known/jwks.json' })).json();
    expect(jwks.keys.map((k: { kid: string }) => k.kid)).not.toContain(oldKid);
    expect((await own.services.keys.find(oldKid))?.state).toBe('retired');

    // The session goes on: a refresh gets a token signed with the new key.
    const refreshed = await own.inject({
      method: 'POST',
      url: '/v1/auth/refresh',
      payload: { refresh_token: session.session.refresh_token },
    });
    expect(refreshed.statusCode, refreshed.body).toBe(200);
    const newToken = refreshed.json().session.access_token;
    expect(decodeProtectedHeader(newToken).kid).toBe(rotate.json().active_kid);
    expect((await me(newToken)).statusCode).toBe(200);
    const events = await own.services.audit.list({ type: 'signing_key.rotated', limit: 5 });
    expect(events[0]?.data).toMatchObject({ forced: true, revoked_previous: true, previous: [oldKid] });

    // A token whose signature is being checked while a revocation lands (the reload that removes its
    // key clears the cache before the check ends) is checked again, not cached as good.
    const { tokens, keys } = own.services;
    const { token } = await tokens.issue({
      sub: admin.id,
      audience: own.services.config.issuer,
      ttlSeconds: 600,
      clientId: 'race',
      permissions: ['account:read'],
    });
    const lookup = keys.verificationKey.bind(keys);
    let removals = 0;
    let lookups = 0;
    const during = vi.spyOn(keys, 'verificationKey').mockImplementation((kid) => {
      // The first lookup finds the key, and the revocation lands before that check ends: the key is
      // gone for every later lookup.
      lookups++;
      if (lookups > 1) return undefined;
      removals++;
      return lookup(kid);
    });
    const counted = vi.spyOn(keys, 'removals').mockImplementation(() => removals);
    try {
      await expect(tokens.verify(token)).rejects.toMatchObject({ code: 'invalid_token' });
      await expect(tokens.verify(token)).rejects.toMatchObject({ code: 'invalid_token' });
    } finally {
      during.mockRestore();
      counted.mockRestore();
    }
  });

  it('retires a retiring key once its last token has expired plus 10 minutes, and unpublishes it', async () => {
    // Its own database: retiring keys on the shared one would unpublish other files' keys.
    const pino = (await import('pino')).default;
    const { openMemoryDatabase } = await import('../../src/db/client.js');
    const app = await buildTestApp({
      deps: { database: await openMemoryDatabase(pino({ level: 'silent' })) },
    });
    const { keys } = app.services;
    await keys.ensureKeys();
    const before = keys.activeKey().kid;
    const context = {
      actorType: 'system' as const,
      actorId: null,
      ip: null,
      userAgent: null,
      requestId: null,
    };
    await keys.rotate(context, { force: true });
    const retiring = (await keys.find(before))!;
    expect(retiring.state).toBe('retiring');
    const maxTtl = app.services.config.tokens.maxAccessTtl;
    expect(retiring.publishUntil!.getTime() - retiring.retiringAt!.getTime()).toBe((maxTtl + 600) * 1000);

    await atTime(app, new Date(retiring.publishUntil!.getTime() + 1000), async () => {
      await keys.ensureKeys();
    });
    expect((await keys.find(before))?.state).toBe('retired');
    const jwks = (await app.inject({ method: 'GET', url: '/.well-known/jwks.json' })).json();
    expect(jwks.keys.map((k: { kid: string }) => k.kid)).not.toContain(before);
  });

  it('refuses a rotation until the next key has been published for 10 minutes (409, Retry-After), unless forced', async () => {
    // Its own database, so the next key's age is known: created by ensureKeys just now.
    const pino = (await import('pino')).default;
    const { openMemoryDatabase } = await import('../../src/db/client.js');
    const { lines, logger } = captureLogs('info');
    const own = await buildTestApp({
      deps: { database: await openMemoryDatabase(pino({ level: 'silent' })), logger },
    });
    const { keys } = own.services;
    await keys.ensureKeys();
    const admin = await registerUser(own, 'spacing-admin');
    await own.services.repos.users.assignRole(admin.id, 'admin', null);
    const { session } = await login(own, admin.email);
    const rotate = (payload?: object) =>
      own.inject({
        method: 'POST',
        url: '/v1/signing-keys/rotate',
        headers: bearer(session.access_token),
        ...(payload ? { payload } : {}),
      });
    const rotations = async () =>
      (
        await own.inject({
          method: 'GET',
          url: '/v1/audit-events?type=signing_key.rotated',
          headers: bearer(session.access_token),
        })
      ).json().data as { data: { forced: boolean } }[];
    const activeBefore = keys.activeKey().kid;
    const next = keys.loadedKeys().find((k) => k.state === 'next')!;

    const refused = await rotate();
    expect(refused.statusCode, refused.body).toBe(409);
    expect(refused.headers['content-type']).toContain('application/problem+json');
    expect(refused.json().code).toBe('rotation_too_soon');
    const wait = Number(refused.headers['retry-after']);
    expect(wait).toBeGreaterThan(590);
    expect(wait).toBeLessThanOrEqual(600);
    expect(keys.activeKey().kid).toBe(activeBefore);
    expect((await keys.find(next.kid))!.state).toBe('next');
    expect(await rotations()).toEqual([]);
    expect((await rotate({ force: 'yes' })).statusCode).toBe(400);
    expect((await rotate({ forced: true })).statusCode).toBe(400);

    // Ten minutes after the next key was published, it may sign.
    await atTime(own, new Date(next.createdAt.getTime() + 600_000), async () => {
      const ok = await rotate();
      expect(ok.statusCode, ok.body).toBe(200);
      expect(ok.json()).toEqual({ active_kid: next.kid, previous_kid: activeBefore });
    });
    expect(keys.activeKey().kid).toBe(next.kid);

    // The new next key is seconds old: refused again, and forcing it through is audited as forced.
    expect((await rotate()).statusCode).toBe(409);
    const forced = await rotate({ force: true });
    expect(forced.statusCode, forced.body).toBe(200);
    expect(keys.activeKey().kid).toBe(forced.json().active_kid);
    expect((await rotations()).map((e) => e.data.forced).sort()).toEqual([false, true]);
    // Each rotation's log line carries the id of the request that made it, a forced one (a warning) too.
    const logged = lines.map((l) => JSON.parse(l) as { msg: string; level: number; reqId?: string });
    expect(logged.find((l) => l.msg === 'signing key rotated (forced)')).toMatchObject({
      level: 40,
      reqId: forced.headers['x-request-id'],
    });
    expect(logged.find((l) => l.msg === 'signing key rotated')?.reqId).toMatch(/^[0-9a-f-]{36}$/);
  });

  it('keeps a user without keys:write from rotating (403) and anonymous callers out (401)', async () => {
    const user = await registerUser(app);
    expect(
      (
        await app.inject({
          method: 'POST',
          url: '/v1/signing-keys/rotate',
          headers: bearer(user.accessToken),
        })
      ).statusCode,
    ).toBe(403);
    expect((await app.inject({ method: 'POST', url: '/v1/signing-keys/rotate' })).statusCode).toBe(401);
  });
});

/** Logs the user in with these headers and returns the session that login opened, as listed. */
async function sessionOfLogin(app: FastifyInstance, user: TestUser, headers: Record<string, string>) {
  const res = await app.inject({
    method: 'POST',
    url: '/v1/auth/login',
    headers,
    payload: { email: user.email, password: user.password },
  });
  expect(res.statusCode).toBe(200);
  const sessions = await app.inject({
    method: 'GET',
    url: '/v1/auth/sessions',
    headers: bearer(res.json().session.access_token),
  });
  const listed = sessions.json().data as Array<{
    current: boolean;
    ip: string | null;
    user_agent: string | null;
  }>;
  return listed.find((s) => s.current)!;
}

describe('client address behind a proxy (TRUST_PROXY)', () => {
  const loginFrom = async (app: FastifyInstance, forwardedFor: string) =>
    (await sessionOfLogin(app, await registerUser(app, 'proxied'), { 'x-forwarded-for': forwardedFor })).ip;

  it('takes the address from X-Forwarded-For only when told to, and keeps at most 64 characters of it', async () => {
    const direct = await buildTestApp();
    expect(await loginFrom(direct, '203.0.113.7')).toBe('127.0.0.1');
    const proxied = await buildTestApp({ env: { TRUST_PROXY: 'true' } });
    expect(await loginFrom(proxied, '203.0.113.7')).toBe('203.0.113.7');
    expect(await loginFrom(proxied, 'x'.repeat(5000))).toBe('x'.repeat(64));
  });
});
