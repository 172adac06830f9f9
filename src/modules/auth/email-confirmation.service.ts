import type { Database, Executor } from '../../db/client.js';
import type { Clock } from '../../lib/clock.js';
import { EMAIL_CONFIRMATION_FORMAT } from '../../lib/crypto.js';
import { AppError, isDatabaseUnavailable } from '../../lib/errors.js';
import { type EventBus, inTransaction } from '../../lib/events.js';
import type { Mailer } from '../../lib/mailer.js';
import type { GuessCounter } from '../../lib/throttle.js';
import type { AuditService, RequestContext } from '../audit/audit.service.js';
import type { MailOutbox } from '../mail/mail-outbox.js';
import type { UserRow, UsersRepository } from '../users/users.repository.js';
import type { EmailTokensRepository } from './email-tokens.repository.js';
import { normalizeEmail } from './auth.schema.js';
import { createMailedTokens, tokenParagraph } from './mailed-tokens.js';

export interface EmailConfirmationDeps {
  db: Database;
  users: UsersRepository;
  tokens: EmailTokensRepository;
  audit: AuditService;
  events: EventBus;
  clock: Clock;
  pepper: Buffer;
  /** Only the built-in provider's addresses are confirmed here; Supabase confirms its own. */
  providerName: 'local' | 'supabase';
  mailer: Mailer | undefined;
  /**
   * Where confirmation mail is written and kept while the mail server refuses it: a registration's
   * (written with the account; no registration mail without it) and one asked for anonymously (a 503
   * would tell that the address has an account).
   */
  outbox?: MailOutbox | undefined;
  /** At most MAILS_PER_ACCOUNT_HOUR links of a purpose per account an hour (mailed-tokens.ts). */
  mailsPerHour?: GuessCounter | undefined;
  url: string | undefined;
  ttlSeconds: number;
}

/**
 * A registration's confirmation mail, written in the registration's transaction (see
 * `EmailConfirmationService.registration`).
 */
export interface RegistrationMail {
  /** In the registration's transaction, once the account's row is written: the link and its mail. */
  write(tx: Executor, user: UserRow, context: RequestContext): Promise<void>;
  /** After the commit: sends the mail (not awaited), or gives the cap's place back when none was written. */
  committed(): Promise<void>;
  /** The transaction failed (nothing of it stays): the cap's place goes back. */
  failed(): Promise<void>;
}

const invalidConfirmationToken = () =>
  new AppError('invalid_confirmation_token', {
    detail: 'The confirmation link is invalid, has expired or was used already; ask for a new one',
    errors: [{ field: 'body.token', message: 'is invalid, expired or used' }],
  });

/**
 * Email confirmation for the built-in provider: a link mailed at registration (and on request), whose
 * token (`pec_…`, one live per account, at most one mail a minute) marks the address confirmed. With
 * REQUIRE_EMAIL_CONFIRMATION, sign-in waits for it (auth.service). A password reset confirms the
 * address too: it proves the same mailbox.
 */
export function createEmailConfirmationService(deps: EmailConfirmationDeps) {
  const mailed = createMailedTokens({ ...deps, hourly: deps.mailsPerHour });

  const confirmationMail = (email: string, token: string) => ({
    to: email,
    subject: 'Confirm your email address',
    text:
      `Someone, hopefully you, made an account with the address ${email}.\n\n` +
      `${tokenParagraph(deps.url, token, deps.ttlSeconds, 'confirm it')}\n` +
      'If it was not you, do not confirm it: ignore this mail, and nothing more will come of it. ' +
      'Confirming says the account is yours, and whoever made it could go on using it beside you; to ' +
      'take such an account over, reset its password instead.\n',
  });

  const record = (
    context: RequestContext,
    user: UserRow | undefined,
    email: string,
    outcome: 'success' | 'failure',
    data: Record<string, unknown>,
    tx?: Executor,
  ) => mailed.requested('auth.email_confirmation_sent', context, email, user?.id ?? null, outcome, data, tx);

  /**
   * Mails a confirmation link to the user's address, audited. A mail the server refuses waits in the
   * outbox when there is one; without, the error is thrown.
   */
  async function send(user: UserRow, mailer: Mailer, context: RequestContext) {
    try {
      const sent = await mailed.send(
        user,
        'email_confirmation',
        {
          format: EMAIL_CONFIRMATION_FORMAT,
          ttlSeconds: deps.ttlSeconds,
          mailer,
          outbox: deps.outbox,
          // Written with the link, in its transaction.
          audit: { type: 'auth.email_confirmation_sent', context, data: { delivery: mailer.kind } },
        },
        (token) => confirmationMail(user.email, token),
      );
      if (sent === 'too_soon' || sent === 'too_many' || sent === 'gone' || sent === 'disabled')
        return record(context, user, user.email, 'failure', { reason: sent });
    } catch (err) {
      // The mail server refusing (without an outbox); the database failing is no mail failure.
      if (!isDatabaseUnavailable(err))
        await record(context, user, user.email, 'failure', { reason: 'mail_failed' }).catch(() => undefined);
      throw err;
    }
  }

  const applies = (user: UserRow) =>
    deps.providerName === 'local' && user.status === 'active' && !user.emailConfirmedAt;

  return {
    /**
     * The confirmation mail of a registration of `email`, written in the registration's transaction
     * so that it commits, or rolls back, with the account: no account is answered 201/202 whose mail a
     * crash right after the commit would lose. Called before that transaction, it takes the address's
     * place under the hourly cap (MAILS_PER_ACCOUNT_HOUR, mailed-tokens.ts), which `failed` gives back.
     * Undefined when no mail goes: another provider confirms its own addresses, or no mail is sent.
     */
    async registration(email: string): Promise<RegistrationMail | undefined> {
      const { mailer, outbox } = deps;
      if (deps.providerName !== 'local' || !mailer || !outbox) return undefined;
      const slot = await mailed.reserve('email_confirmation', email);
      let mailId: string | undefined;
      return {
        async write(tx, user, context) {
          // Again from nothing when the transaction runs again (a deadlock): only its last run commits.
          mailId = undefined;
          if (!applies(user)) return;
          if (slot && slot.retryAfter > 0)
            return record(context, user, user.email, 'failure', { reason: 'too_many' }, tx);
          mailId = await mailed.write(
            tx,
            user,
            'email_confirmation',
            { format: EMAIL_CONFIRMATION_FORMAT, ttlSeconds: deps.ttlSeconds, outbox },
            (token) => confirmationMail(user.email, token),
          );
          await record(context, user, user.email, 'success', { delivery: mailer.kind }, tx);
        },
        async committed() {
          if (mailId) outbox.kick([mailId]);
          // Nothing mailed: the place goes back.
          else await slot?.release();
        },
        async failed() {
          await slot?.release();
        },
      };
    },

    /** Mails a new link to `email` when it has an unconfirmed account; answers alike otherwise. */
    async resend(rawEmail: string, context: RequestContext): Promise<void> {
      if (deps.providerName !== 'local')
        throw new AppError('not_found', {
          detail: 'With Supabase, Supabase sends confirmation mails: ask it with supabase-js auth.resend()',
        });
      const mailer = deps.mailer;
      if (!mailer)
        throw new AppError('not_found', {
          detail: 'Email confirmation is off: the service has no SMTP_URL to send mail through',
        });
      const email = normalizeEmail(rawEmail);
      const user = await deps.users.findByEmail(email);
      if (!user) return record(context, undefined, email, 'failure', { reason: 'unknown_email' });
      if (user.status !== 'active') return record(context, user, email, 'failure', { reason: 'disabled' });
      if (user.emailConfirmedAt)
        return record(context, user, email, 'failure', { reason: 'already_confirmed' });
      await send(user, mailer, context);
    },

    /** Marks the address the token was mailed to as confirmed; the user as they are now. */
    async confirm(token: string, context: RequestContext): Promise<UserRow> {
      const invalid = (reason: string, userId: string | null) =>
        mailed.refused(context, { type: 'user.email_confirmed', reason, userId }, invalidConfirmationToken());
      const row = await mailed.find(token, 'email_confirmation', EMAIL_CONFIRMATION_FORMAT);
      if (row === 'malformed') throw await invalid('malformed_token', null);
      if (!row) {
        const why = await mailed.whyNotLive(token, 'email_confirmation');
        throw await invalid(why.reason, why.userId);
      }
      const confirmed = await inTransaction(deps.db, deps.events, async (tx, emit) => {
        // The user row first, the order every change of an account's mailed links takes (an email
        // change applying deletes them under it); of concurrent confirmations (a link scanner and a
        // click) one then takes the token and the others find it used.
        const user = await deps.users.findByIdForUpdate(row.userId, tx);
        if (!(await deps.tokens.consume(row.id, deps.clock.now(), tx))) return 'used' as const;
        // The address it was mailed to must still be the account's.
        if (user?.status !== 'active' || user.email !== row.email) return 'disabled' as const;
        if (!user.emailConfirmedAt) {
          // An email change asked for while the address was unconfirmed mailed no link to it; with the
          // address proven now, the change would need its approval, so it starts again.
          await deps.tokens.discardUnused(user.id, 'email_change', tx);
        }
        const confirmed = user.emailConfirmedAt
          ? user
          : ((await deps.users.update(user.id, { emailConfirmedAt: deps.clock.now() }, tx)) ?? user);
        await deps.audit.record(
          tx,
          { ...context, actorType: 'user', actorId: user.id },
          {
            type: 'user.email_confirmed',
            subjectId: user.id,
            data: { email_domain: user.email.split('@')[1] },
          },
        );
        emit({ type: 'user_changed', userId: user.id });
        return confirmed;
      });
      // Refused inside the transaction: audited here, on its own.
      if (confirmed === 'used') throw await invalid('used_token', row.userId);
      if (confirmed === 'disabled') throw await invalid('disabled', row.userId);
      return confirmed;
    },
  };
}

export type EmailConfirmationService = ReturnType<typeof createEmailConfirmationService>;
