import { and, eq, gt, lt, or, type SQL } from 'drizzle-orm';
import type { PgColumn } from 'drizzle-orm/pg-core';
import type { Cursor } from '../lib/pagination.js';

/**
 * The rows past a keyset cursor in (created_at, id) order: later ones for oldest-first lists, earlier
 * ones for newest-first lists. The id breaks ties between rows created in the same millisecond.
 */
export function pastCursor(createdAt: PgColumn, id: PgColumn, cursor: Cursor, order: 'asc' | 'desc'): SQL {
  const beyond = order === 'asc' ? gt : lt;
  return or(
    beyond(createdAt, cursor.createdAt),
    and(eq(createdAt, cursor.createdAt), beyond(id, cursor.id)),
  )!;
}
