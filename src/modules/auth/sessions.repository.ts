import { and, desc, eq, gt, inArray, isNull, ne, sql } from 'drizzle-orm';
import type { Executor } from '../../db/client.js';
import { pastCursor } from '../../db/keyset.js';
import { mfaChallenges, refreshTokens, sessions } from '../../db/schema/index.js';
import type { Cursor } from '../../lib/pagination.js';

export type SessionRow = typeof sessions.$inferSelect;
export type RefreshTokenRow = typeof refreshTokens.$inferSelect;

/**
 * A user's live sessions at `now`: not ended by a revocation, nor past their idle or absolute expiry.
 * What the user's list shows and what MAX_SESSIONS_PER_USER counts: one definition for both.
 */
const liveSessionsOf = (userId: string, now: Date) => [
  eq(sessions.userId, userId),
  isNull(sessions.revokedAt),
  gt(sessions.expiresAt, now),
  gt(sessions.idleExpiresAt, now),
];

export function createSessionsRepository(db: Executor) {
  return {
    async insertSession(row: typeof sessions.$inferInsert, tx: Executor = db): Promise<SessionRow> {
      const [created] = await tx.insert(sessions).values(row).returning();
      return created!;
    },
    /** A token already there (the same successor handed out again) is left as it is. */
    async insertRefreshToken(row: typeof refreshTokens.$inferInsert, tx: Executor = db): Promise<void> {
      await tx.insert(refreshTokens).values(row).onConflictDoNothing({ target: refreshTokens.tokenHash });
    },
    /**
     * The token and its session. With `lock` (inside a transaction) the session row is locked, so
     * concurrent refreshes of its tokens take turns, and in the order a logout or a user's deletion
     * takes them (the session, then its tokens): the other way round, they deadlocked. The token is
     * then read again: a lock waited for gives the locked row as it is now, but the row joined to it
     * as the statement first saw it, so a refresh that waited for the one rotating the token would
     * see it unrotated, and a replay passed for a first use.
     */
    async findByTokenHash(
      tokenHash: string,
      options: { lock?: boolean } = {},
      tx: Executor = db,
    ): Promise<{ token: RefreshTokenRow; session: SessionRow } | undefined> {
      const query = tx
        .select({ token: refreshTokens, session: sessions })
        .from(refreshTokens)
        .innerJoin(sessions, eq(sessions.id, refreshTokens.sessionId))
        .where(eq(refreshTokens.tokenHash, tokenHash))
        .limit(1);
      if (!options.lock) return (await query)[0];
      const [row] = await query.for('update', { of: sessions });
      if (!row) return undefined;
      // Every change to a token is made under its session's lock, now ours: this read is current.
      const [token] = await tx
        .select()
        .from(refreshTokens)
        .where(eq(refreshTokens.id, row.token.id))
        .limit(1);
      return token && { token, session: row.session };
    },
    /** Once: a token rotated again (within its grace) keeps the time of its first rotation. */
    async markRotated(tokenId: string, at: Date, tx: Executor): Promise<void> {
      await tx
        .update(refreshTokens)
        .set({ rotatedAt: at })
        .where(and(eq(refreshTokens.id, tokenId), isNull(refreshTokens.rotatedAt)));
    },
    async touchSession(id: string, at: Date, idleExpiresAt: Date, tx: Executor): Promise<void> {
      await tx.update(sessions).set({ lastUsedAt: at, idleExpiresAt }).where(eq(sessions.id, id));
    },
    /**
     * The session, share-locked until the transaction ends: a change made with one of its tokens
     * commits before the session can end (logout, password change or reset), or sees it ended.
     */
    async findSessionForShare(id: string, tx: Executor): Promise<SessionRow | undefined> {
      const [row] = await tx.select().from(sessions).where(eq(sessions.id, id)).limit(1).for('share');
      return row;
    },
    async findSession(id: string, tx: Executor = db): Promise<SessionRow | undefined> {
      const [row] = await tx.select().from(sessions).where(eq(sessions.id, id)).limit(1);
      return row;
    },
    /**
     * Newest first, id breaking ties (by when it began, which never changes: a session used while one
     * pages keeps its place); `limit + 1` rows past the cursor, so the caller knows whether a page follows.
     */
    async listLive(
      userId: string,
      now: Date,
      options: { limit: number; cursor?: Cursor | undefined },
      tx: Executor = db,
    ): Promise<SessionRow[]> {
      return tx
        .select()
        .from(sessions)
        .where(
          and(
            ...liveSessionsOf(userId, now),
            options.cursor ? pastCursor(sessions.createdAt, sessions.id, options.cursor, 'desc') : undefined,
          ),
        )
        .orderBy(desc(sessions.createdAt), desc(sessions.id))
        .limit(options.limit + 1);
    },
    /** Revokes live sessions of a user (all, or all but one); returns the ids it revoked. */
    async revokeForUser(
      userId: string,
      at: Date,
      reason: string,
      options: { except?: string } = {},
      tx: Executor = db,
    ): Promise<string[]> {
      const conditions = [eq(sessions.userId, userId), isNull(sessions.revokedAt)];
      if (options.except) conditions.push(ne(sessions.id, options.except));
      const rows = await tx
        .update(sessions)
        .set({ revokedAt: at, revokedReason: reason })
        .where(and(...conditions))
        .returning({ id: sessions.id });
      return rows.map((r) => r.id);
    },
    /**
     * Sign-ins of one user take turns, on every instance, until their transactions end (a
     * transaction-scoped advisory lock): each then sees the sessions the one before opened.
     */
    async lockOpeningFor(userId: string, tx: Executor): Promise<void> {
      await tx.execute(sql`select pg_advisory_xact_lock(hashtext(${`sessions:${userId}`}))`);
    },
    /**
     * Revokes the user's live sessions but the `keep` most recently used (by `last_used_at`: opened or
     * last refreshed; then the newest opened), through `sessions_user_live_idx`; returns the ids it
     * revoked, least recently used first.
     */
    async revokeLeastRecentlyUsed(
      userId: string,
      now: Date,
      keep: number,
      reason: string,
      tx: Executor,
    ): Promise<string[]> {
      const beyond = tx
        .select({ id: sessions.id })
        .from(sessions)
        .where(and(...liveSessionsOf(userId, now)))
        .orderBy(desc(sessions.lastUsedAt), desc(sessions.createdAt), desc(sessions.id))
        .offset(keep);
      const rows = await tx
        .update(sessions)
        .set({ revokedAt: now, revokedReason: reason })
        // Ended meanwhile (a logout committed while this waited for the row): not ended again.
        .where(and(inArray(sessions.id, beyond), isNull(sessions.revokedAt)))
        .returning({ id: sessions.id, lastUsedAt: sessions.lastUsedAt, createdAt: sessions.createdAt });
      return rows
        .sort(
          (a, b) =>
            a.lastUsedAt.getTime() - b.lastUsedAt.getTime() || a.createdAt.getTime() - b.createdAt.getTime(),
        )
        .map((r) => r.id);
    },
    /** Adds authentication methods to a live session's `amr` (its next access tokens carry them). */
    async addAmr(id: string, methods: readonly string[], tx: Executor): Promise<void> {
      const [row] = await tx
        .select({ amr: sessions.amr })
        .from(sessions)
        .where(eq(sessions.id, id))
        .limit(1)
        .for('update');
      if (!row) return;
      const amr = [...row.amr, ...methods.filter((m) => !row.amr.includes(m))];
      await tx.update(sessions).set({ amr }).where(eq(sessions.id, id));
    },
    /** Sign-ins of the user still waiting for a second factor stop waiting: they are half a session. */
    async discardMfaChallenges(userId: string, tx: Executor): Promise<void> {
      await tx
        .delete(mfaChallenges)
        .where(and(eq(mfaChallenges.userId, userId), isNull(mfaChallenges.usedAt)));
    },
    async revokeSession(id: string, at: Date, reason: string, tx: Executor = db): Promise<boolean> {
      const rows = await tx
        .update(sessions)
        .set({ revokedAt: at, revokedReason: reason })
        .where(and(eq(sessions.id, id), isNull(sessions.revokedAt)))
        .returning({ id: sessions.id });
      return rows.length > 0;
    },
  };
}

export type SessionsRepository = ReturnType<typeof createSessionsRepository>;
