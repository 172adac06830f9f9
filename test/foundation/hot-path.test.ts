import type { FastifyInstance } from 'fastify';
import { beforeAll, describe, expect, it } from 'vitest';
import { buildTestApp } from '../support/app.js';
import { registerUser } from '../support/factories.js';
import { bearer } from '../support/http.js';

/**
 * What the hot-path rework (precomputed security headers, synchronous hooks, cached metric series)
 * must not change: the exact helmet header set on every kind of answer, and the metrics.
 */

/** helmet 8 defaults with this service's CSP and CORP (app.ts). */
const SECURITY_HEADERS = {
  'content-security-policy':
    "default-src 'self';base-uri 'self';font-src 'self' https: data:;form-action 'self';" +
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
  'x-frame-options': 'SAMEORIGIN',
  'x-permitted-cross-domain-policies': 'none',
  'x-xss-protection': '0',
};

describe('hot path: security headers and metrics', () => {
  let app: FastifyInstance;
  beforeAll(async () => {
    app = await buildTestApp();
  });

  it('sends the whole helmet header set on successes, errors, 404s and the docs', async () => {
    const user = await registerUser(app);
    const answers = await Promise.all([
      app.inject({ method: 'GET', url: '/health/live' }),
      app.inject({ method: 'GET', url: '/.well-known/jwks.json' }),
      app.inject({ method: 'GET', url: '/v1/auth/me', headers: bearer(user.accessToken) }),
      app.inject({ method: 'GET', url: '/v1/auth/me' }),
      app.inject({ method: 'POST', url: '/oauth/introspect', payload: 'token=x', headers: form }),
      app.inject({ method: 'GET', url: '/v1/nothing-here' }),
      app.inject({ method: 'GET', url: '/docs/' }),
      app.inject({
        method: 'POST',
        url: '/v1/auth/login',
        payload: 'x',
        headers: { 'content-type': 'text/plain' },
      }),
      app.inject({ method: 'POST', url: '/v1/auth/login', payload: { email: 'not an email' } }),
    ]);
    expect(answers.map((a) => a.statusCode)).toEqual([200, 200, 200, 401, 401, 404, 200, 415, 400]);
    for (const res of answers) {
      expect(res.headers).toMatchObject(SECURITY_HEADERS);
      expect(res.headers['x-request-id']).toBeTruthy();
      expect(res.headers['x-powered-by']).toBeUndefined();
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
