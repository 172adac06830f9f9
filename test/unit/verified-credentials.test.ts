import { describe, expect, it } from 'vitest';
import { createVerifiedCredentials } from '../../src/lib/verified-credentials.js';

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
});
