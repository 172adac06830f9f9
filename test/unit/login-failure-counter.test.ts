import type { Redis } from 'ioredis';
import pino from 'pino';
import { describe, expect, it } from 'vitest';
import { createRedisFailureCounter } from '../../src/lib/throttle.js';
import { createTestClock } from '../support/clock.js';

/**
 * The login lockout counter shared through Redis, against a stand-in for Redis that can stop answering:
 * a lockout reached while Redis was away must outlast its return (a black-box audit found the account
 * open again the moment Redis answered, with a fresh allowance of guesses).
 */

const MAX = 3;
const WINDOW_SECONDS = 3600;

/** INCR/EXPIRE NX in a MULTI, GET, TTL and DEL, or a failure of every call while `down`. */
function fakeRedis() {
  const counts = new Map<string, number>();
  const state = { down: false };
  const check = () => {
    if (state.down) throw new Error('Connection is closed.');
  };
  const redis = {
    multi() {
      let key = '';
      const chain = {
        incr: (k: string) => {
          key = k;
          return chain;
        },
        expire: () => chain,
        exec: async () => {
          check();
          counts.set(key, (counts.get(key) ?? 0) + 1);
          return [];
        },
      };
      return chain;
    },
    get: async (k: string) => {
      check();
      const n = counts.get(k);
      return n === undefined ? null : String(n);
    },
    ttl: async (k: string) => {
      check();
      return counts.has(k) ? WINDOW_SECONDS : -2;
    },
    del: async (k: string) => {
      check();
      counts.delete(k);
      return 1;
    },
  };
  return { redis: redis as unknown as Redis, state, counts };
}

function counter() {
  const fake = fakeRedis();
  const clock = createTestClock();
  const failures = createRedisFailureCounter({
    redis: fake.redis,
    max: MAX,
    windowSeconds: WINDOW_SECONDS,
    clock,
    logger: pino({ level: 'silent' }),
  });
  return { ...fake, clock, failures };
}

describe('login failure counter with Redis', () => {
  it('locks through Redis when it answers', async () => {
    const { failures } = counter();
    for (let i = 0; i < MAX; i++) await failures.recordFailure('a@example.test');
    expect(await failures.retryAfter('a@example.test')).toBe(WINDOW_SECONDS);
    await failures.reset('a@example.test');
    expect(await failures.retryAfter('a@example.test')).toBe(0);
  });

  it('keeps a lockout reached while Redis was down after Redis answers again, until its window ends', async () => {
    const { failures, state, clock } = counter();
    state.down = true;
    for (let i = 0; i < MAX; i++) await failures.recordFailure('b@example.test');
    expect(await failures.retryAfter('b@example.test')).toBeGreaterThan(0);
    state.down = false;
    clock.advance(30);
    const wait = await failures.retryAfter('b@example.test');
    expect(wait).toBeGreaterThan(WINDOW_SECONDS - 60);
    expect(wait).toBeLessThanOrEqual(WINDOW_SECONDS - 30);
    clock.advance(WINDOW_SECONDS);
    expect(await failures.retryAfter('b@example.test')).toBe(0);
  });

  it('a reset clears both counts, whichever answered', async () => {
    const { failures, state } = counter();
    state.down = true;
    for (let i = 0; i < MAX; i++) await failures.recordFailure('c@example.test');
    state.down = false;
    for (let i = 0; i < MAX; i++) await failures.recordFailure('c@example.test');
    await failures.reset('c@example.test');
    expect(await failures.retryAfter('c@example.test')).toBe(0);
  });
});
