import { setTimeout as sleep } from 'node:timers/promises';
import { eq } from 'drizzle-orm';
import type { FastifyInstance } from 'fastify';
import {
  createRemoteJWKSet,
  customFetch as joseCustomFetch,
  decodeJwt,
  decodeProtectedHeader,
  jwtVerify,
} from 'jose';
import * as oidc from 'openid-client';
import pino from 'pino';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import { buildApp } from '../../src/app.js';
import { apiKeys, clients } from '../../src/db/schema/index.js';
import { type DatabaseHandle, openDatabase } from '../../src/db/client.js';
import { formUrlEncode } from '../../src/modules/oauth/oauth.client-auth.js';
import {
  basic,
  clientToken,
  type CreatedClient,
  createClient,
  createTestClock,
  form,
  introspect,
} from '../clients/helpers.js';
import { createKey } from '../api-keys/helpers.js';
import { buildTestApp, testConfig } from '../support/app.js';
import { testDatabase } from '../support/database.js';
import { createAdmin, registerUser, type TestUser } from '../support/factories.js';
import { bearer, injectFetch } from '../support/http.js';

const ISSUER = 'http://auth.test';
const ORDERS = 'https://orders.test';

describe('OAuth 2.0 as a standard client library sees it (openid-client)', () => {
  let app: FastifyInstance;
  let admin: TestUser;
  let client: CreatedClient;
  const clock = createTestClock();

  beforeAll(async () => {
    app = await buildTestApp({ deps: { clock } });
    admin = await createAdmin(app);
    client = await createClient(app, admin.accessToken, {
      name: 'orders',
      scopes: ['users:read', 'audit:read'],
      audiences: [ORDERS],
    });
  });

  const configure = (auth: oidc.ClientAuth, clientId = client.client_id) =>
    oidc.discovery(new URL(ISSUER), clientId, undefined, auth, {
      execute: [oidc.allowInsecureRequests],
      [oidc.customFetch]: injectFetch(app),
    });

  it('discovers the server metadata, consistent with the endpoints', async () => {
    const config = await configure(oidc.ClientSecretBasic(client.client_secret));
    const meta = config.serverMetadata();
    expect(meta).toMatchObject({
      issuer: ISSUER,
      jwks_uri: `${ISSUER}/.well-known/jwks.json`,
      token_endpoint: `${ISSUER}/oauth/token`,
      introspection_endpoint: `${ISSUER}/oauth/introspect`,
      revocation_endpoint: `${ISSUER}/oauth/revoke`,
    });
    expect(meta.grant_types_supported).toEqual(
      expect.arrayContaining(['client_credentials', 'refresh_token']),
    );
    expect(meta.grant_types_supported).not.toContain('password');
    expect(meta.token_endpoint_auth_methods_supported).toEqual([
      'client_secret_basic',
      'client_secret_post',
      'none',
    ]);
    expect(meta.scopes_supported).toEqual(expect.arrayContaining(['users:read', 'tokens:introspect']));
    const rfc8414 = await app.inject({ method: 'GET', url: '/.well-known/oauth-authorization-server' });
    expect(rfc8414.json()).toEqual(meta);
  });

  it('client_credentials with HTTP Basic, verified through the JWKS with the discovered issuer', async () => {
    const config = await configure(oidc.ClientSecretBasic(client.client_secret));
    const tokens = await oidc.clientCredentialsGrant(config, { scope: 'users:read', resource: ORDERS });
    expect(tokens.token_type).toBe('bearer');
    expect(tokens.scope).toBe('users:read');
    expect(tokens.expires_in).toBe(900);
    expect(tokens.refresh_token).toBeUndefined();

    const meta = config.serverMetadata();
    const jwks = createRemoteJWKSet(new URL(meta.jwks_uri!), { [joseCustomFetch]: injectFetch(app) });
    const { payload, protectedHeader } = await jwtVerify(tokens.access_token, jwks, {
      issuer: meta.issuer,
      audience: ORDERS,
      algorithms: ['ES256', 'EdDSA'],
      typ: 'at+jwt',
    });
    expect(protectedHeader.kid).toBeTruthy();
    expect(payload).toMatchObject({
      iss: ISSUER,
      sub: client.client_id,
      aud: ORDERS,
      client_id: client.client_id,
      scope: 'users:read',
    });
    expect(payload.roles).toBeUndefined();
    expect(typeof payload.jti).toBe('string');
  });

  it('client_credentials with client_secret_post; scope defaults to all of the client’s', async () => {
    const config = await configure(oidc.ClientSecretPost(client.client_secret));
    const tokens = await oidc.clientCredentialsGrant(config);
    expect(tokens.scope).toBe('audit:read users:read');
    const claims = decodeJwt(tokens.access_token);
    // No audience asked for: the client's registered audiences.
    expect(claims.aud).toBe(ORDERS);
  });

  it('introspects and revokes through the library', async () => {
    const config = await configure(oidc.ClientSecretBasic(client.client_secret));
    const { access_token } = await oidc.clientCredentialsGrant(config);
    const active = await oidc.tokenIntrospection(config, access_token);
    expect(active).toMatchObject({
      active: true,
      client_id: client.client_id,
      sub: client.client_id,
      scope: 'audit:read users:read',
      aud: ORDERS,
      iss: ISSUER,
      token_type: 'Bearer',
    });
    await oidc.tokenRevocation(config, access_token, { token_type_hint: 'refresh_token' });
    expect(await oidc.tokenIntrospection(config, access_token)).toEqual({ active: false });
  });

  it('answers a wrong secret with invalid_client, 401 and a Basic challenge', async () => {
    // The last character changed, always to a different one (a secret ending in `x` stays wrong too).
    const secret = client.client_secret;
    const wrongSecret = `${secret.slice(0, -1)}${secret.endsWith('x') ? 'y' : 'x'}`;
    const config = await configure(oidc.ClientSecretBasic(wrongSecret));
    const err = await oidc.clientCredentialsGrant(config).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(oidc.WWWAuthenticateChallengeError);
    const challenge = err as oidc.WWWAuthenticateChallengeError;
    expect(challenge.status).toBe(401);
    expect(challenge.cause[0]?.scheme).toBe('basic');
    expect(await challenge.response.json()).toMatchObject({ error: 'invalid_client' });

    const post = await configure(oidc.ClientSecretPost('pcs_nope'));
    const postErr = await oidc.clientCredentialsGrant(post).catch((e: unknown) => e);
    expect((postErr as { status: number }).status).toBe(401);
  });

  it('answers an over-long client_id or secret as a wrong one, in the body as over Basic (401 invalid_client, audited)', async () => {
    const long = 'a'.repeat(300);
    const malformed = async () =>
      (
        await app.services.audit.list({
          type: 'client.authentication_failed',
          subjectId: client.id,
          limit: 100,
        })
      ).filter((e) => e.data.reason === 'malformed').length;
    const before = await malformed();
    for (const [clientId, secret] of [
      [client.client_id, long],
      [`pci_${long}`, client.client_secret],
    ] as const) {
      const viaBody = await form(app, '/oauth/token', {
        grant_type: 'client_credentials',
        client_id: clientId,
        client_secret: secret,
      });
      const viaBasic = await form(
        app,
        '/oauth/token',
        { grant_type: 'client_credentials' },
        basic(clientId, secret),
      );
      for (const res of [viaBody, viaBasic]) {
        expect(res.statusCode, res.body).toBe(401);
        expect(res.json().error).toBe('invalid_client');
      }
    }
    // The registered client's two (over Basic and in the body); the unknown id's none.
    expect((await malformed()) - before).toBe(2);
  });

  it('answers a scope beyond the client’s with invalid_scope', async () => {
    const config = await configure(oidc.ClientSecretBasic(client.client_secret));
    const err = await oidc
      .clientCredentialsGrant(config, { scope: 'users:read roles:write' })
      .catch((e: unknown) => e);
    expect(err).toBeInstanceOf(oidc.ResponseBodyError);
    expect(err).toMatchObject({ error: 'invalid_scope', status: 400 });
    const wildcard = await oidc.clientCredentialsGrant(config, { scope: 'users:*' }).catch((e: unknown) => e);
    expect(wildcard).toMatchObject({ error: 'invalid_scope' });
  });

  it('answers a disabled client and a rotated-out secret with invalid_client', async () => {
    const other = await createClient(app, admin.accessToken, { scopes: ['users:read'] });
    const config = await configure(oidc.ClientSecretPost(other.client_secret), other.client_id);
    await oidc.clientCredentialsGrant(config);

    const rotated = await app.inject({
      method: 'POST',
      url: `/v1/clients/${other.id}/secrets`,
      headers: bearer(admin.accessToken),
      payload: { grace_seconds: 60 },
    });
    expect(rotated.statusCode).toBe(201);
    await oidc.clientCredentialsGrant(config);
    clock.advance(61);
    try {
      const err = await oidc.clientCredentialsGrant(config).catch((e: unknown) => e);
      expect(err).toMatchObject({ status: 401 });
    } finally {
      clock.advance(-61);
    }

    const fresh = await configure(oidc.ClientSecretBasic(rotated.json().client_secret), other.client_id);
    await oidc.clientCredentialsGrant(fresh);
    await app.inject({
      method: 'PATCH',
      url: `/v1/clients/${other.id}`,
      headers: bearer(admin.accessToken),
      payload: { status: 'disabled' },
    });
    const disabled = await oidc.clientCredentialsGrant(fresh).catch((e: unknown) => e);
    expect(disabled).toBeInstanceOf(oidc.WWWAuthenticateChallengeError);
    expect(await (disabled as oidc.WWWAuthenticateChallengeError).response.json()).toMatchObject({
      error: 'invalid_client',
    });
  });
});

describe('POST /oauth/token', () => {
  let app: FastifyInstance;
  let admin: TestUser;
  let client: CreatedClient;
  beforeAll(async () => {
    app = await buildTestApp();
    admin = await createAdmin(app);
    client = await createClient(app, admin.accessToken, { scopes: ['users:read', 'audit:read'] });
  });

  const token = (params: Record<string, string | string[]>, headers: Record<string, string> = {}) =>
    form(app, '/oauth/token', params, headers);
  const asClient = () => basic(client.client_id, client.client_secret);

  it('decodes §2.3.1 Basic credentials: %-escapes of ordinary characters still authenticate', async () => {
    const escapeAll = (s: string) =>
      [...s].map((c) => `%${c.charCodeAt(0).toString(16).toUpperCase().padStart(2, '0')}`).join('');
    const raw = `${escapeAll(client.client_id)}:${escapeAll(client.client_secret)}`;
    const res = await token(
      { grant_type: 'client_credentials' },
      { authorization: `Basic ${Buffer.from(raw).toString('base64')}` },
    );
    expect(res.statusCode, res.body).toBe(200);
    // And the library-style encoding (which escapes `_`) too.
    const libraryStyle = `${formUrlEncode(client.client_id)}:${formUrlEncode(client.client_secret)}`;
    expect(libraryStyle).toContain('%5F');
    const again = await token(
      { grant_type: 'client_credentials' },
      { authorization: `basic ${Buffer.from(libraryStyle).toString('base64')}` },
    );
    expect(again.statusCode, again.body).toBe(200);
  });

  it('refuses a scope that is no permission (invalid_scope), even under a wildcard that would cover it', async () => {
    const wide = await createClient(app, admin.accessToken, { scopes: ['*'] });
    const asWide = basic(wide.client_id, wide.client_secret);
    for (const scope of ['openid', 'users:x!y', 'users:read openid']) {
      const res = await token({ grant_type: 'client_credentials', scope }, asWide);
      expect(res.statusCode, scope).toBe(400);
      expect(res.json()).toMatchObject({ error: 'invalid_scope' });
    }
    const ok = await token({ grant_type: 'client_credentials', scope: 'users:read orders:read' }, asWide);
    expect(ok.statusCode, ok.body).toBe(200);
  });

  it('refuses a form body in a charset other than UTF-8 (415), or not UTF-8 at all (400), as a JSON body', async () => {
    for (const charset of ['utf-16', 'iso-8859-1']) {
      const res = await app.inject({
        method: 'POST',
        url: '/oauth/token',
        headers: { 'content-type': `application/x-www-form-urlencoded; charset=${charset}`, ...asClient() },
        payload: 'grant_type=client_credentials',
      });
      expect(res.statusCode, charset).toBe(415);
      expect(res.json().error).toBe('invalid_request');
      expect(res.headers['cache-control']).toBe('no-store');
    }
    const utf8 = await app.inject({
      method: 'POST',
      url: '/oauth/token',
      headers: { 'content-type': 'application/x-www-form-urlencoded; charset=UTF-8', ...asClient() },
      payload: 'grant_type=client_credentials',
    });
    expect(utf8.statusCode, utf8.body).toBe(200);
    // Bytes that are not UTF-8 at all: 400, not a grant type read as something else.
    const bytes = await app.inject({
      method: 'POST',
      url: '/oauth/token',
      headers: { 'content-type': 'application/x-www-form-urlencoded', ...asClient() },
      payload: Buffer.concat([Buffer.from('grant_type=client_credentials'), Buffer.from([0xff])]),
    });
    expect(bytes.statusCode, bytes.body).toBe(400);
    expect(bytes.json()).toMatchObject({
      error: 'invalid_request',
      error_description: 'The form body is not valid UTF-8',
    });
    // Nor escaped so, nor escaped wrongly: not read as the characters themselves.
    for (const payload of [
      'grant_type=client_credentials&scope=%FF',
      'grant_type=client_credentials&foo=%zz',
      'grant_type=client_credentials&scope=users%3',
      'grant_type=client_credentials&scope=%C3',
    ]) {
      const res = await app.inject({
        method: 'POST',
        url: '/oauth/token',
        headers: { 'content-type': 'application/x-www-form-urlencoded', ...asClient() },
        payload,
      });
      expect(res.statusCode, payload).toBe(400);
      expect(res.json().error, payload).toBe('invalid_request');
    }
    // Well-formed escapes, of UTF-8 too, are read as ever.
    const escaped = await app.inject({
      method: 'POST',
      url: '/oauth/token',
      headers: { 'content-type': 'application/x-www-form-urlencoded', ...asClient() },
      payload: 'grant_type=client%5Fcredentials&note=%C3%A9%25',
    });
    expect(escaped.statusCode, escaped.body).toBe(200);
  });

  it('answers RFC 6749 §5.1: Bearer, expires_in, scope; no-store; a service token, no refresh token', async () => {
    const res = await token({ grant_type: 'client_credentials' }, asClient());
    expect(res.statusCode).toBe(200);
    expect(res.headers['cache-control']).toBe('no-store');
    expect(res.headers.pragma).toBe('no-cache');
    expect(res.headers['content-type']).toContain('application/json');
    const body = res.json();
    expect(Object.keys(body).sort()).toEqual(['access_token', 'expires_in', 'scope', 'token_type']);
    expect(body).toMatchObject({ token_type: 'Bearer', expires_in: 900, scope: 'audit:read users:read' });
    expect(decodeProtectedHeader(body.access_token).typ).toBe('at+jwt');
    const claims = decodeJwt(body.access_token);
    // No audiences registered: tokens for this service itself.
    expect(claims.aud).toBe(app.services.audience);
    expect(claims.sub).toBe(client.client_id);
    const verified = await app.services.tokens.verify(body.access_token);
    expect(verified.client_id).toBe(client.client_id);
  });

  it('answers a path the router decodes to /oauth/token (%-escaped, absolute form) as /oauth/token: no-store, RFC 6749 errors', async () => {
    for (const url of ['/%6Fauth/token', 'http://localhost/oauth/token']) {
      const send = (payload: string, headers: Record<string, string> = {}) =>
        app.inject({
          method: 'POST',
          url,
          headers: { 'content-type': 'application/x-www-form-urlencoded', ...headers },
          payload,
        });
      const ok = await send('grant_type=client_credentials', asClient());
      expect(ok.statusCode, `${url}: ${ok.body}`).toBe(200);
      expect(ok.headers['cache-control']).toBe('no-store');
      expect(ok.headers.pragma).toBe('no-cache');
      const refused = await send('grant_type=bogus', asClient());
      expect(refused.statusCode).toBe(400);
      expect(refused.headers['content-type']).toContain('application/json');
      expect(refused.json()).toMatchObject({ error: 'unsupported_grant_type' });
      expect(refused.headers['cache-control']).toBe('no-store');
    }
  });

  it('takes JSON bodies too', async () => {
    const res = await app.inject({
      method: 'POST',
      url: '/oauth/token',
      headers: asClient(),
      payload: { grant_type: 'client_credentials', scope: 'audit:read' },
    });
    expect(res.statusCode, res.body).toBe(200);
    expect(res.json().scope).toBe('audit:read');
  });

  it('checks audience and resource (RFC 8707) against the client’s registered audiences', async () => {
    const multi = await createClient(app, admin.accessToken, {
      scopes: ['users:read'],
      audiences: ['https://a.test', 'https://b.test', 'billing'],
    });
    const auth = basic(multi.client_id, multi.client_secret);
    const all = await token({ grant_type: 'client_credentials' }, auth);
    expect(decodeJwt(all.json().access_token).aud).toEqual(['billing', 'https://a.test', 'https://b.test']);
    const one = await token({ grant_type: 'client_credentials', audience: 'billing' }, auth);
    expect(decodeJwt(one.json().access_token).aud).toBe('billing');
    const two = await token(
      { grant_type: 'client_credentials', resource: ['https://a.test', 'https://b.test'] },
      auth,
    );
    expect(two.statusCode, two.body).toBe(200);
    expect(decodeJwt(two.json().access_token).aud).toEqual(['https://a.test', 'https://b.test']);
    const refused: Array<Record<string, string>> = [
      { audience: 'https://evil.test' },
      { resource: 'https://evil.test' },
      { resource: 'billing' },
      { resource: 'https://a.test#frag' },
      { audience: app.services.audience },
    ];
    for (const params of refused) {
      const res = await token({ grant_type: 'client_credentials', ...params }, auth);
      expect(res.statusCode, JSON.stringify(params)).toBe(400);
      expect(res.json().error).toBe('invalid_target');
    }
    // A client with no audiences may name only this service.
    const own = await token(
      { grant_type: 'client_credentials', audience: app.services.audience },
      asClient(),
    );
    expect(own.statusCode).toBe(200);
    // An audience with a fragment, registered before they were refused, is granted no more.
    await app.services.db
      .update(clients)
      .set({ audiences: ['https://a.test/#frag', 'billing'] })
      .where(eq(clients.id, multi.id));
    app.services.events.applyLocally([{ type: 'client_changed', clientId: multi.client_id }]);
    const legacy = await token({ grant_type: 'client_credentials' }, auth);
    expect(legacy.statusCode, legacy.body).toBe(200);
    expect(decodeJwt(legacy.json().access_token).aud).toBe('billing');
    const named = await token({ grant_type: 'client_credentials', audience: 'https://a.test/#frag' }, auth);
    expect(named.json().error).toBe('invalid_target');
  });

  it('answers every error as {error, error_description} JSON with no-store, never problem+json', async () => {
    const cases: Array<[Record<string, string | string[]>, Record<string, string>, number, string]> = [
      [{}, asClient(), 400, 'invalid_request'],
      [{ grant_type: 'password', username: 'a', password: 'b' }, asClient(), 400, 'unsupported_grant_type'],
      [{ grant_type: 'authorization_code', code: 'x' }, asClient(), 400, 'unsupported_grant_type'],
      [{ grant_type: 'client_credentials', scope: 'keys:write' }, asClient(), 400, 'invalid_scope'],
      [{ grant_type: 'client_credentials', scope: 'users:read\u0001' }, asClient(), 400, 'invalid_scope'],
      [{ grant_type: ['client_credentials', 'client_credentials'] }, asClient(), 400, 'invalid_request'],
      [
        { grant_type: 'client_credentials', scope: ['users:read', 'audit:read'] },
        asClient(),
        400,
        'invalid_request',
      ],
      [{ grant_type: 'client_credentials' }, {}, 401, 'invalid_client'],
      [
        {
          grant_type: 'client_credentials',
          client_id: client.client_id,
          client_secret: client.client_secret,
        },
        asClient(),
        400,
        'invalid_request',
      ],
      [{ grant_type: 'client_credentials', client_id: client.client_id }, {}, 401, 'invalid_client'],
      [{ grant_type: 'client_credentials', client_secret: client.client_secret }, {}, 401, 'invalid_client'],
      [{ grant_type: 'client_credentials' }, { authorization: 'Basic !!!' }, 401, 'invalid_client'],
      [{ grant_type: 'client_credentials' }, bearer(admin.accessToken), 401, 'invalid_client'],
      [{ grant_type: 'refresh_token' }, {}, 400, 'invalid_request'],
      [{ grant_type: 'refresh_token', refresh_token: 'prt_nope' }, {}, 400, 'invalid_grant'],
    ];
    for (const [params, headers, status, error] of cases) {
      const res = await token(params, headers);
      const label = `${JSON.stringify(params)} ${JSON.stringify(headers)}`;
      expect(res.statusCode, `${label}: ${res.body}`).toBe(status);
      expect(res.headers['content-type'], label).toMatch(/^application\/json/);
      expect(res.headers['cache-control'], label).toBe('no-store');
      expect(res.headers.pragma, label).toBe('no-cache');
      const body = res.json();
      expect(body.error, label).toBe(error);
      expect(typeof body.error_description).toBe('string');
      expect(body).not.toHaveProperty('type');
      if (status === 401) expect(res.headers['www-authenticate'], label).toMatch(/^Basic realm=/);
    }
  });

  it('ignores unknown parameters and treats empty ones as absent (RFC 6749 §3.1, §3.2)', async () => {
    const res = await token(
      { grant_type: 'client_credentials', foo: 'bar', scope: '', audience: '' },
      asClient(),
    );
    expect(res.statusCode, res.body).toBe(200);
    expect(res.json().scope).toBe('audit:read users:read');
  });

  it('refuses a scope that is present but not scope tokens separated by single spaces (RFC 6749 §3.3)', async () => {
    const malformed = [
      ' ',
      '   ',
      '\t',
      ' users:read',
      'users:read ',
      'users:read  audit:read',
      'users:read\taudit:read',
      'users:read\naudit:read',
      'users:"read"',
      'users:read\\',
      'users:réad',
    ];
    for (const scope of malformed) {
      const res = await token({ grant_type: 'client_credentials', scope }, asClient());
      expect(res.statusCode, JSON.stringify(scope)).toBe(400);
      expect(res.json().error, JSON.stringify(scope)).toBe('invalid_scope');
    }
    // Percent-encoded on the wire, as a client sends `scope=%20`.
    const encoded = await app.inject({
      method: 'POST',
      url: '/oauth/token',
      headers: { 'content-type': 'application/x-www-form-urlencoded', ...asClient() },
      payload: 'grant_type=client_credentials&scope=%20',
    });
    expect(encoded.statusCode, encoded.body).toBe(400);
    expect(encoded.json().error).toBe('invalid_scope');
    const json = await app.inject({
      method: 'POST',
      url: '/oauth/token',
      headers: { 'content-type': 'application/json', ...asClient() },
      payload: { grant_type: 'client_credentials', scope: ' ' },
    });
    expect(json.statusCode, json.body).toBe(400);
    expect(json.json().error).toBe('invalid_scope');
    // Well-formed: one token, several, a token repeated (the same scope, once).
    for (const [scope, granted] of [
      ['users:read', 'users:read'],
      ['users:read audit:read', 'users:read audit:read'],
      ['audit:read audit:read', 'audit:read'],
    ] as const) {
      const res = await token({ grant_type: 'client_credentials', scope }, asClient());
      expect(res.statusCode, scope).toBe(200);
      expect(res.json().scope, scope).toBe(granted);
    }
  });

  it('never accepts credentials in the URL', async () => {
    const res = await app.inject({
      method: 'POST',
      url: `/oauth/token?client_secret=${client.client_secret}`,
      headers: { 'content-type': 'application/x-www-form-urlencoded', ...asClient() },
      payload: 'grant_type=client_credentials',
    });
    expect(res.statusCode).toBe(400);
    expect(res.json().error).toBe('invalid_request');
    const introspection = await app.inject({
      method: 'POST',
      url: '/oauth/introspect?token=abc',
      headers: { 'content-type': 'application/x-www-form-urlencoded', ...asClient() },
      payload: '',
    });
    expect(introspection.statusCode).toBe(400);
  });

  it('refuses a repeated parameter (RFC 6749 §3.1), whether or not the body has anything to decode', async () => {
    for (const payload of [
      'grant_type=client_credentials&grant_type=client_credentials',
      'grant_type=client_credentials&scope=users%3Aread&scope=audit%3Aread',
    ]) {
      const res = await app.inject({
        method: 'POST',
        url: '/oauth/token',
        headers: { 'content-type': 'application/x-www-form-urlencoded', ...asClient() },
        payload,
      });
      expect(res.statusCode, payload).toBe(400);
      expect(res.json().error, payload).toBe('invalid_request');
      expect(res.json().error_description, payload).toMatch(/is repeated/);
    }
    // A token is all base64url and dots: the parser's shortcut, which must keep both values.
    const issued = (await clientToken(app, client)).access_token;
    const introspection = await app.inject({
      method: 'POST',
      url: '/oauth/introspect',
      headers: { 'content-type': 'application/x-www-form-urlencoded', ...asClient() },
      payload: `token=${issued}&token=${issued}`,
    });
    expect(introspection.statusCode).toBe(400);
    expect(introspection.json().error_description).toMatch(/token is repeated/);
  });

  it('ignores a parameter it does not recognise even when repeated (RFC 6749 §3.2), on every endpoint', async () => {
    const post = (url: string, payload: string, headers: Record<string, string> = asClient()) =>
      app.inject({
        method: 'POST',
        url,
        headers: { 'content-type': 'application/x-www-form-urlencoded', ...headers },
        payload,
      });
    const issued = await post('/oauth/token', 'grant_type=client_credentials&foo=bar&foo=baz&x=%201&x=2');
    expect(issued.statusCode, issued.body).toBe(200);
    expect(issued.json().scope).toBe('audit:read users:read');
    const json = await app.inject({
      method: 'POST',
      url: '/oauth/token',
      headers: { 'content-type': 'application/json', ...asClient() },
      payload: { grant_type: 'client_credentials', foo: ['bar', 'baz'] },
    });
    expect(json.statusCode, json.body).toBe(200);
    const accessToken = issued.json().access_token as string;
    // What another endpoint recognises is unrecognised here: grant_type means nothing to introspection.
    const introspection = await post(
      '/oauth/introspect',
      `token=${accessToken}&foo=1&foo=2&grant_type=a&grant_type=b`,
    );
    expect(introspection.statusCode, introspection.body).toBe(200);
    expect(introspection.json()).toMatchObject({ active: true, client_id: client.client_id });
    const revocation = await post('/oauth/revoke', `token=${accessToken}&foo=1&foo=2&scope=a&scope=b`);
    expect(revocation.statusCode, revocation.body).toBe(200);
    expect((await post('/oauth/introspect', `token=${accessToken}`)).json()).toEqual({ active: false });
    // A recognised one repeated is still refused, on each endpoint.
    for (const [url, payload] of [
      ['/oauth/token', 'grant_type=client_credentials&foo=1&foo=2&scope=users%3Aread&scope=audit%3Aread'],
      ['/oauth/introspect', `token=${accessToken}&token_type_hint=a&token_type_hint=b`],
      ['/oauth/revoke', `token=${accessToken}&token=${accessToken}`],
    ] as const) {
      const res = await post(url, payload);
      expect(res.statusCode, `${url} ${payload}`).toBe(400);
      expect(res.json().error).toBe('invalid_request');
      expect(res.json().error_description).toMatch(/is repeated/);
    }
  });

  it('refuses malformed bodies with invalid_request and unknown /oauth paths in OAuth form', async () => {
    const json = await app.inject({
      method: 'POST',
      url: '/oauth/token',
      headers: { 'content-type': 'application/json', ...asClient() },
      payload: '{"grant_type": ',
    });
    expect(json.statusCode).toBe(400);
    expect(json.json().error).toBe('invalid_request');
    const text = await app.inject({
      method: 'POST',
      url: '/oauth/token',
      headers: { 'content-type': 'text/plain' },
      payload: 'grant_type=client_credentials',
    });
    expect(text.statusCode).toBe(415);
    expect(text.json().error).toBe('invalid_request');
    const missing = await app.inject({ method: 'GET', url: '/oauth/authorize' });
    expect(missing.statusCode).toBe(404);
    expect(missing.json().error).toBe('invalid_request');
  });

  it('refresh_token grant: first-party tokens rotate without client authentication, reuse is invalid_grant', async () => {
    const user = await registerUser(app, 'oauth-refresh');
    const res = await token({ grant_type: 'refresh_token', refresh_token: user.refreshToken });
    expect(res.statusCode, res.body).toBe(200);
    const body = res.json();
    expect(body).toMatchObject({ token_type: 'Bearer', expires_in: 900 });
    expect(body.refresh_token).toMatch(/^prt_/);
    expect(body.refresh_token).not.toBe(user.refreshToken);
    expect(body.scope.split(' ')).toEqual(expect.arrayContaining(['account:read']));
    expect(res.headers['cache-control']).toBe('no-store');
    const publicId = await token({
      grant_type: 'refresh_token',
      refresh_token: body.refresh_token,
      client_id: 'paservices-frontend',
    });
    expect(publicId.statusCode, publicId.body).toBe(200);

    // A confidential client cannot spend a refresh token that was not issued to it.
    const stolen = await token(
      { grant_type: 'refresh_token', refresh_token: publicId.json().refresh_token },
      asClient(),
    );
    expect(stolen.statusCode).toBe(400);
    expect(stolen.json().error).toBe('invalid_grant');
    // Answered as an unknown token is: another client learns nothing of whether it exists.
    const unknown = await token({ grant_type: 'refresh_token', refresh_token: 'prt_nope' }, asClient());
    expect(stolen.json().error_description).toBe(unknown.json().error_description);
    const unknownClient = await token({
      grant_type: 'refresh_token',
      refresh_token: publicId.json().refresh_token,
      client_id: 'someone-else',
    });
    expect(unknownClient.statusCode).toBe(401);
    // Still usable by its owner afterwards.
    const next = await token({ grant_type: 'refresh_token', refresh_token: publicId.json().refresh_token });
    expect(next.statusCode).toBe(200);
  });
  it('refresh_token grant refuses an audience or resource other than this service (RFC 8707 invalid_target), rotating nothing', async () => {
    const user = await registerUser(app, 'oauth-refresh-target');
    const targets: Record<string, string>[] = [
      { resource: 'https://evil.example.com' },
      { audience: 'https://orders.example.com' },
    ];
    for (const params of targets) {
      const res = await token({ grant_type: 'refresh_token', refresh_token: user.refreshToken, ...params });
      expect(res.statusCode, JSON.stringify(params)).toBe(400);
      expect(res.json().error).toBe('invalid_target');
    }
    const own = await token({
      grant_type: 'refresh_token',
      refresh_token: user.refreshToken,
      resource: app.services.audience,
    });
    expect(own.statusCode, own.body).toBe(200);
    expect(decodeJwt(own.json().access_token).aud).toBe(app.services.audience);
  });

  it('refresh_token grant honours a narrower scope for the access token and refuses a wider one (RFC 6749 §6)', async () => {
    const user = await registerUser(app, 'oauth-scope');
    // Beyond the grant (users:write), malformed, or a wildcard wider than the grant: invalid_scope,
    // and nothing changes — the refresh token is not rotated and stays good.
    for (const scope of [
      'users:write',
      'account:read users:write',
      'account:*',
      'bad\\scope',
      // Present but no scope token, or not separated by single spaces: malformed, not "no scope".
      ' ',
      'account:read  account:write',
      ' account:read',
      'account:read ',
    ]) {
      const wider = await token({ grant_type: 'refresh_token', refresh_token: user.refreshToken, scope });
      expect(wider.statusCode, scope).toBe(400);
      expect(wider.json().error, scope).toBe('invalid_scope');
      expect(wider.headers['cache-control']).toBe('no-store');
    }
    const narrow = await token({
      grant_type: 'refresh_token',
      refresh_token: user.refreshToken,
      scope: 'account:read',
    });
    expect(narrow.statusCode, narrow.body).toBe(200);
    expect(narrow.json().scope).toBe('account:read');
    const narrowToken = narrow.json().access_token as string;
    expect(decodeJwt(narrowToken).scope).toBe('account:read');
    expect(decodeJwt(narrowToken).roles).toEqual([]); // `user` would say more than account:read
    const me = await app.inject({ method: 'GET', url: '/v1/auth/me', headers: bearer(narrowToken) });
    expect(me.statusCode).toBe(200);
    const password = await app.inject({
      method: 'POST',
      url: '/v1/auth/password',
      headers: bearer(narrowToken),
      payload: { current_password: user.password, new_password: 'another long passphrase 42' },
    });
    expect(password.statusCode).toBe(403);
    // The refresh token keeps the original grant: the next refresh without scope has all of it.
    const full = await token({ grant_type: 'refresh_token', refresh_token: narrow.json().refresh_token });
    expect(full.statusCode, full.body).toBe(200);
    expect(full.json().scope.split(' ').sort()).toEqual(['account:read', 'account:write', 'api_keys:own']);
    expect(decodeJwt(full.json().access_token).roles).toEqual(['user']);
    // Asking for all of it is no narrowing: the roles stay.
    const all = await token({
      grant_type: 'refresh_token',
      refresh_token: full.json().refresh_token,
      scope: 'api_keys:own account:write account:read',
    });
    expect(decodeJwt(all.json().access_token).roles).toEqual(['user']);
  });
});

describe('POST /oauth/introspect', () => {
  let app: FastifyInstance;
  let admin: TestUser;
  let mine: CreatedClient;
  let theirs: CreatedClient;
  let auditor: CreatedClient;
  const clock = createTestClock();

  beforeAll(async () => {
    app = await buildTestApp({ deps: { clock } });
    admin = await createAdmin(app);
    mine = await createClient(app, admin.accessToken, {
      scopes: ['users:read'],
      audiences: ['https://x.test'],
    });
    theirs = await createClient(app, admin.accessToken, { scopes: ['users:read'] });
    auditor = await createClient(app, admin.accessToken, { scopes: ['tokens:introspect'] });
  });

  const as = (c: CreatedClient) => basic(c.client_id, c.client_secret);

  it('shows a client its own tokens, of any audience, and nobody else’s', async () => {
    const own = await clientToken(app, mine);
    const other = await clientToken(app, theirs);
    const seen = await introspect(app, own.access_token, as(mine));
    expect(seen).toMatchObject({
      active: true,
      client_id: mine.client_id,
      sub: mine.client_id,
      scope: 'users:read',
      aud: 'https://x.test',
      iss: ISSUER,
      token_type: 'Bearer',
      token_use: 'access_token',
    });
    expect(seen.exp).toBeGreaterThan(Date.now() / 1000);
    expect(typeof seen.iat).toBe('number');
    expect(typeof seen.jti).toBe('string');
    expect(await introspect(app, other.access_token, as(mine))).toEqual({ active: false });
    // client_secret_post works as well.
    const post = await introspect(
      app,
      own.access_token,
      {},
      {
        client_id: mine.client_id,
        client_secret: mine.client_secret,
      },
    );
    expect(post.active).toBe(true);
  });

  it('shows tokens:introspect holders every token: clients’, users’, refresh tokens', async () => {
    const user = await registerUser(app, 'introspected');
    const other = await clientToken(app, theirs);
    expect((await introspect(app, other.access_token, as(auditor))).active).toBe(true);
    const userToken = await introspect(app, user.accessToken, as(auditor));
    expect(userToken).toMatchObject({
      active: true,
      sub: user.id,
      client_id: 'paservices-frontend',
      roles: ['user'],
    });
    const refresh = await introspect(app, user.refreshToken, as(auditor));
    expect(refresh).toMatchObject({
      active: true,
      sub: user.id,
      client_id: 'paservices-frontend',
      token_use: 'refresh_token',
    });
    // A bearer token or API key holding tokens:introspect may ask too.
    expect((await introspect(app, other.access_token, bearer(admin.accessToken))).active).toBe(true);
    // A client never sees a user's refresh token unless it holds tokens:introspect.
    expect(await introspect(app, user.refreshToken, as(mine))).toEqual({ active: false });
  });

  it('answers from memory as it would from scratch: same visibility, and a revocation at once', async () => {
    const theirsToken = (await clientToken(app, theirs)).access_token;
    // Each client authenticates and the token is verified once, so every answer below comes from the
    // remembered header and the cached token.
    const first = await introspect(app, theirsToken, as(theirs));
    expect(first).toMatchObject({ active: true, client_id: theirs.client_id });
    expect(await introspect(app, theirsToken, as(theirs))).toEqual(first);
    expect(await introspect(app, theirsToken, as(mine))).toEqual({ active: false });
    expect(await introspect(app, theirsToken, as(mine))).toEqual({ active: false });
    expect(await introspect(app, theirsToken, as(auditor))).toEqual(first);
    expect(await introspect(app, theirsToken, as(auditor))).toEqual(first);
    const revoked = await form(app, '/oauth/revoke', { token: theirsToken }, as(theirs));
    expect(revoked.statusCode).toBe(200);
    expect(await introspect(app, theirsToken, as(theirs))).toEqual({ active: false });
    expect(await introspect(app, theirsToken, as(auditor))).toEqual({ active: false });
  });

  it('finds the token whatever token_type_hint says', async () => {
    const user = await registerUser(app, 'hint');
    for (const hint of ['access_token', 'refresh_token', 'api_key', 'nonsense']) {
      expect((await introspect(app, user.accessToken, as(auditor), { token_type_hint: hint })).active).toBe(
        true,
      );
      expect((await introspect(app, user.refreshToken, as(auditor), { token_type_hint: hint })).active).toBe(
        true,
      );
    }
  });

  it('answers only {active:false} for anything invalid, expired, revoked, rotated or unknown', async () => {
    const user = await registerUser(app, 'inactive');
    const own = await clientToken(app, mine);
    const rotated = await form(app, '/oauth/token', {
      grant_type: 'refresh_token',
      refresh_token: user.refreshToken,
    });
    expect(rotated.statusCode).toBe(200);
    const [h, p] = own.access_token.split('.');
    const inactive = [
      'garbage',
      'a.b.c',
      `${h}.${p}.AAAA`,
      user.refreshToken, // rotated away above
      'prt_000000000000_0000000000000000000000000000000000000000000000000',
      'pak_unknown_not_a_key',
      `pak_${'a'.repeat(12)}_${'b'.repeat(43)}abcdef`,
      'x'.repeat(9000),
    ];
    for (const t of inactive)
      expect(await introspect(app, t, as(auditor)), t.slice(0, 40)).toEqual({ active: false });

    clock.advance(900 + 31);
    try {
      expect(await introspect(app, own.access_token, as(mine))).toEqual({ active: false });
    } finally {
      clock.advance(-(900 + 31));
    }
    expect((await introspect(app, own.access_token, as(mine))).active).toBe(true);
  });

  it('answers active:false from exp on, without the verification leeway, cached or not (RFC 7662 §2.2)', async () => {
    const cached = await clientToken(app, mine);
    const fresh = await clientToken(app, mine);
    const user = await registerUser(app, 'leeway');
    // Verified and remembered by this instance: later answers come from memory.
    expect((await introspect(app, cached.access_token, as(mine))).active).toBe(true);
    // The last of the three to expire (they were issued within a second or two of each other).
    const exp = Math.max(
      ...[cached.access_token, fresh.access_token, user.accessToken].map((t) => decodeJwt(t).exp!),
    );
    const offset = exp * 1000 - Date.now();
    clock.advance(offset / 1000);
    try {
      // At exp exactly, and a second past it: inactive, from memory and from scratch alike.
      expect(await introspect(app, cached.access_token, as(mine))).toEqual({ active: false });
      expect(await introspect(app, fresh.access_token, as(auditor))).toEqual({ active: false });
      expect(await introspect(app, user.accessToken, as(auditor))).toEqual({ active: false });
      clock.advance(1);
      expect(await introspect(app, cached.access_token, as(mine))).toEqual({ active: false });
      expect(await introspect(app, fresh.access_token, as(mine))).toEqual({ active: false });
      // This service's own endpoints keep the documented leeway (≤ 30 s), like offline verifiers.
      const me = await app.inject({ method: 'GET', url: '/v1/auth/me', headers: bearer(user.accessToken) });
      expect(me.statusCode).toBe(200);
    } finally {
      clock.advance(-(offset / 1000) - 1);
    }
    expect((await introspect(app, cached.access_token, as(mine))).active).toBe(true);
  });

  it('introspects API keys for tokens:introspect holders only', async () => {
    const user = await registerUser(app, 'keyholder');
    const created = await app.inject({
      method: 'POST',
      url: '/v1/api-keys',
      headers: bearer(user.accessToken),
      payload: { name: 'for introspection', scopes: ['account:read'] },
    });
    expect(created.statusCode, created.body).toBe(201);
    const key = created.json().key as string;
    expect(await introspect(app, key, as(auditor))).toMatchObject({
      active: true,
      sub: user.id,
      scope: 'account:read',
      token_use: 'api_key',
      key_id: created.json().id,
    });
    expect(await introspect(app, key, as(mine))).toEqual({ active: false });
  });

  it('gives a rotated-out API key secret the exp of its grace, not of the key (RFC 7662 §2.2)', async () => {
    const user = await registerUser(app, 'keyrotation');
    const inMonth = new Date(Date.now() + 30 * 86_400_000).toISOString();
    const make = (expiresAt?: string) =>
      createKey(app, user.accessToken, {
        scopes: ['account:read'],
        ...(expiresAt ? { expires_at: expiresAt } : {}),
      });
    const rotate = async (id: string, grace: number) => {
      const res = await app.inject({
        method: 'POST',
        url: `/v1/api-keys/${id}/rotate`,
        headers: bearer(user.accessToken),
        payload: { grace_seconds: grace },
      });
      expect(res.statusCode, res.body).toBe(200);
      const [row] = await app.services.db.select().from(apiKeys).where(eq(apiKeys.id, id));
      return {
        key: res.json().key as string,
        graceEnds: Math.floor(row!.previousSecretExpiresAt!.getTime() / 1000),
      };
    };
    const epoch = (iso: string) => Math.floor(Date.parse(iso) / 1000);

    // A key that never expires: its replaced secret stops at the end of the grace, and says so.
    const forever = await make();
    const renewed = await rotate(forever.id, 60);
    const old = await introspect(app, forever.key, as(auditor));
    expect(old).toMatchObject({ active: true, key_id: forever.id, exp: renewed.graceEnds });
    expect(await introspect(app, renewed.key, as(auditor))).not.toHaveProperty('exp');

    // A key that expires before the grace would end: the key's expiry, the earlier of the two.
    const soon = new Date(Date.now() + 120_000).toISOString();
    const short = await make(soon);
    const shortRenewed = await rotate(short.id, 3600);
    expect(await introspect(app, short.key, as(auditor))).toMatchObject({ active: true, exp: epoch(soon) });
    expect(await introspect(app, shortRenewed.key, as(auditor))).toMatchObject({ exp: epoch(soon) });

    // A key that expires after the grace: the grace, for the replaced secret only.
    const month = await make(inMonth);
    const monthRenewed = await rotate(month.id, 60);
    expect(await introspect(app, month.key, as(auditor))).toMatchObject({ exp: monthRenewed.graceEnds });
    expect(await introspect(app, monthRenewed.key, as(auditor))).toMatchObject({ exp: epoch(inMonth) });
  });

  it('gives an API key secret the iat of its own issue: the key’s creation, or the rotation that made it', async () => {
    const user = await registerUser(app, 'keyissued');
    const epoch = (iso: string) => Math.floor(Date.parse(iso) / 1000);
    const rotate = async (id: string, payload: Record<string, unknown>) => {
      const res = await app.inject({
        method: 'POST',
        url: `/v1/api-keys/${id}/rotate`,
        headers: bearer(user.accessToken),
        payload,
      });
      expect(res.statusCode, res.body).toBe(200);
      // The rotation's moment, as the key's row says it.
      return { key: res.json().key as string, at: epoch(res.json().updated_at) };
    };
    const iat = async (key: string) => {
      const answer = await introspect(app, key, as(auditor));
      expect(answer.active, JSON.stringify(answer)).toBe(true);
      return answer.iat;
    };
    const first = await createKey(app, user.accessToken, { scopes: ['account:read'] });
    const created = epoch(first.created_at);
    expect(await iat(first.key)).toBe(created);
    let moved = 0;
    try {
      clock.advance(120);
      moved += 120;
      const second = await rotate(first.id, { grace_seconds: 3600 });
      expect(second.at).toBeGreaterThanOrEqual(created + 120);
      // The new secret was issued by the rotation; the one it replaced, in its grace, at the key's creation.
      expect(await iat(second.key)).toBe(second.at);
      expect(await iat(first.key)).toBe(created);
      clock.advance(60);
      moved += 60;
      const third = await rotate(first.id, { grace_seconds: 600, force: true });
      expect(await iat(third.key)).toBe(third.at);
      // Replaced in its turn: still the rotation that issued it, not the key's creation.
      expect(await iat(second.key)).toBe(second.at);
      expect(await introspect(app, first.key, as(auditor))).toEqual({ active: false });
    } finally {
      clock.advance(-moved);
    }
  });

  it('needs an authenticated caller: 401 invalid_client without one, 401 insufficient_scope for a bearer lacking the permission', async () => {
    const own = await clientToken(app, mine);
    const anonymous = await form(app, '/oauth/introspect', { token: own.access_token });
    expect(anonymous.statusCode).toBe(401);
    expect(anonymous.json().error).toBe('invalid_client');
    expect(anonymous.headers['www-authenticate']).toMatch(/Basic/);
    const wrong = await form(
      app,
      '/oauth/introspect',
      { token: own.access_token },
      basic(mine.client_id, 'pcs_x'),
    );
    expect(wrong.statusCode).toBe(401);
    const user = await registerUser(app, 'nosy');
    const nosy = await form(app, '/oauth/introspect', { token: own.access_token }, bearer(user.accessToken));
    // RFC 7662 §2.3: 401 as in RFC 6750 §3, with the challenge naming the permission.
    expect(nosy.statusCode).toBe(401);
    expect(nosy.json().error).toBe('insufficient_scope');
    expect(nosy.headers['www-authenticate']).toBe(
      'Bearer realm="paservices", error="insufficient_scope", scope="tokens:introspect"',
    );
    const badBearer = await form(
      app,
      '/oauth/introspect',
      { token: own.access_token },
      bearer('not-a-token'),
    );
    expect(badBearer.statusCode).toBe(401);
    expect(badBearer.json().error).toBe('invalid_token');
    const noToken = await form(app, '/oauth/introspect', {}, as(mine));
    expect(noToken.statusCode).toBe(400);
    expect(noToken.json().error).toBe('invalid_request');
  });
});

describe('POST /oauth/revoke', () => {
  let app: FastifyInstance;
  let admin: TestUser;
  let mine: CreatedClient;
  let theirs: CreatedClient;
  let auditor: CreatedClient;

  beforeAll(async () => {
    app = await buildTestApp();
    admin = await createAdmin(app);
    mine = await createClient(app, admin.accessToken, { scopes: ['users:read'] });
    theirs = await createClient(app, admin.accessToken, { scopes: ['users:read'] });
    auditor = await createClient(app, admin.accessToken, { scopes: ['tokens:introspect'] });
  });

  const as = (c: CreatedClient) => basic(c.client_id, c.client_secret);
  const revoke = (params: Record<string, string>, headers: Record<string, string> = {}) =>
    form(app, '/oauth/revoke', params, headers);
  const active = async (t: string) => (await introspect(app, t, as(auditor))).active;

  it('revokes the caller’s own access token by jti; this service refuses it at once', async () => {
    const own = await clientToken(app, mine);
    const res = await revoke({ token: own.access_token, token_type_hint: 'access_token' }, as(mine));
    expect(res.statusCode).toBe(200);
    expect(res.body).toBe('');
    expect(res.headers['cache-control']).toBe('no-store');
    expect(await active(own.access_token)).toBe(false);
    const used = await form(app, '/oauth/introspect', { token: 'x' }, bearer(own.access_token));
    expect(used.statusCode).toBe(401);
    expect(used.json().error).toBe('invalid_token');
    expect(app.services.revocations.isRevoked({ jti: decodeJwt(own.access_token).jti })).toBe(true);
    const audit = await app.services.audit.list({
      type: 'access_token.revoked',
      actorId: mine.client_id,
      limit: 10,
    });
    expect(audit).toHaveLength(1);
    // Under the client's id, as everything else about the client is audited.
    expect(audit[0]).toMatchObject({ subjectId: mine.id, data: { client_id: mine.client_id } });
  });

  it('refuses a live token issued to someone else (RFC 7009 §2.1: 400 unauthorized_client, nothing revoked); 200 for unknown tokens', async () => {
    const other = await clientToken(app, theirs);
    const user = await registerUser(app, 'not-yours');
    const key = await app.inject({
      method: 'POST',
      url: '/v1/api-keys',
      headers: bearer(user.accessToken),
      payload: { name: 'not yours', scopes: ['account:read'] },
    });
    for (const t of [other.access_token, user.accessToken, user.refreshToken]) {
      const res = await revoke({ token: t }, as(mine));
      expect(res.statusCode, res.body).toBe(400);
      expect(res.json()).toMatchObject({ error: 'unauthorized_client' });
      expect(res.headers['cache-control']).toBe('no-store');
    }
    // A session that has ended: nothing to revoke, and nothing said of whose it was.
    const ended = await registerUser(app, 'not-yours-ended');
    await app.inject({ method: 'POST', url: '/v1/auth/logout', headers: bearer(ended.accessToken) });
    // An API key is a user's, never a client's: not even looked at for a client (a 400 would tell it
    // the key is live).
    for (const t of ['unknown', 'pak_nope', 'a.b.c', ended.refreshToken, key.json().key]) {
      const res = await revoke({ token: t }, as(mine));
      expect(res.statusCode, t).toBe(200);
    }
    expect(await active(other.access_token)).toBe(true);
    expect(await active(user.accessToken)).toBe(true);
    expect(await active(user.refreshToken)).toBe(true);
    expect(await active(key.json().key)).toBe(true);
  });

  it('revokes a refresh token’s whole session, even with a wrong hint and without client authentication', async () => {
    const user = await registerUser(app, 'revoke-refresh');
    const res = await revoke({ token: user.refreshToken, token_type_hint: 'access_token' });
    expect(res.statusCode).toBe(200);
    expect(await active(user.refreshToken)).toBe(false);
    // The session's access token is refused too.
    expect(await active(user.accessToken)).toBe(false);
    const refresh = await form(app, '/oauth/token', {
      grant_type: 'refresh_token',
      refresh_token: user.refreshToken,
    });
    expect(refresh.json().error).toBe('invalid_grant');
  });

  it('lets a user revoke their own tokens and API keys with their bearer token, not others’', async () => {
    const user = await registerUser(app, 'self-revoke');
    const other = await registerUser(app, 'bystander');
    const created = await app.inject({
      method: 'POST',
      url: '/v1/api-keys',
      headers: bearer(user.accessToken),
      payload: { name: 'to revoke', scopes: ['account:read'] },
    });
    expect(created.statusCode, created.body).toBe(201);
    const key = created.json().key as string;

    expect((await revoke({ token: key }, bearer(other.accessToken))).statusCode).toBe(400);
    expect(await active(key)).toBe(true);
    expect(
      (await revoke({ token: key, token_type_hint: 'refresh_token' }, bearer(user.accessToken))).statusCode,
    ).toBe(200);
    expect(await active(key)).toBe(false);
    const me = await app.inject({ method: 'GET', url: '/v1/auth/me', headers: { 'x-api-key': key } });
    expect(me.statusCode).toBe(401);

    expect((await revoke({ token: other.accessToken }, bearer(user.accessToken))).statusCode).toBe(400);
    expect(await active(other.accessToken)).toBe(true);
  });

  it('refuses Basic and X-API-Key together (invalid_request) instead of ignoring the key', async () => {
    const user = await registerUser(app, 'basic-and-key');
    const created = await app.inject({
      method: 'POST',
      url: '/v1/api-keys',
      headers: bearer(user.accessToken),
      payload: { name: 'beside basic', scopes: ['account:read'] },
    });
    expect(created.statusCode, created.body).toBe(201);
    const both = { ...as(mine), 'x-api-key': created.json().key as string };
    for (const url of ['/oauth/revoke', '/oauth/introspect']) {
      const res = await form(app, url, { token: user.accessToken }, both);
      expect(res.statusCode, url).toBe(400);
      expect(res.json().error).toBe('invalid_request');
    }
    const token = await form(app, '/oauth/token', { grant_type: 'client_credentials' }, both);
    expect(token.statusCode).toBe(400);
    expect(token.json().error).toBe('invalid_request');
    expect(await active(user.accessToken)).toBe(true); // the revocation did not happen
    // An empty X-API-Key counts as absent, as on /v1.
    const empty = await form(app, '/oauth/revoke', { token: 'unknown' }, { ...as(mine), 'x-api-key': '' });
    expect(empty.statusCode).toBe(200);
  });

  it('refuses two Authorization headers (invalid_request) instead of acting for the first, which Node alone keeps', async () => {
    const user = await registerUser(app, 'two-authorizations');
    const own = await clientToken(app, mine);
    const two = (...values: string[]) => ({ authorization: values as unknown as string });
    // Each first header alone would be obeyed: `mine` revoking its token, the user theirs, the
    // auditor seeing `theirs`'s token, `mine` getting a token.
    const cases: Array<[string, Record<string, string>, Record<string, string>]> = [
      ['/oauth/revoke', { token: own.access_token }, two(as(mine).authorization, as(theirs).authorization)],
      [
        '/oauth/revoke',
        { token: user.accessToken },
        two(bearer(user.accessToken).authorization, as(mine).authorization),
      ],
      [
        '/oauth/introspect',
        { token: own.access_token },
        two(as(auditor).authorization, as(mine).authorization),
      ],
      [
        '/oauth/token',
        { grant_type: 'client_credentials' },
        two(as(mine).authorization, as(mine).authorization),
      ],
    ];
    for (const [url, params, headers] of cases) {
      const res = await form(app, url, params, headers);
      expect(res.statusCode, `${url} ${res.body}`).toBe(400);
      expect(res.json()).toEqual({
        error: 'invalid_request',
        error_description:
          'Send one Authorization header: with several, which one counts is left open (RFC 9110 5.3)',
      });
      expect(res.headers['cache-control']).toBe('no-store');
    }
    expect(await active(own.access_token)).toBe(true);
    expect(await active(user.accessToken)).toBe(true);
  });

  it('refuses bad client credentials with invalid_client and a missing token with invalid_request', async () => {
    const own = await clientToken(app, mine);
    const wrong = await revoke({ token: own.access_token }, basic(mine.client_id, theirs.client_secret));
    expect(wrong.statusCode).toBe(401);
    expect(wrong.json().error).toBe('invalid_client');
    expect(await active(own.access_token)).toBe(true);
    const missing = await revoke({}, as(mine));
    expect(missing.statusCode).toBe(400);
    expect(missing.json().error).toBe('invalid_request');
  });
});

describe('revocation reaches every instance within 1 s', () => {
  const databaseUrl = inject('databaseUrl');
  const silent = pino({ level: 'silent' });
  let a: FastifyInstance;
  let b: FastifyInstance;
  const handles: DatabaseHandle[] = [];

  beforeAll(async () => {
    for (let i = 0; i < 2; i++) {
      const database = databaseUrl
        ? await openDatabase({ url: databaseUrl, dataDir: '.data/test', logger: silent, migrate: true })
        : await testDatabase();
      if (databaseUrl) handles.push(database);
      const app = await buildApp({ config: testConfig(), database, logger: silent });
      await app.ready();
      if (i === 0) a = app;
      else b = app;
    }
  });
  afterAll(async () => {
    await Promise.all([a?.close(), b?.close()]);
    await Promise.all(handles.map((h) => h.close()));
  });

  it('revoked on one instance, the access token is refused by the other', async () => {
    const admin = await createAdmin(a);
    const client = await createClient(a, admin.accessToken, { scopes: ['tokens:introspect'] });
    const { access_token } = await clientToken(a, client);
    const useOn = (app: FastifyInstance) =>
      form(app, '/oauth/introspect', { token: 'x' }, bearer(access_token)).then((r) => r.statusCode);
    expect(await useOn(b)).toBe(200);
    const res = await form(
      a,
      '/oauth/revoke',
      { token: access_token },
      basic(client.client_id, client.client_secret),
    );
    expect(res.statusCode).toBe(200);
    const start = performance.now();
    while ((await useOn(b)) !== 401) {
      expect(performance.now() - start).toBeLessThan(1000);
      await sleep(25);
    }
    expect(await useOn(a)).toBe(401);
  });
});
