import { createHash } from 'node:crypto';
import type { Redis } from 'ioredis';
import { LRUCache } from 'lru-cache';
import type { Logger } from 'pino';
import type { Clock } from './clock.js';

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
 * key may try again (the attempt is refused, and not counted), or 0: the attempt is counted as a
 * failure now, and settled once checked with one of the two below.
 */
export interface Reservation {
  retryAfter: number;
  /**
   * No failure (right, or never checked): the count is given back, to the count it went to, whichever
   * that was.
   */
  release(): Promise<void>;
  /**
   * A failure: it stays counted. Only a counter that counted it in this instance alone at first (the
   * shared one, whose checks never wait for Redis) has anything to do: count it in Redis too.
   */
  confirm(): Promise<void>;
}

/**
 * A failure counter for attempts that are not all cheap to check (a password against its argon2id
 * hash, a client's secret, a mail sent): each is counted before it is checked, so attempts sent at
 * once cannot all be checked before any of them is counted, and one that turns out no failure is
 * given back.
 */
export interface GuessCounter extends FailureCounter {
  reserve(key: string): Promise<Reservation>;
}

const NOTHING_TO_DO = async () => undefined;
const refusedFor = (retryAfter: number): Reservation => ({
  retryAfter,
  release: NOTHING_TO_DO,
  confirm: NOTHING_TO_DO,
});

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
        confirm: NOTHING_TO_DO,
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

export function createRedisFailureCounter(options: {
  redis: Redis;
  max: number;
  windowSeconds: number;
  clock: Clock;
  logger: Logger;
}): GuessCounter {
  const fallback = createMemoryFailureCounter(options);
  const redisKey = loginFailuresKey;
  let warned = false;
  async function attempt<T>(work: () => Promise<T>, onFallback: () => Promise<T>): Promise<T> {
    try {
      const value = await work();
      warned = false;
      return value;
    } catch (err) {
      if (!warned) {
        options.logger.warn({ err }, 'Redis unavailable: counting login failures in this instance only');
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
            await options.redis.eval(RELEASE_SCRIPT, 1, k).catch(() => undefined);
          };
          if (count <= options.max) return { retryAfter: 0, release, confirm: NOTHING_TO_DO };
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
 * A reservation in the shared count of KEYS[1] (a source's failures): counted first in KEYS[2] (its
 * attempts being checked, on every instance), with ARGV[3] more (attempts this instance had counted
 * in its memory alone, counted in Redis from now), then compared, in one step: refused, and not
 * counted, when the failures and the attempts being checked go beyond ARGV[1]. Answers {1 or 0, the
 * failures, the milliseconds their window has left}. KEYS[2] lasts ARGV[2] seconds after the last
 * reservation, so attempts never settled (an instance gone) do not last.
 */
const RESERVE_SCRIPT = `
local failures = tonumber(redis.call('get', KEYS[1]) or '0')
local checking = redis.call('incrby', KEYS[2], 1 + tonumber(ARGV[3]))
redis.call('expire', KEYS[2], ARGV[2])
local left = redis.call('pttl', KEYS[1])
if failures + checking > tonumber(ARGV[1]) then
  if redis.call('decr', KEYS[2]) <= 0 then redis.call('del', KEYS[2]) end
  return {0, failures, left}
end
return {1, failures, left}`;

/**
 * An attempt checked and no failure: no longer being checked (KEYS[1]), while it is counted there; the
 * count goes with its last attempt (none is no key).
 */
const CHECKED_SCRIPT = `
if tonumber(redis.call('get', KEYS[1]) or '0') > 1 then return redis.call('decr', KEYS[1]) end
redis.call('del', KEYS[1])
return 0`;

/**
 * An attempt checked and failed: from those being checked (KEYS[2]) to the failures (KEYS[1]), whose
 * window of ARGV[1] seconds starts with the first, as countInWindow counts. Answers {the failures, the
 * milliseconds their window has left}.
 */
const FAILED_SCRIPT = `
if tonumber(redis.call('get', KEYS[2]) or '0') > 1 then redis.call('decr', KEYS[2]) else redis.call('del', KEYS[2]) end
local failures = redis.call('incr', KEYS[1])
redis.call('expire', KEYS[1], ARGV[1], 'NX')
return {failures, redis.call('pttl', KEYS[1])}`;

/** Numbers in an array answer of Redis (a script's), or undefined for anything else. */
const numbers = (answer: unknown): number[] | undefined =>
  Array.isArray(answer) && answer.every((n) => typeof n === 'number') ? answer : undefined;

/**
 * A failure counter shared through Redis that costs nothing while nothing fails: it is read from this
 * instance's memory, and only a failure goes to Redis (INCR, and the window's remaining time), whose
 * answer — the count of every instance together — is kept here. So checks on the hot path (client
 * authentication on every introspection) never wait for Redis.
 *
 * Attempts are reserved before they are checked (`reserve`), and settled after: in this instance's
 * memory, so attempts sent at once to one instance are never checked beyond the limit; and in Redis
 * too (counted, then compared, in one step) once the source has failed here or has attempts under way
 * here, so a source is checked at most `max` + N − 1 times in a window over N instances: each
 * instance's first attempt of a source it knows no failure of is counted in Redis only if it fails,
 * or once another attempt of that source comes while it is under way. When Redis does not answer,
 * attempts and failures are counted in this instance's memory (logged once) and still block.
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
  /**
   * `retryAfter` reads the shared count when this instance's memory does not block (one Redis read),
   * and every reservation is made in Redis: for a limit off the hot path (mails), exact on every
   * instance, including one that has counted nothing yet (another instance's, or one restarted).
   * `retryAfterNow` stays memory-only.
   */
  readShared?: boolean;
}): GuessCounter {
  /** One reservation: counted in Redis (or in this instance's memory alone), settled once. */
  interface Attempt {
    inRedis: boolean;
    settled: boolean;
  }
  /**
   * A source's window as this instance knows it: `count`, the failures Redis last answered (or counted
   * here while it did not); `checking`, this instance's attempts under way; `unshared`, those of them
   * Redis has not counted, and may yet be told of.
   */
  interface Entry {
    count: number;
    until: number;
    checking: number;
    unshared: Set<Attempt>;
  }
  const known = new LRUCache<string, Entry>({ max: 100_000 });
  const windowMs = options.windowSeconds * 1000;
  const now = () => options.clock.nowMs();
  // Attempts being checked are counted beside the failures, not among them: one that turns out right
  // leaves nothing behind in the count every instance learns at its failures.
  const checkingPrefix = `${options.prefix.replace(/:$/, '')}-checking:`;
  const current = (key: string) => {
    const e = known.get(key);
    return e && now() < e.until ? e : undefined;
  };
  const entryOf = (key: string) => {
    const existing = current(key);
    if (existing) return existing;
    const e: Entry = { count: 0, until: now() + windowMs, checking: 0, unshared: new Set() };
    known.set(key, e);
    return e;
  };
  /** Redis's answer: its count of failures, for the time its window has left. */
  const heard = (key: string, count: number, leftMs: number) => {
    const e = entryOf(key);
    e.count = count;
    e.until = now() + (leftMs > 0 ? leftMs : windowMs);
  };
  /** An attempt no longer under way, in the window it was made in (a later window's is none of its business). */
  const settle = (key: string, e: Entry, attempt: Attempt) => {
    attempt.settled = true;
    e.unshared.delete(attempt);
    if (current(key) !== e) return;
    e.checking = Math.max(0, e.checking - 1);
    // Nothing left to know of the source (only successes came): sources that do not fail keep no entry.
    if (e.checking === 0 && e.count === 0) known.delete(key);
  };
  let warned = false;
  const unavailable = (err: unknown) => {
    if (!warned) {
      options.logger.warn({ err }, options.fallbackMessage);
      warned = true;
    }
  };
  const retryAfterNow = (key: string) => {
    const e = current(key);
    if (!e || e.count + e.checking < options.max) return 0;
    return Math.max(1, Math.ceil((e.until - now()) / 1000));
  };
  /** One failure counted in Redis (this instance's memory when Redis does not answer); `settled` in the same step. */
  async function countFailure(key: string, settled: () => void = () => undefined) {
    try {
      const { count, leftMs } = await countInWindow(
        options.redis,
        options.prefix + key,
        options.windowSeconds,
      );
      warned = false;
      settled();
      heard(key, count, leftMs);
    } catch (err) {
      unavailable(err);
      settled();
      entryOf(key).count++;
    }
  }
  /** The attempt under way, as the caller settles it: given back, or a failure. */
  function reservation(key: string, e: Entry, attempt: Attempt): Reservation {
    const checkingKey = checkingPrefix + key;
    return {
      retryAfter: 0,
      // Given back where it was counted; if Redis is gone by then, it stays counted there until its
      // key ends (an attempt counted once too often, never a failure forgotten).
      release: async () => {
        if (attempt.settled) return;
        settle(key, e, attempt);
        if (attempt.inRedis) await options.redis.eval(CHECKED_SCRIPT, 1, checkingKey).catch(() => undefined);
      },
      confirm: async () => {
        if (attempt.settled) return;
        if (!attempt.inRedis) {
          // Told to Redis as a failure now, and no longer as an attempt later: still under way here
          // until Redis answers, so no attempt meanwhile goes unseen.
          e.unshared.delete(attempt);
          return countFailure(key, () => settle(key, e, attempt));
        }
        try {
          const answer = numbers(
            await options.redis.eval(
              FAILED_SCRIPT,
              2,
              options.prefix + key,
              checkingKey,
              options.windowSeconds,
            ),
          );
          if (answer?.length !== 2) throw new Error('unexpected answer to a failure');
          warned = false;
          settle(key, e, attempt);
          heard(key, answer[0]!, answer[1]!);
        } catch (err) {
          unavailable(err);
          settle(key, e, attempt);
          entryOf(key).count++;
        }
      },
    };
  }
  return {
    retryAfterNow,
    async retryAfter(key) {
      const local = retryAfterNow(key);
      if (local > 0 || !options.readShared) return local;
      try {
        const k = options.prefix + key;
        const [count, leftMs] = await Promise.all([options.redis.get(k), options.redis.pttl(k)]);
        const shared = Number(count ?? 0);
        if (shared < options.max || leftMs <= 0) return 0;
        heard(key, shared, leftMs);
        return Math.max(1, Math.ceil(leftMs / 1000));
      } catch {
        return local;
      }
    },
    recordFailure: (key) => countFailure(key),
    async reserve(key) {
      // Synchronous from the check to the count: attempts at once on this instance see each other.
      const wait = retryAfterNow(key);
      if (wait > 0) return refusedFor(wait);
      const e = entryOf(key);
      const viaRedis = options.readShared === true || e.count > 0 || e.checking > 0;
      e.checking++;
      const attempt: Attempt = { inRedis: viaRedis, settled: false };
      // A source with no failure known here and nothing under way: the hot path, which never waits.
      if (!viaRedis) {
        e.unshared.add(attempt);
        return reservation(key, e, attempt);
      }
      // The attempts this instance counted alone are counted in Redis with this one, in the same step.
      const moved = [...e.unshared];
      e.unshared.clear();
      for (const m of moved) m.inRedis = true;
      let answer: number[] | undefined;
      try {
        answer = numbers(
          await options.redis.eval(
            RESERVE_SCRIPT,
            2,
            options.prefix + key,
            checkingPrefix + key,
            options.max,
            options.windowSeconds,
            moved.length,
          ),
        );
        if (answer?.length !== 3) throw new Error('unexpected answer to a reservation');
        warned = false;
      } catch (err) {
        // Counted here alone, as the attempts moved were.
        unavailable(err);
        for (const m of [...moved, attempt]) {
          m.inRedis = false;
          if (!m.settled) e.unshared.add(m);
        }
        return reservation(key, e, attempt);
      }
      const [accepted, failures, left] = answer as [number, number, number];
      if (accepted === 1) return reservation(key, e, attempt);
      // Refused, and not counted (the script gave it back).
      settle(key, e, attempt);
      // The failures alone reach the limit: this instance blocks too, without asking again. Refused for
      // attempts under way, it does not: they may turn out right.
      if (failures >= options.max) heard(key, failures, left);
      return refusedFor(Math.max(1, Math.ceil((left > 0 ? left : windowMs) / 1000)));
    },
    async reset(key) {
      known.delete(key);
      try {
        await options.redis.del(options.prefix + key);
      } catch {
        // The shared count ends with its window.
      }
    },
  };
}
