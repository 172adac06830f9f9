import { setTimeout as sleep } from 'node:timers/promises';
import pino from 'pino';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { createRetryingRead, RETRY_LASTING_MAX_MS } from '../../src/lib/retrying-read.js';

/**
 * The read a resync asks for (the revocations, the signing keys: what the notifications may have
 * missed) is tried again until the database answers, and a request that comes while one is under way
 * gets a read begun after it.
 */

const silent = pino({ level: 'silent' });

/** A read that fails `failures` times, then succeeds; each call noted with when it began and ended. */
function flakyRead(failures: number, takesMs = 0) {
  const calls: { began: number; ended?: number }[] = [];
  let left = failures;
  return {
    calls,
    async read() {
      const call: { began: number; ended?: number } = { began: performance.now() };
      calls.push(call);
      if (takesMs) await sleep(takesMs);
      call.ended = performance.now();
      if (left-- > 0) throw new Error('Connection terminated unexpectedly');
    },
  };
}

async function until(check: () => boolean, withinMs: number) {
  const start = performance.now();
  while (!check()) {
    if (performance.now() - start > withinMs) return false;
    await sleep(10);
  }
  return true;
}

describe('a read asked for by a resync', () => {
  it('is tried again after 250 ms, then 500 ms, until it succeeds, and not after', async () => {
    const flaky = flakyRead(2);
    const read = createRetryingRead({ read: () => flaky.read(), logger: silent, what: 'the test rows' });
    read.request();
    expect(await until(() => flaky.calls.length === 3, 2000)).toBe(true);
    const [first, second, third] = flaky.calls;
    expect(second!.began - first!.began).toBeGreaterThanOrEqual(240);
    expect(third!.began - second!.began).toBeGreaterThanOrEqual(490);
    await sleep(1200);
    expect(flaky.calls).toHaveLength(3);
    read.stop();
  });

  it('asked for while a read is under way: one more read, begun after the request', async () => {
    const flaky = flakyRead(0, 50);
    const read = createRetryingRead({ read: () => flaky.read(), logger: silent, what: 'the test rows' });
    read.request();
    await sleep(10);
    const askedAt = performance.now();
    read.request();
    read.request();
    expect(await until(() => flaky.calls.length === 2 && flaky.calls[1]!.ended !== undefined, 1000)).toBe(
      true,
    );
    expect(flaky.calls[1]!.began).toBeGreaterThanOrEqual(askedAt);
    await sleep(200);
    expect(flaky.calls).toHaveLength(2);
    // Once done, a request reads again.
    read.request();
    expect(await until(() => flaky.calls.length === 3, 1000)).toBe(true);
    read.stop();
  });

  it('stopped while waiting to try again: no read starts any more', async () => {
    const flaky = flakyRead(Number.POSITIVE_INFINITY);
    const read = createRetryingRead({ read: () => flaky.read(), logger: silent, what: 'the test rows' });
    read.request();
    expect(await until(() => flaky.calls.length === 1, 1000)).toBe(true);
    read.stop();
    await sleep(600);
    expect(flaky.calls).toHaveLength(1);
    read.request();
    await sleep(50);
    expect(flaky.calls).toHaveLength(1);
  });
});

/** A failure reading again does not mend: a signing key's row altered. */
class LastingError extends Error {}

describe('a read whose failure lasts (a key row that cannot sign)', () => {
  afterEach(() => {
    vi.useRealTimers();
  });

  /** A logger whose lines (level and message) land in `lines`. */
  function recordingLogger() {
    const lines: Array<{ level: number; msg: string }> = [];
    const logger = pino({ level: 'info' }, { write: (line: string) => lines.push(JSON.parse(line)) });
    return { logger, lines };
  }

  it('is tried again with waits doubling up to a minute, not every 2 s, and logged once per change of state', async () => {
    vi.useFakeTimers();
    const { logger, lines } = recordingLogger();
    let failure: Error | undefined = new Error('Connection terminated unexpectedly');
    let calls = 0;
    const read = createRetryingRead({
      read: async () => {
        calls++;
        if (failure) throw failure;
      },
      logger,
      what: 'the test rows',
      lasting: (err) => err instanceof LastingError,
    });
    read.request();
    await vi.advanceTimersByTimeAsync(0);
    // The database is back, and what it holds cannot be read: a second line, saying so.
    failure = new LastingError('the private key stored for the signing key k is not the one');
    await vi.advanceTimersByTimeAsync(10 * 60_000);
    // 250 ms, 0.5, 1, 2, 4, 8, 16, 32 s, then every minute: 17 reads in 10 minutes, not 300.
    expect(calls).toBeGreaterThanOrEqual(15);
    expect(calls).toBeLessThanOrEqual(20);
    expect(lines.map((l) => [l.level, l.msg.split(';')[0]])).toEqual([
      [40, 'could not read the test rows'],
      [50, 'could not read the test rows, and reading again will not mend it'],
    ]);
    expect(RETRY_LASTING_MAX_MS).toBe(60_000);

    // The mend's notification asks for a read: it is made at once, not after the minute's wait.
    failure = undefined;
    const before = calls;
    read.request();
    await vi.advanceTimersByTimeAsync(0);
    expect(calls).toBe(before + 1);
    expect(lines.at(-1)).toMatchObject({ level: 30, msg: 'read the test rows once the database answered' });
    await vi.advanceTimersByTimeAsync(5 * 60_000);
    expect(calls).toBe(before + 1);
    read.stop();
  });
});
