import type { FastifyInstance } from 'fastify';
import { beforeAll, describe, expect, it } from 'vitest';
import { buildTestApp } from '../support/app.js';
import { registerUser } from '../support/factories.js';
import { bearer } from '../support/http.js';

/**
 * What the hot-path rework (precomputed security headers, synchronous hooks, cached metric series)
 * must not change: the exact header set on every kind of answer, and the metrics.
 */

/** The OWASP REST set, on every API answer. */
const API_HEADERS = {
  'content-security-policy': "default-src 'none'; frame-ancestors 'none'",
  'cross-origin-resource-policy': 'same-site',
  'referrer-policy': 'no-referrer',
  'strict-transport-security': 'max-age=31536000; includeSubDomains',
  'x-content-type-options': 'nosniff',
  'x-frame-options': 'DENY',
};

/**
 * helmet 8 defaults with this service's CSP, CORP and X-Frame-Options (plugins/openapi.ts), on
 * Swagger UI's pages: everything from its own origin (the docs work offline), no font from anywhere
 * else, and framed nowhere, whichever header a browser reads.
 */
const DOCUMENT_HEADERS = {
  'content-security-policy':
    "default-src 'self';base-uri 'self';font-src 'self' data:;form-action 'self';" +
    "frame-ancestors 'none';img-src 'self' data:;object-src 'none';script-src 'self';" +
    "script-src-attr 'none';style-src 'self' 'unsafe-inline';connect-src 'self'",
  'cross-origin-opener-policy': 'same-origin',
  'cross-origin-resource-policy': 'same-site',
  'origin-agent-cluster': '?1',
  'referrer-policy': 'no-referrer',
  'strict-transport-security': 'max-age=31536000; includeSubDomains',
  'x-content-type-options': 'nosniff',
  'x-dns-prefetch-control': 'off',
  'x-download-options': 'noopen',
  'x-frame-options': 'DENY',
  'x-permitted-cross-domain-policies': 'none',
  'x-xss-protection': '0',
};

describe('hot path: security headers and metrics', () => {
  let app: FastifyInstance;
  beforeAll(async () => {
    app = await buildTestApp();
  });

  it('sends the REST header set on successes, errors and 404s, and helmet’s whole set on the docs', async () => {
    const user = await registerUser(app);
    const answers = await Promise.all([
      app.inject({ method: 'GET', url: '/health/live' }),
      app.inject({ method: 'GET', url: '/.well-known/jwks.json' }),
      app.inject({ method: 'GET', url: '/v1/auth/me', headers: bearer(user.accessToken) }),
      app.inject({ method: 'GET', url: '/v1/auth/me' }),
      app.inject({ method: 'POST', url: '/oauth/introspect', payload: 'token=x', headers: form }),
      app.inject({ method: 'GET', url: '/v1/nothing-here' }),
      app.inject({
        method: 'POST',
        url: '/v1/auth/login',
        payload: 'x',
        headers: { 'content-type': 'text/plain' },
      }),
      app.inject({ method: 'POST', url: '/v1/auth/login', payload: { email: 'not an email' } }),
    ]);
    expect(answers.map((a) => a.statusCode)).toEqual([200, 200, 200, 401, 401, 404, 415, 400]);
    for (const res of answers) {
      expect(res.headers).toMatchObject(API_HEADERS);
      // Nothing of the HTML-only set rides along on JSON.
      expect(res.headers['origin-agent-cluster']).toBeUndefined();
      expect(res.headers['x-request-id']).toBeTruthy();
      expect(res.headers['x-powered-by']).toBeUndefined();
    }
    for (const url of ['/docs', '/docs/', '/docs/static/index.html', '/docs/nothing-here']) {
      const res = await app.inject({ method: 'GET', url });
      expect(res.statusCode, url).toBeLessThan(500);
      expect(res.headers, url).toMatchObject(DOCUMENT_HEADERS);
    }
  });

  it('counts every request in its method, route and status series', async () => {
    const before = await app.inject({ method: 'GET', url: '/metrics' });
    const count = (body: string) =>
      Number(
        /http_requests_total\{method="GET",route="\/\.well-known\/openid-configuration",status="200"\} (\d+)/.exec(
          body,
        )?.[1] ?? 0,
      );
    for (let i = 0; i < 3; i++) await app.inject({ method: 'GET', url: '/.well-known/openid-configuration' });
    await app.inject({ method: 'GET', url: '/v1/nothing-here-either' });
    const after = await app.inject({ method: 'GET', url: '/metrics' });
    expect(count(after.body) - count(before.body)).toBe(3);
    expect(after.body).toMatch(
      /http_request_duration_seconds_count\{method="GET",route="\/\.well-known\/openid-configuration",status="200"\} \d+/,
    );
    expect(after.body).toContain('http_requests_total{method="GET",route="unmatched",status="404"}');
  });
});

const form = { 'content-type': 'application/x-www-form-urlencoded' };
