import { sql } from 'drizzle-orm';
import { type Database, type Executor, selectRows } from '../../db/client.js';
import type { Clock } from '../../lib/clock.js';
import { generateSecret, keyedHash, parseSecret, type SecretFormat } from '../../lib/crypto.js';
import { type EventBus, inTransaction } from '../../lib/events.js';
import type { AppError } from '../../lib/errors.js';
import type { MailMessage, Mailer } from '../../lib/mailer.js';
import type { GuessCounter, Reservation } from '../../lib/throttle.js';
import type { AuditEventType, AuditService, RequestContext } from '../audit/audit.service.js';
import type { MailOutbox } from '../mail/mail-outbox.js';
import type { EmailTokenPurpose, EmailTokenRow, EmailTokensRepository } from './email-tokens.repository.js';

/** At most one mail of a purpose per account in this long, whatever the number of requests. */
export const MAIL_INTERVAL_MS = 60_000;

/** A lifetime as a mail or a message says it: `15 minutes`, `2 hours`, `7 days`. */
export function minutes(seconds: number): string {
  if (seconds >= 172_800 && seconds % 86_400 === 0) return `${seconds / 86_400} days`;
  if (seconds >= 7200 && seconds % 3600 === 0) return `${seconds / 3600} hours`;
  const m = Math.round(seconds / 60);
  return m === 1 ? '1 minute' : `${m} minutes`;
}

/**
 * The link a mail carries: `url` with the token in its fragment (which browsers send neither to the
 * page's server nor in a Referer). Without a fragment in `url`: `url#token=…`. A fragment already
 * there (a hash-routed page, `https://app.example/#/reset`) is kept, and the token added as a
 * parameter of it: `#/reset?token=…`, or `#/reset?lang=en&token=…` when it has a query already.
 */
export function tokenLink(url: string, token: string): string {
  const link = new URL(url);
  const fragment = link.hash.slice(1);
  if (!fragment) {
    link.hash = `token=${token}`;
    return link.href;
  }
  const separator = !fragment.includes('?') ? '?' : /[?&]$/.test(fragment) ? '' : '&';
  link.hash = `${fragment}${separator}token=${token}`;
  return link.href;
}

/**
 * The part of a mail that carries the token: a link to `url` with the token in its fragment
 * (tokenLink), or the bare token without a page.
 */
export function tokenParagraph(
  url: string | undefined,
  token: string,
  ttlSeconds: number,
  action: string,
): string {
  const lifetime = minutes(ttlSeconds);
  if (!url) return `Use this code within ${lifetime} to ${action}:\n\n${token}\n`;
  return `Open this link within ${lifetime} to ${action}:\n\n${tokenLink(url, token)}\n`;
}

/** How long before another mail of a purpose may go to an account whose last one is `latest` (ms; 0: now). */
export function waitBeforeNextMail(latest: { createdAt: Date } | undefined, now: Date): number {
  return latest ? Math.max(0, MAIL_INTERVAL_MS - (now.getTime() - latest.createdAt.getTime())) : 0;
}

/**
 * A new mailed token (256 random bits in `format`) and the `email_tokens` row that stores it: only
 * its HMAC under the pepper, mailed to `fields.email`, good for `ttlSeconds` from `now`.
 */
export function newMailedToken(
  pepper: Buffer,
  format: SecretFormat,
  fields: { userId: string; purpose: EmailTokenPurpose; email: string; now: Date; ttlSeconds: number },
) {
  const { token } = generateSecret(format);
  return {
    token,
    row: {
      userId: fields.userId,
      purpose: fields.purpose,
      email: fields.email,
      tokenHash: keyedHash(pepper, token),
      createdAt: fields.now,
      expiresAt: new Date(fields.now.getTime() + fields.ttlSeconds * 1000),
    },
  };
}

/** At most this many mails of a purpose per account in an hour (with rate limiting on): `too_many` after. */
export const MAILS_PER_ACCOUNT_HOUR = 5;

/**
 * The key the hourly cap counts a purpose's mails to `email` under: by the address (keyed, never
 * stored as it is), not the account, so an address registered, deleted and registered again, or asked
 * for by any number of accounts, is one mailbox, which gets no more than its cap.
 */
export function mailCapKey(pepper: Buffer, purpose: EmailTokenPurpose, email: string): string {
  return `${purpose}:${keyedHash(pepper, `mail-cap:${email.toLowerCase()}`)}`;
}

/**
 * One-time tokens mailed to a user (`email_tokens`): made with 256 random bits in a `SecretFormat`,
 * stored only as an HMAC under the pepper, one live per user and purpose, at most one mail a minute,
 * and (with `hourly`, shared through Redis when configured) at most MAILS_PER_ACCOUNT_HOUR an hour:
 * anyone may ask for an account's link, and must not flood its mailbox nor keep replacing its link.
 */
export function createMailedTokens(deps: {
  db: Database;
  events: EventBus;
  tokens: EmailTokensRepository;
  clock: Clock;
  pepper: Buffer;
  audit: AuditService;
  /**
   * Counts the mails of a purpose per address in a sliding hour: each request takes its place before
   * anything is made (requests at once, from any accounts, see each other), and gives it back when
   * nothing was mailed.
   */
  hourly?: GuessCounter | undefined;
}) {
  /** A new token of `purpose` for `user` on `tx`, replacing any earlier one: the token and its row. */
  async function makeToken(
    tx: Executor,
    user: { id: string; email: string },
    purpose: EmailTokenPurpose,
    options: { format: SecretFormat; ttlSeconds: number },
    now = deps.clock.now(),
  ) {
    const made = newMailedToken(deps.pepper, options.format, {
      userId: user.id,
      purpose,
      email: user.email,
      now,
      ttlSeconds: options.ttlSeconds,
    });
    return { token: made.token, stored: await deps.tokens.replace(made.row, tx) };
  }
  const reserve = (purpose: EmailTokenPurpose, email: string): Promise<Reservation> | undefined =>
    deps.hourly?.reserve(mailCapKey(deps.pepper, purpose, email));

  return {
    /**
     * The address's place under the hourly cap for a mail of `purpose`, taken before the transaction
     * that writes the mail (requests at once see each other's); `release` gives it back when that
     * transaction fails or mails nothing. `retryAfter > 0`: the address had its cap, nothing is
     * taken. Undefined without a cap (rate limiting off).
     */
    reserve,

    /**
     * Writes a new token of `purpose` for `user` on `tx` (the transaction of the change the mail
     * belongs to, e.g. the account's creation), replacing any earlier one, and `compose(token)` to
     * `outbox` with it: the mail's id, to `kick` once `tx` commits. The caller holds the cap's place.
     */
    async write(
      tx: Executor,
      user: { id: string; email: string },
      purpose: EmailTokenPurpose,
      options: { format: SecretFormat; ttlSeconds: number; outbox: MailOutbox },
      compose: (token: string) => MailMessage,
    ): Promise<string> {
      const { token, stored } = await makeToken(tx, user, purpose, options);
      return options.outbox.enqueue(tx, compose(token), {
        kind: purpose,
        userId: user.id,
        emailTokenId: stored.id,
        expiresAt: stored.expiresAt,
      });
    },

    /**
     * Mails `compose(token)` to the user with a new token of `purpose`, replacing any earlier one;
     * `too_soon` (nothing sent) within a minute of the last; `gone` or `disabled` (nothing sent) for an
     * account deleted or disabled since the caller read it. With an `outbox`, the mail is written with
     * the token and sent after the commit, retried while the server refuses it (`queued`: the caller
     * does not wait for the server). Without, it is sent before answering (`sent`); when that fails
     * the token goes and the error is thrown, so a retry is not held back.
     *
     * `audit`: the success event of the request (as `requested` writes it), written with the token
     * and the queued mail in their transaction, so that no link is made without its event (SECURITY.md:
     * a change and its event commit together, or neither does); without an outbox, once the mail has
     * gone. The caller audits the other outcomes.
     */
    async send(
      user: { id: string; email: string },
      purpose: EmailTokenPurpose,
      options: {
        format: SecretFormat;
        ttlSeconds: number;
        mailer: Mailer;
        outbox?: MailOutbox | undefined;
        audit?: { type: AuditEventType; context: RequestContext; data: Record<string, unknown> };
        /**
         * Whether the caller may still have it mailed, asked on the transaction that writes it (an
         * administrator's request: they hold all the user holds); throwing refuses it, nothing written.
         */
        authorize?: ((tx: Executor) => Promise<unknown>) | undefined;
      },
      compose: (token: string) => MailMessage,
    ): Promise<'sent' | 'queued' | 'too_soon' | 'too_many' | 'gone' | 'disabled'> {
      const audited = options.audit;
      const recordSent = async (tx: Executor) => {
        if (audited)
          await deps.audit.record(tx, audited.context, {
            type: audited.type,
            subjectId: user.id,
            data: { ...audited.data, email_domain: user.email.split('@')[1] ?? null },
          });
      };
      const slot: Reservation | undefined = await reserve(purpose, user.email);
      if (slot && slot.retryAfter > 0) return 'too_many';
      let token = '';
      let mailId: string | undefined;
      let row: EmailTokenRow | 'gone' | 'disabled' | undefined;
      try {
        row = await inTransaction(deps.db, deps.events, async (tx) => {
          // One at a time per account and purpose, on every instance: of concurrent requests the first
          // makes the token and the others see it and send nothing (one mail, one live link).
          await tx.execute(
            sql`select pg_advisory_xact_lock(hashtext(${`email_tokens:${purpose}:${user.id}`}))`,
          );
          await options.authorize?.(tx);
          // The account, held until the link is written: one deleted meanwhile gets none (not a 409 from
          // the foreign key), and one disabled meanwhile none either (its disable voided the links it
          // found). Share-locked, not key-share: what voids an account's links (a disable, a deletion, a
          // password change or reset, signing out everywhere, an email change applying) locks its row
          // first, so it waits for this link and voids it too, or has committed and is read here.
          const [held] = await selectRows<{ id: string; status: string }>(
            tx,
            sql`select id, status from users where id = ${user.id} for share`,
          );
          if (!held) return 'gone' as const;
          if (held.status !== 'active') return 'disabled' as const;
          const now = deps.clock.now();
          if (waitBeforeNextMail(await deps.tokens.latestFor(user.id, purpose, tx), now) > 0)
            return undefined;
          const made = await makeToken(tx, user, purpose, options, now);
          token = made.token;
          const { stored } = made;
          if (options.outbox)
            mailId = await options.outbox.enqueue(tx, compose(token), {
              kind: purpose,
              userId: user.id,
              emailTokenId: stored.id,
              expiresAt: stored.expiresAt,
            });
          if (mailId) await recordSent(tx);
          return stored;
        });
      } catch (err) {
        await slot?.release();
        throw err;
      }
      // Nothing mailed: the place goes back.
      if (row === 'gone' || row === 'disabled' || !row) {
        await slot?.release();
        return row ?? 'too_soon';
      }
      if (options.outbox && mailId) {
        options.outbox.kick([mailId]);
        return 'queued';
      }
      try {
        await options.mailer.send(compose(token));
      } catch (err) {
        await deps.tokens.deleteById(row.id).catch(() => undefined);
        await slot?.release();
        throw err;
      }
      await recordSent(deps.db);
      return 'sent';
    },

    /**
     * Audits a request for a link (`type`, e.g. `auth.password_reset_requested`) about `email`: its
     * account (null for none), the outcome and why, with the address's domain only.
     */
    async requested(
      type: AuditEventType,
      context: RequestContext,
      email: string,
      userId: string | null,
      outcome: 'success' | 'failure',
      data: Record<string, unknown>,
      /** The transaction of the change it is part of; the pool by default. */
      tx: Executor = deps.db,
    ): Promise<void> {
      await deps.audit.record(tx, context, {
        type,
        outcome,
        subjectId: userId,
        data: { ...data, email_domain: email.split('@')[1] ?? null },
      });
    },

    /** Audits a link refused (`type`, a failure, with why) and gives back `error`, to throw. */
    async refused(
      context: RequestContext,
      event: { type: AuditEventType; reason: string; userId: string | null },
      error: AppError,
    ): Promise<AppError> {
      await deps.audit.record(deps.db, context, {
        type: event.type,
        outcome: 'failure',
        subjectId: event.userId,
        data: { reason: event.reason },
      });
      return error;
    },

    /**
     * Why `token` (well-formed, and not live) was refused, for the audit: used (or raced and lost),
     * expired, or unknown (never made, replaced or discarded, which leave no row); with its user.
     */
    async whyNotLive(
      token: string,
      purpose: EmailTokenPurpose,
    ): Promise<{ reason: 'used_token' | 'expired_token' | 'unknown_token'; userId: string | null }> {
      const row = await deps.tokens.findByHash(keyedHash(deps.pepper, token), purpose);
      if (!row) return { reason: 'unknown_token', userId: null };
      return { reason: row.usedAt ? 'used_token' : 'expired_token', userId: row.userId };
    },

    /** The live token row `token` names: undefined when malformed, unknown, expired, used or replaced. */
    async find(
      token: string,
      purpose: EmailTokenPurpose,
      format: SecretFormat,
    ): Promise<EmailTokenRow | 'malformed' | undefined> {
      if (!parseSecret(format, token)) return 'malformed';
      return deps.tokens.findLive(keyedHash(deps.pepper, token), purpose, deps.clock.now());
    },
  };
}

export type MailedTokens = ReturnType<typeof createMailedTokens>;
