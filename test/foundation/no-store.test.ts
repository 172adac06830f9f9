import type { FastifyInstance, LightMyRequestResponse } from 'fastify';
import type { InjectOptions } from 'light-my-request';
import { beforeAll, describe, expect, it } from 'vitest';
import { createClient } from '../clients/helpers.js';
import { buildTestApp, uniqueEmail } from '../support/app.js';
import { createAdmin, PASSWORD, registerUser, type TestUser } from '../support/factories.js';
import { bearer } from '../support/http.js';
import { totpAt } from '../support/mfa.js';
import { CREDENTIAL_RATE_LIMIT } from '../../src/plugins/rate-limit.js';

/** RFC 6749 §5.1, SECURITY.md: an answer holding a credential is never stored by a browser or a proxy. */
function expectNoStore(res: LightMyRequestResponse, what: string) {
  expect(res.statusCode, `${what}: ${res.body}`).toBeLessThan(300);
  expect(res.headers['cache-control'], what).toBe('no-store');
  expect(res.headers.pragma, what).toBe('no-cache');
}

/** The components of the OpenAPI document that carry a credential. */
const CREDENTIAL_SCHEMAS = ['Session', 'ClientWithSecret', 'ApiKeyWithSecret'];

describe('Cache-Control: no-store on every answer holding a credential', () => {
  let app: FastifyInstance;
  let admin: TestUser;

  beforeAll(async () => {
    app = await buildTestApp();
    admin = await createAdmin(app);
  });

  it('on register, login and refresh (a session)', async () => {
    const email = uniqueEmail('no-store');
    const register = await app.inject({
      method: 'POST',
      url: '/v1/auth/register',
      payload: { email, password: PASSWORD },
    });
    expectNoStore(register, 'register');
    const login = await app.inject({
      method: 'POST',
      url: '/v1/auth/login',
      payload: { email, password: PASSWORD },
    });
    expectNoStore(login, 'login');
    const refresh = await app.inject({
      method: 'POST',
      url: '/v1/auth/refresh',
      payload: { refresh_token: login.json().session.refresh_token },
    });
    expectNoStore(refresh, 'refresh');
    // Also when refused, so no cache keeps an answer to a credential.
    const refused = await app.inject({
      method: 'POST',
      url: '/v1/auth/login',
      payload: { email, password: 'not the password at all' },
    });
    expect(refused.statusCode).toBe(401);
    expect(refused.headers['cache-control']).toBe('no-store');
  });

  it('on creating a client and rotating its secret (a client_secret)', async () => {
    const client = await createClient(app, admin.accessToken, { scopes: ['users:read'] });
    const created = await app.inject({
      method: 'POST',
      url: '/v1/clients',
      headers: bearer(admin.accessToken),
      payload: { name: 'no-store', scopes: ['users:read'] },
    });
    expectNoStore(created, 'POST /v1/clients');
    const rotated = await app.inject({
      method: 'POST',
      url: `/v1/clients/${client.id}/secrets`,
      headers: bearer(admin.accessToken),
    });
    expectNoStore(rotated, 'POST /v1/clients/{id}/secrets');
  });

  it('on creating and rotating an API key (the key)', async () => {
    const created = await app.inject({
      method: 'POST',
      url: '/v1/api-keys',
      headers: bearer(admin.accessToken),
      payload: { name: 'no-store', scopes: ['account:read'] },
    });
    expectNoStore(created, 'POST /v1/api-keys');
    const rotated = await app.inject({
      method: 'POST',
      url: `/v1/api-keys/${created.json().id}/rotate`,
      headers: bearer(admin.accessToken),
    });
    expectNoStore(rotated, 'POST /v1/api-keys/{id}/rotate');
  });

  it('on setting up an authenticator app and confirming it (a TOTP secret, then recovery codes)', async () => {
    const user = await registerUser(app, 'no-store-mfa');
    const enrolled = await app.inject({
      method: 'POST',
      url: '/v1/auth/mfa/totp',
      headers: bearer(user.accessToken),
      payload: { password: PASSWORD },
    });
    expectNoStore(enrolled, 'POST /v1/auth/mfa/totp');
    const secret: string = enrolled.json().secret;
    const wrong = await app.inject({
      method: 'POST',
      url: '/v1/auth/mfa/totp/activate',
      headers: bearer(user.accessToken),
      payload: { code: totpAt(secret, Date.now()) === '000000' ? '111111' : '000000' },
    });
    expect(wrong.statusCode, wrong.body).toBe(400);
    expect(wrong.headers['cache-control']).toBe('no-store');
    expect(wrong.headers.pragma).toBe('no-cache');
    const activated = await app.inject({
      method: 'POST',
      url: '/v1/auth/mfa/totp/activate',
      headers: bearer(user.accessToken),
      payload: { code: totpAt(secret, Date.now()) },
    });
    expectNoStore(activated, 'POST /v1/auth/mfa/totp/activate');
    expect(activated.json().recovery_codes).toHaveLength(10);
  });

  it('on every other API answer too (ASVS 8.2.1), errors included; the JWKS and discovery documents are cacheable', async () => {
    const user = await registerUser(app, 'no-store-me');
    const requests: InjectOptions[] = [
      { method: 'GET', url: '/v1/auth/me', headers: bearer(user.accessToken) },
      { method: 'GET', url: '/v1/api-keys', headers: bearer(user.accessToken) },
      { method: 'GET', url: '/v1/profiles/me', headers: bearer(user.accessToken) },
      { method: 'GET', url: '/v1/auth/sessions', headers: bearer(user.accessToken) },
      { method: 'GET', url: '/v1/users', headers: bearer(admin.accessToken) },
      { method: 'GET', url: `/v1/users/${user.id}`, headers: bearer(admin.accessToken) },
      { method: 'GET', url: '/health/ready' },
    ];
    for (const request of requests) {
      const res = await app.inject(request);
      expect(res.statusCode, `${request.url}: ${res.body}`).toBe(200);
      expect(res.headers['cache-control'], request.url as string).toBe('no-store');
    }
    for (const request of [
      { method: 'GET', url: '/v1/auth/me' },
      { method: 'GET', url: '/v1/users', headers: bearer(user.accessToken) },
      { method: 'GET', url: '/v1/nowhere' },
    ] as InjectOptions[]) {
      const res = await app.inject(request);
      expect(res.statusCode, request.url as string).toBeGreaterThanOrEqual(400);
      expect(res.headers['cache-control'], `${request.url} ${res.statusCode}`).toBe('no-store');
    }
    for (const url of ['/.well-known/jwks.json', '/.well-known/openid-configuration']) {
      const res = await app.inject({ method: 'GET', url });
      expect(res.headers['cache-control'], url).toMatch(/^public, max-age=\d+/);
    }
  });

  it('on every problem+json answer, whichever hook or handler refused the request', async () => {
    // The first onRequest hook's refusals (a content coding, a NUL) come before a credential route's
    // own hook, the router's before any hook; the docs' 404 carries the pages' header set.
    const login = { method: 'POST', url: '/v1/auth/login', payload: { email: 'a@b.test', password: 'x' } };
    const refused: Array<[InjectOptions, number]> = [
      [{ ...login, headers: { 'content-encoding': 'gzip' } } as InjectOptions, 415],
      [{ ...login, url: '/v1/auth/login?x=%00' } as InjectOptions, 400],
      [{ method: 'GET', url: '/v1/roles/%E0%A4%A' }, 400],
      [{ method: 'GET', url: '/v1/auth/me' }, 401],
      [{ method: 'GET', url: '/v1/nowhere' }, 404],
      [{ method: 'GET', url: '/docs/static/nothing.css' }, 404],
    ];
    for (const [request, status] of refused) {
      const res = await app.inject(request);
      const what = `${request.method} ${request.url} ${res.statusCode}`;
      expect(res.statusCode, `${what}: ${res.body}`).toBe(status);
      expect(res.headers['content-type'], what).toMatch(/^application\/problem\+json/);
      expect(res.headers['cache-control'], what).toBe('no-store');
      expect(res.headers.pragma, what).toBe('no-cache');
    }
    // The per-IP limit's 429, on an app with the limits on.
    const limited = await buildTestApp({ env: { RATE_LIMIT_ENABLED: 'true' } });
    let last: LightMyRequestResponse | undefined;
    for (let i = 0; i <= CREDENTIAL_RATE_LIMIT.max; i++)
      last = await limited.inject({ method: 'POST', url: '/v1/auth/password/forgot', payload: {} });
    expect(last?.statusCode, last?.body).toBe(429);
    expect(last?.headers['cache-control']).toBe('no-store');
    expect(last?.headers.pragma).toBe('no-cache');
  });

  it('is declared on every operation whose answer holds a credential (outside /oauth, which has it by prefix)', async () => {
    const doc = (await app.inject({ method: 'GET', url: '/openapi.json' })).json() as {
      paths: Record<string, Record<string, { responses?: Record<string, unknown> }>>;
    };
    const holding: string[] = [];
    for (const [path, operations] of Object.entries(doc.paths)) {
      if (path.startsWith('/oauth/')) continue;
      for (const [method, operation] of Object.entries(operations)) {
        const success = Object.entries(operation.responses ?? {}).filter(([status]) =>
          status.startsWith('2'),
        );
        const text = JSON.stringify(success);
        if (CREDENTIAL_SCHEMAS.some((name) => text.includes(`"#/components/schemas/${name}"`)))
          holding.push(`${method.toUpperCase()} ${path.replace(/\{(\w+)\}/g, ':$1')}`);
      }
    }
    expect(holding).toEqual(
      expect.arrayContaining([
        'POST /v1/auth/register',
        'POST /v1/auth/login',
        'POST /v1/auth/refresh',
        'POST /v1/auth/exchange',
        'POST /v1/clients',
        'POST /v1/clients/:id/secrets',
        'POST /v1/api-keys',
        'POST /v1/api-keys/:id/rotate',
      ]),
    );
    const flagged = new Set(app.routeTable.filter((r) => r.noStore).map((r) => `${r.method} ${r.url}`));
    expect(holding.filter((op) => !flagged.has(op))).toEqual([]);
  });
});
