import { request as httpRequest } from 'node:http';
import type { AddressInfo } from 'node:net';
import { runInNewContext } from 'node:vm';
import type { FastifyInstance } from 'fastify';
import type { ZodTypeProvider } from 'fastify-type-provider-zod';
import { beforeAll, describe, expect, it } from 'vitest';
import { z } from 'zod';
import type { DatabaseHandle } from '../../src/db/client.js';
import { buildTestApp } from '../support/app.js';
import { testDatabase } from '../support/database.js';

const ITEM_ID = '6f1c1f8e-3f0a-4c55-9d5e-0b8c2f4a7e21';

/** A GET of `path` exactly as written (no `..` resolved, as app.inject and fetch would), over a socket. */
function getAsIs(port: number, path: string): Promise<{ status: number; type: string; body: string }> {
  return new Promise((resolve, reject) => {
    const req = httpRequest({ host: '127.0.0.1', port, path, method: 'GET' }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (chunk: string) => {
        body += chunk;
      });
      res.on('end', () =>
        resolve({ status: res.statusCode ?? 0, type: String(res.headers['content-type']), body }),
      );
    });
    req.on('error', reject);
    req.end();
  });
}

/** Runs Swagger UI's initializer as the page would, and gives back the config it hands to Swagger UI. */
function swaggerUiConfigOf(initializer: string): Record<string, unknown> {
  let config: Record<string, unknown> = {};
  const bundle = Object.assign(
    (c: Record<string, unknown>) => {
      config = c;
      return { initOAuth: () => undefined };
    },
    { presets: { apis: {} }, plugins: { DownloadUrl: {} } },
  );
  const window: { location: { href: string }; onload?: () => void } = {
    location: { href: 'http://127.0.0.1/docs/' },
  };
  const document = { createElement: () => ({ href: '' }), querySelector: () => null, body: {} };
  class MutationObserver {
    observe() {}
    disconnect() {}
  }
  runInNewContext(initializer, {
    window,
    document,
    MutationObserver,
    SwaggerUIBundle: bundle,
    SwaggerUIStandalonePreset: {},
  });
  window.onload?.();
  return config;
}

describe('foundation: app, errors, operations', () => {
  let app: FastifyInstance;
  beforeAll(async () => {
    app = await buildTestApp({
      beforeReady: (a) => {
        a.withTypeProvider<ZodTypeProvider>().post(
          '/test/echo',
          {
            config: { public: true },
            schema: {
              body: z.object({ name: z.string().min(1), count: z.number().int() }).strict(),
              response: { 200: z.object({ name: z.string() }) },
            },
          },
          async (request) => ({ name: request.body.name, secret: 'must not leak' }),
        );
        a.withTypeProvider<ZodTypeProvider>().get(
          '/test/nested',
          {
            config: { public: true },
            schema: {
              response: {
                200: z.object({
                  // Fields named like JSON Schema keywords are fields all the same.
                  items: z.array(z.object({ id: z.uuid(), tags: z.array(z.string()), format: z.string() })),
                  owner: z.object({ email: z.email(), pattern: z.string().min(1) }).nullable(),
                }),
              },
            },
          },
          async () => ({
            items: [{ id: ITEM_ID, tags: ['x'], format: 'png', passwordHash: '$argon2id$…' }],
            owner: { email: 'ada@example.test', pattern: 'dots', secretHash: 'deadbeef' },
          }),
        );
        a.withTypeProvider<ZodTypeProvider>().get(
          '/test/incomplete',
          {
            config: { public: true },
            schema: { response: { 200: z.object({ name: z.string(), count: z.number().int() }) } },
          },
          // A handler bug: a required field is missing.
          async () => ({ name: 'ada', secret: 'must not leak' }) as never,
        );
      },
    });
  });

  it('answers liveness and readiness', async () => {
    const live = await app.inject({ method: 'GET', url: '/health/live' });
    expect(live.statusCode).toBe(200);
    expect(live.json()).toEqual({ status: 'ok' });
    const ready = await app.inject({ method: 'GET', url: '/health/ready' });
    expect(ready.statusCode).toBe(200);
    expect(ready.json()).toMatchObject({ status: 'ok', checks: { database: 'ok' } });
  });

  it('serves a valid OpenAPI 3 document with both security schemes, and Swagger UI', async () => {
    const res = await app.inject({ method: 'GET', url: '/openapi.json' });
    expect(res.statusCode).toBe(200);
    const doc = res.json();
    expect(doc.openapi).toMatch(/^3\./);
    expect(doc.info.title).toBeTruthy();
    expect(doc.paths['/health/ready'].get.operationId).toBe('healthReady');
    expect(doc.components.securitySchemes.bearerAuth).toMatchObject({ type: 'http', scheme: 'bearer' });
    expect(doc.components.securitySchemes.apiKey).toMatchObject({
      type: 'apiKey',
      in: 'header',
      name: 'X-API-Key',
    });
    expect(doc.servers).toEqual([{ url: 'http://auth.test' }]);
    // Swagger UI's copy sends "Try it out" to the origin the page is open at, PUBLIC_URL second.
    const uiDoc = (await app.inject({ method: 'GET', url: '/docs/json' })).json();
    expect(uiDoc.servers.map((s: { url: string }) => s.url)).toEqual(['/', 'http://auth.test']);
    expect(uiDoc.paths).toEqual(doc.paths);
    // Outside production, what is entered under Authorize survives a reload (localStorage).
    const initializer = await app.inject({ method: 'GET', url: '/docs/static/swagger-initializer.js' });
    expect(initializer.body).toMatch(/"persistAuthorization":\s*true/);
    // With both a token and an API key entered under Authorize, "Try it out" sends one credential
    // (the service answers 400 to two): run the page's own initializer and its request interceptor.
    const config = swaggerUiConfigOf(initializer.body) as {
      requestInterceptor: (r: { headers: Record<string, string> }) => { headers: Record<string, string> };
    };
    const both = { headers: { Authorization: 'Bearer eyJ.x.y', 'X-API-Key': 'pak_x', Accept: '*/*' } };
    expect(config.requestInterceptor(both).headers).toEqual({
      Authorization: 'Bearer eyJ.x.y',
      Accept: '*/*',
    });
    expect(config.requestInterceptor({ headers: { 'X-API-Key': 'pak_x' } }).headers).toEqual({
      'X-API-Key': 'pak_x',
    });
    const sent = await app.inject({
      method: 'GET',
      url: '/v1/auth/me',
      headers: config.requestInterceptor({
        headers: { Authorization: 'Bearer not-a-token', 'X-API-Key': 'pak_x' },
      }).headers,
    });
    expect(sent.json().code).not.toBe('bad_request');
    const ui = await app.inject({ method: 'GET', url: '/docs/' });
    expect(ui.statusCode).toBe(200);
    expect(ui.headers['content-type']).toContain('text/html');
    expect(ui.body).toContain('swagger');
  });

  it('answers malformed JSON with 400 problem+json', async () => {
    const res = await app.inject({
      method: 'POST',
      url: '/test/echo',
      headers: { 'content-type': 'application/json' },
      payload: '{"name": ',
    });
    expect(res.statusCode).toBe(400);
    expect(res.headers['content-type']).toContain('application/problem+json');
    expect(res.json()).toMatchObject({ status: 400, code: 'invalid_json' });
  });

  it('names each bad field in a validation error', async () => {
    const res = await app.inject({
      method: 'POST',
      url: '/test/echo',
      payload: { name: '', count: 'x', extra: 1 },
    });
    expect(res.statusCode).toBe(400);
    const body = res.json();
    expect(body.code).toBe('validation_failed');
    expect(body.type).toBeTruthy();
    expect(body.title).toBeTruthy();
    const fields = body.errors.map((e: { field: string }) => e.field);
    expect(fields).toEqual(expect.arrayContaining(['body.name', 'body.count']));
  });

  it('refuses a wrong content type with 415 and an oversized body with 413', async () => {
    const wrongType = await app.inject({
      method: 'POST',
      url: '/test/echo',
      headers: { 'content-type': 'text/plain' },
      payload: 'hello',
    });
    expect(wrongType.statusCode).toBe(415);
    expect(wrongType.json().code).toBe('unsupported_media_type');
    const big = await app.inject({
      method: 'POST',
      url: '/test/echo',
      payload: { name: 'x'.repeat(200_000), count: 1 },
    });
    expect(big.statusCode).toBe(413);
    expect(big.json().code).toBe('payload_too_large');
  });

  it('refuses __proto__ keys and answers unknown routes with 404 problem+json', async () => {
    const proto = await app.inject({
      method: 'POST',
      url: '/test/echo',
      headers: { 'content-type': 'application/json' },
      payload: '{"name":"a","count":1,"__proto__":{"admin":true}}',
    });
    expect(proto.statusCode).toBe(400);
    const missing = await app.inject({ method: 'GET', url: '/v1/nothing-here' });
    expect(missing.statusCode).toBe(404);
    expect(missing.json()).toMatchObject({ code: 'not_found', status: 404 });
  });

  it('answers a method a path does not take with 405 and Allow (RFC 9110 §15.5.6), in the path’s error format', async () => {
    const jwks = await app.inject({ method: 'DELETE', url: '/.well-known/jwks.json' });
    expect(jwks.statusCode).toBe(405);
    expect(jwks.headers.allow).toBe('GET, HEAD');
    expect(jwks.headers['content-type']).toContain('application/problem+json');
    expect(jwks.json()).toMatchObject({ code: 'method_not_allowed', status: 405 });
    const user = await app.inject({ method: 'PUT', url: `/v1/users/${ITEM_ID}?x=1` });
    expect(user.statusCode).toBe(405);
    expect(user.headers.allow).toBe('GET, HEAD, PATCH, DELETE');
    expect(user.json().detail).toBe(
      `PUT is not allowed on /v1/users/${ITEM_ID}; it takes GET, HEAD, PATCH, DELETE`,
    );
    // Under /oauth, RFC 6749's error format, and never stored.
    const token = await app.inject({ method: 'GET', url: '/oauth/token' });
    expect(token.statusCode).toBe(405);
    expect(token.headers.allow).toBe('POST');
    expect(token.json()).toMatchObject({ error: 'invalid_request' });
    expect(token.headers['cache-control']).toBe('no-store');
    // A path no method takes is still a 404.
    expect((await app.inject({ method: 'DELETE', url: '/v1/nothing-here' })).statusCode).toBe(404);
    // A route of the request's own method that finds nothing (a file Swagger UI does not have) is a
    // 404, not a 405 sending GET to HEAD and HEAD to GET.
    for (const method of ['GET', 'HEAD'] as const) {
      const asset = await app.inject({ method, url: '/docs/static/nope.js' });
      expect(asset.statusCode, method).toBe(404);
      expect(asset.headers.allow, method).toBeUndefined();
      expect(asset.headers['content-type'], method).toContain('application/problem+json');
    }
    expect((await app.inject({ method: 'GET', url: '/docs/static/nope.js' })).json()).toMatchObject({
      code: 'not_found',
      detail: 'Nothing is at /docs/static/nope.js',
    });
  });

  it('answers a method a literal path does not take with 405 and its Allow, though a parametrised path of that method matches it', async () => {
    // GET /v1/api-keys/{id} matched GET /v1/api-keys/verify, with the id "verify": a 400 about an id.
    for (const method of ['GET', 'HEAD', 'PATCH', 'DELETE', 'PUT'] as const) {
      const verify = await app.inject({ method, url: '/v1/api-keys/verify?x=1' });
      expect(verify.statusCode, method).toBe(405);
      expect(verify.headers.allow, method).toBe('POST');
      if (method !== 'HEAD')
        expect(verify.json(), method).toMatchObject({
          code: 'method_not_allowed',
          detail: `${method} is not allowed on /v1/api-keys/verify; it takes POST`,
        });
    }
    // Every literal path of the service, whatever is beside it: each method it does not take is a
    // 405 naming the ones it takes, before any credential is asked for.
    const order = ['GET', 'HEAD', 'POST', 'PUT', 'PATCH', 'DELETE'] as const;
    const literal = new Map<string, Set<string>>();
    for (const { method, url } of app.routeTable) {
      if (/[:*]/.test(url) || method === 'OPTIONS') continue;
      const methods = literal.get(url) ?? new Set<string>();
      methods.add(method);
      if (method === 'GET') methods.add('HEAD');
      literal.set(url, methods);
    }
    expect(literal.has('/v1/profiles/me')).toBe(true);
    for (const [path, methods] of literal) {
      const allow = order.filter((m) => methods.has(m)).join(', ');
      for (const method of order.filter((m) => !methods.has(m))) {
        const res = await app.inject({ method, url: path });
        expect(res.statusCode, `${method} ${path}`).toBe(405);
        expect(res.headers.allow, `${method} ${path}`).toBe(allow);
      }
    }
    // Counted as what it is, a request no route of its method took: not as one of GET /v1/api-keys/:id.
    const metrics = (await app.inject({ method: 'GET', url: '/metrics' })).body;
    expect(metrics).toContain('http_requests_total{method="GET",route="unmatched",status="405"}');
    expect(metrics).not.toMatch(/route="\/v1\/api-keys\/:id",status="405"/);
    // The parametrised path keeps its own methods.
    const key = await app.inject({ method: 'PUT', url: `/v1/api-keys/${ITEM_ID}` });
    expect(key.statusCode).toBe(405);
    expect(key.headers.allow).toBe('GET, HEAD, PATCH, DELETE');
  });

  it('runs the literal-path check on parametrised routes only: the paths other services call on every request run no hook for it', async () => {
    // printRoutes lists each route (its full path and method) and, under it, its hooks by name.
    const lines = app.printRoutes({ includeHooks: true, commonPrefix: false }).split('\n');
    const hooksOf = (route: string) => {
      const at = lines.findIndex((l) => l.includes(` ${route}`));
      expect(at, route).toBeGreaterThanOrEqual(0);
      const hooks: string[] = [];
      for (const line of lines.slice(at + 1)) {
        if (!line.includes('• (')) break;
        hooks.push(line);
      }
      return hooks.join('\n');
    };
    // The JWKS runs one onRequest hook: the app's own first one (closing, NUL characters, encodings).
    expect(hooksOf('/.well-known/jwks.json (GET)')).toMatch(/\(onRequest\) \["anonymous\(\)"\]/);
    // And the check is there on the parametrised routes.
    expect(lines.some((l) => l.includes('(onRequest)') && l.includes('refuse()'))).toBe(true);
  });

  it('answers a path out of the documentation’s folder as a file it does not have, and what its file server refuses with the code and title of its status', async () => {
    await app.listen({ port: 0, host: '127.0.0.1' });
    const port = (app.server.address() as AddressInfo).port;
    // A path out of Swagger UI's folder: nothing is there, a 404 as for a file Swagger UI does not
    // have, not a 403 whose title speaks of a missing permission.
    for (const path of [
      '/docs/static/../../package.json',
      '/docs/static/%2e%2e/%2e%2e/package.json',
      '/docs/static/..',
    ]) {
      const traversal = await getAsIs(port, path);
      expect(traversal.status, path).toBe(404);
      expect(traversal.type).toContain('application/problem+json');
      expect(JSON.parse(traversal.body), path).toMatchObject({
        code: 'not_found',
        status: 404,
        title: 'Not found',
        detail: `Nothing is at ${path}`,
      });
    }
    const range = await app.inject({
      method: 'GET',
      url: '/docs/static/swagger-ui.css',
      headers: { range: 'bytes=99999999-' },
    });
    expect(range.statusCode).toBe(416);
    expect(range.headers['content-range']).toMatch(/^bytes \*\/\d+$/);
    expect(range.json()).toMatchObject({ code: 'range_not_satisfiable', status: 416 });
    const precondition = await app.inject({
      method: 'GET',
      url: '/docs/static/swagger-ui.css',
      headers: { 'if-match': '"not-this-one"' },
    });
    expect(precondition.statusCode).toBe(412);
    expect(precondition.json()).toMatchObject({ code: 'precondition_failed', status: 412 });
  });

  it('answers invalid UTF-8, wrong types, unknown methods and absurd URLs with 4xx, never 5xx', async () => {
    const invalidUtf8 = await app.inject({
      method: 'POST',
      url: '/test/echo',
      headers: { 'content-type': 'application/json' },
      payload: Buffer.concat([
        Buffer.from('{"name":"'),
        Buffer.from([0xc3, 0x28, 0xff]),
        Buffer.from('","count":1}'),
      ]),
    });
    expect(invalidUtf8.statusCode).toBeLessThan(500);
    const wrongType = await app.inject({ method: 'POST', url: '/test/echo', payload: [1, 2, 3] });
    expect(wrongType.statusCode).toBe(400);
    const nullBody = await app.inject({
      method: 'POST',
      url: '/test/echo',
      headers: { 'content-type': 'application/json' },
      payload: 'null',
    });
    expect(nullBody.statusCode).toBe(400);
    const method = await app.inject({ method: 'PROPFIND' as 'GET', url: '/health/live' });
    expect(method.statusCode).toBeGreaterThanOrEqual(400);
    expect(method.statusCode).toBeLessThan(500);
    const longUrl = await app.inject({ method: 'GET', url: `/v1/users/${'a'.repeat(5000)}` });
    expect(longUrl.statusCode).toBe(414);
    expect(longUrl.json()).toMatchObject({ code: 'uri_too_long', status: 414 });
    // Not the URL back (twice): a short answer.
    expect(longUrl.body.length).toBeLessThan(400);
    const oauthLong = await app.inject({ method: 'GET', url: `/oauth/${'a'.repeat(5000)}` });
    expect(oauthLong.statusCode).toBeLessThan(500);
    const encoded = await app.inject({ method: 'GET', url: '/v1/users/%E0%A4%A' });
    expect(encoded.statusCode).toBeLessThan(500);
  });

  it('serializes responses through their schema, so unlisted fields never leave', async () => {
    const res = await app.inject({ method: 'POST', url: '/test/echo', payload: { name: 'ada', count: 1 } });
    expect(res.statusCode).toBe(200);
    expect(res.json()).toEqual({ name: 'ada' });
  });

  it('writes only what the response schema lists, at every depth, and never an answer missing a field', async () => {
    const nested = await app.inject({ method: 'GET', url: '/test/nested' });
    expect(nested.statusCode).toBe(200);
    expect(nested.body).toBe(
      `{"items":[{"id":"${ITEM_ID}","tags":["x"],"format":"png"}],"owner":{"email":"ada@example.test","pattern":"dots"}}`,
    );
    const incomplete = await app.inject({ method: 'GET', url: '/test/incomplete' });
    expect(incomplete.statusCode).toBe(500);
    expect(incomplete.headers['content-type']).toContain('application/problem+json');
    // The request id is random hex and may hold "ada" itself: look at everything else.
    const { request_id: _id, ...problem } = incomplete.json();
    expect(JSON.stringify(problem)).not.toContain('must not leak');
    expect(JSON.stringify(problem)).not.toContain('ada');
  });

  it('sets a request id, security headers and exposes Prometheus metrics', async () => {
    const res = await app.inject({
      method: 'GET',
      url: '/health/live',
      headers: { 'x-request-id': 'abc-123' },
    });
    expect(res.headers['x-request-id']).toBe('abc-123');
    expect(res.headers['x-content-type-options']).toBe('nosniff');
    expect(res.headers['content-security-policy']).toBe("default-src 'none'; frame-ancestors 'none'");
    const metrics = await app.inject({ method: 'GET', url: '/metrics' });
    expect(metrics.statusCode).toBe(200);
    expect(metrics.body).toContain('http_requests_total{method="GET",route="/health/live",status="200"}');
    expect(metrics.body).toContain('http_request_duration_seconds_bucket');
  });
});

describe('/metrics with METRICS_TOKEN', () => {
  it('answers the bearer of the token only: anyone else gets 401 problem+json with a challenge', async () => {
    const token = 'scrape-0123456789abcdef';
    const app = await buildTestApp({ env: { METRICS_TOKEN: token } });
    for (const authorization of [undefined, 'Bearer wrong-token-0123456789', `Basic ${token}`, 'Bearer ']) {
      const refused = await app.inject({
        method: 'GET',
        url: '/metrics',
        headers: authorization === undefined ? {} : { authorization },
      });
      expect(refused.statusCode, authorization).toBe(401);
      expect(refused.headers['content-type']).toContain('application/problem+json');
      expect(refused.headers['www-authenticate']).toBe('Bearer realm="metrics"');
      expect(refused.json()).toMatchObject({ code: 'authentication_required', status: 401 });
      expect(refused.body).not.toContain('http_requests_total');
    }
    for (const scheme of ['Bearer', 'bearer']) {
      const scraped = await app.inject({
        method: 'GET',
        url: '/metrics',
        headers: { authorization: `${scheme} ${token}` },
      });
      expect(scraped.statusCode).toBe(200);
      expect(scraped.body).toContain('http_requests_total{method="GET",route="/metrics",status="401"}');
    }
  });

  it('two Authorization headers: 400 invalid_request, as everywhere else, whichever comes first (Node keeps only it)', async () => {
    const token = 'scrape-0123456789abcdef';
    const app = await buildTestApp({ env: { METRICS_TOKEN: token } });
    const pairs = {
      'token, wrong': [`Bearer ${token}`, 'Bearer wrong-token-0123456789'],
      'wrong, token': ['Bearer wrong-token-0123456789', `Bearer ${token}`],
      'token twice': [`Bearer ${token}`, `Bearer ${token}`],
      'token, Basic': [`Bearer ${token}`, 'Basic Og=='],
    };
    for (const [label, authorization] of Object.entries(pairs)) {
      const res = await app.inject({
        method: 'GET',
        url: '/metrics',
        headers: { authorization: authorization as unknown as string },
      });
      expect(res.statusCode, label).toBe(400);
      expect(res.headers['content-type'], label).toContain('application/problem+json');
      expect(res.headers['www-authenticate'], label).toBe('Bearer realm="metrics", error="invalid_request"');
      expect(res.json(), label).toMatchObject({
        code: 'bad_request',
        status: 400,
        detail: 'Send one Authorization header: with several, which one counts is left open (RFC 9110 §5.3)',
      });
      expect(res.body, label).not.toContain('http_requests_total');
    }
    // Without METRICS_TOKEN nothing reads Authorization: open to anyone, as any public route.
    const open = await buildTestApp();
    const scraped = await open.inject({
      method: 'GET',
      url: '/metrics',
      headers: { authorization: pairs['wrong, token'] as unknown as string },
    });
    expect(scraped.statusCode).toBe(200);
  });
});

describe('readiness when the database does not answer, and while shutting down', () => {
  let app: FastifyInstance;
  let real: DatabaseHandle;
  let healthy = true;
  beforeAll(async () => {
    real = await testDatabase();
    const flaky: DatabaseHandle = { ...real, ping: async (ms) => (healthy ? real.ping(ms) : false) };
    app = await buildTestApp({ deps: { database: flaky } });
  });

  it('turns 503 when the ping fails and back to 200 when it answers', async () => {
    healthy = false;
    const down = await app.inject({ method: 'GET', url: '/health/ready' });
    expect(down.statusCode).toBe(503);
    // API.md: every error is problem+json; what failed is in `checks`.
    expect(down.headers['content-type']).toMatch(/^application\/problem\+json/);
    expect(down.json()).toMatchObject({
      status: 503,
      code: 'service_unavailable',
      detail: 'Not ready: the database does not answer',
      checks: { database: 'failing' },
    });
    expect((await app.inject({ method: 'GET', url: '/health/live' })).statusCode).toBe(200);
    healthy = true;
    expect((await app.inject({ method: 'GET', url: '/health/ready' })).statusCode).toBe(200);
  });

  it('turns 503 once shutdown begins', async () => {
    app.markShuttingDown();
    const res = await app.inject({ method: 'GET', url: '/health/ready' });
    expect(res.statusCode).toBe(503);
    expect(res.headers['content-type']).toMatch(/^application\/problem\+json/);
    expect(res.json().checks.process).toBe('shutting_down');
  });
});

describe('ReDoc', () => {
  it('serves a reference page of the document at /redoc, its pinned script checked by hash, under a CSP of its own', async () => {
    const app = await buildTestApp();
    const page = await app.inject({ method: 'GET', url: '/redoc' });
    expect(page.statusCode).toBe(200);
    expect(page.headers['content-type']).toBe('text/html; charset=utf-8');
    expect(page.body).toContain('<redoc spec-url="./openapi.json"></redoc>');
    expect(page.body).toMatch(
      /<script src="https:\/\/cdn\.jsdelivr\.net\/npm\/redoc@\d+\.\d+\.\d+\/bundles\/redoc\.standalone\.js" integrity="sha384-[A-Za-z0-9+/]{64}" crossorigin="anonymous"><\/script>/,
    );
    const csp = String(page.headers['content-security-policy']);
    expect(csp).toMatch(
      /script-src https:\/\/cdn\.jsdelivr\.net\/npm\/redoc@[\d.]+\/bundles\/redoc\.standalone\.js;/,
    );
    expect(csp).toContain('worker-src blob:');
    expect(csp).toContain("frame-ancestors 'none'");
    expect(page.headers['x-frame-options']).toBe('DENY');
    // With a trailing slash, ./openapi.json would miss: that address is sent to the page, relatively.
    const slash = await app.inject({ method: 'GET', url: '/redoc/' });
    expect(slash.statusCode).toBe(301);
    expect(new URL(String(slash.headers.location), 'http://x/redoc/').pathname).toBe('/redoc');
    // The spec it reads is there, and Swagger UI's pages keep their stricter policy.
    expect((await app.inject({ method: 'GET', url: '/openapi.json' })).statusCode).toBe(200);
    const docs = await app.inject({ method: 'GET', url: '/docs/' });
    expect(String(docs.headers['content-security-policy'])).not.toContain('jsdelivr');
    // API answers keep theirs.
    const api = await app.inject({ method: 'GET', url: '/health/live' });
    expect(String(api.headers['content-security-policy'])).not.toContain('jsdelivr');
  });
});

describe('Swagger UI in production', () => {
  it('keeps what is entered under Authorize in the tab only, not in localStorage', async () => {
    const app = await buildTestApp({ env: { NODE_ENV: 'production' } });
    const initializer = await app.inject({ method: 'GET', url: '/docs/static/swagger-initializer.js' });
    expect(initializer.statusCode).toBe(200);
    expect(initializer.body).toMatch(/"persistAuthorization":\s*false/);
  });
});

describe('Swagger UI behind a proxy that strips PUBLIC_URL’s path', () => {
  it('sends /docs to docs/ relatively, and the page there links its assets relatively', async () => {
    const app = await buildTestApp({ env: { PUBLIC_URL: 'https://example.com/auth' } });
    // What the browser asked for, through the proxy, and where it goes from there.
    const seen = (url: string) => `https://example.com/auth${url}`;
    for (const [url, to] of [
      ['/docs', '/auth/docs/'],
      ['/docs?x=1', '/auth/docs/?x=1'],
      ['/docs/static/index.html', '/auth/docs/'],
    ] as const) {
      const res = await app.inject({ method: 'GET', url });
      expect(res.statusCode, url).toBe(301);
      const target = new URL(String(res.headers.location), seen(url));
      expect(`${target.pathname}${target.search}`, url).toBe(to);
    }
    // Authorize's client-credentials flow posts from the page too: to the path the browser sees.
    const tokenUrlOf = async (url: string) =>
      (await app.inject({ method: 'GET', url })).json().components.securitySchemes.clientCredentials.flows
        .clientCredentials.tokenUrl;
    expect(await tokenUrlOf('/docs/json')).toBe('/auth/oauth/token');
    expect(await tokenUrlOf('/openapi.json')).toBe('https://example.com/auth/oauth/token');
    const page = await app.inject({ method: 'GET', url: '/docs/' });
    expect(page.statusCode).toBe(200);
    const links = [...page.body.matchAll(/(?:href|src)="([^"]+)"/g)].map((m) => m[1]!);
    expect(links.length).toBeGreaterThan(3);
    for (const link of links) {
      expect(link).toMatch(/^\.\/static\//);
      // Each resolves, from the page's address behind the proxy, to an asset the service serves.
      const asset = new URL(link, seen('/docs/')).pathname.replace(/^\/auth/, '');
      expect((await app.inject({ method: 'GET', url: asset })).statusCode, asset).toBe(200);
    }
  });
});

describe('the documentation’s paths are /docs and /redoc exactly, and what is under them', () => {
  let app: FastifyInstance;
  beforeAll(async () => {
    app = await buildTestApp({
      beforeReady: (a) => {
        // A route that only starts with the letters of /docs: an API route like any other.
        a.get('/docsX', { schema: { hide: true }, config: { permission: 'users:read' } }, async () => ({
          ok: true,
        }));
      },
    });
  });

  it('gives a path that only starts with their letters the API answers’ headers, not the pages’', async () => {
    for (const url of ['/docsX', '/docs.json', '/redocX', '/redoc.html?x=1']) {
      const res = await app.inject({ method: 'GET', url });
      expect(res.headers['content-security-policy'], url).toBe("default-src 'none'; frame-ancestors 'none'");
      expect(res.headers['cache-control'], url).toBe('no-store');
      expect(res.headers['cross-origin-opener-policy'], url).toBeUndefined();
    }
    // The pages themselves, with or without a query, and what is under them keep helmet's set.
    for (const url of ['/docs', '/docs?x=1', '/docs/', '/docs/static/swagger-ui.css', '/redoc', '/redoc/']) {
      const res = await app.inject({ method: 'GET', url });
      expect(String(res.headers['content-security-policy']), url).toContain("default-src 'self'");
      expect(res.headers['cross-origin-opener-policy'], url).toBe('same-origin');
    }
  });

  it('does not make a route public because its path starts with /docs', async () => {
    const anonymous = await app.inject({ method: 'GET', url: '/docsX' });
    expect(anonymous.statusCode, anonymous.body).toBe(401);
    expect(app.routeTable.find((r) => r.url === '/docsX')).toMatchObject({ public: false });
    for (const url of ['/docs', '/docs/static/index.html', '/docs/json'])
      expect(
        app.routeTable.find((r) => r.url === url),
        url,
      ).toMatchObject({ public: true });
  });
});

describe('the documentation’s redirects', () => {
  it('are not kept by browsers: a 301 without Cache-Control would be, with no end', async () => {
    const app = await buildTestApp();
    for (const url of ['/docs', '/docs?x=1', '/docs/static/index.html', '/redoc/']) {
      const res = await app.inject({ method: 'GET', url });
      expect(res.statusCode, url).toBe(301);
      expect(res.headers['cache-control'], url).toBe('no-store');
    }
    // The pages they lead to are what they were.
    expect((await app.inject({ method: 'GET', url: '/docs/' })).statusCode).toBe(200);
    expect((await app.inject({ method: 'GET', url: '/redoc' })).statusCode).toBe(200);
  });
});
