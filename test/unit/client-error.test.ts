import { Duplex } from 'node:stream';
import { describe, expect, it } from 'vitest';
import { answerClientError } from '../../src/plugins/error-handler.js';

/**
 * What Node's HTTP parser refuses is answered on the raw socket (test/foundation/slow-clients and
 * bad-input drive it over real connections). Here, the cases a real connection cannot provoke on
 * demand: a refused request pipelined behind a response that has already started.
 */

function fakeSocket(inFlight?: { headersSent: boolean }) {
  const written: string[] = [];
  const socket = new Duplex({
    read() {},
    write(chunk: Buffer, _encoding, done) {
      written.push(chunk.toString('utf8'));
      done();
    },
  });
  // Node's HTTP server keeps the response being written on the socket as `_httpMessage`.
  Object.assign(socket, { _httpMessage: inFlight ?? null });
  socket.on('error', () => {});
  return { socket, written };
}

const parserError = (code: string) => Object.assign(new Error(code), { code });

describe('answerClientError', () => {
  it('answers a refused request with problem+json and the API headers, then closes', () => {
    const { socket, written } = fakeSocket();
    answerClientError(parserError('HPE_INVALID_METHOD'), socket);
    expect(socket.destroyed).toBe(true);
    const answer = written.join('');
    expect(answer).toMatch(/^HTTP\/1\.1 400 Bad Request\r\n/);
    expect(answer).toContain('content-type: application/problem+json');
    expect(answer).toContain('x-content-type-options: nosniff');
    expect(answer).toContain('connection: close');
    const body = JSON.parse(answer.slice(answer.indexOf('\r\n\r\n') + 4));
    expect(body).toMatchObject({ status: 400, code: 'bad_request' });
  });

  it('says 431 for headers over the limit and 408 for a request that took too long', () => {
    for (const [code, status] of [
      ['HPE_HEADER_OVERFLOW', 431],
      ['ERR_HTTP_REQUEST_TIMEOUT', 408],
    ] as const) {
      const { socket, written } = fakeSocket();
      answerClientError(parserError(code), socket);
      expect(written.join('')).toMatch(new RegExp(`^HTTP/1\\.1 ${status} `));
    }
  });

  it('writes nothing into a connection whose current response has started, and closes it', () => {
    const { socket, written } = fakeSocket({ headersSent: true });
    answerClientError(parserError('HPE_INVALID_METHOD'), socket);
    expect(written).toEqual([]);
    expect(socket.destroyed).toBe(true);
  });

  it('answers when the response before it has not started yet', () => {
    const { socket, written } = fakeSocket({ headersSent: false });
    answerClientError(parserError('HPE_INVALID_METHOD'), socket);
    expect(written.join('')).toMatch(/^HTTP\/1\.1 400 /);
  });

  it('adds CORS headers for an Origin it can read in the first head of the refused bytes, and only there', () => {
    const cors = (origin: string) =>
      origin === 'https://app.example.com' ? { 'access-control-allow-origin': origin } : undefined;
    const answerTo = (rawPacket: string) => {
      const { socket, written } = fakeSocket();
      const err = Object.assign(parserError('HPE_HEADER_OVERFLOW'), { rawPacket: Buffer.from(rawPacket) });
      answerClientError(err, socket, undefined, cors);
      return written.join('');
    };
    const big = 'c'.repeat(100);
    expect(answerTo(`GET / HTTP/1.1\r\norigin:  https://app.example.com \r\nCookie: ${big}`)).toContain(
      'access-control-allow-origin: https://app.example.com\r\n',
    );
    for (const raw of [
      // A later piece of a head that reached Node in pieces: the Origin line was in an earlier one.
      `${big}\r\nX-More: ${big}`,
      // Past the head's end (a body, a request behind it), or not a header line of its own.
      `GET / HTTP/1.1\r\nCookie: ${big}\r\n\r\nOrigin: https://app.example.com\r\n`,
      `GET / HTTP/1.1\r\nX-Origin: https://app.example.com\r\nCookie: ${big}`,
      `GET / HTTP/1.1\r\nX: a origin: https://app.example.com\r\nCookie: ${big}`,
    ])
      expect(answerTo(raw), raw.slice(0, 40)).not.toContain('access-control-allow-origin');
  });

  it('leaves a connection the client reset to Node', () => {
    const { socket, written } = fakeSocket();
    answerClientError(parserError('ECONNRESET'), socket);
    expect(written).toEqual([]);
    expect(socket.destroyed).toBe(false);
  });
});
