import type { Database } from '../../db/client.js';
import { AppError, notFound } from '../../lib/errors.js';
import { type EventBus, inTransaction } from '../../lib/events.js';
import { isSubset } from '../../lib/permissions.js';
import type { AuditService, RequestContext } from '../audit/audit.service.js';
import type { UsersRepository } from '../users/users.repository.js';
import type { RoleRow, RolesRepository } from './roles.repository.js';

/** Nobody grants what they do not hold (API.md): roles, key scopes, client scopes. */
export function assertHolds(granted: string[], held: string[]): void {
  if (!isSubset(granted, held)) {
    throw new AppError('forbidden', { detail: 'You cannot grant permissions you do not hold yourself' });
  }
}

const BUILTIN_ADMIN = 'admin';

export function createRolesService(deps: {
  db: Database;
  repo: RolesRepository;
  users: UsersRepository;
  audit: AuditService;
  events: EventBus;
}) {
  async function findOrThrow(name: string): Promise<RoleRow> {
    const role = await deps.repo.find(name);
    if (!role) throw notFound('role');
    return role;
  }

  return {
    list: () => deps.repo.list(),
    get: findOrThrow,

    async create(
      input: { name: string; description?: string | undefined; permissions: string[] },
      caller: { permissions: string[] },
      context: RequestContext,
    ): Promise<RoleRow> {
      const permissions = [...new Set(input.permissions)].sort();
      assertHolds(permissions, caller.permissions);
      return inTransaction(deps.db, deps.events, async (tx) => {
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
      });
    },

    async update(
      name: string,
      input: { description?: string | undefined; permissions?: string[] | undefined },
      caller: { permissions: string[] },
      context: RequestContext,
    ): Promise<RoleRow> {
      const existing = await findOrThrow(name);
      const permissions = input.permissions ? [...new Set(input.permissions)].sort() : undefined;
      if (permissions) {
        // Changing a role grants to (and takes from) everyone who holds it: both sides must be held.
        assertHolds([...permissions, ...existing.permissions], caller.permissions);
        if (existing.name === BUILTIN_ADMIN && !permissions.includes('*')) {
          throw new AppError('conflict', { detail: 'The admin role keeps every permission (*)' });
        }
      }
      return inTransaction(deps.db, deps.events, async (tx, emit) => {
        const role = await deps.repo.update(
          name,
          {
            ...(input.description !== undefined ? { description: input.description } : {}),
            ...(permissions ? { permissions } : {}),
          },
          tx,
        );
        if (!role) throw notFound('role');
        await deps.audit.record(tx, context, {
          type: 'role.updated',
          subjectId: name,
          data: { before: existing.permissions, after: role.permissions },
        });
        emit({ type: 'roles_changed' });
        return role;
      });
    },

    async delete(name: string, caller: { permissions: string[] }, context: RequestContext): Promise<void> {
      const role = await findOrThrow(name);
      if (role.builtin)
        throw new AppError('conflict', { detail: `The built-in role ${name} cannot be deleted` });
      assertHolds(role.permissions, caller.permissions);
      await inTransaction(deps.db, deps.events, async (tx, emit) => {
        const holders = await deps.users.countWithRole(name, tx);
        if (!(await deps.repo.delete(name, tx))) throw notFound('role');
        await deps.audit.record(tx, context, { type: 'role.deleted', subjectId: name, data: { holders } });
        emit({ type: 'roles_changed' });
      });
    },
  };
}

export type RolesService = ReturnType<typeof createRolesService>;
