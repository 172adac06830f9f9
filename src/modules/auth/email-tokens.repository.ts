import { and, desc, eq, gt, inArray, isNull, lt } from 'drizzle-orm';
import type { Executor } from '../../db/client.js';
import { emailTokens } from '../../db/schema/index.js';

export type EmailTokenRow = typeof emailTokens.$inferSelect;
export type EmailTokenPurpose = EmailTokenRow['purpose'];

/**
 * Tokens mailed to users (password reset, email confirmation, email change): one live per user and
 * purpose, except an email change's pair (to the new address and the current one), made together.
 */
export function createEmailTokensRepository(db: Executor) {
  return {
    /** The user's newest token for `purpose`, used or not (what the one-mail-a-minute rule looks at). */
    async latestFor(
      userId: string,
      purpose: EmailTokenPurpose,
      tx: Executor = db,
    ): Promise<EmailTokenRow | undefined> {
      const [row] = await tx
        .select()
        .from(emailTokens)
        .where(and(eq(emailTokens.userId, userId), eq(emailTokens.purpose, purpose)))
        .orderBy(desc(emailTokens.createdAt))
        .limit(1);
      return row;
    },
    /** Replaces every unused token of the user for this purpose with this one: only the newest works. */
    async replace(row: typeof emailTokens.$inferInsert, tx: Executor): Promise<EmailTokenRow> {
      await this.discardUnused(row.userId, row.purpose, tx);
      const [created] = await tx.insert(emailTokens).values(row).returning();
      return created!;
    },
    /**
     * Several tokens of one user and purpose made together (an email change's pair), beside the
     * earlier ones: `discardUnused` with `before` ends those once the new ones are mailed.
     */
    async insertMany(rows: (typeof emailTokens.$inferInsert)[], tx: Executor): Promise<EmailTokenRow[]> {
      return rows.length ? tx.insert(emailTokens).values(rows).returning() : [];
    },
    /** The tokens made together with one (the same user, purpose and instant), used or not. */
    async ofRequest(row: EmailTokenRow, tx: Executor = db): Promise<EmailTokenRow[]> {
      return tx
        .select()
        .from(emailTokens)
        .where(
          and(
            eq(emailTokens.userId, row.userId),
            eq(emailTokens.purpose, row.purpose),
            eq(emailTokens.createdAt, row.createdAt),
          ),
        );
    },
    /**
     * Unused tokens of the user stop working: of one purpose, or (undefined) of every purpose; with
     * `before`, only those made before it.
     */
    async discardUnused(
      userId: string,
      purpose: EmailTokenPurpose | undefined,
      tx: Executor = db,
      before?: Date,
    ): Promise<void> {
      await tx
        .delete(emailTokens)
        .where(
          and(
            eq(emailTokens.userId, userId),
            isNull(emailTokens.usedAt),
            purpose ? eq(emailTokens.purpose, purpose) : undefined,
            before ? lt(emailTokens.createdAt, before) : undefined,
          ),
        );
    },
    /** The token with this hash, whatever its state (used, expired): for saying why it was refused. */
    async findByHash(tokenHash: string, purpose: EmailTokenPurpose, tx: Executor = db) {
      const [row] = await tx
        .select()
        .from(emailTokens)
        .where(and(eq(emailTokens.tokenHash, tokenHash), eq(emailTokens.purpose, purpose)))
        .limit(1);
      return row;
    },
    async findLive(
      tokenHash: string,
      purpose: EmailTokenPurpose,
      at: Date,
      tx: Executor = db,
    ): Promise<EmailTokenRow | undefined> {
      const [row] = await tx
        .select()
        .from(emailTokens)
        .where(
          and(
            eq(emailTokens.tokenHash, tokenHash),
            eq(emailTokens.purpose, purpose),
            isNull(emailTokens.usedAt),
            gt(emailTokens.expiresAt, at),
          ),
        )
        .limit(1);
      return row;
    },
    /**
     * Ends the user's unused tokens of `purpose` at `at` (they expire), keeping their rows: the
     * one-a-minute limit still sees the request they were for (a cancelled email change, asked again
     * and cancelled again, would otherwise mail its new address without limit).
     */
    async expireUnused(userId: string, purpose: EmailTokenPurpose, at: Date, tx: Executor): Promise<void> {
      await tx
        .update(emailTokens)
        .set({ expiresAt: at })
        .where(
          and(
            eq(emailTokens.userId, userId),
            eq(emailTokens.purpose, purpose),
            isNull(emailTokens.usedAt),
            gt(emailTokens.expiresAt, at),
          ),
        );
    },
    /**
     * Ends at `at` the unused email-change links an administrator or a service (`requestedBy`, the id
     * `requested_by` holds) asked for on other users' behalf, keeping their rows: a link opened later
     * is then audited against its account, as an expired one is.
     */
    async expireRequestedBy(requestedBy: string, at: Date, tx: Executor): Promise<void> {
      await tx
        .update(emailTokens)
        .set({ expiresAt: at })
        .where(
          and(
            eq(emailTokens.requestedBy, requestedBy),
            eq(emailTokens.purpose, 'email_change'),
            isNull(emailTokens.usedAt),
            gt(emailTokens.expiresAt, at),
          ),
        );
    },
    /** Marks the token used, once: of concurrent redemptions only one gets the row back. */
    async consume(id: string, at: Date, tx: Executor): Promise<EmailTokenRow | undefined> {
      const [row] = await tx
        .update(emailTokens)
        .set({ usedAt: at })
        .where(and(eq(emailTokens.id, id), isNull(emailTokens.usedAt), gt(emailTokens.expiresAt, at)))
        .returning();
      return row;
    },
    async deleteById(id: string, tx: Executor = db): Promise<void> {
      await tx.delete(emailTokens).where(eq(emailTokens.id, id));
    },
    async deleteByIds(ids: string[], tx: Executor = db): Promise<void> {
      if (ids.length > 0) await tx.delete(emailTokens).where(inArray(emailTokens.id, ids));
    },
  };
}

export type EmailTokensRepository = ReturnType<typeof createEmailTokensRepository>;
