import type { Database, Transaction } from '../../db/client.js';
import { AppError, notFound } from '../../lib/errors.js';
import { type AuthEvent, type EventBus, inTransaction } from '../../lib/events.js';
import type { ClientsRepository } from '../clients/clients.repository.js';
import { decodeNameCursor, encodeNameCursor, pageBy } from '../../lib/pagination.js';
import { notHeld } from '../../lib/permissions.js';
import type { AuditService, RequestContext } from '../audit/audit.service.js';
import type { UsersRepository } from '../users/users.repository.js';
import type { GrantCeiling, Grantor } from './grant-ceiling.js';
import type { RoleRow, RolesRepository } from './roles.repository.js';

/**
 * Managing roles needs roles:write held now, like the permissions at stake: a token issued before
 * its holder lost roles:write must not go on creating, changing or deleting roles until it expires.
 */
const MANAGE_ROLES = 'roles:write';

/** The refusal of the grant ceiling for roles: creating, changing, granting. */
export const ROLE_REFUSAL = 'You cannot grant permissions you do not hold yourself';

/** The grant ceiling's refusal, said of a deletion (it takes what the role gives). */
const DELETION_REFUSAL = 'You cannot delete a role that gives permissions you do not hold yourself';

/**
 * Deleting a role, or narrowing what it gives, takes from everyone who holds it: as taking the role
 * from one user, it is for a caller who holds everything those users hold.
 */
const HOLDERS_REFUSAL = 'You cannot take a role from users who hold permissions you do not hold yourself';

const BUILTIN_ADMIN = 'admin';
/** The role every account is given: what it gives, it gives to everyone, accounts to come included. */
const BUILTIN_USER = 'user';

export function createRolesService(deps: {
  db: Database;
  repo: RolesRepository;
  users: UsersRepository;
  audit: AuditService;
  events: EventBus;
  grants: GrantCeiling;
  /** The clients acting for the role's holders, whose tokens end when the role gives less. */
  clients: Pick<ClientsRepository, 'clientIdsActingForHoldersOf'>;
  /** Revokes every token issued so far to a subject, on every instance (auth.subjectRevocation). */
  subjectRevocation: (tx: Transaction, subject: string) => Promise<AuthEvent>;
}) {
  /**
   * A role about to give less: the tokens of the clients acting for its holders end (they carry what
   * the holders held when issued, for up to a day; new ones carry what they hold now), as a disable
   * ends them. The holders' own access tokens go by what they carry for their few minutes.
   */
  async function revokeActingClients(tx: Transaction, role: string, emit: (e: AuthEvent) => void) {
    for (const clientId of await deps.clients.clientIdsActingForHoldersOf(role, tx))
      emit(await deps.subjectRevocation(tx, clientId));
  }

  async function findOrThrow(name: string): Promise<RoleRow> {
    const role = await deps.repo.find(name);
    if (!role) throw notFound('role');
    return role;
  }

  return {
    /** Roles by name, a page at a time. */
    async list(options: { limit: number; cursor?: string | undefined }) {
      const rows = await deps.repo.list({ limit: options.limit, after: decodeNameCursor(options.cursor) });
      return pageBy(rows, options.limit, (last) => encodeNameCursor(last.name));
    },
    get: findOrThrow,

    async create(
      input: { name: string; description?: string | undefined; permissions: string[] },
      caller: Grantor,
      context: RequestContext,
    ): Promise<RoleRow> {
      const permissions = [...new Set(input.permissions)].sort();
      return deps.grants.audited(context, { action: 'role.create', subjectId: input.name }, () =>
        inTransaction(deps.db, deps.events, async (tx) => {
          await deps.grants.assertHolds(caller, [MANAGE_ROLES, ...permissions], tx, ROLE_REFUSAL);
          const role = await deps.repo.insert(
            { name: input.name, description: input.description ?? '', permissions },
            tx,
          );
          if (!role) throw new AppError('conflict', { detail: `A role named ${input.name} exists` });
          await deps.audit.record(tx, context, {
            type: 'role.created',
            subjectId: role.name,
            data: { permissions },
          });
          return role;
        }),
      );
    },

    async update(
      name: string,
      input: { description?: string | undefined; permissions?: string[] | undefined },
      caller: Grantor,
      context: RequestContext,
    ): Promise<RoleRow> {
      const permissions = input.permissions ? [...new Set(input.permissions)].sort() : undefined;
      return deps.grants.audited(context, { action: 'role.update', subjectId: name }, () =>
        inTransaction(deps.db, deps.events, async (tx, emit) => {
          // Locked, so the permissions checked below are the ones this change replaces.
          const existing = await deps.repo.findForUpdate(name, tx);
          if (!existing) throw notFound('role');
          // Changing a role grants to (and takes from) everyone who holds it: both sides must be held.
          // Its description too is for those who hold what it gives (what the admin role is "for" is
          // not for a holder of roles:write alone to rewrite).
          await deps.grants.assertHolds(
            caller,
            [MANAGE_ROLES, ...existing.permissions, ...(permissions ?? [])],
            tx,
            ROLE_REFUSAL,
          );
          if (permissions && existing.name === BUILTIN_USER)
            await deps.grants.assertHolds(
              caller,
              ['*'],
              tx,
              'The user role is every account’s: only an administrator (*) changes what it gives',
            );
          if (permissions && existing.name === BUILTIN_ADMIN && !permissions.includes('*')) {
            throw new AppError('conflict', { detail: 'The admin role keeps every permission (*)' });
          }
          // Giving less takes from every holder.
          if (permissions && notHeld(existing.permissions, permissions).length > 0)
            await deps.grants.assertHolds(
              caller,
              await deps.users.permissionsOfHoldersOf(name, tx),
              tx,
              HOLDERS_REFUSAL,
            );
          const changed = [
            ...(input.description !== undefined && input.description !== existing.description
              ? ['description']
              : []),
            ...(permissions && permissions.join(' ') !== [...existing.permissions].sort().join(' ')
              ? ['permissions']
              : []),
          ];
          // Nothing to change: no write, no `updated_at` bump, no event that says a role changed.
          if (changed.length === 0) return existing;
          const role = await deps.repo.update(
            name,
            {
              ...(changed.includes('description') ? { description: input.description } : {}),
              ...(changed.includes('permissions') ? { permissions } : {}),
            },
            tx,
          );
          if (!role) throw notFound('role');
          // Gives less: something it gave is not covered by what it gives now (`orders:*` covers
          // `orders:read`).
          if (permissions && notHeld(existing.permissions, permissions).length > 0)
            await revokeActingClients(tx, name, emit);
          await deps.audit.record(tx, context, {
            type: 'role.updated',
            subjectId: name,
            data: { changed, before: existing.permissions, after: role.permissions },
          });
          emit({ type: 'roles_changed' });
          return role;
        }),
      );
    },

    async delete(name: string, caller: Grantor, context: RequestContext): Promise<void> {
      await deps.grants.audited(context, { action: 'role.delete', subjectId: name }, () =>
        inTransaction(deps.db, deps.events, async (tx, emit) => {
          const role = await deps.repo.findForUpdate(name, tx);
          if (!role) throw notFound('role');
          if (role.builtin)
            throw new AppError('conflict', { detail: `The built-in role ${name} cannot be deleted` });
          // Deleting a role takes its permissions from everyone who holds it.
          await deps.grants.assertHolds(caller, [MANAGE_ROLES, ...role.permissions], tx, DELETION_REFUSAL);
          await deps.grants.assertHolds(
            caller,
            await deps.users.permissionsOfHoldersOf(name, tx),
            tx,
            HOLDERS_REFUSAL,
          );
          const holders = await deps.users.holderIds(name, tx);
          // Before the deletion: it takes the holders' assignments with it.
          await revokeActingClients(tx, name, emit);
          if (!(await deps.repo.delete(name, tx))) throw notFound('role');
          await deps.audit.record(tx, context, {
            type: 'role.deleted',
            subjectId: name,
            data: { holders: holders.length },
          });
          // Each holder's history (and their own activity) shows the role going, as a removal would.
          await deps.audit.record(
            tx,
            context,
            holders.map((userId) => ({
              type: 'role.removed',
              subjectId: userId,
              data: { role: name, reason: 'role_deleted' },
            })),
          );
          emit({ type: 'roles_changed' });
        }),
      );
    },
  };
}

export type RolesService = ReturnType<typeof createRolesService>;
