import type { FastifyInstance } from 'fastify';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import { buildTestApp } from '../support/app.js';
import { login, registerUser } from '../support/factories.js';

/**
 * A transaction is one pooled connection, which runs one query at a time: node-postgres queues a query
 * sent while another is in flight (deprecated; pg 9 makes it an error), so code must never issue the
 * queries of a transaction concurrently (Promise.all over `tx`). Every query any connection is asked
 * to run while it is still busy is recorded here, with its stack.
 */
describe.skipIf(!inject('databaseUrl'))('one query at a time per connection (PostgreSQL)', () => {
  type Busy = { _queryQueue: unknown[]; _getActiveQuery(): unknown };
  const original = pg.Client.prototype.query;
  const overlapping: string[] = [];
  let app: FastifyInstance;

  beforeAll(async () => {
    app = await buildTestApp();
    pg.Client.prototype.query = function (this: pg.Client & Busy, ...args: unknown[]) {
      if (this._getActiveQuery() || this._queryQueue.length > 0) overlapping.push(new Error().stack ?? '');
      return (original as (...a: unknown[]) => unknown).apply(this, args);
    } as typeof original;
  });
  afterAll(() => {
    pg.Client.prototype.query = original;
  });

  it('logout of every session revokes them all without overlapping queries on the transaction', async () => {
    const user = await registerUser(app, 'overlap');
    const others = [await login(app, user.email), await login(app, user.email), await login(app, user.email)];
    overlapping.length = 0;
    const out = await app.inject({
      method: 'POST',
      url: '/v1/auth/logout',
      headers: { authorization: `Bearer ${user.accessToken}` },
      payload: { scope: 'all' },
    });
    expect(out.statusCode).toBe(204);
    expect(overlapping).toEqual([]);
    for (const s of others) {
      const me = await app.inject({
        method: 'GET',
        url: '/v1/auth/me',
        headers: { authorization: `Bearer ${s.session.access_token}` },
      });
      expect(me.statusCode).toBe(401);
    }
  });
});
