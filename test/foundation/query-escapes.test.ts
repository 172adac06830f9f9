import type { FastifyInstance } from 'fastify';
import { beforeAll, describe, expect, it } from 'vitest';
import { buildTestApp } from '../support/app.js';
import { createAdmin, registerUser, type TestUser } from '../support/factories.js';
import { bearer } from '../support/http.js';

/*
 * fast-querystring, Fastify's query parser, keeps a pair whose %-escape is malformed (`%zz`, a lone
 * `%`) or escapes bytes that are not UTF-8 (`%FF`) as the text it is: `?query=%zz` searched for the
 * three characters. A form body refuses such input (lib/form.ts); a query string does too, on every
 * route, before anything reads it.
 */
const MALFORMED = ['%zz', '%', '%FF', '%E0%A4%A', 'a%2'];

describe('a malformed %-escape in a query string', () => {
  let app: FastifyInstance;
  let admin: TestUser;
  let user: TestUser;
  beforeAll(async () => {
    app = await buildTestApp();
    admin = await createAdmin(app);
    user = await registerUser(app, 'escapes');
  });

  const expectRefused = (res: Awaited<ReturnType<FastifyInstance['inject']>>, what: string) => {
    expect(res.statusCode, `${what}: ${res.body}`).toBe(400);
    expect(res.headers['content-type'], what).toMatch(/^application\/problem\+json/);
    expect(res.json(), what).toMatchObject({
      status: 400,
      code: 'bad_request',
      detail: 'The query string has a malformed %-escape, or one of bytes that are not UTF-8',
    });
  };

  it('is a 400 naming it on the user list (a search) and the role list (a limit, a cursor)', async () => {
    for (const bad of MALFORMED) {
      for (const url of [
        `/v1/users?query=${bad}`,
        `/v1/users?${bad}=x`,
        `/v1/roles?cursor=${bad}`,
        `/v1/roles?limit=${bad}`,
        `/v1/roles?limit=1&cursor=${bad}`,
      ]) {
        expectRefused(await app.inject({ method: 'GET', url, headers: bearer(admin.accessToken) }), url);
      }
    }
  });

  it('changes nothing on a write, and is refused before the credential is asked for', async () => {
    const name = `escapes-${Date.now()}`;
    const res = await app.inject({
      method: 'POST',
      url: '/v1/roles?x=%zz',
      headers: bearer(admin.accessToken),
      payload: { name, permissions: ['users:read'] },
    });
    expectRefused(res, 'POST /v1/roles');
    const role = await app.inject({
      method: 'GET',
      url: `/v1/roles/${name}`,
      headers: bearer(admin.accessToken),
    });
    expect(role.statusCode, role.body).toBe(404);
    // Under /oauth, in RFC 6749's format; before the client is authenticated (no 401).
    const token = await app.inject({
      method: 'POST',
      url: '/oauth/token?x=%FF',
      headers: { 'content-type': 'application/x-www-form-urlencoded' },
      payload: 'grant_type=client_credentials',
    });
    expect(token.statusCode, token.body).toBe(400);
    expect(token.json()).toMatchObject({ error: 'invalid_request' });
    // A route that takes no query at all.
    expectRefused(await app.inject({ method: 'GET', url: '/.well-known/jwks.json?_=%zz' }), 'JWKS');
  });

  it('leaves well-formed escapes as they were: decoded', async () => {
    const escaped = encodeURIComponent(user.email); // `@` as %40, a `+` as %2B
    const found = await app.inject({
      method: 'GET',
      url: `/v1/users?query=${escaped}&limit=%32`,
      headers: bearer(admin.accessToken),
    });
    expect(found.statusCode, found.body).toBe(200);
    expect(found.json().data.map((u: { email: string }) => u.email)).toEqual([user.email]);
    const roles = await app.inject({
      method: 'GET',
      url: '/v1/roles?limit=%31',
      headers: bearer(admin.accessToken),
    });
    expect(roles.statusCode, roles.body).toBe(200);
    expect(roles.json().data).toHaveLength(1);
    // `%25` is a `%`, searched for as the character it is.
    const percent = await app.inject({
      method: 'GET',
      url: '/v1/users?query=%25zz',
      headers: bearer(admin.accessToken),
    });
    expect(percent.statusCode, percent.body).toBe(200);
    expect(percent.json().data).toEqual([]);
  });
});
