import type { Logger } from 'pino';
import type { Database, Executor, Transaction } from '../../db/client.js';
import { checkPasswordStrength } from '../../identity/passwords.js';
import { type IdentityProvider, PasswordMayHaveChanged, type ProviderUser } from '../../identity/provider.js';
import type { Clock } from '../../lib/clock.js';
import { PASSWORD_RESET_FORMAT } from '../../lib/crypto.js';
import { AppError, isAppError, isDatabaseUnavailable, notFound } from '../../lib/errors.js';
import { type AuthEvent, type EventBus, inTransaction } from '../../lib/events.js';
import type { ApiKeysRepository } from '../api-keys/api-keys.repository.js';
import type { ClientsRepository } from '../clients/clients.repository.js';
import type { Mailer } from '../../lib/mailer.js';
import type { FailureCounter, GuessCounter, Reservation } from '../../lib/throttle.js';
import type { AuditService, RequestContext } from '../audit/audit.service.js';
import type { MailOutbox } from '../mail/mail-outbox.js';
import { revokeKeysOfOwner } from '../api-keys/owner-keys.js';
import type { UserRow, UsersRepository } from '../users/users.repository.js';
import type { MfaService } from './mfa.service.js';
import type { EmailTokensRepository } from './email-tokens.repository.js';
import { normalizeEmail } from './auth.schema.js';
import {
  createMailedTokens,
  MAILS_PER_ACCOUNT_HOUR,
  newMailedToken,
  tokenParagraph,
} from './mailed-tokens.js';
import type { SessionsService } from './sessions.service.js';

export interface PasswordResetDeps {
  db: Database;
  users: UsersRepository;
  tokens: EmailTokensRepository;
  provider: IdentityProvider;
  sessions: SessionsService;
  audit: AuditService;
  events: EventBus;
  clock: Clock;
  failures: FailureCounter;
  /** Undefined: the service has no way to send mail (production without SMTP_URL). */
  mailer: Mailer | undefined;
  /**
   * Where reset links go out (after the commit, retried while the server refuses them: a request never
   * waits for the server, nor fails with it); an invitation is sent at once through it.
   */
  outbox?: MailOutbox | undefined;
  /** At most MAILS_PER_ACCOUNT_HOUR reset links per account an hour (mailed-tokens.ts). */
  mailsPerHour?: GuessCounter | undefined;
  pepper: Buffer;
  /** The page a reset link opens; the token follows in the fragment. */
  url: string | undefined;
  ttlSeconds: number;
  /** How long an invitation's link (the same link, to choose a first password) works. */
  invitationTtlSeconds: number;
  logger?: Pick<Logger, 'warn' | 'info'>;
  /**
   * The user's row with the address the provider has for them now (auth.service): a link an
   * administrator asks for goes to the address the user changed to in Supabase, not the one before.
   */
  withCurrentEmail?: (user: UserRow, context: RequestContext) => Promise<UserRow>;
  /**
   * What an account holds besides sessions, ended by the reset that first proves its mailbox: an
   * account whose address nobody had proven may have been made by someone else, in wait for its
   * owner (pre-hijacking), with keys and clients that would outlive the owner's reset.
   */
  unproven: {
    apiKeys: Pick<ApiKeysRepository, 'revokeAllOfOwner'>;
    clients: Pick<ClientsRepository, 'disableActingFor'>;
    subjectRevocation: (tx: Transaction, subject: string) => Promise<AuthEvent>;
    /** A second factor set up before the mailbox was proven would keep its owner out, and is removed. */
    mfa: Pick<MfaService, 'remove' | 'noticeRemoved'>;
  };
}

/** The event of a request for a reset link. */
const RESET_REQUESTED = 'auth.password_reset_requested';

const invalidResetToken = () =>
  new AppError('invalid_reset_token', {
    detail: 'The password reset link is invalid, has expired or was used already; ask for a new one',
    errors: [{ field: 'body.token', message: 'is invalid, expired or used' }],
  });

/**
 * A Supabase recovery session of a user with a second factor there, which has not given it (aal1):
 * Supabase itself sets such a user's password only from a session that gave it.
 */
const recoverySecondFactorRequired = () =>
  new AppError('provider_mfa_required', {
    detail:
      'Your account has a second factor (MFA) at the identity provider: give it on the session the reset ' +
      'link opened (supabase-js auth.mfa.challenge and auth.mfa.verify), then send that session’s new ' +
      'access token as the token. Nothing was changed, and the link still works',
  });

/**
 * "Forgot password": a reset link by mail, then a new password with the link's token. With the
 * built-in provider the service makes the token (`prs_…`, 256 random bits, stored as an HMAC under
 * the pepper, one live per account, used once) and mails it; a provider that mails its own links
 * (Supabase) is asked to, and its recovery token is what the reset takes. Either way a reset ends every
 * session of the account, lifts a sign-in lockout, and is audited.
 */
export function createPasswordResetService(deps: PasswordResetDeps) {
  const mailed = createMailedTokens({
    db: deps.db,
    events: deps.events,
    tokens: deps.tokens,
    clock: deps.clock,
    pepper: deps.pepper,
    audit: deps.audit,
    hourly: deps.mailsPerHour,
  });

  const resetMail = (email: string, token: string) => ({
    to: email,
    subject: 'Reset your password',
    text:
      `Someone, hopefully you, asked to reset the password of the account ${email}.\n\n` +
      `${tokenParagraph(deps.url, token, deps.ttlSeconds, 'choose a new password')}\n` +
      'The link works once. If you did not ask for this, ignore this mail: your password stays as it is.\n',
  });

  const invitationMail = (email: string, token: string) => ({
    to: email,
    subject: 'You are invited',
    text:
      `An account was made for you, ${email}.\n\n` +
      `${tokenParagraph(deps.url, token, deps.invitationTtlSeconds, 'choose your password')}\n` +
      'It works once; after that, sign in with your address and that password. If you did not expect ' +
      'this, ignore this mail.\n',
  });

  const recordRequest = (
    context: RequestContext,
    email: string,
    userId: string | null,
    outcome: 'success' | 'failure',
    data: Record<string, unknown>,
  ) => mailed.requested(RESET_REQUESTED, context, email, userId, outcome, data);

  const active = (user: UserRow | undefined) => user?.status === 'active';

  /**
   * The second factor, API keys and acting clients of an account whose mailbox is proven for the first
   * time: made before anyone had shown they hold the address, they may be someone else's, and go (the
   * factor removed, keys revoked, clients disabled and their tokens revoked; the owner may make new
   * ones or enable their clients).
   */
  async function endUnproven(
    tx: Transaction,
    userId: string,
    actor: RequestContext,
    emit: (event: AuthEvent) => void,
  ) {
    const { unproven } = deps;
    const now = deps.clock.now();
    let mfaRemoved = false;
    if (await unproven.mfa.remove(tx, userId)) {
      await deps.audit.record(tx, actor, {
        type: 'mfa.disabled',
        subjectId: userId,
        data: { reason: 'first_mailbox_proof' },
      });
      mfaRemoved = true;
    }
    // Until a pass finds nothing (owner-keys.ts): a creation that comes later finds its parent or its
    // session already ended.
    for (let pass = 0; pass < 5; pass++) {
      const keys = await revokeKeysOfOwner(
        { apiKeys: unproven.apiKeys, audit: deps.audit },
        tx,
        userId,
        now,
        actor,
        'first_mailbox_proof',
        emit,
      );
      const clients = await unproven.clients.disableActingFor(userId, now, tx);
      for (const client of clients) {
        await deps.audit.record(tx, actor, {
          type: 'client.updated',
          subjectId: client.id,
          data: { changed: ['status'], status: 'disabled', reason: 'first_mailbox_proof' },
        });
        emit({ type: 'client_changed', clientId: client.clientId });
        emit(await unproven.subjectRevocation(tx, client.clientId));
      }
      if (keys === 0 && clients.length === 0) return { mfaRemoved };
    }
    return { mfaRemoved };
  }

  /** The parts of the reset after the new password is known to be acceptable: one transaction. */
  async function applyReset(
    user: UserRow,
    passwordHash: string | null,
    context: RequestContext,
    consume: ((tx: Transaction) => Promise<boolean>) | undefined,
    /** The address the link was mailed to: the account's still, or the link is dead. */
    sentTo?: string,
  ) {
    const mails = await inTransaction(deps.db, deps.events, async (tx, emit) => {
      // Locked as the update below locks it, and before the token (the order every change of an
      // account's mailed links takes): a disable committed meanwhile wins, and the reset does not
      // apply; concurrent resets, confirmations and email changes take turns.
      const current = await deps.users.findByIdForUpdate(user.id, tx);
      if (consume && !(await consume(tx))) throw invalidResetToken();
      if (!current || !active(current)) throw invalidResetToken();
      // Mailed to an address the account has left (a link written as an email change committed):
      // whoever holds the old mailbox holds nothing of the account's any more.
      if (sentTo !== undefined && current.email !== sentTo) throw invalidResetToken();
      const actor = { ...context, actorType: 'user' as const, actorId: user.id };
      // The link proved the mailbox, as a confirmation link does.
      const firstProof = !current.emailConfirmedAt;
      if (passwordHash || firstProof) {
        await deps.users.update(
          user.id,
          {
            ...(passwordHash ? { passwordHash } : {}),
            ...(firstProof ? { emailConfirmedAt: deps.clock.now() } : {}),
          },
          tx,
        );
        emit({ type: 'user_changed', userId: user.id });
      }
      // Every link mailed before goes: reset links, and confirmation links of an address now proven.
      await deps.tokens.discardUnused(user.id, undefined, tx);
      // The sessions first: ending them waits for the changes their requests are making (which hold
      // the session: grant-ceiling.ts), so the keys and clients those make are there to be ended next.
      const ended = await deps.sessions.endAllSessions(tx, user.id, 'password_reset');
      ended.forEach(emit);
      const unproven = firstProof ? await endUnproven(tx, user.id, actor, emit) : { mfaRemoved: false };
      await deps.audit.record(tx, actor, {
        type: 'auth.password_reset',
        subjectId: user.id,
        data: { provider: deps.provider.name, first_mailbox_proof: firstProof },
      });
      // The notices, with the reset: it is not acknowledged without them (sent once it commits).
      const mails = unproven.mfaRemoved ? await deps.unproven.mfa.noticeRemoved(tx, current) : [];
      // An invitation's first password replaces none (the provider's accounts keep theirs there).
      const hadPassword = deps.provider.name !== 'local' || current.passwordHash !== null;
      if (hadPassword && deps.outbox)
        mails.push(
          await deps.outbox.notice(
            tx,
            current,
            'Your password was reset',
            `The password of your account ${current.email} was reset with a link mailed to this address, ` +
              'and every session was signed out.\n\nIf it was not you, someone can read your mail: secure ' +
              'your mailbox, reset your password again and contact support.\n',
          ),
        );
      return mails;
    });
    deps.outbox?.kick(mails);
    // Whoever holds the mailbox is the owner: a lockout someone else caused no longer stands.
    await deps.failures.reset(user.email);
  }

  /**
   * A reset the provider did not answer (it may have set the password): every session of the account
   * ends and the links mailed before go, as the reset would have done, audited as a failed reset, and
   * the account's address gets the reset's notice, saying the password may have been reset. Best
   * effort: the client gets the provider's 503 either way.
   */
  async function endAfterUnansweredReset(user: UserRow, context: RequestContext) {
    const subject = 'Your password may have been reset';
    const text = (ended: boolean) =>
      `The password of your account ${user.email} was being reset with a link mailed to this address, ` +
      'and the identity provider did not answer: the new password may be in effect already' +
      (ended ? ', and every session was signed out' : '') +
      '.\n\nIf it was not you, someone can read your mail: secure your mailbox, reset your password ' +
      'again and contact support.\n';
    // The notice commits with the sessions' end; if that failed, it is written on its own.
    const mails = await inTransaction(deps.db, deps.events, async (tx, emit) => {
      (await deps.sessions.endAllSessions(tx, user.id, 'password_reset')).forEach(emit);
      await deps.tokens.discardUnused(user.id, undefined, tx);
      await deps.audit.record(
        tx,
        { ...context, actorType: 'user', actorId: user.id },
        {
          type: 'auth.password_reset',
          outcome: 'failure',
          subjectId: user.id,
          data: { provider: deps.provider.name, reason: 'provider_unavailable', sessions_ended: true },
        },
      );
      return deps.outbox ? [await deps.outbox.notice(tx, user, subject, text(true))] : [];
    })
      .catch(async (err: unknown) => {
        deps.logger?.warn(
          { err, userId: user.id, reqId: context.requestId },
          'a password reset Supabase may have applied: ending the sessions failed',
        );
        return deps.outbox ? [await deps.outbox.notice(deps.db, user, subject, text(false))] : [];
      })
      .catch((err: unknown) => {
        deps.logger?.warn(
          { err, userId: user.id, reqId: context.requestId },
          'a password reset Supabase may have applied: its notice could not be written',
        );
        return [];
      });
    deps.outbox?.kick(mails);
  }

  /**
   * Has a reset link mailed to `email`: by the provider when it mails its own, else by the service,
   * to the account `user` (callers check there is one, and a mailer), through the outbox when there is
   * one. A failed mail is audited.
   */
  async function deliver(
    email: string,
    user: UserRow | undefined,
    context: RequestContext,
    extra: Record<string, unknown>,
    authorize?: (tx: Executor) => Promise<unknown>,
  ): Promise<{ sent: 'sent' | 'queued' | 'too_soon' | 'too_many' | 'gone' | 'disabled'; delivery: string }> {
    if (deps.provider.requestPasswordRecovery)
      return {
        sent: await deps.provider.requestPasswordRecovery(email, deps.url),
        delivery: deps.provider.name,
      };
    const account = user!;
    const mailer = deps.mailer!;
    try {
      const sent = await mailed.send(
        account,
        'password_reset',
        {
          format: PASSWORD_RESET_FORMAT,
          ttlSeconds: deps.ttlSeconds,
          mailer,
          outbox: deps.outbox,
          audit: { type: RESET_REQUESTED, context, data: { delivery: mailer.kind, ...extra } },
          authorize,
        },
        (token) => resetMail(account.email, token),
      );
      return { sent, delivery: mailer.kind };
    } catch (err) {
      // The mail server refusing (without an outbox); the database failing is no mail failure, nor
      // the caller refused (`authorize`: a 401 or 403, audited as such).
      if (!isDatabaseUnavailable(err) && !(isAppError(err) && err.status < 500))
        await recordRequest(context, email, account.id, 'failure', { reason: 'mail_failed', ...extra }).catch(
          () => undefined,
        );
      throw err;
    }
  }

  return {
    /**
     * The invitation of an account an administrator made (users.service `invite`), on its
     * transaction: the reset link, to choose a first password, valid `invitationTtlSeconds`, replacing
     * any earlier link, and its mail, written to the outbox with it. The returned step sends it once the
     * transaction has committed, without the request waiting for the mail server: a slow one held the
     * transaction, a pooled connection (the embedded database's only one) and the account's row while
     * it answered. Built-in provider, with a mailer (the caller checks `assertInvitationsAvailable`).
     */
    async writeInvitation(user: UserRow, tx: Transaction): Promise<() => void> {
      const { token, row } = newMailedToken(deps.pepper, PASSWORD_RESET_FORMAT, {
        userId: user.id,
        purpose: 'password_reset',
        email: user.email,
        now: deps.clock.now(),
        ttlSeconds: deps.invitationTtlSeconds,
      });
      const stored = await deps.tokens.replace(row, tx);
      const mail = invitationMail(user.email, token);
      const outbox = deps.outbox;
      if (!outbox) {
        // No outbox (a test's service without one): sent in the transaction, as before it existed.
        await deps.mailer!.send(mail);
        return () => undefined;
      }
      const id = await outbox.enqueue(tx, mail, {
        kind: 'invitation',
        userId: user.id,
        emailTokenId: stored.id,
        expiresAt: stored.expiresAt,
      });
      return () => outbox.kick([id]);
    },

    /**
     * The address's place under the hourly cap of its reset links (MAILS_PER_ACCOUNT_HOUR, shared with
     * `forgot`) for an invitation about to be written (`writeInvitation`): `retryAfter > 0` when it had
     * its cap; `release` when the invitation does not commit. Undefined with rate limiting off.
     */
    reserveInvitation(email: string): Promise<Reservation | undefined> {
      return mailed.reserve('password_reset', email) ?? Promise.resolve(undefined);
    },

    /** 404 unless the service mails invitations itself (built-in provider, with a mailer). */
    assertInvitationsAvailable(): void {
      if (deps.provider.requestPasswordRecovery)
        throw new AppError('not_found', {
          detail:
            'With Supabase, invite through Supabase (supabase.auth.admin.inviteUserByEmail); the account ' +
            'appears here at its first sign-in',
        });
      if (!deps.mailer)
        throw new AppError('not_found', {
          detail: 'Invitations are off: the service has no SMTP_URL to send mail through',
        });
    },

    /**
     * Sends a reset link to `email` when it has an active account. Answers alike whether it has one or
     * not; a second request within a minute sends nothing.
     */
    async request(rawEmail: string, context: RequestContext): Promise<void> {
      const email = normalizeEmail(rawEmail);
      const user = await deps.users.findByEmail(email);
      const ownMail = !deps.provider.requestPasswordRecovery;
      if (ownMail && !deps.mailer)
        throw new AppError('not_found', {
          detail: 'Password recovery is off: the service has no SMTP_URL to send mail through',
        });
      // The provider may know an address this database does not yet; the service's own mail needs one.
      if (ownMail && !user)
        return recordRequest(context, email, null, 'failure', { reason: 'unknown_email' });
      if (user && !active(user))
        return recordRequest(context, email, user.id, 'failure', { reason: 'disabled' });
      // Through the outbox, not awaited: a 503 or a slower answer while the mail server is down, against
      // the 204 of an address without an account, would tell anyone which addresses have one.
      const { sent, delivery } = await deliver(email, user, context, {});
      if (sent === 'too_soon' || sent === 'too_many' || sent === 'gone' || sent === 'disabled')
        return recordRequest(context, email, user?.id ?? null, 'failure', { reason: sent });
      // The service's own mail was audited with its link (mailed.send); the provider's is here.
      if (!ownMail) await recordRequest(context, email, user?.id ?? null, 'success', { delivery });
    },

    /**
     * An administrator has a reset link mailed to a user (who called support, locked out): 404 for no
     * such user, 409 for a disabled one, a recovery that is off, or a link mailed less than a minute ago.
     * `authorize`: whether the administrator may still, asked on the transaction that writes the link
     * (the service's own mail; a provider mailing its own links is asked outside any).
     */
    async requestFor(
      userId: string,
      context: RequestContext,
      authorize?: (tx: Executor) => Promise<unknown>,
    ): Promise<void> {
      const found = await deps.users.findById(userId);
      if (!found) throw notFound('user');
      const extra = { by_administrator: true };
      const refuse = async (detail: string, reason: string, email = found.email) => {
        await recordRequest(context, email, found.id, 'failure', { reason, ...extra });
        throw new AppError('conflict', { detail });
      };
      // What this database decides is refused before Supabase is asked for the address: an outage
      // there must not turn these 409s into a 503.
      if (!active(found)) return refuse('The user is disabled: enable them first', 'disabled');
      if (!deps.provider.requestPasswordRecovery && !deps.mailer)
        return refuse(
          'Password recovery is off: the service has no SMTP_URL to send mail through',
          'no_mailer',
        );
      const user = deps.withCurrentEmail ? await deps.withCurrentEmail(found, context) : found;
      // Disabled while Supabase answered (the row read again when it has another address now).
      if (!active(user)) return refuse('The user is disabled: enable them first', 'disabled', user.email);
      const { sent, delivery } = await deliver(user.email, user, context, extra, authorize);
      if (sent === 'too_soon')
        return refuse('A reset link was mailed to this user less than a minute ago', 'too_soon', user.email);
      if (sent === 'gone') throw notFound('user');
      // Disabled after the check above, before the link was written.
      if (sent === 'disabled')
        return refuse('The user is disabled: enable them first', 'disabled', user.email);
      if (sent === 'too_many')
        return refuse(
          `${MAILS_PER_ACCOUNT_HOUR} reset links were mailed to this user in the last hour; wait before another`,
          'too_many',
          user.email,
        );
      if (deps.provider.requestPasswordRecovery)
        await recordRequest(context, user.email, user.id, 'success', { delivery, ...extra });
    },

    /** Sets `newPassword` for the account the token was issued to; ends every session of it. */
    async reset(token: string, newPassword: string, context: RequestContext): Promise<void> {
      const invalid = (reason: string, userId: string | null) =>
        mailed.refused(context, { type: 'auth.password_reset', reason, userId }, invalidResetToken());
      if (deps.provider.recoveryIdentity) {
        // Once read, the recovery session is ended whatever comes of it, so whatever can be checked
        // without the account (length, the common list) is checked first: a weak password must not
        // use the link up. Only the rule against the email itself has to wait for the account.
        checkPasswordStrength(newPassword, undefined, 'body.new_password');
        const identity = await deps.provider.recoveryIdentity(token);
        if (!identity) throw await invalid('invalid_recovery_token', null);
        // Refused as Supabase refuses it, before anything is set or ended: the user gives the factor on
        // this recovery session (supabase-js mfa.challenge and mfa.verify) and posts its new token.
        if (identity.secondFactorMissing)
          throw await mailed.refused(
            context,
            { type: 'auth.password_reset', reason: 'provider_mfa_required', userId: identity.id },
            recoverySecondFactorRequired(),
          );
        // Except when Supabase was not there to set the password: the user tries again with the link.
        let keepLink = false;
        try {
          const user = await deps.users.findById(identity.id);
          if (user && !active(user)) throw await invalid('disabled', user.id);
          checkPasswordStrength(newPassword, identity.email, 'body.new_password');
          await deps.provider.setPassword(identity, newPassword).catch(async (err: unknown) => {
            if (isAppError(err) && err.code === 'provider_unavailable') keepLink = true;
            // Supabase may have set it: every session ends, as the reset would have ended them.
            if (err instanceof PasswordMayHaveChanged && user) await endAfterUnansweredReset(user, context);
            throw err;
          });
          // A user Supabase knows and this database does not yet: their first sign-in creates the row.
          if (user) await applyReset(user, null, context, undefined);
        } finally {
          if (!keepLink) await deps.provider.endRecovery?.(token);
        }
        return;
      }
      const row = await mailed.find(token, 'password_reset', PASSWORD_RESET_FORMAT);
      if (row === 'malformed') throw await invalid('malformed_token', null);
      if (!row) {
        const why = await mailed.whyNotLive(token, 'password_reset');
        throw await invalid(why.reason, why.userId);
      }
      const user = await deps.users.findById(row.userId);
      if (!user || !active(user)) throw await invalid('disabled', row.userId);
      checkPasswordStrength(newPassword, user.email, 'body.new_password');
      const identity: ProviderUser = {
        id: user.id,
        email: user.email,
        emailConfirmedAt: user.emailConfirmedAt,
      };
      const { passwordHash } = await deps.provider.setPassword(identity, newPassword);
      await applyReset(
        user,
        passwordHash,
        context,
        async (tx) => (await deps.tokens.consume(row.id, deps.clock.now(), tx)) !== undefined,
        row.email,
      ).catch(async (err: unknown) => {
        // Used meanwhile by a concurrent reset, or the account disabled: refused in the transaction.
        if (isAppError(err) && err.code === 'invalid_reset_token')
          throw await invalid('used_or_disabled', user.id);
        throw err;
      });
    },
  };
}

export type PasswordResetService = ReturnType<typeof createPasswordResetService>;
