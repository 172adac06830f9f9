import type { Clock } from '../../lib/clock.js';
import type { AuthEvent } from '../../lib/events.js';
import { createReadThroughCache } from '../../lib/read-through-cache.js';
import { type ProfilesRepository, toProfileDto } from '../profiles/profiles.repository.js';
import type { UsersRepository } from '../users/users.repository.js';
import { toUserDto } from './auth.schema.js';

/** What /v1/auth/me shows of an account, ready to send: the user, their role names and profile. */
export interface AccountView {
  user: ReturnType<typeof toUserDto>;
  roles: string[];
  profile: ReturnType<typeof toProfileDto> | null;
}

export interface AccountsCacheDeps {
  users: Pick<UsersRepository, 'findById' | 'rolesAndPermissions'>;
  profiles: Pick<ProfilesRepository, 'findByUserId'>;
  clock: Clock;
  max?: number;
  /** A backstop only: every change to a user, their roles or their profile invalidates by event. */
  ttlMs?: number;
}

const DEFAULT_MAX = 10_000;
const DEFAULT_TTL_MS = 5_000;

/** Marks a user id known not to exist (deleted), so a stale token does not reach the database either. */
const ABSENT = null;

/**
 * /v1/auth/me runs on every page load of every frontend; its answer changes only when the user, their
 * roles or their profile do, and each of those changes emits `user_changed` (or `roles_changed`) on
 * every instance. So the view is read once (three queries) and served from memory until then.
 */
export function createAccountsCache(deps: AccountsCacheDeps) {
  async function read(userId: string): Promise<AccountView | typeof ABSENT> {
    const user = await deps.users.findById(userId);
    if (!user) return ABSENT;
    const [held, profile] = await Promise.all([
      deps.users.rolesAndPermissions(userId),
      deps.profiles.findByUserId(userId),
    ]);
    // Shared by every request until invalidated: frozen, so no handler can change it for the others.
    return Object.freeze({
      user: Object.freeze(toUserDto(user)),
      roles: Object.freeze(held.roles) as string[],
      profile: profile ? Object.freeze(toProfileDto(profile)) : null,
    });
  }

  const cache = createReadThroughCache({
    load: read,
    max: deps.max ?? DEFAULT_MAX,
    ttlMs: deps.ttlMs ?? DEFAULT_TTL_MS,
    clock: deps.clock,
  });

  return {
    /** The account's view, or undefined when there is no such user. */
    async get(userId: string): Promise<AccountView | undefined> {
      return (await cache.get(userId)) ?? undefined;
    },

    handle(event: AuthEvent) {
      switch (event.type) {
        case 'user_changed':
          cache.delete(event.userId);
          return;
        case 'roles_changed':
        case 'resync':
          cache.clear();
          return;
      }
    },
  };
}

export type AccountsCache = ReturnType<typeof createAccountsCache>;
