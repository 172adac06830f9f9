import { type SQL, sql } from 'drizzle-orm';
import { NodePgSession, NodePgTransaction } from 'drizzle-orm/node-postgres/session';
import pg from 'pg';

interface PooledSession {
  client: unknown;
  dialect: unknown;
  schema: unknown;
  options: unknown;
}
interface Tx {
  execute(query: SQL): Promise<unknown>;
  getTransactionConfigSQL(config: unknown): SQL;
}
type SessionCtor = new (client: unknown, dialect: unknown, schema: unknown, options: unknown) => unknown;
type TxCtor = new (dialect: unknown, session: unknown, schema: unknown) => Tx;

/**
 * node-postgres's words for a connection that carries nothing more: its query_timeout passed (a
 * server that stopped answering altogether), or it ended. A ROLLBACK there would wait a query_timeout
 * again, or fail: the client is dropped instead, and the server rolls the transaction back when the
 * connection closes (what it never got a COMMIT for, it never commits).
 */
const CONNECTION_GONE =
  /^(?:Query read timeout|Connection terminated|Client has encountered a connection error)/;

function connectionGone(err: unknown): boolean {
  let cur: unknown = err;
  for (let depth = 0; cur && depth < 5; depth++) {
    const message = (cur as { message?: unknown }).message;
    if (typeof message === 'string' && CONNECTION_GONE.test(message)) return true;
    cur = (cur as { cause?: unknown }).cause;
  }
  return false;
}

let patched = false;
const transactionTimeouts = new WeakMap<pg.Pool, number>();

/**
 * A transaction on `pool` still running `ms` after its BEGIN is rolled back rather than committed: its
 * `run` finished too late (it fails with SQLSTATE 25P04, PostgreSQL 17's transaction_timeout, a 503).
 * So what a transaction writes is visible within that time of its BEGIN or never, which the audit
 * log's `complete_until` counts on: PostgreSQL 15 bounds each statement and each wait between
 * statements, not the transaction.
 */
export function setTransactionTimeout(pool: pg.Pool, ms: number): void {
  transactionTimeouts.set(pool, ms);
}

export class TransactionTimeoutError extends Error {
  readonly code = '25P04';
  constructor(ms: number, tookMs: number) {
    super(`transaction rolled back: still running ${Math.round(tookMs)} ms after its BEGIN (limit ${ms} ms)`);
    this.name = 'TransactionTimeoutError';
  }
}

/**
 * drizzle-orm 0.45's `NodePgSession.transaction` sends BEGIN before its `try`: a BEGIN that fails (a
 * pooled connection lost while idle, during a database blip) never gives its client back. The pool
 * then counts it as checked out for ever: `pool.end()` at shutdown waits for it (the process was
 * killed at its 9 s deadline), and enough of them exhaust the pool. This is the same method with
 * BEGIN inside, and a client whose statement failed released with the error, so the pool destroys it
 * instead of handing a broken connection out again (one whose statement met the client-side timeout
 * is dropped without a ROLLBACK, which would only wait as long again). It also holds the pool's
 * transaction timeout (setTransactionTimeout). Sessions on a single client (not a pool) are left to
 * drizzle's own method.
 */
export function patchDrizzleTransactions(): void {
  if (patched) return;
  patched = true;
  const proto = NodePgSession.prototype as unknown as {
    transaction: (
      this: PooledSession,
      run: (tx: Tx) => Promise<unknown>,
      config?: unknown,
    ) => Promise<unknown>;
  };
  const original = proto.transaction;
  proto.transaction = async function (this: PooledSession, run, config) {
    if (!(this.client instanceof pg.Pool)) return original.call(this, run, config);
    const client = await this.client.connect();
    const session = new (NodePgSession as unknown as SessionCtor)(
      client,
      this.dialect,
      this.schema,
      this.options,
    );
    const tx = new (NodePgTransaction as unknown as TxCtor)(this.dialect, session, this.schema);
    const timeout = transactionTimeouts.get(this.client);
    const begun = performance.now();
    let broken: Error | undefined;
    try {
      try {
        await tx.execute(sql`begin${config ? sql` ${tx.getTransactionConfigSQL(config)}` : undefined}`);
      } catch (err) {
        broken = err as Error;
        throw err;
      }
      try {
        const result = await run(tx);
        const took = performance.now() - begun;
        if (timeout !== undefined && took > timeout) throw new TransactionTimeoutError(timeout, took);
        await tx.execute(sql`commit`);
        return result;
      } catch (error) {
        // The transaction's own error is what the caller sees; a rollback that fails too means the
        // connection is gone, and the client with it. One already known gone gets no rollback: the
        // request answers (503) within the one client-side timeout, not two.
        if (connectionGone(error)) {
          broken = error as Error;
          throw error;
        }
        await tx.execute(sql`rollback`).catch((rollbackError: unknown) => {
          broken = rollbackError as Error;
        });
        throw error;
      }
    } finally {
      client.release(broken);
    }
  };
}
