import Fastify, { type FastifyInstance } from 'fastify';
import { beforeAll, describe, expect, it } from 'vitest';
import authenticate from '../../src/plugins/authenticate.js';
import { createKey, withKey } from '../api-keys/helpers.js';
import { clientToken, createClient } from '../clients/helpers.js';
import { buildTestApp } from '../support/app.js';
import { createAdmin, type TestUser } from '../support/factories.js';
import { bearer } from '../support/http.js';
import { captureLogs } from '../support/logs.js';

/*
 * A route that takes no API key says so in one place, its declaration (`config.credential`), and the
 * authenticate plugin refuses every other credential there, right after authenticating it: before
 * the permission, the body and the handler, so no handler has to remember it.
 */
describe('the credential a route declares is the rule (config.credential)', () => {
  let app: FastifyInstance;
  let admin: TestUser;
  let key: { id: string; key: string };
  let serviceToken: string;
  let sessionless: string;
  let clientId: string;
  // A handler that relies on the credential (`principalTaking`) logs an error should it ever be
  // reached by one the route does not take: none is, the route's check refused them all.
  const logs = captureLogs('error');
  const bypassed = () => logs.lines.filter((l) => l.includes('credential check let through'));

  beforeAll(async () => {
    app = await buildTestApp({ deps: { logger: logs.logger } });
    admin = await createAdmin(app);
    // Every credential below holds every permission: only its kind is refused.
    key = await createKey(app, admin.accessToken, { scopes: ['*'] });
    const client = await createClient(app, admin.accessToken, { scopes: ['*'] });
    clientId = client.id;
    serviceToken = (await clientToken(app, client)).access_token;
    // A user's token that no session of theirs carries.
    ({ token: sessionless } = await app.services.tokens.issue({
      sub: admin.id,
      audience: app.services.config.issuer,
      ttlSeconds: 600,
      clientId: 'no-session',
      permissions: ['*'],
      roles: ['admin'],
    }));
  });

  it('refuses, on every route declaring one, any other credential with 403 before the body is read or the handler runs', async () => {
    const declared = app.routeTable.filter((r) => r.credential !== undefined);
    expect(declared.length).toBeGreaterThanOrEqual(11);
    let keyRequests = 0;
    for (const route of declared) {
      const label = `${route.method} ${route.url}`;
      const url = route.url.replace(':id', clientId);
      expect(url, 'a path parameter this test fills in').not.toContain(':');
      const reads = route.method === 'GET';
      // What validation refuses before any handler: a parameter and a field no operation takes.
      const bad = {
        method: route.method as 'POST',
        url: `${url}?not_a_parameter=1`,
        ...(reads ? {} : { payload: { not_a_field: true } }),
      };
      if (!reads) {
        // Sent with a credential the route takes, it is a 400 (and so changes nothing).
        const allowed = await app.inject({ ...bad, headers: bearer(admin.accessToken) });
        expect(allowed.statusCode, `${label}: ${allowed.body}`).toBe(400);
      }
      const refused: Array<[Record<string, string>, RegExp]> = [
        [withKey(key.key), /API key/],
        [bearer(key.key), /API key/],
      ];
      if (route.credential === 'user_session')
        refused.push(
          [bearer(serviceToken), /signed-in session.*not with a service’s token/],
          [bearer(sessionless), /signed-in session.*belongs to none/],
        );
      for (const [headers, detail] of refused) {
        const res = await app.inject({ ...bad, headers });
        expect(res.statusCode, `${label}: ${res.body}`).toBe(403);
        expect(res.headers['content-type']).toContain('application/problem+json');
        expect(res.json()).toMatchObject({ code: 'forbidden', detail: expect.stringMatching(detail) });
        // No challenge: no scope would make this credential one the route takes.
        expect(res.headers['www-authenticate'], label).toBeUndefined();
      }
      keyRequests += 2;
    }
    // Each refusal is audited, and is all the key did: no handler wrote anything for it.
    const byKey = await app.services.audit.list({ credentialId: key.id, limit: 100 });
    expect(byKey).toHaveLength(keyRequests);
    for (const event of byKey) {
      expect(event).toMatchObject({ type: 'authorization.denied', outcome: 'failure', actorId: admin.id });
      expect(event.data).toMatchObject({ reason: expect.stringContaining('API key') });
    }
    expect(
      byKey
        .map((e) => {
          const data = e.data as { method: string; route: string };
          return `${data.method} ${data.route}`;
        })
        .sort(),
    ).toEqual(declared.flatMap((r) => [`${r.method} ${r.url}`, `${r.method} ${r.url}`]).sort());
    expect(bypassed()).toEqual([]);
  });

  it('refuses an API key there even when it lacks the route’s permission: the credential is decided first', async () => {
    const readOnly = await createKey(app, admin.accessToken, { scopes: ['account:read'] });
    const res = await app.inject({
      method: 'POST',
      url: '/v1/auth/password',
      headers: withKey(readOnly.key),
      payload: {},
    });
    expect(res.statusCode, res.body).toBe(403);
    expect(res.json().detail).toBe(
      'This is done from a signed-in session (a user’s access token), not with an API key',
    );
    // A read (answered from the verified-credential cache once seen) is refused as well, every time.
    for (let i = 0; i < 2; i++) {
      const read = await app.inject({ method: 'GET', url: '/v1/auth/mfa', headers: withKey(readOnly.key) });
      expect(read.statusCode, read.body).toBe(403);
    }
    expect(
      (await app.inject({ method: 'GET', url: '/v1/auth/mfa', headers: bearer(admin.accessToken) }))
        .statusCode,
    ).toBe(200);
    expect(bypassed()).toEqual([]);
  });

  it('does not start with a credential it does not know, or one declared on a public route', async () => {
    for (const config of [
      { permission: 'account:read', credential: 'api_key' },
      { public: true, credential: 'user_session' },
    ]) {
      const bare = Fastify({ logger: false });
      await bare.register(authenticate, { tokens: app.services.tokens });
      const start = async () => {
        bare.get('/declared', { config: config as never }, async () => 'served');
        await bare.ready();
      };
      await expect(start(), JSON.stringify(config)).rejects.toThrow(/config\.credential/);
      await bare.close().catch(() => {});
    }
  });
});
