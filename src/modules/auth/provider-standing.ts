import type { Logger } from 'pino';
import type { IdentityProvider, ProviderStanding } from '../../identity/provider.js';
import type { Clock } from '../../lib/clock.js';
import { createReadThroughCache } from '../../lib/read-through-cache.js';
import type { UserRow } from '../users/users.repository.js';

export interface ProviderStandingDeps {
  provider: Pick<IdentityProvider, 'name' | 'standing'>;
  clock: Clock;
  logger?: Pick<Logger, 'warn'> | undefined;
  /**
   * SUPABASE_USER_RECHECK_SECONDS: how long a user the provider confirmed is not asked about again;
   * 0 asks at every refresh.
   */
  recheckSeconds: number;
  /** How many users' confirmations are kept (LRU): one pushed out is asked about at its next refresh. */
  max?: number;
}

const DEFAULT_MAX = 100_000;

/**
 * Whether a user may go on refreshing their sessions here, as the provider holds them (Supabase: a
 * user banned or deleted there directly, in its dashboard or through its admin API, not through this
 * service). Asked at a refresh of a user of that provider whom it has not confirmed for
 * `recheckSeconds`, with one question at a time per user however many refreshes wait for it; kept per
 * instance, in memory. A provider that does not answer does not lock anybody out: the user counts as
 * confirmed (logged as a warning) and is asked about again after `recheckSeconds`.
 */
export function createProviderStanding(deps: ProviderStandingDeps) {
  const standing = deps.provider.standing?.bind(deps.provider);
  if (!standing) return undefined;

  /** The provider's answer, or what kept it from giving one. */
  const ask = async (userId: string): Promise<ProviderStanding | { unanswered: unknown }> => {
    try {
      return await standing(userId);
    } catch (err) {
      return { unanswered: err };
    }
  };

  const confirmed =
    deps.recheckSeconds > 0
      ? createReadThroughCache({
          load: ask,
          max: deps.max ?? DEFAULT_MAX,
          ttlMs: deps.recheckSeconds * 1000,
          clock: deps.clock,
        })
      : undefined;

  return {
    /** A refresh of `user` asks the provider first: one of its users not confirmed recently. */
    due: (user: Pick<UserRow, 'id' | 'provider'>) =>
      user.provider === deps.provider.name && confirmed?.peek(user.id) === undefined,

    /**
     * Asks the provider about the user (or waits for the question already asked); `active` when it
     * gave no answer, logged with the request's id.
     */
    async check(userId: string, requestId: string | null): Promise<ProviderStanding> {
      const answer = confirmed ? await confirmed.get(userId) : await ask(userId);
      if (typeof answer === 'object') {
        deps.logger?.warn(
          { err: answer.unanswered, userId, reqId: requestId },
          'could not confirm the user at the identity provider: their refresh goes through',
        );
        return 'active';
      }
      // Only confirmations are kept: a user banned and let in again is asked about at once.
      if (answer !== 'active') confirmed?.delete(userId);
      return answer;
    },
  };
}

export type ProviderStandingCheck = NonNullable<ReturnType<typeof createProviderStanding>>;
