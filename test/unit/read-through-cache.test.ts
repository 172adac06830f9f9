import { describe, expect, it } from 'vitest';
import { createReadThroughCache } from '../../src/lib/read-through-cache.js';
import { createTestClock } from '../support/clock.js';

describe('read-through cache (the hot paths’ rows, dropped by change events)', () => {
  function setup() {
    const reads: string[] = [];
    const pending: Array<(value: string | undefined) => void> = [];
    const clock = createTestClock();
    const cache = createReadThroughCache<string | undefined>({
      load: (key) => {
        reads.push(key);
        return new Promise((resolve) => pending.push(resolve));
      },
      max: 10,
      ttlMs: 5_000,
      clock,
    });
    return { cache, reads, pending, clock };
  }

  it('reads once for concurrent callers, then serves from memory, absent values included', async () => {
    const { cache, reads, pending } = setup();
    const a = cache.get('k');
    const b = cache.get('k');
    pending.shift()?.(undefined);
    expect(await a).toBeUndefined();
    expect(await b).toBeUndefined();
    expect(await cache.get('k')).toBeUndefined();
    expect(reads).toEqual(['k']);
  });

  it('peeks at what is cached without ever reading, absent values boxed, and nothing once dropped or expired', async () => {
    const { cache, reads, pending, clock } = setup();
    expect(cache.peek('k')).toBeUndefined();
    const loading = cache.get('k');
    expect(cache.peek('k')).toBeUndefined();
    pending.shift()?.(undefined);
    await loading;
    expect(cache.peek('k')).toEqual({ value: undefined });
    cache.delete('k');
    expect(cache.peek('k')).toBeUndefined();
    const again = cache.get('k');
    pending.shift()?.('v');
    await again;
    expect(cache.peek('k')).toEqual({ value: 'v' });
    clock.advance(6);
    expect(cache.peek('k')).toBeUndefined();
    expect(reads).toEqual(['k', 'k']);
  });

  it('does not cache a read that was in flight when the key was invalidated', async () => {
    const { cache, reads, pending } = setup();
    const stale = cache.get('k');
    cache.delete('k');
    pending.shift()?.('old');
    expect(await stale).toBe('old');
    const fresh = cache.get('k');
    pending.shift()?.('new');
    expect(await fresh).toBe('new');
    expect(await cache.get('k')).toBe('new');
    expect(reads).toEqual(['k', 'k']);
  });

  it('expires entries by the injected clock, and clear() drops everything', async () => {
    const { cache, reads, pending, clock } = setup();
    const first = cache.get('k');
    pending.shift()?.('v');
    await first;
    clock.advance(6);
    const again = cache.get('k');
    pending.shift()?.('v2');
    expect(await again).toBe('v2');
    cache.clear();
    expect(cache.size).toBe(0);
    const third = cache.get('k');
    pending.shift()?.('v3');
    expect(await third).toBe('v3');
    expect(reads).toEqual(['k', 'k', 'k']);
  });

  it('with maxAbsent, keeps what was found apart from lookups that found nothing, which cannot push it out', async () => {
    const clock = createTestClock();
    const reads: string[] = [];
    const cache = createReadThroughCache<string | undefined>({
      load: async (key) => {
        reads.push(key);
        return key.startsWith('real') ? `row of ${key}` : undefined;
      },
      max: 3,
      maxAbsent: 2,
      ttlMs: 5_000,
      clock,
    });
    expect(await cache.get('real-1')).toBe('row of real-1');
    for (let i = 0; i < 50; i++) expect(await cache.get(`made-up-${i}`)).toBeUndefined();
    expect(cache.peek('real-1')).toEqual({ value: 'row of real-1' });
    expect(await cache.get('real-1')).toBe('row of real-1');
    // The last absent ones are still answered from memory; older ones are read again.
    expect(cache.peek('made-up-49')).toEqual({ value: undefined });
    expect(cache.peek('made-up-0')).toBeUndefined();
    expect(cache.size).toBe(3);
    expect(reads.filter((k) => k === 'real-1')).toHaveLength(1);
    // Dropped and cleared from both.
    cache.delete('made-up-49');
    expect(cache.peek('made-up-49')).toBeUndefined();
    cache.clear();
    expect(cache.size).toBe(0);
    expect(cache.peek('real-1')).toBeUndefined();
  });
});
