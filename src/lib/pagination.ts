import { z } from 'zod';
import { AppError } from './errors.js';
import { InstantSchema } from './instant.js';

const LIMIT_MESSAGE = 'must be a whole number from 1 to 200, in decimal digits';

export const PaginationQuerySchema = z.object({
  // Decimal digits only: Number() would also take `0x10`, `1e1` and ` 1` (refused as not a number).
  limit: z
    .preprocess(
      (v) => (typeof v === 'string' && !/^[0-9]{1,3}$/.test(v) ? Number.NaN : v),
      z.coerce
        .number({ error: LIMIT_MESSAGE })
        .int({ error: LIMIT_MESSAGE })
        .min(1, { error: LIMIT_MESSAGE })
        .max(200, { error: LIMIT_MESSAGE })
        .default(50),
    )
    .describe('Page size (1–200, default 50)'),
  cursor: z.string().max(512).optional().describe('Opaque cursor from the previous page’s `next_cursor`'),
});

export const pageOf = <T extends z.ZodType>(item: T) =>
  z.object({ data: z.array(item), next_cursor: z.string().nullable() });

/**
 * A cursor is the sort key of the last row served, as base64url JSON: opaque to clients, and checked
 * against the list's key schema when it comes back (anything else is 400 naming query.cursor). It is
 * not signed: a well-formed key the service did not issue just starts the page elsewhere.
 */
function encodeKey(key: readonly string[]): string {
  return Buffer.from(JSON.stringify(key)).toString('base64url');
}

function decodeKey<T>(raw: string | undefined, schema: z.ZodType<T>): T | undefined {
  if (raw === undefined) return undefined;
  try {
    const key: unknown = JSON.parse(Buffer.from(raw, 'base64url').toString('utf8'));
    // No key this service issues holds a NUL, which PostgreSQL text cannot hold either: a forged one
    // is refused here, not by the database in the query it is compared in.
    if (Array.isArray(key) && key.some((part) => typeof part === 'string' && part.includes('\u0000')))
      throw new Error('NUL in a cursor');
    return schema.parse(key);
  } catch {
    throw invalidCursor();
  }
}

/** The 400 for a cursor this service did not issue: a malformed one, or a well-formed one a list refuses. */
export function invalidCursor(): AppError {
  return new AppError('validation_failed', {
    detail: 'The cursor is not one this service issued',
    errors: [{ field: 'query.cursor', message: 'invalid cursor' }],
  });
}

/**
 * Keyset cursor over (an instant, a unique id): (created_at, id) for most lists, stable while rows are
 * added; the id breaks ties between rows of the same millisecond.
 */
export interface Cursor {
  at: Date;
  id: string;
}

export function encodeCursor(c: Cursor): string {
  return encodeKey([c.at.toISOString(), c.id]);
}

/**
 * `id` checks the tie-breaking key: a UUID (any the database holds, as `uuidInput`), unless the list's
 * rows are keyed otherwise (a signing key's kid).
 */
export function decodeCursor(raw: string | undefined, id: z.ZodType<string> = z.guid()): Cursor | undefined {
  const key = decodeKey(raw, z.tuple([InstantSchema, id]));
  return key && { at: new Date(key[0]), id: key[1] };
}

/**
 * A (created_at, id) cursor that carries an instant of the read it continues as well, so that every
 * page of the read answers the same one (the audit log's `complete_until`). Decoding takes the plain
 * two-part cursor too (`within` is then undefined).
 */
export function encodeCursorWithin(c: Cursor, within: Date): string {
  return encodeKey([c.at.toISOString(), c.id, within.toISOString()]);
}

export function decodeCursorWithin(raw: string | undefined): (Cursor & { within?: Date }) | undefined {
  const key = decodeKey(
    raw,
    z.union([z.tuple([InstantSchema, z.guid()]), z.tuple([InstantSchema, z.guid(), InstantSchema])]),
  );
  if (!key) return undefined;
  const [at, id, within] = key;
  return { at: new Date(at), id, ...(within !== undefined ? { within: new Date(within) } : {}) };
}

/** Cursor of a list ordered by a unique name (roles, the permission catalogue): the last name served. */
export function encodeNameCursor(name: string): string {
  return encodeKey([name]);
}

/** `name` checks the name: any short string, or one of a fixed list's names. */
export function decodeNameCursor(
  raw: string | undefined,
  name: z.ZodType<string> = z.string().min(1).max(200),
): string | undefined {
  return decodeKey(raw, z.tuple([name]))?.[0];
}

/** Given up to `limit + 1` rows in list order, the page and the cursor after its last row (null at the end). */
export function pageBy<T>(rows: T[], limit: number, cursorOf: (last: T) => string) {
  const page = rows.slice(0, limit);
  const last = page[page.length - 1];
  return { page, nextCursor: rows.length > limit && last !== undefined ? cursorOf(last) : null };
}

/** pageBy for lists in (created_at, id) order. */
export function paginate<T extends { createdAt: Date; id: string }>(rows: T[], limit: number) {
  return pageBy(rows, limit, (last) => encodeCursor({ at: last.createdAt, id: last.id }));
}
