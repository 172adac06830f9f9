import { z } from 'zod';
import { AppError } from './errors.js';
import { InstantSchema } from './instant.js';

export const PaginationQuerySchema = z.object({
  limit: z.coerce.number().int().min(1).max(200).default(50).describe('Page size (1–200, default 50)'),
  cursor: z.string().max(512).optional().describe('Opaque cursor from the previous page’s `next_cursor`'),
});

export const pageOf = <T extends z.ZodType>(item: T) =>
  z.object({ data: z.array(item), next_cursor: z.string().nullable() });

/** Keyset cursor over (created_at, id): stable while rows are added. */
export interface Cursor {
  createdAt: Date;
  id: string;
}

export function encodeCursor(c: Cursor): string {
  return Buffer.from(JSON.stringify([c.createdAt.toISOString(), c.id])).toString('base64url');
}

export function decodeCursor(raw: string | undefined): Cursor | undefined {
  if (raw === undefined) return undefined;
  try {
    const parsed: unknown = JSON.parse(Buffer.from(raw, 'base64url').toString('utf8'));
    const tuple = z.tuple([InstantSchema, z.uuid()]).parse(parsed);
    return { createdAt: new Date(tuple[0]), id: tuple[1] };
  } catch {
    throw new AppError('validation_failed', {
      detail: 'The cursor is not one this service issued',
      errors: [{ field: 'query.cursor', message: 'invalid cursor' }],
    });
  }
}

/** Given `limit + 1` rows, the page and the cursor of the next one. */
export function paginate<T extends { createdAt: Date; id: string }>(rows: T[], limit: number) {
  const page = rows.slice(0, limit);
  const last = page[page.length - 1];
  return {
    page,
    nextCursor: rows.length > limit && last ? encodeCursor({ createdAt: last.createdAt, id: last.id }) : null,
  };
}
