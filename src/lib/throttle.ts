import { createHash } from 'node:crypto';
import type { Redis } from 'ioredis';
import { LRUCache } from 'lru-cache';
import type { Logger } from 'pino';
import type { Clock } from './clock.js';
import type { RedisLink } from './redis-link.js';

/** What a counter needs of the shared RedisLink: whether to ask Redis, and where to report a failure. */
export type RedisAvailability = Pick<RedisLink, 'answering' | 'failed'>;

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

export function createMemoryFailureCounter(options: {
  max: number;
  windowSeconds: number;
  clock: Clock;
}): GuessCounter {
  const entries = new LRUCache<string, { count: number; start: number }>({ max: 100_000 });
  const windowMs = options.windowSeconds * 1000;
  const current = (key: string) => {
    const e = entries.get(key);
    if (!e || options.clock.nowMs() - e.start >= windowMs) return undefined;
    return e;
  };
  const retryAfterNow = (key: string) => {
    const e = current(key);
    if (!e || e.count < options.max) return 0;
    return Math.max(1, Math.ceil((e.start + windowMs - options.clock.nowMs()) / 1000));
  };
  return {
    retryAfterNow,
    async retryAfter(key) {
      return retryAfterNow(key);
    },
    async recordFailure(key) {
      const e = current(key);
      if (e) e.count++;
      else entries.set(key, { count: 1, start: options.clock.nowMs() });
    },
    // Synchronous from the check to the count: nothing runs between them.
    async reserve(key) {
      const wait = retryAfterNow(key);
      if (wait > 0) return refusedFor(wait);
      const counted = current(key) ?? { count: 0, start: options.clock.nowMs() };
      counted.count++;
      entries.set(key, counted);
      return {
        retryAfter: 0,
        // The window it was counted in only: a later window's count is none of its business.
        release: async () => {
          if (current(key) === counted && counted.count > 0) counted.count--;
        },
      };
    },
    async reset(key) {
      entries.delete(key);
    },
  };
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
 * A guess counter shared through Redis, read and written there on every call (the login lockout, the
 * hourly mail caps): exact on every instance, including one that has counted nothing yet. When Redis
 * does not answer, this instance's memory counts (logged once) and still blocks; while the `link`
 * knows it does not, Redis is not asked (nothing waits for its command timeout).
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
  /** Shared knowledge that Redis does not answer: while it does not, it is not asked. */
  link?: RedisAvailability | undefined;
}): GuessCounter {
  const fallback = createMemoryFailureCounter(options);
  const { redisKey, link } = options;
  let warned = false;
  async function attempt<T>(work: () => Promise<T>, onFallback: () => Promise<T>): Promise<T> {
    if (link && !link.answering()) return onFallback();
    try {
      const value = await work();
      warned = false;
      return value;
    } catch (err) {
      link?.failed(err);
      if (!warned) {
        options.logger.warn({ err }, options.fallbackMessage);
        warned = true;
      }
      return onFallback();
    }
  }
  return {
    retryAfter: async (key) => {
      // Failures counted here while Redis was away still block when it is back: a lockout reached
      // during an outage lasts its hour, and an outage is no fresh allowance of guesses.
      const local = await fallback.retryAfter(key);
      return attempt(
        async () => {
          const [count, ttl] = await Promise.all([
            options.redis.get(redisKey(key)),
            options.redis.ttl(redisKey(key)),
          ]);
          if (!count || Number(count) < options.max) return local;
          return Math.max(1, ttl, local);
        },
        async () => local,
      );
    },
    recordFailure: (key) =>
      attempt(
        async () => {
          await countInWindow(options.redis, redisKey(key), options.windowSeconds);
        },
        () => fallback.recordFailure(key),
      ),
    reserve: async (key) => {
      const local = fallback.retryAfterNow!(key);
      if (local > 0) return refusedFor(local);
      return attempt(
        async () => {
          // Counted and read in one step (INCR), on every instance: of guesses sent at once, those past
          // the limit see a count over it, whichever instance they reach.
          const k = redisKey(key);
          const { count, leftMs } = await countInWindow(options.redis, k, options.windowSeconds);
          // Given back to Redis, where it was counted; if Redis is gone by then, it stays counted (a
          // guess counted once too often, never a failure forgotten in the other count).
          const release = async () => {
            if (link && !link.answering()) return;
            await options.redis.eval(RELEASE_SCRIPT, 1, k).catch((err: unknown) => link?.failed(err));
          };
          if (count <= options.max) return { retryAfter: 0, release };
          // Refused: not a guess, so not counted.
          await release();
          return refusedFor(Math.max(1, Math.ceil(leftMs / 1000)));
        },
        () => fallback.reserve(key),
      );
    },
    reset: async (key) => {
      await fallback.reset(key);
      await attempt(
        async () => {
          await options.redis.del(redisKey(key));
        },
        async () => undefined,
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
