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

/** An RFC 3339 date-time (any offset) whose instant falls in years 0001–9999 UTC. */
export const InstantSchema = z.iso.datetime({ offset: true }).refine((s) => isStorableInstant(new Date(s)), {
  message: 'must fall between 0001-01-01 and 9999-12-31 (UTC)',
});
