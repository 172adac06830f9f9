import type { FastifyInstance } from 'fastify';
import type { Clock } from '../../src/lib/clock.js';

/** The wall clock plus an offset the test moves, instead of sleeping (pass as `deps.clock`). */
export function createTestClock(): Clock & { advance(seconds: number): void } {
  let offsetMs = 0;
  return {
    now: () => new Date(Date.now() + offsetMs),
    nowMs: () => Date.now() + offsetMs,
    advance(seconds: number) {
      offsetMs += seconds * 1000;
    },
  };
}

/** Runs `work` while the app's clock says `at`, then gives the clock back. */
export async function atTime<T>(app: FastifyInstance, at: Date, work: () => Promise<T>): Promise<T> {
  const clock = app.services.clock as Clock;
  const { now, nowMs } = clock;
  const offsetMs = at.getTime() - Date.now();
  clock.now = () => new Date(Date.now() + offsetMs);
  clock.nowMs = () => Date.now() + offsetMs;
  try {
    return await work();
  } finally {
    Object.assign(clock, { now, nowMs });
  }
}
