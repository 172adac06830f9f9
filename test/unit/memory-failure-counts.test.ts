import { describe, expect, it } from 'vitest';
import { createMemoryFailureCounter, FailureCounts, MEMORY_COUNTS_CAPACITY } from '../../src/lib/throttle.js';
import { createTestClock } from '../support/clock.js';

/**
 * The failure counts an instance keeps in memory (the login lockout without Redis, or while Redis is
 * away): bounded, and a lock is not forgotten because failures of ever new addresses filled the
 * memory (a least-recently-used cache of 100,000 forgot a locked account after 100,000 failures of
 * other addresses, and with it the lock). Through HTTP this would take 100,000 argon2 checks and more
 * than the per-IP limit allows in a test, so it is shown on the counter.
 */

const WINDOW_SECONDS = 3600;

describe('failure counts kept in memory', () => {
  it('keeps a locked account locked while more than its capacity of other addresses fail once each', async () => {
    const clock = createTestClock();
    const max = 20;
    const failures = createMemoryFailureCounter({ max, windowSeconds: WINDOW_SECONDS, clock });
    const victim = 'victim@example.test';
    for (let i = 0; i < max; i++) expect((await failures.reserve(victim)).retryAfter).toBe(0);
    expect((await failures.reserve(victim)).retryAfter).toBeGreaterThan(0);
    for (let i = 0; i <= MEMORY_COUNTS_CAPACITY + 1000; i++)
      await failures.reserve(`flood-${i}@example.test`);
    const refused = await failures.reserve(victim);
    expect(refused.retryAfter).toBeGreaterThan(WINDOW_SECONDS - 60);
  });

  it('stays within its capacity, a new key taking the place of the lowest count, the longest kept first', () => {
    const clock = createTestClock();
    const counts = new FailureCounts({ max: 5, windowMs: WINDOW_SECONDS * 1000, clock, capacity: 10 });
    for (let i = 0; i < 3; i++) counts.increment('three');
    counts.increment('one-old');
    for (let i = 0; i < 2; i++) counts.increment('two');
    for (let i = 0; i < 100; i++) {
      counts.increment(`once-${i}`);
      expect(counts.size).toBeLessThanOrEqual(10);
    }
    expect(counts.get('one-old')).toBeUndefined();
    expect(counts.get('three')?.count).toBe(3);
    expect(counts.get('two')?.count).toBe(2);
    // The newest single failures are kept, the older ones went first.
    expect(counts.get('once-99')?.count).toBe(1);
    expect(counts.get('once-0')).toBeUndefined();

    // A count of 2 goes only once every other key holds 2 or more, and then before the count of 3.
    for (let i = 92; i < 100; i++) counts.increment(`once-${i}`);
    counts.increment('newcomer');
    expect(counts.get('two')).toBeUndefined();
    expect(counts.get('three')?.count).toBe(3);
    expect(counts.size).toBe(10);
  });

  it('takes the place of a count whose window has ended before any live one', () => {
    const clock = createTestClock();
    const counts = new FailureCounts({ max: 3, windowMs: 60_000, clock, capacity: 3 });
    for (let i = 0; i < 3; i++) counts.increment('locked-long-ago');
    clock.advance(61);
    counts.increment('a');
    counts.increment('b');
    counts.increment('c');
    expect(counts.size).toBe(3);
    expect([...counts.entries()].map((e) => e.key).sort()).toEqual(['a', 'b', 'c']);
  });

  it('a guess given back lowers the count, and its priority with it', async () => {
    const clock = createTestClock();
    const failures = createMemoryFailureCounter({
      max: 3,
      windowSeconds: WINDOW_SECONDS,
      clock,
      capacity: 2,
    });
    await failures.reserve('kept');
    const given = await failures.reserve('given-back');
    await failures.reserve('given-back');
    await given.release();
    await failures.reserve('kept');
    // 'given-back' holds 1 now, 'kept' 2: a newcomer takes the place of 'given-back'.
    await failures.reserve('newcomer');
    await failures.reserve('kept');
    expect((await failures.reserve('kept')).retryAfter).toBeGreaterThan(0);
  });
});
