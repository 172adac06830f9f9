// What the operator scripts share: one way to fail (runScript: one line on stderr, exit code 1), logs
// on stderr, and for create-admin and rotate-signing-key the configuration, the migrated database and
// the services wired exactly as the HTTP app wires them, so a rule holds whichever door it is reached by.
// Light on purpose: only `node:` modules and dotenv load with it, so that `--help` and a usage error
// are answered at once; the configuration, the database layer and the services (a second of CPU) are
// loaded with `await import` once the arguments are known good, here and in the scripts.
import 'dotenv/config';
import { parseArgs } from 'node:util';
import type { Logger } from 'pino';
import type { Config } from '../../src/config.js';
import type { DatabaseHandle } from '../../src/db/client.js';
import type { Services } from '../../src/services.js';

/** Bad command-line input: reported with the usage text, exit code 1. */
export class UsageError extends Error {
  override name = 'UsageError';
}

/**
 * For a script that takes no arguments but `--help`: prints the usage and answers true for `--help`,
 * refuses anything else as a usage error.
 */
export function askedForHelpOnly(usage: string): boolean {
  let help: boolean | undefined;
  try {
    ({ help } = parseArgs({ options: { help: { type: 'boolean', short: 'h' } }, strict: true }).values);
  } catch (err) {
    throw new UsageError(err instanceof Error ? err.message : String(err));
  }
  if (help) process.stdout.write(`${usage}\n`);
  return help === true;
}

export interface ScriptContext {
  config: Config;
  logger: Logger;
  database: DatabaseHandle;
  services: Services;
  close(): Promise<void>;
}

export async function openScriptContext(): Promise<ScriptContext> {
  const [{ loadConfig }, { openDatabase }, { systemClock }, { createServices }, { scriptLogger }] =
    await Promise.all([
      import('../../src/config.js'),
      import('../../src/db/client.js'),
      import('../../src/lib/clock.js'),
      import('../../src/services.js'),
      import('./script-logger.js'),
    ]);
  const config = loadConfig(process.env);
  const logger = scriptLogger(config.logLevel);
  const database = await openDatabase({
    url: config.databaseUrl,
    dataDir: config.dataDir,
    logger,
    poolMax: 2,
    connectTimeoutMs: config.db.connectTimeoutMs,
    statementTimeoutMs: config.db.statementTimeoutMs,
    transactionTimeoutMs: config.db.transactionTimeoutMs,
    migrate: true,
    migrations: config.db.migrations,
  });
  // start() is deliberately not called: it would LISTEN, run timers and bootstrap BOOTSTRAP_ADMIN_*,
  // none of which a one-shot command wants. Each script calls only what it needs.
  const services = createServices({ config, database, logger, clock: systemClock });
  return {
    config,
    logger,
    database,
    services,
    async close() {
      await services.stop();
      await database.close();
    },
  };
}

/** Runs a script's main; any failure becomes one line on stderr and exit code 1, never a stack dump. */
export async function runScript(main: () => Promise<void>, usage: string): Promise<void> {
  try {
    await main();
  } catch (err) {
    process.exitCode = 1;
    if (err instanceof UsageError) process.stderr.write(`${err.message}\n\n${usage}\n`);
    else {
      const { databaseLocation, describeFailure } = await import('../../src/lib/failure.js');
      process.stderr.write(`${describeFailure(err, databaseLocation(process.env.DATABASE_URL))}\n`);
    }
  }
}
