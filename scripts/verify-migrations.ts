// `npm run db:verify`: checks that the Drizzle schema in src/db/schema, the SQL migrations in drizzle/
// and, with DATABASE_URL set, a live database agree:
// 1. drizzle-kit would generate nothing new (the committed snapshot matches the code);
// 2. every migration file is journaled, and the journal's `when` values strictly increase;
// 3. the migrations, applied to an empty database, create the tables, columns (type, nullability,
//    default), indexes and constraints the code declares;
// 4. with DATABASE_URL: every journaled migration is applied there, and its schema (columns, index
//    definitions and validity, constraints) is what the migrations make on a fresh database.
// The successor of the Python service's verify_migrations.py. Exit 1 on any disagreement.
import 'dotenv/config';
import { readdirSync } from 'node:fs';
import { PROJECT_ROOT } from '../src/lib/paths.js';
import type { Catalog, snapshotDrift } from './lib/schema-check.js';
import { askedForHelpOnly, runScript } from './lib/script-context.js';

const USAGE = `usage: npm run db:verify

Checks that src/db/schema, the migrations in drizzle/ and, with DATABASE_URL set, that database agree
(see MIGRATIONS.md). Exit code 1 on any disagreement.`;

let failed = false;
const pass = (line: string) => process.stdout.write(`✓ ${line}\n`);
const note = (line: string) => process.stdout.write(`- ${line}\n`);
function fail(line: string, problems: string[] = []) {
  failed = true;
  process.stderr.write(`✗ ${line}\n`);
  for (const p of problems) process.stderr.write(`    ${p}\n`);
}

/** 1. Snapshot drift: generate into a scratch copy of drizzle/ and see whether a file appears. */
function checkSnapshot(drift: ReturnType<typeof snapshotDrift>) {
  if (drift.kind === 'skipped')
    note('snapshot check skipped: it needs the source tree and drizzle-kit (a dev dependency)');
  else if (drift.kind === 'failed') fail(drift.problem, drift.output);
  else if (drift.kind === 'drift')
    fail(
      `the schema has changes with no migration; run \`npm run db:generate\` (would add ${drift.added.join(', ')})`,
    );
  else pass('drizzle/ snapshot matches src/db/schema');
}

function redact(url: string): string {
  const u = new URL(url);
  if (u.password) u.password = '***';
  // libpq takes the password as a parameter too.
  for (const name of [...u.searchParams.keys()])
    if (/pass|secret|key/i.test(name)) u.searchParams.set(name, '***');
  return u.toString();
}

async function main() {
  if (askedForHelpOnly(USAGE)) return;
  const [
    { default: pino },
    { loadConfig },
    { MIGRATIONS_FOLDER, openMemoryDatabase },
    { readJournal },
    { checkJournal, checkLiveDatabase, compareWithSnapshot, readCatalog, readLatestSnapshot, snapshotDrift },
  ] = await Promise.all([
    import('pino'),
    import('../src/config.js'),
    import('../src/db/client.js'),
    import('../src/db/migrations.js'),
    import('./lib/schema-check.js'),
  ]);
  // Only DATABASE_URL (and the connect timeout) matter here; no secret is used.
  const config = loadConfig(process.env, { needsSecrets: false });

  checkSnapshot(snapshotDrift(PROJECT_ROOT, 'src/db/schema/index.ts'));

  // 2. The journal.
  const entries = readJournal();
  const journalProblems = checkJournal(
    entries,
    readdirSync(MIGRATIONS_FOLDER).filter((f) => f.endsWith('.sql')),
  );
  if (journalProblems.length)
    fail('the journal (drizzle/meta/_journal.json) is not in order:', journalProblems);
  else pass(`${entries.length} migrations, all journaled, their \`when\` strictly increasing`);

  // 3. The migrations applied to an empty database against the code's schema (the latest snapshot,
  //    which step 1 showed equal to the code).
  const fresh = await openMemoryDatabase(pino({ level: 'silent' }));
  let freshCatalog: Catalog;
  try {
    freshCatalog = await readCatalog(fresh.db);
  } finally {
    await fresh.close();
  }
  const snapshotProblems = compareWithSnapshot(readLatestSnapshot(entries), freshCatalog);
  if (snapshotProblems.length) fail('the migrated database differs from the code schema:', snapshotProblems);
  else
    pass(
      `migrations applied to an empty database match the code (${freshCatalog.columns.length} columns with ` +
        `types, nullability and defaults; ${freshCatalog.indexes.length} indexes; ${freshCatalog.constraints.length} constraints)`,
    );

  // 4. The live database.
  if (!config.databaseUrl) {
    note('DATABASE_URL is not set: no live database checked');
  } else {
    const where = redact(config.databaseUrl);
    const live = await checkLiveDatabase(config.databaseUrl, {
      entries,
      fallback: async () => freshCatalog,
      connectTimeoutMs: Math.max(config.db.connectTimeoutMs, 5000),
    });
    if (live.appliedProblems.length)
      fail(
        `${where}: ${live.applied} of ${entries.length} journaled migrations applied:`,
        live.appliedProblems,
      );
    else pass(`${where}: all ${entries.length} journaled migrations applied`);
    if (live.comparedWith !== 'a scratch database on the same server')
      note(
        `could not create a scratch database on that server (no CREATEDB); compared with ${live.comparedWith} ` +
          'instead, whose definitions may be spelled differently by another PostgreSQL version',
      );
    if (live.schemaProblems.length)
      fail(
        `${where}: the schema differs from what the migrations make (${live.comparedWith}):`,
        live.schemaProblems,
      );
    else
      pass(
        `${where}: the schema is what the migrations make (${live.counts.columns} columns, ` +
          `${live.counts.indexes} indexes, all valid, ${live.counts.constraints} constraints)`,
      );
    for (const n of live.notes) note(n);
  }
  if (failed) process.exitCode = 1;
}

await runScript(main, USAGE);
