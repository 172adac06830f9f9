import { randomUUID } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { uuidV7, uuidV7Ms } from '../../src/lib/crypto.js';

describe('UUID version 7 (access tokens’ jti)', () => {
  it('carries its millisecond, is a well-formed version 7 variant 10 UUID, and is unique', () => {
    const ms = Date.UTC(2026, 11, 6, 0, 45, 12, 345);
    const ids = Array.from({ length: 1000 }, () => uuidV7(ms));
    for (const id of ids.slice(0, 50)) {
      expect(id).toMatch(/^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
      expect(uuidV7Ms(id)).toBe(ms);
    }
    expect(new Set(ids).size).toBe(ids.length);
    // Sorted as text, they sort by time.
    expect(uuidV7(ms + 1) > uuidV7(ms)).toBe(true);
  });

  it('reads no time from anything else: a version 4 UUID, a short or malformed string', () => {
    expect(uuidV7Ms(randomUUID())).toBeUndefined();
    expect(uuidV7Ms('')).toBeUndefined();
    expect(uuidV7Ms('0192f3a1b2c3-7abc-8def-0123456789abcdef0')).toBeUndefined();
    expect(uuidV7Ms('zzzzzzzz-zzzz-7zzz-8zzz-zzzzzzzzzzzz')).toBeUndefined();
  });
});
