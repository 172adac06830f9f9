import { randomBytes } from 'node:crypto';
import pg from 'pg';
import pino from 'pino';
import { inject } from 'vitest';
import { sql } from 'drizzle-orm';
import {
  type DatabaseHandle,
  type Executor,
  openDatabase,
  openMemoryDatabase,
  selectRows,
} from '../../src/db/client.js';

let shared: Promise<DatabaseHandle> | undefined;
const silent = pino({ level: 'silent' });

/** A PostgreSQL database as the tests open it: migrated, with a connect timeout for a loaded CI machine. */
export function openTestDatabase(url: string): Promise<DatabaseHandle> {
  return openDatabase({ url, dataDir: '.data/test', logger: silent, migrate: true, connectTimeoutMs: 5000 });
}

/** The worker's database: shared by every test file the worker runs (tests use their own rows). */
export function testDatabase(): Promise<DatabaseHandle> {
  if (!shared) {
    const url = inject('databaseUrl');
    shared = url ? openTestDatabase(url) : openMemoryDatabase(silent);
  }
  return shared;
}

export const databaseSource = () => inject('databaseSource');

export interface ScratchDatabase {
  name: string;
  url: string;
  drop(): Promise<void>;
}

/**
 * A new, empty database on the test PostgreSQL server, named `<prefix>_<random>`; `drop()` removes it
 * (connections and all). With `template`, a copy of that database instead (CREATE DATABASE … TEMPLATE:
 * nothing may be connected to it meanwhile). Undefined when the tests run on PGlite.
 */
export async function scratchDatabase(
  prefix: string,
  options: { template?: string } = {},
): Promise<ScratchDatabase | undefined> {
  const serverUrl = inject('databaseUrl');
  if (!serverUrl) return undefined;
  const name = `${prefix}_${randomBytes(6).toString('hex')}`;
  const onServer = async (statement: string) => {
    const admin = new pg.Client({ connectionString: serverUrl });
    await admin.connect();
    try {
      await admin.query(statement);
    } finally {
      await admin.end();
    }
  };
  await onServer(`CREATE DATABASE ${name}${options.template ? ` TEMPLATE ${options.template}` : ''}`);
  const url = new URL(serverUrl);
  url.pathname = `/${name}`;
  return {
    name,
    url: url.toString(),
    drop: () => onServer(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`),
  };
}

/**
 * A scratch database migrated as the service migrates one, and closed: to copy with
 * `scratchDatabase(prefix, { template: name })`, which is quicker than migrating each from nothing.
 * Undefined when the tests run on PGlite.
 */
export async function migratedTemplate(prefix: string): Promise<ScratchDatabase | undefined> {
  const scratch = await scratchDatabase(prefix);
  if (!scratch) return undefined;
  try {
    await (await openTestDatabase(scratch.url)).close();
  } catch (err) {
    await scratch.drop();
    throw err;
  }
  return scratch;
}

/**
 * A migrated database nobody else writes to, for a test that reads the whole database (the worker's is
 * shared with the files other workers run at the same time on PostgreSQL): a scratch database there, a
 * new in-memory PGlite otherwise. `dispose()` closes it (and drops the scratch database).
 */
export async function ownDatabase(
  prefix: string,
): Promise<{ database: DatabaseHandle; url: string | undefined; dispose(): Promise<void> }> {
  const scratch = await scratchDatabase(prefix);
  if (!scratch) {
    const database = await openMemoryDatabase(silent);
    return { database, url: undefined, dispose: () => database.close() };
  }
  const database = await openTestDatabase(scratch.url);
  return {
    database,
    url: scratch.url,
    async dispose() {
      await database.close();
      await scratch.drop();
    },
  };
}

/**
 * Waits until `count` statements of the database wait for a lock (directly or behind one another),
 * asking through `client`; with `blockedBy`, only those the backend of that pid blocks. `client` may
 * be in a transaction (the one holding the lock, typically): PostgreSQL then keeps the
 * pg_stat_activity it read first for the rest of the transaction, so each poll clears that snapshot
 * first (pg_stat_clear_snapshot) and reads the backends as they are now.
 */
export async function waitForLockWaiters(
  client: pg.Client,
  count: number,
  blockedBy?: number,
): Promise<void> {
  for (let waited = 0; waited < 15_000; waited += 20) {
    await client.query('SELECT pg_stat_clear_snapshot()');
    const { rows } = await client.query<{ n: number }>(
      `SELECT count(*)::int AS n FROM pg_stat_activity
        WHERE datname = current_database() AND wait_event_type = 'Lock' AND cardinality(pg_blocking_pids(pid)) > 0
          AND ($1::int IS NULL OR $1::int = ANY(pg_blocking_pids(pid)))`,
      [blockedBy ?? null],
    );
    if (rows[0]!.n >= count) return;
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  throw new Error(`fewer than ${count} statements came to wait for the lock`);
}

/**
 * Two requests at once at a limit, on PostgreSQL: `first` runs, and once its transaction has called
 * `repo.insert` (counted and inserted, uncommitted) `second` starts; the first commits once the
 * second waits on its lock (or, were there nothing to wait for, once the second is done). The
 * repository's insert is put back afterwards. Answers both results.
 */
export function secondWhileFirstInserts<V, T, R>(
  databaseUrl: string,
  repo: { insert: (values: V, tx: Executor) => Promise<T> },
  first: () => Promise<R>,
  second: () => Promise<R>,
): Promise<{ first: R; second: R }> {
  return secondWhileFirstCalls(databaseUrl, repo, 'insert', first, second);
}

/**
 * secondWhileFirstInserts for any repository method whose last argument is the transaction: `second`
 * starts once `first`'s transaction has called `repo[method]` (a grant's `assignRole`, say).
 */
export async function secondWhileFirstCalls<M extends string, R>(
  databaseUrl: string,
  repo: { [K in M]: (...args: never[]) => Promise<unknown> },
  method: M,
  first: () => Promise<R>,
  second: () => Promise<R>,
): Promise<{ first: R; second: R }> {
  const original = repo[method];
  const watcher = new pg.Client({ connectionString: databaseUrl });
  await watcher.connect();
  let started: Promise<R> | undefined;
  const wrapped = async (...args: never[]) => {
    const done = await original.apply(repo, args);
    if (!started) {
      const tx = args.at(-1) as unknown as Executor;
      const [holder] = await selectRows<{ pid: number }>(tx, sql`select pg_backend_pid() as pid`);
      started = second();
      await Promise.race([waitForLockWaiters(watcher, 1, holder!.pid), started]);
    }
    return done;
  };
  repo[method] = wrapped as (typeof repo)[M];
  let firstDone: R;
  try {
    firstDone = await first();
  } finally {
    repo[method] = original;
    await watcher.end();
  }
  return { first: firstDone, second: await started! };
}
