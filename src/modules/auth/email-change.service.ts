import type { Executor } from '../../db/client.js';
import { EMAIL_CHANGE_FORMAT, keyedHash, parseSecret } from '../../lib/crypto.js';
import { AppError, invalidFields, pgErrorCode } from '../../lib/errors.js';
import { notHeld } from '../../lib/permissions.js';
import { inTransaction } from '../../lib/events.js';
import type { MailMessage, Mailer } from '../../lib/mailer.js';
import { authenticationRequired } from '../../plugins/authenticate.js';
import type { AuditEventType, RequestContext } from '../audit/audit.service.js';
import { CLIENT_ID_PREFIX } from '../clients/clients.service.js';
import type { GrantCeiling, Grantor } from '../roles/grant-ceiling.js';
import type { UserRow } from '../users/users.repository.js';
import { normalizeEmail } from './auth.schema.js';
import type { EmailConfirmationDeps } from './email-confirmation.service.js';
import type { EmailTokenRow } from './email-tokens.repository.js';
import type { SessionsRepository } from './sessions.repository.js';
import type { SessionsService } from './sessions.service.js';
import {
  createMailedTokens,
  MAILS_PER_ACCOUNT_HOUR,
  mailCapKey,
  newMailedToken,
  tokenParagraph,
  waitBeforeNextMail,
} from './mailed-tokens.js';

/**
 * As email confirmation's: the built-in provider's addresses change here (Supabase changes its own,
 * supabase-js updateUser); `url` is the page the links open, `mailer` undefined when mail cannot go.
 */
export type EmailChangeDeps = EmailConfirmationDeps & {
  /** A user's own request stands only while the session it came from does. */
  sessions: Pick<SessionsRepository, 'findSession'>;
  /** Ends the user's other sessions once the address changes, as a password change does. */
  sessionEnds: Pick<SessionsService, 'endAllSessions'>;
  /** What the administrator or service who asked for a change holds when its link is opened. */
  grants: Pick<GrantCeiling, 'standing'>;
};

/** What an administrator's request needed (the route's permission); the user's permissions come too. */
const ADMIN_CHANGE_PERMISSION = 'users:write';

const invalidChangeToken = () =>
  new AppError('invalid_email_change_token', {
    detail: 'The email change link is invalid, has expired or was used already; ask for the change again',
    errors: [{ field: 'body.token', message: 'is invalid, expired or used' }],
  });

const domainOf = (email: string) => email.split('@')[1] ?? null;

/** A change waiting for its links. */
export interface PendingEmailChange {
  newEmail: string;
  expiresAt: Date;
  confirmCurrent: boolean;
  waitingFor: Array<'new_address' | 'current_address'>;
}

/** What a request for a change answers: where the account moves, until when, and whether both links are needed. */
export interface EmailChangeRequested {
  newEmail: string;
  expiresAt: Date;
  confirmCurrent: boolean;
}

/**
 * Changing an account's email address (built-in provider). The user asks from a signed-in session
 * with their password (routes check it, and a second factor); the service mails a link (`pce_…`) to
 * the new address and, when the current one was confirmed, another to the current address. The change
 * applies when every link of the request is opened, the new address's from a signed-in session of the
 * account: the new address is proven by the account's own user (a stranger at a mistyped address, or
 * someone an attacker's account is pushed on, opening an unsolicited link, moves nothing), and the
 * mailbox the account could be recovered through agrees (a thief with the password and a session
 * alone moves nothing). An administrator's request (support, for a user who lost their mailbox) mails
 * the new address alone, whose link then needs no session. Links work once, for `ttlSeconds`; a
 * newer request replaces them, and so does anything that voids mailed links (a reset, a password
 * change, signing out everywhere, a disable, a deletion, the current address being confirmed).
 */
/** A request refused inside its transaction, which rolls back (a second factor's code with it). */
class RefusedRequest extends Error {
  constructor(
    readonly reason: string,
    readonly error: AppError,
  ) {
    super(reason);
  }
}

export function createEmailChangeService(deps: EmailChangeDeps) {
  const mailed = createMailedTokens(deps);

  function mailerOrNotFound(): Mailer {
    if (deps.providerName !== 'local')
      throw new AppError('not_found', {
        detail:
          'With Supabase, Supabase changes addresses: ask it with supabase-js auth.updateUser({ email }); ' +
          'this service takes the new address at the next sign-in',
      });
    if (!deps.mailer)
      throw new AppError('not_found', {
        detail: 'Changing the email address is off: the service has no SMTP_URL to send mail through',
      });
    return deps.mailer;
  }

  async function audit(
    context: RequestContext,
    type: AuditEventType,
    userId: string | null,
    outcome: 'success' | 'failure',
    data: Record<string, unknown>,
  ) {
    await deps.audit.record(deps.db, context, { type, outcome, subjectId: userId, data });
  }

  const toNew = (newEmail: string, token: string, both: boolean, byAdministrator: boolean): MailMessage => ({
    to: newEmail,
    subject: 'Confirm your new email address',
    text:
      `Someone, hopefully you, asked to move an account to this address, ${newEmail}.\n\n` +
      `${tokenParagraph(deps.url, token, deps.ttlSeconds, 'confirm it')}\n` +
      (byAdministrator ? '' : 'Open it signed in to the account.\n') +
      (both
        ? 'The change applies once the link mailed to the account’s current address is opened too.\n'
        : '') +
      'If it was not you, ignore this mail: nothing changes.\n',
  });
  const toCurrent = (user: UserRow, newEmail: string, token: string): MailMessage => ({
    to: user.email,
    subject: 'Confirm the change of your email address',
    text:
      `Someone, hopefully you, asked to change the address of the account ${user.email} to ${newEmail}.\n\n` +
      `${tokenParagraph(deps.url, token, deps.ttlSeconds, 'approve it')}\n` +
      `The change applies once the link mailed to ${newEmail} is opened too. If it was not you, ignore ` +
      'this mail and change your password: whoever asked knew it.\n',
  });
  const changedNotice = (oldEmail: string, newEmail: string, signedOut: boolean): MailMessage => ({
    to: oldEmail,
    subject: 'Your email address was changed',
    text:
      `The address of your account is now ${newEmail}: ${oldEmail} no longer signs in to it, and mail ` +
      'about the account goes to the new address' +
      (signedOut ? ', and every other session was signed out' : '') +
      '.\n\nIf it was not you, contact support at once.\n',
  });

  /**
   * Refused as a client error, audited; `error` to throw. `byAdministrator`: support asked, and the
   * event says so (the user's activity shows it as an administrator's, not someone unknown's).
   */
  async function refusedRequest(
    context: RequestContext,
    user: UserRow,
    reason: string,
    error: AppError,
    byAdministrator = false,
  ) {
    await audit(context, 'user.email_change_requested', user.id, 'failure', {
      reason,
      ...(byAdministrator ? { by_administrator: true } : {}),
    });
    return error;
  }

  return {
    /** 404 unless the service changes addresses (built-in provider, with a way to send mail). */
    assertAvailable(): void {
      mailerOrNotFound();
    },

    /**
     * The checks a request is refused by before anything is spent on it (a second factor's code):
     * change is on, the address is another and nobody's. Gives the address, normalized.
     * `byAdministrator` as at `request`.
     */
    async check(
      user: UserRow,
      rawNewEmail: string,
      context: RequestContext,
      options: { byAdministrator?: boolean } = {},
    ): Promise<string> {
      const byAdministrator = options.byAdministrator === true;
      const newEmail = normalizeEmail(rawNewEmail);
      if (newEmail === normalizeEmail(user.email))
        throw await refusedRequest(
          context,
          user,
          'same_address',
          invalidFields([{ field: 'body.new_email', message: 'is the account’s address already' }]),
          byAdministrator,
        );
      // Registration tells whether an address has an account, so this tells nobody anything more.
      const holder = await deps.users.findByEmail(newEmail);
      if (holder && holder.id !== user.id)
        throw await refusedRequest(
          context,
          user,
          'email_taken',
          new AppError('email_taken'),
          byAdministrator,
        );
      // Before a second factor's code is spent on a request that would be refused (`request` checks
      // again under its lock).
      const wait = await tooSoon(user.id, deps.clock.now());
      if (wait) throw await refusedRequest(context, user, 'too_soon', wait, byAdministrator);
      return newEmail;
    },

    /**
     * Mails the links of a change of `user`'s address to `newEmail` (from `check`), replacing any
     * earlier request's; 429 within a minute of the last one, or when `newEmail` was mailed
     * MAILS_PER_ACCOUNT_HOUR changes' links in the hour (with rate limiting on), 409 for a disabled user. A mail server
     * failing is a 503, and nothing is kept. `byAdministrator`: support asks for the user, and only
     * the new address's link is mailed.
     */
    async request(
      asked: UserRow,
      newEmail: string,
      context: RequestContext,
      options: {
        byAdministrator?: boolean;
        /**
         * Whether the administrator may still ask (they hold all the user holds), first thing on the
         * request's transaction: throwing refuses it, nothing written.
         */
        authorize?: (tx: Executor) => Promise<unknown>;
        sessionId?: string;
        /**
         * Runs the request's transaction instead of a transaction of its own: the second factor's
         * (`mfa.confirm`), so that a code is spent only with the request it is for, and a request
         * refused (too soon, say, behind a concurrent one) spends none.
         */
        transaction?: <T>(work: (tx: Executor) => Promise<T>) => Promise<T>;
      } = {},
    ): Promise<EmailChangeRequested> {
      const mailer = mailerOrNotFound();
      const byAdministrator = options.byAdministrator === true;
      // The new address is anyone's, not the account's: at most MAILS_PER_ACCOUNT_HOUR changes' links an
      // hour, whatever accounts ask (before a second factor's code is spent, or anything written).
      // Its place is taken now, before anything else (requests at once, from any accounts, see each
      // other's), and given back if nothing is mailed to it.
      const capKey = mailCapKey(deps.pepper, 'email_change', newEmail);
      const slot = await deps.mailsPerHour?.reserve(capKey);
      if (slot && slot.retryAfter > 0)
        throw await refusedRequest(context, asked, 'too_many', tooMany(slot.retryAfter), byAdministrator);
      const run =
        options.transaction ??
        (<T>(work: (tx: Executor) => Promise<T>) => inTransaction(deps.db, deps.events, work));
      const refused = (reason: string, error: AppError) => new RefusedRequest(reason, error);
      let made: Awaited<ReturnType<typeof make>>;
      const make = async (tx: Executor) => {
        // One request at a time per account, on every instance: the account's row, locked first as a
        // change applying, a reset or the second factor's check lock it (the address a concurrent
        // change just applied is the one to ask, and whether it is confirmed decides the links).
        await options.authorize?.(tx);
        const user = await deps.users.findByIdForUpdate(asked.id, tx);
        const now = deps.clock.now();
        const wait = await tooSoon(asked.id, now, tx);
        if (wait) throw refused('too_soon', wait);
        if (user?.status !== 'active')
          throw refused(
            'disabled',
            new AppError('conflict', { detail: 'The user is disabled: enable them first' }),
          );
        // Ended meanwhile (a reset, a password change, signing out everywhere: each takes this lock
        // first), the session asks nothing: the links would outlive what was meant to void them.
        if (options.sessionId) {
          const session = await deps.sessions.findSession(options.sessionId, tx);
          if (!session || session.revokedAt)
            throw refused(
              'session_ended',
              new AppError('invalid_token', { detail: 'The session has ended' }),
            );
        }
        if (normalizeEmail(user.email) === newEmail)
          throw refused(
            'same_address',
            invalidFields([{ field: 'body.new_email', message: 'is the account’s address already' }]),
          );
        // An administrator vouches for the change (a user who lost their old mailbox): the new address
        // alone is proven.
        const confirmCurrent = !byAdministrator && user.emailConfirmedAt !== null;
        const link = (email: string) => {
          const made = newMailedToken(deps.pepper, EMAIL_CHANGE_FORMAT, {
            userId: user.id,
            purpose: 'email_change',
            email,
            now,
            ttlSeconds: deps.ttlSeconds,
          });
          const requestedBy = byAdministrator ? context.actorId : null;
          return { token: made.token, row: { ...made.row, newEmail, requestedBy } };
        };
        const toNewLink = link(newEmail);
        const toCurrentLink = confirmCurrent ? link(user.email) : undefined;
        const rows = await deps.tokens.insertMany(
          [toNewLink.row, ...(toCurrentLink ? [toCurrentLink.row] : [])],
          tx,
        );
        const tokens = { toNew: toNewLink.token, toCurrent: toCurrentLink?.token ?? '' };
        const expiresAt = toNewLink.row.expiresAt;
        return { user, rows, expiresAt, confirmCurrent, now, tokens };
      };
      try {
        made = await run(make);
      } catch (err) {
        await slot?.release();
        if (err instanceof RefusedRequest)
          throw await refusedRequest(context, asked, err.reason, err.error, byAdministrator);
        throw err;
      }
      const { user, confirmCurrent, tokens } = made;
      let mailedNew = false;
      try {
        const send = (mail: MailMessage) =>
          deps.outbox ? deps.outbox.sendNow(mail, 'email_change') : mailer.send(mail);
        await send(toNew(newEmail, tokens.toNew, confirmCurrent, byAdministrator));
        mailedNew = true;
        if (confirmCurrent) await send(toCurrent(user, newEmail, tokens.toCurrent));
      } catch (err) {
        // The new address was mailed, or its place goes back.
        if (!mailedNew) await slot?.release();
        // Nothing half-sent stays, and the earlier request's links still work: the retry makes a
        // new pair at once.
        await deps.tokens.deleteByIds(made.rows.map((r) => r.id)).catch(() => undefined);
        await audit(context, 'user.email_change_requested', user.id, 'failure', {
          reason: 'mail_failed',
          ...(byAdministrator ? { by_administrator: true } : {}),
        }).catch(() => undefined);
        throw err;
      }
      // Mailed: the earlier request's links stop working.
      await deps.tokens.discardUnused(user.id, 'email_change', deps.db, made.now);
      await audit(context, 'user.email_change_requested', user.id, 'success', {
        new_email_domain: domainOf(newEmail),
        confirm_current: confirmCurrent,
        ...(byAdministrator ? { by_administrator: true } : {}),
        delivery: mailer.kind,
      });
      return { newEmail, expiresAt: made.expiresAt, confirmCurrent };
    },

    /** The change waiting for its links, if any: where to, until when, and which links are unopened. */
    async pending(userId: string, tx?: Executor): Promise<PendingEmailChange | undefined> {
      const now = deps.clock.now();
      const latest = await deps.tokens.latestFor(userId, 'email_change', tx);
      if (!latest?.newEmail || latest.expiresAt <= now) return undefined;
      const rows = await deps.tokens.ofRequest(latest, tx);
      // A cancelled request's links expired when it was cancelled.
      const unopened = rows.filter((r) => r.usedAt === null && r.expiresAt > now);
      if (unopened.length === 0) return undefined;
      return {
        newEmail: latest.newEmail,
        expiresAt: latest.expiresAt,
        confirmCurrent: rows.some((r) => r.email !== r.newEmail),
        waitingFor: unopened.map((r) => (r.email === r.newEmail ? 'new_address' : 'current_address')),
      };
    },

    /** Cancels the change waiting for its links (its links stop working); false when none waits. */
    async cancel(userId: string, context: RequestContext): Promise<boolean> {
      return inTransaction(deps.db, deps.events, async (tx) => {
        // The user's row first, as a link applying the change locks it: a cancel and the last link
        // opened at once take turns, and the cancel finds the change still waiting, or applied (404).
        // Read before, a change that applied meanwhile was answered 204 "cancelled".
        await deps.users.findByIdForUpdate(userId, tx);
        if (!(await this.pending(userId, tx))) return false;
        await deps.tokens.expireUnused(userId, 'email_change', deps.clock.now(), tx);
        await deps.audit.record(tx, context, { type: 'user.email_change_cancelled', subjectId: userId });
        return true;
      });
    },

    /**
     * Takes one link of a change: once every link of its request is taken, the account has the new
     * address, confirmed, and every link mailed before (to the old address) stops working. The new
     * address's link of a user's own request needs `signedInAs`, the user of the session it is opened
     * from. Answers the user only once the address changed.
     */
    async confirm(
      token: string,
      signedInAs: string | undefined,
      context: RequestContext,
    ): Promise<{ changed: true; user: UserRow } | { changed: false }> {
      const invalid = async (reason: string, userId: string | null, data: Record<string, unknown> = {}) => {
        await audit(context, 'user.email_changed', userId, 'failure', { reason, ...data });
        return invalidChangeToken();
      };
      mailerOrNotFound();
      if (!parseSecret(EMAIL_CHANGE_FORMAT, token)) throw await invalid('malformed_token', null);
      const row = await deps.tokens.findLive(keyedHash(deps.pepper, token), 'email_change', deps.clock.now());
      if (!row?.newEmail) {
        // A used or expired link is the account's (a replay, a late click), as for the other links.
        const why = await mailed.whyNotLive(token, 'email_change');
        throw await invalid(why.reason, why.userId);
      }
      const newEmail = row.newEmail;
      const link = row.email === newEmail ? 'new_address' : 'current_address';
      if (link === 'new_address' && row.requestedBy === null && signedInAs !== row.userId) {
        // Left usable: the user signs in and opens it again.
        await audit(context, 'user.email_changed', row.userId, 'failure', { reason: 'not_signed_in' });
        throw authenticationRequired(
          'Open this link signed in to the account whose address changes: send its access token ' +
            '(Authorization: Bearer) with the token',
        );
      }
      let outcome: Awaited<ReturnType<typeof apply>>;
      try {
        outcome = await apply(row, newEmail, link, context);
      } catch (err) {
        // Taken meanwhile by a registration committing with this transaction (the users_email_key index).
        if (pgErrorCode(err) !== '23505') throw err;
        outcome = 'taken';
      }
      if (outcome === 'used') throw await invalid('used_token', row.userId);
      if (outcome === 'disabled') throw await invalid('disabled', row.userId);
      if (outcome === 'taken') {
        await audit(context, 'user.email_changed', row.userId, 'failure', { reason: 'email_taken' });
        throw new AppError('email_taken', {
          detail: 'The new address has an account now; ask for the change again with another',
        });
      }
      if ('refused' in outcome)
        throw await invalid(outcome.refused, row.userId, {
          requested_by: row.requestedBy,
          ...(outcome.missing ? { missing: outcome.missing } : {}),
        });
      if (!outcome.changed) return { changed: false };
      // The notice to the old address was written with the change: sent now it has committed.
      deps.outbox?.kick(outcome.mails);
      return { changed: true, user: outcome.user };
    },
  };

  /** A 429 when the account's last request is less than a minute old. */
  async function tooSoon(userId: string, now: Date, tx?: Executor): Promise<AppError | undefined> {
    const waitMs = waitBeforeNextMail(await deps.tokens.latestFor(userId, 'email_change', tx), now);
    if (waitMs === 0) return undefined;
    return new AppError('rate_limited', {
      detail: 'An email change was asked for less than a minute ago; wait before asking again',
      headers: { 'retry-after': String(Math.max(1, Math.ceil(waitMs / 1000))) },
    });
  }

  /** The 429 of an address mailed MAILS_PER_ACCOUNT_HOUR changes' links in the last hour. */
  function tooMany(waitSeconds: number): AppError {
    return new AppError('rate_limited', {
      detail: `The new address was mailed ${MAILS_PER_ACCOUNT_HOUR} email change links in the last hour; wait before asking again`,
      headers: { 'retry-after': String(waitSeconds) },
    });
  }

  /**
   * Why the administrator or service who asked for a change (`requestedBy`) may no longer make it,
   * read now on the change's transaction: gone or disabled (a client disabled or deleted), or no
   * longer holding users:write and every permission the user holds, as the request needed
   * (users.routes: assertMayManage). Undefined when they still may.
   */
  async function requesterRefusal(
    requestedBy: string,
    userId: string,
    tx: Executor,
  ): Promise<{ refused: 'requester_gone' | 'requester_lacks_permission'; missing?: string[] } | undefined> {
    // requested_by holds the request's actor: a service's client id, else a user's id (an API key's owner).
    const grantor: Grantor = requestedBy.startsWith(CLIENT_ID_PREFIX)
      ? { kind: 'service', clientId: requestedBy, permissions: ['*'] }
      : { kind: 'user', userId: requestedBy, permissions: ['*'] };
    const holds = await deps.grants.standing(grantor, tx);
    if (holds === null) return { refused: 'requester_gone' };
    const { permissions } = await deps.users.rolesAndPermissions(userId, tx);
    const missing = [...new Set(notHeld([ADMIN_CHANGE_PERMISSION, ...permissions], holds))].sort();
    return missing.length > 0 ? { refused: 'requester_lacks_permission', missing } : undefined;
  }

  async function apply(row: EmailTokenRow, newEmail: string, link: string, context: RequestContext) {
    return inTransaction(deps.db, deps.events, async (tx, emit) => {
      // The user row first, as a request locks it (and the house order): concurrent uses of the
      // request's links take turns, and of concurrent uses of one link one takes it.
      const user = await deps.users.findByIdForUpdate(row.userId, tx);
      // An administrator's change stands only while they could still ask for it: their row is
      // key-share locked, so a deletion or a disable either commits first (and is seen) or waits.
      const refusal =
        row.requestedBy && user ? await requesterRefusal(row.requestedBy, user.id, tx) : undefined;
      if (!(await deps.tokens.consume(row.id, deps.clock.now(), tx))) return 'used' as const;
      if (user?.status !== 'active') return 'disabled' as const;
      // The link is spent: the change is void, not waiting for the requester to regain the permission.
      if (refusal) return refusal;
      // Whoever opened the link, signed in or not; the events are about the user.
      const actor = context;
      // The other link of the request, still to be opened: of two links opened at once, the second to
      // lock the user sees the first taken, and applies the change.
      const waiting = (await deps.tokens.ofRequest(row, tx)).filter((r) => r.usedAt === null);
      await deps.audit.record(tx, actor, {
        type: 'user.email_change_confirmed',
        subjectId: user.id,
        data: { link, waiting_for_other: waiting.length > 0 },
      });
      if (waiting.length > 0) return { changed: false } as const;
      const holder = await deps.users.findByEmail(newEmail, tx);
      if (holder && holder.id !== user.id) return 'taken' as const;
      const oldEmail = user.email;
      const changed = await deps.users.update(
        user.id,
        { email: newEmail, emailConfirmedAt: deps.clock.now() },
        tx,
      );
      // Links mailed to the old address (a reset's, a confirmation's) no longer lead into the account.
      await deps.tokens.discardUnused(user.id, undefined, tx);
      // The address the account signs in with changed: every other session ends, as after a password
      // change (ASVS 3.3.3), on every instance. The session of the user's that opened this link stays;
      // a link opened without one (the current address's, an administrator's request) ends them all.
      const keep = actor.actorType === 'user' && actor.actorId === user.id ? actor.credentialId : null;
      const ended = await deps.sessionEnds.endAllSessions(tx, user.id, 'email_changed', keep ?? undefined);
      ended.forEach(emit);
      await deps.audit.record(tx, actor, {
        type: 'user.email_changed',
        subjectId: user.id,
        data: {
          old_email_domain: domainOf(oldEmail),
          new_email_domain: domainOf(newEmail),
          ...(row.requestedBy ? { requested_by: row.requestedBy } : {}),
        },
      });
      emit({ type: 'user_changed', userId: user.id });
      // The old address, if it was proven, hears of it: written with the change, so the change is not
      // acknowledged without its notice (a crash after the commit would have lost one written after).
      const mails: string[] = [];
      if (user.emailConfirmedAt && deps.outbox) {
        const notice = changedNotice(oldEmail, newEmail, ended.length > 0);
        mails.push(await deps.outbox.notice(tx, user, notice.subject, notice.text, notice.to));
      }
      return { changed: true, user: changed ?? user, mails } as const;
    });
  }
}

export type EmailChangeService = ReturnType<typeof createEmailChangeService>;
