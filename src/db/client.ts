import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import type { ExtractTablesWithRelations, SQL } from 'drizzle-orm';
import type { PgDatabase, PgQueryResultHKT, PgTransaction } from 'drizzle-orm/pg-core';
import pg from 'pg';
import type { Logger } from 'pino';
import { acquireDirectoryLock } from './directory-lock.js';
import { type MigrationOptions, runMigrations } from './migrations.js';
import * as schema from './schema/index.js';
import { patchDrizzleTransactions, setTransactionTimeout } from './pg-transaction-fix.js';

export type Schema = typeof schema;
/** One Drizzle type for node-postgres and PGlite, so repositories never care which one runs. */
export type Database = PgDatabase<PgQueryResultHKT, Schema>;
export type Transaction = PgTransaction<PgQueryResultHKT, Schema, ExtractTablesWithRelations<Schema>>;
/** What a repository method runs on: the database, or the transaction it was handed. */
export type Executor = Database | Transaction;

export interface DatabaseHandle {
  readonly db: Database;
  readonly kind: 'postgres' | 'pglite';
  /**
   * The longest after it is stamped that a row another transaction writes can still become visible,
   * in milliseconds: what a reader of rows stamped by the writer's clock (the audit log's
   * `created_at`) must stay behind to read none of them late. On PostgreSQL, a transaction commits
   * at most `transactionTimeoutMs` after its BEGIN (or is rolled back), and its COMMIT, like a
   * statement outside a transaction, gets a connection within `connectTimeoutMs` and runs within
   * `statementTimeoutMs`. PGlite runs one statement or transaction at a time: 0.
   */
  readonly visibleWithinMs: number;
  /** Resolves true when the database answers `SELECT 1` within the timeout. */
  ping(timeoutMs: number): Promise<boolean>;
  /**
   * LISTEN on a channel; the handler gets each NOTIFY payload. Reconnects by itself. Resolves, once
   * listening, to the function that stops it.
   */
  listen(channel: string, handler: (payload: string) => void): Promise<() => Promise<void>>;
  close(): Promise<void>;
}

export interface OpenDatabaseOptions {
  url: string | undefined;
  dataDir: string;
  logger: Logger;
  poolMax?: number;
  connectTimeoutMs?: number;
  statementTimeoutMs?: number;
  /**
   * How long after its BEGIN a transaction on the pool may still commit (default 15 s): one still
   * running then is rolled back instead (SQLSTATE 25P04, a 503). PostgreSQL 15 has no such setting
   * of its own (`transaction_timeout` came in 17); statement_timeout and
   * idle_in_transaction_session_timeout bound each statement and each wait between them, not their sum.
   */
  transactionTimeoutMs?: number;
  /** Apply pending migrations (under an advisory lock) before returning. */
  migrate?: boolean;
  /** Lock and statement timeouts and the retry budget of that migration run (src/db/migrations.ts). */
  migrations?: MigrationOptions;
  /**
   * How often the LISTEN connection proves it is alive with a round trip (default 5 s); one that has
   * not answered within the same time is dropped and replaced, with a resync. Without it a connection
   * whose peer vanished silently (a NAT or a failover that sent no RST) stays "connected" and deaf
   * until TCP keepalive gives up, minutes later, while other instances' revocations go unheard.
   */
  listenHeartbeatMs?: number;
  /** PGlite: how long to wait for another process's lock on the directory (default 12 s). */
  lockWaitMs?: number;
}

export { MIGRATIONS_FOLDER, MigrationError, type MigrationOptions, runMigrations } from './migrations.js';

/** Rejects when the promise has not settled within `ms` (the promise itself runs on). */
export function withTimeout<T>(promise: Promise<T>, ms: number): Promise<T> {
  return new Promise<T>((resolveFn, reject) => {
    const timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms`)), ms);
    promise.then(
      (v) => {
        clearTimeout(timer);
        resolveFn(v);
      },
      (e: unknown) => {
        clearTimeout(timer);
        reject(e);
      },
    );
  });
}

export async function openDatabase(options: OpenDatabaseOptions): Promise<DatabaseHandle> {
  const handle = options.url ? await openPostgres(options.url, options) : await openPglite(options);
  if (options.migrate ?? true) {
    try {
      await runMigrations(handle, options.url, options.logger, options.migrations);
    } catch (err) {
      await handle.close().catch(() => undefined);
      throw err;
    }
  }
  return handle;
}

async function openPostgres(url: string, options: OpenDatabaseOptions): Promise<DatabaseHandle> {
  const { drizzle } = await import('drizzle-orm/node-postgres');
  const statementTimeout = options.statementTimeoutMs ?? 5000;
  const connectTimeout = options.connectTimeoutMs ?? 2000;
  const transactionTimeout = options.transactionTimeoutMs ?? 15_000;
  const connectionOptions: pg.PoolConfig = {
    connectionString: url,
    connectionTimeoutMillis: connectTimeout,
    statement_timeout: statementTimeout,
    lock_timeout: statementTimeout,
    idle_in_transaction_session_timeout: statementTimeout * 2,
    // Client-side backstop for a server that stops answering altogether.
    query_timeout: statementTimeout + 1000,
    keepAlive: true,
    application_name: 'paservices-auth',
  };
  const pool = new pg.Pool({ ...connectionOptions, max: options.poolMax ?? 10, idleTimeoutMillis: 30_000 });
  // A backend killed while idle must not crash the process (node-postgres emits it on the pool).
  pool.on('error', (err) => options.logger.warn({ err: err.message }, 'idle database connection lost'));
  // Nor one killed while checked out (inside a transaction, or during a restart): the pool's listener
  // is detached then, and node-postgres emits 'error' on the client itself, an uncaught exception
  // without this. The query in flight fails on its own (→ 503), and the pool drops the client on
  // release because it is no longer queryable.
  pool.on('connect', (client) => {
    client.on('error', (err) => options.logger.debug({ err: err.message }, 'database connection lost'));
  });
  patchDrizzleTransactions();
  setTransactionTimeout(pool, transactionTimeout);
  const db = drizzle(pool, { schema }) as unknown as Database;
  const listeners: pg.Client[] = [];
  let closed = false;

  const heartbeatMs = options.listenHeartbeatMs ?? 5000;
  /** Resolves true once a round trip on `client` has gone unanswered for `heartbeatMs`; never otherwise. */
  async function heartbeat(client: pg.Client, lost: Promise<void>): Promise<boolean> {
    let gone = false;
    void lost.then(() => {
      gone = true;
    });
    while (!gone && !closed) {
      await new Promise((r) => setTimeout(r, heartbeatMs).unref());
      if (gone || closed) break;
      const answered = await withTimeout(client.query('SELECT 1'), heartbeatMs).then(
        () => true,
        () => gone,
      );
      if (!answered) return true;
    }
    return new Promise<boolean>(() => undefined);
  }

  async function listenLoop(
    channel: string,
    handler: (payload: string) => void,
    onListening: () => void,
    state: { stopped: boolean; client?: pg.Client },
  ): Promise<void> {
    let delay = 250;
    let first = true;
    while (!closed && !state.stopped) {
      const client = new pg.Client({
        ...connectionOptions,
        query_timeout: undefined,
        statement_timeout: undefined,
      });
      // Listened to before connecting: a backend killed just as the connection starts can send its
      // error together with the end of the start-up, and an 'error' emitted before anyone listens is
      // an uncaught exception (reproduced by terminating backends in a loop).
      const lost = new Promise<void>((done) => {
        client.on('error', () => done());
        client.on('end', () => done());
      });
      state.client = client;
      let deaf = false;
      try {
        await client.connect();
        client.on('notification', (msg) => {
          if (msg.channel === channel && msg.payload !== undefined) handler(msg.payload);
        });
        await client.query(`LISTEN "${channel.replace(/"/g, '')}"`);
        listeners.push(client);
        if (first) onListening();
        // A reconnect may have missed notifications: tell the handler to drop everything cached.
        if (!first) handler('{"type":"resync"}');
        first = false;
        delay = 250;
        deaf = await Promise.race([lost.then(() => false), heartbeat(client, lost)]);
        listeners.splice(listeners.indexOf(client), 1);
        // Not awaited: ending a connection whose peer is gone can hang until TCP gives up.
        if (deaf) client.end().catch(() => undefined);
      } catch (err) {
        if (first) {
          first = false;
          await client.end().catch(() => undefined);
          throw err;
        }
        await client.end().catch(() => undefined);
      }
      if (closed || state.stopped) return;
      options.logger.warn(
        { channel },
        deaf
          ? 'notification listener stopped answering; replacing its connection'
          : 'notification listener lost its connection; reconnecting',
      );
      await new Promise((r) => setTimeout(r, delay));
      delay = Math.min(delay * 2, 2000);
    }
  }

  return {
    db,
    kind: 'postgres',
    // A row stamped in a transaction: its COMMIT is sent within transactionTimeout of the BEGIN, which
    // came before the stamp. Stamped outside one: its statement waits for a connection (connectTimeout)
    // and runs (statementTimeout). Either way the COMMIT itself, a statement, runs within statementTimeout.
    visibleWithinMs: Math.max(transactionTimeout, connectTimeout) + statementTimeout,
    async ping(timeoutMs) {
      try {
        await withTimeout(pool.query('SELECT 1'), timeoutMs);
        return true;
      } catch {
        return false;
      }
    },
    listen(channel, handler) {
      const state: { stopped: boolean; client?: pg.Client } = { stopped: false };
      const stop = async () => {
        state.stopped = true;
        await state.client?.end().catch(() => undefined);
      };
      return new Promise((ready, failed) => {
        listenLoop(channel, handler, () => ready(stop), state).catch(failed);
      });
    },
    async close() {
      closed = true;
      await Promise.all(listeners.map((c) => c.end().catch(() => undefined)));
      await pool.end();
    },
  };
}

async function openPglite(options: OpenDatabaseOptions): Promise<DatabaseHandle> {
  const { PGlite } = await import('@electric-sql/pglite');
  const { drizzle } = await import('drizzle-orm/pglite');
  const dir = join(options.dataDir, 'pglite');
  mkdirSync(dir, { recursive: true });
  const release = await lockDataDirectory(dir, options);
  let client: Awaited<ReturnType<typeof PGlite.create>>;
  try {
    client = await PGlite.create(dir);
  } catch (err) {
    await release().catch(() => undefined);
    throw err;
  }
  const db = drizzle(client, { schema }) as unknown as Database;
  return {
    db,
    kind: 'pglite',
    visibleWithinMs: 0,
    async ping(timeoutMs) {
      try {
        await withTimeout(client.query('SELECT 1'), timeoutMs);
        return true;
      } catch {
        return false;
      }
    },
    async listen(channel, handler) {
      const unlisten = await client.listen(channel, handler);
      return async () => {
        await unlisten().catch(() => undefined);
      };
    },
    async close() {
      await client.close();
      await release().catch(() => undefined);
    },
  };
}

/** The embedded database's directory is held by another process. */
export class DatabaseLockedError extends Error {
  override name = 'DatabaseLockedError';
}

/**
 * PGlite is PostgreSQL in this process: a second process opening the same directory (a second
 * `npm start`) would run its own server on the same files, and the last one to close would silently
 * overwrite the other's writes. So the directory is locked for as long as it is open
 * (src/db/directory-lock.ts). The lock names the process holding it, and is taken over at once when
 * that process is gone, however long ago it last refreshed the lock: PGlite's start blocks this
 * process's event loop for seconds (over 10 on a loaded machine), and the lock stays held meanwhile.
 * Only a lock from another host or container is judged by its age (stale 10 s after its holder last
 * refreshed it). A start finding it held waits `lockWaitMs` (12 s) before giving up.
 */
async function lockDataDirectory(dir: string, options: OpenDatabaseOptions): Promise<() => Promise<void>> {
  const lockPath = `${dir}.lock`;
  const lockOptions = {
    onCompromised: (err: Error) =>
      options.logger.error(
        { err: err.message },
        `lost the lock on ${dir}: another process may have opened it`,
      ),
  };
  let attempt = await acquireDirectoryLock(lockPath, lockOptions);
  if (attempt.acquired) return attempt.release;
  const waitMs = options.lockWaitMs ?? 12_000;
  options.logger.warn(
    `${dir} is locked by another process; waiting up to ${Math.round(waitMs / 1000)} s (held by ${attempt.holder})`,
  );
  const deadline = Date.now() + waitMs;
  while (Date.now() < deadline) {
    await sleep(Math.min(500, deadline - Date.now()));
    attempt = await acquireDirectoryLock(lockPath, lockOptions);
    if (attempt.acquired) return attempt.release;
  }
  throw new DatabaseLockedError(
    `Another process is using the embedded database in ${dir} (the lock ${lockPath} is held by ` +
      `${attempt.holder}). Stop it, or give this one its own DATA_DIR or a DATABASE_URL.`,
  );
}

/** Opens an in-memory PGlite database (tests, benchmarks). */
export async function openMemoryDatabase(logger: Logger): Promise<DatabaseHandle> {
  const { PGlite } = await import('@electric-sql/pglite');
  const { drizzle } = await import('drizzle-orm/pglite');
  const client = await PGlite.create();
  const db = drizzle(client, { schema }) as unknown as Database;
  const handle: DatabaseHandle = {
    db,
    kind: 'pglite',
    visibleWithinMs: 0,
    ping: async () => true,
    listen: async (channel, handler) => {
      const unlisten = await client.listen(channel, handler);
      return async () => {
        await unlisten().catch(() => undefined);
      };
    },
    close: () => client.close(),
  };
  await runMigrations(handle, undefined, logger);
  return handle;
}

/** Runs raw SQL and returns its rows (node-postgres and PGlite both answer `{ rows }`). */
export async function selectRows<T>(db: Executor, query: SQL): Promise<T[]> {
  const result = (await db.execute(query)) as unknown as { rows: T[] };
  return result.rows;
}
