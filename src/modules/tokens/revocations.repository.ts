import { gt, sql } from 'drizzle-orm';
import type { Executor } from '../../db/client.js';
import { revocations } from '../../db/schema/index.js';

export type RevocationRow = typeof revocations.$inferSelect;

export function createRevocationsRepository(db: Executor) {
  return {
    /** Records (or moves forward) revocations, in one statement; the (kind, value) pairs must differ. */
    async upsert(rows: RevocationRow[], tx: Executor = db): Promise<void> {
      if (rows.length === 0) return;
      await tx
        .insert(revocations)
        .values(rows)
        .onConflictDoUpdate({
          target: [revocations.kind, revocations.value],
          set: {
            revokedAt: sql`greatest(${revocations.revokedAt}, excluded.revoked_at)`,
            expiresAt: sql`greatest(${revocations.expiresAt}, excluded.expires_at)`,
          },
        });
    },
    async listLive(now: Date, tx: Executor = db): Promise<RevocationRow[]> {
      return tx.select().from(revocations).where(gt(revocations.expiresAt, now));
    },
  };
}

export type RevocationsRepository = ReturnType<typeof createRevocationsRepository>;
