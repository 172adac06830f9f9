import type { FastifyInstance } from 'fastify';
import { beforeAll, describe, expect, it } from 'vitest';
import { buildTestApp } from '../support/app.js';
import { createAdmin, type TestUser } from '../support/factories.js';
import { bearer } from '../support/http.js';

/*
 * The WWW-Authenticate challenges of RFC 6750 §3 on the service's own routes: no error code when the
 * request carries no authentication information (RFC 6750 §3.1), `invalid_request` for a malformed
 * Bearer header, `invalid_token` for a token that does not verify.
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
});
