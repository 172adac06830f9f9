import pino, { type Logger } from 'pino';

/** Paths pino blanks out wherever they appear in a logged object (ASVS 16.2.5). */
export const REDACTED_PATHS = [
  'req.headers.authorization',
  'req.headers["x-api-key"]',
  'req.headers.cookie',
  'headers.authorization',
  'headers["x-api-key"]',
  '*.password',
  '*.current_password',
  '*.new_password',
  '*.refresh_token',
  '*.access_token',
  '*.client_secret',
  '*.token',
  '*.key',
  '*.secret',
  'password',
  'token',
  'secret',
];

/** JSON logs to stdout (or `destination`, e.g. a test's capture stream), with secrets redacted. */
export function createLogger(level: string, destination?: pino.DestinationStream): Logger {
  const options = { level, redact: { paths: REDACTED_PATHS, censor: '[redacted]' } };
  return destination ? pino(options, destination) : pino(options);
}
