import { randomBytes } from 'node:crypto';
import pg from 'pg';
import { describe, expect, inject, it } from 'vitest';
import { waitForLockWaiters } from '../support/database.js';

/**
 * The tests' helper that waits for statements to queue behind a lock (test/support/database.ts),
 * asked through the client that holds the lock, in its transaction: PostgreSQL keeps the
 * backends pg_stat_activity listed at a transaction's first read until it ends (their wait events are
 * read live, but a backend connected since is not listed), so a helper that only polls never sees a
 * waiter on a connection opened after its first poll.
 */
describe.skipIf(!inject('databaseUrl'))('waitForLockWaiters', () => {
  it('sees a statement that comes to wait after its transaction first read pg_stat_activity', async () => {
    const url = inject('databaseUrl')!;
    const table = `lock_waiters_${randomBytes(4).toString('hex')}`;
    const holder = new pg.Client({ connectionString: url });
    const waiter = new pg.Client({ connectionString: url });
    await holder.connect();
    try {
      await holder.query(`CREATE TABLE ${table} (id int)`);
      await holder.query('BEGIN');
      await holder.query(`LOCK TABLE ${table} IN ACCESS EXCLUSIVE MODE`);
      // The transaction's first look at the backends: nobody waits yet.
      const { rows } = await holder.query<{ n: number }>(
        `SELECT count(*)::int AS n FROM pg_stat_activity
          WHERE datname = current_database() AND cardinality(pg_blocking_pids(pid)) > 0`,
      );
      expect(rows[0]!.n).toBe(0);
      // A backend that was not there then (a pool's new connection, typically) comes to wait.
      await waiter.connect();
      const blocked = waiter.query(`SELECT * FROM ${table}`);
      const { rows: pids } = await holder.query<{ pid: number }>('SELECT pg_backend_pid() AS pid');
      await waitForLockWaiters(holder, 1, pids[0]!.pid);
      await holder.query('COMMIT');
      await blocked;
    } finally {
      await holder.query('ROLLBACK').catch(() => undefined);
      await holder.query(`DROP TABLE IF EXISTS ${table}`).catch(() => undefined);
      await holder.end();
      await waiter.end().catch(() => undefined);
    }
  });
});
