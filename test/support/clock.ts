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

/** Runs `work` while the app's clock says `at`, then gives the clock back. */
export async function atTime<T>(app: FastifyInstance, at: Date, work: () => Promise<T>): Promise<T> {
  const clock = app.services.clock as Clock;
  const { now, nowMs } = clock;
  const offset = at.getTime() - Date.now();
  Object.assign(
    clock,
    offsetClock(() => offset),
  );
  try {
    return await work();
  } finally {
    Object.assign(clock, { now, nowMs });
  }
}
