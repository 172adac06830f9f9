import { createHash } from 'node:crypto';
import type { Redis } from 'ioredis';
import { LRUCache } from 'lru-cache';
import type { Logger } from 'pino';
import type { Clock } from './clock.js';
import type { RedisLink } from './redis-link.js';

/**
 * What a counter needs of the shared RedisLink: whether to ask Redis, where to report a failure, and
 * (the Redis failure counter, to carry its memory counts into it) when it answers again.
 */
export type RedisAvailability = Pick<RedisLink, 'answering' | 'failed'> &
  Partial<Pick<RedisLink, 'onAnswered'>>;

/**
 * Counts failed logins per account in a sliding hour (SECURITY.md: at most 100 per account per
 * hour). Shared through Redis when configured; when Redis does not answer, counting falls back to
 * this instance's memory (logged) rather than failing the login.
 */
export interface FailureCounter {
  /** Seconds until the key may try again, or 0 when it may try now. */
  retryAfter(key: string): Promise<number>;
  /**
   * The same answer without waiting, where the counter holds it in memory; absent where it must ask
   * Redis (the login counter), so the caller takes `retryAfter`.
   */
  retryAfterNow?(key: string): number;
  recordFailure(key: string): Promise<void>;
  reset(key: string): Promise<void>;
  /**
   * Where present, the caller calls it for each attempt it refused on this counter's answer (counted in
   * the metrics): a counter read on hot paths (`retryAfterNow`) cannot tell a refusal from a look.
   */
  refused?(): void;
}

/**
 * An attempt counted before it is checked (`GuessCounter.reserve`). `retryAfter`: seconds until the
 * key may try again (the attempt is refused, and not counted), or 0: the attempt is counted now, and
 * stays counted unless `release` gives it back (no failure: right, or never checked; no mail sent) —
 * to the count it went to, whichever that was.
 */
export interface Reservation {
  retryAfter: number;
  release(): Promise<void>;
}

/**
 * A failure counter for attempts that are not all cheap to check or undo (a password against its
 * argon2id hash, a mail sent): each is counted before it is checked, so attempts sent at once cannot
 * all be checked before any of them is counted, and one that turns out no failure is given back.
 */
export interface GuessCounter extends FailureCounter {
  reserve(key: string): Promise<Reservation>;
}

const NOTHING_TO_RELEASE = async () => undefined;
const refusedFor = (retryAfter: number): Reservation => ({ retryAfter, release: NOTHING_TO_RELEASE });

/**
 * One more in `key`'s count, whose window of `windowSeconds` starts with its first (INCR, EXPIRE NX),
 * read back in the same step with the milliseconds the window has left. Throws when Redis does not
 * answer, or answers any part with an error.
 */
async function countInWindow(
  redis: Redis,
  key: string,
  windowSeconds: number,
): Promise<{ count: number; leftMs: number }> {
  const result = await redis.multi().incr(key).expire(key, windowSeconds, 'NX').pttl(key).exec();
  const count = result?.[0]?.[1];
  const left = result?.[2]?.[1];
  if (!result || result.some(([err]) => err) || typeof count !== 'number' || typeof left !== 'number')
    throw new Error('transaction aborted');
  return { count, leftMs: left > 0 ? left : windowSeconds * 1000 };
}

/** How many keys a counter keeps in memory at most (FailureCounts). */
export const MEMORY_COUNTS_CAPACITY = 100_000;

/** One key's failures in its window: how many, and when the first and the last were counted. */
export interface CountedFailures {
  readonly key: string;
  count: number;
  readonly start: number;
  last: number;
}

/** Counts of this many failures and more are kept alike: the priority of every count from the limit on. */
const TOP_LEVEL = 100;

/**
 * The failure counts an instance keeps in memory, at most `capacity` keys. When it is full, a new key
 * takes the place of the lowest count there (the longest kept of them first), after any count whose
 * window has ended: so failures spread over ever new keys (addresses cycled by the hundred thousand)
 * push out single failures, but a count of n goes only once every other key there holds n or more.
 * Forgetting a lock of `max` (an hour's allowance of guesses anew) then takes `capacity` × `max`
 * failures in its hour, where a least-recently-used cache forgot it after `capacity`.
 */
export class FailureCounts {
  private readonly byKey = new Map<string, CountedFailures>();
  /** By min(count, top): each in the order its entries reached that count. */
  private readonly levels: Map<string, CountedFailures>[];
  private readonly top: number;

  constructor(private readonly options: { windowMs: number; clock: Clock; max: number; capacity?: number }) {
    this.top = Math.max(1, Math.min(options.max, TOP_LEVEL));
    this.levels = Array.from({ length: this.top + 1 }, () => new Map());
  }

  get size(): number {
    return this.byKey.size;
  }

  private levelOf(count: number) {
    return Math.min(Math.max(count, 0), this.top);
  }

  private expired(e: CountedFailures) {
    return this.options.clock.nowMs() - e.start >= this.options.windowMs;
  }

  /** Whether a count of the key is kept (its window ended or not). */
  has(key: string): boolean {
    return this.byKey.has(key);
  }

  /** The key's count in its window, if one is kept. */
  get(key: string): CountedFailures | undefined {
    const e = this.byKey.get(key);
    if (!e) return undefined;
    if (this.expired(e)) {
      this.delete(key);
      return undefined;
    }
    return e;
  }

  /** One more failure of `key`: its count, made when it had none in a window. */
  increment(key: string): CountedFailures {
    const e = this.get(key);
    const now = this.options.clock.nowMs();
    if (e) {
      this.setCount(e, e.count + 1);
      e.last = now;
      return e;
    }
    if (this.byKey.size >= (this.options.capacity ?? MEMORY_COUNTS_CAPACITY)) this.evictOne();
    const made: CountedFailures = { key, count: 1, start: now, last: now };
    this.byKey.set(key, made);
    this.levels[this.levelOf(1)]!.set(key, made);
    return made;
  }

  /** Sets the count of `e`, while it is still the one kept for its key (not ended, nor dropped). */
  setCount(e: CountedFailures, count: number): void {
    if (this.byKey.get(e.key) !== e) return;
    const from = this.levelOf(e.count);
    const to = this.levelOf(count);
    e.count = count;
    if (from === to) return;
    this.levels[from]!.delete(e.key);
    this.levels[to]!.set(e.key, e);
  }

  delete(key: string): void {
    const e = this.byKey.get(key);
    if (!e) return;
    this.byKey.delete(key);
    this.levels[this.levelOf(e.count)]!.delete(key);
  }

  /** Every count kept whose window has not ended (those that have are dropped on the way). */
  entries(): CountedFailures[] {
    const live: CountedFailures[] = [];
    for (const e of [...this.byKey.values()]) {
      if (this.expired(e)) this.delete(e.key);
      else live.push(e);
    }
    return live;
  }

  /**
   * Makes room for one: the first-kept count of some level whose window has ended, else the first-kept
   * of the lowest level. At most one look per level (101): only when full.
   */
  private evictOne() {
    let lowest: CountedFailures | undefined;
    for (const level of this.levels) {
      const first = level.values().next().value;
      if (!first) continue;
      if (this.expired(first)) return this.delete(first.key);
      lowest ??= first;
    }
    if (lowest) this.delete(lowest.key);
  }
}

export function createMemoryFailureCounter(options: {
  max: number;
  windowSeconds: number;
  clock: Clock;
  /** At most this many keys kept (MEMORY_COUNTS_CAPACITY). */
  capacity?: number;
}): GuessCounter {
  return memoryFailureCounter(options).counter;
}

/** The memory counter and the counts it keeps (which the Redis counter carries into Redis). */
function memoryFailureCounter(options: {
  max: number;
  windowSeconds: number;
  clock: Clock;
  capacity?: number;
}): { counter: GuessCounter & { retryAfterNow(key: string): number }; counts: FailureCounts } {
  const windowMs = options.windowSeconds * 1000;
  const counts = new FailureCounts({ ...options, windowMs });
  const retryAfterNow = (key: string) => {
    const e = counts.get(key);
    if (!e || e.count < options.max) return 0;
    return Math.max(1, Math.ceil((e.start + windowMs - options.clock.nowMs()) / 1000));
  };
  const counter = {
    retryAfterNow,
    async retryAfter(key: string) {
      return retryAfterNow(key);
    },
    async recordFailure(key: string) {
      counts.increment(key);
    },
    // Synchronous from the check to the count: nothing runs between them.
    async reserve(key: string): Promise<Reservation> {
      const wait = retryAfterNow(key);
      if (wait > 0) return refusedFor(wait);
      const counted = counts.increment(key);
      return {
        retryAfter: 0,
        // The window it was counted in only: a later window's count is none of its business.
        release: async () => {
          if (counts.get(key) === counted && counted.count > 0) counts.setCount(counted, counted.count - 1);
        },
      };
    },
    async reset(key: string) {
      counts.delete(key);
    },
  };
  return { counter, counts };
}

/** DECR, only while the count exists (a DECR after it expired would make a count of −1 that never does). */
const RELEASE_SCRIPT =
  "if redis.call('exists', KEYS[1]) == 1 then return redis.call('decr', KEYS[1]) end return 0";

/**
 * The Redis key of an account's failed sign-ins: the address's SHA-256, so whoever can list Redis's
 * keys does not read who is being guessed at (or who signs in at all).
 */
export const loginFailuresKey = (email: string) =>
  `paservices:auth:login-failures:${createHash('sha256').update(email).digest('base64url')}`;

/**
 * The Redis key of the hourly mail cap of one address and purpose, from `mailCapKey`'s
 * `<purpose>:<HMAC of the address under SECRET_PEPPER>`: no address in clear either, and, keyed,
 * none found by hashing guesses without the pepper.
 */
export const mailsPerHourKey = (capKey: string) => `paservices:auth:mails-per-hour:${capKey}`;

/** The Redis key of a user's profile changes in the current minute (their id: no address, no name). */
export const profileChangesKey = (userId: string) => `paservices:auth:profile-changes:${userId}`;

/** The Redis key, next to a count's, of the times its resets and carried counts were made (a hash). */
export const failureTimesKey = (countKey: string) => `${countKey}:times`;

/**
 * Carries a count kept in one instance's memory while Redis was away into Redis (`INCRBY`; its window
 * the longer of the two), unless a reset recorded there (`reset`, ms) came at or after its last failure
 * (ARGV[3]): then a reset on another instance, or one replayed from it, outweighs it. Failures on both
 * sides of such a reset are all carried (which came before it is not known). Records the carried last
 * failure (`carried`), which a reset replayed later leaves standing. 1 when carried, 0 when outweighed.
 * KEYS: the count, its times. ARGV: the count, ms left of its window, its last failure (ms), window (ms).
 */
const CARRY_SCRIPT = `
local reset = tonumber(redis.call('hget', KEYS[2], 'reset') or '0')
local last = tonumber(ARGV[3])
if reset >= last then return 0 end
redis.call('incrby', KEYS[1], ARGV[1])
redis.call('pexpire', KEYS[1], ARGV[2], 'NX')
redis.call('pexpire', KEYS[1], ARGV[2], 'GT')
if tonumber(redis.call('hget', KEYS[2], 'carried') or '0') < last then
  redis.call('hset', KEYS[2], 'carried', ARGV[3])
end
redis.call('pexpire', KEYS[2], ARGV[4])
return 1`;

/**
 * A reset that leaves its time (ARGV[1], ms) next to the count, for counts still to be carried: those
 * failed at or before it are then not. The count is deleted unless it holds failures known to be later
 * (carried ones, or a window begun after it: a reset replayed from an outage does not clear what was
 * counted since). KEYS: the count, its times. ARGV: the reset's time, window (ms), now (ms).
 */
const RESET_SCRIPT = `
local at = tonumber(ARGV[1])
local carried = tonumber(redis.call('hget', KEYS[2], 'carried') or '0')
local left = redis.call('pttl', KEYS[1])
local began = tonumber(ARGV[3]) - (tonumber(ARGV[2]) - left)
if carried <= at and (left < 0 or began <= at) then redis.call('del', KEYS[1]) end
if tonumber(redis.call('hget', KEYS[2], 'reset') or '0') < at then
  redis.call('hset', KEYS[2], 'reset', ARGV[1])
end
redis.call('pexpire', KEYS[2], ARGV[2])
return 1`;

/** Scripts in flight at once while carrying counts into Redis. */
const CARRY_BATCH = 500;

/**
 * A guess counter shared through Redis, read and written there on every call (the login lockout, the
 * hourly mail caps): exact on every instance, including one that has counted nothing yet.
 *
 * While Redis does not answer (the `link` knows it, or a command fails), this instance counts and
 * checks in its memory alone (logged once), and a reset there is kept to be replayed. When it answers
 * again (the link says so, or the counter's next command finds it), the resets made meanwhile are
 * replayed and the memory counts carried into it (CARRY_SCRIPT), then dropped; a key memory still
 * holds waits for that before Redis is asked about it. Memory is never consulted while Redis answers,
 * so a reset on any instance lifts a lock on all of them, and an outage is still no fresh allowance
 * of guesses. For a window after an outage
 * this instance saw, its resets also leave their time in Redis (RESET_SCRIPT; a plain DEL otherwise),
 * so counts another instance carries later do not bring back a lock a reset lifted.
 */
export function createRedisFailureCounter(options: {
  redis: Redis;
  max: number;
  windowSeconds: number;
  clock: Clock;
  logger: Logger;
  /** The Redis key a key's count lives under for its window. */
  redisKey: (key: string) => string;
  /** The log line when Redis does not answer. */
  fallbackMessage: string;
  /** What is counted, for the line saying what was carried into Redis ("Login failures"). */
  label?: string;
  /** Shared knowledge that Redis does not answer: while it does not, it is not asked. */
  link?: RedisAvailability | undefined;
  /** At most this many keys kept in memory (MEMORY_COUNTS_CAPACITY). */
  capacity?: number;
}): GuessCounter {
  const { counter: fallback, counts } = memoryFailureCounter(options);
  const { redis, redisKey, link } = options;
  const windowMs = options.windowSeconds * 1000;
  const now = () => options.clock.nowMs();
  /** Resets made while Redis did not answer, by key: when, to be replayed there. Bounded as the counts. */
  const resetsMeanwhile = new LRUCache<string, number>({ max: options.capacity ?? MEMORY_COUNTS_CAPACITY });
  /** When this instance last went without Redis (or saw it answer again): resets leave their time for a window after. */
  let lastWithoutRedis = Number.NEGATIVE_INFINITY;
  let warned = false;
  let carrying: Promise<void> | undefined;

  async function carry() {
    let replayed = 0;
    let carried = 0;
    const resets = [...resetsMeanwhile.entries()];
    for (let i = 0; i < resets.length; i += CARRY_BATCH) {
      await Promise.all(
        resets.slice(i, i + CARRY_BATCH).map(async ([key, at]) => {
          const k = redisKey(key);
          await redis.eval(RESET_SCRIPT, 2, k, failureTimesKey(k), at, windowMs, now());
          if (resetsMeanwhile.peek(key) === at) resetsMeanwhile.delete(key);
          replayed++;
        }),
      );
    }
    const kept = counts.entries();
    for (let i = 0; i < kept.length; i += CARRY_BATCH) {
      await Promise.all(
        kept.slice(i, i + CARRY_BATCH).map(async (e) => {
          const n = e.count;
          const left = e.start + windowMs - now();
          if (n > 0 && left > 0) {
            const k = redisKey(e.key);
            await redis.eval(CARRY_SCRIPT, 2, k, failureTimesKey(k), n, Math.ceil(left), e.last, windowMs);
            carried++;
          }
          // Counted here meanwhile (Redis failed again while this ran): that much stays.
          if (e.count > n) counts.setCount(e, e.count - n);
          else if (counts.get(e.key) === e) counts.delete(e.key);
        }),
      );
    }
    if (replayed || carried)
      options.logger.warn(
        { counts: carried, resets: replayed },
        `${options.label ?? 'Counts'} kept in this instance's memory while Redis was away: carried into it`,
      );
  }

  /**
   * Carries what memory holds into Redis, once at a time (a failure makes Redis unavailable again);
   * undefined when it holds nothing.
   */
  function carried(): Promise<void> | undefined {
    if (counts.size === 0 && resetsMeanwhile.size === 0) return undefined;
    if (!carrying) {
      const started = carry().finally(() => {
        carrying = undefined;
      });
      started.catch((err: unknown) => {
        lastWithoutRedis = now();
        link?.failed(err);
      });
      carrying = started;
    }
    return carrying;
  }

  link?.onAnswered?.(() => {
    lastWithoutRedis = now();
    carried();
  });

  async function attempt<T>(key: string, work: () => Promise<T>, onFallback: () => Promise<T>): Promise<T> {
    if (link && !link.answering()) {
      lastWithoutRedis = now();
      return onFallback();
    }
    try {
      // Only a key memory still holds waits for the carrying: the others' counts in Redis are whole.
      // (A reset does not wait: the time it leaves outweighs its count should that be carried after.)
      const carrying = carried();
      if (carrying && (counts.has(key) || resetsMeanwhile.has(key))) await carrying;
      const value = await work();
      warned = false;
      return value;
    } catch (err) {
      lastWithoutRedis = now();
      link?.failed(err);
      if (!warned) {
        options.logger.warn({ err }, options.fallbackMessage);
        warned = true;
      }
      return onFallback();
    }
  }
  return {
    retryAfter: (key) =>
      attempt(
        key,
        async () => {
          const [count, ttl] = await Promise.all([redis.get(redisKey(key)), redis.ttl(redisKey(key))]);
          if (!count || Number(count) < options.max) return 0;
          return Math.max(1, ttl);
        },
        async () => fallback.retryAfterNow(key),
      ),
    recordFailure: (key) =>
      attempt(
        key,
        async () => {
          await countInWindow(redis, redisKey(key), options.windowSeconds);
        },
        () => fallback.recordFailure(key),
      ),
    reserve: (key) =>
      attempt(
        key,
        async () => {
          // Counted and read in one step (INCR), on every instance: of guesses sent at once, those past
          // the limit see a count over it, whichever instance they reach.
          const k = redisKey(key);
          const { count, leftMs } = await countInWindow(redis, k, options.windowSeconds);
          // Given back to Redis, where it was counted; if Redis is gone by then, it stays counted (a
          // guess counted once too often, never a failure forgotten in the other count).
          const release = async () => {
            if (link && !link.answering()) return;
            await redis.eval(RELEASE_SCRIPT, 1, k).catch((err: unknown) => link?.failed(err));
          };
          if (count <= options.max) return { retryAfter: 0, release };
          // Refused: not a guess, so not counted.
          await release();
          return refusedFor(Math.max(1, Math.ceil(leftMs / 1000)));
        },
        // Given back to memory, where it was counted, unless carried into Redis by then (it then stays
        // counted there).
        () => fallback.reserve(key),
      ),
    reset: async (key) => {
      await fallback.reset(key);
      const at = now();
      await attempt(
        key,
        async () => {
          const k = redisKey(key);
          // Within a window of an outage, counts kept in memory somewhere may still be carried in.
          if (at - lastWithoutRedis < windowMs)
            await redis.eval(RESET_SCRIPT, 2, k, failureTimesKey(k), at, windowMs, now());
          else await redis.del(k);
        },
        async () => {
          resetsMeanwhile.set(key, at);
        },
      );
    },
  };
}

/**
 * A failure counter shared through Redis that costs nothing while nothing fails: it is read from this
 * instance's memory, and only a failure goes to Redis (INCR, and the window's remaining time), whose
 * answer — the count of every instance together — is kept here. So checks on the hot path (client
 * authentication on every introspection) never wait for Redis, and a source spreading failures over
 * N instances is stopped after at most `max` + N − 1 of them in a window: each instance blocks it once
 * its own next failure reports the shared count over the limit. When Redis does not answer, failures
 * are counted in this instance's memory (logged once) and still block; while the `link` knows it does
 * not, Redis is not asked.
 */
export function createSharedFailureCounter(options: {
  redis: Redis;
  max: number;
  windowSeconds: number;
  clock: Clock;
  logger: Logger;
  /** Redis key prefix, under which each source's count lives for one window. */
  prefix: string;
  /** The log line when Redis does not answer. */
  fallbackMessage: string;
  /** Shared knowledge that Redis does not answer: while it does not, it is not asked. */
  link?: RedisAvailability | undefined;
}): FailureCounter {
  const { link } = options;
  const known = new LRUCache<string, { count: number; until: number }>({ max: 100_000 });
  const windowMs = options.windowSeconds * 1000;
  const now = () => options.clock.nowMs();
  const current = (key: string) => {
    const e = known.get(key);
    return e && now() < e.until ? e : undefined;
  };
  let warned = false;
  const retryAfterNow = (key: string) => {
    const e = current(key);
    if (!e || e.count < options.max) return 0;
    return Math.max(1, Math.ceil((e.until - now()) / 1000));
  };
  /** A failure counted in this instance's memory alone (Redis does not answer). */
  const countHere = (key: string) => {
    const e = current(key);
    if (e) e.count++;
    else known.set(key, { count: 1, until: now() + windowMs });
  };
  return {
    retryAfterNow,
    async retryAfter(key) {
      return retryAfterNow(key);
    },
    async recordFailure(key) {
      if (link && !link.answering()) return countHere(key);
      const k = options.prefix + key;
      try {
        const { count, leftMs } = await countInWindow(options.redis, k, options.windowSeconds);
        warned = false;
        known.set(key, { count, until: now() + leftMs });
      } catch (err) {
        link?.failed(err);
        if (!warned) {
          options.logger.warn({ err }, options.fallbackMessage);
          warned = true;
        }
        countHere(key);
      }
    },
    async reset(key) {
      known.delete(key);
      if (link && !link.answering()) return;
      try {
        await options.redis.del(options.prefix + key);
      } catch (err) {
        // The shared count ends with its window.
        link?.failed(err);
      }
    },
  };
}
