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

  it('leaves a connection the client reset to Node', () => {
    const { socket, written } = fakeSocket();
    answerClientError(parserError('ECONNRESET'), socket);
    expect(written).toEqual([]);
    expect(socket.destroyed).toBe(false);
  });
});
