import { z } from 'zod';

/*
 * The instants every part of the service can hold: PostgreSQL's timestamptz stops at year 0001 below
 * (year 0 is refused) and a JavaScript Date past year 9999 serializes as `+010000-…`, which is not
 * RFC 3339. An ISO 8601 input like `9999-12-31T23:59:59-23:59` passes the date-time pattern yet lands
 * in year 10000 in UTC, so the range is checked after the offset is applied.
 */
const MIN_INSTANT = Date.parse('0001-01-01T00:00:00.000Z');
const MAX_INSTANT = Date.parse('9999-12-31T23:59:59.999Z');

export const isStorableInstant = (d: Date): boolean => {
  const t = d.getTime();
  return t >= MIN_INSTANT && t <= MAX_INSTANT;
};

/**
 * zod's ISO date-time pattern (any offset, any fraction of a second), with the `T` and `Z` RFC 3339
 * §5.6 lets be lower case (`2026-12-06t10:00:00z`, which JSON Schema's `date-time` format and
 * `Date.parse` take too). Taken from zod's own JSON Schema of it, so the calendar checks stay zod's.
 */
const RFC3339_DATE_TIME = (() => {
  const { pattern } = z.toJSONSchema(z.iso.datetime({ offset: true })) as { pattern: string };
  const anyCase = pattern.replace(')T(?:', ')[Tt](?:').replace('(?:Z|', '(?:[Zz]|');
  if (anyCase.split('[Tt]').length !== 2 || anyCase.split('[Zz]').length !== 2)
    throw new Error(`zod's date-time pattern changed: ${pattern}`);
  return new RegExp(anyCase);
})();

/** An RFC 3339 date-time (any offset) whose instant falls in years 0001–9999 UTC. */
export const InstantSchema = z
  .string()
  // `abort`: a string that is no date-time is not also said to fall outside the years.
  .regex(RFC3339_DATE_TIME, {
    message: 'must be an RFC 3339 date-time, such as 2026-12-06T10:00:00Z',
    abort: true,
  })
  .meta({ format: 'date-time' })
  .refine((s) => isStorableInstant(new Date(s)), {
    message: 'must fall between 0001-01-01 and 9999-12-31 (UTC)',
  });

/**
 * The earliest millisecond instant at or after an RFC 3339 date-time. `new Date` drops the digits
 * past the millisecond, so `…:39.2559Z` reads as `.255`, before the instant asked for: a lower bound
 * (`since`) would then take in what happened in that part of a millisecond.
 */
export function atOrAfter(s: string): Date {
  const d = new Date(s);
  const beyondMs = /\.\d{3}(\d+)/.exec(s)?.[1];
  return beyondMs && /[1-9]/.test(beyondMs) ? new Date(d.getTime() + 1) : d;
}
