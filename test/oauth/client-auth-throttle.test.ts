import type { FastifyInstance } from 'fastify';
import { beforeAll, describe, expect, it } from 'vitest';
import {
  CLIENT_AUTH_MAX_FAILURES_PER_IP_PER_MINUTE,
  CLIENT_AUTH_MAX_FAILURES_PER_MINUTE,
} from '../../src/modules/oauth/oauth.service.js';
import { REFRESH_RATE_LIMIT } from '../../src/plugins/rate-limit.js';
import { basic, type CreatedClient, createClient, createTestClock } from '../clients/helpers.js';
import { buildTestApp } from '../support/app.js';
import { createAdmin, registerUser } from '../support/factories.js';
import { bearer } from '../support/http.js';

/**
 * Failed client authentications are throttled per IP and client_id on every /oauth endpoint, so an
 * attacker with a real client_id cannot make each request write an audit row; callers that
 * authenticate are never counted, whatever their rate, and other clients behind the same address
 * (one NAT, one proxy) are not locked out by one client retrying a stale secret.
 */
describe('throttling of failed client authentication', () => {
  let app: FastifyInstance;
  let client: CreatedClient;
  /** Another client calling from the same address. */
  let neighbour: CreatedClient;
  /** A well-formed secret of `client` that no longer authenticates: a failure of a registered client. */
  let oldSecret: string;
  const clock = createTestClock();

  beforeAll(async () => {
    app = await buildTestApp({ env: { RATE_LIMIT_ENABLED: 'true' }, deps: { clock } });
    const admin = await createAdmin(app);
    client = await createClient(app, admin.accessToken, { scopes: ['tokens:introspect'] });
    neighbour = await createClient(app, admin.accessToken, { scopes: ['tokens:introspect'] });
    oldSecret = client.client_secret;
    const rotated = await app.inject({
      method: 'POST',
      url: `/v1/clients/${client.id}/secrets`,
      headers: bearer(admin.accessToken),
      payload: { grace_seconds: 0 },
    });
    expect(rotated.statusCode).toBe(201);
    client = { ...client, client_secret: rotated.json().client_secret };
  });

  const postFrom = (ip: string, url: string, secret: string, payload: string) =>
    app.inject({
      method: 'POST',
      url,
      remoteAddress: ip,
      headers: { 'content-type': 'application/x-www-form-urlencoded', ...basic(client.client_id, secret) },
      payload,
    });
  const introspectFrom = (ip: string, secret: string) =>
    postFrom(ip, '/oauth/introspect', secret, 'token=x.y.z');

  const failuresAudited = async () =>
    (
      await app.services.audit.list({
        subjectId: client.id,
        type: 'client.authentication_failed',
        limit: 100,
      })
    ).length;

  it('answers 429 with Retry-After once a client has failed too often from an IP, before any lookup or audit row', async () => {
    const attacker = '203.0.113.9';
    // The right secret has authenticated before (from elsewhere), so its header is remembered and
    // known without a parse: the throttle applies to that path too.
    expect((await introspectFrom('198.51.100.1', client.client_secret)).statusCode).toBe(200);
    const auditedBefore = await failuresAudited();
    for (let i = 0; i < CLIENT_AUTH_MAX_FAILURES_PER_MINUTE; i++) {
      const res = await introspectFrom(attacker, oldSecret);
      expect(res.statusCode).toBe(401);
    }
    for (const secret of [oldSecret, client.client_secret]) {
      const res = await introspectFrom(attacker, secret);
      expect(res.statusCode).toBe(429);
      expect(res.json()).toMatchObject({ error: 'temporarily_unavailable' });
      expect(Number(res.headers['retry-after'])).toBeGreaterThan(0);
      expect(res.headers['cache-control']).toBe('no-store');
    }
    // The same throttle guards the token and revocation endpoints.
    for (const [url, payload] of [
      ['/oauth/token', 'grant_type=client_credentials'],
      ['/oauth/revoke', 'token=x'],
    ] as const) {
      expect((await postFrom(attacker, url, client.client_secret, payload)).statusCode, url).toBe(429);
    }
    expect((await failuresAudited()) - auditedBefore).toBe(CLIENT_AUTH_MAX_FAILURES_PER_MINUTE);

    // Operators see both in the metrics.
    const metrics = (await app.inject({ method: 'GET', url: '/metrics' })).body;
    const count = (reason: string) =>
      Number(
        new RegExp(`auth_client_authentication_failures_total\\{reason="${reason}"\\} (\\d+)`).exec(
          metrics,
        )?.[1] ?? 0,
      );
    expect(count('wrong_secret')).toBeGreaterThanOrEqual(CLIENT_AUTH_MAX_FAILURES_PER_MINUTE);
    expect(count('throttled')).toBeGreaterThanOrEqual(4);

    // Another client from the same address and the same client from another address are not
    // affected, and a minute later the first may try again.
    const fromNeighbour = await app.inject({
      method: 'POST',
      url: '/oauth/introspect',
      remoteAddress: attacker,
      headers: {
        'content-type': 'application/x-www-form-urlencoded',
        ...basic(neighbour.client_id, neighbour.client_secret),
      },
      payload: 'token=x.y.z',
    });
    expect(fromNeighbour.statusCode).toBe(200);
    expect((await introspectFrom('203.0.113.10', client.client_secret)).statusCode).toBe(200);
    clock.advance(61);
    expect((await introspectFrom(attacker, client.client_secret)).statusCode).toBe(200);
  });

  it('never counts successful authentications, whatever their rate', async () => {
    const resourceServer = '198.51.100.20';
    for (let i = 0; i < CLIENT_AUTH_MAX_FAILURES_PER_MINUTE * 3; i++) {
      const res = await introspectFrom(resourceServer, client.client_secret);
      expect(res.statusCode).toBe(200);
    }
  });

  it('throttles failed client authentications per IP too, so varying the client_id does not dodge it', async () => {
    const sprayer = '203.0.113.50';
    const token = (
      ip: string,
      authorization: Record<string, string>,
      payload = 'grant_type=client_credentials',
    ) =>
      app.inject({
        method: 'POST',
        url: '/oauth/token',
        remoteAddress: ip,
        headers: { 'content-type': 'application/x-www-form-urlencoded', ...authorization },
        payload,
      });
    // A different unknown client_id each time: the per-client limit never trips.
    for (let i = 0; i < CLIENT_AUTH_MAX_FAILURES_PER_IP_PER_MINUTE; i++) {
      const res = await token(sprayer, basic(`pci_sprayed${String(i).padStart(8, '0')}`, 'pcs_wrong'));
      expect(res.statusCode, `attempt ${i}`).toBe(401);
    }
    const blocked = await token(sprayer, basic('pci_sprayedlast0', 'pcs_wrong'));
    expect(blocked.statusCode).toBe(429);
    expect(blocked.json()).toMatchObject({ error: 'temporarily_unavailable' });
    expect(Number(blocked.headers['retry-after'])).toBeGreaterThan(0);
    // Every client from that address, the right secret included, at every endpoint that authenticates
    // clients (known headers too: no oracle while throttled) — until the window ends.
    expect((await token(sprayer, basic(neighbour.client_id, neighbour.client_secret))).statusCode).toBe(429);
    expect(
      (await postFrom(sprayer, '/oauth/introspect', client.client_secret, 'token=x.y.z')).statusCode,
    ).toBe(429);
    expect((await postFrom(sprayer, '/oauth/revoke', client.client_secret, 'token=x')).statusCode).toBe(429);
    // Other addresses are unaffected.
    expect(
      (await token('203.0.113.51', basic(neighbour.client_id, neighbour.client_secret))).statusCode,
    ).toBe(200);
    clock.advance(61);
    expect((await token(sprayer, basic(neighbour.client_id, neighbour.client_secret))).statusCode).toBe(200);
  });

  it('counts an IPv6 client’s failures by its /64, whichever of its addresses they come from', async () => {
    clock.advance(61);
    const fromBlock = (i: number) => `2001:db8:50:7::${(i + 1).toString(16)}`;
    for (let i = 0; i < CLIENT_AUTH_MAX_FAILURES_PER_MINUTE; i++) {
      const res = await introspectFrom(fromBlock(i), i % 2 ? 'pcs_wrong' : oldSecret);
      expect(res.statusCode, `attempt ${i}`).toBe(401);
    }
    const blocked = await postFrom(fromBlock(1000), '/oauth/introspect', client.client_secret, 'token=x.y.z');
    expect(blocked.statusCode).toBe(429);
    // The next /64 is another client.
    const next = await postFrom('2001:db8:50:8::1', '/oauth/introspect', client.client_secret, 'token=x.y.z');
    expect(next.statusCode).toBe(200);
  });

  it('takes client_credentials tokens from one IP at any rate: only failures are counted', async () => {
    const service = '198.51.100.30';
    for (let i = 0; i < REFRESH_RATE_LIMIT.max + 10; i++) {
      const res = await app.inject({
        method: 'POST',
        url: '/oauth/token',
        remoteAddress: service,
        headers: {
          'content-type': 'application/x-www-form-urlencoded',
          ...basic(neighbour.client_id, neighbour.client_secret),
        },
        payload: 'grant_type=client_credentials',
      });
      expect(res.statusCode, `request ${i}`).toBe(200);
    }
  });

  it('spends one per-IP refresh budget across /v1/auth/refresh and the refresh_token grant', async () => {
    const user = await registerUser(app, 'refresh-budget');
    const ip = '198.51.100.40';
    const grant = (refreshToken: string) =>
      app.inject({
        method: 'POST',
        url: '/oauth/token',
        remoteAddress: ip,
        headers: { 'content-type': 'application/x-www-form-urlencoded' },
        payload: `grant_type=refresh_token&refresh_token=${refreshToken}`,
      });
    const half = REFRESH_RATE_LIMIT.max / 2;
    // Garbage refresh tokens at the grant, then at /v1/auth/refresh: one budget.
    for (let i = 0; i < half; i++) expect((await grant(`prt_garbage${i}`)).statusCode).toBe(400);
    for (let i = 0; i < REFRESH_RATE_LIMIT.max - half; i++) {
      const res = await app.inject({
        method: 'POST',
        url: '/v1/auth/refresh',
        remoteAddress: ip,
        payload: { refresh_token: `prt_garbage${i}` },
      });
      expect(res.statusCode).toBe(401);
    }
    const api = await app.inject({
      method: 'POST',
      url: '/v1/auth/refresh',
      remoteAddress: ip,
      payload: { refresh_token: user.refreshToken },
    });
    expect(api.statusCode).toBe(429);
    expect(api.headers['content-type']).toContain('application/problem+json');
    const oauth = await grant(user.refreshToken);
    expect(oauth.statusCode).toBe(429);
    expect(oauth.json()).toMatchObject({ error: 'temporarily_unavailable' });
    expect(Number(oauth.headers['retry-after'])).toBeGreaterThan(0);
    // client_credentials from that address does not spend (nor is refused by) the refresh budget.
    const service = await app.inject({
      method: 'POST',
      url: '/oauth/token',
      remoteAddress: ip,
      headers: {
        'content-type': 'application/x-www-form-urlencoded',
        ...basic(neighbour.client_id, neighbour.client_secret),
      },
      payload: 'grant_type=client_credentials',
    });
    expect(service.statusCode).toBe(200);
    // The refresh token itself was never spent: from another address it still works.
    const elsewhere = await app.inject({
      method: 'POST',
      url: '/v1/auth/refresh',
      remoteAddress: '198.51.100.41',
      payload: { refresh_token: user.refreshToken },
    });
    expect(elsewhere.statusCode).toBe(200);
  });
});
