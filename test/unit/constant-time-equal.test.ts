import crypto from 'node:crypto';
import { syncBuiltinESMExports } from 'node:module';
import { describe, expect, it } from 'vitest';
import { constantTimeEqual, digestsEqual, keyedHash } from '../../src/lib/crypto.js';

/**
 * The lengths of what each timingSafeEqual call of `work` compared: the comparison's work is the only
 * work that may vary. Wrapped on node:crypto itself, which the module's named import follows
 * (syncBuiltinESMExports), and put back after.
 */
function comparisonsOf(work: () => void): Array<[number, number]> {
  const original = crypto.timingSafeEqual;
  const seen: Array<[number, number]> = [];
  crypto.timingSafeEqual = (a: NodeJS.ArrayBufferView, b: NodeJS.ArrayBufferView) => {
    seen.push([a.byteLength, b.byteLength]);
    return original(a, b);
  };
  syncBuiltinESMExports();
  try {
    work();
  } finally {
    crypto.timingSafeEqual = original;
    syncBuiltinESMExports();
  }
  return seen;
}

describe('constantTimeEqual', () => {
  it('answers equality of any two strings, whatever their lengths', () => {
    expect(constantTimeEqual('', '')).toBe(true);
    expect(constantTimeEqual('abc', 'abc')).toBe(true);
    expect(constantTimeEqual('naïve ✓', 'naïve ✓')).toBe(true);
    expect(constantTimeEqual('abc', 'abd')).toBe(false);
    expect(constantTimeEqual('abc', 'abcd')).toBe(false);
    expect(constantTimeEqual('abc', 'abc\u0000')).toBe(false);
    expect(constantTimeEqual('', 'a')).toBe(false);
    expect(constantTimeEqual('a'.repeat(10_000), 'a'.repeat(10_000))).toBe(true);
  });

  it('does the same comparison whether the lengths match or not, and however long the strings are', () => {
    const pairs: Array<[string, string]> = [
      ['pak_secret', 'pak_secret'],
      ['pak_secret', 'pak_secreT'],
      ['pak_secret', 'pak_secret_longer'],
      ['pak_secret_longer', 'pak'],
      ['', 'x'.repeat(300)],
    ];
    for (const [a, b] of pairs) {
      // One comparison of two fixed-size digests: not of the strings, nor of a string with itself.
      expect(
        comparisonsOf(() => constantTimeEqual(a, b)),
        `${a.length} vs ${b.length}`,
      ).toEqual([[32, 32]]);
    }
  });
});

describe('digestsEqual (two digests of one fixed length)', () => {
  it('compares keyed hashes as they are', () => {
    const pepper = Buffer.alloc(32, 7);
    const stored = keyedHash(pepper, 'the secret');
    const answers: boolean[] = [];
    const seen = comparisonsOf(() => {
      answers.push(digestsEqual(keyedHash(pepper, 'the secret'), stored));
      answers.push(digestsEqual(keyedHash(pepper, 'the secreT'), stored));
    });
    expect(answers).toEqual([true, false]);
    expect(seen).toEqual([
      [43, 43],
      [43, 43],
    ]);
    // A stored value of another length (malformed) is no match.
    expect(digestsEqual(stored, stored.slice(1))).toBe(false);
  });
});
