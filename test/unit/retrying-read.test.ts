import { setTimeout as sleep } from 'node:timers/promises';
import pino from 'pino';
import { describe, expect, it } from 'vitest';
import { createRetryingRead } from '../../src/lib/retrying-read.js';

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
