import type { FastifyRequest } from 'fastify';
import pino from 'pino';
import { describe, expect, it } from 'vitest';
import { toAppError } from '../../src/plugins/error-handler.js';

const request = { log: pino({ level: 'silent' }) } as unknown as FastifyRequest;

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

  it('keeps a failed query it cannot attribute to the input a 500', () => {
    const driverError = Object.assign(new Error('relation "x" does not exist'), { code: '42P01' });
    expect(toAppError(driverError, request)).toMatchObject({ status: 500, code: 'internal_error' });
  });
});
