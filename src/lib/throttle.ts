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
  recordFailure(key: string): Promise<void>;
  reset(key: string): Promise<void>;
}

export function createMemoryFailureCounter(options: {
  max: number;
  windowSeconds: number;
  clock: Clock;
}): FailureCounter {
  const entries = new LRUCache<string, { count: number; start: number }>({ max: 100_000 });
  const windowMs = options.windowSeconds * 1000;
  const current = (key: string) => {
    const e = entries.get(key);
    if (!e || options.clock.now().getTime() - e.start >= windowMs) return undefined;
    return e;
  };
  return {
    async retryAfter(key) {
      const e = current(key);
      if (!e || e.count < options.max) return 0;
      return Math.max(1, Math.ceil((e.start + windowMs - options.clock.now().getTime()) / 1000));
    },
    async recordFailure(key) {
      const e = current(key);
      if (e) e.count++;
      else entries.set(key, { count: 1, start: options.clock.now().getTime() });
    },
    async reset(key) {
      entries.delete(key);
    },
  };
}

export function createRedisFailureCounter(options: {
  redis: Redis;
  max: number;
  windowSeconds: number;
  clock: Clock;
  logger: Logger;
}): FailureCounter {
  const fallback = createMemoryFailureCounter(options);
  const redisKey = (key: string) => `paservices:auth:login-failures:${key}`;
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
    retryAfter: (key) =>
      attempt(
        async () => {
          const [count, ttl] = await Promise.all([
            options.redis.get(redisKey(key)),
            options.redis.ttl(redisKey(key)),
          ]);
          if (!count || Number(count) < options.max) return 0;
          return Math.max(1, ttl);
        },
        () => fallback.retryAfter(key),
      ),
    recordFailure: (key) =>
      attempt(
        async () => {
          const k = redisKey(key);
          const result = await options.redis.multi().incr(k).expire(k, options.windowSeconds, 'NX').exec();
          if (!result) throw new Error('transaction aborted');
        },
        () => fallback.recordFailure(key),
      ),
    reset: (key) =>
      attempt(
        async () => {
          await options.redis.del(redisKey(key));
        },
        () => fallback.reset(key),
      ),
  };
}
