import type { Database, Executor } from '../../db/client.js';
import type { Clock } from '../../lib/clock.js';
import { AppError, isAppError } from '../../lib/errors.js';
import { credentialNoLongerStands } from '../../plugins/authenticate.js';
import { intersectPermissions, notHeld } from '../../lib/permissions.js';
import type { ApiKeysRepository } from '../api-keys/api-keys.repository.js';
import type { AuditService, RequestContext } from '../audit/audit.service.js';
import type { ClientsRepository } from '../clients/clients.repository.js';
import type { UsersRepository } from '../users/users.repository.js';
import type { SessionsRepository } from '../auth/sessions.repository.js';

/**
 * Who asks to grant, as the ceiling looks at them: the request's principal (a `Principal` fits).
 * `permissions` are what the credential carries: a token's scope, or an API key's effective scopes.
 */
export type Grantor =
  | { kind: 'user'; userId: string; permissions: readonly string[]; sessionId?: string | undefined }
  | { kind: 'service'; clientId: string; permissions: readonly string[] }
  | { kind: 'api_key'; id: string; userId: string; permissions: readonly string[] };

/** A 403 of the grant ceiling: carries what was missing, for the audit event. */
export class GrantRefused extends AppError {
  readonly missing: string[];
  constructor(refusal: string, missing: string[]) {
    super('forbidden', { detail: `${refusal}: ${missing.join(', ')}` });
    this.missing = missing;
  }
}

/** What a refused change was, for its `authorization.denied` event. */
export interface RefusedAction {
  /** e.g. `role.create`, `api_key.rotate`. */
  action: string;
  subjectId?: string | null | undefined;
  /** What else identifies it (never a secret), e.g. the role being granted. */
  data?: Record<string, unknown> | undefined;
}

export interface GrantCeilingDeps {
  db: Database;
  users: Pick<UsersRepository, 'findByIdForKeyShare' | 'rolesAndPermissions'>;
  clients: Pick<ClientsRepository, 'findByClientId'>;
  apiKeys: Pick<ApiKeysRepository, 'findById'>;
  /** The session a user's token belongs to, which must still be live. */
  sessions: Pick<SessionsRepository, 'findSessionForShare'>;
  audit: AuditService;
  clock: Clock;
}

/**
 * Nobody grants what they do not hold (API.md), decided on what the caller holds now rather than on
 * what their credential said when it was issued: an access token keeps its permissions until it
 * expires, but one of them taken away since must not be handed back out (a role re-granted to
 * oneself, a client's secret rotated). What is held now, read on the transaction of the change:
 * - a user: the token's permissions within the user's current ones (nothing once disabled or gone);
 * - an API key: the key's scopes within its owner's current permissions (nothing once revoked,
 *   expired, or its owner disabled or gone);
 * - a service: the token's scopes within the client's current scopes (nothing once disabled or gone),
 *   and within its creator's current permissions when it acts for them.
 */
export function createGrantCeiling(deps: GrantCeilingDeps) {
  /**
   * A user's current permissions within `within`; null once the user is disabled or gone. Their
   * permissions are read before their row, so a deletion committing between the two reads finds the
   * user gone (null: 401), never "active and holding nothing" (a 403 for a permission they had). In a
   * change's transaction the row is key-share locked, so the user cannot be deleted before the change
   * commits (it would otherwise fail on its foreign key to them).
   */
  async function ownerHolds(userId: string, within: readonly string[], tx: Executor) {
    const { permissions } = await deps.users.rolesAndPermissions(userId, tx);
    const user = await deps.users.findByIdForKeyShare(userId, tx);
    if (user?.status !== 'active') return null;
    return intersectPermissions(within, permissions);
  }

  /**
   * What the grantor holds now, or null when the credential itself no longer stands: the user
   * disabled or gone, the API key revoked, expired or its owner disabled, the client disabled or
   * gone. A client acting for a creator who is disabled still stands, holding nothing (the token
   * endpoint gives it no tokens: `unauthorized_client`, oauth.service.ts).
   */
  async function standing(grantor: Grantor, tx: Executor): Promise<string[] | null> {
    switch (grantor.kind) {
      case 'user': {
        // The token's session, share-locked: a request that authenticated before its session ended
        // (a logout, a password change or reset committing while its body was still arriving) finds
        // it ended, or commits first and is seen by what ends it; it never makes a key or a client
        // that outlives the session.
        if (grantor.sessionId) {
          const session = await deps.sessions.findSessionForShare(grantor.sessionId, tx);
          const now = deps.clock.nowMs();
          if (
            !session ||
            session.revokedAt ||
            session.idleExpiresAt.getTime() <= now ||
            session.expiresAt.getTime() <= now
          )
            return null;
        }
        return ownerHolds(grantor.userId, grantor.permissions, tx);
      }
      case 'api_key': {
        const key = await deps.apiKeys.findById(grantor.id, tx);
        const expired = key?.expiresAt != null && key.expiresAt.getTime() <= deps.clock.nowMs();
        if (!key || key.revokedAt || expired || key.ownerId !== grantor.userId) return null;
        return ownerHolds(key.ownerId, key.scopes, tx);
      }
      case 'service': {
        const client = await deps.clients.findByClientId(grantor.clientId, tx);
        if (client?.status !== 'active') return null;
        // A client acting for its creator holds what they hold now, within its scopes.
        const scopes = !client.actsForCreator
          ? client.scopes
          : client.createdBy
            ? ((await ownerHolds(client.createdBy, client.scopes, tx)) ?? [])
            : [];
        return intersectPermissions(grantor.permissions, scopes);
      }
    }
  }

  return {
    standing,

    /**
     * Throws GrantRefused (403) unless the grantor holds, now, everything `granted` gives; a 401 when
     * the grantor's credential no longer stands at all.
     */
    async assertHolds(grantor: Grantor, granted: readonly string[], tx: Executor, refusal: string) {
      // Even when nothing is granted: what is made or changed (an API key with no scopes, which still
      // verifies as its owner's) must not outlive a credential that ended while the request ran.
      const holds = await standing(grantor, tx);
      if (holds === null) throw credentialNoLongerStands();
      const missing = [...new Set(notHeld(granted, holds))].sort();
      if (missing.length > 0) throw new GrantRefused(refusal, missing);
    },

    /**
     * Runs a change (its own transaction inside `work`) and, when it is refused (403), writes the
     * `authorization.denied` event once that transaction has rolled back: written inside it, the event
     * would be lost with the change it refused.
     */
    async audited<T>(context: RequestContext, refused: RefusedAction, work: () => Promise<T>): Promise<T> {
      try {
        return await work();
      } catch (err) {
        if (isAppError(err) && err.code === 'forbidden') {
          await deps.audit.record(deps.db, context, {
            type: 'authorization.denied',
            outcome: 'failure',
            subjectId: refused.subjectId ?? null,
            data: {
              action: refused.action,
              ...refused.data,
              ...(err instanceof GrantRefused ? { rule: 'grant_ceiling', missing: err.missing } : {}),
              reason: err.detail,
            },
          });
          err.audited = true;
        }
        throw err;
      }
    },
  };
}

export type GrantCeiling = ReturnType<typeof createGrantCeiling>;
