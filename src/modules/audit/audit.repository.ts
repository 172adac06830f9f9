import { and, desc, eq, gte, inArray, lt } from 'drizzle-orm';
import type { Executor } from '../../db/client.js';
import { auditEvents } from '../../db/schema/index.js';
import { pastCursor } from '../../db/keyset.js';
import type { Cursor } from '../../lib/pagination.js';

export type AuditEventRow = typeof auditEvents.$inferSelect;
export type NewAuditEvent = typeof auditEvents.$inferInsert;

export function createAuditRepository(db: Executor) {
  return {
    /** One or many events; many go in statements of at most 1,000 rows (PostgreSQL takes 65,535 parameters). */
    async insert(events: NewAuditEvent | NewAuditEvent[], tx: Executor = db): Promise<void> {
      const all = Array.isArray(events) ? events : [events];
      for (let i = 0; i < all.length; i += 1000) await tx.insert(auditEvents).values(all.slice(i, i + 1000));
    },
    /** Newest first; the cursor continues below the last row of the previous page. */
    async list(
      filter: {
        actorId?: string;
        credentialId?: string;
        subjectId?: string;
        type?: string;
        /** Only events of these types. */
        types?: readonly string[];
        outcome?: 'success' | 'failure';
        since?: Date;
        /** Only events stamped before this instant. */
        before?: Date;
        limit: number;
        cursor?: Cursor;
      },
      tx: Executor = db,
    ): Promise<AuditEventRow[]> {
      const conditions = [];
      if (filter.actorId) conditions.push(eq(auditEvents.actorId, filter.actorId));
      if (filter.credentialId) conditions.push(eq(auditEvents.credentialId, filter.credentialId));
      if (filter.subjectId) conditions.push(eq(auditEvents.subjectId, filter.subjectId));
      if (filter.outcome) conditions.push(eq(auditEvents.outcome, filter.outcome));
      if (filter.type) conditions.push(eq(auditEvents.type, filter.type));
      if (filter.types) conditions.push(inArray(auditEvents.type, [...filter.types]));
      if (filter.since) conditions.push(gte(auditEvents.createdAt, filter.since));
      if (filter.before) conditions.push(lt(auditEvents.createdAt, filter.before));
      if (filter.cursor)
        conditions.push(pastCursor(auditEvents.createdAt, auditEvents.id, filter.cursor, 'desc'));
      return tx
        .select()
        .from(auditEvents)
        .where(conditions.length ? and(...conditions) : undefined)
        .orderBy(desc(auditEvents.createdAt), desc(auditEvents.id))
        .limit(filter.limit + 1);
    },
  };
}

export type AuditRepository = ReturnType<typeof createAuditRepository>;
