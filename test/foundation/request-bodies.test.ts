import { gzipSync } from 'node:zlib';
import type { FastifyInstance } from 'fastify';
import { beforeAll, describe, expect, it } from 'vitest';
import { MAX_JSON_DEPTH } from '../../src/lib/json-body.js';
import { clientToken, createClient, form } from '../clients/helpers.js';
import { buildTestApp, uniqueEmail } from '../support/app.js';
import { createAdmin, PASSWORD, registerUser, type TestUser } from '../support/factories.js';
import { bearer } from '../support/http.js';

/** `levels` objects ({"a":{"a":…}}) or arrays ([[…]]) inside one another, as JSON text. */
const nested = (levels: number, kind: 'object' | 'array') =>
  kind === 'object'
    ? `${'{"a":'.repeat(levels)}1${'}'.repeat(levels)}`
    : `${'['.repeat(levels)}${']'.repeat(levels)}`;

describe('request bodies', () => {
  let app: FastifyInstance;
  let user: TestUser;
  // A body limit that lets 50 000 levels of objects in: the depth, not the size, must refuse them.
  const BODY_LIMIT = 1_048_576;

  beforeAll(async () => {
    app = await buildTestApp({ env: { BODY_LIMIT: String(BODY_LIMIT) } });
    user = await registerUser(app, 'bodies');
  });

  const profile = async () =>
    (await app.inject({ method: 'GET', url: '/v1/profiles/me', headers: bearer(user.accessToken) })).json();

  const patchProfile = (payload: string) =>
    app.inject({
      method: 'PATCH',
      url: '/v1/profiles/me',
      headers: { ...bearer(user.accessToken), 'content-type': 'application/json' },
      payload,
    });

  it.each([
    [10_000, 'object'],
    [50_000, 'object'],
    [10_000, 'array'],
    [50_000, 'array'],
  ] as const)(
    'refuses %i levels of nested %ss with a 400 (not a stack overflow) and changes nothing',
    async (levels, kind) => {
      const before = await profile();
      const payload = `{"display_name":"Deep","metadata":{"x":${nested(levels, kind)}}}`;
      expect(payload.length).toBeLessThan(BODY_LIMIT);
      const res = await patchProfile(payload);
      expect(res.statusCode, res.body.slice(0, 300)).toBe(400);
      expect(res.headers['content-type']).toMatch(/^application\/problem\+json/);
      expect(res.json()).toMatchObject({
        code: 'validation_failed',
        errors: [{ field: 'body', message: expect.stringContaining(`${MAX_JSON_DEPTH} levels`) }],
      });
      expect(await profile()).toEqual(before);
    },
  );

  it('refuses a body nested deeper than the limit on any endpoint, and takes one at the limit', async () => {
    for (const kind of ['object', 'array'] as const) {
      const res = await app.inject({
        method: 'POST',
        url: '/v1/auth/login',
        headers: { 'content-type': 'application/json' },
        payload: `{"email":${nested(20_000, kind)}}`,
      });
      expect(res.statusCode, res.body).toBe(400);
      expect(res.json().code).toBe('validation_failed');
    }
    // The body is level 1, metadata 2, so metadata at the limit nests MAX - 1 levels: refused by its own
    // schema (at most 4 levels), not by the parser.
    const atLimit = await patchProfile(`{"metadata":${nested(MAX_JSON_DEPTH - 1, 'object')}}`);
    expect(atLimit.statusCode).toBe(400);
    expect(atLimit.json().errors).toEqual([
      { field: 'body.metadata', message: 'must nest at most 4 levels' },
    ]);
    const overLimit = await patchProfile(`{"metadata":${nested(MAX_JSON_DEPTH, 'object')}}`);
    expect(overLimit.json().errors).toEqual([{ field: 'body', message: expect.stringContaining('levels') }]);
  });

  it('refuses a number too large for a double (it would be stored as null) naming the field', async () => {
    const before = await profile();
    for (const [payload, field] of [
      ['{"metadata":{"a":1e400}}', 'body.metadata.a'],
      ['{"metadata":{"list":[1,-1e999]}}', 'body.metadata.list.1'],
    ] as const) {
      const res = await patchProfile(payload);
      expect(res.statusCode, payload).toBe(400);
      expect(res.json()).toMatchObject({
        code: 'validation_failed',
        errors: [{ field, message: 'must be a finite number' }],
      });
    }
    expect(await profile()).toEqual(before);
    // Large but finite numbers, and ones that round to zero, are numbers like any other.
    const fine = await patchProfile('{"metadata":{"big":1e308,"tiny":1e-400}}');
    expect(fine.statusCode, fine.body).toBe(200);
    expect(fine.json().metadata).toEqual({ big: 1e308, tiny: 0 });
  });

  it('refuses form bodies outside /oauth with 415 problem+json, changing nothing (no login CSRF)', async () => {
    const admin = await createAdmin(app);
    const victim = await registerUser(app, 'form-victim');
    const before = await profile();
    const newEmail = uniqueEmail('form-register');
    const cases: Array<[method: 'POST' | 'PATCH', url: string, token: string | undefined, body: string]> = [
      ['POST', '/v1/auth/login', undefined, `email=${encodeURIComponent(victim.email)}&password=${PASSWORD}`],
      ['POST', '/v1/auth/register', undefined, `email=${encodeURIComponent(newEmail)}&password=${PASSWORD}`],
      ['POST', '/v1/auth/refresh', undefined, `refresh_token=${victim.refreshToken}`],
      ['POST', '/v1/auth/logout', victim.accessToken, 'scope=all'],
      ['PATCH', `/v1/users/${victim.id}`, admin.accessToken, 'status=disabled'],
      ['PATCH', '/v1/profiles/me', user.accessToken, 'display_name=Forged'],
      ['POST', '/v1/api-keys/verify', admin.accessToken, 'key=pak_x'],
      ['POST', '/v1/roles', admin.accessToken, 'name=form-role&permissions=*'],
    ];
    for (const [method, url, token, payload] of cases) {
      const res = await app.inject({
        method,
        url,
        headers: { ...(token ? bearer(token) : {}), 'content-type': 'application/x-www-form-urlencoded' },
        payload,
      });
      expect(res.statusCode, `${method} ${url}: ${res.body}`).toBe(415);
      expect(res.headers['content-type']).toMatch(/^application\/problem\+json/);
      expect(res.json().code).toBe('unsupported_media_type');
    }
    // The victim is still active and signed in, with the same refresh token; nothing was created.
    const me = await app.inject({ method: 'GET', url: '/v1/auth/me', headers: bearer(victim.accessToken) });
    expect(me.statusCode).toBe(200);
    expect(me.json().user.status).toBe('active');
    expect(await profile()).toEqual(before);
    const role = await app.inject({
      method: 'GET',
      url: '/v1/roles/form-role',
      headers: bearer(admin.accessToken),
    });
    expect(role.statusCode).toBe(404);
    const registered = await app.inject({
      method: 'POST',
      url: '/v1/auth/login',
      payload: { email: newEmail, password: PASSWORD },
    });
    expect(registered.statusCode).toBe(401);
    const refreshed = await app.inject({
      method: 'POST',
      url: '/v1/auth/refresh',
      payload: { refresh_token: victim.refreshToken },
    });
    expect(refreshed.statusCode, refreshed.body).toBe(200);
  });

  it('still takes form bodies at /oauth/*, answering errors there in RFC 6749 form', async () => {
    const admin = await createAdmin(app);
    const client = await createClient(app, admin.accessToken, { scopes: ['tokens:introspect'] });
    const token = await clientToken(app, client);
    expect(token.token_type).toBe('Bearer');
    const introspection = await form(
      app,
      '/oauth/introspect',
      { token: token.access_token },
      { authorization: `Bearer ${admin.accessToken}` },
    );
    expect(introspection.statusCode, introspection.body).toBe(200);
    expect(introspection.json().active).toBe(true);
    const missing = await form(app, '/oauth/token', {});
    expect(missing.statusCode).toBe(400);
    expect(missing.json()).toMatchObject({ error: expect.any(String) });
  });

  it('takes an optional body as absent or an object, never JSON null (which logged out)', async () => {
    const admin = await createAdmin(app);
    const victim = await registerUser(app, 'null-body');
    const client = await createClient(app, admin.accessToken, { scopes: ['users:read'] });
    const key = await app.inject({
      method: 'POST',
      url: '/v1/api-keys',
      headers: bearer(admin.accessToken),
      payload: { name: 'null-body', scopes: ['account:read'] },
    });
    expect(key.statusCode).toBe(201);
    for (const [url, token] of [
      ['/v1/auth/logout', victim.accessToken],
      [`/v1/api-keys/${key.json().id}/rotate`, admin.accessToken],
      [`/v1/clients/${client.id}/secrets`, admin.accessToken],
    ] as const) {
      const res = await app.inject({
        method: 'POST',
        url,
        headers: { ...bearer(token), 'content-type': 'application/json' },
        payload: 'null',
      });
      expect(res.statusCode, `${url}: ${res.body}`).toBe(400);
      expect(res.json()).toMatchObject({
        code: 'validation_failed',
        errors: [{ field: 'body', message: 'must be a JSON object' }],
      });
    }
    // Still signed in; the key and the secret did not rotate.
    const me = await app.inject({ method: 'GET', url: '/v1/auth/me', headers: bearer(victim.accessToken) });
    expect(me.statusCode).toBe(200);
    const verified = await app.inject({
      method: 'POST',
      url: '/v1/api-keys/verify',
      headers: bearer(admin.accessToken),
      payload: { key: key.json().key },
    });
    expect(verified.json()).toMatchObject({ valid: true });
    await clientToken(app, client);
    // No body at all is still the default.
    const logout = await app.inject({
      method: 'POST',
      url: '/v1/auth/logout',
      headers: bearer(victim.accessToken),
    });
    expect(logout.statusCode, logout.body).toBe(204);
    const after = await app.inject({
      method: 'GET',
      url: '/v1/auth/me',
      headers: bearer(victim.accessToken),
    });
    expect(after.statusCode).toBe(401);
  });

  it('answers a compressed body with 415 (RFC 9110 §15.5.16), in each endpoint’s error format', async () => {
    const victim = await registerUser(app, 'gzip');
    const login = JSON.stringify({ email: victim.email, password: PASSWORD });
    const gzipped = await app.inject({
      method: 'POST',
      url: '/v1/auth/login',
      headers: { 'content-type': 'application/json', 'content-encoding': 'gzip' },
      payload: gzipSync(login),
    });
    expect(gzipped.statusCode, gzipped.body).toBe(415);
    expect(gzipped.headers['content-type']).toMatch(/^application\/problem\+json/);
    expect(gzipped.headers['accept-encoding']).toBe('identity');
    expect(gzipped.json()).toMatchObject({
      code: 'unsupported_media_type',
      detail: expect.stringMatching(/Content-Encoding/),
    });
    const oauth = await app.inject({
      method: 'POST',
      url: '/oauth/token',
      headers: { 'content-type': 'application/x-www-form-urlencoded', 'content-encoding': 'gzip' },
      payload: gzipSync('grant_type=client_credentials'),
    });
    expect(oauth.statusCode, oauth.body).toBe(415);
    expect(oauth.headers['content-type']).toMatch(/^application\/json/);
    expect(oauth.json()).toMatchObject({ error: 'invalid_request' });
    // The identity coding is no coding at all.
    const identity = await app.inject({
      method: 'POST',
      url: '/v1/auth/login',
      headers: { 'content-type': 'application/json', 'content-encoding': 'identity' },
      payload: login,
    });
    expect(identity.statusCode, identity.body).toBe(200);
  });

  it('takes JSON as UTF-8 only: invalid bytes are a 400 and another charset a 415 (they matched other passwords)', async () => {
    const email = uniqueEmail('latin');
    const body = (password: Buffer) =>
      Buffer.concat([Buffer.from(`{"email":"${email}","password":"`), password, Buffer.from('"}')]);
    const latin1 = Buffer.from('Grüße aus München', 'latin1'); // ü, ß as single bytes: not UTF-8
    const register = (payload: Buffer, contentType: string) =>
      app.inject({
        method: 'POST',
        url: '/v1/auth/register',
        headers: { 'content-type': contentType },
        payload,
      });

    const declared = await register(body(latin1), 'application/json; charset=iso-8859-1');
    expect(declared.statusCode, declared.body).toBe(415);
    expect(declared.json().code).toBe('unsupported_media_type');
    const undeclared = await register(body(latin1), 'application/json');
    expect(undeclared.statusCode, undeclared.body).toBe(400);
    expect(undeclared.json()).toMatchObject({
      code: 'invalid_json',
      detail: expect.stringContaining('UTF-8'),
    });
    const stray = await register(
      body(Buffer.from([0x61, 0x62, 0x63, 0x64, 0x65, 0x66, 0x67, 0xff])),
      'application/json',
    );
    expect(stray.statusCode).toBe(400);
    // Under /oauth too, in its own error form.
    const oauth = await app.inject({
      method: 'POST',
      url: '/oauth/token',
      headers: { 'content-type': 'application/json' },
      payload: Buffer.from('{"grant_type":"client_credentials","client_id":"\xff"}', 'latin1'),
    });
    expect(oauth.statusCode).toBe(400);
    expect(oauth.json().error).toBe('invalid_request');

    // Nothing was created; the same password in UTF-8, declared or not, is a registration.
    const utf8 = await register(
      body(Buffer.from('Grüße aus München', 'utf8')),
      'application/json; charset=UTF-8',
    );
    expect(utf8.statusCode, utf8.body).toBe(201);
  });

  it('refuses a body with fields where the operation takes none (PUT, DELETE), changing nothing; {} is no body', async () => {
    const admin = await createAdmin(app);
    const target = await registerUser(app, 'no-body');
    const role = await app.inject({
      method: 'PUT',
      url: `/v1/users/${target.id}/roles/admin`,
      headers: bearer(admin.accessToken),
      payload: { expires_at: '2030-01-01T00:00:00Z' },
    });
    expect(role.statusCode, role.body).toBe(400);
    expect(role.headers['content-type']).toContain('application/problem+json');
    expect(role.json().errors).toEqual([
      { field: 'body.expires_at', message: 'is not accepted: this operation takes no body' },
    ]);
    expect((await app.services.repos.users.rolesAndPermissions(target.id)).roles).not.toContain('admin');

    const created = await app.inject({
      method: 'POST',
      url: '/v1/api-keys',
      headers: bearer(user.accessToken),
      payload: { name: 'kept', scopes: ['account:read'] },
    });
    const keyId = created.json().id as string;
    const revoke = (payload?: string) =>
      app.inject({
        method: 'DELETE',
        url: `/v1/api-keys/${keyId}`,
        headers: { ...bearer(user.accessToken), ...(payload ? { 'content-type': 'application/json' } : {}) },
        ...(payload ? { payload } : {}),
      });
    const withReason = await revoke('{"reason":"leaked"}');
    expect(withReason.statusCode, withReason.body).toBe(400);
    expect(withReason.json().errors[0].field).toBe('body.reason');
    expect((await app.services.repos.apiKeys.findById(keyId))?.revokedAt).toBeNull();
    // An empty object says nothing: the same as no body.
    expect((await revoke('{}')).statusCode).toBe(204);
  });

  it('refuses query parameters where an API write takes none (400 naming them), changing nothing; a read ignores them', async () => {
    const other = await registerUser(app, 'no-query-other');
    const made = await app.inject({
      method: 'POST',
      url: `/v1/api-keys?owner_id=${other.id}`,
      headers: bearer(user.accessToken),
      payload: { name: 'for whom?', scopes: ['account:read'] },
    });
    expect(made.statusCode, made.body).toBe(400);
    expect(made.headers['content-type']).toContain('application/problem+json');
    expect(made.json().errors).toEqual([
      { field: 'query.owner_id', message: 'is not accepted: this operation takes no query parameters' },
    ]);
    const keys = await app.inject({ method: 'GET', url: '/v1/api-keys', headers: bearer(user.accessToken) });
    expect(keys.json().data.map((k: { name: string }) => k.name)).not.toContain('for whom?');
    const logout = await app.inject({
      method: 'POST',
      url: '/v1/auth/logout?all=1',
      headers: bearer(user.accessToken),
    });
    expect(logout.statusCode).toBe(400);
    // A read ignores a cache-buster; operations with parameters keep theirs; outside the API (JWKS,
    // health) anything goes.
    const me = await app.inject({
      method: 'GET',
      url: '/v1/auth/me?_=1700000000',
      headers: bearer(user.accessToken),
    });
    expect(me.statusCode).toBe(200);
    // API.md: GET /v1/api-keys/{id} with `?owner_id=` (as the list takes it) is a read like any other.
    const own = await app.inject({
      method: 'POST',
      url: '/v1/api-keys',
      headers: bearer(user.accessToken),
      payload: { name: 'read with owner_id', scopes: ['account:read'] },
    });
    const read = await app.inject({
      method: 'GET',
      url: `/v1/api-keys/${own.json().id}?owner_id=${user.id}`,
      headers: bearer(user.accessToken),
    });
    expect(read.statusCode, read.body).toBe(200);
    expect(
      (await app.inject({ method: 'GET', url: '/v1/api-keys?limit=5', headers: bearer(user.accessToken) }))
        .statusCode,
    ).toBe(200);
    expect((await app.inject({ method: 'GET', url: '/.well-known/jwks.json?v=2' })).statusCode).toBe(200);
  });

  it('takes no bytes under Content-Type: application/json as no body: a DELETE goes through, a POST needing one says it is missing', async () => {
    const created = await app.inject({
      method: 'POST',
      url: '/v1/api-keys',
      headers: bearer(user.accessToken),
      payload: { name: 'header-only', scopes: ['account:read'] },
    });
    const keyId = created.json().id as string;
    const json = { ...bearer(user.accessToken), 'content-type': 'application/json' };
    const revoked = await app.inject({
      method: 'DELETE',
      url: `/v1/api-keys/${keyId}`,
      headers: json,
      payload: '',
    });
    expect(revoked.statusCode, revoked.body).toBe(204);
    expect((await app.services.repos.apiKeys.findById(keyId))?.revokedAt).not.toBeNull();
    // Logout's body is optional: no bytes ends the session of the token.
    const session = await app.inject({
      method: 'POST',
      url: '/v1/auth/login',
      payload: { email: user.email, password: user.password },
    });
    const token = session.json().session.access_token as string;
    const logout = await app.inject({
      method: 'POST',
      url: '/v1/auth/logout',
      headers: { ...bearer(token), 'content-type': 'application/json' },
      payload: '',
    });
    expect(logout.statusCode, logout.body).toBe(204);
    const create = await app.inject({ method: 'POST', url: '/v1/api-keys', headers: json, payload: '' });
    expect(create.statusCode).toBe(400);
    expect(create.json()).toMatchObject({ code: 'validation_failed' });
    // Whitespace is not nothing: it is not JSON.
    const blank = await app.inject({ method: 'POST', url: '/v1/api-keys', headers: json, payload: ' ' });
    expect(blank.statusCode).toBe(400);
    expect(blank.json()).toMatchObject({ code: 'invalid_json' });
  });

  it('refuses a member twice in one object, naming it, at /v1 and at /oauth (where the last one won)', async () => {
    const login = await app.inject({
      method: 'POST',
      url: '/v1/auth/login',
      headers: { 'content-type': 'application/json' },
      payload: `{"email":"${user.email}","password":"wrong password here","password":${JSON.stringify(user.password)}}`,
    });
    expect(login.statusCode, login.body).toBe(400);
    expect(login.json().errors).toEqual([
      { field: 'body.password', message: expect.stringContaining('more than once') },
    ]);

    const before = await profile();
    const nested = await patchProfile('{"metadata":{"theme":"dark","theme":"light"}}');
    expect(nested.statusCode).toBe(400);
    expect(nested.json().errors[0].field).toBe('body.metadata.theme');
    expect(await profile()).toEqual(before);

    const admin = await createAdmin(app);
    const client = await createClient(app, admin.accessToken, { scopes: ['users:read'] });
    const token = await app.inject({
      method: 'POST',
      url: '/oauth/token',
      headers: { 'content-type': 'application/json' },
      payload: `{"grant_type":"client_credentials","client_id":"${client.client_id}","client_secret":"wrong","client_secret":"${client.client_secret}"}`,
    });
    expect(token.statusCode, token.body).toBe(400);
    expect(token.json()).toMatchObject({ error: 'invalid_request' });
    expect(token.json().error_description).toContain('client_secret');
  });

  it('refuses __proto__ and constructor.prototype keys with a 400 saying so, not "not valid JSON"', async () => {
    const before = await profile();
    for (const [payload, field] of [
      ['{"display_name":"x","__proto__":{"admin":true}}', 'body.__proto__'],
      [
        '{"metadata":{"x":{"constructor":{"prototype":{"admin":true}}}}}',
        'body.metadata.x.constructor.prototype',
      ],
      ['{"metadata":{"list":[1,{"\\u005f_proto__":1}]}}', 'body.metadata.list.1.__proto__'],
    ] as const) {
      const res = await patchProfile(payload);
      expect(res.statusCode, payload).toBe(400);
      expect(res.json(), payload).toMatchObject({
        code: 'validation_failed',
        errors: [{ field, message: expect.stringContaining('forbidden key') }],
      });
    }
    expect(await profile()).toEqual(before);
    const oauth = await app.inject({
      method: 'POST',
      url: '/oauth/token',
      headers: { 'content-type': 'application/json' },
      payload: '{"grant_type":"client_credentials","__proto__":{}}',
    });
    expect(oauth.statusCode).toBe(400);
    expect(oauth.json()).toMatchObject({
      error: 'invalid_request',
      error_description: expect.stringContaining('__proto__ is a forbidden key'),
    });
    // Malformed JSON is still invalid_json, and a constructor that is no object is only a field.
    const malformed = await patchProfile('{"__proto__":');
    expect(malformed.json()).toMatchObject({ status: 400, code: 'invalid_json' });
    const plain = await patchProfile('{"metadata":{"constructor":"x"}}');
    expect(plain.statusCode, plain.body).toBe(200);
  });
});
