import { connect } from 'node:net';
import type { AddressInfo } from 'node:net';
import type { FastifyInstance } from 'fastify';
import { beforeAll, describe, expect, it } from 'vitest';
import { buildTestApp } from '../support/app.js';

/** What a raw socket receives until the server closes it (or `waitMs` passes), and whether it closed. */
function trickle(
  port: number,
  request: string,
  waitMs: number,
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
  });
}

describe('slow clients (REQUEST_TIMEOUT_MS)', () => {
  let app: FastifyInstance;
  let port: number;
  beforeAll(async () => {
    app = await buildTestApp({ env: { REQUEST_TIMEOUT_MS: '1000' } });
    await app.listen({ port: 0, host: '127.0.0.1' });
    port = (app.server.address() as AddressInfo).port;
  });

  it('answers 408 and closes a connection whose body never finishes arriving', async () => {
    const started = Date.now();
    const { received, closed } = await trickle(
      port,
      'POST /v1/auth/login HTTP/1.1\r\nHost: auth.test\r\nContent-Type: application/json\r\n' +
        'Content-Length: 100\r\n\r\n{"email":',
      5000,
    );
    expect(closed).toBe(true);
    expect(received).toMatch(/^HTTP\/1\.1 408/);
    expect(Date.now() - started).toBeLessThan(3500);
  });

  it('does the same to one whose headers never finish', async () => {
    const { received, closed } = await trickle(
      port,
      'GET /health/live HTTP/1.1\r\nHost: auth.test\r\n',
      5000,
    );
    expect(closed).toBe(true);
    expect(received).toMatch(/^HTTP\/1\.1 408/);
  });

  it('keeps an idle keep-alive connection between whole requests', async () => {
    const { received } = await trickle(port, 'GET /health/live HTTP/1.1\r\nHost: auth.test\r\n\r\n', 2500);
    expect(received).toMatch(/^HTTP\/1\.1 200/);
    expect(received).not.toMatch(/408/);
  });
});
