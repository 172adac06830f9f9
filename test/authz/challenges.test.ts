import type { FastifyInstance } from 'fastify';
import { beforeAll, describe, expect, it } from 'vitest';
import { createKey, removeRole, withKey } from '../api-keys/helpers.js';
import { form } from '../clients/helpers.js';
import { buildTestApp } from '../support/app.js';
import { createAdmin, registerUser, type TestUser } from '../support/factories.js';
import { bearer } from '../support/http.js';

/*
 * The WWW-Authenticate challenges of RFC 6750 §3 on the service's own routes: no error code when the
 * request carries no authentication information (RFC 6750 §3.1), `invalid_request` for a malformed
 * Bearer header, `invalid_token` for a token that does not verify, `insufficient_scope` with the
 * permission needed for a bearer credential that lacks it.
 */
describe('WWW-Authenticate challenges (RFC 6750 §3)', () => {
  let app: FastifyInstance;
  let admin: TestUser;
  beforeAll(async () => {
    app = await buildTestApp();
    admin = await createAdmin(app);
  });

  const users = (headers: Record<string, string> = {}) =>
    app.inject({ method: 'GET', url: '/v1/users?limit=1', headers });

  it('no credential, or another scheme than Bearer: 401 with a challenge that has no error code', async () => {
    const none = await users();
    expect(none.statusCode).toBe(401);
    expect(none.headers['www-authenticate']).toBe('Bearer realm="paservices"');
    expect(none.json().code).toBe('authentication_required');
    for (const authorization of [
      `Basic ${Buffer.from(`${admin.email}:${admin.password}`).toString('base64')}`,
      'Negotiate abc',
      'Digest username="x"',
      'Bearerx y',
      '',
    ]) {
      const res = await users({ authorization });
      expect(res.statusCode, authorization).toBe(401);
      expect(res.headers['www-authenticate'], authorization).toBe('Bearer realm="paservices"');
      expect(res.headers['content-type']).toContain('application/problem+json');
      expect(res.json().code, authorization).toBe('authentication_required');
    }
  });

  it('the Bearer scheme without one token: 400 invalid_request', async () => {
    for (const authorization of ['Bearer', 'Bearer ', 'bearer \t', `Bearer ${admin.accessToken} x`]) {
      const res = await users({ authorization });
      expect(res.statusCode, authorization).toBe(400);
      expect(res.headers['www-authenticate'], authorization).toBe(
        'Bearer realm="paservices", error="invalid_request"',
      );
      expect(res.json().code, authorization).toBe('bad_request');
    }
  });

  it('two Authorization headers: 400 invalid_request, whichever comes first (Node keeps it and drops the rest)', async () => {
    const user = await registerUser(app, 'second-authorization');
    // RFC 9110 §5.3: Authorization is one field line. Node keeps the first of several and drops the
    // others, so the request would act for whichever came first: an administrator's token in front of
    // a user's, or the reverse, was answered as that one alone.
    const pairs = {
      'admin, user': [`Bearer ${admin.accessToken}`, `Bearer ${user.accessToken}`],
      'user, admin': [`Bearer ${user.accessToken}`, `Bearer ${admin.accessToken}`],
      'admin twice': [`Bearer ${admin.accessToken}`, `Bearer ${admin.accessToken}`],
      'admin, Basic': [`Bearer ${admin.accessToken}`, 'Basic Og=='],
    };
    for (const [label, authorization] of Object.entries(pairs)) {
      const res = await app.inject({
        method: 'GET',
        url: '/v1/users?limit=1',
        headers: { authorization: authorization as unknown as string },
      });
      expect(res.statusCode, label).toBe(400);
      expect(res.headers['www-authenticate']).toBe('Bearer realm="paservices", error="invalid_request"');
      expect(res.json()).toMatchObject({
        code: 'bad_request',
        detail: 'Send one Authorization header: with several, which one counts is left open (RFC 9110 §5.3)',
      });
    }
    // Nothing changes under it either.
    const logout = await app.inject({
      method: 'POST',
      url: '/v1/auth/logout',
      headers: {
        authorization: [`Bearer ${user.accessToken}`, `Bearer ${admin.accessToken}`] as unknown as string,
      },
      payload: { scope: 'all' },
    });
    expect(logout.statusCode).toBe(400);
    expect(
      (await app.inject({ method: 'GET', url: '/v1/auth/me', headers: bearer(user.accessToken) })).statusCode,
    ).toBe(200);
  });

  it('a token that does not verify: 401 invalid_token, as before', async () => {
    for (const token of ['garbage', 'x.y.z', 'pak_nope']) {
      const res = await users(bearer(token));
      expect(res.statusCode, token).toBe(401);
      expect(res.headers['www-authenticate'], token).toBe('Bearer realm="paservices", error="invalid_token"');
      expect(res.json().code).toBe('invalid_token');
    }
    // And the right token passes.
    expect((await users(bearer(admin.accessToken))).statusCode).toBe(200);
  });

  it('on /oauth/introspect and /oauth/revoke, a scheme that is neither Basic nor Bearer is invalid_client, challenged with both', async () => {
    for (const url of ['/oauth/introspect', '/oauth/revoke']) {
      const res = await app.inject({
        method: 'POST',
        url,
        headers: { authorization: 'Negotiate abc', 'content-type': 'application/x-www-form-urlencoded' },
        payload: 'token=abc',
      });
      expect(res.statusCode, url).toBe(401);
      expect(res.json().error, url).toBe('invalid_client');
      expect(res.headers['www-authenticate'], url).toBe(
        'Basic realm="paservices", Bearer realm="paservices"',
      );
    }
  });

  it('a bearer credential lacking the permission: 403 challenged with insufficient_scope and the scope it needs', async () => {
    const user = await registerUser(app, 'challenged');
    const insufficient = 'Bearer realm="paservices", error="insufficient_scope", scope="users:read"';
    const token = await users(bearer(user.accessToken));
    expect(token.statusCode).toBe(403);
    expect(token.headers['www-authenticate']).toBe(insufficient);
    expect(token.json().code).toBe('forbidden');
    // An API key sent as a bearer credential is one too.
    const key = await createKey(app, user.accessToken, { scopes: ['account:read'] });
    const keyAsBearer = await users(bearer(key.key));
    expect(keyAsBearer.statusCode).toBe(403);
    expect(keyAsBearer.headers['www-authenticate']).toBe(insufficient);
    // X-API-Key is no HTTP authentication scheme: no challenge; the detail names the permission.
    const keyHeader = await users(withKey(key.key));
    expect(keyHeader.statusCode).toBe(403);
    expect(keyHeader.headers['www-authenticate']).toBeUndefined();
    expect(keyHeader.json().detail).toContain('users:read');
    // A route that takes either of two permissions names both.
    const powerless = await registerUser(app, 'powerless');
    await removeRole(app, powerless.id, 'user');
    const relogin = await app.inject({
      method: 'POST',
      url: '/v1/auth/login',
      payload: { email: powerless.email, password: powerless.password },
    });
    const profile = await app.inject({
      method: 'GET',
      url: `/v1/profiles/${user.id}`,
      headers: bearer(relogin.json().session.access_token),
    });
    expect(profile.statusCode).toBe(403);
    expect(profile.headers['www-authenticate']).toBe(
      'Bearer realm="paservices", error="insufficient_scope", scope="account:read profiles:read"',
    );
  });

  it('a change refused because the permission was taken away since the token was issued: the same challenge', async () => {
    const demoted = await createAdmin(app);
    await removeRole(app, demoted.id, 'admin');
    const res = await app.inject({
      method: 'PATCH',
      url: `/v1/users/${admin.id}`,
      headers: bearer(demoted.accessToken),
      payload: { status: 'disabled' },
    });
    expect(res.statusCode, res.body).toBe(403);
    expect(res.headers['www-authenticate']).toBe(
      'Bearer realm="paservices", error="insufficient_scope", scope="users:write"',
    );
  });

  it('/oauth/introspect: a bearer credential without tokens:introspect is a 401 insufficient_scope (RFC 7662 §2.3), audited', async () => {
    const nosy = await registerUser(app, 'nosy');
    const key = await createKey(app, nosy.accessToken, { scopes: ['account:read'] });
    for (const headers of [bearer(nosy.accessToken), bearer(key.key), withKey(key.key)]) {
      const res = await form(app, '/oauth/introspect', { token: nosy.accessToken }, headers);
      expect(res.statusCode, res.body).toBe(401);
      expect(res.json().error).toBe('insufficient_scope');
      expect(res.headers['www-authenticate']).toBe(
        'Bearer realm="paservices", error="insufficient_scope", scope="tokens:introspect"',
      );
      expect(res.headers['content-type']).toMatch(/^application\/json/);
    }
    const denied = await app.services.audit.list({
      type: 'authorization.denied',
      actorId: nosy.id,
      limit: 10,
    });
    expect(denied).toHaveLength(3);
    expect(denied[0]).toMatchObject({ outcome: 'failure', data: { route: '/oauth/introspect' } });
    // Holding it, the same caller introspects.
    const auditor = await createAdmin(app);
    const allowed = await form(
      app,
      '/oauth/introspect',
      { token: nosy.accessToken },
      bearer(auditor.accessToken),
    );
    expect(allowed.statusCode).toBe(200);
    expect(allowed.json()).toMatchObject({ active: true, sub: nosy.id });
  });
});
