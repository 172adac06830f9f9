import type { Redis } from 'ioredis';
import pino from 'pino';
import { afterAll, describe, expect, it } from 'vitest';
import { createRedisFailureCounter, loginFailuresKey } from '../../src/lib/throttle.js';
import { createTestClock } from '../support/clock.js';

/**
 * The login lockout counter shared through Redis (the hourly mail caps count alike), against a
 * stand-in for Redis that can stop answering: a lockout reached while Redis was away must outlast its
 * return (a black-box audit found the account open again the moment Redis answered, with a fresh
 * allowance of guesses).
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
        pttl: () => chain,
        exec: async () => {
          check();
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
    // The release script: DECR while the count exists.
    eval: async (_script: string, _keys: number, k: string) => {
      check();
      const n = counts.get(k);
      if (n === undefined) return 0;
      counts.set(k, n - 1);
      return n - 1;
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
    redisKey: loginFailuresKey,
    fallbackMessage: 'Redis unavailable: counting here',
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

/**
 * Guesses counted before they are checked, against the real Redis when one answers (TEST_REDIS_URL,
 * default redis://127.0.0.1:6379): of guesses sent at once, only the limit's worth may be checked,
 * whichever instance counts them, and a guess given back never leaves a count behind.
 */
describe('the shared login counter, reserving guesses in Redis', async () => {
  const { Redis: RedisClient } = await import('ioredis');
  const url = process.env.TEST_REDIS_URL ?? 'redis://127.0.0.1:6379';
  const redis = new RedisClient(url, {
    lazyConnect: true,
    connectTimeout: 500,
    maxRetriesPerRequest: 0,
    retryStrategy: () => null,
  });
  redis.on('error', () => undefined);
  const answers = await redis
    .connect()
    .then(async () => (await redis.ping()) === 'PONG')
    .catch(() => false);
  if (!answers)
    console.warn(`login counter: Redis does not answer at ${url}; its reservation test is not run`);
  const instance = (redisKey = loginFailuresKey) =>
    createRedisFailureCounter({
      redis,
      max: MAX,
      windowSeconds: WINDOW_SECONDS,
      clock: createTestClock(),
      logger: pino({ level: 'silent' }),
      redisKey,
      fallbackMessage: 'Redis unavailable: counting here',
    });

  it.skipIf(!answers)(
    'lets the limit’s worth of guesses sent at once through two instances, and no more',
    async () => {
      const key = `burst-${Math.random().toString(36).slice(2)}@example.test`;
      const [a, b] = [instance(), instance()];
      const guesses = await Promise.all(Array.from({ length: 20 }, (_, i) => (i % 2 ? a : b).reserve(key)));
      const through = guesses.filter((g) => g.retryAfter === 0);
      expect(through).toHaveLength(MAX);
      expect(guesses.every((g) => g.retryAfter <= WINDOW_SECONDS)).toBe(true);
      // Refused guesses were not counted; one given back lets one more through.
      expect(Number(await redis.get(loginFailuresKey(key)))).toBe(MAX);
      await through[0]!.release();
      expect((await b.reserve(key)).retryAfter).toBe(0);
      expect((await a.reserve(key)).retryAfter).toBeGreaterThan(0);
      await redis.del(loginFailuresKey(key));
    },
  );

  it.skipIf(!answers)(
    'gives back nothing once the count has gone: no count below zero, none without an end',
    async () => {
      const key = `gone-${Math.random().toString(36).slice(2)}@example.test`;
      const guess = await instance().reserve(key);
      expect(guess.retryAfter).toBe(0);
      await redis.del(loginFailuresKey(key)); // its hour ran out meanwhile
      await guess.release();
      expect(await redis.exists(loginFailuresKey(key))).toBe(0);
    },
  );

  // The hourly mail caps count so too, under their own keys: an instance that has counted nothing
  // (another one, or one restarted) refuses once the others' mails reach the cap.
  it.skipIf(!answers)('an instance that counted nothing sees the others’ reservations', async () => {
    const mailKey = (key: string) => `test:mails-per-hour:${key}`;
    const key = `cap-${Math.random().toString(36).slice(2)}`;
    const [a, b] = [instance(mailKey), instance(mailKey)];
    const onA = await Promise.all(Array.from({ length: MAX - 1 }, () => a.reserve(key)));
    expect(onA.every((t) => t.retryAfter === 0)).toBe(true);
    const onB = await Promise.all([b.reserve(key), b.reserve(key)]);
    expect(onB.map((t) => t.retryAfter === 0).sort()).toEqual([false, true]);
    expect(Number(await redis.get(mailKey(key)))).toBe(MAX);
    expect((await instance(mailKey).reserve(key)).retryAfter).toBeGreaterThan(0);
    await redis.del(mailKey(key));
  });

  afterAll(() => {
    redis.disconnect();
  });
});

describe('a guess given back goes back to the count it was taken from', () => {
  it('counted in Redis, given back while Redis is away: it stays counted there, and memory loses nothing', async () => {
    const { failures, state, counts } = counter();
    const key = 'split-back@example.test';
    const guess = await failures.reserve(key);
    expect(counts.get(loginFailuresKey(key))).toBe(1);
    state.down = true;
    await failures.recordFailure(key); // a real failure, counted in memory meanwhile
    await guess.release();
    // Memory still holds that failure: MAX − 1 more lock the key while Redis is away.
    for (let i = 0; i < MAX - 1; i++) await failures.recordFailure(key);
    expect(await failures.retryAfter(key)).toBeGreaterThan(0);
    state.down = false;
    expect(counts.get(loginFailuresKey(key))).toBe(1);
  });

  it('counted in memory while Redis was away, given back when it is back: Redis’s count is untouched', async () => {
    const { failures, state, counts } = counter();
    const key = 'split@example.test';
    for (let i = 0; i < MAX - 1; i++) await failures.recordFailure(key); // real failures, in Redis
    state.down = true;
    const guess = await failures.reserve(key); // counted in memory
    expect(guess.retryAfter).toBe(0);
    state.down = false;
    await guess.release();
    expect(counts.get(loginFailuresKey(key))).toBe(MAX - 1);
  });
});
