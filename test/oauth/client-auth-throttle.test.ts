import type { FastifyInstance } from 'fastify';
import { beforeAll, describe, expect, it } from 'vitest';
import { CLIENT_AUTH_MAX_FAILURES_PER_MINUTE } from '../../src/modules/oauth/oauth.service.js';
import { basic, type CreatedClient, createClient, createTestClock } from '../clients/helpers.js';
import { buildTestApp } from '../support/app.js';
import { createAdmin } from '../support/factories.js';
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
    (await app.services.audit.list({ type: 'client.authentication_failed', limit: 100 })).filter(
      (e) => e.subjectId === client.id,
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
});
