import { and, asc, count, eq, ilike, inArray, isNotNull, ne, or, sql } from 'drizzle-orm';
import type { Executor } from '../../db/client.js';
import { profiles, roles, userRoles, users } from '../../db/schema/index.js';
import { pastCursor } from '../../db/keyset.js';
import type { Cursor } from '../../lib/pagination.js';

export type UserRow = typeof users.$inferSelect;

/**
 * An invitation nobody has taken yet: a built-in account an administrator made whose owner has neither
 * chosen a password nor proven the address (a confirmation link, which then lets them sign in by a
 * mailed link). Its link may expire unopened, so it holds no role anyone relies on, and inviting the
 * address again mails a new link. Once taken it is an account like any other.
 */
export const isUntakenInvitation = (user: Pick<UserRow, 'provider' | 'passwordHash' | 'emailConfirmedAt'>) =>
  user.provider === 'local' && user.passwordHash === null && user.emailConfirmedAt === null;
export type NewUser = typeof users.$inferInsert;

const escapeLike = (s: string) => s.replace(/[\\%_]/g, (c) => `\\${c}`);

/**
 * A user who can act on what their roles give: active, and not an invitation nobody has taken yet
 * (`isUntakenInvitation`, in SQL).
 */
const usable = () =>
  and(
    eq(users.status, 'active'),
    or(ne(users.provider, 'local'), isNotNull(users.passwordHash), isNotNull(users.emailConfirmedAt)),
  );

export function createUsersRepository(db: Executor) {
  return {
    /** Reads a row of `users`: it waits when the table is locked, which `SELECT 1` would not notice. */
    async probe(tx: Executor = db): Promise<void> {
      await tx.select({ one: sql`1` }).from(users).limit(1);
    },
    /**
     * The user, share-locked until the transaction ends: a status change (disable) waits for what is
     * decided on the status read here (a session started), or has happened and is read here.
     */
    async findByIdForShare(id: string, tx: Executor): Promise<UserRow | undefined> {
      const [row] = await tx.select().from(users).where(eq(users.id, id)).limit(1).for('share');
      return row;
    },
    /**
     * The user, with a key-share lock until the transaction ends: rows that refer to it (a role grant)
     * can be added, and a concurrent deletion waits, or has happened and this finds nothing.
     */
    async findByIdForKeyShare(id: string, tx: Executor): Promise<UserRow | undefined> {
      const [row] = await tx.select().from(users).where(eq(users.id, id)).limit(1).for('key share');
      return row;
    },
    /**
     * The user, locked as an update of it locks it (FOR NO KEY UPDATE), for a transaction that is
     * about to change the row: two of them take turns instead of both holding a share lock and each
     * waiting for the other's to upgrade (a deadlock).
     */
    async findByIdForUpdate(id: string, tx: Executor): Promise<UserRow | undefined> {
      const [row] = await tx.select().from(users).where(eq(users.id, id)).limit(1).for('no key update');
      return row;
    },
    /**
     * The user, locked FOR UPDATE: unlike FOR NO KEY UPDATE, it waits for the key-share locks of a
     * transaction adding rows that refer to the user, a role granted them above all (whose grant
     * key-share locks the row from its start to its commit), so what is read next sees the grant.
     */
    async findByIdForKeyUpdate(id: string, tx: Executor): Promise<UserRow | undefined> {
      const [row] = await tx.select().from(users).where(eq(users.id, id)).limit(1).for('update');
      return row;
    },
    async findById(id: string, tx: Executor = db): Promise<UserRow | undefined> {
      const [row] = await tx.select().from(users).where(eq(users.id, id)).limit(1);
      return row;
    },
    async findByEmail(email: string, tx: Executor = db): Promise<UserRow | undefined> {
      const [row] = await tx
        .select()
        .from(users)
        .where(sql`lower(${users.email}) = ${email.toLowerCase()}`)
        .limit(1);
      return row;
    },
    /** Inserts the user; undefined when the email (or id) is taken. */
    async insert(user: NewUser, tx: Executor = db): Promise<UserRow | undefined> {
      const [row] = await tx.insert(users).values(user).onConflictDoNothing().returning();
      return row;
    },
    async update(
      id: string,
      patch: Partial<Pick<UserRow, 'status' | 'passwordHash' | 'email' | 'emailConfirmedAt'>>,
      tx: Executor = db,
    ): Promise<UserRow | undefined> {
      const [row] = await tx
        .update(users)
        .set({ ...patch, updatedAt: new Date() })
        .where(eq(users.id, id))
        .returning();
      return row;
    },
    /**
     * Replaces the password hash only if it is still `current` (the one the current password was
     * checked against): false when another change came first.
     */
    async replacePasswordHash(
      id: string,
      current: string,
      next: string,
      tx: Executor = db,
    ): Promise<boolean> {
      const rows = await tx
        .update(users)
        .set({ passwordHash: next, updatedAt: new Date() })
        .where(and(eq(users.id, id), eq(users.passwordHash, current)))
        .returning({ id: users.id });
      return rows.length > 0;
    },
    /**
     * Sets the status if it differs, or disables a user a deletion in progress disabled (`deletingSince`):
     * theirs then stays when the provider refuses the deletion. Undefined when the user is gone or
     * already had it.
     */
    async changeStatus(
      id: string,
      status: UserRow['status'],
      tx: Executor = db,
    ): Promise<UserRow | undefined> {
      const differs =
        status === 'disabled'
          ? or(ne(users.status, status), isNotNull(users.deletingSince))
          : ne(users.status, status);
      const [row] = await tx
        .update(users)
        .set({ status, deletingSince: null, updatedAt: new Date() })
        .where(and(eq(users.id, id), differs))
        .returning();
      return row;
    },
    /**
     * A deletion asking the provider: disables an active user, marked as the deletion's (`deletingSince`).
     * Undefined when the user is gone or not active.
     */
    async disableForDeletion(id: string, tx: Executor = db): Promise<UserRow | undefined> {
      const at = new Date();
      const [row] = await tx
        .update(users)
        .set({ status: 'disabled', deletingSince: at, updatedAt: at })
        .where(and(eq(users.id, id), eq(users.status, 'active')))
        .returning();
      return row;
    },
    /**
     * The provider refused the deletion: enables the user again, only while they are still as that
     * deletion (`since`, its `deletingSince`) left them. Undefined when anything changed their status
     * meanwhile (an administrator disabled or enabled them, another deletion) or they are gone.
     */
    async enableAfterRefusedDeletion(
      id: string,
      since: Date,
      tx: Executor = db,
    ): Promise<UserRow | undefined> {
      const [row] = await tx
        .update(users)
        .set({ status: 'active', deletingSince: null, updatedAt: new Date() })
        .where(and(eq(users.id, id), eq(users.status, 'disabled'), eq(users.deletingSince, since)))
        .returning();
      return row;
    },
    async delete(id: string, tx: Executor = db): Promise<boolean> {
      const rows = await tx.delete(users).where(eq(users.id, id)).returning({ id: users.id });
      return rows.length > 0;
    },
    async list(
      options: {
        query?: string;
        status?: 'active' | 'disabled';
        role?: string;
        limit: number;
        cursor?: Cursor;
      },
      tx: Executor = db,
    ): Promise<UserRow[]> {
      const conditions = [];
      if (options.query) conditions.push(ilike(users.email, `%${escapeLike(options.query)}%`));
      if (options.status) conditions.push(eq(users.status, options.status));
      if (options.role)
        conditions.push(
          inArray(
            users.id,
            tx.select({ id: userRoles.userId }).from(userRoles).where(eq(userRoles.roleName, options.role)),
          ),
        );
      if (options.cursor) conditions.push(pastCursor(users.createdAt, users.id, options.cursor, 'asc'));
      return tx
        .select()
        .from(users)
        .where(conditions.length ? and(...conditions) : undefined)
        .orderBy(asc(users.createdAt), asc(users.id))
        .limit(options.limit + 1);
    },
    /** The user's role names and the union of their permissions. */
    /**
     * The user's roles and the permissions they give; `except` leaves roles out (those that count only
     * in a session that gave a second factor, MFA_REQUIRED_ROLES).
     */
    async rolesAndPermissions(
      userId: string,
      tx: Executor = db,
      options: { except?: readonly string[] } = {},
    ): Promise<{ roles: string[]; permissions: string[] }> {
      const all = await tx
        .select({ name: roles.name, permissions: roles.permissions })
        .from(userRoles)
        .innerJoin(roles, eq(userRoles.roleName, roles.name))
        .where(eq(userRoles.userId, userId))
        .orderBy(asc(roles.name));
      const rows = options.except?.length ? all.filter((r) => !options.except!.includes(r.name)) : all;
      const permissions = new Set<string>();
      for (const r of rows) for (const p of r.permissions) permissions.add(p);
      return { roles: rows.map((r) => r.name), permissions: [...permissions].sort() };
    },
    async assignRole(
      userId: string,
      roleName: string,
      grantedBy: string | null,
      tx: Executor = db,
    ): Promise<boolean> {
      const rows = await tx
        .insert(userRoles)
        .values({ userId, roleName, grantedBy })
        .onConflictDoNothing()
        .returning({ userId: userRoles.userId });
      return rows.length > 0;
    },
    async removeRole(userId: string, roleName: string, tx: Executor = db): Promise<boolean> {
      const rows = await tx
        .delete(userRoles)
        .where(and(eq(userRoles.userId, userId), eq(userRoles.roleName, roleName)))
        .returning({ userId: userRoles.userId });
      return rows.length > 0;
    },
    /**
     * Users holding the role who can use it: active, and not an invitation nobody has taken yet
     * (`isUntakenInvitation`). Locked so two concurrent removals cannot both pass a last-admin check.
     */
    async lockRoleHolders(roleName: string, tx: Executor): Promise<string[]> {
      const rows = await tx
        .select({ userId: userRoles.userId })
        .from(userRoles)
        .innerJoin(users, eq(users.id, userRoles.userId))
        .where(and(eq(userRoles.roleName, roleName), usable()))
        .for('update');
      return rows.map((r) => r.userId);
    },
    /**
     * How many users hold the role and can use it (as `lockRoleHolders` counts them, unlocked): whether
     * the service has an administrator anyone can act as (the bootstrap admin is made when it has none).
     */
    async countUsableHolders(roleName: string, tx: Executor = db): Promise<number> {
      const [row] = await tx
        .select({ n: count() })
        .from(userRoles)
        .innerJoin(users, eq(users.id, userRoles.userId))
        .where(and(eq(userRoles.roleName, roleName), usable()));
      return row?.n ?? 0;
    },
    /**
     * Every permission the holders of `roleName` hold, through any of their roles: what a caller must
     * hold to take the role from all of them at once (deleting it, or narrowing what it gives).
     */
    async permissionsOfHoldersOf(roleName: string, tx: Executor = db): Promise<string[]> {
      const holders = tx
        .select({ userId: userRoles.userId })
        .from(userRoles)
        .where(eq(userRoles.roleName, roleName));
      const rows = await tx
        .selectDistinct({ permissions: roles.permissions })
        .from(userRoles)
        .innerJoin(roles, eq(userRoles.roleName, roles.name))
        .where(inArray(userRoles.userId, holders));
      return [...new Set(rows.flatMap((r) => r.permissions))].sort();
    },
    /** Every user holding the role, whatever their status. */
    async holderIds(roleName: string, tx: Executor = db): Promise<string[]> {
      const rows = await tx
        .select({ userId: userRoles.userId })
        .from(userRoles)
        .where(eq(userRoles.roleName, roleName));
      return rows.map((r) => r.userId);
    },
    /** Every user holding the role, whatever their status (`countUsableHolders`: those who can use it). */
    async countWithRole(roleName: string, tx: Executor = db): Promise<number> {
      const [row] = await tx.select({ n: count() }).from(userRoles).where(eq(userRoles.roleName, roleName));
      return row?.n ?? 0;
    },
    async createProfile(userId: string, displayName: string | null, tx: Executor = db): Promise<void> {
      await tx.insert(profiles).values({ userId, displayName }).onConflictDoNothing();
    },
    /** The profile's display name (an invitation sent again with another). */
    /** True when it changed the name (the same name again writes nothing). */
    async setDisplayName(userId: string, displayName: string, at: Date, tx: Executor): Promise<boolean> {
      const rows = await tx
        .update(profiles)
        .set({ displayName, updatedAt: at })
        .where(and(eq(profiles.userId, userId), sql`${profiles.displayName} is distinct from ${displayName}`))
        .returning({ userId: profiles.userId });
      return rows.length > 0;
    },
    async findByIds(ids: string[], tx: Executor = db): Promise<UserRow[]> {
      if (ids.length === 0) return [];
      return tx.select().from(users).where(inArray(users.id, ids));
    },
  };
}

export type UsersRepository = ReturnType<typeof createUsersRepository>;
