// What the operator scripts (create-admin, rotate-signing-key) share: the configuration, the migrated
// database and the services wired exactly as the HTTP app wires them, so a rule holds whichever door
// it is reached by.
import 'dotenv/config';
import pino, { type Logger } from 'pino';
import { ConfigError, type Config, loadConfig } from '../../src/config.js';
import { type DatabaseHandle, openDatabase } from '../../src/db/client.js';
import { systemClock } from '../../src/lib/clock.js';
import { isAppError } from '../../src/lib/errors.js';
import { REDACTED_PATHS } from '../../src/lib/logger.js';
import { createServices, type Services } from '../../src/services.js';

/** Bad command-line input: reported with the usage text, exit code 1. */
export class UsageError extends Error {
  override name = 'UsageError';
}

export interface ScriptContext {
  config: Config;
  logger: Logger;
  database: DatabaseHandle;
  services: Services;
  close(): Promise<void>;
}

export async function openScriptContext(): Promise<ScriptContext> {
  const config = loadConfig(process.env);
  // Logs go to stderr so that stdout carries only the script's answer.
  const logger = pino(
    { level: config.logLevel, redact: { paths: REDACTED_PATHS, censor: '[redacted]' } },
    pino.destination({ fd: 2, sync: true }),
  );
  const database = await openDatabase({
    url: config.databaseUrl,
    dataDir: config.dataDir,
    logger,
    poolMax: 2,
    connectTimeoutMs: config.db.connectTimeoutMs,
    statementTimeoutMs: config.db.statementTimeoutMs,
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
    else if (err instanceof ConfigError) process.stderr.write(`${err.message}\n`);
    else if (isAppError(err)) process.stderr.write(`error: ${err.detail} (${err.code})\n`);
    else process.stderr.write(`error: ${err instanceof Error ? err.message : String(err)}\n`);
    process.exitCode = 1;
  }
}
