import { and, asc, eq, getTableColumns, sql } from 'drizzle-orm';
import type { Logger } from 'pino';
import type { Database, Executor } from '../../db/client.js';
import { emailTokens, mailOutbox } from '../../db/schema/index.js';
import type { Clock } from '../../lib/clock.js';
import { decrypt, encrypt } from '../../lib/crypto.js';
import { AppError } from '../../lib/errors.js';
import { type MailMessage, type Mailer, permanentRefusal } from '../../lib/mailer.js';

/** The first retry comes this long after a refused send; each next one twice as long after, up to the cap. */
export const MAIL_RETRY_FIRST_MS = 30_000;
export const MAIL_RETRY_MAX_MS = 5 * 60_000;
/** A notice (no link in it) is tried for this long, then dropped. */
export const NOTICE_TTL_MS = 24 * 3600_000;
/** A shutdown waits this long for a send in flight; the mail is then sent again after its lease. */
const STOP_GRACE_MS = 1000;
/** Mails written here and waiting for this instance's send slot; beyond it, the retry runs send them. */
export const MAX_WAITING_KICKS = 50;

export type MailKind =
  | 'password_reset'
  | 'email_confirmation'
  | 'email_change'
  | 'magic_link'
  | 'invitation'
  | 'notice';
export type MailOutcome = 'sent' | 'queued' | 'retried' | 'retry_failed' | 'dropped' | 'failed';

export interface QueueOptions {
  kind: MailKind;
  /** The account the mail is about: it goes with the account. */
  userId?: string | null;
  /** The mailed link it carries: dropped, not sent, once the link is used, replaced or discarded. */
  emailTokenId?: string | null;
  /** When trying stops (a link's expiry; NOTICE_TTL_MS from now for a notice). */
  expiresAt?: Date;
}

export interface DeliveryRun {
  sent: number;
  failed: number;
  dropped: number;
}

type OutboxRow = typeof mailOutbox.$inferSelect;
type ClaimedRow = OutboxRow & { stale: boolean };

/** Backoff after `attempts` sends were refused: 30 s, 1 min, 2 min, 4 min, then every 5 min. */
export function retryDelayMs(attempts: number): number {
  return Math.min(MAIL_RETRY_MAX_MS, MAIL_RETRY_FIRST_MS * 2 ** Math.max(0, attempts - 1));
}

/**
 * Mail whose answer must not wait for, nor depend on, the mail server (a transactional outbox): the
 * links asked for anonymously (password reset, email confirmation, sign-in; a 503 or a slower answer
 * for an address with an account would tell it from one without), a registration's confirmation, an
 * administrator's reset link and the security notices. The mail is written in the transaction that
 * makes its link (`enqueue`, its text encrypted under KEY_ENCRYPTION_KEY), a notice in the transaction
 * of the change it tells of (`notice`), so that it commits or rolls back with it (no change is
 * acknowledged whose mail a crash after the commit would lose), and sent after the commit by the
 * instance that wrote it (`kick`, not awaited by the request). While the server refuses it, it is
 * retried with backoff by whichever instance claims it first (every `intervalMs`), one mail per claim
 * (FOR UPDATE SKIP LOCKED, with a lease longer than a send can take), until it is taken or expires.
 * A mail whose link was used, replaced or discarded meanwhile, or that expired, is dropped, not sent,
 * when it comes up (claimed like any due mail, then deleted): each step is one mail, whatever the
 * backlog. Delivery is at least once: an instance dying mid-send leaves the mail to be sent again
 * after its lease.
 */
export function createMailOutbox(deps: {
  db: Database;
  mailer: Mailer;
  clock: Clock;
  keyEncryptionKey: Buffer;
  logger: Pick<Logger, 'warn' | 'error' | 'info'>;
  onOutcome?: (kind: string, outcome: MailOutcome) => void;
  /** How many mails wait in the outbox (every instance's, due or backing off), after each retry run. */
  onWaiting?: (count: number) => void;
  /** How often due mail is looked for; 0 leaves retries to `deliverDue` calls (tests). */
  intervalMs: number;
  /** How long a claimed mail is its instance's: longer than `sendTimeoutMs`. */
  leaseMs: number;
  /** A send not taken by then is given up (and the mailer's connections reset): a server that trickles. */
  sendTimeoutMs: number;
}) {
  const outcome = (kind: string, what: MailOutcome) => deps.onOutcome?.(kind, what);
  let timer: NodeJS.Timeout | undefined;
  let stopping = false;
  /**
   * One send at a time per instance, each claimed only when its turn comes: a mail never waits in the
   * mailer's own queue while its lease runs out (another instance would send it too), and the mailer's
   * other connection stays free for the mail a caller waits for (an email change, an invitation).
   */
  let slot: Promise<unknown> = Promise.resolve();
  let waitingKicks = 0;
  const inSlot = <T>(work: () => Promise<T>): Promise<T> => {
    const turn = slot.then(work, work);
    slot = turn.catch(() => undefined);
    return turn;
  };
  /** Kicks and notices under way, for `idle` and `stop`. */
  const inFlight = new Set<Promise<unknown>>();
  const track = <T>(work: Promise<T>): Promise<T> => {
    inFlight.add(work);
    void work.finally(() => inFlight.delete(work)).catch(() => undefined);
    return work;
  };

  const describe = (err: unknown) =>
    String(
      (err as { cause?: { message?: unknown } })?.cause?.message ?? (err as Error)?.message ?? err,
    ).slice(0, 500);
  const instant = (d: Date) => sql`${d.toISOString()}::timestamptz`;
  /** The link a mail carries is still good: unused and unexpired (replaced or discarded links are deleted). */
  const linkLive = (now: Date) =>
    sql`exists (select 1 from ${emailTokens} t where t.id = ${mailOutbox.emailTokenId}
        and t.used_at is null and t.expires_at > ${instant(now)})`;

  /**
   * Takes the next due mail (of `ids`, when given) for this instance for `leaseMs`; others skip it.
   * `stale` when it is no longer worth sending (expired, or its link used or gone): the caller drops
   * it. The first due mail whatever its state, through `mail_outbox_due_idx`: a step costs the same
   * whatever the backlog (looking past stale mail, or deleting all of it first, scanned every due
   * mail at each step: 0.8 s a step with 95,000 waiting).
   */
  async function claim(now: Date, ids?: string[]): Promise<ClaimedRow | undefined> {
    const only = ids
      ? sql`and id in (${sql.join(
          ids.map((id) => sql`${id}::uuid`),
          sql`, `,
        )})`
      : sql``;
    // One statement: a mail is never claimed without this instance knowing which (a read after the
    // claim failing in a blip would leave it waiting for its whole lease).
    const [row] = await deps.db
      .update(mailOutbox)
      .set({
        nextAttemptAt: new Date(now.getTime() + deps.leaseMs),
        attempts: sql`${mailOutbox.attempts} + 1`,
      })
      .where(
        eq(
          mailOutbox.id,
          sql`(select id from ${mailOutbox}
                where next_attempt_at <= ${instant(now)} ${only}
                order by next_attempt_at limit 1 for update skip locked)`,
        ),
      )
      .returning({
        ...getTableColumns(mailOutbox),
        stale: sql<boolean>`(${mailOutbox.expiresAt} <= ${instant(now)}
          or (${mailOutbox.carriesLink} and not ${linkLive(now)}))`,
      });
    return row;
  }

  /** Deletes a claimed mail that is no longer worth sending: logged and counted. */
  async function drop(row: ClaimedRow): Promise<void> {
    // Only while the claim is this instance's (it is: the lease outlasts a statement).
    await deps.db
      .delete(mailOutbox)
      .where(and(eq(mailOutbox.id, row.id), eq(mailOutbox.nextAttemptAt, row.nextAttemptAt)));
    outcome(row.kind, 'dropped');
    deps.logger.warn(
      {
        mail: {
          id: row.id,
          kind: row.kind,
          userId: row.userId,
          // The claim counted an attempt that was not made.
          attempts: row.attempts - 1,
          // Why the tries before failed (a server refusing it until it expired), null if none did.
          lastError: row.lastError,
        },
      },
      'a mail was dropped unsent: it expired, or its link was used, replaced or discarded',
    );
  }

  /** The mailer's send, given up after `sendTimeoutMs` (its connections reset, for a server that trickles). */
  async function sendWithin(message: MailMessage): Promise<void> {
    let timer: NodeJS.Timeout | undefined;
    const deadline = new Promise<never>((_, reject) => {
      timer = setTimeout(() => {
        deps.mailer.reset?.();
        reject(
          new AppError('service_unavailable', {
            detail: 'The mail server is unavailable; try again later',
            headers: { 'retry-after': '30' },
            cause: new Error(`the mail server did not take the mail within ${deps.sendTimeoutMs} ms`),
          }),
        );
      }, deps.sendTimeoutMs);
      timer.unref();
    });
    try {
      await Promise.race([deps.mailer.send(message), deadline]);
    } finally {
      clearTimeout(timer);
    }
  }

  /**
   * Sends one claimed mail: deleted once taken; put off by the backoff when refused for now; deleted
   * (`dropped`) when refused for good (a 5yz to its recipient or its message).
   */
  async function attempt(row: OutboxRow): Promise<'sent' | 'failed' | 'dropped'> {
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
      return 'dropped';
    }
    try {
      await sendWithin(message);
    } catch (err) {
      const refusal = permanentRefusal(err);
      if (refusal) {
        // The server will answer every retry the same (no such mailbox, a message it will not take):
        // dropped now, not retried until it expires. Only while the claim is still this instance's.
        await deps.db
          .delete(mailOutbox)
          .where(and(eq(mailOutbox.id, row.id), eq(mailOutbox.nextAttemptAt, row.nextAttemptAt)));
        outcome(row.kind, 'dropped');
        deps.logger.warn(
          {
            mail: { id: row.id, kind: row.kind, userId: row.userId, attempts: row.attempts },
            smtp: refusal,
          },
          `the mail server refused a mail for good (${refusal.code} to ${refusal.command}); dropped, not retried`,
        );
        return 'dropped';
      }
      const nextAttemptAt = new Date(deps.clock.now().getTime() + retryDelayMs(row.attempts));
      // Only while the claim is still this instance's: past its lease another may hold the mail.
      await deps.db
        .update(mailOutbox)
        .set({ nextAttemptAt, lastError: describe(err) })
        .where(and(eq(mailOutbox.id, row.id), eq(mailOutbox.nextAttemptAt, row.nextAttemptAt)));
      outcome(row.kind, row.attempts <= 1 ? 'queued' : 'retry_failed');
      deps.logger.warn(
        {
          err,
          mail: { id: row.id, kind: row.kind, userId: row.userId, attempts: row.attempts, nextAttemptAt },
        },
        'the mail server refused a mail; it will be retried',
      );
      return 'failed';
    }
    await deps.db.delete(mailOutbox).where(eq(mailOutbox.id, row.id));
    outcome(row.kind, row.attempts <= 1 ? 'sent' : 'retried');
    if (row.attempts > 1)
      deps.logger.info(
        { mail: { id: row.id, kind: row.kind, attempts: row.attempts } },
        'a queued mail was sent',
      );
    return 'sent';
  }

  /** Claims the next due mail (of `ids`) and sends it, or drops it when stale. */
  async function next(ids?: string[]): Promise<'none' | 'dropped' | 'sent' | 'failed'> {
    const row = await claim(deps.clock.now(), ids);
    if (!row) return 'none';
    if (row.stale) {
      await drop(row);
      return 'dropped';
    }
    return attempt(row);
  }

  /** Counts the mail waiting in the outbox for `onWaiting` (one count per run, not per mail). */
  async function reportWaiting(): Promise<void> {
    if (!deps.onWaiting || stopping) return;
    try {
      const [row] = await deps.db.select({ n: sql<number>`count(*)::int` }).from(mailOutbox);
      deps.onWaiting(row?.n ?? 0);
    } catch (err) {
      deps.logger.warn({ err }, 'the mail waiting in the outbox could not be counted');
    }
  }

  async function run(): Promise<DeliveryRun> {
    const result: DeliveryRun = { sent: 0, failed: 0, dropped: 0 };
    let refusedInARow = 0;
    while (!stopping) {
      const step = await inSlot(() => (stopping ? Promise.resolve('none' as const) : next()));
      if (step === 'none') break;
      if (step === 'dropped') result.dropped += 1;
      else if (step === 'sent') {
        result.sent += 1;
        refusedInARow = 0;
      } else {
        result.failed += 1;
        // A server refusing some mail goes on with the rest; one refusing everything (three in a row)
        // leaves the rest to the next run rather than to a timeout each.
        if (++refusedInARow >= 3) break;
      }
    }
    await reportWaiting();
    return result;
  }

  /** Sends the mails `ids` just written, after their commit, each in its turn (the first try). */
  async function sendNew(ids: string[]): Promise<void> {
    for (const id of ids) {
      if (stopping) return;
      await inSlot(() => (stopping ? Promise.resolve('none' as const) : next([id])));
    }
  }

  return {
    /**
     * Writes `message` on `tx` (the transaction that makes its link), due at once; `kick` with the id
     * once it commits. Nothing is sent if the transaction rolls back.
     */
    async enqueue(tx: Executor, message: MailMessage, options: QueueOptions): Promise<string> {
      const now = deps.clock.now();
      const [row] = await tx
        .insert(mailOutbox)
        .values({
          kind: options.kind,
          recipient: message.to,
          subject: message.subject,
          bodyEncrypted: encrypt(deps.keyEncryptionKey, message.text),
          userId: options.userId ?? null,
          emailTokenId: options.emailTokenId ?? null,
          carriesLink: Boolean(options.emailTokenId),
          nextAttemptAt: now,
          expiresAt: options.expiresAt ?? new Date(now.getTime() + NOTICE_TTL_MS),
          createdAt: now,
        })
        .returning({ id: mailOutbox.id });
      return row!.id;
    },

    /** Sends committed mails now, in the background: the request that wrote them does not wait. */
    kick(ids: string[]): void {
      if (ids.length === 0) return;
      // Too many waiting already (the server is slow or down): the retry runs take these, on any instance.
      if (waitingKicks >= MAX_WAITING_KICKS) return;
      waitingKicks += 1;
      track(sendNew(ids).finally(() => (waitingKicks -= 1))).catch((err: unknown) =>
        deps.logger.warn({ err }, 'a mail could not be sent at once; it waits for a retry'),
      );
    },

    /**
     * A security notice to the account's address (or `to`, e.g. the address it had), written on `tx`,
     * the transaction of the change it tells of: it commits with the change, or rolls back with it,
     * so no change is acknowledged whose notice a crash after the commit could lose. `kick` the id
     * once the transaction has committed (the change does not wait for the mail server).
     */
    notice(
      tx: Executor,
      user: { id: string; email: string },
      subject: string,
      text: string,
      to = user.email,
    ): Promise<string> {
      return this.enqueue(tx, { to, subject, text }, { kind: 'notice', userId: user.id });
    },

    /**
     * Sends now and awaits the server (for a caller who is told, and may ask again: an email change,
     * an invitation), given up after `sendTimeoutMs` as the outbox's own sends are; counted, and thrown
     * when refused.
     */
    async sendNow(message: MailMessage, kind: MailKind): Promise<void> {
      try {
        await sendWithin(message);
      } catch (err) {
        outcome(kind, 'failed');
        throw err;
      }
      outcome(kind, 'sent');
    },

    /**
     * Sends the mail that is due, dropping what went stale. Runs may overlap (the timer's, a test's):
     * each step takes the send slot and claims its own mail, so they never send one twice.
     */
    deliverDue(): Promise<DeliveryRun> {
      return track(run());
    },

    /** Resolves once no send started here is under way (tests read the mailer after it). */
    async idle(): Promise<void> {
      while (inFlight.size > 0) await Promise.allSettled([...inFlight]);
    },

    /** Mail waiting, optionally of one account (for tests and operators). */
    async pending(userId?: string) {
      return deps.db
        .select()
        .from(mailOutbox)
        .where(userId ? eq(mailOutbox.userId, userId) : undefined)
        .orderBy(asc(mailOutbox.createdAt));
    },

    /**
     * Runs the retries every `intervalMs`, and once now: mail a crashed process left (written, never
     * sent, or cut off mid-send and past its lease) goes at the start, not an interval later. Not
     * awaited: the start does not wait for the mail server.
     */
    start() {
      if (deps.intervalMs <= 0) return;
      /** The run under way (the start's, or a tick's): the next tick starts none until it ends. */
      let running = false;
      const runOnce = () => {
        // A run outlasts the interval while the server is slow or hangs (up to three send timeouts)
        // or the backlog is long; runs started meanwhile only queued for the send slot behind it,
        // one more every tick for as long as that lasted.
        if (running) return;
        running = true;
        this.deliverDue()
          .catch((err: unknown) => deps.logger.warn({ err }, 'mail retries failed; will try again'))
          .finally(() => {
            running = false;
          });
      };
      runOnce();
      timer = setInterval(runOnce, deps.intervalMs);
      timer.unref();
    },

    /** Starts nothing more, and waits a moment for a send in flight (its mail is otherwise sent again later). */
    async stop() {
      stopping = true;
      if (timer) clearInterval(timer);
      timer = undefined;
      const settled = Promise.allSettled([...inFlight]);
      await Promise.race([settled, new Promise((resolve) => setTimeout(resolve, STOP_GRACE_MS).unref())]);
    },
  };
}

export type MailOutbox = ReturnType<typeof createMailOutbox>;
