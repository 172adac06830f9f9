/** Injected wherever time matters, so tests move time instead of sleeping. */
export interface Clock {
  now(): Date;
  /** `now()` in milliseconds, without making a Date: what the per-request checks compare. */
  nowMs(): number;
}

export const systemClock: Clock = { now: () => new Date(), nowMs: Date.now };

export const epochSeconds = (d: Date) => Math.floor(d.getTime() / 1000);
export const addSeconds = (d: Date, s: number) => new Date(d.getTime() + s * 1000);
