// What the operator scripts share: one way to fail (runScript: one line on stderr, exit code 1), logs
// on stderr, and for create-admin and rotate-signing-key the configuration, the migrated database and
// the services wired exactly as the HTTP app wires them, so a rule holds whichever door it is reached by.
import 'dotenv/config';
import { parseArgs } from 'node:util';
import pino, { type Logger } from 'pino';
import { ConfigError, type Config, loadConfig } from '../../src/config.js';
import { type DatabaseHandle, MigrationError, openDatabase } from '../../src/db/client.js';
import { systemClock } from '../../src/lib/clock.js';
import { isAppError } from '../../src/lib/errors.js';
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
    else process.stderr.write(`${describeFailure(err)}\n`);
    process.exitCode = 1;
  }
}

/** Error codes of a failed connection attempt (Node's, for the socket; PostgreSQL's, for the server). */
const CONNECTION_FAILURES = new Set([
  'ECONNREFUSED',
  'ENOTFOUND',
  'EAI_AGAIN',
  'ETIMEDOUT',
  'EHOSTUNREACH',
  'ECONNRESET',
]);

/** What went wrong, in one line: the message of the error that says it, never a stack. */
export function describeFailure(err: unknown): string {
  if (err instanceof ConfigError) return `invalid configuration: ${err.problems.join('; ')}`;
  if (isAppError(err)) return `error: ${err.detail} (${err.code})`;
  if (err instanceof MigrationError) return `error: ${err.message}`;
  const { message, code } = innermost(err);
  const line = message.split('\n')[0]!.trim() || code || 'unknown error';
  if (code && CONNECTION_FAILURES.has(code)) return `error: cannot connect to the database: ${line}`;
  // PostgreSQL's SQLSTATE (3D000 no such database, 28P01 bad password, …) helps the search for the cause.
  return `error: ${line}${code && /^[0-9A-Z]{5}$/.test(code) && !line.includes(code) ? ` (${code})` : ''}`;
}

/**
 * The error worth reporting: drizzle wraps the driver's in a DrizzleQueryError ("Failed query: …"),
 * and a connection to a name with several addresses fails with an AggregateError whose own message
 * is empty.
 */
function innermost(err: unknown): { message: string; code: string | undefined } {
  let current: unknown = err;
  for (let depth = 0; depth < 5; depth++) {
    if (current instanceof AggregateError && current.errors.length > 0 && !current.message) {
      current = current.errors[0];
      continue;
    }
    if (current instanceof Error && current.message.startsWith('Failed query:') && current.cause) {
      current = current.cause;
      continue;
    }
    break;
  }
  if (current instanceof Error) {
    const code = (current as { code?: unknown }).code ?? (err as { code?: unknown }).code;
    return { message: current.message, code: typeof code === 'string' ? code : undefined };
  }
  return { message: String(current), code: undefined };
}
