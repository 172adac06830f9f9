import { and, desc, eq, gt, isNotNull, isNull, sql } from 'drizzle-orm';
import type { Executor } from '../../db/client.js';
import { mfaChallenges, mfaFactors, mfaRecoveryCodes } from '../../db/schema/index.js';

export type MfaFactorRow = typeof mfaFactors.$inferSelect;
export type MfaChallengeRow = typeof mfaChallenges.$inferSelect;
export type MfaRecoveryCodeRow = typeof mfaRecoveryCodes.$inferSelect;

/** Second factors (TOTP), their recovery codes, and the sign-ins waiting for one. */
export function createMfaRepository(db: Executor) {
  return {
    async findFactor(
      userId: string,
      options: { lock?: boolean } = {},
      tx: Executor = db,
    ): Promise<MfaFactorRow | undefined> {
      const query = tx.select().from(mfaFactors).where(eq(mfaFactors.userId, userId)).limit(1);
      const [row] = options.lock ? await query.for('update') : await query;
      return row;
    },
    /** The newest factor's sealed secret, if any: enough to tell whether KEY_ENCRYPTION_KEY fits. */
    async newestSecret(): Promise<string | undefined> {
      const [row] = await db
        .select({ secret: mfaFactors.secretEncrypted })
        .from(mfaFactors)
        .orderBy(desc(mfaFactors.createdAt))
        .limit(1);
      return row?.secret;
    },
    /** True when the user's sign-ins ask for a second factor (an enrolment proven by a code). */
    /**
     * With `forShare`, the factor stays while the caller's transaction runs: a grant that depends on
     * it waits for a turning-off in progress, or makes that turning-off wait and see the grant.
     */
    async hasVerifiedFactor(userId: string, tx: Executor = db, forShare = false): Promise<boolean> {
      const query = tx
        .select({ id: mfaFactors.id })
        .from(mfaFactors)
        .where(and(eq(mfaFactors.userId, userId), isNotNull(mfaFactors.verifiedAt)))
        .limit(1);
      const [row] = forShare ? await query.for('share') : await query;
      return row !== undefined;
    },
    /** A new, unverified factor in place of an unverified one; none when a verified one exists. */
    async replacePending(
      row: typeof mfaFactors.$inferInsert,
      tx: Executor,
    ): Promise<MfaFactorRow | undefined> {
      await tx
        .delete(mfaFactors)
        .where(and(eq(mfaFactors.userId, row.userId), isNull(mfaFactors.verifiedAt)));
      const [created] = await tx.insert(mfaFactors).values(row).onConflictDoNothing().returning();
      return created;
    },
    async updateFactor(
      id: string,
      patch: Partial<
        Pick<
          MfaFactorRow,
          | 'verifiedAt'
          | 'lastUsedAt'
          | 'lastUsedStep'
          | 'failedAttempts'
          | 'lastFailedAt'
          | 'lockedUntil'
          | 'reuseNoticedAt'
        >
      >,
      tx: Executor,
    ): Promise<void> {
      await tx.update(mfaFactors).set(patch).where(eq(mfaFactors.id, id));
    },
    /**
     * Removes the user's factor, recovery codes and waiting sign-ins: the factor that was there (when
     * it was begun, and verified or not), if any.
     */
    async removeAll(
      userId: string,
      tx: Executor,
    ): Promise<Pick<MfaFactorRow, 'createdAt' | 'verifiedAt'> | undefined> {
      const [removed] = await tx
        .delete(mfaFactors)
        .where(eq(mfaFactors.userId, userId))
        .returning({ createdAt: mfaFactors.createdAt, verifiedAt: mfaFactors.verifiedAt });
      await tx.delete(mfaRecoveryCodes).where(eq(mfaRecoveryCodes.userId, userId));
      await tx.delete(mfaChallenges).where(eq(mfaChallenges.userId, userId));
      return removed;
    },
    async replaceRecoveryCodes(
      userId: string,
      codes: { codeHash: string; salt: string }[],
      at: Date,
      tx: Executor,
    ): Promise<void> {
      await tx.delete(mfaRecoveryCodes).where(eq(mfaRecoveryCodes.userId, userId));
      await tx
        .insert(mfaRecoveryCodes)
        .values(codes.map(({ codeHash, salt }) => ({ userId, codeHash, salt, createdAt: at })));
    },
    /**
     * The user's recovery codes, used or not (ten at most): each is salted on its own, so a code typed
     * is hashed with each row's salt to be found.
     */
    async recoveryCodes(userId: string, tx: Executor): Promise<MfaRecoveryCodeRow[]> {
      return tx.select().from(mfaRecoveryCodes).where(eq(mfaRecoveryCodes.userId, userId));
    },
    /** Marks the recovery code used; false when it was used already. */
    async useRecoveryCode(id: string, at: Date, tx: Executor): Promise<boolean> {
      const used = await tx
        .update(mfaRecoveryCodes)
        .set({ usedAt: at })
        .where(and(eq(mfaRecoveryCodes.id, id), isNull(mfaRecoveryCodes.usedAt)))
        .returning({ id: mfaRecoveryCodes.id });
      return used.length > 0;
    },
    async countUnusedRecoveryCodes(userId: string, tx: Executor = db): Promise<number> {
      const [row] = await tx
        .select({ n: sql<number>`count(*)::int` })
        .from(mfaRecoveryCodes)
        .where(and(eq(mfaRecoveryCodes.userId, userId), isNull(mfaRecoveryCodes.usedAt)));
      return row?.n ?? 0;
    },
    async insertChallenge(
      row: typeof mfaChallenges.$inferInsert,
      tx: Executor = db,
    ): Promise<MfaChallengeRow> {
      const [created] = await tx.insert(mfaChallenges).values(row).returning();
      return created!;
    },
    /** The live (unused, unexpired) challenge of this token, locked for the verification with `lock`. */
    async findLiveChallenge(
      tokenHash: string,
      at: Date,
      tx: Executor,
      options: { lock: boolean },
    ): Promise<MfaChallengeRow | undefined> {
      const query = tx
        .select()
        .from(mfaChallenges)
        .where(
          and(
            eq(mfaChallenges.tokenHash, tokenHash),
            isNull(mfaChallenges.usedAt),
            gt(mfaChallenges.expiresAt, at),
          ),
        )
        .limit(1);
      const [row] = options.lock ? await query.for('update') : await query;
      return row;
    },
    async completeChallenge(id: string, at: Date, sessionId: string, tx: Executor): Promise<void> {
      await tx.update(mfaChallenges).set({ usedAt: at, sessionId }).where(eq(mfaChallenges.id, id));
    },
  };
}

export type MfaRepository = ReturnType<typeof createMfaRepository>;
