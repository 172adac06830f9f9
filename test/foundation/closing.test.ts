import { type AddressInfo, connect } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import type { FastifyInstance } from 'fastify';
import { expect, it } from 'vitest';
import { buildTestApp } from '../support/app.js';

/**
 * A request that arrives on an open connection while the server closes (after the drain, SIGTERM)
 * is refused as every other 503 is: problem+json with Retry-After, and the connection closed, while
 * the request in flight before it finishes.
 */
it('answers a request arriving while the server closes with a 503 problem+json, Retry-After and Connection: close', async () => {
  const app = await buildTestApp();
  await app.listen({ port: 0, host: '127.0.0.1' });
  const { port } = app.server.address() as AddressInfo;

  const arrived = headsRead(app, 1);
  const login = loginInFlight(port);
  await arrived;
  const closed = app.close();
  await refusingNewRequests(app);
  // The rest of the body, and a second request behind it on the same connection.
  const responses = await login.finish('GET /v1/auth/me HTTP/1.1\r\nHost: localhost\r\n\r\n');
  await closed;

  const received = responses.join('');
  expect(responses, received).toHaveLength(2);
  // The login in flight got its real answer (no such account).
  expect(responses[0]).toMatch(/^HTTP\/1\.1 401 /);
  const [head, payload] = responses[1]!.split('\r\n\r\n') as [string, string];
  expect(head).toMatch(/^HTTP\/1\.1 503 /);
  expect(head).toMatch(/\r\ncontent-type: application\/problem\+json/i);
  expect(head).toMatch(/\r\nretry-after: 1\r\n/i);
  expect(head).toMatch(/\r\nconnection: close\r\n/i);
  expect(JSON.parse(payload)).toMatchObject({ status: 503, code: 'service_unavailable' });
});

/**
 * Resolves once the server has read the heads of `count` more requests (their bodies may still be
 * coming): what a fixed wait guessed at, and missed on a busy machine.
 */
function headsRead(app: FastifyInstance, count: number): Promise<void> {
  return new Promise((resolve) => {
    let seen = 0;
    const onRequest = () => {
      if (++seen < count) return;
      app.server.off('request', onRequest);
      resolve();
    };
    app.server.on('request', onRequest);
  });
}

/**
 * Resolves once `app.close()` has got as far as refusing new requests: its preClose hooks have run
 * (the app's marks it closing), and only then does Fastify stop the server listening.
 */
async function refusingNewRequests(app: FastifyInstance): Promise<void> {
  for (const deadline = Date.now() + 10_000; app.server.listening; await sleep(10))
    if (Date.now() > deadline) throw new Error('the app did not start closing within 10 s');
}

/** Opens a connection with a login in flight (headers read, body still coming); `finish` sends the rest. */
function loginInFlight(port: number) {
  const body = JSON.stringify({ email: 'nobody@example.test', password: 'not the right password' });
  const socket = connect(port, '127.0.0.1');
  let received = '';
  socket.on('data', (chunk) => {
    received += chunk.toString();
  });
  const ended = new Promise<void>((resolve) => socket.on('close', () => resolve()));
  socket.write(
    `POST /v1/auth/login HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\n\r\n${body.slice(0, 10)}`,
  );
  return {
    /** Sends the rest of the body and `next` behind it; the connection's answers, once it closed. */
    async finish(next: string): Promise<string[]> {
      socket.write(`${body.slice(10)}${next}`);
      await Promise.race([ended, sleep(5000)]);
      socket.destroy();
      return received.split(/(?=HTTP\/1\.1 )/);
    },
  };
}

it('gives that 503 a listed origin’s CORS headers, so its page reads it, and no other origin’s', async () => {
  const app = await buildTestApp({ env: { CORS_ORIGINS: 'https://app.example.com' } });
  await app.listen({ port: 0, host: '127.0.0.1' });
  const { port } = app.server.address() as AddressInfo;
  const arrived = headsRead(app, 2);
  const listed = loginInFlight(port);
  const other = loginInFlight(port);
  await arrived;
  const closed = app.close();
  await refusingNewRequests(app);
  const next = (origin: string) => `GET /v1/auth/me HTTP/1.1\r\nHost: localhost\r\nOrigin: ${origin}\r\n\r\n`;
  const [fromListed, fromOther] = await Promise.all([
    listed.finish(next('https://app.example.com')),
    other.finish(next('https://evil.example.com')),
  ]);
  await closed;

  const head = (responses: string[]) => {
    expect(responses, responses.join('')).toHaveLength(2);
    expect(responses[1]).toMatch(/^HTTP\/1\.1 503 /);
    return responses[1]!.split('\r\n\r\n')[0]!;
  };
  const listedHead = head(fromListed);
  expect(listedHead).toMatch(/\r\naccess-control-allow-origin: https:\/\/app\.example\.com\r\n/i);
  expect(listedHead).toMatch(/\r\naccess-control-allow-credentials: true\r\n/i);
  expect(listedHead).toMatch(/\r\nvary: Origin\r\n/i);
  expect(listedHead).toMatch(/\r\naccess-control-expose-headers: [^\r]*retry-after/i);
  expect(head(fromOther)).not.toMatch(/access-control-allow-origin/i);
});
