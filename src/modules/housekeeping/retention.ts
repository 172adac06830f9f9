import { type SQL, sql } from 'drizzle-orm';
import type { Logger } from 'pino';
import { type Database, selectRows } from '../../db/client.js';
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
}

export interface PurgeResult {
  /** Another instance was purging; this one did nothing. */
  skipped: boolean;
  sessions: number;
  revocations: number;
  /** Mailed tokens (password reset, email confirmation) past their expiry, used or not. */
  emailTokens: number;
  /** Sign-ins that waited for a second factor, past their expiry, completed or not. */
  mfaChallenges: number;
  /** Queued mail past its expiry that no instance dropped (one with no mail server configured any more). */
  mail: number;
  auditEvents: number;
}

/**
 * Deletes what nothing reads any more, so the tables do not grow with every login and refresh for
 * ever: revocations past their expiry (every token they could refuse has expired), mailed tokens (password
 * reset, email confirmation), second-factor challenges and queued mail past theirs, sessions ended
 * longer ago than SESSION_RETENTION_DAYS (with their refresh tokens, by cascade), and audit events
 * older than AUDIT_RETENTION_DAYS when that is set. Run from the services' housekeeping at most once
 * an hour; on several instances, whichever takes the advisory lock first does it and the others skip.
 */
export function createRetention(deps: {
  db: Database;
  clock: Clock;
  logger: Logger;
  options: RetentionOptions;
}) {
  /** Deletes `where` rows of `table` in batches; undefined when another instance holds the lock. */
  async function deleteAll(table: string, where: SQL): Promise<number | undefined> {
    let total = 0;
    for (;;) {
      const deleted = await deps.db.transaction(async (tx) => {
        const [lock] = await selectRows<{ locked: boolean }>(
          tx,
          sql`select pg_try_advisory_xact_lock(${PURGE_LOCK}) as locked`,
        );
        if (!lock?.locked) return undefined;
        const [row] = await selectRows<{ n: number }>(
          tx,
          sql`with gone as (
                delete from ${sql.identifier(table)} where ctid in (
                  select ctid from ${sql.identifier(table)} where ${where} limit ${BATCH}
                ) returning 1
              ) select count(*)::int as n from gone`,
        );
        return row?.n ?? 0;
      });
      if (deleted === undefined) return total === 0 ? undefined : total;
      total += deleted;
      if (deleted < BATCH) return total;
    }
  }

  return {
    /** Deletes what is past its retention at `at` (the service's clock by default). */
    async purge(at: Date = deps.clock.now()): Promise<PurgeResult> {
      const now = at.getTime();
      const instant = (ms: number) => sql`${new Date(ms).toISOString()}::timestamptz`;
      const result: PurgeResult = {
        skipped: false,
        sessions: 0,
        revocations: 0,
        emailTokens: 0,
        mfaChallenges: 0,
        mail: 0,
        auditEvents: 0,
      };

      const revocations = await deleteAll('revocations', sql`expires_at < ${instant(now)}`);
      if (revocations === undefined) return { ...result, skipped: true };
      result.revocations = revocations;

      const sessionsBefore = instant(now - deps.options.sessionRetentionDays * DAY_MS);
      result.sessions = (await deleteAll('sessions', sql`${SESSION_END} < ${sessionsBefore}`)) ?? 0;

      result.emailTokens = (await deleteAll('email_tokens', sql`expires_at < ${instant(now)}`)) ?? 0;
      result.mfaChallenges = (await deleteAll('mfa_challenges', sql`expires_at < ${instant(now)}`)) ?? 0;
      result.mail = (await deleteAll('mail_outbox', sql`expires_at < ${instant(now)}`)) ?? 0;

      if (deps.options.auditRetentionDays > 0) {
        const auditBefore = instant(now - deps.options.auditRetentionDays * DAY_MS);
        result.auditEvents = (await deleteAll('audit_events', sql`created_at < ${auditBefore}`)) ?? 0;
      }
      if (
        result.sessions +
          result.revocations +
          result.emailTokens +
          result.mfaChallenges +
          result.mail +
          result.auditEvents >
        0
      ) {
        deps.logger.info(result, 'retention: deleted rows past their retention');
      }
      return result;
    },
  };
}

export type Retention = ReturnType<typeof createRetention>;
