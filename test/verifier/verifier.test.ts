import Fastify, { type FastifyInstance } from 'fastify';
import { generateKeyPair, SignJWT } from 'jose';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  type AccessTokenClaims,
  createVerifier,
  fastifyVerifier,
  InvalidTokenError,
  requirePermission,
  VerifierUnavailableError,
} from '../../src/verifier/index.js';
import {
  basic,
  clientToken,
  type CreatedClient,
  createClient,
  createTestClock,
  form,
  introspect,
} from '../clients/helpers.js';
import { buildTestApp } from '../support/app.js';
import { createAdmin, type TestUser } from '../support/factories.js';
import { bearer, injectFetch } from '../support/http.js';

const ISSUER = 'http://auth.test';
const ORDERS = 'https://orders.test';

describe('the bundled verifier', () => {
  let auth: FastifyInstance;
  let admin: TestUser;
  let reader: CreatedClient;
  let writer: CreatedClient;
  let wildcard: CreatedClient;
  let orders: FastifyInstance;
  const clock = createTestClock();

  beforeAll(async () => {
    auth = await buildTestApp({ deps: { clock } });
    admin = await createAdmin(auth);
    reader = await createClient(auth, admin.accessToken, { scopes: ['users:read'], audiences: [ORDERS] });
    writer = await createClient(auth, admin.accessToken, { scopes: ['audit:read'], audiences: [ORDERS] });
    wildcard = await createClient(auth, admin.accessToken, { scopes: ['users:*'], audiences: [ORDERS] });

    // The consuming service: its whole authentication is these lines.
    orders = Fastify();
    await orders.register(fastifyVerifier, { issuer: ISSUER, audience: ORDERS, fetch: injectFetch(auth) });
    orders.get('/orders', { onRequest: requirePermission('users:read') }, async (request) => ({
      sub: request.auth?.sub,
      permissions: request.auth?.permissions,
    }));
    orders.get('/both', { preHandler: requirePermission('users:read', 'audit:read') }, async () => ({
      ok: true,
    }));
    orders.get('/public', async (request) => ({ auth: request.auth }));
    await orders.ready();
  });
  afterAll(async () => {
    await orders?.close();
  });

  const call = (url: string, headers: Record<string, string> = {}) =>
    orders.inject({ method: 'GET', url, headers });

  it('protects a route: no token 401, wrong permission 403, right permission 200', async () => {
    const none = await call('/orders');
    expect(none.statusCode).toBe(401);
    expect(none.headers['www-authenticate']).toBe('Bearer realm="api"');
    expect(none.headers['content-type']).toContain('application/problem+json');
    expect(none.json()).toMatchObject({ status: 401, code: 'authentication_required' });

    const wrong = await call('/orders', bearer((await clientToken(auth, writer)).access_token));
    expect(wrong.statusCode).toBe(403);
    expect(wrong.headers['www-authenticate']).toContain('error="insufficient_scope"');
    expect(wrong.json()).toMatchObject({ status: 403, code: 'forbidden' });

    const right = await call('/orders', bearer((await clientToken(auth, reader)).access_token));
    expect(right.statusCode, right.body).toBe(200);
    expect(right.json()).toEqual({ sub: reader.client_id, permissions: ['users:read'] });

    // `users:*` covers users:read, as it does in the auth service.
    const wide = await call('/orders', bearer((await clientToken(auth, wildcard)).access_token));
    expect(wide.statusCode).toBe(200);
    // Several permissions: all are needed.
    const both = await call('/both', bearer((await clientToken(auth, reader)).access_token));
    expect(both.statusCode).toBe(403);
    // Routes without a guard are untouched.
    expect((await call('/public')).json()).toEqual({ auth: null });
  });

  it('refuses malformed, foreign, mis-typed and wrong-audience tokens with 401 invalid_token', async () => {
    const { privateKey } = await generateKeyPair('ES256');
    const forged = await new SignJWT({ client_id: 'x', scope: 'users:read' })
      .setProtectedHeader({ alg: 'ES256', typ: 'at+jwt', kid: 'forged' })
      .setIssuer(ISSUER)
      .setSubject('x')
      .setAudience(ORDERS)
      .setIssuedAt()
      .setJti('j')
      .setExpirationTime('5m')
      .sign(privateKey);
    const unsigned = `${Buffer.from('{"alg":"none","typ":"at+jwt"}').toString('base64url')}.${Buffer.from(
      JSON.stringify({
        iss: ISSUER,
        sub: 'x',
        aud: ORDERS,
        client_id: 'x',
        scope: 'users:read',
        exp: 9999999999,
      }),
    ).toString('base64url')}.`;
    // A token for this auth service itself, not for the orders service.
    const own = await createClient(auth, admin.accessToken, { scopes: ['users:read'] });
    const otherAudience = (await clientToken(auth, own)).access_token;
    for (const token of ['garbage', forged, unsigned, otherAudience, reader.client_secret]) {
      const res = await call('/orders', bearer(token));
      expect(res.statusCode, token.slice(0, 30)).toBe(401);
      expect(res.headers['www-authenticate']).toBe('Bearer realm="api", error="invalid_token"');
      expect(res.json().code).toBe('invalid_token');
    }
    const notBearer = await call('/orders', {
      authorization: `Basic ${Buffer.from('a:b').toString('base64')}`,
    });
    expect(notBearer.statusCode).toBe(401);
  });

  it('refuses an expired token', async () => {
    // Issued an hour ago by the auth service's clock: expired well past the 30 s leeway.
    clock.advance(-3600);
    let token: string;
    try {
      token = (await clientToken(auth, reader)).access_token;
    } finally {
      clock.advance(3600);
    }
    const res = await call('/orders', bearer(token));
    expect(res.statusCode).toBe(401);
    expect(res.json().detail).toBe('The access token has expired');
  });

  it('still accepts a revoked token until it expires: the offline staleness bound', async () => {
    const { access_token } = await clientToken(auth, reader);
    const revoked = await form(
      auth,
      '/oauth/revoke',
      { token: access_token },
      basic(reader.client_id, reader.client_secret),
    );
    expect(revoked.statusCode).toBe(200);
    // Introspection (the online check) knows at once...
    expect(await introspect(auth, access_token, basic(reader.client_id, reader.client_secret))).toEqual({
      active: false,
    });
    // ...the offline verifier does not: it accepts the token until `exp` (plus its leeway).
    expect((await call('/orders', bearer(access_token))).statusCode).toBe(200);
  });

  it('verifies with the plain function and returns typed claims', async () => {
    const verifier = createVerifier({ issuer: ISSUER, audience: ORDERS, fetch: injectFetch(auth) });
    const { access_token } = await clientToken(auth, reader);
    const claims: AccessTokenClaims = await verifier.verify(access_token);
    expect(claims).toMatchObject({
      iss: ISSUER,
      sub: reader.client_id,
      aud: ORDERS,
      client_id: reader.client_id,
      scope: 'users:read',
      permissions: ['users:read'],
    });
    expect(claims.roles).toBeUndefined();
    expect((await verifier.metadata()).issuer).toBe(ISSUER);

    // A user's token, for the auth service's own audience, carries roles.
    const forAuth = createVerifier({
      issuer: ISSUER,
      audience: auth.services.audience,
      fetch: injectFetch(auth),
    });
    const user = await forAuth.verify(admin.accessToken);
    expect(user.roles).toContain('admin');
    expect(user.permissions).toContain('*');
    await expect(forAuth.verify(admin.refreshToken)).rejects.toBeInstanceOf(InvalidTokenError);
  });

  it('checks the discovered issuer and fails closed when discovery fails', async () => {
    const liar = createVerifier({ issuer: 'http://auth.test/', audience: ORDERS, fetch: injectFetch(auth) });
    const { access_token } = await clientToken(auth, reader);
    await expect(liar.verify(access_token)).rejects.toBeInstanceOf(VerifierUnavailableError);

    const down = createVerifier({
      issuer: ISSUER,
      audience: ORDERS,
      fetch: async () => new Response('nope', { status: 502 }),
    });
    await expect(down.verify(access_token)).rejects.toBeInstanceOf(VerifierUnavailableError);

    const service = Fastify();
    await service.register(fastifyVerifier, { verifier: down });
    service.get('/x', { onRequest: requirePermission('users:read') }, async () => ({ ok: true }));
    const res = await service.inject({ method: 'GET', url: '/x', headers: bearer(access_token) });
    expect(res.statusCode).toBe(503);
    expect(res.headers['retry-after']).toBe('5');
    await service.close();
  });

  it('pins its options: ES256/EdDSA only, at most 30 s of leeway, an audience', () => {
    const base = { issuer: ISSUER, audience: ORDERS };
    expect(() => createVerifier({ ...base, clockTolerance: 31 })).toThrow(RangeError);
    expect(() => createVerifier({ ...base, clockTolerance: -1 })).toThrow(RangeError);
    expect(() => createVerifier({ ...base, algorithms: ['HS256' as 'ES256'] })).toThrow(TypeError);
    expect(() => createVerifier({ ...base, algorithms: [] })).toThrow(TypeError);
    expect(() => createVerifier({ ...base, audience: '' })).toThrow(TypeError);
    expect(() => createVerifier({ ...base, issuer: 'not a url' })).toThrow(TypeError);
    expect(() => createVerifier({ ...base, algorithms: ['EdDSA'], clockTolerance: 0 })).not.toThrow();
  });

  it('honours pinned algorithms: an ES256 token fails a verifier that allows EdDSA only', async () => {
    const edOnly = createVerifier({
      issuer: ISSUER,
      audience: ORDERS,
      algorithms: ['EdDSA'],
      fetch: injectFetch(auth),
    });
    const { access_token } = await clientToken(auth, reader);
    await expect(edOnly.verify(access_token)).rejects.toBeInstanceOf(InvalidTokenError);
  });
});
