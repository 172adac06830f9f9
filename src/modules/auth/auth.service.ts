import { PasswordReplaced } from './password-replaced.js';
import type { Database } from '../../db/client.js';
import { checkPasswordStrength } from '../../identity/passwords.js';
import {
  AccountDisabled,
  EmailNotConfirmed,
  type IdentityProvider,
  PasswordMayHaveChanged,
  type ProviderUser,
} from '../../identity/provider.js';
import type { Clock } from '../../lib/clock.js';
import { AppError, invalidFields, isAppError, notFound, notYours, pgErrorCode } from '../../lib/errors.js';
import { type AuthEvent, type EventBus, inTransaction } from '../../lib/events.js';
import type { GuessCounter } from '../../lib/throttle.js';
import { LRUCache } from 'lru-cache';
import type { Logger } from 'pino';
import type { MailOutbox } from '../mail/mail-outbox.js';
import type { AuditEventType, AuditService, RequestContext } from '../audit/audit.service.js';
import type { RevocationList } from '../tokens/revocations.service.js';
import type { UserRow, UsersRepository } from '../users/users.repository.js';
import type { EmailConfirmationService } from './email-confirmation.service.js';
import type { EmailTokensRepository } from './email-tokens.repository.js';
import type { MfaService } from './mfa.service.js';
import { normalizeEmail } from './auth.schema.js';
import type { IssuingTransaction, SessionsService, SessionTokens } from './sessions.service.js';
import type { SessionRow } from './sessions.repository.js';

export interface AuthServiceDeps {
  db: Database;
  users: UsersRepository;
  provider: IdentityProvider;
  sessions: SessionsService;
  revocations: RevocationList;
  audit: AuditService;
  events: EventBus;
  clock: Clock;
  failures: GuessCounter;
  logger?: Pick<Logger, 'warn' | 'info'>;
  onLogin?: (outcome: 'success' | 'failure' | 'locked') => void;
  /** Reset links already mailed stop working when the password changes. */
  emailTokens: Pick<EmailTokensRepository, 'discardUnused'>;
  /** A user with a second factor gets a challenge at sign-in instead of a session. */
  mfa: Pick<MfaService, 'isEnabled' | 'challenge'>;
  /** Where the notice of a password change goes (mail-outbox.ts); undefined when the service sends no mail. */
  outbox?: MailOutbox | undefined;
  /** REQUIRE_EMAIL_CONFIRMATION (built-in provider): sign-in waits for a confirmed address. */
  requireEmailConfirmation?: boolean;
}

/** RFC 8176: the session began with a password. */
const PASSWORD_AMR = ['pwd'] as const;
/** How recent a sign-in stands in for the password of an account without one. */
const RECENT_SIGN_IN_MS = 5 * 60_000;

const invalidCredentials = () =>
  new AppError('invalid_credentials', { detail: 'The email or password is incorrect' });

/**
 * A password check (a login, the password asked again, a change's current one): a user the provider
 * refuses whatever the password (AccountDisabled) says so.
 */
const disabledAtProvider = (err: unknown): 'disabled' => {
  if (err instanceof AccountDisabled) return 'disabled';
  throw err;
};

/**
 * The answer to a signed-in caller whose account the provider refuses whatever the password (a user
 * banned at Supabase), as an exchange answers one: the caller holds the account's own credential, so
 * saying so tells nobody else anything, and a wrong password it is not.
 */
const accountDisabled = () => new AppError('invalid_token', { detail: 'The account is disabled' });

/**
 * A sign-in at Supabase that has not given the user's second factor there (aal1): Supabase itself
 * grants such a session nothing the factor guards, so neither does the service. The user signs in
 * with Supabase, gives the factor there, and exchanges that (aal2) session's access token.
 */
const providerSecondFactorRequired = (via: 'login' | 'exchange') =>
  new AppError('provider_mfa_required', {
    detail:
      (via === 'login'
        ? 'Your account has a second factor (MFA) at the identity provider, which a password alone does not give: '
        : 'Your account has a second factor (MFA) at the identity provider, and the session of this token has not ' +
          'given it: ') +
      'complete the second factor with Supabase (supabase-js auth.mfa.challenge and auth.mfa.verify) and use ' +
      'that session’s access token at POST /v1/auth/exchange. No session was opened',
  });

/**
 * The bootstrap admin's password check: an account the provider refuses whatever the password is no
 * match, as a wrong password.
 */
const noMatchIfDisabled = (err: unknown): undefined => {
  if (err instanceof AccountDisabled) return undefined;
  throw err;
};

export function createAuthService(deps: AuthServiceDeps) {
  /**
   * A sign-up the provider accepted but whose local account did not commit (the database failed, or
   * the email is taken here): the provider's new user is removed again, so the address can register
   * once more instead of meeting an account that exists on one side only. Only when this database
   * surely has no such user: if it cannot say (it is the one failing), or the row is there after all
   * (a commit whose answer was lost), the provider's user stays — a sign-in re-creates the local row.
   */
  async function discardProviderUser(userId: string, context: RequestContext) {
    let known: boolean;
    try {
      known = (await deps.users.findById(userId)) !== undefined;
    } catch {
      return;
    }
    if (known) return;
    try {
      await deps.provider.deleteUser(userId);
    } catch (err) {
      deps.logger?.warn(
        { err, userId, reqId: context.requestId },
        'could not remove the provider user of a failed sign-up',
      );
    }
  }

  /**
   * The provider's account and the local one disagree: the provider user's email is held here by
   * another account (a user deleted or recreated in Supabase's dashboard, an email changed there to
   * one an older local account still has). Nothing is merged or overwritten automatically: an
   * administrator decides (delete the stale local account, or change the address in Supabase).
   */
  const accountConflict = (pu: ProviderUser, context: RequestContext, cause?: unknown) => {
    deps.logger?.warn(
      {
        reqId: context.requestId,
        providerUserId: pu.id,
        emailDomain: pu.email.split('@')[1] ?? null,
        err: cause,
      },
      'the identity provider and this service disagree about an account: its email is held by another local account',
    );
    return new AppError('account_conflict', {
      detail: 'This account cannot sign in until an administrator resolves a conflict with another account',
      cause,
    });
  };

  /**
   * The local row of a provider user, created (with the `user` role and a profile) when missing;
   * undefined when it is missing because the account was deleted (see below).
   */
  async function ensureLocalUser(
    pu: ProviderUser,
    context: RequestContext,
    again = true,
  ): Promise<UserRow | undefined> {
    const existing = await deps.users.findById(pu.id);
    if (existing) {
      if (existing.email !== pu.email || +(existing.emailConfirmedAt ?? 0) !== +(pu.emailConfirmedAt ?? 0)) {
        // Every instance's cached /v1/auth/me view shows the email and its confirmation.
        return inTransaction(deps.db, deps.events, async (tx, emit) => {
          const updated = await deps.users.update(
            existing.id,
            { email: pu.email, emailConfirmedAt: pu.emailConfirmedAt },
            tx,
          );
          // An address changed in Supabase (by the user, through supabase-js): in their activity too.
          if (existing.email !== pu.email)
            await deps.audit.record(
              tx,
              // At a sign-in, the user who just proved it; otherwise whoever's request found it.
              context.actorType === 'anonymous' ? { ...context, actorType: 'user', actorId: pu.id } : context,
              {
                type: 'user.email_changed',
                subjectId: existing.id,
                data: {
                  via: 'provider',
                  old_email_domain: existing.email.split('@')[1] ?? null,
                  new_email_domain: pu.email.split('@')[1] ?? null,
                },
              },
            );
          emit({ type: 'user_changed', userId: existing.id });
          return updated ?? existing;
        }).catch((err: unknown) => {
          // The new email is another local account's (unique_violation).
          if (pgErrorCode(err) === '23505') throw accountConflict(pu, context, err);
          throw err;
        });
      }
      return existing;
    }
    // No row: the user's first sign-in here, or an account deleted after the provider vouched for it
    // (a deletion removes the provider's user first, then the row). Only a user the provider has now
    // is given one: a sign-in under way as an administrator deleted the account does not bring it back.
    if (deps.provider.currentUser && (await deps.provider.currentUser(pu.id)) === undefined) return undefined;
    const created = await inTransaction(deps.db, deps.events, async (tx) => {
      const row = await deps.users.insert(
        { id: pu.id, email: pu.email, provider: deps.provider.name, emailConfirmedAt: pu.emailConfirmedAt },
        tx,
      );
      if (!row) return undefined;
      await deps.users.assignRole(row.id, 'user', null, tx);
      await deps.users.createProfile(row.id, null, tx);
      await deps.audit.record(tx, context, {
        type: 'user.registered',
        subjectId: row.id,
        data: { via: 'provider' },
      });
      return row;
    });
    if (created) return created;
    // Not inserted: either a concurrent first sign-in of the same user created the row (read it, once),
    // or the email belongs to another local account.
    if (again) return ensureLocalUser(pu, context, false);
    throw accountConflict(pu, context);
  }

  /**
   * The account as it stands, its address included, before a password of it is checked by address:
   * with Supabase, where the user may have changed their address (supabase-js updateUser) since they
   * last signed in here, the row takes the one Supabase has now, as a sign-in would (a conflict is 409
   * `account_conflict`); a sign-in with the old one would be refused, and counted, as a wrong password.
   */
  async function withCurrentEmail(user: UserRow, context: RequestContext): Promise<UserRow> {
    if (!deps.provider.currentUser) return user;
    const current = await deps.provider.currentUser(user.id);
    // Gone from the provider: its sign-in refuses the password anyway.
    if (!current || current.email === user.email) return user;
    return (await ensureLocalUser(current, context)) ?? user;
  }

  /**
   * ensureLocalUser for a sign-in of kind `type` (a login, an exchange): a conflict is refused like a
   * failed sign-in of that kind, and audited as one. Undefined for an account deleted while the
   * credential was checked, which does not come back.
   */
  async function signInUser(
    pu: ProviderUser,
    context: RequestContext,
    email: string,
    type: 'auth.login' | 'auth.exchange',
  ): Promise<UserRow | undefined> {
    // The built-in provider's users live in this database alone: one whose row is gone now was
    // deleted while the password was checked.
    if (deps.provider.name === 'local') return deps.users.findById(pu.id);
    try {
      return await ensureLocalUser(pu, context);
    } catch (err) {
      if (isAppError(err) && err.code === 'account_conflict') {
        // Not a guessed password (the provider accepted it): audited, not counted toward the lockout.
        const options = { data: { provider_user_id: pu.id } };
        if (type === 'auth.login')
          await recordLoginFailure(context, email, null, 'account_conflict', options);
        else await recordSignInFailure(type, context, email, null, 'account_conflict', options);
      }
      throw err;
    }
  }

  /**
   * A sign-in's session, on the caller's transaction, for a sign-in that gave its first factor only:
   * `second_factor` (nothing made) when the user has one to give first (checked under the user's row,
   * share-locked: an activation locks it before ending sessions, so a session opened meanwhile is
   * either ended by it or not opened). With `checkedHash` (a password sign-in, built-in provider),
   * PasswordReplaced when the password is no longer the one checked: a reset or a change updates the
   * row before ending the sessions, so a session is either ended by it or not opened.
   * `authenticatedAt`: an exchange's, when the user signed in at the provider.
   */
  async function startSessionIn(
    tx: IssuingTransaction,
    emit: (event: AuthEvent) => void,
    user: UserRow,
    context: RequestContext,
    type: AuditEventType,
    amr: readonly string[],
    checkedHash?: string,
    authenticatedAt?: Date | null,
  ) {
    const row = await deps.users.findByIdForShare(user.id, tx);
    if (checkedHash !== undefined && row?.passwordHash !== checkedHash) throw new PasswordReplaced();
    if (await deps.mfa.isEnabled(user.id, tx)) return 'second_factor' as const;
    const started = await deps.sessions.start(
      tx,
      user,
      { ip: context.ip, userAgent: context.userAgent, amr, authenticatedAt },
      { context, emit },
    );
    await deps.audit.record(
      tx,
      { ...context, actorType: 'user', actorId: user.id },
      {
        type,
        subjectId: user.id,
        data: { session_id: started.session.id },
      },
    );
    return started;
  }

  async function openSession(
    user: UserRow,
    context: RequestContext,
    type: AuditEventType,
    amr: readonly string[],
    checkedHash?: string,
    authenticatedAt?: Date | null,
  ): Promise<SessionTokens | 'second_factor'> {
    const opened = await deps.sessions.issuingTransaction((tx, emit) =>
      startSessionIn(tx, emit, user, context, type, amr, checkedHash, authenticatedAt),
    );
    if (opened === 'second_factor') return opened;
    return deps.sessions.tokensFor(user, opened.session, opened.refreshToken);
  }

  /** Audits a refused sign-in of one kind (`auth.login`, `auth.exchange`): who, why, the address's domain. */
  function recordSignInFailure(
    type: 'auth.login' | 'auth.exchange',
    context: RequestContext,
    email: string,
    userId: string | null,
    reason: string,
    options: { data?: Record<string, unknown> } = {},
  ) {
    return deps.audit.record(deps.db, context, {
      type,
      outcome: 'failure',
      subjectId: userId,
      data: { reason, ...options.data, email_domain: email.split('@')[1] ?? null },
    });
  }

  /** Audits a refused sign-in (the guess was counted, or given back, by `passwordGuess`). */
  async function recordLoginFailure(
    context: RequestContext,
    email: string,
    userId: string | null,
    reason: string,
    options: { data?: Record<string, unknown> } = {},
  ) {
    await recordSignInFailure('auth.login', context, email, userId, reason, options);
    deps.onLogin?.('failure');
  }

  /** The `admin` role for an existing user (bootstrap), audited; false when they had it. */
  async function grantAdmin(user: UserRow, context: RequestContext): Promise<boolean> {
    return inTransaction(deps.db, deps.events, async (tx, emit) => {
      const added = await deps.users.assignRole(user.id, 'admin', null, tx);
      if (added) {
        await deps.audit.record(tx, context, {
          type: 'role.granted',
          subjectId: user.id,
          data: { role: 'admin', bootstrap: true },
        });
        emit({ type: 'user_changed', userId: user.id });
      }
      return added;
    });
  }

  /**
   * A password guess for the account of `email` (a sign-in, or the current password asked again),
   * counted toward its lockout before it is checked: guesses sent at once cannot all be checked
   * before any of them is counted. 429 while the account is locked, audited as a failure of `action`
   * (`locked`), and not counted. `forgive()` gives the count back for a guess that was no failed one:
   * the right password, or one never checked (the provider failing).
   */
  /** When a lock's refusal was last audited, by action and address. */
  const lockAudits = new LRUCache<string, number>({ max: 10_000 });

  async function passwordGuess(
    email: string,
    context: RequestContext,
    action: AuditEventType,
    subjectId: () => Promise<string | null>,
  ): Promise<{ forgive(): Promise<void> }> {
    const { retryAfter, release } = await deps.failures.reserve(email);
    if (retryAfter > 0) {
      deps.onLogin?.('locked');
      // Every attempt is logged (SECURITY.md), the refused ones too: by request id and action, without
      // the address.
      deps.logger?.info(
        { reqId: context.requestId, action, reason: 'locked', retryAfter },
        'password guess refused: the account is locked',
      );
      // Audited under the account, once a minute per account and action (every refusal is in the
      // metrics): a refusal costs no hash, and each one written would let anyone fill the audit log,
      // and bury the account's own activity, at the per-IP limit's pace.
      const auditKey = `${action}\u0000${email}`;
      const last = lockAudits.get(auditKey);
      if (last === undefined || deps.clock.nowMs() - last >= 60_000) {
        lockAudits.set(auditKey, deps.clock.nowMs()); // before the lookup: refusals at once write one
        const id = await subjectId();
        if (id !== null) {
          await deps.audit.record(deps.db, context, {
            type: action,
            outcome: 'failure',
            subjectId: id,
            data: { reason: 'locked', retry_after: retryAfter, email_domain: email.split('@')[1] ?? null },
          });
        }
      }
      throw new AppError('rate_limited', {
        detail: 'Too many failed sign-ins for this account; try again later',
        headers: { 'retry-after': String(retryAfter) },
      });
    }
    let counted = true;
    return {
      async forgive() {
        if (!counted) return;
        counted = false;
        await release();
      },
    };
  }

  /** Runs `work`; anything it throws gives the guess back first (it was never checked, or was right). */
  async function unlessThrown<T>(guess: { forgive(): Promise<void> }, work: () => Promise<T>): Promise<T> {
    try {
      return await work();
    } catch (err) {
      await guess.forgive();
      throw err;
    }
  }

  async function bootstrapOnce(
    input: { email: string; password: string | undefined; force?: boolean },
    context: RequestContext,
  ) {
    const email = normalizeEmail(input.email);
    // An admin someone can act as: holders of the role who are disabled, or invitations nobody has
    // taken (which may expire unopened), leave the service without one, and the bootstrap admin is made.
    if (!input.force && (await deps.users.countUsableHolders('admin')) > 0) {
      return { user: await deps.users.findByEmail(email), created: false, granted: false, ignored: true };
    }
    const existing = await deps.users.findByEmail(email);
    if (existing) {
      // At start (not `force`), the address is all the operator named, and on a database with no admin
      // yet anyone may have registered it first (without the mailbox, where sign-in does not wait for
      // a confirmed address): the account is made admin only when BOOTSTRAP_ADMIN_PASSWORD is its
      // password, as for an account only Supabase has (below). The command line's `force` without a
      // password is the operator's explicit grant to the account as it is; with one, the password must
      // be the account's there too, or the operator meant another account than the one found.
      if (!input.force && !input.password) {
        // Only with Supabase (the built-in provider's start needs BOOTSTRAP_ADMIN_PASSWORD): an account
        // that signs in without a password (a social login) is the operator's when Supabase confirmed
        // its address, which a squatter of the address cannot do.
        if (!existing.emailConfirmedAt)
          throw new AppError('validation_failed', {
            detail:
              'BOOTSTRAP_ADMIN_EMAIL has an account whose address is not confirmed, and no ' +
              'BOOTSTRAP_ADMIN_PASSWORD proves it is yours: someone else may have registered the address; ' +
              'confirm it, set BOOTSTRAP_ADMIN_PASSWORD to its password, or grant admin with npm run ' +
              'create-admin once you know whose account it is',
          });
      } else if (!input.force || input.password) {
        const proven = input.password
          ? await deps.provider.signIn(email, input.password).catch(noMatchIfDisabled)
          : undefined;
        if (proven?.id !== existing.id)
          throw new AppError('validation_failed', {
            detail: input.force
              ? `${email} has an account, and the password given is not its password: nobody was made ` +
                'admin (someone else may have registered the address); to grant admin to that account ' +
                'as it is, run again without a password (no --password, ADMIN_PASSWORD unset)'
              : 'BOOTSTRAP_ADMIN_EMAIL has an account, and BOOTSTRAP_ADMIN_PASSWORD is not its password: ' +
                'someone else may have registered the address; grant admin with npm run create-admin ' +
                'once you know whose account it is',
          });
      }
      return { user: existing, created: false, granted: await grantAdmin(existing, context) };
    }
    if (!input.password)
      throw new AppError('validation_failed', { detail: 'A password is needed to create the admin' });
    checkPasswordStrength(input.password, email);
    // Confirmed at once: the first admin has nobody to send them a confirmation mail.
    const signedUp = await deps.provider
      .createConfirmedUser(email, input.password)
      .catch(async (err: unknown) => {
        if (!(isAppError(err) && err.code === 'email_taken')) throw err;
        // The provider has the account and this database does not (a new database on an existing
        // Supabase project): with its password, the local account is made for it and made admin.
        const identity = await deps.provider.signIn(email, input.password!).catch(noMatchIfDisabled);
        if (!identity)
          throw new AppError('validation_failed', {
            detail:
              'BOOTSTRAP_ADMIN_EMAIL has an account at the identity provider, and BOOTSTRAP_ADMIN_PASSWORD is not its password',
          });
        const existing = await ensureLocalUser(identity, context);
        if (!existing)
          throw new AppError('validation_failed', {
            detail:
              'BOOTSTRAP_ADMIN_EMAIL has an account at the identity provider that was deleted meanwhile',
          });
        return { existing };
      });
    if ('existing' in signedUp) {
      return {
        user: signedUp.existing,
        created: false,
        granted: await grantAdmin(signedUp.existing, context),
      };
    }
    const user = await inTransaction(deps.db, deps.events, async (tx) => {
      const row = await deps.users.insert(
        {
          id: signedUp.user.id,
          email,
          provider: deps.provider.name,
          passwordHash: signedUp.passwordHash,
          emailConfirmedAt: signedUp.user.emailConfirmedAt ?? deps.clock.now(),
        },
        tx,
      );
      if (!row) throw new AppError('email_taken');
      await deps.users.assignRole(row.id, 'user', null, tx);
      await deps.users.assignRole(row.id, 'admin', null, tx);
      await deps.users.createProfile(row.id, 'Administrator', tx);
      await deps.audit.record(tx, context, {
        type: 'user.registered',
        subjectId: row.id,
        data: { bootstrap: true },
      });
      await deps.audit.record(tx, context, {
        type: 'role.granted',
        subjectId: row.id,
        data: { role: 'admin', bootstrap: true },
      });
      return row;
    });
    return { user, created: true, granted: true };
  }

  return {
    async register(
      input: { email: string; password: string; displayName?: string | undefined },
      context: RequestContext,
      options: {
        /** The confirmation mail, written with the account (the route's; tests may go without). */
        confirmation?: Pick<EmailConfirmationService, 'registration'>;
      } = {},
    ): Promise<{ user: UserRow; session: SessionTokens | null }> {
      const email = normalizeEmail(input.email);
      checkPasswordStrength(input.password, email);
      // No key can sign (503): said before the account is made, not after (a retry would be a 409).
      await deps.sessions.signingReady();
      const signedUp = await deps.provider.signUp(email, input.password);
      // The confirmation mail's place under the address's hourly cap, taken before the transaction
      // that writes the mail with the account, and given back if it fails.
      const mail = await options.confirmation?.registration(email);
      const local = deps.sessions.issuingTransaction(async (tx, emit) => {
        const row = await deps.users.insert(
          {
            id: signedUp.user.id,
            email,
            provider: deps.provider.name,
            passwordHash: signedUp.passwordHash,
            emailConfirmedAt: signedUp.user.emailConfirmedAt,
          },
          tx,
        );
        if (!row) throw new AppError('email_taken');
        await deps.users.assignRole(row.id, 'user', null, tx);
        await deps.users.createProfile(row.id, input.displayName ?? null, tx);
        const actor = { ...context, actorType: 'user' as const, actorId: row.id };
        await deps.audit.record(tx, actor, {
          type: 'user.registered',
          subjectId: row.id,
          data: { provider: deps.provider.name, confirmed: signedUp.confirmed },
        });
        // With the account: a registration answered 201/202 has its confirmation mail committed.
        await mail?.write(tx, row, context);
        if (!signedUp.confirmed) return { user: row, refreshToken: null, session: null };
        const started = await deps.sessions.start(
          tx,
          row,
          { ip: context.ip, userAgent: context.userAgent, amr: PASSWORD_AMR },
          { context: actor, emit },
        );
        return { user: row, refreshToken: started.refreshToken, session: started.session };
      });
      const {
        user,
        refreshToken,
        session: opened,
      } = await local.catch(async (err: unknown) => {
        await mail?.failed();
        // The local provider keeps nothing outside this database; another one may have, and only a
        // user this sign-up made is this sign-up's to undo.
        if (deps.provider.name !== 'local' && signedUp.created !== false)
          await discardProviderUser(signedUp.user.id, context);
        throw err;
      });
      // Sent after the commit, not awaited (the outbox retries what the server refuses).
      await mail?.committed();
      const session =
        refreshToken && opened ? await deps.sessions.tokensFor(user, opened, refreshToken) : null;
      return { user, session };
    },

    async login(input: { email: string; password: string }, context: RequestContext) {
      const email = normalizeEmail(input.email);
      const guess = await passwordGuess(email, context, 'auth.login', async () => {
        return (await deps.users.findByEmail(email))?.id ?? null;
      });
      const identity = await unlessThrown(guess, () =>
        deps.provider.signIn(email, input.password).catch(disabledAtProvider),
      ).catch(async (err: unknown) => {
        // The right password of an address the provider has not seen confirmed (Supabase): not a
        // guess, and audited as the built-in provider's is.
        if (err instanceof EmailNotConfirmed) {
          const known = await deps.users.findByEmail(email);
          await recordLoginFailure(context, email, known?.id ?? null, 'email_not_confirmed');
        }
        throw err;
      });
      if (identity === 'disabled') {
        // Refused by the provider whatever the password (Supabase: banned there; GoTrue checks no
        // password of a banned user): answered, audited and counted as the built-in provider's
        // disabled account is, so that the answer and the lockout tell nobody the account is disabled.
        const known = await deps.users.findByEmail(email);
        await recordLoginFailure(context, email, known?.id ?? null, 'disabled');
        throw invalidCredentials();
      }
      if (!identity) {
        const known = await deps.users.findByEmail(email);
        await recordLoginFailure(
          context,
          email,
          known?.id ?? null,
          known ? 'wrong_password' : 'unknown_email',
        );
        throw invalidCredentials();
      }
      // Past the password: an account the provider's can not be matched with is no failed guess.
      const user = await unlessThrown(guess, async () => {
        const row = await signInUser(identity, context, email, 'auth.login');
        if (!row) throw invalidCredentials();
        return row;
      });
      if (user.status !== 'active') {
        await recordLoginFailure(context, email, user.id, 'disabled');
        throw invalidCredentials();
      }
      if (deps.requireEmailConfirmation && !user.emailConfirmedAt) {
        // Said only after the right password: it tells nobody else whether the account exists.
        await guess.forgive();
        await recordLoginFailure(context, email, user.id, 'email_not_confirmed');
        throw new AppError('email_not_confirmed', {
          detail:
            'Confirm your email address first: follow the link mailed to it, or ask for another with POST /v1/auth/email/resend',
        });
      }
      if (identity.secondFactorMissing) {
        // The right password (not counted), of a user Supabase holds to a second factor the password
        // sign-in did not give: no session, as Supabase itself would grant that session no more.
        await guess.forgive();
        await recordLoginFailure(context, email, user.id, 'provider_mfa_required');
        throw providerSecondFactorRequired('login');
      }
      await deps.failures.reset(email);
      // The password was right; the session waits for the second factor (its own lockout counts codes).
      // The session, or the second factor's challenge, only while the password checked is the
      // account's: one replaced meanwhile (a reset, a change) opens neither.
      const passwordReplaced = async (err: unknown): Promise<never> => {
        if (err instanceof PasswordReplaced)
          await recordLoginFailure(context, email, user.id, 'password_changed');
        throw err;
      };
      const session = await openSession(
        user,
        context,
        'auth.login',
        PASSWORD_AMR,
        identity.checkedHash,
      ).catch(passwordReplaced);
      if (session === 'second_factor')
        throw await deps.mfa
          .challenge(user, 'auth.login', context, identity.checkedHash)
          .catch(passwordReplaced);
      deps.onLogin?.('success');
      return { user, session };
    },

    async exchange(accessToken: string, context: RequestContext) {
      const identity = await deps.provider.exchange(accessToken).catch(async (err: unknown) => {
        // Banned at the provider though its token still verifies: refused as a disabled account here
        // is, before any local account is made for it.
        if (err instanceof AccountDisabled && err.user) {
          const known = await deps.users.findById(err.user.id);
          await recordSignInFailure('auth.exchange', context, err.user.email, known?.id ?? null, 'disabled');
          throw accountDisabled();
        }
        throw err;
      });
      if (!identity) throw new AppError('invalid_token', { detail: 'The provider token is not valid' });
      const user = await signInUser(identity, context, identity.email, 'auth.exchange');
      if (!user) throw new AppError('invalid_token', { detail: 'The provider token is not valid' });
      if (user.status !== 'active') {
        // Audited as a disabled account's sign-in with a password is (the account's activity shows it).
        await recordSignInFailure('auth.exchange', context, identity.email, user.id, 'disabled');
        throw accountDisabled();
      }
      // A user with a second factor at Supabase: only a token whose session gave it (aal2).
      if (identity.secondFactorMissing) {
        await recordSignInFailure('auth.exchange', context, identity.email, user.id, 'provider_mfa_required');
        throw providerSecondFactorRequired('exchange');
      }
      // Its session stands in for a password while the sign-in at Supabase is recent (not the
      // exchange: a token refreshed days after its sign-in, or stolen, is exchanged as often as asked).
      const session = await openSession(
        user,
        context,
        'auth.exchange',
        [],
        undefined,
        identity.signedInAt ?? null,
      );
      if (session === 'second_factor') throw await deps.mfa.challenge(user, 'auth.exchange', context);
      return { user, session };
    },

    refresh: (refreshToken: string, context: RequestContext) => deps.sessions.refresh(refreshToken, context),

    /** The user's row with the address the provider has for them now (for a reset link asked by id). */
    withCurrentEmail,

    /**
     * For other ways of signing in (a mailed link): a transaction begun once a key can sign, a session
     * on it, then its tokens.
     */
    issuingTransaction: deps.sessions.issuingTransaction,
    startSessionIn,
    sessionTokens: (user: UserRow, started: { session: SessionRow; refreshToken: string }) =>
      deps.sessions.tokensFor(user, started.session, started.refreshToken),

    async logout(
      userId: string,
      currentSessionId: string | undefined,
      input: {
        refreshToken?: string | undefined;
        scope: 'session' | 'all';
        /**
         * Asked from a signed-in session, not with an API key: only then does signing out everywhere
         * cancel an email change in waiting, as only a session cancels one (DELETE
         * /v1/auth/email/change), so a leaked key undoes no change, support's least of all.
         */
        bySession: boolean;
      },
      context: RequestContext,
    ): Promise<void> {
      // The refresh token names which of the caller's sessions to end. Someone else's, or one of a
      // session already ended (a frontend's leftover), is treated like an unknown one, and never
      // revealed as either: the caller's current session ends, as it would without one. Read before
      // the transaction: a read of the pool inside it waits for its connection, which on the embedded
      // database (one connection) is the transaction's own, for ever.
      const named =
        input.scope === 'session' && input.refreshToken
          ? await deps.sessions.findLiveSessionOf(input.refreshToken)
          : undefined;
      await inTransaction(deps.db, deps.events, async (tx, emit) => {
        let ended: string[] = [];
        if (input.scope === 'all') {
          const events = await deps.sessions.endAllSessions(tx, userId, 'logout_all');
          events.forEach(emit);
          // Signing out everywhere (a stolen session, say) also voids sign-in links not yet opened, and,
          // from a session, an email change in waiting.
          if (input.bySession) await deps.emailTokens.discardUnused(userId, 'email_change', tx);
          await deps.emailTokens.discardUnused(userId, 'magic_link', tx);
          ended = events.map((e) => (e.type === 'revocation' ? e.value : ''));
        } else {
          const sessionId = named?.userId === userId ? named.id : currentSessionId;
          if (sessionId) {
            const events = await deps.sessions.endSession(tx, sessionId, 'logout');
            events.forEach(emit);
            if (events.length) ended = [sessionId];
          }
        }
        // Ending no session (an API key has none; a refresh token of a session already ended) changes
        // nothing and writes nothing: the caller's activity would show sign-outs that were not.
        if (input.scope === 'session' && ended.length === 0) return;
        await deps.audit.record(tx, context, {
          type: 'auth.logout',
          subjectId: userId,
          data: { scope: input.scope, sessions: ended },
        });
      });
    },

    async changePassword(
      userId: string,
      currentSessionId: string | undefined,
      input: { currentPassword: string; newPassword: string },
      context: RequestContext,
    ): Promise<void> {
      const found = await deps.users.findById(userId);
      // Deleted meanwhile (by a request of its own): the session went with the account.
      if (!found) throw new AppError('invalid_token', { detail: 'The account no longer exists' });
      // What needs no address (the length, the common list) is refused before Supabase is asked for
      // it: an outage there must not make a weak password a 503. Then against the address it has.
      checkPasswordStrength(input.newPassword, undefined, 'body.new_password');
      const user = await withCurrentEmail(found, context);
      checkPasswordStrength(input.newPassword, user.email, 'body.new_password');
      // The current password is a password guess like a login's: the same per-account lockout counts
      // and stops it, so a stolen access token or API key is no oracle for the password.
      const guess = await passwordGuess(user.email, context, 'auth.password_changed', async () => user.id);
      const failed = (reason: string, data: Record<string, unknown> = {}) =>
        deps.audit.record(deps.db, context, {
          type: 'auth.password_changed',
          outcome: 'failure',
          subjectId: user.id,
          data: { reason, ...data },
        });
      const changed = await unlessThrown(guess, () =>
        deps.provider
          .changePassword(
            { id: user.id, email: user.email, emailConfirmedAt: user.emailConfirmedAt },
            input.currentPassword,
            input.newPassword,
          )
          .catch(disabledAtProvider),
      ).catch(async (err: unknown) => {
        // The provider may have changed it: the other sessions end as a change would end them (else
        // whoever they belong to keeps them with a password the owner meant to replace), and the owner
        // is told, as of a change. Still a 503.
        if (err instanceof PasswordMayHaveChanged) {
          const subject = 'Your password may have been changed';
          const text = (ended: boolean) =>
            `A change of the password of your account ${user.email} was asked from a signed-in session, ` +
            'and the identity provider did not answer it: the new password may be in effect already' +
            (ended ? ', and every other session was signed out' : '') +
            '.\n\nIf it was not you, reset your password with "Forgot password" at once and contact ' +
            'support.\n';
          // The notice commits with the sessions' end; if that failed, it is written on its own.
          const mails = await inTransaction(deps.db, deps.events, async (tx, emit) => {
            (await deps.sessions.endAllSessions(tx, user.id, 'password_changed', currentSessionId)).forEach(
              emit,
            );
            await deps.audit.record(tx, context, {
              type: 'auth.password_changed',
              outcome: 'failure',
              subjectId: user.id,
              data: { reason: 'provider_unavailable', other_sessions_ended: true },
            });
            return deps.outbox ? [await deps.outbox.notice(tx, user, subject, text(true))] : [];
          })
            .catch(async (end: unknown) => {
              deps.logger?.warn(
                { err: end, userId: user.id, reqId: context.requestId },
                'a password change Supabase may have applied: ending the other sessions failed',
              );
              return deps.outbox ? [await deps.outbox.notice(deps.db, user, subject, text(false))] : [];
            })
            .catch((unwritten: unknown) => {
              deps.logger?.warn(
                { err: unwritten, userId: user.id, reqId: context.requestId },
                'a password change Supabase may have applied: its notice could not be written',
              );
              return [];
            });
          deps.outbox?.kick(mails);
        }
        // Supabase keeps the change for a session that gave its second factor: the password was
        // right (given back by unlessThrown), nothing changed; audited, not a 503.
        if (isAppError(err) && err.code === 'provider_mfa_required') await failed('provider_mfa_required');
        throw err;
      });
      const incorrect = () =>
        new AppError('incorrect_password', {
          detail: 'The current password is incorrect',
          errors: [{ field: 'body.current_password', message: 'is incorrect' }],
        });
      if (changed === 'disabled') {
        // Refused by the provider whatever the password (Supabase: banned there): audited and counted
        // toward the lockout as a login of the account is, and answered as a disabled account.
        await failed('disabled');
        throw accountDisabled();
      }
      if (!changed) {
        await failed('wrong_password');
        throw incorrect();
      }
      // The password was right: whatever refuses the change now (a concurrent change won) was no guess.
      await guess.forgive();
      const mails = await inTransaction(deps.db, deps.events, async (tx, emit) => {
        // Compare and swap: of concurrent changes that checked the same current password, the first to
        // commit wins; for the others it is no longer the current password, and nothing of theirs stays.
        if (changed.passwordHash && changed.replaces) {
          if (!(await deps.users.replacePasswordHash(user.id, changed.replaces, changed.passwordHash, tx)))
            throw incorrect();
        } else if (changed.passwordHash) {
          await deps.users.update(user.id, { passwordHash: changed.passwordHash }, tx);
        }
        (await deps.sessions.endAllSessions(tx, user.id, 'password_changed', currentSessionId)).forEach(emit);
        await deps.emailTokens.discardUnused(user.id, 'password_reset', tx);
        // An email change asked for with the old password (by whoever else knew it) goes too.
        await deps.emailTokens.discardUnused(user.id, 'email_change', tx);
        await deps.emailTokens.discardUnused(user.id, 'magic_link', tx);
        await deps.audit.record(tx, context, { type: 'auth.password_changed', subjectId: user.id });
        // The notice, with the change: it is not acknowledged without it (sent once it commits).
        if (!deps.outbox) return [];
        return [
          await deps.outbox.notice(
            tx,
            user,
            'Your password was changed',
            `The password of your account ${user.email} was changed from a signed-in session, and every ` +
              'other session was signed out.\n\nIf it was not you, reset your password with "Forgot ' +
              'password" at once and contact support.\n',
          ),
        ];
      });
      deps.outbox?.kick(mails);
      await deps.failures.reset(user.email);
    },

    /**
     * The current password again, for an action that must be the account holder's (deleting the
     * account): a wrong one counts toward the sign-in lockout and is audited as a failure of `action`.
     * An account the provider refuses whatever the password (banned at Supabase) counts and is audited
     * alike, with `reason: disabled`, and is answered as a disabled account (401), not as a wrong password.
     */
    async reauthenticate(userId: string, password: string, action: AuditEventType, context: RequestContext) {
      const found = await deps.users.findById(userId);
      // Deleted meanwhile (by a request of its own, say): the credential no longer stands.
      if (!found) throw new AppError('invalid_token', { detail: 'The account no longer exists' });
      const user = await withCurrentEmail(found, context);
      const guess = await passwordGuess(user.email, context, action, async () => user.id);
      // The provider signs in by address: the identity must be this account (an address it left by an
      // email change may be another's by now), and an address changed since it was read is tried anew.
      // A user the provider refuses whatever the password (banned at Supabase) is `disabled`.
      const check = (email: string) => deps.provider.signIn(email, password).catch(disabledAtProvider);
      const answer = (identity: ProviderUser | 'disabled' | undefined, row: UserRow) =>
        identity === 'disabled' ? identity : identity?.id === user.id ? row : undefined;
      let outcome = answer(await unlessThrown(guess, () => check(user.email)), user);
      // Checked and wrong for that address: what fails from here on leaves it counted.
      if (outcome !== user) {
        const now = await deps.users.findById(userId);
        // The account's address now decides.
        if (now && now.email !== user.email) outcome = answer(await check(now.email), now);
      }
      if (outcome !== undefined && outcome !== 'disabled') {
        await guess.forgive();
        return outcome;
      }
      await deps.audit.record(deps.db, context, {
        type: action,
        outcome: 'failure',
        subjectId: user.id,
        data: { reason: outcome ?? 'wrong_password' },
      });
      // Counted toward the lockout, as a login of the account is; answered as a disabled account.
      if (outcome === 'disabled') throw accountDisabled();
      throw new AppError('incorrect_password', {
        detail: 'The password is incorrect',
        errors: [{ field: 'body.password', message: 'is incorrect' }],
      });
    },

    /**
     * For an account that signs in through Supabase without a password (a social login, `exchange`):
     * the proof of a password is a session that sign-in opened moments ago. A stolen access token
     * of an older session, or of a password sign-in, is not one; nor is a session exchanged from a
     * Supabase token whose sign-in at Supabase was not moments ago (supabase-js refreshes one for
     * days, and a token is exchanged as often as asked), or that does not say when it was.
     */
    async reauthenticateBySession(userId: string, sessionId: string | undefined) {
      const session = sessionId ? await deps.sessions.findSession(sessionId) : undefined;
      const recent = (at: Date | null) =>
        at !== null && deps.clock.nowMs() - at.getTime() <= RECENT_SIGN_IN_MS;
      const fresh =
        session !== undefined &&
        session.userId === userId &&
        !session.revokedAt &&
        session.amr.length === 0 &&
        recent(session.createdAt) &&
        recent(session.authenticatedAt);
      if (fresh) return;
      throw invalidFields([
        {
          field: 'body.password',
          message:
            'is required (an account without one, signed in through Supabase, signs in there again and does this within 5 minutes)',
        },
      ]);
    },

    async listSessions(userId: string, options: { limit: number; cursor?: string | undefined }) {
      return deps.sessions.listLive(userId, options);
    },

    async endSession(userId: string, sessionId: string, context: RequestContext): Promise<void> {
      const session = await deps.sessions.findSession(sessionId);
      // Another user's session (ended or not) is indistinguishable from a missing one (ASVS V8 object
      // level), and the attempt is audited (`notYours`).
      if (session && session.userId !== userId)
        throw notYours('session', {
          action: 'session.end',
          subjectId: session.userId,
          data: { session_id: sessionId },
        });
      // One past its idle or absolute expiry has ended already, as one revoked has: it is not listed,
      // and ending it again would audit an end that changed nothing.
      if (!session || !deps.sessions.isLive(session)) throw notFound('session');
      await inTransaction(deps.db, deps.events, async (tx, emit) => {
        const events = await deps.sessions.endSession(tx, sessionId, 'ended_by_user');
        // Ended meanwhile (the same request sent twice at once): as if it had been before, 404, and
        // one event for the one ending.
        if (events.length === 0) throw notFound('session');
        events.forEach(emit);
        await deps.audit.record(tx, context, {
          type: 'auth.session_ended',
          subjectId: userId,
          data: { session_id: sessionId },
        });
      });
    },

    /**
     * Creates the admin when no admin exists (or always, with `force`; idempotent either way): a new user with the `admin` role, or
     * the `admin` role for an existing user with that email (only one whose password `password` is,
     * unless `force` is given without a password: see bootstrapOnce). Instances starting together on an empty
     * database may each find no admin and make the account: the one whose insert loses finds the
     * account made (and its admin) when it looks again.
     */
    async bootstrapAdmin(
      input: { email: string; password: string | undefined; force?: boolean },
      context: RequestContext,
    ) {
      try {
        return await bootstrapOnce(input, context);
      } catch (err) {
        if (!(isAppError(err) && err.code === 'email_taken')) throw err;
        return bootstrapOnce(input, context);
      }
    },

    /**
     * Revokes every token issued so far to a subject (a user, or a client acting for one), on every
     * instance (disable, delete).
     */
    subjectRevocation: (tx: Parameters<RevocationList['revoke']>[0], subject: string) =>
      deps.revocations.revoke(tx, 'subject', subject),
  };
}

export type AuthService = ReturnType<typeof createAuthService>;
