import { Writable } from 'node:stream';
import { createLogger } from '../../src/lib/logger.js';

/** A logger of the service's own kind whose JSON lines are kept, to check what the service logs. */
export function captureLogs(level = 'debug') {
  const lines: string[] = [];
  const stream = new Writable({
    write(chunk, _enc, done) {
      lines.push(String(chunk));
      done();
    },
  });
  return { lines, logger: createLogger(level, stream) };
}
