// What `npm run db:verify` compares: the journal, the latest drizzle-kit snapshot (the code's schema),
// a database migrated from nothing, and a live database. Each check returns its problems as lines; an
// empty list means it agrees.
import { createHash, randomBytes } from 'node:crypto';
import { spawnSync } from 'node:child_process';
import { cpSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { join, relative } from 'node:path';
import { sql } from 'drizzle-orm';
import pg from 'pg';
import pino from 'pino';
import { type Database, type Executor, openDatabase, selectRows } from '../../src/db/client.js';
import { type JournalEntry, MIGRATIONS_FOLDER } from '../../src/db/migrations.js';

export interface Column {
  table: string;
  name: string;
  /** format_type(): `timestamp(3) with time zone`, `text[]`, `character varying(64)`. */
  type: string;
  notNull: boolean;
  /** pg_get_expr() of the default, null when there is none. */
  default: string | null;
}

export interface Index {
  table: string;
  name: string;
  /** pg_indexes.indexdef. */
  definition: string;
  /** pg_index.indisvalid: false for one left by an interrupted CREATE INDEX CONCURRENTLY. */
  valid: boolean;
}

export interface Constraint {
  table: string;
  name: string;
  /** pg_get_constraintdef(): `PRIMARY KEY (id)`, `FOREIGN KEY (…) REFERENCES …`, with `NOT VALID` if it is not. */
  definition: string;
}

/** The public schema of a database, as the catalogs describe it. */
export interface Catalog {
  tables: string[];
  columns: Column[];
  indexes: Index[];
  constraints: Constraint[];
}

/**
 * Read with search_path = pg_catalog, so that every definition names its relations with their schema
 * (`REFERENCES public.users(id)`) whatever search_path the role has: two databases then compare as text.
 */
export async function readCatalog(db: Database): Promise<Catalog> {
  return db.transaction(async (tx) => {
    await tx.execute(sql`SET LOCAL search_path = pg_catalog`);
    return readCatalogIn(tx);
  });
}

async function readCatalogIn(db: Executor): Promise<Catalog> {
  const tables = await selectRows<{ name: string }>(
    db,
    sql`SELECT c.relname AS name FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') ORDER BY 1`,
  );
  const columns = await selectRows<{
    table: string;
    name: string;
    type: string;
    not_null: boolean;
    default: string | null;
  }>(
    db,
    sql`SELECT c.relname AS table, a.attname AS name, format_type(a.atttypid, a.atttypmod) AS type,
               a.attnotnull AS not_null, pg_get_expr(d.adbin, d.adrelid) AS default
          FROM pg_attribute a
          JOIN pg_class c ON c.oid = a.attrelid
          JOIN pg_namespace n ON n.oid = c.relnamespace
          LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
         WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND a.attnum > 0 AND NOT a.attisdropped
         ORDER BY 1, a.attnum`,
  );
  const indexes = await selectRows<{ table: string; name: string; definition: string; valid: boolean }>(
    db,
    sql`SELECT t.relname AS table, i.relname AS name, pg_get_indexdef(x.indexrelid) AS definition,
               x.indisvalid AS valid
          FROM pg_index x
          JOIN pg_class i ON i.oid = x.indexrelid
          JOIN pg_class t ON t.oid = x.indrelid
          JOIN pg_namespace n ON n.oid = t.relnamespace
         WHERE n.nspname = 'public'
         ORDER BY 1, 2`,
  );
  const constraints = await selectRows<{ table: string; name: string; definition: string }>(
    db,
    sql`SELECT c.relname AS table, k.conname AS name, pg_get_constraintdef(k.oid) AS definition
          FROM pg_constraint k
          JOIN pg_class c ON c.oid = k.conrelid
          JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = 'public' AND k.contype IN ('p', 'u', 'f', 'c', 'x')
         ORDER BY 1, 2`,
  );
  return {
    tables: tables.map((t) => t.name),
    columns: columns.map((c) => ({
      table: c.table,
      name: c.name,
      type: c.type,
      notNull: c.not_null,
      default: c.default,
    })),
    indexes,
    constraints,
  };
}

// ——— the journal ———

/**
 * Every file journaled and every journal entry a file; `when` strictly increasing. drizzle's migrator
 * applies only entries whose `when` is later than the last applied one's, so an entry older than its
 * predecessor (a branch merged after a later migration) is silently never applied where the later one
 * already is.
 */
export function checkJournal(entries: JournalEntry[], sqlFiles: string[]): string[] {
  const problems: string[] = [];
  const tags = new Set(entries.map((e) => e.tag));
  const files = new Set(sqlFiles.map((f) => f.replace(/\.sql$/, '')));
  const unjournaled = [...files].filter((t) => !tags.has(t));
  const missing = [...tags].filter((t) => !files.has(t));
  if (unjournaled.length)
    problems.push(
      `not in meta/_journal.json: ${unjournaled.join(', ')} (generate migrations with npm run db:generate)`,
    );
  if (missing.length) problems.push(`journaled but no .sql file: ${missing.join(', ')}`);
  entries.forEach((entry, i) => {
    if (entry.idx !== i) problems.push(`${entry.tag}: idx ${entry.idx}, but it is entry ${i} of the journal`);
    const previous = entries[i - 1];
    if (previous && !(entry.when > previous.when))
      problems.push(
        `${entry.tag}: its when (${entry.when}, ${isoDate(entry.when)}) is not later than ${previous.tag}'s ` +
          `(${previous.when}, ${isoDate(previous.when)}); drizzle's migrator skips a migration older than the last ` +
          `one applied, so no database that has ${previous.tag} would ever get it. Give it a later when ` +
          '(and keep the order of the files)',
      );
  });
  return problems;
}

const isoDate = (ms: number) => (Number.isFinite(ms) ? new Date(ms).toISOString() : 'not a time');

// ——— the code's schema (the latest drizzle-kit snapshot) ———

interface SnapshotTable {
  name: string;
  schema: string;
  columns: Record<
    string,
    { name: string; type: string; primaryKey: boolean; notNull: boolean; default?: unknown }
  >;
  indexes: Record<string, { name: string; isUnique: boolean }>;
  foreignKeys: Record<string, { name: string }>;
  compositePrimaryKeys: Record<string, { name: string }>;
  uniqueConstraints: Record<string, { name: string }>;
  checkConstraints?: Record<string, { name: string }>;
}

/** What drizzle-kit generate prints when the schema and the latest snapshot agree. */
const NOTHING_TO_GENERATE = /No schema changes, nothing to migrate/;

export type SnapshotDrift =
  | { kind: 'none' }
  | { kind: 'drift'; added: string[] }
  | { kind: 'failed'; problem: string; output: string[] }
  | { kind: 'skipped' };

/**
 * Whether `drizzle-kit generate` would write a migration for `schema` (relative to `root`) beside the
 * committed ones: run on a copy of the migrations folder, so nothing is written into it.
 */
export function snapshotDrift(root: string, schema: string, folder = MIGRATIONS_FOLDER): SnapshotDrift {
  const drizzleKit = join(root, 'node_modules/.bin/drizzle-kit');
  // The compiled scripts (the Docker image) have neither the TypeScript schema nor drizzle-kit.
  if (!existsSync(drizzleKit) || !existsSync(join(root, schema))) return { kind: 'skipped' };
  // Inside the project, named relatively: drizzle-kit puts `./` before `--out`, so an absolute path
  // (a directory under /tmp) was read as `.//tmp/…`, found no snapshot, and exited 0 having compared
  // nothing. Under .data/, which git ignores.
  mkdirSync(join(root, '.data'), { recursive: true });
  const scratch = mkdtempSync(join(root, '.data', 'verify-migrations-'));
  try {
    cpSync(folder, scratch, { recursive: true });
    const before = new Set(readdirSync(scratch));
    const run = spawnSync(
      drizzleKit,
      ['generate', '--dialect', 'postgresql', '--schema', schema, '--out', relative(root, scratch)],
      { cwd: root, encoding: 'utf8' },
    );
    const output = [run.stdout, run.stderr].filter(Boolean);
    if (run.status !== 0) return { kind: 'failed', problem: 'drizzle-kit generate failed', output };
    const added = readdirSync(scratch).filter((f) => !before.has(f) && f.endsWith('.sql'));
    if (added.length > 0) return { kind: 'drift', added };
    // Nothing written is a pass only when drizzle-kit says it compared and found nothing: it exits 0
    // on some failures too.
    if (!NOTHING_TO_GENERATE.test(run.stdout ?? ''))
      return {
        kind: 'failed',
        problem: 'drizzle-kit generate neither wrote a migration nor reported the schema unchanged',
        output,
      };
    return { kind: 'none' };
  } finally {
    rmSync(scratch, { recursive: true, force: true });
  }
}

export interface Snapshot {
  tables: Record<string, SnapshotTable>;
}

export function readLatestSnapshot(entries: JournalEntry[], folder = MIGRATIONS_FOLDER): Snapshot {
  const latest = entries.at(-1)?.tag.split('_')[0];
  return JSON.parse(readFileSync(join(folder, `meta/${latest}_snapshot.json`), 'utf8')) as Snapshot;
}

const TYPE_NAMES: Record<string, string> = {
  int: 'integer',
  int4: 'integer',
  serial: 'integer',
  int8: 'bigint',
  bigserial: 'bigint',
  int2: 'smallint',
  smallserial: 'smallint',
  bool: 'boolean',
  float8: 'double precision',
  float4: 'real',
  varchar: 'character varying',
  char: 'character',
  decimal: 'numeric',
  timestamptz: 'timestamp with time zone',
  timetz: 'time with time zone',
};

/** A type as format_type() spells it: `varchar(64)` → `character varying(64)`, `timestamp (3)` → `timestamp(3) without time zone`. */
export function normalizeType(raw: string): string {
  let t = raw
    .trim()
    .toLowerCase()
    .replace(/\s+/g, ' ')
    .replace(/ ?\( ?/g, '(')
    .replace(/ ?, ?/g, ',')
    .replace(/ ?\)/g, ')');
  const array = (/(\[\d*\])+$/.exec(t)?.[0] ?? '').replace(/\d/g, '');
  t = t.replace(/(\[\d*\])+$/, '').trim();
  const m = /^([a-z][a-z0-9 ]*?)(\([^)]*\))?( with time zone| without time zone)?$/.exec(t);
  if (!m) return t + array;
  const args = m[2] ?? '';
  let name = TYPE_NAMES[m[1]!] ?? m[1]!;
  let zone = m[3] ?? '';
  const zoned = /^(timestamp|time) with time zone$/.exec(name);
  if (zoned) {
    name = zoned[1]!;
    zone = ' with time zone';
  }
  if ((name === 'timestamp' || name === 'time') && !zone) zone = ' without time zone';
  return `${name}${args}${zone}${array}`;
}

/** A default as comparable text: a literal's cast to the column's own type dropped (`'x'::text` → `'x'`). */
export function normalizeDefault(raw: unknown, type: string): string | null {
  if (raw === undefined || raw === null) return null;
  const text = String(raw).trim();
  const cast = /^('(?:[^']|'')*')::(.+)$/.exec(text);
  if (cast && normalizeType(cast[2]!) === normalizeType(type)) return cast[1]!;
  return text;
}

const nullability = (notNull: boolean) => (notNull ? 'NOT NULL' : 'nullable');
const showDefault = (d: string | null) => (d === null ? 'no default' : `default ${d}`);

/**
 * A database migrated from nothing against the code's schema (drizzle-kit's latest snapshot): every
 * table, column (type, nullability, default), index (name, uniqueness) and constraint (name) of the
 * one is in the other.
 */
export function compareWithSnapshot(snapshot: Snapshot, catalog: Catalog): string[] {
  const problems: string[] = [];
  const expectedTables = Object.values(snapshot.tables).filter((t) => (t.schema || 'public') === 'public');
  const tableNames = new Set(expectedTables.map((t) => t.name));
  for (const name of tableNames)
    if (!catalog.tables.includes(name)) problems.push(`table ${name}: missing after migrating`);
  for (const name of catalog.tables)
    if (!tableNames.has(name)) problems.push(`table ${name}: made by the migrations but not in the code`);

  const columns = new Map(catalog.columns.map((c) => [`${c.table}.${c.name}`, c]));
  const expectedColumns = new Set<string>();
  const indexes = new Map(catalog.indexes.map((i) => [i.name, i]));
  const expectedIndexes = new Set<string>();
  const constraints = new Set(catalog.constraints.map((c) => `${c.table}.${c.name}`));
  const expectedConstraints = new Set<string>();
  for (const table of expectedTables) {
    for (const [name, column] of Object.entries(table.columns)) {
      const key = `${table.name}.${name}`;
      expectedColumns.add(key);
      const actual = columns.get(key);
      if (!actual) {
        problems.push(`column ${key}: missing after migrating`);
        continue;
      }
      const type = normalizeType(column.type);
      if (normalizeType(actual.type) !== type)
        problems.push(`column ${key}: type ${actual.type} after migrating, ${type} in the code`);
      if (actual.notNull !== column.notNull)
        problems.push(
          `column ${key}: ${nullability(actual.notNull)} after migrating, ${nullability(column.notNull)} in the code`,
        );
      const wanted = normalizeDefault(column.default, column.type);
      const found = normalizeDefault(actual.default, actual.type);
      if (wanted !== found)
        problems.push(
          `column ${key}: ${showDefault(found)} after migrating, ${showDefault(wanted)} in the code`,
        );
    }
    for (const index of Object.values(table.indexes)) {
      expectedIndexes.add(index.name);
      const actual = indexes.get(index.name);
      if (!actual || actual.table !== table.name)
        problems.push(`index ${index.name} on ${table.name}: missing after migrating`);
      else if (/^CREATE UNIQUE /.test(actual.definition) !== index.isUnique)
        problems.push(
          `index ${index.name} on ${table.name}: ${index.isUnique ? 'unique in the code' : 'not unique in the code'}, ` +
            `after migrating ${actual.definition}`,
        );
    }
    const named = [
      ...Object.values(table.foreignKeys),
      ...Object.values(table.compositePrimaryKeys),
      ...Object.values(table.uniqueConstraints),
      ...Object.values(table.checkConstraints ?? {}),
    ].map((c) => c.name);
    if (Object.values(table.columns).some((c) => c.primaryKey)) named.push(`${table.name}_pkey`);
    for (const name of named) {
      expectedConstraints.add(`${table.name}.${name}`);
      if (!constraints.has(`${table.name}.${name}`))
        problems.push(`constraint ${name} on ${table.name}: missing after migrating`);
    }
  }
  for (const column of catalog.columns)
    if (tableNames.has(column.table) && !expectedColumns.has(`${column.table}.${column.name}`))
      problems.push(`column ${column.table}.${column.name}: made by the migrations but not in the code`);
  // Constraints' own indexes (primary keys, unique constraints) are accounted for as constraints.
  const constraintIndexes = new Set(catalog.constraints.map((c) => c.name));
  for (const index of catalog.indexes)
    if (tableNames.has(index.table) && !expectedIndexes.has(index.name) && !constraintIndexes.has(index.name))
      problems.push(`index ${index.name} on ${index.table}: made by the migrations but not in the code`);
  for (const constraint of catalog.constraints)
    if (
      tableNames.has(constraint.table) &&
      !expectedConstraints.has(`${constraint.table}.${constraint.name}`)
    )
      problems.push(
        `constraint ${constraint.name} on ${constraint.table}: made by the migrations but not in the code`,
      );
  return problems;
}

// ——— a live database ———

/**
 * A live database against one migrated from nothing: every column with its type, nullability and
 * default, every index with its definition, every constraint with its definition, on the tables the
 * migrations make. Tables of others in the same schema are left alone (returned as notes).
 */
export function compareCatalogs(expected: Catalog, live: Catalog): { problems: string[]; notes: string[] } {
  const problems: string[] = [];
  const notes: string[] = [];
  const tables = new Set(expected.tables);
  for (const table of expected.tables)
    if (!live.tables.includes(table)) problems.push(`table ${table}: missing (the migrations make it)`);
  const others = live.tables.filter((t) => !tables.has(t));
  if (others.length) notes.push(`tables not made by the migrations, not compared: ${others.join(', ')}`);
  const ours = <T extends { table: string }>(items: T[]) =>
    items.filter((i) => tables.has(i.table) && live.tables.includes(i.table));

  const liveColumns = new Map(live.columns.map((c) => [`${c.table}.${c.name}`, c]));
  const expectedColumns = new Map(expected.columns.map((c) => [`${c.table}.${c.name}`, c]));
  for (const [key, want] of expectedColumns) {
    if (!live.tables.includes(want.table)) continue;
    const have = liveColumns.get(key);
    if (!have) {
      problems.push(`column ${key}: missing (the migrations make it ${want.type})`);
      continue;
    }
    if (have.type !== want.type)
      problems.push(`column ${key}: type ${have.type}, the migrations make ${want.type}`);
    if (have.notNull !== want.notNull)
      problems.push(
        `column ${key}: ${nullability(have.notNull)}, the migrations make it ${nullability(want.notNull)}`,
      );
    if (have.default !== want.default)
      problems.push(
        `column ${key}: ${showDefault(have.default)}, the migrations make ${showDefault(want.default)}`,
      );
  }
  for (const column of ours(live.columns))
    if (!expectedColumns.has(`${column.table}.${column.name}`))
      problems.push(`column ${column.table}.${column.name}: not made by the migrations (${column.type})`);

  const liveIndexes = new Map(live.indexes.map((i) => [i.name, i]));
  const expectedIndexes = new Map(expected.indexes.map((i) => [i.name, i]));
  for (const [name, want] of expectedIndexes) {
    if (!live.tables.includes(want.table)) continue;
    const have = liveIndexes.get(name);
    if (!have)
      problems.push(`index ${name} on ${want.table}: missing (the migrations make: ${want.definition})`);
    else if (have.definition !== want.definition)
      problems.push(`index ${name}: ${have.definition}, the migrations make: ${want.definition}`);
  }
  for (const index of ours(live.indexes))
    if (!expectedIndexes.has(index.name))
      problems.push(
        `index ${index.name} on ${index.table}: not made by the migrations (${index.definition})`,
      );
  for (const index of live.indexes)
    if (!index.valid) problems.push(invalidIndexProblem(index, expectedIndexes.get(index.name)));

  const liveConstraints = new Map(live.constraints.map((c) => [`${c.table}.${c.name}`, c]));
  const expectedConstraints = new Map(expected.constraints.map((c) => [`${c.table}.${c.name}`, c]));
  for (const [key, want] of expectedConstraints) {
    if (!live.tables.includes(want.table)) continue;
    const have = liveConstraints.get(key);
    if (!have)
      problems.push(
        `constraint ${want.name} on ${want.table}: missing (the migrations make: ${want.definition})`,
      );
    else if (have.definition !== want.definition)
      problems.push(
        `constraint ${want.name} on ${want.table}: ${have.definition}, the migrations make: ${want.definition}`,
      );
  }
  for (const constraint of ours(live.constraints))
    if (!expectedConstraints.has(`${constraint.table}.${constraint.name}`))
      problems.push(
        `constraint ${constraint.name} on ${constraint.table}: not made by the migrations (${constraint.definition})`,
      );
  return { problems, notes };
}

/** An INVALID index, with the fix of MIGRATIONS.md ("Indexes on big tables") spelled out for it. */
function invalidIndexProblem(index: Index, expected: Index | undefined): string {
  const definition = (expected ?? index).definition.replace(
    /^CREATE (UNIQUE )?INDEX /,
    'CREATE $1INDEX CONCURRENTLY IF NOT EXISTS ',
  );
  return (
    `index ${index.name} on ${index.table} is INVALID (left by an interrupted or failed CREATE INDEX ` +
    'CONCURRENTLY): queries cannot use it while every write still maintains it, and the migration ' +
    `that creates it IF NOT EXISTS skips it. Fix (MIGRATIONS.md, "Indexes on big tables"): ` +
    `DROP INDEX CONCURRENTLY public."${index.name}"; then ${definition}` +
    (/^CREATE UNIQUE /.test(definition) ? ' (if that fails on duplicate rows, resolve them first)' : '')
  );
}

/**
 * The journal against drizzle.__drizzle_migrations: every entry applied (a row with its `when`), from
 * the same file (its sha256), and no row the journal does not know.
 */
export async function checkApplied(
  db: Executor,
  entries: JournalEntry[],
  folder = MIGRATIONS_FOLDER,
): Promise<{ problems: string[]; applied: number }> {
  const [table] = await selectRows<{ present: boolean }>(
    db,
    sql`SELECT to_regclass('drizzle.__drizzle_migrations') IS NOT NULL AS present`,
  );
  if (!table?.present)
    return {
      problems: [
        'no migration has been applied: drizzle.__drizzle_migrations does not exist (npm run db:migrate)',
      ],
      applied: 0,
    };
  const rows = await selectRows<{ hash: string; created_at: string | number }>(
    db,
    sql`SELECT hash, created_at FROM drizzle.__drizzle_migrations ORDER BY created_at`,
  );
  const problems: string[] = [];
  const lastApplied = rows.reduce((max, r) => Math.max(max, Number(r.created_at)), Number.NEGATIVE_INFINITY);
  const known = new Set(entries.map((e) => e.when));
  let applied = 0;
  for (const entry of entries) {
    const row = rows.find((r) => Number(r.created_at) === entry.when);
    if (!row) {
      problems.push(
        entry.when < lastApplied
          ? `${entry.tag}: not applied, and never will be: its when is older than the last applied migration's, and drizzle's migrator skips those`
          : `${entry.tag}: not applied (npm run db:migrate)`,
      );
      continue;
    }
    applied++;
    const hash = createHash('sha256')
      .update(readFileSync(join(folder, `${entry.tag}.sql`)).toString())
      .digest('hex');
    if (row.hash !== hash)
      problems.push(
        `${entry.tag}: applied from a different file (its sha256 differs): edited after it was applied?`,
      );
  }
  const unknown = rows.filter((r) => !known.has(Number(r.created_at)));
  if (unknown.length)
    problems.push(
      `${unknown.length} applied migration(s) not in this journal (when ${unknown.map((r) => r.created_at).join(', ')}): ` +
        'applied by a newer release?',
    );
  return { problems, applied };
}

const silent = pino({ level: 'silent' });

/**
 * The catalog of a database migrated from nothing on the same PostgreSQL server as `url` (so that
 * definitions are spelled by the same version), created from template0 and dropped afterwards.
 * Undefined when the role may not create databases.
 */
export async function freshCatalogBeside(url: string, connectTimeoutMs = 5000): Promise<Catalog | undefined> {
  const name = `verify_migrations_${randomBytes(6).toString('hex')}`;
  const onServer = async (statement: string) => {
    const admin = new pg.Client({ connectionString: url, connectionTimeoutMillis: connectTimeoutMs });
    admin.on('error', () => undefined);
    await admin.connect();
    try {
      await admin.query(statement);
    } finally {
      await admin.end().catch(() => undefined);
    }
  };
  try {
    await onServer(`CREATE DATABASE "${name}" TEMPLATE template0`);
  } catch (err) {
    if ((err as { code?: string }).code === '42501') return undefined;
    throw err;
  }
  try {
    const scratchUrl = new URL(url);
    scratchUrl.pathname = `/${name}`;
    const database = await openDatabase({
      url: scratchUrl.toString(),
      dataDir: '.data',
      logger: silent,
      poolMax: 1,
      connectTimeoutMs,
      migrate: true,
    });
    try {
      return await readCatalog(database.db);
    } finally {
      await database.close();
    }
  } finally {
    await onServer(`DROP DATABASE IF EXISTS "${name}"`).catch(() => undefined);
  }
}

export interface LiveCheck {
  /** Journaled migrations applied to the live database. */
  applied: number;
  appliedProblems: string[];
  schemaProblems: string[];
  notes: string[];
  /** Where the expected schema came from. */
  comparedWith: 'a scratch database on the same server' | 'the embedded PostgreSQL (PGlite)';
  counts: { columns: number; indexes: number; constraints: number };
}

/**
 * The live database at `url` against the migrations: what is applied, and its schema against a
 * database migrated from nothing (on the same server; `fallback`, a migrated embedded database, when
 * the role may not create one).
 */
export async function checkLiveDatabase(
  url: string,
  options: { entries: JournalEntry[]; fallback?: () => Promise<Catalog>; connectTimeoutMs?: number },
): Promise<LiveCheck> {
  const live = await openDatabase({
    url,
    dataDir: '.data',
    logger: silent,
    poolMax: 1,
    connectTimeoutMs: options.connectTimeoutMs ?? 5000,
    migrate: false,
  });
  let liveCatalog: Catalog;
  let applied: { problems: string[]; applied: number };
  try {
    applied = await checkApplied(live.db, options.entries);
    liveCatalog = await readCatalog(live.db);
  } finally {
    await live.close();
  }
  let expected = await freshCatalogBeside(url, options.connectTimeoutMs);
  let comparedWith: LiveCheck['comparedWith'] = 'a scratch database on the same server';
  if (!expected) {
    if (!options.fallback) throw new Error('the role may not create a scratch database to compare with');
    expected = await options.fallback();
    comparedWith = 'the embedded PostgreSQL (PGlite)';
  }
  const { problems, notes } = compareCatalogs(expected, liveCatalog);
  return {
    applied: applied.applied,
    appliedProblems: applied.problems,
    schemaProblems: problems,
    notes,
    comparedWith,
    counts: {
      columns: expected.columns.length,
      indexes: expected.indexes.length,
      constraints: expected.constraints.length,
    },
  };
}
