import { gt, sql } from 'drizzle-orm';
import type { Executor } from '../../db/client.js';
import { revocations } from '../../db/schema/index.js';

export type RevocationRow = typeof revocations.$inferSelect;

/** Rows per INSERT: 4,000 parameters, well under PostgreSQL's 65,535. */
const UPSERT_CHUNK = 1000;

export function createRevocationsRepository(db: Executor) {
  return {
    /**
     * Records (or moves forward) revocations, a statement per UPSERT_CHUNK rows: a statement takes at
     * most 65,535 parameters, four a row, and a user with 16,384 sessions was otherwise one that could
     * be neither disabled nor signed out. The (kind, value) pairs must differ.
     */
    async upsert(rows: RevocationRow[], tx: Executor = db): Promise<void> {
      for (let i = 0; i < rows.length; i += UPSERT_CHUNK) {
        await tx
          .insert(revocations)
          .values(rows.slice(i, i + UPSERT_CHUNK))
          .onConflictDoUpdate({
            target: [revocations.kind, revocations.value],
            set: {
              revokedAt: sql`greatest(${revocations.revokedAt}, excluded.revoked_at)`,
              expiresAt: sql`greatest(${revocations.expiresAt}, excluded.expires_at)`,
            },
          });
      }
    },
    async listLive(now: Date, tx: Executor = db): Promise<RevocationRow[]> {
      return tx.select().from(revocations).where(gt(revocations.expiresAt, now));
    },
  };
}

export type RevocationsRepository = ReturnType<typeof createRevocationsRepository>;
