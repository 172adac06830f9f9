// One line for what went wrong when a process cannot do its job (a script's failure, a server that
// cannot start): the message of the error that says it, never a stack dump for an operator's condition.
import { ConfigError } from '../config.js';
import { MigrationError } from '../db/client.js';
import { isAppError } from './errors.js';

/** Error codes of a failed connection attempt (Node's, for the socket; PostgreSQL's, for the server). */
const CONNECTION_FAILURES = new Set([
  'ECONNREFUSED',
  'ENOTFOUND',
  'EAI_AGAIN',
  'ETIMEDOUT',
  'EHOSTUNREACH',
  'ENETUNREACH',
  'ECONNRESET',
]);

/**
 * node-postgres's own words for a connection that never came up (no code: a reset, a server that
 * accepted the connection and never answered within the connect timeout, a server without TLS).
 */
const CONNECTION_LOST =
  /^(?:Connection terminated|timeout expired|timeout exceeded when trying to connect|The server does not support SSL connections)/;

/** TLS failures of a connection (a self-signed or expired certificate, another host's name). */
const TLS_FAILURE =
  /^(?:DEPTH_ZERO_SELF_SIGNED_CERT|SELF_SIGNED_CERT_IN_CHAIN|UNABLE_TO_VERIFY_LEAF_SIGNATURE|UNABLE_TO_GET_ISSUER_CERT(?:_LOCALLY)?|CERT_HAS_EXPIRED|CERT_NOT_YET_VALID|ERR_TLS_CERT_ALTNAME_INVALID|ERR_SSL_\w+)$/;

const isConnectionFailure = (line: string, code: string | undefined) =>
  (code !== undefined && (CONNECTION_FAILURES.has(code) || TLS_FAILURE.test(code))) ||
  CONNECTION_LOST.test(line);

/**
 * What went wrong, in one line. `database` (the DATABASE_URL's host, port and name, never its
 * password) is named when the failure was reaching it.
 */
export function describeFailure(err: unknown, database?: string): string {
  if (err instanceof ConfigError) return `invalid configuration: ${err.problems.join('; ')}`;
  if (isAppError(err)) return `error: ${err.detail} (${err.code})`;
  if (err instanceof MigrationError) return `error: ${err.message}`;
  const { message, code } = innermost(err);
  const line = message.split('\n')[0]!.trim() || code || 'unknown error';
  if (isConnectionFailure(line, code))
    return `error: cannot connect to the database${database ? ` at ${database}` : ''}: ${line}`;
  // PostgreSQL's SQLSTATE (3D000 no such database, 28P01 bad password, …) helps the search for the cause.
  return `error: ${line}${code && /^[0-9A-Z]{5}$/.test(code) && !line.includes(code) ? ` (${code})` : ''}`;
}

/**
 * SQLSTATE classes that are the database's state or the operator's setup, not a query's fault:
 * connection (08), authorization (28), no such database (3D), resources (53), operator intervention
 * (57), system (58). A syntax or missing-column error (42) is the code's.
 */
const OPERATIONAL_SQLSTATE = /^(08|28|3D|53|57|58)[0-9A-Z]{3}$/;

/**
 * Whether a failure is the operator's to mend (the configuration, the database, the port, the disk)
 * rather than a fault of the code: a system call's error (`EADDRINUSE`, `ENOTDIR`, `ECONNREFUSED`…),
 * a SQLSTATE of the database's state, or node-postgres's lost connection. Those are told in one line;
 * anything else (Fastify's `FST_ERR_*`, Node's `ERR_*`, a query's own error) keeps its stack.
 */
export function isOperational(err: unknown): boolean {
  if (err instanceof ConfigError || err instanceof MigrationError || isAppError(err)) return true;
  const { message, code } = innermost(err);
  if (isConnectionFailure(message, code)) return true;
  return code !== undefined && (/^E[A-Z]+$/.test(code) || OPERATIONAL_SQLSTATE.test(code));
}

/** A DATABASE_URL as it may be shown: host, port and database, without the user or password. */
export function databaseLocation(url: string | undefined): string | undefined {
  if (!url) return undefined;
  try {
    const parsed = new URL(url);
    return `${parsed.hostname}:${parsed.port || '5432'}${parsed.pathname}`;
  } catch {
    return undefined;
  }
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
