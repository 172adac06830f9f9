import { MAGIC_LINK_FORMAT } from '../../lib/crypto.js';
import { AppError } from '../../lib/errors.js';
import type { FailureCounter } from '../../lib/throttle.js';
import type { RequestContext } from '../audit/audit.service.js';
import type { UserRow } from '../users/users.repository.js';
import type { AuthService } from './auth.service.js';
import { normalizeEmail } from './auth.schema.js';
import type { EmailConfirmationDeps } from './email-confirmation.service.js';
import { createMailedTokens, tokenParagraph } from './mailed-tokens.js';
import type { MfaService } from './mfa.service.js';
import type { SessionTokens } from './sessions.service.js';

/** `amr` of a session a mailed link opened (RFC 8176 has no value for it; `email` is unregistered). */
export const MAGIC_LINK_AMR = ['email'] as const;

export type MagicLinkDeps = EmailConfirmationDeps & {
  auth: Pick<AuthService, 'issuingTransaction' | 'startSessionIn' | 'sessionTokens'>;
  mfa: Pick<MfaService, 'challengeIn'>;
  /** The sign-in lockout: the mailbox's owner is let in, and a lockout someone else caused lifted. */
  failures: FailureCounter;
  onLogin?: (outcome: 'success' | 'failure' | 'locked') => void;
};

const invalidMagicLink = () =>
  new AppError('invalid_magic_link', {
    detail: 'The sign-in link is invalid, has expired or was used already; ask for a new one',
    errors: [{ field: 'body.token', message: 'is invalid, expired or used' }],
  });

/**
 * Passwordless sign-in for the built-in provider: a link mailed to an account's confirmed address
 * (`pml_…`, 256 random bits stored as an HMAC, one live per account, at most one mail a minute, once,
 * MAGIC_LINK_TTL), whose token opens a session as a password would. A user with a second factor gives
 * it next (`mfa_required`), as after a password. Asked anonymously, so answered alike for every address,
 * and sent through the outbox (the answer never waits for the mail server).
 */
export function createMagicLinkService(deps: MagicLinkDeps) {
  const mailed = createMailedTokens({ ...deps, hourly: deps.mailsPerHour });

  const linkMail = (email: string, token: string) => ({
    to: email,
    subject: 'Your sign-in link',
    text:
      `Someone, hopefully you, asked to sign in to the account ${email} without its password.\n\n` +
      `${tokenParagraph(deps.url, token, deps.ttlSeconds, 'sign in')}\n` +
      'It works once. If it was not you, ignore this mail: nobody can use the link without reading it here.\n',
  });

  const record = (
    context: RequestContext,
    user: UserRow | undefined,
    email: string,
    outcome: 'success' | 'failure',
    data: Record<string, unknown>,
  ) => mailed.requested('auth.magic_link_requested', context, email, user?.id ?? null, outcome, data);

  function assertAvailable() {
    if (deps.providerName !== 'local')
      throw new AppError('not_found', {
        detail:
          'With Supabase, sign in by link through Supabase (supabase-js auth.signInWithOtp), then POST ' +
          'its access token to /v1/auth/exchange',
      });
    if (!deps.mailer)
      throw new AppError('not_found', {
        detail: 'Sign-in links are off: the service has no SMTP_URL to send mail through',
      });
    return deps.mailer;
  }

  return {
    /**
     * Mails a sign-in link when `email` is an active account's confirmed address; answers alike
     * otherwise. An address never confirmed gets none: its account may have been made, password and
     * all, by someone who is not its owner, and a link would let the owner in beside them (the owner
     * takes it over with a password reset, which ends what was made before).
     */
    async request(rawEmail: string, context: RequestContext): Promise<void> {
      const mailer = assertAvailable();
      const email = normalizeEmail(rawEmail);
      const user = await deps.users.findByEmail(email);
      if (!user) return record(context, undefined, email, 'failure', { reason: 'unknown_email' });
      if (user.status !== 'active') return record(context, user, email, 'failure', { reason: 'disabled' });
      if (!user.emailConfirmedAt)
        return record(context, user, email, 'failure', { reason: 'email_not_confirmed' });
      const sent = await mailed.send(
        user,
        'magic_link',
        {
          format: MAGIC_LINK_FORMAT,
          ttlSeconds: deps.ttlSeconds,
          mailer,
          outbox: deps.outbox,
          // Written with the link, in its transaction.
          audit: { type: 'auth.magic_link_requested', context, data: { delivery: mailer.kind } },
        },
        (token) => linkMail(user.email, token),
      );
      if (sent === 'too_soon' || sent === 'too_many' || sent === 'gone' || sent === 'disabled')
        return record(context, user, email, 'failure', { reason: sent });
    },

    /**
     * Opens a session with a link's token, once: `{user, session}`, or the `mfa_required` refusal for a
     * user with a second factor (the link is used either way). 400 `invalid_magic_link` otherwise.
     */
    async verify(token: string, context: RequestContext): Promise<{ user: UserRow; session: SessionTokens }> {
      assertAvailable();
      const invalid = (reason: string, userId: string | null) => {
        deps.onLogin?.('failure');
        return mailed.refused(context, { type: 'auth.magic_link', reason, userId }, invalidMagicLink());
      };
      const row = await mailed.find(token, 'magic_link', MAGIC_LINK_FORMAT);
      if (row === 'malformed') throw await invalid('malformed_token', null);
      if (!row) {
        const why = await mailed.whyNotLive(token, 'magic_link');
        throw await invalid(why.reason, why.userId);
      }
      // Begun once a key can sign: a 503 for no key leaves the link unspent and no session opened.
      const outcome = await deps.auth.issuingTransaction(async (tx, emit) => {
        // The user row first, the order every change of an account's mailed links takes; of two opening
        // one link at once (a mail scanner and a click), one takes the token and the other finds it used.
        const user = await deps.users.findByIdForUpdate(row.userId, tx);
        if (!(await deps.tokens.consume(row.id, deps.clock.now(), tx))) return 'used' as const;
        // Mailed to the account's address of then, which must still be its own, confirmed.
        if (user?.status !== 'active' || user.email !== row.email || !user.emailConfirmedAt)
          return 'disabled' as const;
        const started = await deps.auth.startSessionIn(
          tx,
          emit,
          user,
          context,
          'auth.magic_link',
          MAGIC_LINK_AMR,
        );
        // The second factor's challenge on this transaction, with the row still held: a reset, a
        // password change or signing out everywhere committing meanwhile waits for it, and discards it.
        if (started === 'second_factor')
          return { user, challenge: await deps.mfa.challengeIn(tx, user, 'auth.magic_link', context) };
        return { user, started };
      });
      if (outcome === 'used') throw await invalid('used_token', row.userId);
      if (outcome === 'disabled') throw await invalid('disabled', row.userId);
      // Whoever holds the mailbox is the owner: a lockout someone else caused no longer stands.
      await deps.failures.reset(outcome.user.email);
      if ('challenge' in outcome) throw outcome.challenge;
      const { user, started } = outcome;
      deps.onLogin?.('success');
      return { user, session: await deps.auth.sessionTokens(user, started) };
    },
  };
}

export type MagicLinkService = ReturnType<typeof createMagicLinkService>;
