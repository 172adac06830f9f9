import { gt, sql } from 'drizzle-orm';
import type { Executor } from '../../db/client.js';
import { revocations } from '../../db/schema/index.js';

export type RevocationRow = typeof revocations.$inferSelect;

export function createRevocationsRepository(db: Executor) {
  return {
    /** Records (or moves forward) a revocation. */
    async upsert(row: RevocationRow, tx: Executor = db): Promise<void> {
      await tx
        .insert(revocations)
        .values(row)
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
