import { and, asc, eq, inArray, sql } from 'drizzle-orm';
import type { Executor } from '../../db/client.js';
import { clients, userRoles } from '../../db/schema/index.js';
import { pastCursor } from '../../db/keyset.js';
import type { Cursor } from '../../lib/pagination.js';

export type ClientRow = typeof clients.$inferSelect;
export type NewClient = typeof clients.$inferInsert;
export type ClientPatch = Partial<
  Pick<
    ClientRow,
    | 'name'
    | 'description'
    | 'scopes'
    | 'audiences'
    | 'accessTokenTtl'
    | 'status'
    | 'actsForCreator'
    | 'disabledByAdministrator'
    | 'secretHash'
    | 'previousSecretHash'
    | 'previousSecretExpiresAt'
  >
>;

export function createClientsRepository(db: Executor) {
  return {
    async insert(row: NewClient, tx: Executor = db): Promise<ClientRow> {
      const [created] = await tx.insert(clients).values(row).returning();
      return created!;
    },
    async findById(id: string, tx: Executor = db): Promise<ClientRow | undefined> {
      const [row] = await tx.select().from(clients).where(eq(clients.id, id)).limit(1);
      return row;
    },
    async findByClientId(clientId: string, tx: Executor = db): Promise<ClientRow | undefined> {
      const [row] = await tx.select().from(clients).where(eq(clients.clientId, clientId)).limit(1);
      return row;
    },
    /** The row locked for the rest of the transaction, so concurrent changes take turns. */
    async findByIdForUpdate(id: string, tx: Executor): Promise<ClientRow | undefined> {
      const [row] = await tx.select().from(clients).where(eq(clients.id, id)).limit(1).for('update');
      return row;
    },
    /**
     * Registrations of clients for one creator take turns, on every instance, until their
     * transactions end (a transaction-scoped advisory lock): each then counts the clients the one
     * before registered.
     */
    async lockCreationFor(userId: string, tx: Executor): Promise<void> {
      await tx.execute(sql`select pg_advisory_xact_lock(hashtext(${`clients:${userId}`}))`);
    },
    /** How many clients (active or disabled) the user registered, counting no further than `upTo`. */
    async countOfCreator(userId: string, upTo: number, tx: Executor): Promise<number> {
      const mine = tx
        .select({ one: sql`1` })
        .from(clients)
        .where(eq(clients.createdBy, userId))
        .limit(upTo)
        .as('mine');
      const [row] = await tx.select({ n: sql<number>`count(*)::int` }).from(mine);
      return row?.n ?? 0;
    },
    /** The client ids of the clients that act for this user (acts_for_creator). */
    async clientIdsActingFor(userId: string, tx: Executor = db): Promise<string[]> {
      const rows = await tx
        .select({ clientId: clients.clientId })
        .from(clients)
        .where(and(eq(clients.createdBy, userId), eq(clients.actsForCreator, true)));
      return rows.map((r) => r.clientId);
    },
    /** The clients acting for someone who holds `role` (whose tokens a change of the role affects). */
    async clientIdsActingForHoldersOf(role: string, tx: Executor = db): Promise<string[]> {
      const holders = tx
        .select({ userId: userRoles.userId })
        .from(userRoles)
        .where(eq(userRoles.roleName, role));
      const rows = await tx
        .select({ clientId: clients.clientId })
        .from(clients)
        .where(and(eq(clients.actsForCreator, true), inArray(clients.createdBy, holders)));
      return rows.map((r) => r.clientId);
    },
    /** Oldest first; `createdBy` limits the list to one creator's clients. */
    async list(
      options: { createdBy?: string; limit: number; cursor?: Cursor },
      tx: Executor = db,
    ): Promise<ClientRow[]> {
      const conditions = [];
      if (options.createdBy !== undefined) conditions.push(eq(clients.createdBy, options.createdBy));
      if (options.cursor) conditions.push(pastCursor(clients.createdAt, clients.id, options.cursor, 'asc'));
      return tx
        .select()
        .from(clients)
        .where(conditions.length ? and(...conditions) : undefined)
        .orderBy(asc(clients.createdAt), asc(clients.id))
        .limit(options.limit + 1);
    },
    async update(
      id: string,
      patch: ClientPatch,
      at: Date,
      tx: Executor = db,
    ): Promise<ClientRow | undefined> {
      const [row] = await tx
        .update(clients)
        .set({ ...patch, updatedAt: at })
        .where(eq(clients.id, id))
        .returning();
      return row;
    },
    /** Disables the active clients acting for the user; the disabled rows. */
    async disableActingFor(userId: string, at: Date, tx: Executor): Promise<ClientRow[]> {
      return tx
        .update(clients)
        .set({ status: 'disabled', disabledByAdministrator: false, updatedAt: at })
        .where(
          and(eq(clients.createdBy, userId), eq(clients.actsForCreator, true), eq(clients.status, 'active')),
        )
        .returning();
    },
    async delete(id: string, tx: Executor = db): Promise<boolean> {
      const rows = await tx.delete(clients).where(eq(clients.id, id)).returning({ id: clients.id });
      return rows.length > 0;
    },
  };
}

export type ClientsRepository = ReturnType<typeof createClientsRepository>;
