// The operator scripts' logger, apart from script-context.ts so that pino loads only once a script's
// arguments are known good (imported with `await import`).
import pino, { type Logger } from 'pino';
import { REDACTED_PATHS } from '../../src/lib/logger.js';

/** The service's JSON logs, on stderr, so that stdout carries only the script's answer. */
export function scriptLogger(level: string): Logger {
  return pino(
    { level, redact: { paths: REDACTED_PATHS, censor: '[redacted]' } },
    pino.destination({ fd: 2, sync: true }),
  );
}
