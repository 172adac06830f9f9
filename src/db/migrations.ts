import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { sql } from 'drizzle-orm';
import pg from 'pg';
import type { Logger } from 'pino';
import { PROJECT_ROOT } from '../lib/paths.js';
import type { DatabaseHandle } from './client.js';

export const MIGRATIONS_FOLDER = join(PROJECT_ROOT, 'drizzle');
/** An arbitrary constant shared by every instance: the advisory lock that serialises migrations. */
const MIGRATION_LOCK_KEY = 7_344_021_118;

/** What `application_name` the migration connection shows in pg_stat_activity. */
export const MIGRATION_APPLICATION_NAME = 'paservices-auth migrations';

export interface JournalEntry {
  idx: number;
  when: number;
  tag: string;
  breakpoints: boolean;
}

/** drizzle/meta/_journal.json's entries, in order. */
export function readJournal(folder = MIGRATIONS_FOLDER): JournalEntry[] {
  const journal = JSON.parse(readFileSync(join(folder, 'meta/_journal.json'), 'utf8')) as {
    entries: JournalEntry[];
  };
  return journal.entries;
}

export interface MigrationOptions {
  /** The SQL files and meta/_journal.json (default drizzle/). */
  folder?: string;
  /**
   * How long one statement may wait for a lock (default 5 s). Past it the whole run is rolled back
   * and tried again, so an ALTER queued behind a long transaction does not in turn queue every
   * request for that table behind itself.
   */
  lockTimeoutMs?: number;
  /** How long one statement may run (default 10 min: a table rewrite on a big table is slow, a hang is not). */
  statementTimeoutMs?: number;
  /** How long, in all, runs that met a lock timeout or a deadlock are tried again (default 60 s). */
  retryBudgetMs?: number;
  /** Connecting the migration connection (default 10 s). */
  connectTimeoutMs?: number;
}

export const MIGRATION_DEFAULTS = {
  lockTimeoutMs: 5000,
  statementTimeoutMs: 600_000,
  retryBudgetMs: 60_000,
  connectTimeoutMs: 10_000,
} as const;

export interface MigrationResult {
  /** Tags of the migrations this run applied, in order; empty when none was pending. */
  applied: string[];
  /** Journaled migrations in all. */
  total: number;
  /** Migrations applied to the database that this release's journal does not know (a newer one's). */
  unknown: number;
}

/** A migration run that failed: one line saying which migration and why (the cause is attached). */
export class MigrationError extends Error {
  override name = 'MigrationError';
}

type Query = (text: string, params?: unknown[]) => Promise<Array<Record<string, unknown>>>;

/** The journal entries drizzle's migrator would apply now: those newer than the last one applied. */
async function pendingMigrations(query: Query, journal: JournalEntry[]): Promise<JournalEntry[]> {
  const [table] = await query(`SELECT to_regclass('drizzle.__drizzle_migrations') IS NOT NULL AS present`);
  if (!table?.present) return journal;
  const [last] = await query(
    'SELECT created_at FROM drizzle.__drizzle_migrations ORDER BY created_at DESC LIMIT 1',
  );
  if (!last) return journal;
  const lastWhen = Number(last.created_at);
  return journal.filter((entry) => entry.when > lastWhen);
}

/** Applied migrations dated after this release's last one: a newer release applied them. */
async function unknownMigrations(query: Query, journal: JournalEntry[]): Promise<number> {
  const newest = journal.at(-1)?.when ?? 0;
  const [table] = await query(`SELECT to_regclass('drizzle.__drizzle_migrations') IS NOT NULL AS present`);
  if (!table?.present) return 0;
  const [row] = await query(
    `SELECT count(*)::int AS unknown FROM drizzle.__drizzle_migrations WHERE created_at > ${Number(newest)}`,
  );
  return Number(row?.unknown ?? 0);
}

async function report(
  logger: Logger,
  query: Query,
  journal: JournalEntry[],
  applied: JournalEntry[],
): Promise<MigrationResult> {
  const tags = applied.map((e) => e.tag);
  const total = journal.length;
  if (tags.length === 0) logger.info({ total }, 'database migrations: none pending');
  else
    logger.info(
      { applied: tags, total },
      `applied ${tags.length} database migration${tags.length === 1 ? '' : 's'}: ${tags.join(', ')}`,
    );
  // Not a refusal: in a rolling deploy, or a rollback, the releases run side by side for a while.
  // Nor may reading it stop a start whose migrations are done.
  const unknown = await unknownMigrations(query, journal).catch((err: unknown) => {
    logger.warn({ err }, 'could not count the migrations newer than this release');
    return 0;
  });
  if (unknown > 0)
    logger.warn(
      { unknown },
      `the database has ${unknown} migration${unknown === 1 ? '' : 's'} newer than this release knows: a newer release ` +
        'applied them, and this one may not work with the schema they made (see MIGRATIONS.md, "Upgrading")',
    );
  return { applied: tags, total, unknown };
}

/**
 * Applies the pending migrations of drizzle/ (drizzle-orm's migrator: all of them in one transaction).
 *
 * On PostgreSQL they run on one dedicated connection holding a session advisory lock, so instances
 * starting together take turns and the later ones find nothing left to apply. That connection has a
 * lock timeout: a migration's ALTER waiting behind a long transaction would otherwise wait for ever,
 * and every query on that table would queue behind the ALTER. A run that meets the lock timeout or a
 * deadlock (a migration altering several tables against live traffic touching them in another order)
 * is rolled back and tried again with backoff, each time logged with what it waited for, for
 * `retryBudgetMs`; then it fails with a MigrationError saying so.
 */
export async function runMigrations(
  handle: DatabaseHandle,
  url: string | undefined,
  logger: Logger,
  options: MigrationOptions = {},
): Promise<MigrationResult> {
  const folder = options.folder ?? MIGRATIONS_FOLDER;
  const journal = readJournal(folder);
  if (handle.kind === 'pglite' || !url) {
    const { migrate } = await import('drizzle-orm/pglite/migrator');
    const query: Query = async (text) =>
      ((await handle.db.execute(sql.raw(text))) as unknown as { rows: Array<Record<string, unknown>> }).rows;
    const pending = await pendingMigrations(query, journal);
    try {
      // biome-ignore lint/suspicious/noExplicitAny: the PGlite migrator wants its own driver type.
      await migrate(handle.db as any, { migrationsFolder: folder });
    } catch (err) {
      throw failure(err, pending, folder);
    }
    return report(logger, query, journal, pending);
  }

  const { drizzle } = await import('drizzle-orm/node-postgres');
  const { migrate } = await import('drizzle-orm/node-postgres/migrator');
  const settings = { ...MIGRATION_DEFAULTS, ...definedOnly(options) };
  const client = new pg.Client({
    connectionString: url,
    connectionTimeoutMillis: settings.connectTimeoutMs,
    application_name: MIGRATION_APPLICATION_NAME,
  });
  // A connection lost between two statements fails the next one (and the start); without a listener
  // it would be an uncaught exception instead.
  client.on('error', (err) => logger.warn({ err: err.message }, 'migration connection lost'));
  await client.connect();
  const query: Query = async (text, params) => (await client.query(text, params)).rows;
  try {
    const [free] = await query('SELECT pg_try_advisory_lock($1) AS ok', [MIGRATION_LOCK_KEY]);
    if (!free?.ok) {
      logger.info('another instance is applying database migrations; waiting for it to finish');
      // No timeout on this wait: the other instance's run is bounded by the same timeouts.
      await query('SELECT pg_advisory_lock($1)', [MIGRATION_LOCK_KEY]);
    }
    try {
      await query(
        `SELECT set_config('lock_timeout', $1, false), set_config('statement_timeout', $2, false)`,
        [`${settings.lockTimeoutMs}ms`, `${settings.statementTimeoutMs}ms`],
      );
      const deadline = Date.now() + settings.retryBudgetMs;
      const started = Date.now();
      for (let attempt = 1; ; attempt++) {
        const pending = await pendingMigrations(query, journal);
        if (pending.length === 0) return await report(logger, query, journal, []);
        try {
          await migrate(drizzle(client), { migrationsFolder: folder });
          return await report(logger, query, journal, pending);
        } catch (err) {
          const cause = databaseError(err);
          if (cause?.code !== LOCK_NOT_AVAILABLE && cause?.code !== DEADLOCK_DETECTED)
            throw failure(err, pending, folder);
          const statement = failedStatement(err);
          const migration = migrationOf(statement, pending, folder);
          const what = await describeConflict(query, cause, statement);
          const waited =
            cause.code === DEADLOCK_DETECTED
              ? `deadlocked with another transaction: ${what}`
              : `waited more than ${seconds(settings.lockTimeoutMs)} for a lock ${what}`;
          const left = deadline - Date.now();
          if (left <= 0)
            throw new MigrationError(
              `database migrations gave up after ${seconds(Date.now() - started)} and ${attempt} attempts: ` +
                `${migration ?? 'a migration'} ${waited}. Other transactions keep the tables it alters ` +
                'locked: end a long one, or apply the migrations at low traffic (npm run db:migrate); see MIGRATIONS.md',
              { cause: err },
            );
          const delay = Math.min(backoff(attempt), left);
          logger.warn(
            {
              migration,
              attempt,
              code: cause.code,
              statement: statementHead(statement),
              waitedFor: what,
              retryInMs: delay,
            },
            `database migration ${migration ?? ''} ${waited} — rolled back, trying again in ${seconds(delay)}`,
          );
          await new Promise((r) => setTimeout(r, delay));
        }
      }
    } finally {
      await query('SELECT pg_advisory_unlock($1)', [MIGRATION_LOCK_KEY]).catch(() => undefined);
    }
  } finally {
    await client.end().catch(() => undefined);
  }
}

const LOCK_NOT_AVAILABLE = '55P03';
const DEADLOCK_DETECTED = '40P01';
/** statement_timeout (and a cancel by pg_cancel_backend). */
const QUERY_CANCELED = '57014';

function definedOnly<T extends object>(options: T): Partial<T> {
  return Object.fromEntries(Object.entries(options).filter(([, v]) => v !== undefined)) as Partial<T>;
}

/** 1, 2, 4, 8, 15, 15… s, each ±25 % so instances and traffic do not fall into step. */
function backoff(attempt: number): number {
  const base = Math.min(1000 * 2 ** (attempt - 1), 15_000);
  return Math.round(base * (0.75 + Math.random() * 0.5));
}

const seconds = (ms: number) => `${Number((ms / 1000).toFixed(ms < 10_000 ? 1 : 0))} s`;

interface DatabaseErrorLike {
  code?: string;
  message: string;
  detail?: string;
}

/** The PostgreSQL error under drizzle's DrizzleQueryError (or the error itself). */
function databaseError(err: unknown): DatabaseErrorLike | undefined {
  for (let e: unknown = err, depth = 0; e instanceof Error && depth < 5; e = e.cause, depth++)
    if (typeof (e as DatabaseErrorLike).code === 'string') return e as DatabaseErrorLike;
  return undefined;
}

/** A statement without its comments, shortened for a log line. */
function statementHead(statement: string | undefined): string | undefined {
  const text = statement
    ?.replace(/^\s*--.*$/gm, '')
    .replace(/\s+/g, ' ')
    .trim();
  if (!text) return undefined;
  return text.length > 160 ? `${text.slice(0, 157)}...` : text;
}

function failedStatement(err: unknown): string | undefined {
  const query = (err as { query?: unknown }).query;
  return typeof query === 'string' ? query : undefined;
}

/** Which pending migration holds the statement that failed. */
function migrationOf(statement: string | undefined, pending: JournalEntry[], folder: string) {
  if (!statement) return undefined;
  for (const entry of pending) {
    const text = readFileSync(join(folder, `${entry.tag}.sql`), 'utf8');
    if (text.split('--> statement-breakpoint').includes(statement)) return entry.tag;
  }
  return undefined;
}

function failure(err: unknown, pending: JournalEntry[], folder: string): MigrationError {
  if (err instanceof MigrationError) return err;
  const cause = databaseError(err);
  const statement = failedStatement(err);
  let migration: string | undefined;
  try {
    migration = statement ? migrationOf(statement, pending, folder) : undefined;
  } catch {
    migration = undefined;
  }
  const message = cause ? `${cause.message}${cause.code ? ` (${cause.code})` : ''}` : String(err);
  const what = migration
    ? `database migration ${migration} failed`
    : pending.length
      ? `database migrations (${pending.map((e) => e.tag).join(', ')}) failed`
      : 'database migrations failed';
  const hint =
    cause?.code === QUERY_CANCELED
      ? ': a statement ran longer than DB_MIGRATION_STATEMENT_TIMEOUT_MS; apply it at low traffic with a higher one'
      : '';
  return new MigrationError(`${what}: ${message.split('\n')[0]}${hint}`, { cause: err });
}

/**
 * What the migration waited for, in words: for a deadlock, PostgreSQL's own account with relation
 * names for its OIDs; for a lock timeout, the tables the statement names and who holds locks on them
 * now (the holder usually still does, a moment after the timeout).
 */
async function describeConflict(
  query: Query,
  cause: DatabaseErrorLike,
  statement: string | undefined,
): Promise<string> {
  try {
    if (cause.code === DEADLOCK_DETECTED && cause.detail) {
      const oids = [...cause.detail.matchAll(/relation (\d+) of database \d+/g)].map((m) => m[1]!);
      const rows = await query(
        'SELECT oid::text AS oid, oid::regclass::text AS name FROM pg_class WHERE oid = ANY($1::oid[])',
        [oids],
      );
      const names = new Map(rows.map((r) => [String(r.oid), String(r.name)]));
      return cause.detail
        .replace(/relation (\d+) of database \d+/g, (whole, oid: string) => names.get(oid) ?? whole)
        .replace(/\s*\n\s*/g, ' ');
    }
    const candidates = [...new Set(relationNames(statement ?? ''))];
    const holders = await query(
      `SELECT l.relation::regclass::text AS relation, l.mode, a.pid, a.application_name, a.state,
              extract(epoch FROM now() - a.xact_start)::int AS seconds
         FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
        WHERE l.granted AND l.locktype = 'relation' AND l.pid <> pg_backend_pid()
          AND l.relation IN (SELECT to_regclass(n) FROM unnest($1::text[]) AS n)
        ORDER BY a.xact_start LIMIT 5`,
      [candidates],
    );
    if (holders.length === 0) return `for: ${statementHead(statement) ?? cause.message}`;
    const tables = [...new Set(holders.map((h) => String(h.relation)))];
    const who = holders
      .map(
        (h) =>
          `pid ${h.pid}${h.application_name ? ` "${h.application_name}"` : ''} ` +
          `(${h.state ?? 'unknown state'}, transaction open ${h.seconds ?? '?'} s) holds ${h.mode} on ${h.relation}`,
      )
      .join('; ');
    return `on ${tables.join(', ')}: ${who}`;
  } catch {
    return cause.message;
  }
}

/** The relations a statement may lock: every quoted identifier and every word after TABLE/ON/INTO/... */
function relationNames(statement: string): string[] {
  const names: string[] = [];
  for (const m of statement.matchAll(/"((?:[^"]|"")+)"/g)) names.push(`"${m[1]}"`);
  for (const m of statement.matchAll(
    /\b(?:TABLE|ON|INTO|REFERENCES|FROM|UPDATE|JOIN)\s+(?:ONLY\s+)?([a-z_][\w$]*)/gi,
  ))
    names.push(m[1]!);
  return names;
}
