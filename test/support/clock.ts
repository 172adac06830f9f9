import type { FastifyInstance } from 'fastify';
import type { Clock } from '../../src/lib/clock.js';

/** A clock that reads the wall clock plus `offsetMs()`: `now` is derived from `nowMs`, so they agree. */
function offsetClock(offsetMs: () => number): Clock {
  const nowMs = () => Date.now() + offsetMs();
  return { now: () => new Date(nowMs()), nowMs };
}

/** The wall clock plus an offset the test moves, instead of sleeping (pass as `deps.clock`). */
export function createTestClock(): Clock & { advance(seconds: number): void } {
  let offset = 0;
  return {
    ...offsetClock(() => offset),
    advance(seconds: number) {
      offset += seconds * 1000;
    },
  };
}

/**
 * Runs `work` while the app's clock says `at`, then gives the clock back. The clock moves on with the
 * wall clock; with `stepping`, it moves on one millisecond per read instead, so what `work` does
 * stays within the second of `at` however long it takes on a loaded machine (fewer than a thousand
 * reads), and no two reads give the same millisecond.
 */
export async function atTime<T>(
  app: FastifyInstance,
  at: Date,
  work: () => Promise<T>,
  options: { stepping?: boolean } = {},
): Promise<T> {
  const clock = app.services.clock as Clock;
  const { now, nowMs } = clock;
  const offset = at.getTime() - Date.now();
  let reads = 0;
  Object.assign(
    clock,
    options.stepping
      ? { nowMs: () => at.getTime() + reads++, now: () => new Date(at.getTime() + reads++) }
      : offsetClock(() => offset),
  );
  try {
    return await work();
  } finally {
    Object.assign(clock, { now, nowMs });
  }
}
