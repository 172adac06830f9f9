import { and, desc, eq, gt, isNull } from 'drizzle-orm';
import type { Executor } from '../../db/client.js';
import { passwordResets } from '../../db/schema/index.js';

export type PasswordResetRow = typeof passwordResets.$inferSelect;

export function createPasswordResetsRepository(db: Executor) {
  return {
    /** The user's newest reset token, used or not (what the one-mail-a-minute rule looks at). */
    async latestFor(userId: string, tx: Executor = db): Promise<PasswordResetRow | undefined> {
      const [row] = await tx
        .select()
        .from(passwordResets)
        .where(eq(passwordResets.userId, userId))
        .orderBy(desc(passwordResets.createdAt))
        .limit(1);
      return row;
    },
    /** Replaces every unused token of the user with this one: only the newest link works. */
    async replace(row: typeof passwordResets.$inferInsert, tx: Executor): Promise<PasswordResetRow> {
      await this.discardUnused(row.userId, tx);
      const [created] = await tx.insert(passwordResets).values(row).returning();
      return created!;
    },
    /** Unused tokens of the user stop working (a password change, a reset, a token whose mail failed). */
    async discardUnused(userId: string, tx: Executor = db): Promise<void> {
      await tx
        .delete(passwordResets)
        .where(and(eq(passwordResets.userId, userId), isNull(passwordResets.usedAt)));
    },
    async findLive(tokenHash: string, at: Date, tx: Executor = db): Promise<PasswordResetRow | undefined> {
      const [row] = await tx
        .select()
        .from(passwordResets)
        .where(
          and(
            eq(passwordResets.tokenHash, tokenHash),
            isNull(passwordResets.usedAt),
            gt(passwordResets.expiresAt, at),
          ),
        )
        .limit(1);
      return row;
    },
    /** Marks the token used, once: of concurrent redemptions only one gets the row back. */
    async consume(id: string, at: Date, tx: Executor): Promise<PasswordResetRow | undefined> {
      const [row] = await tx
        .update(passwordResets)
        .set({ usedAt: at })
        .where(
          and(eq(passwordResets.id, id), isNull(passwordResets.usedAt), gt(passwordResets.expiresAt, at)),
        )
        .returning();
      return row;
    },
    async deleteById(id: string, tx: Executor = db): Promise<void> {
      await tx.delete(passwordResets).where(eq(passwordResets.id, id));
    },
  };
}

export type PasswordResetsRepository = ReturnType<typeof createPasswordResetsRepository>;
