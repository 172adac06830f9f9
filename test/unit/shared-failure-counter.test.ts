import type { Redis } from 'ioredis';
import pino from 'pino';
import { afterAll, describe, expect, it } from 'vitest';
import { createSharedFailureCounter } from '../../src/lib/throttle.js';
import { createTestClock } from '../support/clock.js';
import { TEST_REDIS_URL } from '../support/redis.js';

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
    async get(key: string) {
      state.calls.push(`get ${key}`);
      if (state.down) throw new Error('Connection is closed.');
      const count = counts.get(key);
      return count === undefined ? null : String(count);
    },
    async pttl(key: string) {
      state.calls.push(`pttl ${key}`);
      if (state.down) throw new Error('Connection is closed.');
      return counts.has(key) ? WINDOW_SECONDS * 1000 : -2;
    },
    async del(key: string) {
      state.calls.push(`del ${key}`);
      if (state.down) throw new Error('Connection is closed.');
      counts.delete(key);
      return 1;
    },
    // The reservation scripts run on the real Redis only (below): here, only as a Redis that is down.
    async eval() {
      state.calls.push('eval');
      throw new Error(state.down ? 'Connection is closed.' : 'not in this stand-in');
    },
  };
  return { redis: redis as unknown as Redis, counts, state };
}

function logLines() {
  const lines: string[] = [];
  const logger = pino({ level: 'warn' }, { write: (line: string) => lines.push(JSON.parse(line).msg) });
  return { logger, lines };
}

const counter = (
  redis: Redis,
  logger = pino({ level: 'silent' }),
  clock = createTestClock(),
  readShared = false,
) =>
  createSharedFailureCounter({
    redis,
    max: MAX,
    windowSeconds: WINDOW_SECONDS,
    clock,
    logger,
    prefix: 'test:',
    fallbackMessage: 'Redis unavailable: counting here',
    readShared,
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

  it('with readShared, a check reads the shared count: an instance that counted nothing (new, restarted) blocks too', async () => {
    const { redis, state } = fakeRedis();
    const a = counter(redis, undefined, undefined, true);
    for (let i = 0; i < MAX; i++) await a.recordFailure('mail');
    const fresh = counter(redis, undefined, undefined, true);
    expect(await fresh.retryAfter('mail')).toBe(WINDOW_SECONDS);
    expect(await fresh.retryAfter('other')).toBe(0);
    // Without it (the hot path's counters), memory alone answers.
    expect(await counter(redis).retryAfter('mail')).toBe(0);
    // Redis gone: memory answers, and nothing is thrown.
    state.down = true;
    expect(await counter(redis, undefined, undefined, true).retryAfter('mail')).toBe(0);
    expect(await fresh.retryAfter('mail')).toBe(WINDOW_SECONDS);
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

describe('shared failure counter: attempts reserved before they are checked', () => {
  it('counts the attempts under way in memory: of those at once, the limit’s worth go through, and all come back', async () => {
    const { redis, state } = fakeRedis();
    const c = counter(redis);
    const attempts = await Promise.all(Array.from({ length: 3 * MAX }, () => c.reserve('s')));
    expect(attempts.filter((a) => a.retryAfter === 0)).toHaveLength(MAX);
    expect(attempts.filter((a) => a.retryAfter > 0).every((a) => a.retryAfter <= WINDOW_SECONDS)).toBe(true);
    expect(await c.retryAfter('s')).toBeGreaterThan(0);
    // Right, all of them: given back, without a word to Redis, and nothing counted.
    for (const a of attempts) await a.release();
    expect(await c.retryAfter('s')).toBe(0);
    // Nothing was counted in Redis: the first went without it, and the others, under way beside it,
    // were offered to a Redis that does not take the scripts here (so counted in memory instead).
    expect(state.calls.filter((call) => call !== 'eval')).toEqual([]);
  });

  it('when Redis does not answer, reserves and counts failures in memory, still blocks, logs once and never throws', async () => {
    const { redis, state } = fakeRedis();
    state.down = true;
    const { logger, lines } = logLines();
    const c = counter(redis, logger);
    const first = await c.reserve('s');
    await first.confirm();
    const rest = await Promise.all(Array.from({ length: 2 * MAX }, () => c.reserve('s')));
    const through = rest.filter((a) => a.retryAfter === 0);
    expect(through).toHaveLength(MAX - 1);
    for (const a of through) await a.confirm();
    expect((await c.reserve('s')).retryAfter).toBe(WINDOW_SECONDS);
    expect(lines).toEqual(['Redis unavailable: counting here']);
  });
});

/**
 * The same against the real Redis when one answers (TEST_REDIS_URL, default redis://127.0.0.1:6379): of
 * attempts at once through two instances, only the limit’s worth are checked, and an attempt given back
 * leaves nothing counted.
 */
describe('shared failure counter: reservations in Redis', async () => {
  const { Redis: RedisClient } = await import('ioredis');
  const redis = new RedisClient(TEST_REDIS_URL, {
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
    console.warn(
      `shared counter: Redis does not answer at ${TEST_REDIS_URL}; its reservation tests are not run`,
    );
  const prefix = `test:shared-${Math.random().toString(36).slice(2)}:`;
  const instance = (readShared = false) =>
    createSharedFailureCounter({
      redis,
      max: MAX,
      windowSeconds: WINDOW_SECONDS,
      clock: createTestClock(),
      logger: pino({ level: 'silent' }),
      prefix,
      fallbackMessage: 'Redis unavailable: counting here',
      readShared,
    });
  const checking = async (key: string) =>
    Number((await redis.get(`${prefix.slice(0, -1)}-checking:${key}`)) ?? 0);
  const failures = async (key: string) => Number((await redis.get(prefix + key)) ?? 0);

  afterAll(async () => {
    if (answers) {
      const keys = [
        ...(await redis.keys(`${prefix}*`)),
        ...(await redis.keys(`${prefix.slice(0, -1)}-checking:*`)),
      ];
      if (keys.length > 0) await redis.del(...keys);
    }
    redis.disconnect();
  });

  it.skipIf(!answers)(
    'lets the limit’s worth of attempts at once through two instances, and no more',
    async () => {
      const [a, b] = [instance(), instance()];
      const attempts = await Promise.all(
        Array.from({ length: 20 }, (_, i) => (i % 2 ? a : b).reserve('burst')),
      );
      const through = attempts.filter((t) => t.retryAfter === 0);
      expect(through).toHaveLength(MAX);
      // Each under way is counted in Redis as being checked, not as a failure.
      expect(await checking('burst')).toBe(MAX);
      expect(await failures('burst')).toBe(0);
      for (const t of through) await t.confirm();
      expect(await checking('burst')).toBe(0);
      expect(await failures('burst')).toBe(MAX);
      // Both instances block now, from memory or from Redis's answer.
      expect((await a.reserve('burst')).retryAfter).toBeGreaterThan(0);
      expect((await b.reserve('burst')).retryAfter).toBeGreaterThan(0);
      expect(await checking('burst')).toBe(0);
    },
  );

  it.skipIf(!answers)('an attempt given back leaves nothing counted, and lets another through', async () => {
    const [a, b] = [instance(), instance()];
    await (await a.reserve('back')).confirm(); // a failure: a counts this source's attempts in Redis
    const held = await Promise.all(Array.from({ length: MAX }, () => a.reserve('back')));
    expect(held.map((t) => t.retryAfter)).toEqual([0, 0, WINDOW_SECONDS]);
    // b knows no failure of it: its first attempt is counted in its memory, until another comes.
    const onB = await b.reserve('back');
    expect(onB.retryAfter).toBe(0);
    expect((await b.reserve('back')).retryAfter).toBeGreaterThan(0);
    for (const t of [...held, onB]) await t.release();
    expect(await checking('back')).toBe(0);
    expect(await failures('back')).toBe(1);
    expect((await b.reserve('back')).retryAfter).toBe(0);
  });

  it.skipIf(!answers)(
    'with readShared, every attempt is counted in Redis: an instance that counted nothing sees the others’',
    async () => {
      const [a, b] = [instance(true), instance(true)];
      const onA = await Promise.all(Array.from({ length: MAX - 1 }, () => a.reserve('mail')));
      expect(onA.every((t) => t.retryAfter === 0)).toBe(true);
      const onB = await Promise.all([b.reserve('mail'), b.reserve('mail')]);
      expect(onB.map((t) => t.retryAfter === 0)).toEqual([true, false]);
      for (const t of [...onA, ...onB]) await t.confirm();
      expect(await failures('mail')).toBe(MAX);
      expect(await checking('mail')).toBe(0);
      expect(await instance(true).retryAfter('mail')).toBe(WINDOW_SECONDS);
    },
  );
});
