import { connect } from 'node:net';
import type { AddressInfo } from 'node:net';
import type { FastifyInstance } from 'fastify';
import { beforeAll, describe, expect, it } from 'vitest';
import { buildTestApp } from '../support/app.js';
import { captureLogs } from '../support/logs.js';

/** What a raw socket receives until the server closes it (or `waitMs` passes), and whether it closed. */
function trickle(
  port: number,
  request: string,
  waitMs: number,
  /** Half-closes the connection this long after writing (a body that breaks off). */
  endAfterMs?: number,
): Promise<{ received: string; closed: boolean }> {
  return new Promise((resolve) => {
    const socket = connect(port, '127.0.0.1');
    let received = '';
    const timer = setTimeout(() => {
      socket.destroy();
      resolve({ received, closed: false });
    }, waitMs);
    socket.on('data', (chunk) => {
      received += chunk.toString();
    });
    socket.on('close', () => {
      clearTimeout(timer);
      resolve({ received, closed: true });
    });
    socket.on('error', () => undefined);
    socket.write(request);
    if (endAfterMs !== undefined) setTimeout(() => socket.end(), endAfterMs);
  });
}

/** The status line, headers and JSON body of a raw HTTP answer. */
function parseAnswer(raw: string) {
  const [head = '', body = ''] = raw.split('\r\n\r\n');
  const [statusLine = '', ...lines] = head.split('\r\n');
  const headers = Object.fromEntries(
    lines.map((l) => [l.slice(0, l.indexOf(':')).toLowerCase(), l.slice(l.indexOf(':') + 1).trim()]),
  );
  return { status: Number(statusLine.split(' ')[1]), headers, body: body ? JSON.parse(body) : undefined };
}

describe('slow and malformed clients (REQUEST_TIMEOUT_MS, HTTP parser errors)', () => {
  let app: FastifyInstance;
  let port: number;
  beforeAll(async () => {
    app = await buildTestApp({
      env: { REQUEST_TIMEOUT_MS: '1000', CORS_ORIGINS: 'https://app.example.com' },
    });
    await app.listen({ port: 0, host: '127.0.0.1' });
    port = (app.server.address() as AddressInfo).port;
  });

  it('answers 408 and closes a connection whose body never finishes arriving', async () => {
    const started = Date.now();
    const { received, closed } = await trickle(
      port,
      'POST /v1/auth/login HTTP/1.1\r\nHost: auth.test\r\nContent-Type: application/json\r\n' +
        'Content-Length: 100\r\n\r\n{"email":',
      8000,
    );
    expect(closed).toBe(true);
    expect(received).toMatch(/^HTTP\/1\.1 408/);
    expect(Date.now() - started).toBeLessThan(6000);
    const answer = parseAnswer(received);
    expect(answer.headers['content-type']).toMatch(/^application\/problem\+json/);
    expect(answer.headers['x-content-type-options']).toBe('nosniff');
    expect(answer.body).toMatchObject({ status: 408, code: 'request_timeout' });
  });

  it('does the same to one whose headers never finish', async () => {
    const { received, closed } = await trickle(
      port,
      'GET /health/live HTTP/1.1\r\nHost: auth.test\r\n',
      8000,
    );
    expect(closed).toBe(true);
    expect(received).toMatch(/^HTTP\/1\.1 408/);
  });

  it('keeps an idle keep-alive connection between whole requests', async () => {
    const { received } = await trickle(port, 'GET /health/live HTTP/1.1\r\nHost: auth.test\r\n\r\n', 2500);
    expect(received).toMatch(/^HTTP\/1\.1 200/);
    // No second answer on the idle connection: a 408's status line, or its problem's code (a bare /408/
    // also matched a request id that happened to hold those digits).
    expect(received).not.toMatch(/HTTP\/1\.1 408|request_timeout/);
  });

  it('answers what the HTTP parser refuses in problem+json and closes the connection', async () => {
    const cases = [
      {
        raw: 'GET /health/live HTTP/1.1\r\nHost: auth.test\r\nX-Bad: a\u0001b\r\n\r\n',
        status: 400,
        code: 'bad_request',
      },
      { raw: 'NOT HTTP AT ALL\r\n\r\n', status: 400, code: 'bad_request' },
      {
        raw: 'GET / HTTP/1.1\r\nHost: auth.test\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n',
        status: 400,
        code: 'bad_request',
      },
      {
        raw: `GET /health/live HTTP/1.1\r\nHost: auth.test\r\nX-Big: ${'a'.repeat(20_000)}\r\n\r\n`,
        status: 431,
        code: 'headers_too_large',
      },
    ];
    for (const { raw, status, code } of cases) {
      const { received, closed } = await trickle(port, raw, 6000);
      expect(closed).toBe(true);
      const answer = parseAnswer(received);
      expect(answer.status).toBe(status);
      expect(answer.headers['content-type']).toMatch(/^application\/problem\+json/);
      // Never stored, as every error answer (Pragma too).
      expect(answer.headers['cache-control']).toBe('no-store');
      expect(answer.headers.pragma).toBe('no-cache');
      expect(answer.body).toMatchObject({ status, code, type: `urn:paservices:auth:problem:${code}` });
    }
  });

  it('answers what the HTTP parser refuses under /oauth in RFC 6749 form, not stored', async () => {
    for (const [raw, status] of [
      [`POST /oauth/token HTTP/1.1\r\nHost: auth.test\r\nX-Big: ${'a'.repeat(20_000)}\r\n\r\n`, 431],
      [
        'POST http://auth.test/oauth/introspect HTTP/1.1\r\nHost: auth.test\r\nContent-Length: abc\r\n\r\n',
        400,
      ],
    ] as const) {
      const { received, closed } = await trickle(port, raw, 6000);
      expect(closed).toBe(true);
      const answer = parseAnswer(received);
      expect(answer.status).toBe(status);
      expect(answer.headers['content-type']).toMatch(/^application\/json/);
      expect(answer.headers['cache-control']).toBe('no-store');
      expect(answer.headers.pragma).toBe('no-cache');
      expect(answer.body).toMatchObject({ error: 'invalid_request' });
    }
  });

  it('lets a listed origin’s page read what the parser refused: headers over the limit sent in one piece, a body that took too long', async () => {
    const bigHead = (origins: string[]) =>
      `GET /v1/auth/me HTTP/1.1\r\nHost: auth.test\r\n${origins.map((o) => `Origin: ${o}\r\n`).join('')}` +
      `Cookie: ${'c'.repeat(20_000)}\r\n\r\n`;
    const listed = parseAnswer((await trickle(port, bigHead(['https://app.example.com']), 6000)).received);
    expect(listed.status).toBe(431);
    expect(listed.headers).toMatchObject({
      'access-control-allow-origin': 'https://app.example.com',
      'access-control-allow-credentials': 'true',
      vary: 'Origin',
    });
    expect(listed.headers['access-control-expose-headers']).toContain('x-request-id');
    expect(listed.body).toMatchObject({ status: 431, code: 'headers_too_large' });
    // An origin not listed, none, or two: no CORS headers, as @fastify/cors would answer.
    for (const origins of [
      ['https://evil.example.com'],
      [],
      ['https://app.example.com', 'https://evil.example.com'],
    ]) {
      const answer = parseAnswer((await trickle(port, bigHead(origins), 6000)).received);
      expect(answer.status, origins.join()).toBe(431);
      expect(answer.headers['access-control-allow-origin'], origins.join()).toBeUndefined();
    }
    // A body that never finishes: the head was read, its Origin with it.
    const slow = await trickle(
      port,
      'POST /v1/auth/login HTTP/1.1\r\nHost: auth.test\r\nOrigin: https://app.example.com\r\n' +
        'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"email":',
      8000,
    );
    const timedOut = parseAnswer(slow.received);
    expect(timedOut.status).toBe(408);
    expect(timedOut.headers['access-control-allow-origin']).toBe('https://app.example.com');
  });

  it('answers a body that breaks off (the client half-closes) by the request’s path: RFC 6749 form under /oauth', async () => {
    const head = (path: string, type: string) =>
      `POST ${path} HTTP/1.1\r\nHost: auth.test\r\nContent-Type: ${type}\r\nContent-Length: 100\r\n\r\n`;
    const oauth = await trickle(
      port,
      `${head('/oauth/token', 'application/x-www-form-urlencoded')}grant_type=x`,
      6000,
      100,
    );
    expect(oauth.closed).toBe(true);
    const answer = parseAnswer(oauth.received);
    expect(answer.status).toBe(400);
    expect(answer.headers['content-type']).toMatch(/^application\/json/);
    expect(answer.body).toMatchObject({ error: 'invalid_request' });
    const other = await trickle(port, `${head('/v1/auth/login', 'application/json')}{"email":`, 6000, 100);
    expect(other.closed).toBe(true);
    const problem = parseAnswer(other.received);
    expect(problem.status).toBe(400);
    expect(problem.headers['content-type']).toMatch(/^application\/problem\+json/);
  });
});

describe('an Expect other than 100-continue (RFC 9110 §10.1.1), which Node answers before Fastify', () => {
  let app: FastifyInstance;
  let port: number;
  beforeAll(async () => {
    app = await buildTestApp({ env: { CORS_ORIGINS: 'https://app.example.com' } });
    await app.listen({ port: 0, host: '127.0.0.1' });
    port = (app.server.address() as AddressInfo).port;
  });
  const expecting = (path: string, origin?: string) =>
    `POST ${path} HTTP/1.1\r\nHost: auth.test\r\n${origin ? `Origin: ${origin}\r\n` : ''}` +
    'Content-Type: application/json\r\nExpect: 200-ok\r\nContent-Length: 2\r\n\r\n{}';

  it('is a 417 in problem+json with the API headers, not Node’s bare one, and the connection is closed', async () => {
    const { received, closed } = await trickle(port, expecting('/v1/auth/login'), 6000);
    const answer = parseAnswer(received);
    expect(answer.status).toBe(417);
    expect(closed).toBe(true);
    expect(answer.headers).toMatchObject({
      'content-type': 'application/problem+json; charset=utf-8',
      'cache-control': 'no-store',
      pragma: 'no-cache',
      'x-content-type-options': 'nosniff',
      'content-security-policy': "default-src 'none'; frame-ancestors 'none'",
    });
    expect(answer.headers['access-control-allow-origin']).toBeUndefined();
    expect(answer.body).toMatchObject({
      status: 417,
      code: 'expectation_failed',
      type: 'urn:paservices:auth:problem:expectation_failed',
    });
  });

  it('is RFC 6749’s error under /oauth, never stored; a listed origin’s page reads it, another’s does not', async () => {
    const oauth = parseAnswer(
      (await trickle(port, expecting('/oauth/token', 'https://app.example.com'), 6000)).received,
    );
    expect(oauth.status).toBe(417);
    expect(oauth.headers).toMatchObject({
      'content-type': 'application/json; charset=utf-8',
      'cache-control': 'no-store',
      pragma: 'no-cache',
      'access-control-allow-origin': 'https://app.example.com',
      'access-control-allow-credentials': 'true',
      vary: 'Origin',
    });
    expect(oauth.body).toMatchObject({ error: 'invalid_request' });
    const other = parseAnswer(
      (await trickle(port, expecting('/v1/auth/login', 'https://evil.example.com'), 6000)).received,
    );
    expect(other.status).toBe(417);
    expect(other.headers['access-control-allow-origin']).toBeUndefined();
  });

  it('leaves 100-continue to Node: the request goes on', async () => {
    const { received } = await trickle(
      port,
      'POST /v1/auth/login HTTP/1.1\r\nHost: auth.test\r\nContent-Type: application/json\r\n' +
        'Expect: 100-continue\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}',
      6000,
    );
    expect(received).toMatch(/^HTTP\/1\.1 100 Continue\r\n\r\nHTTP\/1\.1 400 /);
  });
});

describe('a client that closes its connection before its body has arrived', () => {
  it('is logged as that, at info, not as the database being unavailable', async () => {
    const logs = captureLogs('info');
    const app = await buildTestApp({ deps: { logger: logs.logger } });
    await app.listen({ port: 0, host: '127.0.0.1' });
    const { port } = app.server.address() as AddressInfo;
    const socket = connect(port, '127.0.0.1');
    socket.on('error', () => undefined);
    socket.write(
      'POST /v1/auth/login HTTP/1.1\r\nHost: auth.test\r\nContent-Type: application/json\r\n' +
        'Content-Length: 100\r\n\r\n{"email":',
    );
    type Entry = { level: number; msg: string; reqId?: string };
    const entries = () => logs.lines.map((l) => JSON.parse(l) as Entry);
    await expect.poll(() => entries().some((entry) => entry.msg === 'incoming request')).toBe(true);
    socket.destroy();
    // What the service says of the request once the client has gone.
    const outcome = () => entries().filter((entry) => entry.reqId && entry.msg !== 'incoming request');
    await expect.poll(() => outcome().length).toBeGreaterThan(0);
    expect(outcome()).toEqual([
      expect.objectContaining({ level: 30, msg: 'the client closed the connection before its body arrived' }),
    ]);
  });
});
