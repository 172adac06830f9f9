// What the operator scripts share: one way to fail (runScript: one line on stderr, exit code 1), logs
// on stderr, and for create-admin and rotate-signing-key the configuration, the migrated database and
// the services wired exactly as the HTTP app wires them, so a rule holds whichever door it is reached by.
import 'dotenv/config';
import { parseArgs } from 'node:util';
import pino, { type Logger } from 'pino';
import { type Config, loadConfig } from '../../src/config.js';
import { type DatabaseHandle, openDatabase } from '../../src/db/client.js';
import { systemClock } from '../../src/lib/clock.js';
import { databaseLocation, describeFailure } from '../../src/lib/failure.js';
import { REDACTED_PATHS } from '../../src/lib/logger.js';
import { createServices, type Services } from '../../src/services.js';

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

/** The service's JSON logs, on stderr, so that stdout carries only the script's answer. */
export function scriptLogger(level: string): Logger {
  return pino(
    { level, redact: { paths: REDACTED_PATHS, censor: '[redacted]' } },
    pino.destination({ fd: 2, sync: true }),
  );
}

export async function openScriptContext(): Promise<ScriptContext> {
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
    if (err instanceof UsageError) process.stderr.write(`${err.message}\n\n${usage}\n`);
    else process.stderr.write(`${describeFailure(err, databaseLocation(process.env.DATABASE_URL))}\n`);
    process.exitCode = 1;
  }
}

export { describeFailure };
