import { and, asc, eq, inArray, isNotNull, lte, or, sql } from 'drizzle-orm';
import type { Logger } from 'pino';
import { type Database, type Executor, selectRows } from '../../db/client.js';
import { emailTokens, mailOutbox } from '../../db/schema/index.js';
import type { Clock } from '../../lib/clock.js';
import { decrypt, encrypt } from '../../lib/crypto.js';
import type { MailMessage, Mailer } from '../../lib/mailer.js';

/** The first retry comes this long after the failed send; each next one twice as long after, up to the cap. */
export const MAIL_RETRY_FIRST_MS = 30_000;
export const MAIL_RETRY_MAX_MS = 15 * 60_000;
/** A notice (no link in it) is tried for this long, then dropped. */
export const NOTICE_TTL_MS = 24 * 3600_000;
/** A claimed mail is someone's for this long: if its instance dies mid-send, another tries it after. */
const CLAIM_LEASE_MS = 2 * 60_000;
/** Mails claimed per run, each sent in turn. */
const BATCH = 20;

export type MailKind = 'password_reset' | 'email_confirmation' | 'email_change' | 'magic_link' | 'notice';
export type MailOutcome = 'sent' | 'queued' | 'retried' | 'retry_failed' | 'dropped';

export interface QueueOptions {
  kind: MailKind;
  /** The account the mail is about: it goes with the account. */
  userId?: string | null;
  /** The mailed link it carries: it goes when the link is used, replaced or discarded. */
  emailTokenId?: string | null;
  /** When trying stops (a link's expiry; NOTICE_TTL_MS from now for a notice). */
  expiresAt?: Date;
}

export interface DeliveryRun {
  sent: number;
  failed: number;
  dropped: number;
}

/** Backoff after `attempts` sends failed: 30 s, 1 min, 2 min, … up to 15 min. */
export function retryDelayMs(attempts: number): number {
  return Math.min(MAIL_RETRY_MAX_MS, MAIL_RETRY_FIRST_MS * 2 ** Math.max(0, attempts - 1));
}

/**
 * Mail that must not be lost when the mail server is down: a reset, confirmation or sign-in link asked for
 * anonymously (answering 503 then, and 204 for an address without an account, would tell the two
 * apart), the confirmation mail of a registration, and the security notices. `send` tries the server
 * at once, as before; when it refuses, the message is kept in `mail_outbox` (its text encrypted under
 * KEY_ENCRYPTION_KEY) and sent again with backoff by whichever instance claims it first, until it is
 * taken or it expires. A mail whose link was used, replaced or discarded meanwhile, or whose account
 * was deleted, is dropped, not sent. Delivery is at least once: an instance dying mid-send leaves the
 * mail to be sent again after its lease.
 */
export function createMailOutbox(deps: {
  db: Database;
  mailer: Mailer;
  clock: Clock;
  keyEncryptionKey: Buffer;
  logger: Pick<Logger, 'warn' | 'error' | 'info'>;
  onOutcome?: (kind: string, outcome: MailOutcome) => void;
  /** How often due mail is looked for; 0 leaves it to `deliverDue` calls (tests). */
  intervalMs: number;
}) {
  const outcome = (kind: string, what: MailOutcome) => deps.onOutcome?.(kind, what);
  let timer: NodeJS.Timeout | undefined;
  let running: Promise<DeliveryRun> | undefined;

  const describe = (err: unknown) =>
    String(
      (err as { cause?: { message?: unknown } })?.cause?.message ?? (err as Error)?.message ?? err,
    ).slice(0, 500);

  async function queue(message: MailMessage, options: QueueOptions, err: unknown, tx: Executor = deps.db) {
    const now = deps.clock.now();
    await tx.insert(mailOutbox).values({
      kind: options.kind,
      recipient: message.to,
      subject: message.subject,
      bodyEncrypted: encrypt(deps.keyEncryptionKey, message.text),
      userId: options.userId ?? null,
      emailTokenId: options.emailTokenId ?? null,
      attempts: 1,
      nextAttemptAt: new Date(now.getTime() + retryDelayMs(1)),
      expiresAt: options.expiresAt ?? new Date(now.getTime() + NOTICE_TTL_MS),
      createdAt: now,
      lastError: describe(err),
    });
  }

  /** Drops what is no longer worth sending: expired, or carrying a link used (or gone, by cascade). */
  async function dropStale(now: Date): Promise<number> {
    const dead = await deps.db
      .delete(mailOutbox)
      .where(
        or(
          lte(mailOutbox.expiresAt, now),
          and(
            isNotNull(mailOutbox.emailTokenId),
            sql`not exists (select 1 from ${emailTokens} where ${emailTokens.id} = ${mailOutbox.emailTokenId}
                and ${emailTokens.usedAt} is null and ${emailTokens.expiresAt} > ${now.toISOString()}::timestamptz)`,
          ),
        ),
      )
      .returning({
        id: mailOutbox.id,
        kind: mailOutbox.kind,
        userId: mailOutbox.userId,
        attempts: mailOutbox.attempts,
      });
    for (const row of dead) {
      outcome(row.kind, 'dropped');
      deps.logger.warn(
        { mail: { id: row.id, kind: row.kind, userId: row.userId, attempts: row.attempts } },
        'a mail the mail server never took was dropped: it expired, or its link was used or replaced',
      );
    }
    return dead.length;
  }

  /** Takes up to BATCH due mails for this instance, for CLAIM_LEASE_MS (other instances skip them). */
  async function claim(now: Date) {
    const leaseEnd = new Date(now.getTime() + CLAIM_LEASE_MS);
    return deps.db.transaction(async (tx) => {
      const due = await selectRows<{ id: string }>(
        tx,
        sql`select id from ${mailOutbox} where ${mailOutbox.nextAttemptAt} <= ${now.toISOString()}::timestamptz
            order by ${mailOutbox.nextAttemptAt} limit ${BATCH} for update skip locked`,
      );
      if (due.length === 0) return [];
      return tx
        .update(mailOutbox)
        .set({ nextAttemptAt: leaseEnd, attempts: sql`${mailOutbox.attempts} + 1` })
        .where(
          inArray(
            mailOutbox.id,
            due.map((r) => r.id),
          ),
        )
        .returning()
        .then((rows) => rows.sort((a, b) => a.createdAt.getTime() - b.createdAt.getTime()));
    });
  }

  async function run(): Promise<DeliveryRun> {
    const result: DeliveryRun = { sent: 0, failed: 0, dropped: await dropStale(deps.clock.now()) };
    for (;;) {
      const rows = await claim(deps.clock.now());
      for (const row of rows) {
        let message: MailMessage;
        try {
          message = {
            to: row.recipient,
            subject: row.subject,
            text: decrypt(deps.keyEncryptionKey, row.bodyEncrypted),
          };
        } catch (err) {
          // Sealed under another KEY_ENCRYPTION_KEY: no instance of this one can ever send it.
          await deps.db.delete(mailOutbox).where(eq(mailOutbox.id, row.id));
          outcome(row.kind, 'dropped');
          deps.logger.error(
            { err, mail: { id: row.id, kind: row.kind } },
            'a queued mail could not be decrypted; dropped',
          );
          result.dropped += 1;
          continue;
        }
        try {
          await deps.mailer.send(message);
        } catch (err) {
          const next = new Date(deps.clock.now().getTime() + retryDelayMs(row.attempts));
          await deps.db
            .update(mailOutbox)
            .set({ nextAttemptAt: next, lastError: describe(err) })
            .where(eq(mailOutbox.id, row.id));
          outcome(row.kind, 'retry_failed');
          deps.logger.warn(
            { err, mail: { id: row.id, kind: row.kind, attempts: row.attempts, nextAttemptAt: next } },
            'a queued mail was refused again; it will be retried',
          );
          result.failed += 1;
          continue;
        }
        await deps.db.delete(mailOutbox).where(eq(mailOutbox.id, row.id));
        outcome(row.kind, 'retried');
        deps.logger.info(
          { mail: { id: row.id, kind: row.kind, attempts: row.attempts } },
          'a queued mail was sent',
        );
        result.sent += 1;
      }
      // A full batch may have more behind it; a failing server ends the run (the rest waits its turn).
      if (rows.length < BATCH || result.failed > 0) return result;
    }
  }

  return {
    /**
     * Sends `message` now; when the mail server refuses it, keeps it for retries and answers
     * `queued`. Throws (the mail server's error) only when it could not be kept either.
     */
    async send(message: MailMessage, options: QueueOptions): Promise<'sent' | 'queued'> {
      try {
        await deps.mailer.send(message);
        outcome(options.kind, 'sent');
        return 'sent';
      } catch (err) {
        try {
          await queue(message, options, err);
        } catch (queueErr) {
          deps.logger.error({ err: queueErr }, 'a mail the mail server refused could not be queued either');
          throw err;
        }
        outcome(options.kind, 'queued');
        deps.logger.warn(
          { err, mail: { kind: options.kind, userId: options.userId ?? null } },
          'the mail server refused a mail; it is queued and will be retried',
        );
        return 'queued';
      }
    },

    /**
     * A security notice to the account's address (or `to`, e.g. the address it had), not awaited: the
     * request that caused it does not wait for the mail server. Kept for retries when refused.
     */
    notice(user: { id: string; email: string }, subject: string, text: string, to = user.email): void {
      this.send({ to, subject, text }, { kind: 'notice', userId: user.id }).catch((err: unknown) => {
        deps.logger.warn({ err, userId: user.id }, 'a notice could neither be mailed nor queued');
      });
    },

    /** Sends the mail that is due, dropping what went stale; one run at a time per instance. */
    deliverDue(): Promise<DeliveryRun> {
      if (!running) running = run().finally(() => (running = undefined));
      return running;
    },

    /** Mail waiting (for tests and the scripts), optionally of one account. */
    async pending(userId?: string) {
      return deps.db
        .select({
          id: mailOutbox.id,
          kind: mailOutbox.kind,
          recipient: mailOutbox.recipient,
          subject: mailOutbox.subject,
          userId: mailOutbox.userId,
          emailTokenId: mailOutbox.emailTokenId,
          attempts: mailOutbox.attempts,
          nextAttemptAt: mailOutbox.nextAttemptAt,
          expiresAt: mailOutbox.expiresAt,
          bodyEncrypted: mailOutbox.bodyEncrypted,
        })
        .from(mailOutbox)
        .where(userId ? eq(mailOutbox.userId, userId) : undefined)
        .orderBy(asc(mailOutbox.createdAt));
    },

    start() {
      if (deps.intervalMs <= 0) return;
      timer = setInterval(() => {
        this.deliverDue().catch((err: unknown) =>
          deps.logger.warn({ err }, 'mail retries failed; will try again'),
        );
      }, deps.intervalMs);
      timer.unref();
    },

    async stop() {
      if (timer) clearInterval(timer);
      timer = undefined;
      await running?.catch(() => undefined);
    },
  };
}

export type MailOutbox = ReturnType<typeof createMailOutbox>;
