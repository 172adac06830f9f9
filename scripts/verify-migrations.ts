// Checks that the Drizzle schema in src/db/schema and the SQL migrations in drizzle/ agree:
// 1. drizzle-kit would generate nothing new (the committed snapshot matches the code);
// 2. every migration file is journaled;
// 3. the migrations, applied to an empty database, create the tables, columns and indexes the code declares.
// The successor of the Python service's verify_migrations.py. Exit 1 on any disagreement.
import { spawnSync } from 'node:child_process';
import { cpSync, mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { sql } from 'drizzle-orm';
import pino from 'pino';
import { MIGRATIONS_FOLDER, openMemoryDatabase, selectRows } from '../src/db/client.js';

let failed = false;

// 1. Snapshot drift: generate into a scratch copy of drizzle/ and see whether a file appears.
const scratch = mkdtempSync(join(tmpdir(), 'verify-migrations-'));
try {
  cpSync(MIGRATIONS_FOLDER, scratch, { recursive: true });
  const before = new Set(readdirSync(scratch));
  const run = spawnSync(
    'npx',
    [
      'drizzle-kit',
      'generate',
      '--dialect',
      'postgresql',
      '--schema',
      'src/db/schema/index.ts',
      '--out',
      scratch,
    ],
    { encoding: 'utf8' },
  );
  if (run.status !== 0) {
    console.error(run.stdout, run.stderr);
    console.error('✗ drizzle-kit generate failed');
    failed = true;
  } else {
    const added = readdirSync(scratch).filter((f) => !before.has(f) && f.endsWith('.sql'));
    if (added.length > 0) {
      console.error(
        `✗ the schema has changes with no migration; run \`npm run db:generate\` (would add ${added.join(', ')})`,
      );
      failed = true;
    } else console.log('✓ drizzle/ snapshot matches src/db/schema');
  }
} finally {
  rmSync(scratch, { recursive: true, force: true });
}

// 2. Every migration file is in the journal and the other way round.
const journal = JSON.parse(readFileSync(join(MIGRATIONS_FOLDER, 'meta/_journal.json'), 'utf8')) as {
  entries: Array<{ tag: string }>;
};
const journalTags = new Set(journal.entries.map((e) => e.tag));
const sqlTags = new Set(
  readdirSync(MIGRATIONS_FOLDER)
    .filter((f) => f.endsWith('.sql'))
    .map((f) => f.slice(0, -4)),
);
const unjournaled = [...sqlTags].filter((t) => !journalTags.has(t));
const missing = [...journalTags].filter((t) => !sqlTags.has(t));
if (unjournaled.length || missing.length) {
  console.error(
    `✗ journal and files disagree: not journaled ${unjournaled.join(', ') || '-'}; missing ${missing.join(', ') || '-'}`,
  );
  failed = true;
} else console.log(`✓ ${sqlTags.size} migrations, all journaled`);

// 3. The migrations, applied to an empty database, create exactly the tables, columns and indexes of
//    the latest snapshot (which step 1 showed equal to the code).
const latest = journal.entries.at(-1)?.tag.split('_')[0];
const snapshot = JSON.parse(
  readFileSync(join(MIGRATIONS_FOLDER, `meta/${latest}_snapshot.json`), 'utf8'),
) as {
  tables: Record<
    string,
    { name: string; columns: Record<string, { notNull: boolean }>; indexes: Record<string, unknown> }
  >;
};
const database = await openMemoryDatabase(pino({ level: 'silent' }));
try {
  const rows = await selectRows<{ table_name: string; column_name: string; is_nullable: string }>(
    database.db,
    sql`SELECT table_name, column_name, is_nullable FROM information_schema.columns WHERE table_schema = 'public'`,
  );
  const indexes = await selectRows<{ tablename: string; indexname: string }>(
    database.db,
    sql`SELECT tablename, indexname FROM pg_indexes WHERE schemaname = 'public'`,
  );
  const actual = new Map<string, string>();
  for (const r of rows)
    actual.set(`${r.table_name}.${r.column_name}`, r.is_nullable === 'NO' ? 'not null' : 'null');
  const expected = new Map<string, string>();
  const expectedIndexes = new Set<string>();
  for (const table of Object.values(snapshot.tables)) {
    for (const [name, col] of Object.entries(table.columns))
      expected.set(`${table.name}.${name}`, col.notNull ? 'not null' : 'null');
    for (const name of Object.keys(table.indexes)) expectedIndexes.add(`${table.name}.${name}`);
  }
  const problems: string[] = [];
  for (const [k, v] of expected)
    if (actual.get(k) !== v) problems.push(`${k}: expected ${v}, found ${actual.get(k) ?? 'nothing'}`);
  for (const k of actual.keys())
    if (!expected.has(k)) problems.push(`${k}: in the database but not in the code`);
  const actualIndexes = new Set(indexes.map((r) => `${r.tablename}.${r.indexname}`));
  for (const k of expectedIndexes)
    if (!actualIndexes.has(k)) problems.push(`index ${k}: missing after migration`);
  if (problems.length) {
    console.error('✗ the migrated database differs from the code schema:');
    for (const p of problems) console.error(`    ${p}`);
    failed = true;
  } else console.log(`✓ migrations applied to an empty database match the code (${expected.size} columns)`);
} finally {
  await database.close();
}

process.exit(failed ? 1 : 0);
