import Fastify, { type FastifyInstance } from 'fastify';
import { decodeProtectedHeader, generateKeyPair, SignJWT } from 'jose';
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from 'vitest';
import {
  type AccessTokenClaims,
  createVerifier,
  type FetchLike,
  fastifyVerifier,
  InvalidTokenError,
  MAX_RESPONSE_BYTES,
  requirePermission,
  STALE_KEYS_MAX_AGE_MS,
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

/**
 * An access token of the service's shape signed with `key`, not the service's, under `kid`: issued
 * now or at `iat`, by ISSUER or `iss`, valid for the next 5 minutes.
 */
function forgedToken(
  key: Parameters<SignJWT['sign']>[0],
  kid: string,
  claims: { iss?: string; iat?: number } = {},
) {
  const now = Math.floor(Date.now() / 1000);
  return new SignJWT({ client_id: 'x', scope: 'users:read' })
    .setProtectedHeader({ alg: 'ES256', typ: 'at+jwt', kid })
    .setIssuer(claims.iss ?? ISSUER)
    .setSubject('x')
    .setAudience(ORDERS)
    .setIssuedAt(claims.iat ?? now)
    .setJti('j')
    .setExpirationTime(now + 300)
    .sign(key);
}

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
    // Signed with a key of its own under the service's key id.
    const { kid } = decodeProtectedHeader((await clientToken(auth, reader)).access_token);
    const forged = await forgedToken(privateKey, kid!);
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
    // A token outside RFC 6750's b64token syntax is a token, and not a valid one.
    const oddToken = await call('/orders', { authorization: 'Bearer a!b' });
    expect(oddToken.statusCode).toBe(401);
    expect(oddToken.headers['www-authenticate']).toBe('Bearer realm="api", error="invalid_token"');
  });

  it('refuses what the auth service itself refuses under its own key: iat ahead of the leeway, sub or jti not strings', async () => {
    // Signed with the service's active key, as only a leaked key or an issuer fault could: the
    // service issues none of these, and refuses them itself (tokens.service verifySignature).
    const key = auth.services.keys.activeKey();
    const now = Math.floor(Date.now() / 1000);
    const signed = (claims: Record<string, unknown>) =>
      new SignJWT({
        iss: ISSUER,
        sub: reader.client_id,
        aud: ORDERS,
        iat: now,
        exp: now + 300,
        jti: 'j',
        client_id: reader.client_id,
        scope: 'users:read',
        ...claims,
      })
        .setProtectedHeader({ alg: key.alg, kid: key.kid, typ: 'at+jwt' })
        .sign(key.privateKey);
    // The same key, the right claims: accepted, so what follows is refused for its claim alone.
    const good = await call('/orders', bearer(await signed({})));
    expect(good.statusCode, good.body).toBe(200);
    // Within the 30 s leeway, as a clock a little ahead would make it: accepted.
    expect((await call('/orders', bearer(await signed({ iat: now + 20 })))).statusCode).toBe(200);
    for (const claims of [{ iat: now + 3600 }, { iat: now + 60 }, { sub: 42 }, { jti: ['j'] }]) {
      const res = await call('/orders', bearer(await signed(claims)));
      expect(res.statusCode, JSON.stringify(claims)).toBe(401);
      expect(res.headers['www-authenticate']).toBe('Bearer realm="api", error="invalid_token"');
    }
  });

  it('challenges a request without Bearer credentials without an error code, and a malformed Bearer header with invalid_request (RFC 6750 §3.1)', async () => {
    // Another scheme, or an empty header: no authentication information, so no error code.
    for (const authorization of [
      `Basic ${Buffer.from('a:b').toString('base64')}`,
      'Negotiate abc',
      'Bearerx y',
      '',
    ]) {
      const res = await call('/orders', { authorization });
      expect(res.statusCode, authorization).toBe(401);
      expect(res.headers['www-authenticate'], authorization).toBe('Bearer realm="api"');
      expect(res.json(), authorization).toMatchObject({ status: 401, code: 'authentication_required' });
    }
    // The Bearer scheme without one token: a malformed request.
    for (const authorization of ['Bearer', 'Bearer ', 'bearer \t', 'Bearer a b']) {
      const res = await call('/orders', { authorization });
      expect(res.statusCode, authorization).toBe(400);
      expect(res.headers['www-authenticate'], authorization).toBe(
        'Bearer realm="api", error="invalid_request"',
      );
      expect(res.headers['content-type']).toContain('application/problem+json');
      expect(res.json(), authorization).toMatchObject({ status: 400, code: 'invalid_request' });
    }
  });

  it('refuses two Authorization headers with invalid_request rather than verifying the first (RFC 9110 §5.3)', async () => {
    const readerToken = (await clientToken(auth, reader)).access_token;
    const writerToken = (await clientToken(auth, writer)).access_token;
    // Node keeps the first Authorization header and drops the rest: the route would act for it alone.
    for (const authorization of [
      [`Bearer ${readerToken}`, `Bearer ${writerToken}`],
      [`Bearer ${readerToken}`, `Bearer ${readerToken}`],
      [`Bearer ${readerToken}`, 'Basic Og=='],
      ['Basic Og==', `Bearer ${readerToken}`],
    ]) {
      const res = await orders.inject({
        method: 'GET',
        url: '/orders',
        headers: { authorization: authorization as unknown as string },
      });
      expect(res.statusCode).toBe(400);
      expect(res.headers['www-authenticate']).toBe('Bearer realm="api", error="invalid_request"');
      expect(res.json()).toMatchObject({ status: 400, code: 'invalid_request' });
    }
  });

  it('never lets an error answer be stored (Cache-Control: no-store and Pragma), as the auth service does', async () => {
    const writerToken = (await clientToken(auth, writer)).access_token;
    // A verifier whose auth service is down: the 503.
    const down = Fastify();
    await down.register(fastifyVerifier, {
      issuer: ISSUER,
      audience: ORDERS,
      fetch: async () => new Response('nope', { status: 502 }),
    });
    down.get('/x', { onRequest: requirePermission('users:read') }, async () => ({ ok: true }));
    try {
      const answers: Array<[number, Awaited<ReturnType<typeof call>>]> = [
        [401, await call('/orders')],
        [401, await call('/orders', bearer('not.a.token'))],
        [400, await call('/orders', { authorization: 'Bearer a b' })],
        [403, await call('/orders', bearer(writerToken))],
        [503, await down.inject({ method: 'GET', url: '/x', headers: bearer(writerToken) })],
      ];
      for (const [status, res] of answers) {
        expect(res.statusCode, res.body).toBe(status);
        expect(res.headers['content-type'], res.body).toContain('application/problem+json');
        expect(res.headers['cache-control'], `${status}`).toBe('no-store');
        expect(res.headers.pragma, `${status}`).toBe('no-cache');
      }
    } finally {
      await down.close();
    }
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

  describe('when discovery fails', () => {
    afterEach(() => {
      vi.restoreAllMocks();
    });

    it.each([
      ['502', () => new Response('<html>502 Bad Gateway</html>', { status: 502 })],
      ['another issuer', () => Response.json({ issuer: 'https://elsewhere.test', jwks_uri: ISSUER })],
      // The right metadata, and more than a discovery document ever weighs: not read whole.
      [
        'over MAX_RESPONSE_BYTES',
        () =>
          Response.json({
            issuer: ISSUER,
            jwks_uri: `${ISSUER}/.well-known/jwks.json`,
            padding: 'x'.repeat(MAX_RESPONSE_BYTES),
          }),
      ],
    ])(
      'a failed discovery (%s) is asked again after 5 s, not by every request meanwhile',
      async (_label, answer) => {
        const state = { broken: true, discoveries: 0 };
        const real = injectFetch(auth);
        const fetch: FetchLike = async (input, init) => {
          if (new URL(input).pathname.startsWith('/.well-known/openid-configuration')) {
            state.discoveries++;
            if (state.broken) return answer();
          }
          return real(input, init);
        };
        const service = Fastify();
        await service.register(fastifyVerifier, { issuer: ISSUER, audience: ORDERS, fetch });
        service.get('/x', { onRequest: requirePermission('users:read') }, async () => ({ ok: true }));
        const { access_token } = await clientToken(auth, reader);
        const get = () => service.inject({ method: 'GET', url: '/x', headers: bearer(access_token) });
        try {
          for (let i = 0; i < 20; i++) {
            const res = await get();
            expect(res.statusCode, res.body).toBe(503);
            expect(res.json()).toMatchObject({ code: 'verifier_unavailable' });
          }
          // One request to the auth service for the twenty: the rest were answered from the failure.
          expect(state.discoveries).toBe(1);

          // After the 5 s it is asked again, and the keys are back.
          state.broken = false;
          vi.spyOn(Date, 'now').mockReturnValue(Date.now() + 6_000);
          const res = await get();
          expect(res.statusCode, res.body).toBe(200);
          expect(state.discoveries).toBe(2);
        } finally {
          await service.close();
        }
      },
    );
  });

  describe('when the JWKS cannot be fetched', () => {
    // What a load balancer or a broken deployment answers for the key set instead of the keys.
    const failures: Array<[string, () => Response]> = [
      [
        '502 with an HTML page',
        () =>
          new Response('<html><body><h1>502 Bad Gateway</h1></body></html>', {
            status: 502,
            headers: { 'content-type': 'text/html' },
          }),
      ],
      ['503 with no body', () => new Response(null, { status: 503 })],
      [
        '200 with a body that is not JSON',
        () =>
          new Response('<html>maintenance</html>', { status: 200, headers: { 'content-type': 'text/html' } }),
      ],
      // The service's keys, and more than a key set ever weighs: not read whole.
      [
        '200 with a key set over MAX_RESPONSE_BYTES',
        () =>
          Response.json({
            ...(JSON.parse(auth.services.keys.jwks()) as object),
            padding: 'x'.repeat(MAX_RESPONSE_BYTES),
          }),
      ],
      [
        '200 with JSON that is not a key set',
        () =>
          new Response('{"error":"upstream"}', {
            status: 200,
            headers: { 'content-type': 'application/json' },
          }),
      ],
    ];
    const JWKS_PATH = '/.well-known/jwks.json';
    /** The auth service, except that the JWKS answers `broken()` whenever one is set. */
    const flaky = () => {
      const state: { broken: (() => Response) | undefined; jwksRequests: number } = {
        broken: undefined,
        jwksRequests: 0,
      };
      const real = injectFetch(auth);
      const fetch: FetchLike = async (input, init) => {
        if (new URL(input).pathname === JWKS_PATH) {
          state.jwksRequests++;
          if (state.broken) return state.broken();
        }
        return real(input, init);
      };
      return { state, fetch };
    };
    afterEach(() => {
      vi.restoreAllMocks();
    });

    it.each(failures)(
      'never fetched: %s is a 503 (VerifierUnavailableError), not an invalid token',
      async (_label, answer) => {
        const { state, fetch } = flaky();
        state.broken = answer;
        const verifier = createVerifier({ issuer: ISSUER, audience: ORDERS, fetch });
        const { access_token } = await clientToken(auth, reader);
        await expect(verifier.verify(access_token)).rejects.toBeInstanceOf(VerifierUnavailableError);

        const service = Fastify();
        await service.register(fastifyVerifier, { verifier });
        service.get('/x', { onRequest: requirePermission('users:read') }, async () => ({ ok: true }));
        const res = await service.inject({ method: 'GET', url: '/x', headers: bearer(access_token) });
        expect(res.statusCode, res.body).toBe(503);
        expect(res.headers['www-authenticate']).toBeUndefined();
        expect(res.json()).toMatchObject({ status: 503, code: 'verifier_unavailable' });
        await service.close();

        // With no keys in hand, a failure is not asked again for 5 s: requests meanwhile are 503
        // without another fetch each.
        const asked = state.jwksRequests;
        state.broken = undefined;
        await expect(verifier.verify(access_token)).rejects.toBeInstanceOf(VerifierUnavailableError);
        expect(state.jwksRequests).toBe(asked);
        // Then the keys are fetched again, and the same token verifies.
        vi.spyOn(Date, 'now').mockReturnValue(Date.now() + 6_000);
        expect((await verifier.verify(access_token)).sub).toBe(reader.client_id);
        expect(state.jwksRequests).toBe(asked + 1);
      },
    );

    it.each(failures)(
      'fetched before: a refetch answered %s keeps verifying with the last good keys',
      async (_label, answer) => {
        const long = await createClient(auth, admin.accessToken, {
          scopes: ['users:read'],
          audiences: [ORDERS],
          access_token_ttl: 3 * 3600,
        });
        const { state, fetch } = flaky();
        const verifier = createVerifier({ issuer: ISSUER, audience: ORDERS, fetch });
        const { access_token } = await clientToken(auth, long);
        expect((await verifier.verify(access_token)).sub).toBe(long.client_id);
        expect(state.jwksRequests).toBe(1);

        // Past jose's 10-minute cache: the next verification refetches, and the refetch fails.
        state.broken = answer;
        const start = Date.now();
        const now = vi.spyOn(Date, 'now').mockReturnValue(start + 11 * 60_000);
        expect((await verifier.verify(access_token)).sub).toBe(long.client_id);
        expect(state.jwksRequests).toBe(2);
        // Within the backoff, no request waits for another refetch.
        expect((await verifier.verify(access_token)).sub).toBe(long.client_id);
        expect(state.jwksRequests).toBe(2);
        // A kid the last good set does not know cannot be decided while the keys cannot be fetched.
        const unknownKid = `${Buffer.from(JSON.stringify({ alg: 'ES256', typ: 'at+jwt', kid: 'not-yet-seen' })).toString('base64url')}.${access_token.split('.').slice(1).join('.')}`;
        await expect(verifier.verify(unknownKid)).rejects.toBeInstanceOf(VerifierUnavailableError);

        // After the backoff it asks again; the keys are back, and are used.
        now.mockReturnValue(start + 12 * 60_000);
        state.broken = undefined;
        expect((await verifier.verify(access_token)).sub).toBe(long.client_id);
        expect(state.jwksRequests).toBeGreaterThanOrEqual(3);

        // The last good keys are not used for ever: past STALE_KEYS_MAX_AGE_MS after their fetch, 503.
        state.broken = answer;
        now.mockReturnValue(start + 12 * 60_000 + STALE_KEYS_MAX_AGE_MS + 60_000);
        await expect(verifier.verify(access_token)).rejects.toBeInstanceOf(VerifierUnavailableError);
      },
    );
  });

  describe('a key id the fetched key set does not hold', () => {
    const JWKS_PATH = '/.well-known/jwks.json';
    afterEach(() => {
      vi.restoreAllMocks();
    });

    it('is a 503 within 30 s of a fetch (it may be a key published since), then decided by a refetch', async () => {
      const { access_token } = await clientToken(auth, reader);
      const { kid } = decodeProtectedHeader(access_token);
      const { privateKey } = await generateKeyPair('ES256');
      const forged = await forgedToken(privateKey, 'never-published');
      // The set as fetched before the token's key was published (a forced rotation signs at once).
      const state = { hideKid: true as boolean, broken: false, jwksRequests: 0 };
      const real = injectFetch(auth);
      const fetch: FetchLike = async (input, init) => {
        if (new URL(input).pathname !== JWKS_PATH) return real(input, init);
        state.jwksRequests++;
        if (state.broken) return new Response(null, { status: 502 });
        const res = await real(input, init);
        if (!state.hideKid) return res;
        const { keys } = (await res.json()) as { keys: Array<{ kid: string }> };
        return Response.json({ keys: keys.filter((k) => k.kid !== kid) });
      };
      const verifier = createVerifier({ issuer: ISSUER, audience: ORDERS, fetch });
      // Fetched just now and not there: not a key of the service's.
      await expect(verifier.verify(forged)).rejects.toBeInstanceOf(InvalidTokenError);
      expect(state.jwksRequests).toBe(1);
      // Within jose's 30 s cooldown nothing is refetched: the good token is not called invalid.
      await expect(verifier.verify(access_token)).rejects.toBeInstanceOf(VerifierUnavailableError);
      expect(state.jwksRequests).toBe(1);
      const service = Fastify();
      await service.register(fastifyVerifier, { verifier });
      service.get('/x', { onRequest: requirePermission('users:read') }, async () => ({ ok: true }));
      const res = await service.inject({ method: 'GET', url: '/x', headers: bearer(access_token) });
      expect(res.statusCode, res.body).toBe(503);
      expect(res.headers['retry-after']).toBeDefined();
      await service.close();

      // Only a token that may be signed by a key published since gets the 503: this issuer's, issued
      // after the fetch. Another issuer's, or one issued well before the fetch, is decided at once.
      const nowS = Math.floor(Date.now() / 1000);
      for (const claims of [
        { iss: 'https://another-issuer.test', iat: nowS },
        { iss: ISSUER, iat: nowS - 3600 },
      ])
        await expect(
          verifier.verify(await forgedToken(privateKey, 'never-published', claims)),
        ).rejects.toBeInstanceOf(InvalidTokenError);
      expect(state.jwksRequests).toBe(1);

      // Past it, the set is fetched again and has the key.
      state.hideKid = false;
      const start = Date.now();
      const now = vi.spyOn(Date, 'now').mockReturnValue(start + 31_000);
      expect((await verifier.verify(access_token)).sub).toBe(reader.client_id);
      expect(state.jwksRequests).toBe(2);
      now.mockReturnValue(start + 62_000);
      await expect(verifier.verify(forged)).rejects.toBeInstanceOf(InvalidTokenError);
      expect(state.jwksRequests).toBe(3);

      // A refetch that fails, asked for by a key id while the cached set is still fresh, is not
      // asked again by each request that follows; the keys in hand go on verifying.
      state.broken = true;
      now.mockReturnValue(start + 95_000);
      await expect(verifier.verify(forged)).rejects.toBeInstanceOf(VerifierUnavailableError);
      expect(state.jwksRequests).toBe(4);
      for (let i = 0; i < 20; i++)
        await expect(verifier.verify(forged)).rejects.toBeInstanceOf(VerifierUnavailableError);
      expect((await verifier.verify(access_token)).sub).toBe(reader.client_id);
      expect(state.jwksRequests).toBe(4);
    });

    it('is a 401 at once when the kid is one the set holds (under another algorithm) or not a key id at all', async () => {
      const { access_token } = await clientToken(auth, reader);
      const { kid, alg } = decodeProtectedHeader(access_token);
      const verifier = createVerifier({ issuer: ISSUER, audience: ORDERS, fetch: injectFetch(auth) });
      expect((await verifier.verify(access_token)).sub).toBe(reader.client_id);
      // Within the cooldown, issued now, by this issuer: only the key named decides. A kid the set
      // holds is no key published since (kids are never reused), nor is a kid that is not a string.
      const other = alg === 'ES256' ? 'EdDSA' : 'ES256';
      const { privateKey } = await generateKeyPair(other, { crv: 'Ed25519' });
      const now = Math.floor(Date.now() / 1000);
      const token = (header: { alg: string; kid: unknown }) =>
        new SignJWT({ client_id: 'x', scope: 'users:read' })
          .setProtectedHeader({ typ: 'at+jwt', ...header } as { alg: string })
          .setIssuer(ISSUER)
          .setSubject('x')
          .setAudience(ORDERS)
          .setIssuedAt(now)
          .setJti('j')
          .setExpirationTime(now + 300)
          .sign(privateKey);
      for (const header of [
        { alg: other, kid },
        { alg: other, kid: [kid] },
        { alg: other, kid: { id: kid } },
      ])
        await expect(verifier.verify(await token(header)), JSON.stringify(header)).rejects.toBeInstanceOf(
          InvalidTokenError,
        );
    });

    it('staleKeysMaxAgeMs bounds how long the last keys verify in an outage (0: not at all)', async () => {
      const { access_token } = await clientToken(auth, reader);
      const state = { broken: false };
      const real = injectFetch(auth);
      const fetch: FetchLike = async (input, init) =>
        state.broken && new URL(input).pathname === JWKS_PATH
          ? new Response(null, { status: 502 })
          : real(input, init);
      const strict = createVerifier({ issuer: ISSUER, audience: ORDERS, fetch, staleKeysMaxAgeMs: 0 });
      const lenient = createVerifier({ issuer: ISSUER, audience: ORDERS, fetch });
      expect((await strict.verify(access_token)).sub).toBe(reader.client_id);
      expect((await lenient.verify(access_token)).sub).toBe(reader.client_id);
      state.broken = true;
      vi.spyOn(Date, 'now').mockReturnValue(Date.now() + 11 * 60_000);
      await expect(strict.verify(access_token)).rejects.toBeInstanceOf(VerifierUnavailableError);
      expect((await lenient.verify(access_token)).sub).toBe(reader.client_id);
    });
    it('staleKeysMaxAgeMs under the 10-minute cache: a refetch failed for an unknown kid stops no fresh key verifying', async () => {
      const { access_token } = await clientToken(auth, reader);
      const { privateKey } = await generateKeyPair('ES256');
      const state = { broken: false, jwksRequests: 0 };
      const real = injectFetch(auth);
      const fetch: FetchLike = async (input, init) => {
        if (new URL(input).pathname !== JWKS_PATH) return real(input, init);
        state.jwksRequests++;
        return state.broken ? new Response(null, { status: 502 }) : real(input, init);
      };
      for (const staleKeysMaxAgeMs of [0, 60_000]) {
        const verifier = createVerifier({ issuer: ISSUER, audience: ORDERS, fetch, staleKeysMaxAgeMs });
        const start = Date.now();
        const asked = state.jwksRequests;
        expect((await verifier.verify(access_token)).sub).toBe(reader.client_id);
        // Two minutes on, the set is within jose's cache (10 minutes) but past its cooldown (30 s): a
        // token naming a key it lacks (anyone can send one) makes it refetch, and the JWKS is down.
        state.broken = true;
        const now = vi.spyOn(Date, 'now').mockReturnValue(start + 2 * 60_000);
        const unknown = await forgedToken(privateKey, 'not-in-the-set', { iat: Math.floor(start / 1000) });
        await expect(verifier.verify(unknown)).rejects.toBeInstanceOf(VerifierUnavailableError);
        expect(state.jwksRequests).toBe(asked + 2);
        // The set fetched two minutes ago is no stale set: its tokens go on verifying, as they did
        // before that request (not a 503 for everyone for 5 s after each such token).
        expect((await verifier.verify(access_token)).sub, String(staleKeysMaxAgeMs)).toBe(reader.client_id);
        // Past the cache, it is the option that decides: not at all for these values.
        now.mockReturnValue(start + 11 * 60_000);
        await expect(verifier.verify(access_token)).rejects.toBeInstanceOf(VerifierUnavailableError);
        now.mockRestore();
        state.broken = false;
      }
    });
  });

  it('pins its options: ES256/EdDSA only, at most 30 s of leeway, an audience', () => {
    const base = { issuer: ISSUER, audience: ORDERS };
    expect(() => createVerifier({ ...base, clockTolerance: 31 })).toThrow(RangeError);
    expect(() => createVerifier({ ...base, clockTolerance: -1 })).toThrow(RangeError);
    expect(() => createVerifier({ ...base, algorithms: ['HS256' as 'ES256'] })).toThrow(TypeError);
    expect(() => createVerifier({ ...base, algorithms: [] })).toThrow(TypeError);
    expect(() => createVerifier({ ...base, audience: '' })).toThrow(TypeError);
    expect(() => createVerifier({ ...base, issuer: 'not a url' })).toThrow(TypeError);
    expect(() => createVerifier({ ...base, staleKeysMaxAgeMs: -1 })).toThrow(RangeError);
    expect(() => createVerifier({ ...base, staleKeysMaxAgeMs: Number.NaN })).toThrow(RangeError);
    expect(() => createVerifier({ ...base, algorithms: ['EdDSA'], clockTolerance: 0 })).not.toThrow();
    // A timeout AbortSignal.timeout and jose refuse (or, past 2^31 - 1 ms, turn into 1 ms) is refused
    // here, not with a 503 on every request.
    for (const timeoutMs of [Number.NaN, 0, -1, 1.5, 2 ** 31, Number.POSITIVE_INFINITY])
      expect(() => createVerifier({ ...base, timeoutMs }), String(timeoutMs)).toThrow(RangeError);
    expect(() => createVerifier({ ...base, timeoutMs: 2 ** 31 - 1 })).not.toThrow();
  });

  it('refuses a bad timeoutMs at registration, instead of answering 503 to every request', async () => {
    const service = Fastify();
    try {
      const registered = await service
        .register(fastifyVerifier, {
          issuer: ISSUER,
          audience: ORDERS,
          fetch: injectFetch(auth),
          timeoutMs: 1.5,
        })
        .then(
          () => 'registered',
          (err: unknown) => err,
        );
      expect(registered).toBeInstanceOf(RangeError);
      expect(String(registered)).toContain('timeoutMs');
    } finally {
      await service.close().catch(() => undefined);
    }
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
