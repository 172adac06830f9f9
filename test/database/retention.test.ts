import { sql } from 'drizzle-orm';
import type { FastifyInstance } from 'fastify';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, inject, it, vi } from 'vitest';
import { selectRows } from '../../src/db/client.js';
import { mailOutbox } from '../../src/db/schema/index.js';
import { createRetention, RetentionError, SESSION_END } from '../../src/modules/housekeeping/retention.js';
import { buildTestApp } from '../support/app.js';
import { createTestClock } from '../support/clock.js';
import { openTestDatabase, ownDatabase, scratchDatabase } from '../support/database.js';
import { login, registerUser } from '../support/factories.js';
import { bearer } from '../support/http.js';

const DAY = 24 * 3600;

/*
 * Housekeeping deletes what nothing reads any more (modules/housekeeping/retention.ts). On a database
 * of its own: the purge deletes by age across every table, and the clock here runs days ahead.
 */
describe('retention (SESSION_RETENTION_DAYS, AUDIT_RETENTION_DAYS)', () => {
  let own: Awaited<ReturnType<typeof ownDatabase>>;
  const clock = createTestClock();
  let app: FastifyInstance;

  beforeAll(async () => {
    own = await ownDatabase('auth_retention');
    app = await buildTestApp({
      env: { SESSION_RETENTION_DAYS: '7', AUDIT_RETENTION_DAYS: '30' },
      deps: { database: own.database, clock },
    });
  });

  afterAll(async () => {
    await app.close();
    await own.dispose();
  });

  const count = async (query: ReturnType<typeof sql>) =>
    (await selectRows<{ n: number }>(app.services.db, query))[0]!.n;
  const sessionsOf = (userId: string) =>
    count(sql`select count(*)::int as n from sessions where user_id = ${userId}`);
  const refreshTokensOf = (userId: string) =>
    count(
      sql`select count(*)::int as n from refresh_tokens r join sessions s on s.id = r.session_id where s.user_id = ${userId}`,
    );

  /**
   * A row in each short-lived table, for `user`: a password reset token (30 min), a sign-in waiting
   * for a second factor (5 min), and a notice the mail server refused, kept a day for retries.
   */
  async function leaveShortLivedRows(user: { id: string; email: string }, tag: string) {
    await app.services.repos.emailTokens.replace(
      {
        userId: user.id,
        purpose: 'password_reset',
        email: user.email,
        tokenHash: `${tag}-${user.id}`,
        createdAt: clock.now(),
        expiresAt: new Date(clock.nowMs() + 1800_000),
      },
      app.services.db,
    );
    const challenge = await app.services.repos.mfa.insertChallenge({
      userId: user.id,
      tokenHash: `${tag}-${user.id}`,
      via: 'auth.login',
      createdAt: clock.now(),
      expiresAt: new Date(clock.nowMs() + 300_000),
    });
    await app.services.db.insert(mailOutbox).values({
      kind: 'notice',
      recipient: user.email,
      subject: 'retention',
      bodyEncrypted: 'sealed',
      userId: user.id,
      nextAttemptAt: clock.now(),
      expiresAt: new Date(clock.nowMs() + DAY),
      createdAt: clock.now(),
    });
    return { challenge };
  }

  it('deletes sessions ended longer ago than the retention (with their refresh tokens), expired revocations and old audit events; keeps the rest', async () => {
    const user = await registerUser(app, 'retention');
    const second = await login(app, user.email);
    // One rotation, so the session that ends has two refresh tokens.
    const refreshed = await app.inject({
      method: 'POST',
      url: '/v1/auth/refresh',
      payload: { refresh_token: second.session.refresh_token },
    });
    expect(refreshed.statusCode).toBe(200);
    const out = await app.inject({
      method: 'POST',
      url: '/v1/auth/logout',
      headers: bearer(refreshed.json().session.access_token),
      payload: {},
    });
    expect(out.statusCode).toBe(204);
    expect(await sessionsOf(user.id)).toBe(2);
    expect(await refreshTokensOf(user.id)).toBe(3);
    const revocationsBefore = await count(sql`select count(*)::int as n from revocations`);
    expect(revocationsBefore).toBeGreaterThan(0);

    // A password reset token, expired by the time of the purge below; a sign-in waiting for a second
    // factor (5 min); a notice the mail server refused, kept a day for retries by an instance that has
    // no mailer now.
    const { challenge } = await leaveShortLivedRows(user, 'retention');

    // Six days on, nothing has been ended long enough; the revocations (15 min), the reset token
    // (30 min), the challenge and the notice (a day) have expired.
    clock.advance(6 * DAY);
    const early = await app.services.retention.purge();
    expect(early).toMatchObject({ skipped: false, sessions: 0, emailTokens: 1, auditEvents: 0 });
    expect(early.mfaChallenges).toBeGreaterThanOrEqual(1);
    expect(early.mail).toBeGreaterThanOrEqual(1);
    expect(await count(sql`select count(*)::int as n from mail_outbox where user_id = ${user.id}`)).toBe(0);
    expect(await count(sql`select count(*)::int as n from mfa_challenges where id = ${challenge.id}`)).toBe(
      0,
    );
    expect(await app.services.repos.emailTokens.latestFor(user.id, 'password_reset')).toBeUndefined();
    expect(early.revocations).toBe(revocationsBefore);
    expect(await sessionsOf(user.id)).toBe(2);

    // Eight days on, the logged-out session goes with its two refresh tokens; the live one stays.
    clock.advance(2 * DAY);
    const auditBefore = await count(sql`select count(*)::int as n from audit_events`);
    expect(await app.services.retention.purge()).toMatchObject({ sessions: 1, auditEvents: 0 });
    expect(await sessionsOf(user.id)).toBe(1);
    expect(await refreshTokensOf(user.id)).toBe(1);
    expect(await count(sql`select count(*)::int as n from audit_events`)).toBe(auditBefore);
    const stillIn = await app.inject({
      method: 'GET',
      url: '/v1/auth/me',
      headers: bearer(user.accessToken),
    });
    expect(stillIn.statusCode).toBe(401); // the access token expired days ago; the session itself lives on
    const refreshedAgain = await app.inject({
      method: 'POST',
      url: '/v1/auth/refresh',
      payload: { refresh_token: user.refreshToken },
    });
    expect(refreshedAgain.statusCode, refreshedAgain.body).toBe(200);
    await login(app, user.email);

    // Thirty-one days after the first events they go; the login just now is recent and stays.
    clock.advance(23 * DAY + 3600);
    const late = await app.services.retention.purge();
    expect(late.auditEvents).toBe(auditBefore);
    expect(await count(sql`select count(*)::int as n from audit_events`)).toBeGreaterThan(0);
  });

  it.runIf(inject('databaseUrl'))('skips when another instance holds the purge lock', async () => {
    const dbUrl = own.url!;
    const other = new pg.Client({ connectionString: dbUrl });
    await other.connect();
    try {
      await other.query('begin');
      await other.query('select pg_advisory_xact_lock(7344021131)');
      expect(await app.services.retention.purge()).toMatchObject({ skipped: true });
      await other.query('rollback');
      expect(await app.services.retention.purge()).toMatchObject({ skipped: false });
    } finally {
      await other.end();
    }
  });

  it('finds ended sessions through sessions_ended_idx: the purge asks for the index’s very expression', async () => {
    const plan = await app.services.db.transaction(async (tx) => {
      // On a table this small a scan is cheaper, so the planner is told to use an index if one fits.
      await tx.execute(sql`set local enable_seqscan = off`);
      const [row] = await selectRows<{ 'QUERY PLAN': unknown }>(
        tx,
        sql`explain (format json) select ctid from sessions where ${SESSION_END} < now() limit 2000`,
      );
      return JSON.stringify(row?.['QUERY PLAN']);
    });
    expect(plan).toContain('sessions_ended_idx');
  });

  it('removes set-ups of two-step verification not confirmed within MFA_SETUP_TTL (900 s); keeps newer ones and factors turned on', async () => {
    const stale = await registerUser(app, 'retention-setup-stale');
    const fresh = await registerUser(app, 'retention-setup-fresh');
    const on = await registerUser(app, 'retention-setup-on');
    const begin = async (userId: string) =>
      (await app.services.repos.mfa.replacePending(
        { userId, type: 'totp', secretEncrypted: 'sealed', createdAt: clock.now() },
        app.services.db,
      ))!;
    await begin(stale.id);
    const turnedOn = await begin(on.id);
    await app.services.repos.mfa.updateFactor(turnedOn.id, { verifiedAt: clock.now() }, app.services.db);
    clock.advance(901);
    await begin(fresh.id);
    const factorsOf = (userId: string) =>
      count(sql`select count(*)::int as n from mfa_factors where user_id = ${userId}`);
    const result = await app.services.retention.purge();
    expect(result.mfaSetUps).toBeGreaterThanOrEqual(1);
    expect(await factorsOf(stale.id)).toBe(0);
    expect(await factorsOf(fresh.id)).toBe(1);
    expect(await factorsOf(on.id)).toBe(1);
  });

  it('finds expired set-ups of two-step verification through mfa_factors_pending_idx', async () => {
    const plan = await app.services.db.transaction(async (tx) => {
      await tx.execute(sql`set local enable_seqscan = off`);
      const [row] = await selectRows<{ 'QUERY PLAN': unknown }>(
        tx,
        sql`explain (format json) select ctid from mfa_factors where verified_at is null and created_at < now() limit 2000`,
      );
      return JSON.stringify(row?.['QUERY PLAN']);
    });
    expect(plan).toContain('mfa_factors_pending_idx');
  });

  it('finds expired mail through mail_outbox_expires_idx', async () => {
    const plan = await app.services.db.transaction(async (tx) => {
      await tx.execute(sql`set local enable_seqscan = off`);
      const [row] = await selectRows<{ 'QUERY PLAN': unknown }>(
        tx,
        sql`explain (format json) select ctid from mail_outbox where expires_at < now() limit 2000`,
      );
      return JSON.stringify(row?.['QUERY PLAN']);
    });
    expect(plan).toContain('mail_outbox_expires_idx');
  });

  it('every foreign key into a table the purge deletes from is indexed, so a deleted row finds what refers to it without a scan', async () => {
    // A DELETE fires each foreign key's action once per deleted row (ON DELETE SET NULL / CASCADE):
    // without an index on the referencing column, each is a scan of that table. mfa_challenges
    // .session_id had none: a batch of 2,000 sessions against 20,000 challenges took 5.7 s on
    // PostgreSQL 15, past DB_STATEMENT_TIMEOUT_MS, and the sessions' purge then failed every run.
    const unindexed = await selectRows<{ fk: string }>(
      app.services.db,
      sql`select c.conrelid::regclass::text || '.' || a.attname || ' -> ' || c.confrelid::regclass::text as fk
            from pg_constraint c
            join pg_attribute a on a.attrelid = c.conrelid and a.attnum = c.conkey[1]
           where c.contype = 'f'
             and c.confrelid::regclass::text in
                 ('sessions', 'refresh_tokens', 'revocations', 'email_tokens', 'mfa_challenges', 'mfa_factors', 'mail_outbox', 'audit_events')
             and not exists (select 1 from pg_index i where i.indrelid = c.conrelid and i.indkey[0] = c.conkey[1])
           order by 1`,
    );
    expect(unindexed.map((r) => r.fk)).toEqual([]);
  });

  it('housekeeping purges at most once an hour by the wall clock, and tries a failed purge again after 1, 2, 4… minutes up to the hour', async () => {
    const purge = vi.spyOn(app.services.retention, 'purge');
    const wallClock = vi.spyOn(Date, 'now');
    const start = Date.now() + 1000 * DAY;
    try {
      wallClock.mockReturnValue(start);
      await app.services.housekeeping();
      await app.services.housekeeping();
      expect(purge).toHaveBeenCalledTimes(1);
      expect(purge).toHaveBeenLastCalledWith(new Date(start));

      wallClock.mockReturnValue(start + 3600_000 - 1);
      await app.services.housekeeping();
      expect(purge).toHaveBeenCalledTimes(1);

      // A failed purge is tried again after 1, 2, 4… minutes (not at every run), then hourly once it passes.
      let at = start + 3600_000;
      let calls = 1;
      for (const waitMinutes of [1, 2, 4, 8, 16, 32, 60, 60]) {
        wallClock.mockReturnValue(at);
        purge.mockRejectedValueOnce(new Error('connection terminated'));
        await expect(app.services.housekeeping()).rejects.toThrow('connection terminated');
        expect(purge).toHaveBeenCalledTimes(++calls);
        wallClock.mockReturnValue(at + waitMinutes * 60_000 - 1);
        await app.services.housekeeping();
        expect(purge).toHaveBeenCalledTimes(calls);
        at += waitMinutes * 60_000;
      }
      wallClock.mockReturnValue(at);
      await app.services.housekeeping();
      expect(purge).toHaveBeenCalledTimes(++calls);
      wallClock.mockReturnValue(at + 3600_000 - 1);
      await app.services.housekeeping();
      expect(purge).toHaveBeenCalledTimes(calls);

      // The next failure after a success waits a minute again.
      wallClock.mockReturnValue(at + 3600_000);
      purge.mockRejectedValueOnce(new Error('connection terminated'));
      await expect(app.services.housekeeping()).rejects.toThrow('connection terminated');
      wallClock.mockReturnValue(at + 3600_000 + 60_000);
      await app.services.housekeeping();
      expect(purge).toHaveBeenCalledTimes(calls + 2);
    } finally {
      wallClock.mockRestore();
      purge.mockRestore();
    }
  });

  it('housekeeping runs each step on its own: a failed ensureKeys skips neither the revocations’ reload nor the purge', async () => {
    const { keys, revocations, retention } = app.services;
    const ensureKeys = vi.spyOn(keys, 'ensureKeys');
    const reload = vi.spyOn(revocations, 'reload');
    const purge = vi.spyOn(retention, 'purge').mockResolvedValue(undefined as never);
    const wallClock = vi.spyOn(Date, 'now');
    // Past every purge the test above made due, and each run a purge later.
    let at = Date.now() + 10_000 * DAY;
    try {
      wallClock.mockReturnValue(at);
      ensureKeys.mockRejectedValueOnce(new Error('could not serialize access'));
      await expect(app.services.housekeeping()).rejects.toThrow('could not serialize access');
      expect(reload).toHaveBeenCalledTimes(1);
      expect(purge).toHaveBeenCalledTimes(1);

      at += 2 * 3600_000;
      wallClock.mockReturnValue(at);
      reload.mockRejectedValueOnce(new Error('connection terminated'));
      await expect(app.services.housekeeping()).rejects.toThrow('connection terminated');
      expect(ensureKeys).toHaveBeenCalledTimes(2);
      expect(purge).toHaveBeenCalledTimes(2);

      // Two failures at once: both are told, and the purge still runs.
      at += 2 * 3600_000;
      wallClock.mockReturnValue(at);
      ensureKeys.mockRejectedValueOnce(new Error('could not serialize access'));
      reload.mockRejectedValueOnce(new Error('connection terminated'));
      const both = await app.services.housekeeping().then(
        () => undefined,
        (err: unknown) => err,
      );
      expect(both).toBeInstanceOf(AggregateError);
      expect((both as AggregateError).errors.map((e: Error) => e.message)).toEqual([
        'could not serialize access',
        'connection terminated',
      ]);
      expect(purge).toHaveBeenCalledTimes(3);
    } finally {
      wallClock.mockRestore();
      purge.mockRestore();
      reload.mockRestore();
      ensureKeys.mockRestore();
    }
  });

  /** Records, for each row `tables` lose, the transaction that deleted it; `run` sees the log, then it goes. */
  async function recordingDeletes<T>(tables: string[], run: () => Promise<T>) {
    const db = app.services.db;
    await db.execute(sql`create table retention_deletes (tbl text not null, tx bigint not null)`);
    await db.execute(
      sql.raw(`create function retention_deleted() returns trigger language plpgsql as $$
        begin insert into retention_deletes values (tg_table_name, txid_current()); return old; end $$`),
    );
    for (const table of tables) {
      await db.execute(
        sql.raw(`create trigger retention_deleted after delete on ${table}
          for each row execute function retention_deleted()`),
      );
    }
    try {
      await run();
      return await selectRows<{ tbl: string; rows: number; most: number }>(
        db,
        sql`select tbl, sum(n)::int as rows, max(n)::int as most
              from (select tbl, tx, count(*) as n from retention_deletes group by tbl, tx) per_tx
             group by tbl order by tbl`,
      );
    } finally {
      for (const table of tables) await db.execute(sql.raw(`drop trigger retention_deleted on ${table}`));
      await db.execute(sql`drop function retention_deleted()`);
      await db.execute(sql`drop table retention_deletes`);
    }
  }

  it('deletes the refresh tokens of ended sessions in batches of their own, never more rows in one transaction than a batch', async () => {
    const user = await registerUser(app, 'retention-rotated');
    // Two sessions rotated seven times each: eight refresh tokens apiece, against a batch of three.
    for (const first of [user.refreshToken, (await login(app, user.email)).session.refresh_token]) {
      let refreshToken = first;
      let accessToken = '';
      for (let i = 0; i < 7; i++) {
        const res = await app.inject({
          method: 'POST',
          url: '/v1/auth/refresh',
          payload: { refresh_token: refreshToken },
        });
        expect(res.statusCode, res.body).toBe(200);
        refreshToken = res.json().session.refresh_token;
        accessToken = res.json().session.access_token;
      }
      const out = await app.inject({
        method: 'POST',
        url: '/v1/auth/logout',
        headers: bearer(accessToken),
        payload: {},
      });
      expect(out.statusCode).toBe(204);
    }
    expect(await refreshTokensOf(user.id)).toBe(16);

    const retention = createRetention({
      db: app.services.db,
      clock,
      logger: app.services.logger,
      options: { sessionRetentionDays: 7, auditRetentionDays: 0, mfaSetupTtlSeconds: 900, batchSize: 3 },
    });
    clock.advance(8 * DAY);
    let result: Awaited<ReturnType<typeof retention.purge>> | undefined;
    const deletes = await recordingDeletes(['sessions', 'refresh_tokens'], async () => {
      result = await retention.purge();
    });
    expect(deletes).toEqual([
      { tbl: 'refresh_tokens', rows: 16, most: 3 },
      { tbl: 'sessions', rows: 2, most: 2 },
    ]);
    expect(result).toMatchObject({ sessions: 2, refreshTokens: 16 });
    expect(await sessionsOf(user.id)).toBe(0);
    expect(await refreshTokensOf(user.id)).toBe(0);
  });

  it('purges every other table when one fails, logs the failure, and fails the run so that it is tried again', async () => {
    const user = await registerUser(app, 'retention-failing');
    const out = await app.inject({
      method: 'POST',
      url: '/v1/auth/logout',
      headers: bearer(user.accessToken),
      payload: {},
    });
    expect(out.statusCode).toBe(204);
    await leaveShortLivedRows(user, 'retention-failing');
    const ofUser = (table: string) =>
      count(sql`select count(*)::int as n from ${sql.identifier(table)} where user_id = ${user.id}`);
    const auditOfUser = () =>
      count(
        sql`select count(*)::int as n from audit_events where actor_id = ${user.id} or subject_id = ${user.id}`,
      );
    expect(await auditOfUser()).toBeGreaterThan(0);

    // The sessions' step, second of six, fails: every DELETE from sessions is refused.
    const db = app.services.db;
    await db.execute(
      sql.raw(`create function retention_refuse() returns trigger language plpgsql as $$
        begin raise exception 'refused by the test'; end $$`),
    );
    await db.execute(
      sql.raw(
        'create trigger retention_refuse before delete on sessions for each row execute function retention_refuse()',
      ),
    );
    const logged = vi.spyOn(app.services.logger, 'error');
    clock.advance(31 * DAY);
    let failure: unknown;
    let errorLines: unknown[][] = [];
    try {
      failure = await app.services.retention.purge().catch((err: unknown) => err);
      errorLines = [...logged.mock.calls];
    } finally {
      logged.mockRestore();
      await db.execute(sql`drop trigger retention_refuse on sessions`);
      await db.execute(sql`drop function retention_refuse()`);
    }
    // The four steps after it ran all the same.
    expect(await ofUser('email_tokens')).toBe(0);
    expect(await ofUser('mfa_challenges')).toBe(0);
    expect(await ofUser('mail_outbox')).toBe(0);
    expect(await auditOfUser()).toBe(0);
    expect(await sessionsOf(user.id)).toBe(1);
    expect(failure).toBeInstanceOf(RetentionError);
    expect((failure as RetentionError).message).toBe('retention: could not purge sessions');
    expect((failure as RetentionError).result).toMatchObject({ sessions: 0, emailTokens: 1, mail: 1 });
    expect(errorLines).toContainEqual([
      expect.objectContaining({ table: 'sessions' }),
      'retention: could not purge sessions; the other tables go on',
    ]);

    // Tried again, with the table answering, it purges the sessions too.
    expect((await app.services.retention.purge()).sessions).toBeGreaterThanOrEqual(1);
    expect(await sessionsOf(user.id)).toBe(0);
  });
});

describe('housekeeping runs one at a time, and a stop ends a purge at its next batch', () => {
  it('a housekeeping asked for while one runs shares it: one purge, not two side by side', async () => {
    const app = await buildTestApp();
    const purge = vi.spyOn(app.services.retention, 'purge');
    let release: () => void = () => undefined;
    const held = new Promise<void>((resolve) => {
      release = resolve;
    });
    purge.mockImplementationOnce(async () => {
      await held;
      return {
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
    });
    try {
      // The first purge of this app (its next purge is due at once) outlasts the minute: the next
      // minute's run found it still due, and started another beside it.
      const first = app.services.housekeeping();
      await expect.poll(() => purge.mock.calls.length).toBe(1);
      const second = app.services.housekeeping();
      // Time for the second to read the keys and revocations and reach the purge (a few queries).
      await new Promise((resolve) => setTimeout(resolve, 500));
      release();
      await Promise.all([first, second]);
      expect(purge).toHaveBeenCalledTimes(1);
    } finally {
      purge.mockRestore();
      await app.close();
    }
  });

  it.runIf(inject('databaseUrl'))(
    'a stop (SIGTERM) during a purge waits for the batch in flight and starts no other: nothing fails, nothing is logged as failed',
    async () => {
      const scratch = (await scratchDatabase('auth_retention_stop'))!;
      const database = await openTestDatabase(scratch.url);
      const app = await buildTestApp({ deps: { database } });
      const other = new pg.Client({ connectionString: scratch.url });
      await other.connect();
      try {
        // 5,000 expired revocations: three batches of 2,000, each held 300 ms by a trigger.
        await other.query(`insert into revocations (kind, value, revoked_at, expires_at)
          select 'jti', 'stop-' || g, now() - interval '2 hours', now() - interval '1 hour'
            from generate_series(1, 5000) g`);
        await other.query(`create function retention_slow() returns trigger language plpgsql as $$
          begin perform pg_sleep(0.3); return null; end $$`);
        await other.query(
          'create trigger retention_slow before delete on revocations for each statement execute function retention_slow()',
        );
        const left = async () =>
          Number(
            (await other.query(`select count(*) as n from revocations where value like 'stop-%'`)).rows[0].n,
          );
        const errors = vi.spyOn(app.services.logger, 'error');
        const warnings = vi.spyOn(app.services.logger, 'warn');
        const run = app.services.housekeeping().then(
          () => 'done',
          (err: unknown) => err,
        );
        await expect.poll(left, { interval: 20, timeout: 5000 }).toBeLessThan(5000);
        // What server.ts does on SIGTERM: the app closes (the services stop), then the pool.
        await app.close();
        await database.close();
        const logged = [...errors.mock.calls, ...warnings.mock.calls].map((call) => call[1]);
        errors.mockRestore();
        warnings.mockRestore();
        expect(await run).toBe('done');
        expect(logged).toEqual([]);
        // It stopped: the batch after the one in flight was never started.
        expect(await left()).toBeGreaterThan(0);
      } finally {
        await other.end();
        await app.close();
        await database.close().catch(() => undefined);
        await scratch.drop();
      }
    },
  );
});
