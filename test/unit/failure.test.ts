import { describe, expect, it } from 'vitest';
import { ConfigError } from '../../src/config.js';
import { databaseLocation, describeFailure, isOperational } from '../../src/lib/failure.js';

const withCode = (message: string, code: string) => Object.assign(new Error(message), { code });

describe('failures told in one line', () => {
  it('tells the operator’s conditions in one line and keeps the code’s faults for their stack', () => {
    for (const err of [
      withCode('connect ECONNREFUSED 127.0.0.1:1', 'ECONNREFUSED'),
      withCode('listen EADDRINUSE: address already in use 0.0.0.0:8000', 'EADDRINUSE'),
      withCode('database "x" does not exist', '3D000'),
      withCode('password authentication failed for user "x"', '28P01'),
      withCode('the database system is starting up', '57P03'),
      new Error('Connection terminated unexpectedly'),
      // A server (or a proxy) that accepts the connection and never answers: pg's Client and Pool.
      new Error('timeout expired'),
      new Error('timeout exceeded when trying to connect'),
      withCode('self-signed certificate', 'DEPTH_ZERO_SELF_SIGNED_CERT'),
      withCode('certificate has expired', 'CERT_HAS_EXPIRED'),
      new Error('The server does not support SSL connections'),
      new ConfigError(['PORT: must be a whole number']),
    ])
      expect(isOperational(err), String(err)).toBe(true);
    for (const err of [
      withCode("The decorator 'x' has already been added!", 'FST_ERR_DEC_ALREADY_PRESENT'),
      withCode('The "path" argument must be of type string', 'ERR_INVALID_ARG_TYPE'),
      withCode('column "nope" does not exist', '42703'),
      new TypeError("Cannot read properties of undefined (reading 'id')"),
    ])
      expect(isOperational(err), String(err)).toBe(false);
  });

  it('names the database it could not reach, never its password', () => {
    const where = databaseLocation('postgres://app:s3cret@db.internal:6432/auth');
    expect(where).toBe('db.internal:6432/auth');
    expect(describeFailure(new Error('Connection terminated unexpectedly'), where)).toBe(
      'error: cannot connect to the database at db.internal:6432/auth: Connection terminated unexpectedly',
    );
    expect(describeFailure(new Error('timeout expired'), where)).toBe(
      'error: cannot connect to the database at db.internal:6432/auth: timeout expired',
    );
    expect(describeFailure(withCode('self-signed certificate', 'DEPTH_ZERO_SELF_SIGNED_CERT'), where)).toBe(
      'error: cannot connect to the database at db.internal:6432/auth: self-signed certificate',
    );
    expect(describeFailure(withCode('database "x" does not exist', '3D000'))).toBe(
      'error: database "x" does not exist (3D000)',
    );
  });
});
