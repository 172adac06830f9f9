import { and, asc, eq, inArray, isNull, lt, or, sql } from 'drizzle-orm';
import type { Executor } from '../../db/client.js';
import { pastCursor } from '../../db/keyset.js';
import { signingKeys } from '../../db/schema/index.js';
import type { Cursor } from '../../lib/pagination.js';

export type SigningKeyRow = typeof signingKeys.$inferSelect;
export type NewSigningKey = typeof signingKeys.$inferInsert;

/** An arbitrary constant: the transaction-scoped advisory lock that serialises key changes. */
const SIGNING_KEYS_LOCK = 7_344_021_119;

export function createSigningKeysRepository(db: Executor) {
  return {
    async lock(tx: Executor): Promise<void> {
      await tx.execute(sql`SELECT pg_advisory_xact_lock(${SIGNING_KEYS_LOCK})`);
    },
    /** Every key still published: next, active, and retiring keys whose tokens may still be alive. */
    async listPublished(now: Date, tx: Executor = db): Promise<SigningKeyRow[]> {
      return tx
        .select()
        .from(signingKeys)
        .where(
          or(
            inArray(signingKeys.state, ['next', 'active']),
            and(
              eq(signingKeys.state, 'retiring'),
              or(isNull(signingKeys.publishUntil), sql`${signingKeys.publishUntil} > ${now}`),
            ),
          ),
        )
        .orderBy(asc(signingKeys.createdAt), asc(signingKeys.kid));
    },
    /** Oldest first, kid breaking ties; `limit + 1` rows past the cursor, so the caller knows whether a page follows. */
    async list(
      options: { limit: number; cursor?: Cursor | undefined },
      tx: Executor = db,
    ): Promise<SigningKeyRow[]> {
      return tx
        .select()
        .from(signingKeys)
        .where(
          options.cursor
            ? pastCursor(signingKeys.createdAt, signingKeys.kid, options.cursor, 'asc')
            : undefined,
        )
        .orderBy(asc(signingKeys.createdAt), asc(signingKeys.kid))
        .limit(options.limit + 1);
    },
    async find(kid: string, tx: Executor = db): Promise<SigningKeyRow | undefined> {
      const [row] = await tx.select().from(signingKeys).where(eq(signingKeys.kid, kid)).limit(1);
      return row;
    },
    async insert(row: NewSigningKey, tx: Executor = db): Promise<void> {
      await tx.insert(signingKeys).values(row);
    },
    async update(kid: string, patch: Partial<SigningKeyRow>, tx: Executor = db): Promise<void> {
      await tx.update(signingKeys).set(patch).where(eq(signingKeys.kid, kid));
    },
    /** Retiring keys past their publication window become retired. */
    async retireExpired(now: Date, tx: Executor = db): Promise<number> {
      const rows = await tx
        .update(signingKeys)
        .set({ state: 'retired' })
        .where(and(eq(signingKeys.state, 'retiring'), lt(signingKeys.publishUntil, now)))
        .returning({ kid: signingKeys.kid });
      return rows.length;
    },
  };
}

export type SigningKeysRepository = ReturnType<typeof createSigningKeysRepository>;
