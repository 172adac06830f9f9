import type { FastifyRequest } from 'fastify';
import pino from 'pino';
import { describe, expect, it } from 'vitest';
import { ERROR_CATALOGUE, isDatabaseUnavailable } from '../../src/lib/errors.js';
import { toAppError } from '../../src/plugins/error-handler.js';

const request = { log: pino({ level: 'silent' }), url: '/docs/static/..' } as unknown as FastifyRequest;

describe('toAppError', () => {
  it('answers a value the database refuses as data with a 400, looking through the driver’s wrapping', () => {
    for (const code of ['22001', '22003', '22007', '22008', '22021', '22P02', '22P05']) {
      const driverError = Object.assign(new Error('invalid byte sequence for encoding "UTF8": 0x00'), {
        code,
      });
      const wrapped = new Error('Failed query: insert into ...', { cause: driverError });
      expect(toAppError(wrapped, request)).toMatchObject({ status: 400, code: 'bad_request' });
    }
  });

  it('answers the database being unusable (not accepting connections, dropped, refusing the service) with a 503', () => {
    for (const code of ['55000', '57P04', '3D000', '28P01', '53100', '57P03', '08006']) {
      const driverError = Object.assign(new Error('database "x" is not currently accepting connections'), {
        code,
      });
      const wrapped = new Error('Failed query: select ...', { cause: driverError });
      expect(toAppError(wrapped, request), code).toMatchObject({ status: 503, code: 'service_unavailable' });
    }
  });

  it('answers the database connection reset under a query with a 503', () => {
    // What node-postgres rejects a query with when the server's socket is reset.
    const reset = Object.assign(new Error('read ECONNRESET'), {
      code: 'ECONNRESET',
      errno: -104,
      syscall: 'read',
    });
    const wrapped = new Error('Failed query: select ...', { cause: reset });
    expect(toAppError(wrapped, request)).toMatchObject({ status: 503, code: 'service_unavailable' });
    // And the TLS handshake with the database cut short (no system call there).
    const handshake = Object.assign(
      new Error('Client network socket disconnected before secure TLS connection was established'),
      { code: 'ECONNRESET' },
    );
    expect(toAppError(handshake, request)).toMatchObject({ status: 503, code: 'service_unavailable' });
  });

  it('does not take an HTTP request its client aborted (Node’s ECONNRESET “aborted”) for the database', () => {
    const aborted = Object.assign(new Error('aborted'), { code: 'ECONNRESET' });
    expect(isDatabaseUnavailable(aborted)).toBe(false);
    expect(isDatabaseUnavailable(new Error('request failed', { cause: aborted }))).toBe(false);
  });

  it('keeps a failed query it cannot attribute to the input a 500', () => {
    const driverError = Object.assign(new Error('relation "x" does not exist'), { code: '42P01' });
    expect(toAppError(driverError, request)).toMatchObject({ status: 500, code: 'internal_error' });
  });

  it('gives a framework’s 4xx a code whose status and title are that status’s, whatever the status', () => {
    for (let status = 400; status < 500; status++) {
      const error = toAppError(Object.assign(new Error('refused'), { statusCode: status }), request);
      expect(error.status, String(status)).toBeGreaterThanOrEqual(400);
      expect(error.status, String(status)).toBeLessThan(500);
      expect(ERROR_CATALOGUE[error.code], `${status} → ${error.code}`).toEqual({
        status: error.status,
        title: error.title,
      });
    }
    for (const [status, code] of [
      // @fastify/static's, for a path out of Swagger UI's folder: nothing is there.
      [403, 'not_found'],
      [404, 'not_found'],
      [405, 'method_not_allowed'],
      [412, 'precondition_failed'],
      [416, 'range_not_satisfiable'],
      [418, 'bad_request'],
    ] as const)
      expect(toAppError(Object.assign(new Error('x'), { statusCode: status }), request).code).toBe(code);
  });
});
