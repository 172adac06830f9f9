// Applies pending migrations in drizzle/ to DATABASE_URL (or the embedded database under DATA_DIR),
// under the same advisory lock, timeouts and retries as the service at start: `npm run db:migrate`.
import 'dotenv/config';
import { askedForHelpOnly, runScript } from './lib/script-context.js';

const USAGE = `usage: npm run db:migrate

Applies the pending migrations of drizzle/ to DATABASE_URL (or the embedded database under DATA_DIR)
and says how many it applied. Waits for another instance applying them; a migration that cannot take
its locks within DB_MIGRATION_RETRY_MS fails with exit code 1 (see MIGRATIONS.md).`;

async function main() {
  if (askedForHelpOnly(USAGE)) return;
  const [{ loadConfig }, { openDatabase, runMigrations }, { scriptLogger }] = await Promise.all([
    import('../src/config.js'),
    import('../src/db/client.js'),
    import('./lib/script-logger.js'),
  ]);
  // Migrating encrypts and hashes nothing: production's secrets are not needed for it.
  const config = loadConfig(process.env, { needsSecrets: false });
  const logger = scriptLogger(config.logLevel);
  const database = await openDatabase({
    url: config.databaseUrl,
    dataDir: config.dataDir,
    logger,
    poolMax: 1,
    connectTimeoutMs: config.db.connectTimeoutMs,
    statementTimeoutMs: config.db.statementTimeoutMs,
    transactionTimeoutMs: config.db.transactionTimeoutMs,
    migrate: false,
  });
  try {
    const { applied, total, unknown } = await runMigrations(
      database,
      config.databaseUrl,
      logger,
      config.db.migrations,
    );
    process.stdout.write(
      applied.length === 0
        ? `no migrations pending (${total} applied, ${database.kind})\n`
        : `applied ${applied.length} migration${applied.length === 1 ? '' : 's'} (${database.kind}): ${applied.join(', ')}\n`,
    );
    if (unknown > 0)
      process.stdout.write(
        `note: the database has ${unknown} migration${unknown === 1 ? '' : 's'} newer than this release: ` +
          'a newer release applied them (npm run db:verify names them)\n',
      );
  } finally {
    await database.close();
  }
}

await runScript(main, USAGE);
