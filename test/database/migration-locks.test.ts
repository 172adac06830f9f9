import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pg from 'pg';
import pino from 'pino';
import { afterAll, afterEach, describe, expect, inject, it } from 'vitest';
import { type DatabaseHandle, openDatabase } from '../../src/db/client.js';
import {
  MIGRATION_APPLICATION_NAME,
  MigrationError,
  type MigrationOptions,
  runMigrations,
} from '../../src/db/migrations.js';
import { scratchDatabase } from '../support/database.js';
import { captureLogs } from '../support/logs.js';

/*
 * Migrations against live traffic: a migration's ALTER waits for the locks of transactions already
 * running, and everything arriving after it queues behind the ALTER. With a lock timeout on the
 * migration connection the run gives way, is rolled back and tried again; a deadlock with traffic
 * (0002 against logins, twice) is tried again the same way; and a lock held past the retry budget
 * fails the run with a message instead of hanging the start.
 *
 * Two synthetic migration folders: `base` creates two tables, `next` alters both in one migration,
 * as 0002_millisecond_timestamps altered every table.
 */

const databaseUrl = inject('databaseUrl');
const silent = pino({ level: 'silent' });
const folders = mkdtempSync(join(tmpdir(), 'migration-locks-'));

function migrationsFolder(name: string, migrations: Array<{ tag: string; sql: string[] }>): string {
  const folder = join(folders, name);
  mkdirSync(join(folder, 'meta'), { recursive: true });
  const entries = migrations.map((m, idx) => ({
    idx,
    version: '7',
    when: 1_700_000_000_000 + idx * 1000,
    tag: m.tag,
    breakpoints: true,
  }));
  writeFileSync(
    join(folder, 'meta/_journal.json'),
    JSON.stringify({ version: '7', dialect: 'postgresql', entries }),
  );
  for (const m of migrations)
    writeFileSync(join(folder, `${m.tag}.sql`), m.sql.join('--> statement-breakpoint\n'));
  return folder;
}

const tables = {
  tag: '0000_tables',
  sql: [
    'CREATE TABLE "widgets" ("id" integer PRIMARY KEY);\n',
    'CREATE TABLE "gadgets" ("id" integer PRIMARY KEY);\n',
  ],
};
const alterBoth = {
  tag: '0001_alter_both',
  sql: ['ALTER TABLE "widgets" ADD COLUMN "note" text;\n', 'ALTER TABLE "gadgets" ADD COLUMN "note" text;\n'],
};
const base = migrationsFolder('base', [tables]);
const next = migrationsFolder('next', [tables, alterBoth]);

afterAll(() => rmSync(folders, { recursive: true, force: true }));

const opened: Array<{ close(): Promise<unknown> }> = [];
afterEach(async () => {
  for (const item of opened.splice(0).reverse()) await item.close().catch(() => undefined);
});

/** A scratch database with `base` applied, and a handle on it for runMigrations. */
async function baseDatabase(): Promise<{ url: string; handle: DatabaseHandle }> {
  const scratch = (await scratchDatabase('auth_migration_locks'))!;
  opened.push({ close: () => scratch.drop() });
  const handle = await openDatabase({
    url: scratch.url,
    dataDir: '.data/test',
    logger: silent,
    migrate: false,
  });
  opened.push(handle);
  await runMigrations(handle, scratch.url, silent, { folder: base });
  return { url: scratch.url, handle };
}

async function connect(url: string, applicationName: string): Promise<pg.Client> {
  const client = new pg.Client({ connectionString: url, application_name: applicationName });
  client.on('error', () => undefined);
  await client.connect();
  opened.push({ close: () => client.end() });
  return client;
}

async function until(what: string, check: () => boolean | Promise<boolean>, timeoutMs = 10_000) {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

const warnings = (lines: string[]) =>
  lines.map((l) => JSON.parse(l) as Record<string, unknown>).filter((l) => l.level === 40);

async function columns(client: pg.Client, table: string): Promise<string[]> {
  const result = await client.query<{ column_name: string }>(
    `SELECT column_name FROM information_schema.columns WHERE table_name = $1 ORDER BY ordinal_position`,
    [table],
  );
  return result.rows.map((r) => r.column_name);
}

describe.runIf(databaseUrl)('migrations against live traffic (PostgreSQL)', () => {
  const fast: MigrationOptions = { folder: next, lockTimeoutMs: 200, retryBudgetMs: 20_000 };

  it('gives way to a transaction holding a table: readers are not queued behind the ALTER; applied once it ends', async () => {
    const { url, handle } = await baseDatabase();
    const holder = await connect(url, 'long-transaction');
    await holder.query('BEGIN');
    await holder.query('LOCK TABLE widgets IN ACCESS SHARE MODE');

    const { lines, logger } = captureLogs('info');
    const migrating = runMigrations(handle, url, logger, fast);
    migrating.catch(() => undefined);
    await until('a logged lock timeout', () => warnings(lines).length > 0);

    // A reader arriving now would, behind an ALTER waiting with no lock timeout, wait as long as the
    // long transaction runs; here it waits at most one lock timeout.
    const reader = await connect(url, 'reader');
    await reader.query(`SET statement_timeout = '3s'`);
    const readStarted = Date.now();
    await reader.query('SELECT count(*) FROM widgets');
    expect(Date.now() - readStarted).toBeLessThan(1500);

    await holder.query('COMMIT');
    const result = await migrating;
    expect(result.applied).toEqual(['0001_alter_both']);
    expect(await columns(reader, 'widgets')).toEqual(['id', 'note']);
    expect(await columns(reader, 'gadgets')).toEqual(['id', 'note']);

    // Each wait is logged with the migration, what it waited for and who held it.
    const [first] = warnings(lines);
    expect(first).toMatchObject({ migration: '0001_alter_both', code: '55P03', attempt: 1 });
    expect(String(first!.msg)).toContain('waited more than 0.2 s for a lock');
    expect(String(first!.waitedFor)).toContain('widgets');
    expect(String(first!.waitedFor)).toContain('"long-transaction"');
    expect(String(first!.waitedFor)).toContain('AccessShareLock');
    expect(lines.some((l) => l.includes('applied 1 database migration: 0001_alter_both'))).toBe(true);
  }, 30_000);

  it('a deadlock with traffic touching the tables in the other order is rolled back and tried again', async () => {
    const { url, handle } = await baseDatabase();
    // A login-like transaction: it has written to gadgets, and will write to widgets.
    const traffic = await connect(url, 'login');
    // The migration must be the one to notice the deadlock (it does, after deadlock_timeout, 1 s).
    await traffic.query(`SET deadlock_timeout = '20s'`);
    await traffic.query('BEGIN');
    await traffic.query('INSERT INTO gadgets (id) VALUES (1)');

    const { lines, logger } = captureLogs('info');
    const migrating = runMigrations(handle, url, logger, { folder: next, retryBudgetMs: 20_000 });
    migrating.catch(() => undefined);
    // The migration holds widgets and waits for gadgets...
    const watcher = await connect(url, 'watcher');
    await until('the migration to wait for gadgets', async () => {
      const waiting = await watcher.query(
        `SELECT 1 FROM pg_stat_activity WHERE application_name = $1 AND wait_event_type = 'Lock'`,
        [MIGRATION_APPLICATION_NAME],
      );
      return waiting.rowCount === 1;
    });
    // ...and the transaction now wants widgets.
    await traffic.query('INSERT INTO widgets (id) VALUES (1)');
    await traffic.query('COMMIT');

    const result = await migrating;
    expect(result.applied).toEqual(['0001_alter_both']);
    const [deadlock] = warnings(lines);
    expect(deadlock).toMatchObject({ migration: '0001_alter_both', code: '40P01', attempt: 1 });
    expect(String(deadlock!.msg)).toContain('deadlocked with another transaction');
    // PostgreSQL's account of the cycle, with table names for its relation numbers.
    expect(String(deadlock!.waitedFor)).toMatch(/gadgets/);
    expect(String(deadlock!.waitedFor)).toMatch(/widgets/);
    expect((await watcher.query('SELECT note FROM widgets WHERE id = 1')).rows).toEqual([{ note: null }]);
  }, 30_000);

  it('a lock held past the retry budget fails the run with a message, applying nothing, instead of hanging', async () => {
    const { url, handle } = await baseDatabase();
    const holder = await connect(url, 'stuck-report');
    await holder.query('BEGIN');
    await holder.query('LOCK TABLE gadgets IN ACCESS SHARE MODE');

    const { lines, logger } = captureLogs('info');
    const started = Date.now();
    const error = await runMigrations(handle, url, logger, { ...fast, retryBudgetMs: 2000 }).then(
      () => undefined,
      (err: unknown) => err,
    );
    const elapsed = Date.now() - started;
    expect(error).toBeInstanceOf(MigrationError);
    const message = (error as Error).message;
    expect(message).toMatch(
      /^database migrations gave up after \d+(\.\d)? s and \d+ attempts: 0001_alter_both/,
    );
    expect(message).toContain('waited more than 0.2 s for a lock');
    expect(message).toContain('"stuck-report"');
    expect(message).toContain('MIGRATIONS.md');
    expect(message).not.toContain('\n');
    expect(elapsed).toBeGreaterThanOrEqual(2000);
    expect(elapsed).toBeLessThan(5000);
    expect(warnings(lines).length).toBeGreaterThanOrEqual(2);

    // Nothing applied, the advisory lock released: once the holder is gone the next run applies it.
    expect(await columns(holder, 'widgets')).toEqual(['id']);
    await holder.query('ROLLBACK');
    expect((await runMigrations(handle, url, silent, fast)).applied).toEqual(['0001_alter_both']);
  }, 30_000);

  it('a statement running past the statement timeout fails the run (not retried), naming the migration and the setting', async () => {
    const { url, handle } = await baseDatabase();
    const slow = migrationsFolder('slow', [
      tables,
      { tag: '0001_slow', sql: ['ALTER TABLE "widgets" ADD COLUMN "note" text;\n', 'SELECT pg_sleep(5);\n'] },
    ]);
    const { lines, logger } = captureLogs('info');
    const started = Date.now();
    const error = await runMigrations(handle, url, logger, { folder: slow, statementTimeoutMs: 300 }).then(
      () => undefined,
      (err: unknown) => err,
    );
    expect(Date.now() - started).toBeLessThan(3000);
    expect(error).toBeInstanceOf(MigrationError);
    expect((error as Error).message).toBe(
      'database migration 0001_slow failed: canceling statement due to statement timeout (57014): a statement ' +
        'ran longer than DB_MIGRATION_STATEMENT_TIMEOUT_MS; apply it at low traffic with a higher one',
    );
    expect(warnings(lines)).toEqual([]);
    const check = await connect(url, 'check');
    expect(await columns(check, 'widgets')).toEqual(['id']);
  });

  it('instances starting together still take turns: the second waits for the first and finds nothing pending', async () => {
    const { url, handle } = await baseDatabase();
    const holder = await connect(url, 'long-transaction');
    await holder.query('BEGIN');
    await holder.query('LOCK TABLE widgets IN ACCESS SHARE MODE');
    const first = captureLogs('info');
    const second = captureLogs('info');
    const one = runMigrations(handle, url, first.logger, fast);
    await until('the first run to wait', () => warnings(first.lines).length > 0);
    const two = runMigrations(handle, url, second.logger, fast);
    await until('the second run to queue', () =>
      second.lines.some((l) => l.includes('another instance is applying database migrations')),
    );
    await holder.query('COMMIT');
    expect((await one).applied).toEqual(['0001_alter_both']);
    expect((await two).applied).toEqual([]);
    expect(second.lines.some((l) => l.includes('database migrations: none pending'))).toBe(true);
  }, 30_000);
});
