import { and, asc, eq, gt, inArray, isNull, or, sql } from 'drizzle-orm';
import { type Database, type Executor, selectRows } from '../../db/client.js';
import { apiKeys } from '../../db/schema/index.js';
import { pastCursor } from '../../db/keyset.js';
import type { Cursor } from '../../lib/pagination.js';

export type ApiKeyRow = typeof apiKeys.$inferSelect;
export type NewApiKey = typeof apiKeys.$inferInsert;
export type ApiKeyPatch = Partial<
  Pick<
    ApiKeyRow,
    | 'name'
    | 'scopes'
    | 'expiresAt'
    | 'secretHash'
    | 'previousSecretHash'
    | 'previousSecretExpiresAt'
    | 'secretIssuedAt'
    | 'previousSecretIssuedAt'
    | 'lastFour'
    | 'revokedAt'
  >
>;

/**
 * A key descended from `id` (or from any of `id`s): created by it, or by one it created, … (through
 * api_keys_parent_idx).
 */
const descendantOf = (id: string | readonly string[]) => sql`${apiKeys.id} in (
  with recursive tree(id) as (
    select id from api_keys where parent_id in (${sql.join(
      (typeof id === 'string' ? [id] : id).map((one) => sql`${one}::uuid`),
      sql`, `,
    )})
    union
    select k.id from api_keys k join tree t on k.parent_id = t.id
  ) select id from tree)`;

/** Rows per UPDATE when flushing last-use times: well under PostgreSQL's 65535 bind parameters. */
const TOUCH_CHUNK = 5000;

export function createApiKeysRepository(db: Database) {
  // The cache-miss read of the verification hot path: prepared once per connection.
  const byLookupId = db
    .select()
    .from(apiKeys)
    .where(eq(apiKeys.lookupId, sql.placeholder('lookupId')))
    .limit(1)
    .prepare('api_keys_by_lookup_id');

  return {
    async insert(row: NewApiKey, tx: Executor = db): Promise<ApiKeyRow> {
      const [created] = await tx.insert(apiKeys).values(row).returning();
      return created!;
    },
    async findByLookupId(lookupId: string): Promise<ApiKeyRow | undefined> {
      const [row] = await byLookupId.execute({ lookupId });
      return row;
    },
    async findById(id: string, tx: Executor = db): Promise<ApiKeyRow | undefined> {
      const [row] = await tx.select().from(apiKeys).where(eq(apiKeys.id, id)).limit(1);
      return row;
    },
    /** Share-locked: a revocation waits for what is decided on it (a key it creates), or is read here. */
    async findByIdForShare(id: string, tx: Executor): Promise<ApiKeyRow | undefined> {
      const [row] = await tx.select().from(apiKeys).where(eq(apiKeys.id, id)).limit(1).for('share');
      return row;
    },
    /** The row locked for the rest of `tx`, so concurrent rotations and revocations take turns. */
    async findByIdForUpdate(id: string, tx: Executor): Promise<ApiKeyRow | undefined> {
      const [row] = await tx.select().from(apiKeys).where(eq(apiKeys.id, id)).limit(1).for('update');
      return row;
    },
    /**
     * Whether `ancestorId` minted `id`, or minted a key that did, … (up `id`'s line of `parent_id`s,
     * which never change: read unlocked).
     */
    async isAncestor(ancestorId: string, id: string, tx: Executor): Promise<boolean> {
      const rows = await selectRows<{ one: number }>(
        tx,
        sql`with recursive line(id, parent_id) as (
          select id, parent_id from api_keys where id = ${id}::uuid
          union
          select k.id, k.parent_id from api_keys k join line l on k.id = l.parent_id
        ) select 1 as one from line where parent_id = ${ancestorId}::uuid limit 1`,
      );
      return rows.length > 0;
    },
    /**
     * Creations of keys for one owner take turns, on every instance, until their transactions end (a
     * transaction-scoped advisory lock): each then counts the keys the one before created.
     */
    async lockCreationFor(ownerId: string, tx: Executor): Promise<void> {
      await tx.execute(sql`select pg_advisory_xact_lock(hashtext(${`api_keys:${ownerId}`}))`);
    },
    /**
     * How many live keys (unrevoked, unexpired at `now`) the owner has, counting no further than
     * `upTo` (through `api_keys_owner_idx`).
     */
    async countLiveOfOwner(ownerId: string, now: Date, upTo: number, tx: Executor): Promise<number> {
      const live = tx
        .select({ one: sql`1` })
        .from(apiKeys)
        .where(
          and(
            eq(apiKeys.ownerId, ownerId),
            isNull(apiKeys.revokedAt),
            or(isNull(apiKeys.expiresAt), gt(apiKeys.expiresAt, now)),
          ),
        )
        .limit(upTo)
        .as('live');
      const [row] = await tx.select({ n: sql<number>`count(*)::int` }).from(live);
      return row?.n ?? 0;
    },
    /**
     * Unrevoked keys of an owner, oldest first, `limit + 1` rows for pagination: with `liveAt`, only
     * those unexpired at that instant, left out by the query itself so that the cursor after a page
     * continues past them.
     */
    async listUnrevokedByOwner(
      ownerId: string,
      options: { limit: number; cursor?: Cursor | undefined; liveAt?: Date | undefined },
      tx: Executor = db,
    ): Promise<ApiKeyRow[]> {
      const conditions = [eq(apiKeys.ownerId, ownerId), isNull(apiKeys.revokedAt)];
      if (options.liveAt)
        conditions.push(or(isNull(apiKeys.expiresAt), gt(apiKeys.expiresAt, options.liveAt))!);
      if (options.cursor) conditions.push(pastCursor(apiKeys.createdAt, apiKeys.id, options.cursor, 'asc'));
      return tx
        .select()
        .from(apiKeys)
        .where(and(...conditions))
        .orderBy(asc(apiKeys.createdAt), asc(apiKeys.id))
        .limit(options.limit + 1);
    },
    async update(
      id: string,
      patch: ApiKeyPatch,
      at: Date,
      tx: Executor = db,
    ): Promise<ApiKeyRow | undefined> {
      const [row] = await tx
        .update(apiKeys)
        .set({ ...patch, updatedAt: at })
        .where(eq(apiKeys.id, id))
        .returning();
      return row;
    },
    /** Revokes every live key of the owner; the revoked rows. */
    async revokeAllOfOwner(ownerId: string, at: Date, tx: Executor): Promise<ApiKeyRow[]> {
      return tx
        .update(apiKeys)
        .set({ revokedAt: at, updatedAt: at })
        .where(and(eq(apiKeys.ownerId, ownerId), isNull(apiKeys.revokedAt)))
        .returning();
    },
    /**
     * Revokes every live key descended from `id` (created by it, or by one it created, …): a key that
     * is revoked takes the keys it minted with it. The revoked rows. One pass: callers repeat it until
     * one revokes none, since a pass that waited on a key locked by a creation under it does not see
     * the key that creation made.
     */
    async revokeDescendants(
      id: string | readonly string[],
      at: Date,
      tx: Executor = db,
    ): Promise<ApiKeyRow[]> {
      return tx
        .update(apiKeys)
        .set({ revokedAt: at, updatedAt: at })
        .where(and(isNull(apiKeys.revokedAt), descendantOf(id)))
        .returning();
    },
    /**
     * Brings every live key descended from `id` that would outlive `expiresAt` (a later expiry, or
     * none) to `expiresAt`: a key expires no later than the key that minted it. The rows changed.
     */
    async capDescendantsExpiry(id: string, expiresAt: Date, at: Date, tx: Executor): Promise<ApiKeyRow[]> {
      return tx
        .update(apiKeys)
        .set({ expiresAt, updatedAt: at })
        .where(
          and(
            isNull(apiKeys.revokedAt),
            or(isNull(apiKeys.expiresAt), gt(apiKeys.expiresAt, expiresAt)),
            descendantOf(id),
          ),
        )
        .returning();
    },
    /**
     * Every live key (unrevoked, unexpired at `now`) descended from `id`, as the statement finds them,
     * unlocked: what a change to its scopes looks at before locking the ones it changes.
     */
    async liveDescendants(id: string, now: Date, tx: Executor): Promise<ApiKeyRow[]> {
      return tx
        .select()
        .from(apiKeys)
        .where(
          and(
            isNull(apiKeys.revokedAt),
            or(isNull(apiKeys.expiresAt), gt(apiKeys.expiresAt, now)),
            descendantOf(id),
          ),
        );
    },
    /** The unrevoked keys among `ids`, locked for the rest of `tx` and read as they are once locked. */
    async findUnrevokedForUpdate(ids: readonly string[], tx: Executor): Promise<ApiKeyRow[]> {
      if (ids.length === 0) return [];
      return tx
        .select()
        .from(apiKeys)
        .where(and(inArray(apiKeys.id, [...ids]), isNull(apiKeys.revokedAt)))
        .orderBy(asc(apiKeys.id))
        .for('update');
    },
    /** Gives each unrevoked key of `changes` its scopes, in one statement; the rows changed. */
    async setScopes(
      changes: ReadonlyArray<{ id: string; scopes: readonly string[] }>,
      at: Date,
      tx: Executor,
    ): Promise<ApiKeyRow[]> {
      if (changes.length === 0) return [];
      const values = sql.join(
        changes.map(
          (c) =>
            sql`(${c.id}::uuid, array[${sql.join(
              c.scopes.map((s) => sql`${s}`),
              sql`, `,
            )}]::text[])`,
        ),
        sql`, `,
      );
      return tx
        .update(apiKeys)
        .set({ scopes: sql`v.scopes`, updatedAt: at })
        .from(sql`(values ${values}) as v(id, scopes)`)
        .where(and(eq(apiKeys.id, sql`v.id`), isNull(apiKeys.revokedAt)))
        .returning();
    },
    /** Revokes the unrevoked keys among `ids`; the rows revoked. */
    async revokeMany(ids: readonly string[], at: Date, tx: Executor): Promise<ApiKeyRow[]> {
      if (ids.length === 0) return [];
      return tx
        .update(apiKeys)
        .set({ revokedAt: at, updatedAt: at })
        .where(and(inArray(apiKeys.id, [...ids]), isNull(apiKeys.revokedAt)))
        .returning();
    },
    /** Records last-use times in one statement per chunk; never moves a time backwards. */
    async touchLastUsed(uses: Array<{ id: string; at: Date }>, tx: Executor = db): Promise<void> {
      for (let i = 0; i < uses.length; i += TOUCH_CHUNK) {
        const values = sql.join(
          uses.slice(i, i + TOUCH_CHUNK).map((u) => sql`(${u.id}::uuid, ${u.at.toISOString()}::timestamptz)`),
          sql`, `,
        );
        await tx.execute(sql`
          UPDATE ${apiKeys} SET last_used_at = GREATEST(COALESCE(${apiKeys.lastUsedAt}, v.at), v.at)
          FROM (VALUES ${values}) AS v(id, at)
          WHERE ${apiKeys.id} = v.id`);
      }
    },
  };
}

export type ApiKeysRepository = ReturnType<typeof createApiKeysRepository>;
