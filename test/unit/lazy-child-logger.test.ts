import { Writable } from 'node:stream';
import { describe, expect, it, vi } from 'vitest';
import { createLogger, lazyChildLogger } from '../../src/lib/logger.js';

function capture() {
  const lines: Record<string, unknown>[] = [];
  const stream = new Writable({
    write(chunk, _encoding, done) {
      for (const line of String(chunk).split('\n').filter(Boolean)) lines.push(JSON.parse(line));
      done();
    },
  });
  return { lines, stream };
}

describe('the per-request logger (lazyChildLogger)', () => {
  it('makes no pino child for calls below the level, and one child, once, for the rest', () => {
    const { lines, stream } = capture();
    const parent = createLogger('warn', stream);
    const childOf = vi.spyOn(parent, 'child');
    const log = lazyChildLogger(parent, { reqId: 'r-1' }, {});

    log.info({ a: 1 }, 'dropped');
    log.debug('dropped');
    expect(childOf).not.toHaveBeenCalled();
    expect(log.level).toBe('warn');

    log.warn({ a: 2 }, 'kept');
    log.error(new Error('boom'), 'kept too');
    expect(childOf).toHaveBeenCalledTimes(1);
    expect(lines).toMatchObject([
      { level: 40, reqId: 'r-1', a: 2, msg: 'kept' },
      { level: 50, reqId: 'r-1', msg: 'kept too', err: { message: 'boom' } },
    ]);
  });

  it('follows the parent’s level, redacts like it, and nests children with both bindings', () => {
    const { lines, stream } = capture();
    const parent = createLogger('warn', stream);
    const log = lazyChildLogger(parent, { reqId: 'r-2' }, {});
    parent.level = 'info';
    log.info({ password: 'hunter2' }, 'now kept');
    log.child({ step: 'inner' }).info('nested');
    expect(lines).toMatchObject([
      { reqId: 'r-2', password: '[redacted]', msg: 'now kept' },
      { reqId: 'r-2', step: 'inner', msg: 'nested' },
    ]);
  });
});
