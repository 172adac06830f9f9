import { sql } from 'drizzle-orm';
import { drizzle } from 'drizzle-orm/node-postgres';
import pg from 'pg';
import { describe, expect, inject, it } from 'vitest';
import { patchDrizzleTransactions } from '../../src/db/pg-transaction-fix.js';

const within = <T>(ms: number, work: Promise<T>) =>
  Promise.race([work, new Promise<'stuck'>((resolve) => setTimeout(() => resolve('stuck'), ms))]);

/**
 * A transaction whose BEGIN fails (its pooled connection was lost while idle) gives its client back,
 * destroyed: drizzle-orm's own method kept it checked out for ever, and a pool of one then answered
 * nothing more, and its `end()` (the service's shutdown) never returned.
 */
describe.skipIf(!inject('databaseUrl'))('a transaction whose BEGIN fails (PostgreSQL)', () => {
  it('releases its connection, so the pool goes on and ends', async () => {
    patchDrizzleTransactions();
    const pool = new pg.Pool({ connectionString: inject('databaseUrl'), max: 1 });
    const db = drizzle(pool);
    // The pool's only client fails its next BEGIN, as a connection killed while idle does.
    const client = await pool.connect();
    const query = client.query.bind(client) as (...args: unknown[]) => unknown;
    let failed = 0;
    (client as unknown as { query: unknown }).query = (...args: unknown[]) => {
      const text = typeof args[0] === 'string' ? args[0] : (args[0] as { text?: string })?.text;
      if (failed === 0 && /^begin/i.test(text ?? '')) {
        failed += 1;
        return Promise.reject(
          Object.assign(new Error('Connection terminated unexpectedly'), { code: '57P01' }),
        );
      }
      return query(...args);
    };
    client.release();

    await expect(db.transaction(async (tx) => tx.execute(sql`select 1`))).rejects.toThrow(/begin/);
    expect(failed).toBe(1);
    // The broken client was destroyed: the next transaction gets a new connection at once.
    const next = await within(
      3000,
      db.transaction(async (tx) => (await tx.execute(sql`select 1 as one`)).rows),
    );
    expect(next).toEqual([{ one: 1 }]);
    expect(
      await within(
        3000,
        pool.end().then(() => 'ended'),
      ),
    ).toBe('ended');
  });
});
