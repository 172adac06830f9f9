import { and, eq, gt, lt, or, type SQL } from 'drizzle-orm';
import type { PgColumn } from 'drizzle-orm/pg-core';
import type { Cursor } from '../lib/pagination.js';

/**
 * The rows past a keyset cursor in (instant, id) order — usually (created_at, id): later ones for
 * ascending lists, earlier ones for descending lists. The id breaks ties between rows of the same
 * millisecond.
 */
export function pastCursor(at: PgColumn, id: PgColumn, cursor: Cursor, order: 'asc' | 'desc'): SQL {
  const beyond = order === 'asc' ? gt : lt;
  return or(beyond(at, cursor.at), and(eq(at, cursor.at), beyond(id, cursor.id)))!;
}
