import type { Clock } from '../../lib/clock.js';
import type { AuthEvent } from '../../lib/events.js';
import { createReadThroughCache } from '../../lib/read-through-cache.js';
import type { UsersRepository } from './users.repository.js';

/** What a user holds now, as the credentials acting for them see it. */
export interface OwnerState {
  active: boolean;
  permissions: readonly string[];
}

/**
 * The current state of the users that credentials act for (API keys' owners, the creators of clients
 * registered by users who are not administrators), read through a bounded cache and dropped by the
 * events every instance receives: `user_changed` for one user, `roles_changed` and `resync` for all.
 * Each state is one frozen object until it changes, so what is derived from it can be kept beside it.
 */
export function createOwnerStates(deps: {
  users: Pick<UsersRepository, 'findById' | 'rolesAndPermissions'>;
  max: number;
  /** A backstop only: every change invalidates by event. */
  ttlMs: number;
  clock: Clock;
}) {
  const cache = createReadThroughCache<OwnerState>({
    max: deps.max,
    ttlMs: deps.ttlMs,
    clock: deps.clock,
    load: async (userId) => {
      const [user, held] = await Promise.all([
        deps.users.findById(userId),
        deps.users.rolesAndPermissions(userId),
      ]);
      return Object.freeze({
        active: user?.status === 'active',
        permissions: Object.freeze(held.permissions),
      });
    },
  });

  return {
    get: (userId: string) => cache.get(userId),
    /** The state when it is in memory, else undefined (`get` reads it). */
    peek: (userId: string) => cache.peek(userId)?.value,
    clear: () => cache.clear(),
    get size() {
      return cache.size;
    },
    handle(event: AuthEvent) {
      if (event.type === 'user_changed') cache.delete(event.userId);
      else if (event.type === 'roles_changed' || event.type === 'resync') cache.clear();
    },
  };
}

export type OwnerStates = ReturnType<typeof createOwnerStates>;
