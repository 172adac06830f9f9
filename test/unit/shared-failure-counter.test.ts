import type { Redis } from 'ioredis';
import pino from 'pino';
import { describe, expect, it } from 'vitest';
import { createSharedFailureCounter } from '../../src/lib/throttle.js';
import { createTestClock } from '../support/clock.js';

/**
 * The shared failure counter against a stand-in for Redis that records what it is asked (the real
 * Redis, with two instances, is test/multi-instance): checks never reach Redis, a failure's answer is
 * what blocks, and a Redis that does not answer leaves the counting to this instance's memory.
 */

const MAX = 3;
const WINDOW_SECONDS = 60;

/** A Redis that holds counts like INCR/EXPIRE NX/PTTL in a MULTI, or fails every call when `down`. */
function fakeRedis() {
  const counts = new Map<string, number>();
  const state = { down: false, calls: [] as string[] };
  const redis = {
    multi() {
      const queued: string[] = [];
      const chain = {
        incr: (key: string) => {
          queued.push(`incr ${key}`);
          return chain;
        },
        expire: () => chain,
        pttl: () => chain,
        exec: async () => {
          state.calls.push(...queued);
          if (state.down) throw new Error('Connection is closed.');
          const key = queued[0]!.slice('incr '.length);
          const count = (counts.get(key) ?? 0) + 1;
          counts.set(key, count);
          return [
            [null, count],
            [null, 1],
            [null, WINDOW_SECONDS * 1000],
          ];
        },
      };
      return chain;
    },
    async del(key: string) {
      state.calls.push(`del ${key}`);
      if (state.down) throw new Error('Connection is closed.');
      counts.delete(key);
      return 1;
    },
  };
  return { redis: redis as unknown as Redis, counts, state };
}

function logLines() {
  const lines: string[] = [];
  const logger = pino({ level: 'warn' }, { write: (line: string) => lines.push(JSON.parse(line).msg) });
  return { logger, lines };
}

const counter = (redis: Redis, logger = pino({ level: 'silent' }), clock = createTestClock()) =>
  createSharedFailureCounter({
    redis,
    max: MAX,
    windowSeconds: WINDOW_SECONDS,
    clock,
    logger,
    prefix: 'test:',
    fallbackMessage: 'Redis unavailable: counting here',
  });

describe('shared failure counter', () => {
  it('answers checks from memory, never from Redis', async () => {
    const { redis, state } = fakeRedis();
    const c = counter(redis);
    for (let i = 0; i < 100; i++) expect(await c.retryAfter('ip client')).toBe(0);
    expect(state.calls).toEqual([]);
  });

  it('blocks a source when a failure reports the shared count at the limit, including other instances’ failures', async () => {
    const { redis, state } = fakeRedis();
    const [a, b] = [counter(redis), counter(redis)];
    await a.recordFailure('s');
    await a.recordFailure('s');
    expect(await a.retryAfter('s')).toBe(0);
    await b.recordFailure('s');
    // B heard 3: blocked there for the window Redis reports. A heard 2 and lets one more through.
    expect(await b.retryAfter('s')).toBe(WINDOW_SECONDS);
    expect(await a.retryAfter('s')).toBe(0);
    await a.recordFailure('s');
    expect(await a.retryAfter('s')).toBe(WINDOW_SECONDS);
    expect(state.calls).toEqual(['incr test:s', 'incr test:s', 'incr test:s', 'incr test:s']);
    // Other sources are not touched.
    expect(await a.retryAfter('t')).toBe(0);
  });

  it('the block ends with the window', async () => {
    const { redis } = fakeRedis();
    const clock = createTestClock();
    const c = counter(redis, undefined, clock);
    for (let i = 0; i < MAX; i++) await c.recordFailure('s');
    clock.advance(WINDOW_SECONDS - 10);
    expect(await c.retryAfter('s')).toBe(10);
    clock.advance(11);
    expect(await c.retryAfter('s')).toBe(0);
  });

  it('counts in memory while Redis does not answer, still blocks, and logs that once', async () => {
    const { redis, state } = fakeRedis();
    state.down = true;
    const { logger, lines } = logLines();
    const c = counter(redis, logger);
    for (let i = 0; i < MAX - 1; i++) await c.recordFailure('s');
    expect(await c.retryAfter('s')).toBe(0);
    await c.recordFailure('s');
    expect(await c.retryAfter('s')).toBe(WINDOW_SECONDS);
    expect(lines).toEqual(['Redis unavailable: counting here']);
    // A reset is not refused by a Redis that is down.
    await expect(c.reset('s')).resolves.toBeUndefined();
    expect(await c.retryAfter('s')).toBe(0);
  });

  it('when Redis is back, its count is taken again and the warning may be logged anew', async () => {
    const { redis, state, counts } = fakeRedis();
    const { logger, lines } = logLines();
    const c = counter(redis, logger);
    state.down = true;
    await c.recordFailure('s');
    state.down = false;
    counts.set('test:s', MAX - 1);
    await c.recordFailure('s');
    expect(await c.retryAfter('s')).toBe(WINDOW_SECONDS);
    state.down = true;
    await c.recordFailure('t');
    expect(lines).toHaveLength(2);
  });
});
