import { type SQL, sql } from 'drizzle-orm';
import type { Logger } from 'pino';
import { type Database, type Transaction, selectRows } from '../../db/client.js';
import type { Clock } from '../../lib/clock.js';

/** An arbitrary constant shared by every instance: one of them purges at a time. */
const PURGE_LOCK = 7_344_021_131;
/** Rows per DELETE, each in its own short transaction, so a large backlog never holds long locks. */
const BATCH = 2000;
const DAY_MS = 24 * 3600 * 1000;

/**
 * When a session ended: the first of its revocation, its idle expiry and its absolute expiry. The very
 * expression of the `sessions_ended_idx` index (src/db/schema/sessions.ts), so the purge finds them
 * without a scan of the table.
 */
export const SESSION_END = sql`least(coalesce(revoked_at, 'infinity'::timestamptz), idle_expires_at, expires_at)`;

export interface RetentionOptions {
  /** Days an ended session (revoked, or past its idle or absolute expiry) is kept; its refresh tokens go with it. */
  sessionRetentionDays: number;
  /** Days audit events are kept; 0 keeps them for ever. */
  auditRetentionDays: number;
  /** Seconds a set-up of two-step verification waits for its first code (MFA_SETUP_TTL); older ones go. */
  mfaSetupTtlSeconds: number;
  /** Rows per DELETE (2,000 by default; smaller in tests). */
  batchSize?: number;
}

export interface PurgeResult {
  /** Another instance was purging; this one did nothing. */
  skipped: boolean;
  sessions: number;
  /** The refresh tokens of those sessions, deleted before them. */
  refreshTokens: number;
  revocations: number;
  /** Mailed tokens (password reset, email confirmation) past their expiry, used or not. */
  emailTokens: number;
  /** Sign-ins that waited for a second factor, past their expiry, completed or not. */
  mfaChallenges: number;
  /** Set-ups of two-step verification never confirmed, past MFA_SETUP_TTL. */
  mfaSetUps: number;
  /** Queued mail past its expiry that no instance dropped (one with no mail server configured any more). */
  mail: number;
  auditEvents: number;
}

/** A purge in which some tables failed (each logged); the others were purged, as `result` counts. */
export class RetentionError extends AggregateError {
  constructor(
    errors: unknown[],
    message: string,
    readonly result: PurgeResult,
  ) {
    super(errors, message);
    this.name = 'RetentionError';
  }
}

/**
 * Deletes what nothing reads any more, so the tables do not grow with every login and refresh for
 * ever: revocations past their expiry (every token they could refuse has expired), mailed tokens (password
 * reset, email confirmation), second-factor challenges, set-ups of a second factor never confirmed and
 * queued mail past theirs, sessions ended
 * longer ago than SESSION_RETENTION_DAYS (with their refresh tokens, deleted first), and audit events
 * older than AUDIT_RETENTION_DAYS when that is set. Run from the services' housekeeping at most once
 * an hour; on several instances, whichever takes the advisory lock first does it and the others skip.
 * Each table is purged on its own: one that fails does not keep the others from being purged.
 */
export function createRetention(deps: {
  db: Database;
  clock: Clock;
  logger: Logger;
  options: RetentionOptions;
}) {
  const batch = deps.options.batchSize ?? BATCH;
  /** Set by `stop`: no batch is started after the ones in flight. */
  let stopping = false;

  /** Runs `work` in a transaction holding the purge lock; undefined when another instance holds it. */
  async function locked<T>(work: (tx: Transaction) => Promise<T>): Promise<T | undefined> {
    return deps.db.transaction(async (tx) => {
      const [lock] = await selectRows<{ locked: boolean }>(
        tx,
        sql`select pg_try_advisory_xact_lock(${PURGE_LOCK}) as locked`,
      );
      if (!lock?.locked) return undefined;
      return work(tx);
    });
  }

  /** Deletes `where` rows of `table` in batches; undefined when another instance holds the lock. */
  async function deleteAll(table: string, where: SQL): Promise<number | undefined> {
    let total = 0;
    for (;;) {
      if (stopping) return total;
      const deleted = await locked(async (tx) => {
        const [row] = await selectRows<{ n: number }>(
          tx,
          sql`with gone as (
                delete from ${sql.identifier(table)} where ctid in (
                  select ctid from ${sql.identifier(table)} where ${where} limit ${batch}
                ) returning 1
              ) select count(*)::int as n from gone`,
        );
        return row?.n ?? 0;
      });
      if (deleted === undefined) return total === 0 ? undefined : total;
      total += deleted;
      if (deleted < batch) return total;
    }
  }

  /**
   * Deletes the sessions ended before `before`, counting into `done` as it goes, a batch of them at a time, each batch's refresh tokens
   * first in batches of their own: the cascade would delete them all in the session's statement, and a
   * session refreshed every 15 minutes for weeks has thousands (2,000 such sessions made one statement
   * of millions of rows, past the statement timeout, rolled back at every try).
   */
  async function deleteSessions(
    before: SQL,
    done: { sessions: number; refreshTokens: number },
  ): Promise<void> {
    for (;;) {
      if (stopping) return;
      const ended = await locked((tx) =>
        selectRows<{ id: string }>(
          tx,
          sql`select id from sessions where ${SESSION_END} < ${before} limit ${batch}`,
        ),
      );
      if (!ended?.length) return;
      const ids = sql.join(
        ended.map((row) => sql`${row.id}::uuid`),
        sql`, `,
      );
      done.refreshTokens += (await deleteAll('refresh_tokens', sql`session_id in (${ids})`)) ?? 0;
      // Still ended (nothing revives a session, but the condition costs nothing); a refresh token
      // written since, which none should be, still goes by the cascade.
      done.sessions += (await deleteAll('sessions', sql`id in (${ids}) and ${SESSION_END} < ${before}`)) ?? 0;
      if (ended.length < batch) return;
    }
  }

  return {
    /**
     * At shutdown: a purge under way ends once its batch in flight has (each batch is its own
     * transaction: nothing is left half-done), and none starts after. Its next batches were otherwise
     * started on a pool being closed, each table's failure logged as an error and the run as one to
     * be retried.
     */
    stop() {
      stopping = true;
    },
    /** Deletes what is past its retention at `at` (the service's clock by default). */
    async purge(at: Date = deps.clock.now()): Promise<PurgeResult> {
      const now = at.getTime();
      const instant = (ms: number) => sql`${new Date(ms).toISOString()}::timestamptz`;
      const result: PurgeResult = {
        skipped: false,
        sessions: 0,
        refreshTokens: 0,
        revocations: 0,
        emailTokens: 0,
        mfaChallenges: 0,
        mfaSetUps: 0,
        mail: 0,
        auditEvents: 0,
      };

      // Each table on its own: one that fails (a statement past the timeout, a lock) is logged and
      // the others are still purged; the run then fails as a whole, so that it is tried again.
      const failed: { table: string; err: unknown }[] = [];
      const step = async (table: string, purgeTable: () => Promise<void>) => {
        try {
          await purgeTable();
        } catch (err) {
          failed.push({ table, err });
          deps.logger.error({ err, table }, `retention: could not purge ${table}; the other tables go on`);
        }
      };

      let skipped = false;
      await step('revocations', async () => {
        const revocations = await deleteAll('revocations', sql`expires_at < ${instant(now)}`);
        if (revocations === undefined) skipped = true;
        else result.revocations = revocations;
      });
      if (skipped) return { ...result, skipped: true };

      const sessionsBefore = instant(now - deps.options.sessionRetentionDays * DAY_MS);
      await step('sessions', () => deleteSessions(sessionsBefore, result));

      await step('email_tokens', async () => {
        result.emailTokens = (await deleteAll('email_tokens', sql`expires_at < ${instant(now)}`)) ?? 0;
      });
      await step('mfa_challenges', async () => {
        result.mfaChallenges = (await deleteAll('mfa_challenges', sql`expires_at < ${instant(now)}`)) ?? 0;
      });
      // Through mfa_factors_pending_idx (created_at where verified_at is null): factors turned on stay.
      const setUpsBefore = instant(now - deps.options.mfaSetupTtlSeconds * 1000);
      await step('mfa_factors', async () => {
        result.mfaSetUps =
          (await deleteAll('mfa_factors', sql`verified_at is null and created_at <= ${setUpsBefore}`)) ?? 0;
      });
      await step('mail_outbox', async () => {
        result.mail = (await deleteAll('mail_outbox', sql`expires_at < ${instant(now)}`)) ?? 0;
      });
      if (deps.options.auditRetentionDays > 0) {
        const auditBefore = instant(now - deps.options.auditRetentionDays * DAY_MS);
        await step('audit_events', async () => {
          result.auditEvents = (await deleteAll('audit_events', sql`created_at < ${auditBefore}`)) ?? 0;
        });
      }
      if (
        result.sessions +
          result.refreshTokens +
          result.revocations +
          result.emailTokens +
          result.mfaChallenges +
          result.mfaSetUps +
          result.mail +
          result.auditEvents >
        0
      ) {
        deps.logger.info(result, 'retention: deleted rows past their retention');
      }
      if (failed.length > 0) {
        throw new RetentionError(
          failed.map((f) => f.err),
          `retention: could not purge ${failed.map((f) => f.table).join(', ')}`,
          result,
        );
      }
      return result;
    },
  };
}

export type Retention = ReturnType<typeof createRetention>;
