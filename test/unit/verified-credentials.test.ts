import { LRUCache } from 'lru-cache';
import { describe, expect, it, vi } from 'vitest';
import { createVerifiedCredentials } from '../../src/lib/verified-credentials.js';

/** Every way to walk an LRUCache's entries. */
const WALKS = [
  'forEach',
  'rforEach',
  'entries',
  'rentries',
  'keys',
  'rkeys',
  'values',
  'rvalues',
  'find',
  'dump',
] as const;

describe('verified credentials (by digest, dropped on change)', () => {
  const now = 1_000_000;

  it('remembers whose credential a digest is, never the credential itself', () => {
    const cache = createVerifiedCredentials({ max: 10, ttlMs: 60_000 });
    const key = cache.keyOf('pci_abc', 'pcs_secret');
    expect(key).not.toContain('pcs_secret');
    expect(key).toBe(cache.keyOf('pci_abc', 'pcs_secret'));
    expect(key).not.toBe(cache.keyOf('pci_abc', 'pcs_secreT'));
    cache.remember(key, { owner: 'pci_abc', previous: false }, cache.generation, now);
    expect(cache.get(key, now + 1)).toEqual({
      owner: 'pci_abc',
      previous: false,
      validUntilMs: now + 60_000,
    });
  });

  it('ends entries at the TTL or at the end of a previous secret’s grace, whichever is first', () => {
    const cache = createVerifiedCredentials({ max: 10, ttlMs: 60_000 });
    cache.remember('a', { owner: 'x', previous: false }, cache.generation, now);
    cache.remember('b', { owner: 'x', previous: true, endsAtMs: now + 5_000 }, cache.generation, now);
    expect(cache.get('b', now + 4_999)).toBeDefined();
    expect(cache.get('b', now + 5_000)).toBeUndefined();
    expect(cache.get('a', now + 59_999)).toBeDefined();
    expect(cache.get('a', now + 60_000)).toBeUndefined();
  });

  it('forgets an owner’s entries only, and ignores answers computed across a change', () => {
    const cache = createVerifiedCredentials({ max: 10, ttlMs: 60_000 });
    cache.remember('x1', { owner: 'x', previous: false }, cache.generation, now);
    cache.remember('y1', { owner: 'y', previous: false }, cache.generation, now);
    const before = cache.generation;
    cache.forget('x');
    expect(cache.get('x1', now)).toBeUndefined();
    expect(cache.get('y1', now)).toBeDefined();
    // A check that read the row before the change must not be remembered after it.
    cache.remember('x2', { owner: 'x', previous: false }, before, now);
    expect(cache.get('x2', now)).toBeUndefined();
    cache.clear();
    expect(cache.get('y1', now)).toBeUndefined();
  });

  it('forgets an owner by its own entries, never by walking the whole cache', () => {
    // One event per key a transaction revoked (a user's deletion, a parent key's descendants): a
    // scan of all 10 000 entries per event held every instance's event loop ~0.8 ms each, seconds
    // for a user with thousands of keys. Counted, not timed: no walk of the cache at all.
    const cache = createVerifiedCredentials({ max: 10_000, ttlMs: 60_000 });
    for (let i = 0; i < 10_000; i++)
      cache.remember(`k${i}`, { owner: `o${i % 5_000}`, previous: false }, cache.generation, now);
    const walks = WALKS.map((name) => vi.spyOn(LRUCache.prototype, name));
    try {
      for (let i = 0; i < 2_000; i++) cache.forget(`gone${i}`);
      cache.forget('o1');
      for (const walk of walks) expect(walk).not.toHaveBeenCalled();
    } finally {
      for (const walk of walks) walk.mockRestore();
    }
    expect(cache.get('k1', now)).toBeUndefined();
    expect(cache.get('k5001', now)).toBeUndefined();
    expect(cache.get('k2', now)).toBeDefined();
  });

  it('keeps its owner index in step with entries replaced, evicted, expired and cleared', () => {
    const cache = createVerifiedCredentials({ max: 2, ttlMs: 60_000 });
    cache.remember('a', { owner: 'x', previous: false }, cache.generation, now);
    // Replaced under another owner: forgetting the first owner leaves it.
    cache.remember('a', { owner: 'y', previous: false }, cache.generation, now);
    cache.forget('x');
    expect(cache.get('a', now)?.owner).toBe('y');
    // Evicted (max 2), then remembered again: forgetting its owner drops it.
    cache.remember('b', { owner: 'y', previous: false }, cache.generation, now);
    cache.remember('c', { owner: 'z', previous: false }, cache.generation, now);
    expect(cache.get('a', now)).toBeUndefined();
    cache.remember('a', { owner: 'y', previous: false }, cache.generation, now);
    cache.forget('y');
    expect(cache.get('a', now)).toBeUndefined();
    expect(cache.get('b', now)).toBeUndefined();
    // Expired on read, then remembered again under the same owner.
    cache.remember('d', { owner: 'z', previous: true, endsAtMs: now + 1 }, cache.generation, now);
    expect(cache.get('d', now + 1)).toBeUndefined();
    cache.remember('d', { owner: 'z', previous: false }, cache.generation, now);
    cache.clear();
    cache.remember('e', { owner: 'z', previous: false }, cache.generation, now);
    cache.forget('z');
    expect(cache.get('e', now)).toBeUndefined();
  });
});
