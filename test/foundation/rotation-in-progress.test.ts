import type { FastifyInstance } from 'fastify';
import { beforeAll, describe, expect, it } from 'vitest';
import { createKey, verifyKey } from '../api-keys/helpers.js';
import { basic, clientToken, createClient } from '../clients/helpers.js';
import { buildTestApp } from '../support/app.js';
import { createAdmin, registerUser, type TestUser } from '../support/factories.js';
import { bearer } from '../support/http.js';

/**
 * One slot for a previous secret: a rotation while the last one's grace runs would end that grace at
 * once, so it is refused (409 rotation_in_progress, Retry-After) unless forced. (Found by the audit:
 * the second rotation cut the first one's grace short without a word.)
 */
let app: FastifyInstance;
let admin: TestUser;
beforeAll(async () => {
  app = await buildTestApp();
  admin = await createAdmin(app);
});

describe('a rotation during the previous one’s grace', () => {
  it('API keys: refused with Retry-After, the original secret still working; force ends it', async () => {
    const user = await registerUser(app, 'rotate-twice');
    const verifier = (
      await clientToken(app, await createClient(app, admin.accessToken, { scopes: ['api_keys:verify'] }))
    ).access_token;
    const k0 = await createKey(app, user.accessToken, { scopes: ['account:read'] });
    const rotate = (payload: object) =>
      app.inject({
        method: 'POST',
        url: `/v1/api-keys/${k0.id}/rotate`,
        headers: bearer(user.accessToken),
        payload,
      });
    const first = await rotate({ grace_seconds: 600 });
    expect(first.statusCode, first.body).toBe(200);

    const again = await rotate({ grace_seconds: 600 });
    expect(again.statusCode, again.body).toBe(409);
    expect(again.json()).toMatchObject({ code: 'rotation_in_progress' });
    const retryAfter = Number(again.headers['retry-after']);
    expect(retryAfter).toBeGreaterThan(590);
    expect(retryAfter).toBeLessThanOrEqual(600);
    // Nothing changed: the original and the first rotation's secret both verify.
    expect((await verifyKey(app, verifier, k0.key)).valid).toBe(true);
    expect((await verifyKey(app, verifier, first.json().key)).valid).toBe(true);

    const forced = await rotate({ grace_seconds: 60, force: true });
    expect(forced.statusCode, forced.body).toBe(200);
    expect((await verifyKey(app, verifier, k0.key)).valid).toBe(false);
    expect((await verifyKey(app, verifier, first.json().key)).valid).toBe(true);
    expect((await verifyKey(app, verifier, forced.json().key)).valid).toBe(true);
  });

  it('client secrets: refused with Retry-After, the original secret still working; force ends it', async () => {
    const client = await createClient(app, admin.accessToken, { scopes: ['users:read'] });
    const rotate = (payload: object) =>
      app.inject({
        method: 'POST',
        url: `/v1/clients/${client.id}/secrets`,
        headers: bearer(admin.accessToken),
        payload,
      });
    const grant = (secret: string) =>
      app.inject({
        method: 'POST',
        url: '/oauth/token',
        headers: { 'content-type': 'application/x-www-form-urlencoded', ...basic(client.client_id, secret) },
        payload: 'grant_type=client_credentials',
      });
    const first = await rotate({ grace_seconds: 600 });
    expect(first.statusCode, first.body).toBe(201);

    const again = await rotate({ grace_seconds: 0 });
    expect(again.statusCode, again.body).toBe(409);
    expect(again.json()).toMatchObject({ code: 'rotation_in_progress' });
    expect(Number(again.headers['retry-after'])).toBeGreaterThan(590);
    expect((await grant(client.client_secret)).statusCode).toBe(200);

    const forced = await rotate({ force: true });
    expect(forced.statusCode, forced.body).toBe(201);
    expect((await grant(client.client_secret)).statusCode).toBe(401);
    expect((await grant(first.json().client_secret)).statusCode).toBe(401);
    expect((await grant(forced.json().client_secret)).statusCode).toBe(200);
    // A rotation without a grace leaves nothing in one: the next needs no force.
    expect((await rotate({})).statusCode).toBe(201);
  });
});
