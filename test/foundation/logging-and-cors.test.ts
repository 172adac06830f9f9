import { type AddressInfo, connect } from 'node:net';
import type { FastifyInstance } from 'fastify';
import type { ZodTypeProvider } from 'fastify-type-provider-zod';
import { beforeAll, describe, expect, it } from 'vitest';
import { z } from 'zod';
import { buildTestApp, uniqueEmail } from '../support/app.js';
import { createAdmin, PASSWORD } from '../support/factories.js';
import { bearer } from '../support/http.js';
import { captureLogs } from '../support/logs.js';

const capture = captureLogs;

describe('logs never carry credentials', () => {
  it('redacts authorization headers, API keys, passwords, tokens and secrets wherever they are logged', () => {
    const { lines, logger } = capture();
    logger.info(
      {
        req: {
          headers: { authorization: 'Bearer eyJsecret', 'x-api-key': 'pak_secretkey', cookie: 'sid=1' },
        },
        body: { password: 'hunter2hunter2', refresh_token: 'prt_secret', client_secret: 'pcs_secret' },
        token: 'raw-token',
      },
      'something happened',
    );
    const out = lines.join('');
    for (const secret of [
      'eyJsecret',
      'pak_secretkey',
      'sid=1',
      'hunter2hunter2',
      'prt_secret',
      'pcs_secret',
      'raw-token',
    ]) {
      expect(out).not.toContain(secret);
    }
    expect(out).toContain('[redacted]');
  });

  it('logs a register, a login and a refresh with request ids but without the password or tokens', async () => {
    const { lines, logger } = capture();
    const app = await buildTestApp({ deps: { logger } });
    const email = uniqueEmail('logs');
    const reg = await app.inject({
      method: 'POST',
      url: '/v1/auth/register',
      payload: { email, password: PASSWORD },
    });
    const { access_token, refresh_token } = reg.json().session;
    await app.inject({
      method: 'POST',
      url: '/v1/auth/login',
      headers: { authorization: `Bearer ${access_token}` },
      payload: { email, password: 'a wrong password for the log' },
    });
    await app.inject({ method: 'POST', url: '/v1/auth/refresh', payload: { refresh_token } });
    // Credentials a client wrongly puts in the query string: the request line keeps the path and
    // the harmless parameters, and blanks the values named like credentials.
    await app.inject({
      method: 'GET',
      url: `/v1/auth/me?access_token=${access_token}&view=full&client_secret=s3cr3t-in-query&api%5Fkey=pak_in_query`,
    });
    const out = lines.join('');
    const logged = lines.map((l) => JSON.parse(l) as { msg: string; req?: { url?: string } });
    const meLine = logged.find((l) => l.msg === 'incoming request' && l.req?.url?.startsWith('/v1/auth/me'));
    expect(meLine?.req?.url).toBe(
      '/v1/auth/me?access_token=[redacted]&view=full&client_secret=[redacted]&api%5Fkey=[redacted]',
    );
    expect(out).not.toContain('s3cr3t-in-query');
    expect(out).not.toContain('pak_in_query');
    // Named harmlessly, a credential is known by its look: a JWT or a secret of this service; and
    // `;` separates parameters as `&` does.
    await app.inject({
      method: 'GET',
      url: `/v1/auth/me?q=${access_token}&page=2;jwt=abc.def.ghi;x=pak_hidden&y=${encodeURIComponent(refresh_token)}`,
    });
    const second = lines
      .map((l) => JSON.parse(l) as { msg: string; req?: { url?: string } })
      .filter((l) => l.msg === 'incoming request' && l.req?.url?.startsWith('/v1/auth/me?q='));
    expect(second.at(-1)?.req?.url).toBe(
      '/v1/auth/me?q=[redacted]&page=2;jwt=[redacted];x=[redacted]&y=[redacted]',
    );
    // Short credential names, a JWT after `Bearer ` in a value, and a JWT sent as a bare parameter.
    await app.inject({
      method: 'GET',
      url: `/v1/auth/me?pwd=pwd-s3cret&pass=pass-s3cret&pin=pin-s3cret&otp=otp-s3cret&bearer=bearer-s3cret&x=Bearer%20${access_token}&${access_token}&view=full`,
    });
    const third = lines
      .map((l) => JSON.parse(l) as { msg: string; req?: { url?: string } })
      .filter((l) => l.msg === 'incoming request' && l.req?.url?.startsWith('/v1/auth/me?pwd='));
    expect(third.at(-1)?.req?.url).toBe(
      '/v1/auth/me?pwd=[redacted]&pass=[redacted]&pin=[redacted]&otp=[redacted]&bearer=[redacted]&x=[redacted]&[redacted]&view=full',
    );
    expect(out).toContain('"reqId"');
    // Everything logged, the later requests' lines included.
    const all = lines.join('');
    for (const secret of [
      PASSWORD,
      'a wrong password for the log',
      access_token,
      refresh_token,
      'pwd-s3cret',
      'pass-s3cret',
      'pin-s3cret',
      'otp-s3cret',
      'bearer-s3cret',
    ]) {
      expect(all).not.toContain(secret);
    }
  });
});

describe('request lines never carry whom a search or a parameter named', () => {
  it('redacts the users search (`?query=`), parameters named like an address or a search, and values holding an @', async () => {
    const { lines, logger } = capture();
    const app = await buildTestApp({ deps: { logger } });
    const admin = await createAdmin(app);
    const sought = uniqueEmail('sought-person');
    const localPart = sought.split('@')[0]!;
    const urlOf = (prefix: string) =>
      lines
        .map((l) => JSON.parse(l) as { msg: string; req?: { url?: string } })
        .filter((l) => l.msg === 'incoming request' && l.req?.url?.startsWith(prefix))
        .at(-1)?.req?.url;

    const search = await app.inject({
      method: 'GET',
      url: `/v1/users?query=${encodeURIComponent(sought)}&status=active&limit=5`,
      headers: bearer(admin.accessToken),
    });
    expect(search.statusCode, search.body).toBe(200);
    expect(urlOf('/v1/users?query=')).toBe('/v1/users?query=[redacted]&status=active&limit=5');
    // A part of an address, which is what a search usually is, goes as well.
    await app.inject({
      method: 'GET',
      url: `/v1/users?query=${localPart}&limit=5`,
      headers: bearer(admin.accessToken),
    });
    expect(urlOf(`/v1/users?query=`)).toBe('/v1/users?query=[redacted]&limit=5');
    // Whatever a client sends: names of an address, a search or a login, and values (or bare
    // parameters) holding an @, raw or percent-encoded; harmless parameters are kept.
    await app.inject({
      method: 'GET',
      url: `/v1/auth/me?email=${localPart}&q=${localPart}-q&userName=${localPart}-u&view=full&x=${localPart}%40example.org&${localPart}@example.net`,
    });
    expect(urlOf('/v1/auth/me?email=')).toBe(
      '/v1/auth/me?email=[redacted]&q=[redacted]&userName=[redacted]&view=full&x=[redacted]&[redacted]',
    );
    expect(lines.join('')).not.toContain(localPart);
    await app.close();
  });
});

describe("Fastify's request lines", () => {
  const messagesOf = (lines: string[]) => lines.map((l) => (JSON.parse(l) as { msg: string }).msg);

  it('are logged at info and not at warn, through the log controller (no deprecation warning)', async () => {
    const warnings: string[] = [];
    const onWarning = (w: Error & { code?: string }) => warnings.push(`${w.code ?? ''} ${w.message}`);
    process.on('warning', onWarning);
    try {
      const info = capture('info');
      const verbose = await buildTestApp({ deps: { logger: info.logger } });
      await verbose.inject({ method: 'GET', url: '/.well-known/jwks.json' });
      expect(messagesOf(info.lines)).toEqual(
        expect.arrayContaining(['incoming request', 'request completed']),
      );

      const warn = capture('warn');
      const quiet = await buildTestApp({ deps: { logger: warn.logger } });
      await quiet.inject({ method: 'GET', url: '/.well-known/jwks.json' });
      expect(messagesOf(warn.lines)).not.toContain('incoming request');
      expect(messagesOf(warn.lines)).not.toContain('request completed');
      // Warnings are emitted on the next tick.
      await new Promise((r) => setImmediate(r));
    } finally {
      process.off('warning', onWarning);
    }
    expect(warnings.filter((w) => w.includes('FSTDEP'))).toEqual([]);
  });
});

/** Writes `request` on a fresh connection and waits for the server to close it. */
function sendRaw(port: number, request: string): Promise<string> {
  return new Promise((resolve) => {
    const socket = connect(port, '127.0.0.1');
    let received = '';
    socket.on('data', (chunk) => {
      received += chunk.toString();
    });
    socket.on('close', () => resolve(received));
    socket.on('error', () => undefined);
    socket.write(request);
  });
}

describe('requests refused before any route ran', () => {
  it('are counted as unmatched and logged as completed: the router’s refusals and the HTTP parser’s', async () => {
    const LEAKED_JWT = 'eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl';
    const { lines, logger } = capture('info');
    const app = await buildTestApp({ deps: { logger } });
    await app.listen({ port: 0, host: '127.0.0.1' });
    const port = (app.server.address() as AddressInfo).port;
    const badEscape = await app.inject({ method: 'GET', url: '/v1/users/%zz' });
    const tooLong = await app.inject({ method: 'GET', url: `/v1/users/${'a'.repeat(201)}` });
    expect([badEscape.statusCode, tooLong.statusCode]).toEqual([400, 414]);
    expect(await sendRaw(port, 'BR()KEN / HTTP/1.1\r\n\r\n')).toMatch(/^HTTP\/1\.1 400 /);
    expect(
      await sendRaw(
        port,
        `GET /v1/auth/me?access_token=${LEAKED_JWT} HTTP/1.1\r\nHost: x\r\nX-Big: ${'b'.repeat(20_000)}\r\n\r\n`,
      ),
    ).toMatch(/^HTTP\/1\.1 431 /);
    // Node's server answers an Expect it cannot meet before Fastify has the request.
    expect(
      await sendRaw(
        port,
        'PUT /v1/profiles/me HTTP/1.1\r\nHost: x\r\nExpect: 200-ok\r\nContent-Length: 0\r\n\r\n',
      ),
    ).toMatch(/^HTTP\/1\.1 417 /);

    const metrics = (await app.inject({ method: 'GET', url: '/metrics' })).body;
    for (const series of [
      'http_requests_total{method="GET",route="unmatched",status="400"} 1',
      'http_requests_total{method="GET",route="unmatched",status="414"} 1',
      'http_requests_total{method="other",route="unmatched",status="400"} 1',
      'http_requests_total{method="GET",route="unmatched",status="431"} 1',
      'http_requests_total{method="PUT",route="unmatched",status="417"} 1',
    ])
      expect(metrics).toContain(series);

    const logged = lines.map(
      (l) =>
        JSON.parse(l) as {
          level: number;
          msg: string;
          reqId?: string;
          res?: { statusCode?: number };
          req?: { url?: string };
          reason?: string;
        },
    );
    for (const answer of [badEscape, tooLong]) {
      const completed = logged.find(
        (l) => l.msg === 'request completed' && l.reqId === answer.headers['x-request-id'],
      );
      expect(completed, String(answer.statusCode)).toMatchObject({
        level: 30,
        res: { statusCode: answer.statusCode },
      });
    }
    const parser = logged.filter((l) => l.msg === 'request refused by the HTTP parser');
    expect(parser).toEqual([
      expect.objectContaining({ level: 30, res: { statusCode: 400 }, reason: 'HPE_INVALID_METHOD' }),
      expect.objectContaining({
        level: 30,
        res: { statusCode: 431 },
        reason: 'HPE_HEADER_OVERFLOW',
        // The parser's line goes through the same redaction as every request's (SECURITY.md: tokens
        // are never logged).
        req: expect.objectContaining({ method: 'GET', url: '/v1/auth/me?access_token=[redacted]' }),
      }),
    ]);
    expect(logged.filter((l) => l.msg === 'request refused: an expectation it cannot meet')).toEqual([
      expect.objectContaining({
        level: 30,
        res: { statusCode: 417 },
        reason: 'expectation_failed',
        req: expect.objectContaining({ method: 'PUT', url: '/v1/profiles/me' }),
      }),
    ]);
    expect(lines.join('\n')).not.toContain(LEAKED_JWT);
  });
});

describe('an answer its schema cannot write', () => {
  it('is a generic 500 and an error log naming the route and the missing field', async () => {
    const { lines, logger } = capture();
    const app = await buildTestApp({
      deps: { logger },
      beforeReady: (a) => {
        a.withTypeProvider<ZodTypeProvider>().get(
          '/test/incomplete',
          {
            config: { public: true },
            schema: { response: { 200: z.object({ name: z.string(), count: z.number().int() }) } },
          },
          async () => ({ name: 'ada' }) as never,
        );
      },
    });
    const res = await app.inject({ method: 'GET', url: '/test/incomplete' });
    expect(res.statusCode).toBe(500);
    expect(res.json()).toMatchObject({ code: 'internal_error', request_id: res.headers['x-request-id'] });
    const logged = lines.map((l) => JSON.parse(l)).find((l) => l.msg === 'response did not match its schema');
    expect(logged).toMatchObject({ level: 50, reqId: res.headers['x-request-id'] });
    expect(JSON.stringify(logged.err)).toContain('GET /test/incomplete');
    expect(JSON.stringify(logged.err)).toContain('count');
  });
});

describe('CORS from configuration', () => {
  let app: FastifyInstance;
  beforeAll(async () => {
    app = await buildTestApp({ env: { CORS_ORIGINS: 'https://app.example.com' } });
  });

  it('answers preflights for configured origins only', async () => {
    const allowed = await app.inject({
      method: 'OPTIONS',
      url: '/v1/auth/login',
      headers: { origin: 'https://app.example.com', 'access-control-request-method': 'POST' },
    });
    expect(allowed.statusCode).toBeLessThan(300);
    expect(allowed.headers['access-control-allow-origin']).toBe('https://app.example.com');
    // Kept 10 minutes by the browser, not the 5 s it keeps one that says nothing: a page does not
    // preflight every request it sends.
    expect(allowed.headers['access-control-max-age']).toBe('600');
    const denied = await app.inject({
      method: 'OPTIONS',
      url: '/v1/auth/login',
      headers: { origin: 'https://evil.example.com', 'access-control-request-method': 'POST' },
    });
    expect(denied.headers['access-control-allow-origin']).toBeUndefined();
    // An error the router answers before any hook (a path segment over 200 characters) carries them too.
    const long = await app.inject({
      method: 'GET',
      url: `/v1/users/${'a'.repeat(300)}`,
      headers: { origin: 'https://app.example.com' },
    });
    expect(long.statusCode).toBe(414);
    expect(long.headers['access-control-allow-origin']).toBe('https://app.example.com');
    expect(long.headers['access-control-allow-credentials']).toBe('true');
    const longElsewhere = await app.inject({
      method: 'GET',
      url: `/v1/users/${'a'.repeat(300)}`,
      headers: { origin: 'https://evil.example.com' },
    });
    expect(longElsewhere.headers['access-control-allow-origin']).toBeUndefined();
    // Not a complete preflight: no plain-text 400.
    for (const headers of [{}, { origin: 'https://app.example.com' }]) {
      const partial = await app.inject({ method: 'OPTIONS', url: '/v1/auth/login', headers });
      expect(partial.statusCode, JSON.stringify(headers)).toBe(204);
      expect(partial.headers['content-type']).toBeUndefined();
    }
  });

  it('lets the page read a 201’s Location and a 405’s Allow', async () => {
    const origin = { origin: 'https://app.example.com' };
    const admin = await createAdmin(app);
    const created = await app.inject({
      method: 'POST',
      url: '/v1/api-keys',
      headers: { ...bearer(admin.accessToken), ...origin },
      payload: { name: 'from the browser', scopes: ['users:read'] },
    });
    expect(created.statusCode, created.body).toBe(201);
    expect(created.headers.location).toMatch(/^\/v1\/api-keys\//);
    const exposed = (res: { headers: Record<string, unknown> }) =>
      String(res.headers['access-control-expose-headers'])
        .split(',')
        .map((h) => h.trim().toLowerCase());
    expect(exposed(created)).toEqual(expect.arrayContaining(['location', 'x-request-id']));
    const refused = await app.inject({ method: 'PUT', url: '/.well-known/jwks.json', headers: origin });
    expect(refused.statusCode).toBe(405);
    expect(exposed(refused)).toContain('allow');
    // So does the 405 of a method a literal path beside a parametrised one does not take.
    const verify = await app.inject({ method: 'GET', url: '/v1/api-keys/verify', headers: origin });
    expect(verify.statusCode).toBe(405);
    expect(verify.headers.allow).toBe('POST, OPTIONS');
    expect(verify.headers['access-control-allow-origin']).toBe('https://app.example.com');
    expect(exposed(verify)).toContain('allow');
    // The router's own refusals (a path segment over 200 characters) say the same.
    const long = await app.inject({ method: 'GET', url: `/v1/users/${'a'.repeat(300)}`, headers: origin });
    expect(exposed(long)).toEqual(expect.arrayContaining(['location', 'allow']));
  });

  it('names OPTIONS in a 405’s Allow, as every path answers it (the preflight route)', async () => {
    for (const [method, url, allow] of [
      ['GET', '/v1/api-keys/verify', 'POST, OPTIONS'],
      ['PUT', '/.well-known/jwks.json', 'GET, HEAD, OPTIONS'],
      ['PUT', '/v1/users/6f1c1f8e-3f0a-4c55-9d5e-0b8c2f4a7e21', 'GET, HEAD, PATCH, DELETE, OPTIONS'],
      ['DELETE', '/oauth/token', 'POST, OPTIONS'],
    ] as const) {
      const refused = await app.inject({ method, url });
      expect(refused.statusCode, `${method} ${url}`).toBe(405);
      expect(refused.headers.allow, `${method} ${url}`).toBe(allow);
      // What it says is so: OPTIONS is answered there, a preflight or not.
      const options = await app.inject({ method: 'OPTIONS', url });
      expect(options.statusCode, `OPTIONS ${url}`).toBe(204);
    }
    expect((await app.inject({ method: 'GET', url: '/v1/api-keys/verify' })).json().detail).toBe(
      'GET is not allowed on /v1/api-keys/verify; it takes POST, OPTIONS',
    );
    // A path no method takes is still a 404, though OPTIONS is answered there too.
    expect((await app.inject({ method: 'GET', url: '/v1/nothing-here' })).statusCode).toBe(404);
  });

  it('gives the refusals of the hook that runs before the CORS plugin’s its headers too: a compressed body, a NUL', async () => {
    const refusals = (origin?: string) => {
      const headers = origin ? { origin } : {};
      return Promise.all([
        app.inject({
          method: 'POST',
          url: '/v1/auth/login',
          headers: { ...headers, 'content-type': 'application/json', 'content-encoding': 'gzip' },
          payload: '{}',
        }),
        app.inject({ method: 'GET', url: '/v1/roles/admin%00', headers }),
        app.inject({ method: 'GET', url: '/v1/audit-events?type=login%00', headers }),
        app.inject({ method: 'POST', url: '/oauth/token?x=%00', headers }),
      ]);
    };
    const listed = await refusals('https://app.example.com');
    expect(listed.map((r) => r.statusCode)).toEqual([415, 400, 400, 400]);
    for (const res of listed) {
      expect(res.headers['access-control-allow-origin'], res.body).toBe('https://app.example.com');
      expect(res.headers['access-control-allow-credentials']).toBe('true');
      expect(res.headers.vary).toBe('Origin');
      expect(String(res.headers['access-control-expose-headers'])).toContain('x-request-id');
    }
    expect(listed[0]?.headers['content-type']).toContain('application/problem+json');
    expect(listed[3]?.json()).toMatchObject({ error: 'invalid_request' });
    for (const res of [...(await refusals('https://evil.example.com')), ...(await refusals())]) {
      expect(res.statusCode).toBeGreaterThanOrEqual(400);
      expect(res.headers['access-control-allow-origin']).toBeUndefined();
      expect(res.headers['access-control-allow-credentials']).toBeUndefined();
    }
  });

  it('lets the page read the per-IP limit’s X-RateLimit-* headers and a 429’s Retry-After', async () => {
    const limited = await buildTestApp({
      env: { CORS_ORIGINS: 'https://app.example.com', RATE_LIMIT_ENABLED: 'true' },
    });
    const res = await limited.inject({
      method: 'POST',
      url: '/v1/auth/login',
      headers: { origin: 'https://app.example.com' },
      payload: { email: uniqueEmail('cors-limit'), password: 'not the right password' },
    });
    expect(res.statusCode).toBe(401);
    expect(res.headers['access-control-allow-origin']).toBe('https://app.example.com');
    expect(res.headers['x-ratelimit-limit']).toBeDefined();
    const exposed = String(res.headers['access-control-expose-headers'])
      .split(',')
      .map((h) => h.trim().toLowerCase());
    expect(exposed).toEqual(
      expect.arrayContaining([
        'x-ratelimit-limit',
        'x-ratelimit-remaining',
        'x-ratelimit-reset',
        'retry-after',
        'www-authenticate',
      ]),
    );
  });

  it('without CORS_ORIGINS there is no CORS at all: no headers, and a preflight is a method the path does not take', async () => {
    const closed = await buildTestApp();
    const preflight = await closed.inject({
      method: 'OPTIONS',
      url: '/v1/auth/login',
      headers: { origin: 'https://app.example.com', 'access-control-request-method': 'POST' },
    });
    expect(preflight.statusCode).toBe(405);
    // OPTIONS is not answered here, so Allow does not name it.
    expect(preflight.headers.allow).toBe('POST');
    expect(preflight.headers['content-type']).toContain('application/problem+json');
    expect(preflight.headers['access-control-allow-origin']).toBeUndefined();
    const jwks = await closed.inject({
      method: 'GET',
      url: '/.well-known/jwks.json',
      headers: { origin: 'https://app.example.com' },
    });
    expect(jwks.statusCode).toBe(200);
    expect(jwks.headers['access-control-allow-origin']).toBeUndefined();
    expect(jwks.headers.vary).toBeUndefined();
  });
});
