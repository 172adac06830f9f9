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
  /**
   * When given, absent values (null, undefined: a lookup that found nothing) are kept apart, in an
   * LRU of at most this many entries, so that lookups of keys that do not exist — a flood of made-up
   * ones, say — cannot push out what was found. Without it they share `max` with the rest.
   */
  maxAbsent?: number;
}): ReadThroughCache<V> {
  const lru = (max: number) =>
    // Boxed, so that "absent" values (null, undefined) are cached like any other.
    new LRUCache<string, { value: V }>({
      max,
      ttl: options.ttlMs,
      perf: { now: () => options.clock.nowMs() },
      ttlResolution: 0,
    });
  const entries = lru(options.max);
  const absent = options.maxAbsent === undefined ? entries : lru(options.maxAbsent);
  /** Keeps a value read; with two LRUs, a key is only ever in one of them. */
  const store = (key: string, value: V) => {
    if (absent === entries) {
      entries.set(key, { value });
    } else if (value === undefined || value === null) {
      entries.delete(key);
      absent.set(key, { value });
    } else {
      absent.delete(key);
      entries.set(key, { value });
    }
  };
  const loading = new Map<string, Promise<V>>();
  /** Bumped by every invalidation; a read started before one is not cached. */
  let generation = 0;

  return {
    async get(key) {
      const hit = entries.get(key) ?? (absent === entries ? undefined : absent.get(key));
      if (hit) return hit.value;
      const pending = loading.get(key);
      if (pending) return pending;
      const started = generation;
      const promise = options
        .load(key)
        .then((value) => {
          if (generation === started) store(key, value);
          return value;
        })
        .finally(() => {
          if (loading.get(key) === promise) loading.delete(key);
        });
      loading.set(key, promise);
      return promise;
    },
    peek(key) {
      return entries.get(key) ?? (absent === entries ? undefined : absent.get(key));
    },
    delete(key) {
      generation++;
      entries.delete(key);
      absent.delete(key);
      loading.delete(key);
    },
    clear() {
      generation++;
      entries.clear();
      absent.clear();
      loading.clear();
    },
    get size() {
      return absent === entries ? entries.size : entries.size + absent.size;
    },
  };
}
