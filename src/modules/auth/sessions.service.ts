import { createHmac } from 'node:crypto';
import type { Database, Executor, Transaction } from '../../db/client.js';
import { addSeconds, type Clock } from '../../lib/clock.js';
import {
  derivedSecret,
  generateSecret,
  keyedHash,
  parseSecret,
  REFRESH_TOKEN_FORMAT,
} from '../../lib/crypto.js';
import { AppError } from '../../lib/errors.js';
import { isSubset, notHeld } from '../../lib/permissions.js';
import { type AuthEvent, type EventBus, inTransaction } from '../../lib/events.js';
import { decodeCursor, encodeCursor, pageBy } from '../../lib/pagination.js';
import type { AuditService, RequestContext } from '../audit/audit.service.js';
import type { ProviderStanding } from '../../identity/provider.js';
import type { RevocationList } from '../tokens/revocations.service.js';
import { FIRST_PARTY_CLIENT_ID, type TokenService } from '../tokens/tokens.service.js';
import type { UserRow, UsersRepository } from '../users/users.repository.js';
import type { ProviderStandingCheck } from './provider-standing.js';
import type { SessionRow, SessionsRepository } from './sessions.repository.js';

export interface SessionTokens {
  access_token: string;
  token_type: 'Bearer';
  expires_in: number;
  refresh_token: string;
}

export interface SessionsServiceDeps {
  db: Database;
  repo: SessionsRepository;
  users: UsersRepository;
  tokens: TokenService;
  revocations: RevocationList;
  audit: AuditService;
  events: EventBus;
  clock: Clock;
  pepper: Buffer;
  audience: string;
  ttl: {
    access: number;
    refreshIdle: number;
    refreshAbsolute: number;
    reuseGrace: number;
  };
  onIssued?: (grant: string) => void;
  /** MFA_REQUIRED_ROLES: roles whose permissions count only in a session that gave a second factor. */
  mfaRequiredRoles?: readonly string[];
  /**
   * MAX_SESSIONS_PER_USER: the most live sessions a user has; a sign-in beyond it ends the least
   * recently used ones.
   */
  maxPerUser: number;
  /**
   * With Supabase (provider-standing.ts): a refresh of a user the provider has not confirmed within
   * SUPABASE_USER_RECHECK_SECONDS asks it first; one banned or deleted there is refused, and their
   * sessions end.
   */
  providerStanding?: ProviderStandingCheck | undefined;
}

declare const keyCouldSign: unique symbol;
/**
 * A transaction begun by `issuingTransaction`, once a key could sign: the only kind a session is
 * opened on (`start`), so that no way of signing in writes its session before a 503 for no key.
 */
export type IssuingTransaction = Transaction & { readonly [keyCouldSign]: true };

/** Why a session ended when a sign-in took the user past MAX_SESSIONS_PER_USER (`revoked_reason`, audit). */
const SESSION_LIMIT_REASON = 'session_limit';

/** Why a user's sessions ended at a refresh the provider refused them at (`revoked_reason`, audit). */
const PROVIDER_REFUSAL_REASONS: Record<Exclude<ProviderStanding, 'active'>, string> = {
  banned: 'banned_at_provider',
  gone: 'deleted_at_provider',
};

/** A refresh token refused: unknown, expired, revoked, its user disabled (or, `reused`, replayed). */
const invalidRefreshToken = (reused = false) =>
  new AppError('invalid_refresh_token', {
    detail: reused
      ? 'The refresh token was already used; the session has been ended'
      : 'The refresh token is invalid, expired or revoked',
    oauthError: 'invalid_grant',
  });

type Held = { roles: string[]; permissions: string[] };

type RefreshOutcome =
  | { kind: 'ok'; user: UserRow; session: SessionRow; refreshToken: string; held: Held }
  | { kind: 'confirm'; userId: string }
  | { kind: 'reused' }
  | { kind: 'invalid' }
  | { kind: 'scope'; foreign: string[] };

/** What a session's access token is decided by: its id, client, `amr` and when it ends. */
type SessionEnds = Pick<SessionRow, 'id' | 'amr' | 'clientId' | 'expiresAt' | 'idleExpiresAt'>;

/**
 * Sessions are refresh-token families. A refresh token is opaque (≥ 256 random bits), stored as an
 * HMAC under the server pepper, and rotates on every use; presenting a rotated one after the grace
 * revokes the whole family (RFC 9700 §4.14.2).
 */
/** A session not ended, and within its idle and absolute lifetimes at `now`. */
const isLive = (session: SessionRow, now: Date) =>
  !session.revokedAt && session.expiresAt > now && session.idleExpiresAt > now;

export function createSessionsService(deps: SessionsServiceDeps) {
  const hash = (token: string) => keyedHash(deps.pepper, token);

  async function mintRefreshToken(
    sessionId: string,
    tx: Executor,
    token = generateSecret(REFRESH_TOKEN_FORMAT).token,
  ) {
    await deps.repo.insertRefreshToken(
      { sessionId, tokenHash: hash(token), createdAt: deps.clock.now() },
      tx,
    );
    return token;
  }

  /**
   * The token a refresh token rotates to, derived from it under a key of the pepper's: the same for
   * every redemption of one token. So a refresh repeated within the grace (two tabs, a retry, or a
   * thief) gets the successor already handed out, and a family never has two live chains: whoever
   * rotates it first leaves the other holding a used token, which ends the family when it comes back.
   */
  const successorKey = createHmac('sha256', deps.pepper).update('refresh-token successor').digest();
  const successorOf = (token: string) => derivedSecret(REFRESH_TOKEN_FORMAT, successorKey, token);

  /** Events that revoke every token of these sessions on every instance. */
  async function revocationEvents(tx: Executor, sessionIds: string[]): Promise<AuthEvent[]> {
    return deps.revocations.revokeAll(tx, 'session', sessionIds);
  }

  /** What a session holds: the user's roles, less those it has not given the second factor for. */
  const heldBy = (userId: string, amr: readonly string[], tx?: Executor) =>
    deps.users.rolesAndPermissions(userId, tx, { except: rolesWithheld(amr) });
  const rolesWithheld = (amr: readonly string[]) =>
    amr.includes('mfa') ? [] : (deps.mfaRequiredRoles ?? []);

  async function accessTokenFor(user: UserRow, session: SessionEnds, held?: Held) {
    const { id: sessionId, amr } = session;
    const { roles, permissions } = held ?? (await heldBy(user.id, amr));
    const issued = await deps.tokens.issue({
      sub: user.id,
      audience: deps.audience,
      ttlSeconds: deps.ttl.access,
      // RFC 9068 §2.2: the client the session (and so the token) was issued to.
      clientId: session.clientId ?? FIRST_PARTY_CLIENT_ID,
      permissions,
      roles,
      sessionId,
      email: user.email,
      amr,
      // No later than the session's end, whichever of its lifetimes comes first.
      notAfter: new Date(Math.min(session.expiresAt.getTime(), session.idleExpiresAt.getTime())),
      // A session's token is decided on the database, not on caches: the session was opened (or
      // refreshed) with the account's row locked and active, and a disable ends it, revoking its
      // tokens by `sid` whenever they were issued. So the subject's revocations this instance knows of
      // now are ones this token was issued after (a user disabled and enabled again signs in at once).
      revocationsSeen: deps.tokens.revocationsSeen(),
    });
    deps.onIssued?.('session');
    return issued;
  }

  /** Ends every live session of a user (but `except`) on `tx`: their ids, and the events to emit. */
  async function endAllOf(tx: Executor, userId: string, reason: string, except?: string) {
    // The user's row first: a sign-in opening a session holds it (share-locked) until it commits, so
    // that session is there to be ended; one of a second factor's verification too.
    await deps.users.findByIdForUpdate(userId, tx);
    const ids = await deps.repo.revokeForUser(userId, deps.clock.now(), reason, except ? { except } : {}, tx);
    await deps.repo.discardMfaChallenges(userId, tx);
    return { ids, events: await revocationEvents(tx, ids) };
  }

  /**
   * A refresh of a user the provider has not confirmed recently (providerStanding.due): asks it. A user
   * it holds banned, or has no more, is refused as a disabled account's refresh is (invalid_grant),
   * and every session of theirs ends, their access tokens revoked on every instance, audited as
   * `user.sessions_ended` (`reason`) by the service. No answer lets the refresh through.
   */
  async function confirmAtProvider(userId: string, context: RequestContext): Promise<void> {
    const standing = (await deps.providerStanding?.check(userId, context.requestId)) ?? 'active';
    if (standing === 'active') return;
    const reason = PROVIDER_REFUSAL_REASONS[standing];
    await inTransaction(deps.db, deps.events, async (tx, emit) => {
      const { ids, events } = await endAllOf(tx, userId, reason);
      // Ended already (a refresh of another of their sessions got here first): audited once.
      if (ids.length === 0) return;
      events.forEach(emit);
      await deps.audit.record(
        tx,
        { ...context, actorType: 'system', actorId: null, credentialId: null },
        { type: 'user.sessions_ended', subjectId: userId, data: { scope: 'all', sessions: ids, reason } },
      );
    });
    throw invalidRefreshToken();
  }

  return {
    /**
     * Opens a session on `tx`; the refresh token is returned once and only its hash is kept. A user
     * who would have more than `maxPerUser` live sessions with it loses the least recently used
     * others (opened or refreshed longest ago), ended as any session end is — refresh tokens
     * refused, access tokens revoked on every instance (`emit`), audited as `auth.session_ended`
     * (`reason: session_limit`) by the user signing in (`context`) — so the sign-in itself never fails
     * for the limit.
     */
    async start(
      tx: IssuingTransaction,
      user: UserRow,
      meta: {
        ip: string | null;
        userAgent: string | null;
        clientId?: string | null;
        /** How the user authenticated (RFC 8176), carried by the session's access tokens. */
        amr: readonly string[];
        /** An exchanged Supabase token: when the user signed in at Supabase (sessions.authenticated_at). */
        authenticatedAt?: Date | null;
      },
      opening: { context: RequestContext; emit: (event: AuthEvent) => void },
    ): Promise<{ session: SessionRow; refreshToken: string }> {
      // A disable racing the login either waits for this session (and ends it) or has committed,
      // and the login fails as it would for a disabled account.
      if ((await deps.users.findByIdForShare(user.id, tx))?.status !== 'active') {
        throw new AppError('invalid_credentials');
      }
      // Concurrent sign-ins of the user take turns here (the row lock above is shared): each counts
      // the sessions the others opened, and the user never stays above the limit.
      await deps.repo.lockOpeningFor(user.id, tx);
      const now = deps.clock.now();
      const ended = await deps.repo.revokeLeastRecentlyUsed(
        user.id,
        now,
        deps.maxPerUser - 1,
        SESSION_LIMIT_REASON,
        tx,
      );
      if (ended.length > 0) {
        for (const event of await revocationEvents(tx, ended)) opening.emit(event);
        await deps.audit.record(
          tx,
          { ...opening.context, actorType: 'user', actorId: user.id, credentialId: null },
          ended.map((id) => ({
            type: 'auth.session_ended',
            subjectId: user.id,
            data: { session_id: id, reason: SESSION_LIMIT_REASON, limit: deps.maxPerUser },
          })),
        );
      }
      const session = await deps.repo.insertSession(
        {
          userId: user.id,
          clientId: meta.clientId ?? null,
          ip: meta.ip,
          userAgent: meta.userAgent,
          createdAt: now,
          lastUsedAt: now,
          idleExpiresAt: addSeconds(now, Math.min(deps.ttl.refreshIdle, deps.ttl.refreshAbsolute)),
          expiresAt: addSeconds(now, deps.ttl.refreshAbsolute),
          amr: [...meta.amr],
          authenticatedAt: meta.authenticatedAt ?? null,
        },
        tx,
      );
      return { session, refreshToken: await mintRefreshToken(session.id, tx) };
    },

    /** Resolves once a key can sign; 503 while none can (for a change made before the transaction). */
    signingReady: () => deps.tokens.signingReady(),

    /**
     * A transaction whose change an access token is issued after (a session opened, a refresh token
     * rotated), begun once a key can sign: a 503 for no key (tokens.signingReady, from memory while a
     * key signs) comes before anything is written, not after the commit, when the token is signed —
     * no session nobody holds, no mailed link or second factor's challenge spent, no refresh token
     * rotated that a retry would present as a replay.
     */
    async issuingTransaction<T>(
      work: (tx: IssuingTransaction, emit: (event: AuthEvent) => void) => Promise<T>,
    ): Promise<T> {
      await deps.tokens.signingReady();
      return inTransaction(deps.db, deps.events, (tx, emit) => work(tx as IssuingTransaction, emit));
    },

    /** The `session` object of API.md: a fresh access token with the user's current roles. */
    async tokensFor(
      user: UserRow,
      session: SessionEnds,
      refreshToken: string,
      held?: Held,
    ): Promise<SessionTokens> {
      const access = await accessTokenFor(user, session, held);
      return {
        access_token: access.token,
        token_type: 'Bearer',
        expires_in: access.expiresIn,
        refresh_token: refreshToken,
      };
    },

    /**
     * Rotates the refresh token and issues an access token with the user's current permissions, or
     * with `scope` (RFC 6749 §6, the OAuth refresh grant): a subset of them, for this access token
     * only — the session keeps its whole grant. A scope beyond it is `invalid_scope` and changes
     * nothing (the token is not rotated).
     *
     * `clientId`: the client presenting it (RFC 6749 §6: the refresh token must have been issued to
     * it); by default the first-party frontend client, the one /v1/auth/refresh serves, which has no
     * credentials. A token of a session issued to another client is refused as an unknown one is, and
     * nothing of its session changes: a confidential client's refresh token is good only with that
     * client's authentication (/oauth/token), never at an endpoint that asks for none.
     *
     * With Supabase, a user it has not confirmed within SUPABASE_USER_RECHECK_SECONDS is asked about
     * first (confirmAtProvider): one banned or deleted there is refused, and their sessions end.
     */
    async refresh(
      refreshToken: string,
      context: RequestContext,
      options: { scope?: readonly string[]; clientId?: string } = {},
    ): Promise<SessionTokens> {
      if (!parseSecret(REFRESH_TOKEN_FORMAT, refreshToken)) {
        throw new AppError('invalid_refresh_token', { oauthError: 'invalid_grant' });
      }
      // `confirmed`: the provider has just been asked about the user, and said nothing against them.
      const attempt = (confirmed: boolean) =>
        this.issuingTransaction<RefreshOutcome>(async (tx, emit) => {
          const found = await deps.repo.findByTokenHash(hash(refreshToken), { lock: true }, tx);
          if (!found) return { kind: 'invalid' };
          const { token, session } = found;
          if ((session.clientId ?? FIRST_PARTY_CLIENT_ID) !== (options.clientId ?? FIRST_PARTY_CLIENT_ID))
            return { kind: 'invalid' };
          const now = deps.clock.now();
          if (session.revokedAt || session.expiresAt <= now || session.idleExpiresAt <= now)
            return { kind: 'invalid' };
          const user = await deps.users.findById(session.userId, tx);
          if (user?.status !== 'active') return { kind: 'invalid' };
          if (token.rotatedAt) {
            const sinceRotation = now.getTime() - token.rotatedAt.getTime();
            if (sinceRotation > deps.ttl.reuseGrace * 1000) {
              // A rotated token came back: it was stolen or replayed. End the whole family.
              await deps.repo.revokeSession(session.id, now, 'refresh_token_reused', tx);
              for (const e of await revocationEvents(tx, [session.id])) emit(e);
              await deps.audit.record(tx, context, {
                type: 'refresh_token.reused',
                subjectId: user.id,
                outcome: 'failure',
                data: { session_id: session.id },
              });
              return { kind: 'reused' };
            }
            // Within the grace, a repeated refresh of the same token gets the same successor again
            // (successorOf), instead of a spurious logout or a second chain.
          }
          // Nothing written yet: the provider is asked outside any transaction (no lock held while it
          // answers), and the refresh is tried again once it has.
          if (!confirmed && deps.providerStanding?.due(user)) return { kind: 'confirm', userId: user.id };
          const held = await heldBy(user.id, session.amr, tx);
          if (options.scope) {
            const foreign = notHeld(options.scope, held.permissions);
            if (foreign.length > 0) return { kind: 'scope', foreign };
            // A narrowed token names no roles: a service deciding by role would read more than its scope.
            if (!isSubset(held.permissions, options.scope)) held.roles = [];
            held.permissions = [...options.scope];
          }
          if (!token.rotatedAt) await deps.repo.markRotated(token.id, now, tx);
          const idleExpiresAt = new Date(
            Math.min(addSeconds(now, deps.ttl.refreshIdle).getTime(), session.expiresAt.getTime()),
          );
          await deps.repo.touchSession(session.id, now, idleExpiresAt, tx);
          // A successor handed out before (within the grace) is already stored; it is not stored again.
          const successor = await mintRefreshToken(session.id, tx, successorOf(refreshToken));
          return { kind: 'ok', user, session: { ...session, idleExpiresAt }, held, refreshToken: successor };
        });
      let outcome = await attempt(false);
      if (outcome.kind === 'confirm') {
        await confirmAtProvider(outcome.userId, context);
        outcome = await attempt(true);
      }
      if (outcome.kind === 'scope') {
        throw new AppError('bad_request', {
          detail: `The scope exceeds what the refresh token grants: ${outcome.foreign.join(' ')}`,
          oauthError: 'invalid_scope',
        });
      }
      if (outcome.kind !== 'ok') throw invalidRefreshToken(outcome.kind === 'reused');
      return this.tokensFor(outcome.user, outcome.session, outcome.refreshToken, outcome.held);
    },

    /** The session a refresh token belongs to (for logout and revocation), if live. */
    async findByRefreshToken(refreshToken: string): Promise<SessionRow | undefined> {
      if (!parseSecret(REFRESH_TOKEN_FORMAT, refreshToken)) return undefined;
      return (await deps.repo.findByTokenHash(hash(refreshToken)))?.session;
    },

    /**
     * The session a refresh token (current or rotated out) names, while it lasts: not ended, idle or
     * past its lifetime. What a logout or a revocation may still end; undefined for anything else.
     */
    async findLiveSessionOf(refreshToken: string): Promise<SessionRow | undefined> {
      const session = await this.findByRefreshToken(refreshToken);
      return session && isLive(session, deps.clock.now()) ? session : undefined;
    },

    /**
     * A refresh token that would be accepted now (introspection, RFC 7662): its session is live, its
     * user active, and it has not been rotated. Undefined for anything else.
     */
    async findLiveRefreshToken(
      refreshToken: string,
    ): Promise<{ session: SessionRow; issuedAt: Date; expiresAt: Date } | undefined> {
      if (!parseSecret(REFRESH_TOKEN_FORMAT, refreshToken)) return undefined;
      const found = await deps.repo.findByTokenHash(hash(refreshToken));
      if (!found || found.token.rotatedAt) return undefined;
      const { session } = found;
      if (!isLive(session, deps.clock.now())) return undefined;
      const user = await deps.users.findById(session.userId);
      if (user?.status !== 'active') return undefined;
      return {
        session,
        issuedAt: found.token.createdAt,
        expiresAt: new Date(Math.min(session.idleExpiresAt.getTime(), session.expiresAt.getTime())),
      };
    },

    /** Ends one session on `tx`; returns the events to emit (none when it had already ended). */
    async endSession(tx: Executor, sessionId: string, reason: string): Promise<AuthEvent[]> {
      const revoked = await deps.repo.revokeSession(sessionId, deps.clock.now(), reason, tx);
      return revoked ? revocationEvents(tx, [sessionId]) : [];
    },

    /** Ends every live session of a user (but `except`) on `tx`. */
    endAllSessions: async (tx: Executor, userId: string, reason: string, except?: string) =>
      (await endAllOf(tx, userId, reason, except)).events,

    /** The session's user proved more (a second factor): its next access tokens say so in `amr`. */
    strengthen: (tx: Executor, sessionId: string, methods: readonly string[]) =>
      deps.repo.addAmr(sessionId, methods, tx),

    /** The user's live sessions, newest first, a page at a time. */
    async listLive(userId: string, options: { limit: number; cursor?: string | undefined }) {
      const rows = await deps.repo.listLive(userId, deps.clock.now(), {
        limit: options.limit,
        cursor: decodeCursor(options.cursor),
      });
      return pageBy(rows, options.limit, (last) => encodeCursor({ at: last.createdAt, id: last.id }));
    },
    findSession: (id: string) => deps.repo.findSession(id),
    /**
     * The session on `tx`, share-locked until it ends, while it is live (undefined otherwise): a
     * change made with one of its tokens commits before the session can end, or sees it ended.
     */
    async liveForShare(tx: Executor, id: string): Promise<SessionRow | undefined> {
      const session = await deps.repo.findSessionForShare(id, tx);
      return session && isLive(session, deps.clock.now()) ? session : undefined;
    },
    /**
     * Whether a session is live now: not ended, nor past its idle or absolute expiry. What the list
     * shows, and what can still be ended (one past its expiry has ended already).
     */
    isLive: (session: SessionRow) => isLive(session, deps.clock.now()),
  };
}

export type SessionsService = ReturnType<typeof createSessionsService>;
