import type { Redis } from 'ioredis';
import { setTimeout as sleep } from 'node:timers/promises';
import pino from 'pino';
import { afterAll, describe, expect, it, vi } from 'vitest';
import { createRedisLink } from '../../src/lib/redis-link.js';
import { createRedisFailureCounter, failureTimesKey, loginFailuresKey } from '../../src/lib/throttle.js';
import { createTestClock } from '../support/clock.js';

/**
 * The login lockout counter shared through Redis (the hourly mail caps count alike), against a
 * stand-in for Redis that can stop answering, and against the real Redis behind a switch that makes
 * every command fail (an outage): a lockout reached while Redis was away must outlast its return (a
 * black-box audit found the account open again the moment Redis answered, with a fresh allowance of
 * guesses), and once Redis answers a reset on any instance must lift it (the memory of the instance
 * that counted it kept it locked there for the rest of the hour).
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

/**
 * The real Redis (TEST_REDIS_URL) behind a switch: while `down`, every command fails as on a closed
 * connection, whoever sends it (the counters, the link's probe).
 */
function switchable(redis: Redis) {
  /** `hold`: scripts (EVAL) wait for it, as on a Redis slow to take what is carried. */
  const state: { down: boolean; hold?: Promise<void> } = { down: false };
  const closed = () => Promise.reject(new Error('Connection is closed.'));
  const proxy = new Proxy(redis, {
    get(target, prop) {
      const value = Reflect.get(target, prop, target) as unknown;
      if (typeof value !== 'function') return value;
      if (prop === 'multi')
        return () => {
          const chain = target.multi();
          const exec = chain.exec.bind(chain);
          chain.exec = (() => (state.down ? closed() : exec())) as typeof chain.exec;
          return chain;
        };
      const call = (...args: unknown[]) =>
        state.down ? closed() : (value as (...a: unknown[]) => unknown).apply(target, args);
      if (prop === 'eval')
        return async (...args: unknown[]) => {
          await state.hold;
          return call(...args);
        };
      return call;
    },
  });
  return { redis: proxy, state };
}

describe('the login counter through a Redis outage, on the real Redis', async () => {
  const { Redis: RedisClient } = await import('ioredis');
  const url = process.env.TEST_REDIS_URL ?? 'redis://127.0.0.1:6379';
  const base = new RedisClient(url, {
    lazyConnect: true,
    connectTimeout: 500,
    maxRetriesPerRequest: 0,
    retryStrategy: () => null,
  });
  base.on('error', () => undefined);
  const answers = await base
    .connect()
    .then(async () => (await base.ping()) === 'PONG')
    .catch(() => false);
  if (!answers) console.warn(`login counter: Redis does not answer at ${url}; its outage tests are not run`);
  const run = `test:lockout-outage:${Math.random().toString(36).slice(2)}`;
  const countKey = (key: string) => `${run}:${key}`;

  /** Instances on one Redis and one clock; `link`: with a RedisLink probing every 10 ms. */
  function cluster() {
    const { redis, state } = switchable(base);
    const clock = createTestClock();
    const lines: string[] = [];
    const logger = pino({ level: 'warn' }, { write: (line: string) => lines.push(JSON.parse(line).msg) });
    const instance = (withLink = false) =>
      createRedisFailureCounter({
        redis,
        link: withLink ? createRedisLink(redis, logger, 10) : undefined,
        max: MAX,
        windowSeconds: WINDOW_SECONDS,
        clock,
        logger,
        redisKey: countKey,
        fallbackMessage: 'Redis unavailable: counting here',
        label: 'Login failures',
      });
    const key = `${Math.random().toString(36).slice(2)}@example.test`;
    const count = async () => Number(await base.get(countKey(key)));
    /**
     * The next command of `counter` about the key (a read) finds Redis back: it carries what memory
     * holds, and waits for that where memory holds something of the key.
     */
    const comesBack = (counter: ReturnType<typeof instance>) => counter.retryAfter(key);
    return { state, clock, lines, instance, key, count, comesBack };
  }

  it.skipIf(!answers)(
    'a lock counted in memory while Redis was away is carried into Redis for the rest of its window: locked on every instance',
    async () => {
      const { state, clock, instance, key, count } = cluster();
      const [a, b] = [instance(), instance()];
      state.down = true;
      for (let i = 0; i < MAX; i++) expect((await a.reserve(key)).retryAfter).toBe(0);
      expect((await a.reserve(key)).retryAfter).toBeGreaterThan(0);
      // Meanwhile B counts on its own.
      expect((await b.reserve(key)).retryAfter).toBe(0);
      state.down = false;
      clock.advance(30);
      const wait = await a.retryAfter(key);
      expect(wait).toBeGreaterThan(WINDOW_SECONDS - 60);
      expect(wait).toBeLessThanOrEqual(WINDOW_SECONDS - 30);
      expect(await count()).toBe(MAX);
      expect(await base.ttl(countKey(key))).toBeLessThanOrEqual(WINDOW_SECONDS - 30);
      // No fresh allowance anywhere, B's own guess of the outage carried too.
      expect((await b.reserve(key)).retryAfter).toBeGreaterThan(0);
      expect(await count()).toBe(MAX + 1);
    },
  );

  it.skipIf(!answers)(
    'once Redis is back, a reset on another instance lifts a lock counted in memory during the outage',
    async () => {
      const { state, clock, instance, key, comesBack } = cluster();
      const [a, b] = [instance(), instance()];
      state.down = true;
      for (let i = 0; i < MAX; i++) await a.reserve(key);
      state.down = false;
      clock.advance(1);
      await comesBack(a);
      expect((await b.reserve(key)).retryAfter).toBeGreaterThan(0);
      await b.reset(key); // a password reset, or a magic link, on B
      const again = await a.reserve(key);
      expect(again.retryAfter).toBe(0);
      await again.release();
    },
  );

  it.skipIf(!answers)(
    'a reset on an instance back from the outage outweighs the counts another carries in only later',
    async () => {
      const { state, clock, instance, key, count, comesBack } = cluster();
      const [a, b] = [instance(), instance()];
      state.down = true;
      for (let i = 0; i < MAX; i++) await a.reserve(key);
      await b.reserve('meanwhile@example.test'); // B finds Redis away too
      state.down = false;
      clock.advance(1);
      await comesBack(b);
      await b.reset(key); // before A has found Redis back
      clock.advance(1);
      await comesBack(a);
      expect(await count()).toBe(0);
      expect((await a.reserve(key)).retryAfter).toBe(0);
    },
  );

  it.skipIf(!answers)(
    'a reset during the outage outweighs the failures another instance counted before it, whichever gets back first',
    async () => {
      for (const first of ['counted', 'reset'] as const) {
        const { state, clock, instance, key, count, comesBack } = cluster();
        const [a, b] = [instance(), instance()];
        state.down = true;
        for (let i = 0; i < MAX; i++) await a.reserve(key);
        clock.advance(1);
        await b.reset(key); // the owner signs in on B
        state.down = false;
        clock.advance(1);
        for (const back of first === 'counted' ? [a, b] : [b, a]) await comesBack(back);
        expect(await count(), first).toBe(0);
        for (const instance of [a, b]) {
          const guess = await instance.reserve(key);
          expect(guess.retryAfter, first).toBe(0);
          await guess.release();
        }
      }
    },
  );

  it.skipIf(!answers)(
    'failures counted after a reset made elsewhere during the outage still count',
    async () => {
      for (const first of ['counted', 'reset'] as const) {
        const { state, clock, instance, key, count, comesBack } = cluster();
        const [a, b] = [instance(), instance()];
        state.down = true;
        await b.reset(key);
        clock.advance(1);
        for (let i = 0; i < MAX; i++) await a.reserve(key);
        state.down = false;
        clock.advance(1);
        for (const back of first === 'counted' ? [a, b] : [b, a]) await comesBack(back);
        expect(await count(), first).toBe(MAX);
        for (const instance of [a, b])
          expect((await instance.reserve(key)).retryAfter, first).toBeGreaterThan(0);
      }
    },
  );

  it.skipIf(!answers)('while the counts are carried, only the keys memory holds wait for it', async () => {
    const { state, instance, key, comesBack } = cluster();
    const a = instance();
    state.down = true;
    for (let i = 0; i < MAX; i++) await a.reserve(key);
    state.down = false;
    let carry!: () => void;
    state.hold = new Promise((resolve) => {
      carry = resolve;
    });
    let answered = false;
    const locked = comesBack(a).then((wait) => {
      answered = true;
      return wait;
    });
    const other = await a.reserve(`other-${key}`);
    expect(other.retryAfter).toBe(0);
    await sleep(20);
    expect(answered).toBe(false);
    carry();
    expect(await locked).toBeGreaterThan(0);
    await base.del(countKey(`other-${key}`));
  });

  it.skipIf(!answers)(
    'a reset leaves its time in Redis only within a window of an outage this instance saw',
    async () => {
      const { state, clock, instance, key, comesBack } = cluster();
      const a = instance();
      await a.reserve(key);
      await a.reset(key);
      expect(await base.exists(failureTimesKey(countKey(key)))).toBe(0);
      state.down = true;
      await a.reserve('meanwhile@example.test');
      state.down = false;
      await comesBack(a);
      clock.advance(WINDOW_SECONDS - 10);
      const before = clock.nowMs();
      await a.reset(key);
      const at = Number(await base.hget(failureTimesKey(countKey(key)), 'reset'));
      expect(at).toBeGreaterThanOrEqual(before);
      expect(at).toBeLessThanOrEqual(clock.nowMs());
      await base.del(failureTimesKey(countKey(key)));
      clock.advance(20);
      await a.reset(key);
      expect(await base.exists(failureTimesKey(countKey(key)))).toBe(0);
    },
  );

  it.skipIf(!answers)(
    'with the link, counts are carried as soon as a probe finds Redis back, not at the next sign-in (logged)',
    async () => {
      const { state, lines, instance, key, count } = cluster();
      const a = instance(true);
      state.down = true;
      for (let i = 0; i < MAX; i++) await a.reserve(key);
      expect(await count()).toBe(0);
      state.down = false;
      await vi.waitFor(async () => expect(await count()).toBe(MAX), { timeout: 2000, interval: 20 });
      await sleep(20);
      expect(lines).toContain(
        "Login failures kept in this instance's memory while Redis was away: carried into it",
      );
    },
  );

  afterAll(async () => {
    if (answers) {
      const keys = await base.keys(`${run}:*`);
      if (keys.length) await base.del(...keys);
    }
    base.disconnect();
  });
});
