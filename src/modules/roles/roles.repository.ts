import { asc, eq, gt } from 'drizzle-orm';
import type { Executor } from '../../db/client.js';
import { roles } from '../../db/schema/index.js';

export type RoleRow = typeof roles.$inferSelect;

export function createRolesRepository(db: Executor) {
  return {
    /** By name; `limit + 1` rows after the name `after`, so the caller knows whether a page follows. */
    async list(
      options: { limit: number; after?: string | undefined },
      tx: Executor = db,
    ): Promise<RoleRow[]> {
      return tx
        .select()
        .from(roles)
        .where(options.after === undefined ? undefined : gt(roles.name, options.after))
        .orderBy(asc(roles.name))
        .limit(options.limit + 1);
    },
    async find(name: string, tx: Executor = db): Promise<RoleRow | undefined> {
      const [row] = await tx.select().from(roles).where(eq(roles.name, name)).limit(1);
      return row;
    },
    /**
     * The row share-locked for the rest of `tx`: a grant checks the permissions the role gives when
     * it commits, since an edit or a deletion of the role (FOR UPDATE) waits for it.
     */
    async findForShare(name: string, tx: Executor): Promise<RoleRow | undefined> {
      const [row] = await tx.select().from(roles).where(eq(roles.name, name)).limit(1).for('share');
      return row;
    },
    /** The row locked for the rest of `tx`, so the permissions a change checks are the ones it replaces. */
    async findForUpdate(name: string, tx: Executor): Promise<RoleRow | undefined> {
      const [row] = await tx.select().from(roles).where(eq(roles.name, name)).limit(1).for('update');
      return row;
    },
    /** Undefined when the name is taken. */
    async insert(
      row: { name: string; description: string; permissions: string[] },
      tx: Executor = db,
    ): Promise<RoleRow | undefined> {
      const [created] = await tx.insert(roles).values(row).onConflictDoNothing().returning();
      return created;
    },
    async update(
      name: string,
      patch: Partial<Pick<RoleRow, 'description' | 'permissions'>>,
      tx: Executor = db,
    ): Promise<RoleRow | undefined> {
      const [row] = await tx
        .update(roles)
        .set({ ...patch, updatedAt: new Date() })
        .where(eq(roles.name, name))
        .returning();
      return row;
    },
    async delete(name: string, tx: Executor = db): Promise<boolean> {
      const rows = await tx.delete(roles).where(eq(roles.name, name)).returning({ name: roles.name });
      return rows.length > 0;
    },
  };
}

export type RolesRepository = ReturnType<typeof createRolesRepository>;
