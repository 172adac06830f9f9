import { LRUCache } from 'lru-cache';
import type { Clock } from './clock.js';

/**
 * What the hot paths read from the database once and then serve from memory until a change event
 * drops it: bounded (LRU), with a TTL that is only a backstop, one read at a time per key however many
 * requests want it, and never caching a read that was in flight when the key (or everything) was
 * invalidated — it answers its own callers, but a change is never undone by a slow read.
 */
export interface ReadThroughCache<V> {
  /** The cached value, or the value read once for every caller waiting on it. */
  get(key: string): Promise<V>;
  /** The cached value (boxed, since it may be undefined) when there is one; never reads. */
  peek(key: string): { value: V } | undefined;
  delete(key: string): void;
  clear(): void;
  readonly size: number;
}

export function createReadThroughCache<V>(options: {
  load: (key: string) => Promise<V>;
  max: number;
  ttlMs: number;
  /** TTLs follow this clock, read on every check, so tests can step past them. */
  clock: Clock;
}): ReadThroughCache<V> {
  // Boxed, so that "absent" values (null, undefined) are cached like any other.
  const entries = new LRUCache<string, { value: V }>({
    max: options.max,
    ttl: options.ttlMs,
    perf: { now: () => options.clock.nowMs() },
    ttlResolution: 0,
  });
  const loading = new Map<string, Promise<V>>();
  /** Bumped by every invalidation; a read started before one is not cached. */
  let generation = 0;

  return {
    async get(key) {
      const hit = entries.get(key);
      if (hit) return hit.value;
      const pending = loading.get(key);
      if (pending) return pending;
      const started = generation;
      const promise = options
        .load(key)
        .then((value) => {
          if (generation === started) entries.set(key, { value });
          return value;
        })
        .finally(() => {
          if (loading.get(key) === promise) loading.delete(key);
        });
      loading.set(key, promise);
      return promise;
    },
    peek(key) {
      return entries.get(key);
    },
    delete(key) {
      generation++;
      entries.delete(key);
      loading.delete(key);
    },
    clear() {
      generation++;
      entries.clear();
      loading.clear();
    },
    get size() {
      return entries.size;
    },
  };
}
