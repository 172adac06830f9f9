import { sql } from 'drizzle-orm';
import type { FastifyInstance, LightMyRequestResponse } from 'fastify';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, inject, it, vi } from 'vitest';
import { selectRows } from '../../src/db/client.js';
import { mailOutbox } from '../../src/db/schema/index.js';
import type { MailMessage } from '../../src/lib/mailer.js';
import { LINK_REQUEST_FLOOR_MS } from '../../src/modules/auth/auth.routes.js';
import { mailsPerHourKey } from '../../src/lib/throttle.js';
import { MAILS_PER_ACCOUNT_HOUR, mailCapKey } from '../../src/modules/auth/mailed-tokens.js';
import { MAIL_RETRY_FIRST_MS, MAX_WAITING_KICKS, retryDelayMs } from '../../src/modules/mail/mail-outbox.js';
import { buildTestApp, uniqueEmail } from '../support/app.js';
import { createTestClock } from '../support/clock.js';
import { ownDatabase, waitForLockWaiters } from '../support/database.js';
import { bearer } from '../support/http.js';
import { capturingMailer } from '../support/mail.js';
import { capCountings, randomAddress } from '../support/redis.js';
import { totpAt, turnOnMfa } from '../support/mfa.js';
import { createAdmin, PASSWORD, registerUser } from '../support/factories.js';

const RESET_URL = 'https://app.example.test/reset-password';
const CONFIRM_URL = 'https://app.example.test/confirm-email';
const CHANGE_URL = 'https://app.example.test/email-change';

const mailsTo = (mailer: { sent: MailMessage[] }, email: string, subject: string) =>
  mailer.sent.filter((m) => m.to === email && m.subject === subject);

function tokenIn(mail: MailMessage | undefined, prefix: string): string {
  expect(mail, 'a mail').toBeDefined();
  const found = new RegExp(`#token=(${prefix}_[0-9A-Za-z_]+)`).exec(mail!.text);
  expect(found, mail!.text).not.toBeNull();
  return found![1]!;
}

/*
 * On a database of its own: delivering due mail takes every queued mail of the database, and the
 * apps of other files would have theirs sent through this file's mailer (and this file's clock runs
 * ahead).
 */
let own: Awaited<ReturnType<typeof ownDatabase>>;
const apps: FastifyInstance[] = [];
beforeAll(async () => {
  own = await ownDatabase('auth_mail_outbox');
});
afterAll(async () => {
  await Promise.all(apps.map((a) => a.close()));
  await own.dispose();
});
const appOnOwnDatabase = async (options: Parameters<typeof buildTestApp>[0] = {}) => {
  const app = await buildTestApp({ ...options, deps: { ...options.deps, database: own.database } });
  apps.push(app);
  return app;
};

describe('mail the mail server refused is kept and sent later (built-in provider)', () => {
  let app: FastifyInstance;
  const mailer = capturingMailer();
  const clock = createTestClock();

  beforeAll(async () => {
    app = await appOnOwnDatabase({
      env: { PASSWORD_RESET_URL: RESET_URL, EMAIL_CONFIRMATION_URL: CONFIRM_URL, PASSWORD_RESET_TTL: '1800' },
      deps: { mailer, clock },
    });
  });

  const forgot = (email: string) =>
    app.inject({ method: 'POST', url: '/v1/auth/password/forgot', payload: { email } });
  const outbox = () => app.services.outbox!;
  /** A registered user whose confirmation mail (sent after the answer, not awaited) went out. */
  const registered = async (tag: string) => {
    const user = await registerUser(app, tag);
    await expect.poll(() => mailsTo(mailer, user.email, 'Confirm your email address').length).toBe(1);
    return user;
  };
  const pendingFor = (userId: string) => outbox().pending(userId);
  /** Moves the app's clock past the next retry of every mail queued now, and runs the retries. */
  const retryLater = async (ms = MAIL_RETRY_FIRST_MS) => {
    clock.advance(ms / 1000 + 1);
    return outbox().deliverDue();
  };
  const down = async <T>(work: () => Promise<T>): Promise<T> => {
    mailer.failing = true;
    try {
      return await work();
    } finally {
      mailer.failing = false;
    }
  };

  it('answers a reset request during a mail outage as for an unknown address, and mails the link once the server is back', async () => {
    const user = await registered('outbox-reset');
    const [known, unknown] = await down(async () => [
      await forgot(user.email),
      await forgot(uniqueEmail('outbox-nobody')),
    ]);
    // Nothing tells an address with an account from one without while mail cannot go.
    expect(known.statusCode, known.body).toBe(204);
    expect(unknown.statusCode).toBe(204);
    expect(known.body).toBe(unknown.body);
    expect(mailsTo(mailer, user.email, 'Reset your password')).toHaveLength(0);

    const [queued] = await pendingFor(user.id);
    expect(queued).toMatchObject({ kind: 'password_reset', recipient: user.email, attempts: 1 });
    expect(queued!.emailTokenId).toBeTruthy();
    // The link's token is in the queued text, which is stored encrypted, never in the clear.
    expect(queued!.bodyEncrypted).not.toContain('prs_');
    expect(queued!.bodyEncrypted).not.toContain('reset-password');
    const events = await app.services.audit.list({
      subjectId: user.id,
      type: 'auth.password_reset_requested',
      limit: 5,
    });
    expect(events[0]).toMatchObject({ outcome: 'success', data: { delivery: 'smtp' } });

    // Not before its time.
    expect(await outbox().deliverDue()).toMatchObject({ sent: 0 });
    expect(mailsTo(mailer, user.email, 'Reset your password')).toHaveLength(0);

    await retryLater();
    const mail = mailsTo(mailer, user.email, 'Reset your password');
    expect(mail).toHaveLength(1);
    expect(await pendingFor(user.id)).toHaveLength(0);
    // The link it carries is the one made at the request, and it works.
    const reset = await app.inject({
      method: 'POST',
      url: '/v1/auth/password/reset',
      payload: { token: tokenIn(mail[0], 'prs'), new_password: 'a brand new passphrase here' },
    });
    expect(reset.statusCode, reset.body).toBe(204);

    const metrics = await app.inject({ method: 'GET', url: '/metrics' });
    expect(metrics.body).toMatch(/auth_mail_total\{kind="password_reset",outcome="queued"\} [1-9]/);
    expect(metrics.body).toMatch(/auth_mail_total\{kind="password_reset",outcome="retried"\} [1-9]/);
  });

  it('backs off while the server keeps refusing, and gives up when the link expires', async () => {
    const user = await registered('outbox-backoff');
    await down(() => forgot(user.email));
    await down(async () => {
      expect((await retryLater()).failed).toBeGreaterThanOrEqual(1);
    });
    const [second] = await pendingFor(user.id);
    expect(second!.attempts).toBe(2);
    // The next try is a minute after the second: not 30 s.
    expect(second!.nextAttemptAt.getTime() - clock.nowMs()).toBeGreaterThan(retryDelayMs(2) - 2000);
    await down(() => retryLater(retryDelayMs(1)));
    expect((await pendingFor(user.id))[0]!.attempts).toBe(2);

    // PASSWORD_RESET_TTL is 30 minutes: after it, the mail is dropped, not sent with a dead link.
    const { lastError } = (await pendingFor(user.id))[0]!;
    expect(lastError).toBeTruthy();
    clock.advance(1800);
    const warned = vi.spyOn(app.services.logger, 'warn');
    let run: Awaited<ReturnType<ReturnType<typeof outbox>['deliverDue']>>;
    let drops: unknown[][];
    try {
      run = await outbox().deliverDue();
      drops = warned.mock.calls.filter(
        (call) =>
          String(call[1]).startsWith('a mail was dropped unsent') &&
          (call[0] as { mail: { userId: string } }).mail.userId === user.id,
      );
    } finally {
      warned.mockRestore();
    }
    expect(run.dropped).toBeGreaterThanOrEqual(1);
    expect(await pendingFor(user.id)).toHaveLength(0);
    expect(mailsTo(mailer, user.email, 'Reset your password')).toHaveLength(0);
    // The drop says why the tries before failed.
    expect(drops).toHaveLength(1);
    expect(drops[0]![0]).toMatchObject({ mail: { kind: 'password_reset', attempts: 2, lastError } });
  });

  it('reports the mail waiting in the outbox at the end of each retry run (auth_mail_outbox_waiting)', async () => {
    const user = await registered('outbox-gauge');
    await down(() => forgot(user.email));
    const waiting = async () =>
      (await selectRows<{ n: number }>(app.services.db, sql`select count(*)::int as n from mail_outbox`))[0]!
        .n;
    const gauge = async () => {
      const metrics = await app.inject({ method: 'GET', url: '/metrics' });
      const found = /^auth_mail_outbox_waiting (\d+)$/m.exec(metrics.body);
      expect(found, 'auth_mail_outbox_waiting in /metrics').not.toBeNull();
      return Number(found![1]);
    };
    // A run that finds nothing due yet (the reset mail backs off for 30 s) still counts what waits.
    await outbox().deliverDue();
    const before = await gauge();
    expect(before).toBeGreaterThanOrEqual(1);
    expect(before).toBe(await waiting());
    // Sent by the next run: counted out.
    await retryLater();
    expect(await pendingFor(user.id)).toHaveLength(0);
    const after = await gauge();
    expect(after).toBe(await waiting());
    expect(after).toBeLessThan(before);
  });

  it('drops a queued link that a newer one replaced, and sends only the newer', async () => {
    const user = await registered('outbox-replaced');
    await down(() => forgot(user.email));
    expect(await pendingFor(user.id)).toHaveLength(1);
    clock.advance(61);
    expect((await forgot(user.email)).statusCode).toBe(204);
    // The newer link went at once; the older mail lost its link, and is dropped, not sent, and counted.
    expect(mailsTo(mailer, user.email, 'Reset your password')).toHaveLength(1);
    expect(await pendingFor(user.id)).toMatchObject([{ emailTokenId: null, carriesLink: true }]);
    const run = await retryLater();
    expect(run.dropped).toBeGreaterThanOrEqual(1);
    expect(await pendingFor(user.id)).toHaveLength(0);
    expect(mailsTo(mailer, user.email, 'Reset your password')).toHaveLength(1);
    const metrics = await app.inject({ method: 'GET', url: '/metrics' });
    expect(metrics.body).toMatch(/auth_mail_total\{kind="password_reset",outcome="dropped"\} [1-9]/);
  });

  it('drops a queued link that was used meanwhile', async () => {
    const user = await registered('outbox-used');
    await down(() => forgot(user.email));
    const [queued] = await pendingFor(user.id);
    await app.services.repos.emailTokens.consume(queued!.emailTokenId!, clock.now(), app.services.db);
    const run = await retryLater();
    expect(run.dropped).toBeGreaterThanOrEqual(1);
    expect(await pendingFor(user.id)).toHaveLength(0);
    expect(mailsTo(mailer, user.email, 'Reset your password')).toHaveLength(0);
  });

  it('drops a backlog of stale mail one claimed mail at a time, each logged and counted: no statement takes them all', async () => {
    // Notices the server refused until they expired: each one due, and stale.
    const user = await registered('outbox-stale-backlog');
    const db = app.services.db;
    await db.insert(mailOutbox).values(
      Array.from({ length: 5 }, (_, i) => ({
        kind: 'notice',
        recipient: user.email,
        subject: `stale ${i}`,
        bodyEncrypted: 'sealed',
        userId: user.id,
        attempts: 3,
        nextAttemptAt: clock.now(),
        expiresAt: clock.now(),
        createdAt: clock.now(),
      })),
    );
    // Rows deleted from mail_outbox, by transaction (each statement here is its own).
    await db.execute(sql`create table outbox_deletes (tx bigint not null)`);
    await db.execute(
      sql.raw(`create function outbox_deleted() returns trigger language plpgsql as $$
        begin insert into outbox_deletes values (txid_current()); return old; end $$`),
    );
    await db.execute(
      sql.raw(
        'create trigger outbox_deleted after delete on mail_outbox for each row execute function outbox_deleted()',
      ),
    );
    const warned = vi.spyOn(app.services.logger, 'warn');
    let run: Awaited<ReturnType<ReturnType<typeof outbox>['deliverDue']>>;
    let most: number;
    let drops: unknown[][];
    try {
      clock.advance(1);
      run = await outbox().deliverDue();
      drops = warned.mock.calls.filter((call) => String(call[1]).startsWith('a mail was dropped unsent'));
      [{ most }] = (await selectRows<{ most: number }>(
        db,
        sql`select coalesce(max(n), 0)::int as most from (select count(*) as n from outbox_deletes group by tx) t`,
      )) as [{ most: number }];
    } finally {
      warned.mockRestore();
      await db.execute(sql`drop trigger outbox_deleted on mail_outbox`);
      await db.execute(sql`drop function outbox_deleted()`);
      await db.execute(sql`drop table outbox_deletes`);
    }
    expect(await pendingFor(user.id)).toHaveLength(0);
    expect(run.dropped).toBeGreaterThanOrEqual(5);
    expect(mailsTo(mailer, user.email, 'stale 0')).toHaveLength(0);
    // A stale mail is claimed like any other due mail (one, by mail_outbox_due_idx) and then dropped:
    // a step's cost does not grow with the backlog, nor does one DELETE return all of it.
    expect(most).toBe(1);
    const ours = drops.filter(
      (call) => (call[0] as { mail: { userId: string } }).mail.userId === user.id,
    ) as [{ mail: { kind: string; attempts: number } }, string][];
    expect(ours).toHaveLength(5);
    // The attempts made, not counting the claim that found it stale.
    expect(ours[0]![0].mail).toMatchObject({ kind: 'notice', attempts: 3 });
  });

  it('keeps the confirmation mail of a registration made during an outage, and of a resend', async () => {
    const email = uniqueEmail('outbox-register');
    mailer.failing = true;
    let userId: string;
    try {
      const res = await app.inject({
        method: 'POST',
        url: '/v1/auth/register',
        payload: { email, password: PASSWORD },
      });
      expect(res.statusCode, res.body).toBe(201);
      userId = res.json().user.id;
      // The confirmation mail goes after the answer: wait for it to be queued.
      await expect
        .poll(() => pendingFor(userId))
        .toMatchObject([{ kind: 'email_confirmation', recipient: email }]);
    } finally {
      mailer.failing = false;
    }

    // A resend during the outage answers as for an address without an account.
    clock.advance(61);
    const [resent, stranger] = await down(async () => [
      await app.inject({ method: 'POST', url: '/v1/auth/email/resend', payload: { email } }),
      await app.inject({
        method: 'POST',
        url: '/v1/auth/email/resend',
        payload: { email: uniqueEmail('outbox-nobody') },
      }),
    ]);
    expect(resent.statusCode, resent.body).toBe(204);
    expect(stranger.statusCode).toBe(204);
    // The resend replaced the registration's link: the mail with the newer waits, the older lost its link.
    const waiting = await pendingFor(userId);
    expect(waiting.filter((m) => m.emailTokenId !== null)).toHaveLength(1);

    await retryLater();
    const mails = mailsTo(mailer, email, 'Confirm your email address');
    expect(mails).toHaveLength(1);
    const confirmed = await app.inject({
      method: 'POST',
      url: '/v1/auth/email/confirm',
      payload: { token: tokenIn(mails[0], 'pec') },
    });
    expect(confirmed.statusCode, confirmed.body).toBe(200);
  });

  it('keeps security notices, and drops what waits for an account that is deleted', async () => {
    const user = await registered('outbox-notice');
    await app.services.repos.users.update(user.id, { emailConfirmedAt: clock.now() });
    await down(async () => {
      await turnOnMfa(app, user.accessToken, clock.nowMs);
      // The notice is not awaited by the request: wait for it to be queued.
      await expect.poll(async () => (await pendingFor(user.id)).map((m) => m.kind)).toEqual(['notice']);
    });
    await retryLater();
    expect(mailsTo(mailer, user.email, 'Two-step verification is on')).toHaveLength(1);

    const doomed = await registered('outbox-deleted');
    await down(() => forgot(doomed.email));
    expect(await pendingFor(doomed.id)).toHaveLength(1);
    const admin = await createAdmin(app);
    const gone = await app.inject({
      method: 'DELETE',
      url: `/v1/users/${doomed.id}`,
      headers: bearer(admin.accessToken),
    });
    expect(gone.statusCode, gone.body).toBe(204);
    const [left] = await selectRows<{ n: number }>(
      app.services.db,
      sql`select count(*)::int as n from mail_outbox where recipient = ${doomed.email}`,
    );
    expect(left!.n).toBe(0);
  });

  it('answers 503 when the mail cannot be written, and keeps no link', async () => {
    const user = await registered('outbox-nowhere');
    // The database failing the mail's write: the link is written with it, so neither stays.
    const spy = vi
      .spyOn(outbox(), 'enqueue')
      .mockRejectedValue(
        Object.assign(new Error('terminating connection due to administrator command'), { code: '57P01' }),
      );
    try {
      const res = await forgot(user.email);
      expect(res.statusCode, res.body).toBe(503);
      expect(res.headers['content-type']).toContain('application/problem+json');
    } finally {
      spy.mockRestore();
    }
    expect(await app.services.repos.emailTokens.latestFor(user.id, 'password_reset')).toBeUndefined();
  });

  it('an administrator’s reset link during an outage waits too, and does not void the one already waiting', async () => {
    const user = await registered('outbox-admin');
    const admin = await createAdmin(app);
    const byAdmin = () =>
      app.inject({
        method: 'POST',
        url: `/v1/users/${user.id}/password-reset`,
        headers: bearer(admin.accessToken),
      });
    const res = await down(byAdmin);
    expect(res.statusCode, res.body).toBe(204);
    expect(await pendingFor(user.id)).toMatchObject([{ kind: 'password_reset', attempts: 1 }]);
    await retryLater();
    const mail = mailsTo(mailer, user.email, 'Reset your password');
    expect(mail).toHaveLength(1);
    expect(tokenIn(mail[0], 'prs')).toMatch(/^prs_/);
  });
});

/*
 * A crash between a change's commit and the write of its mail (the process killed, the database
 * connection lost) must not leave a change acknowledged whose mail is gone: the mail is written in
 * the change's own transaction, so it commits or rolls back with it. Here the crash is the end of the
 * connection whose statement is the mail's write: a trigger holds every INSERT into mail_outbox on an
 * advisory lock the test holds, the change is asked for, and the one statement that comes to wait
 * there has its connection ended, as a crash would end it.
 */
describe.skipIf(!inject('databaseUrl'))('a change and its mail commit together', () => {
  let app: FastifyInstance;
  const mailer = capturingMailer();
  const clock = createTestClock();
  /** The advisory lock the gate's trigger waits for. */
  const GATE = 740_033_101;

  beforeAll(async () => {
    app = await appOnOwnDatabase({
      env: {
        PASSWORD_RESET_URL: RESET_URL,
        EMAIL_CONFIRMATION_URL: CONFIRM_URL,
        EMAIL_CHANGE_URL: CHANGE_URL,
      },
      deps: { mailer, clock },
    });
  });

  /**
   * `request`'s answer, its mail's write cut off: each INSERT into mail_outbox made to wait for the
   * lock GATE (a trigger; the links' deletions, which update mail_outbox through its foreign key, do
   * not wait), the statement that comes to wait has its connection ended, then the gate goes.
   */
  /**
   * `request` cut off at its mail's write is not acknowledged (503): `unchanged` holds and no
   * `subject` went to `to`. Asked again, it is made (`status`): `changed` holds, and the mail is there.
   */
  async function cutThenMade(
    request: () => Promise<LightMyRequestResponse>,
    expected: {
      status: number;
      to: string;
      subject: string;
      unchanged: () => Promise<void>;
      changed: (made: LightMyRequestResponse) => Promise<void>;
    },
  ) {
    const cut = await cutAtMailWrite(request);
    expect(cut.statusCode, cut.body).toBe(503);
    await expected.unchanged();
    expect(await noticesTo(expected.to, expected.subject)).toBe(0);

    const made = await request();
    expect(made.statusCode, made.body).toBe(expected.status);
    await expected.changed(made);
    expect(await noticesTo(expected.to, expected.subject)).toBe(1);
  }

  async function cutAtMailWrite<T>(request: () => Promise<T>): Promise<T> {
    const { db } = app.services;
    const holder = new pg.Client({ connectionString: own.url });
    await holder.connect();
    await db.execute(
      sql.raw(`create function outbox_gate() returns trigger language plpgsql as $$
        begin perform pg_advisory_xact_lock(${GATE}); return new; end $$`),
    );
    await db.execute(
      sql.raw(
        'create trigger outbox_gate before insert on mail_outbox for each row execute function outbox_gate()',
      ),
    );
    try {
      await holder.query('SELECT pg_advisory_lock($1)', [GATE]);
      const { rows } = await holder.query<{ pid: number }>('SELECT pg_backend_pid() AS pid');
      const holderPid = rows[0]!.pid;
      const answer = request();
      await waitForLockWaiters(holder, 1, holderPid);
      const { rows: waiting } = await holder.query<{ pid: number }>(
        'SELECT pid FROM pg_stat_activity WHERE $1::int = ANY(pg_blocking_pids(pid))',
        [holderPid],
      );
      expect(waiting).toHaveLength(1);
      await holder.query('SELECT pg_terminate_backend($1::int)', [waiting[0]!.pid]);
      await holder.query('SELECT pg_advisory_unlock($1)', [GATE]);
      return await answer;
    } finally {
      await holder.end();
      await db.execute(sql`drop trigger outbox_gate on mail_outbox`);
      await db.execute(sql`drop function outbox_gate()`);
    }
  }

  const noticesTo = (email: string, subject: string) =>
    selectRows<{ n: number }>(
      app.services.db,
      sql`select count(*)::int as n from mail_outbox where recipient = ${email} and subject = ${subject}`,
    ).then((rows) => rows[0]!.n + mailsTo(mailer, email, subject).length);
  /** A registered user whose confirmation mail went out (nothing of the registration still writes). */
  const registered = async (tag: string) => {
    const user = await registerUser(app, tag);
    await expect.poll(() => mailsTo(mailer, user.email, 'Confirm your email address').length).toBe(1);
    return user;
  };
  const signIn = (email: string, password: string) =>
    app.inject({ method: 'POST', url: '/v1/auth/login', payload: { email, password } });

  it('a registration: cut off before its confirmation mail is written, no account is made; made, its mail is there', async () => {
    const email = uniqueEmail('outbox-cut-register');
    const register = () =>
      app.inject({ method: 'POST', url: '/v1/auth/register', payload: { email, password: PASSWORD } });
    // Not acknowledged: the account rolled back with its mail, and the address may register again.
    await cutThenMade(register, {
      status: 201,
      to: email,
      subject: 'Confirm your email address',
      unchanged: async () => expect(await app.services.repos.users.findByEmail(email)).toBeUndefined(),
      changed: async () => undefined,
    });
  });

  it('a registration whose process dies after the commit: its confirmation mail is committed, and another instance sends it', async () => {
    const email = uniqueEmail('outbox-crash-register');
    // The commit's aftermath never runs (the process is gone): nothing is sent by this instance.
    const kick = vi.spyOn(app.services.outbox!, 'kick').mockImplementation(() => undefined);
    let userId: string;
    try {
      const res = await app.inject({
        method: 'POST',
        url: '/v1/auth/register',
        payload: { email, password: PASSWORD },
      });
      expect(res.statusCode, res.body).toBe(201);
      userId = res.json().user.id;
    } finally {
      kick.mockRestore();
    }
    // Committed with the account, read right after the answer: due now, never tried.
    expect(await app.services.outbox!.pending(userId)).toMatchObject([
      { kind: 'email_confirmation', recipient: email, attempts: 0 },
    ]);
    expect(mailsTo(mailer, email, 'Confirm your email address')).toHaveLength(0);
    const other = capturingMailer();
    const next = await appOnOwnDatabase({
      env: { EMAIL_CONFIRMATION_URL: CONFIRM_URL },
      deps: { mailer: other, clock },
    });
    await next.services.outbox!.deliverDue();
    expect(mailsTo(other, email, 'Confirm your email address')).toHaveLength(1);
    expect(await app.services.outbox!.pending(userId)).toHaveLength(0);
  });

  it('a password change: cut off before its notice is written, it is not made; made, its notice is there', async () => {
    const user = await registered('outbox-cut-password');
    const NEW_PASSWORD = 'another long passphrase 77';
    const change = () =>
      app.inject({
        method: 'POST',
        url: '/v1/auth/password',
        headers: bearer(user.accessToken),
        payload: { current_password: PASSWORD, new_password: NEW_PASSWORD },
      });
    // Not acknowledged: the change rolled back with its notice, and the old password still stands.
    await cutThenMade(change, {
      status: 204,
      to: user.email,
      subject: 'Your password was changed',
      unchanged: async () => expect((await signIn(user.email, PASSWORD)).statusCode).toBe(200),
      changed: async () => expect((await signIn(user.email, NEW_PASSWORD)).statusCode).toBe(200),
    });
  });

  it('a password reset: cut off before its notice is written, it is not made, and its link still works', async () => {
    const user = await registered('outbox-cut-reset');
    expect(
      (await app.inject({ method: 'POST', url: '/v1/auth/password/forgot', payload: { email: user.email } }))
        .statusCode,
    ).toBe(204);
    const token = tokenIn(mailsTo(mailer, user.email, 'Reset your password').at(-1), 'prs');
    const NEW_PASSWORD = 'a reset long passphrase 88';
    const reset = () =>
      app.inject({
        method: 'POST',
        url: '/v1/auth/password/reset',
        payload: { token, new_password: NEW_PASSWORD },
      });
    await cutThenMade(reset, {
      status: 204,
      to: user.email,
      subject: 'Your password was reset',
      unchanged: async () => expect((await signIn(user.email, PASSWORD)).statusCode).toBe(200),
      changed: async () => expect((await signIn(user.email, NEW_PASSWORD)).statusCode).toBe(200),
    });
  });

  it('two-step verification turned on: cut off before its notice is written, it stays off', async () => {
    const user = await registered('outbox-cut-mfa');
    await app.services.repos.users.update(user.id, { emailConfirmedAt: clock.now() });
    const enrol = await app.inject({
      method: 'POST',
      url: '/v1/auth/mfa/totp',
      headers: bearer(user.accessToken),
      payload: { password: PASSWORD },
    });
    expect(enrol.statusCode, enrol.body).toBe(201);
    const secret: string = enrol.json().secret;
    const activate = () =>
      app.inject({
        method: 'POST',
        url: '/v1/auth/mfa/totp/activate',
        headers: bearer(user.accessToken),
        payload: { code: totpAt(secret, clock.nowMs()) },
      });
    const status = async () =>
      (await app.inject({ method: 'GET', url: '/v1/auth/mfa', headers: bearer(user.accessToken) })).json();
    await cutThenMade(activate, {
      status: 200,
      to: user.email,
      subject: 'Two-step verification is on',
      unchanged: async () => expect(await status()).toMatchObject({ enabled: false, pending: true }),
      changed: async () => expect(await status()).toMatchObject({ enabled: true }),
    });
  });

  it('an email change: cut off before the old address’s notice is written, the address stays', async () => {
    const user = await registered('outbox-cut-change');
    // A proven address: the change needs its approval, and the notice goes to it.
    await app.services.repos.users.update(user.id, { emailConfirmedAt: clock.now() });
    const next = uniqueEmail('outbox-cut-changed');
    const asked = await app.inject({
      method: 'POST',
      url: '/v1/auth/email/change',
      headers: bearer(user.accessToken),
      payload: { new_email: next, password: PASSWORD },
    });
    expect(asked.statusCode, asked.body).toBe(202);
    const link = (to: string, subject: string) => {
      const text = mailsTo(mailer, to, subject).at(-1)?.text ?? '';
      const token = /#token=(pce_[0-9A-Za-z_]+)/.exec(text)?.[1];
      expect(token, text).toBeDefined();
      return token!;
    };
    const open = (token: string) =>
      app.inject({
        method: 'POST',
        url: '/v1/auth/email/change/confirm',
        headers: bearer(user.accessToken),
        payload: { token },
      });
    const first = await open(link(user.email, 'Confirm the change of your email address'));
    expect(first.json(), first.body).toMatchObject({ changed: false });
    const last = link(next, 'Confirm your new email address');
    await cutThenMade(() => open(last), {
      status: 200,
      to: user.email,
      subject: 'Your email address was changed',
      unchanged: async () =>
        expect((await app.services.repos.users.findById(user.id))?.email).toBe(user.email),
      changed: async (made) => expect(made.json()).toMatchObject({ changed: true }),
    });
  });
});

/**
 * A registration takes its confirmation mail's place under the address's hourly cap before its
 * transaction, and gives it back when that transaction fails: here at its commit, after the mail was
 * written (a deferred trigger refuses the commit), as many times as the cap allows mails. The
 * registration that then commits still has its mail. In memory, and through Redis.
 */
describe.each(await capCountings('mail outbox'))(
  'a registration rolled back, its mail counted $counts',
  ({ env, skip }) => {
    const mailer = capturingMailer();
    const emails: string[] = [];
    let app: FastifyInstance;

    beforeAll(async () => {
      if (skip) return;
      app = await appOnOwnDatabase({
        env: { EMAIL_CONFIRMATION_URL: CONFIRM_URL, RATE_LIMIT_ENABLED: 'true', ...env },
        deps: { mailer },
      });
    });
    afterAll(async () => {
      // Counts in Redis end with their hour; these are taken out now.
      const redis = app?.services.redis;
      if (!redis) return;
      for (const email of emails)
        await redis.del(
          mailsPerHourKey(mailCapKey(app.services.config.secretPepper, 'email_confirmation', email)),
        );
    });

    it.skipIf(skip)('leaves no account and no mail, and gives the cap’s place back', async () => {
      const email = uniqueEmail('outbox-rollback');
      emails.push(email);
      const { db } = app.services;
      const register = () =>
        app.inject({
          method: 'POST',
          url: '/v1/auth/register',
          remoteAddress: randomAddress(),
          payload: { email, password: PASSWORD },
        });
      // The commit of a transaction that wrote mail to this address fails (the database gone at the
      // commit, as far as the service can tell).
      await db.execute(
        sql.raw(`create function outbox_refuse_commit() returns trigger language plpgsql as $$
        begin
          if new.recipient = '${email}' then
            raise exception 'the commit was refused' using errcode = '08006';
          end if;
          return new;
        end $$`),
      );
      await db.execute(
        sql.raw(`create constraint trigger outbox_refuse_commit after insert on mail_outbox
        deferrable initially deferred for each row execute function outbox_refuse_commit()`),
      );
      const refused: number[] = [];
      try {
        for (let i = 0; i < MAILS_PER_ACCOUNT_HOUR + 1; i++) refused.push((await register()).statusCode);
      } finally {
        await db.execute(sql`drop trigger outbox_refuse_commit on mail_outbox`);
        await db.execute(sql`drop function outbox_refuse_commit()`);
      }
      expect(refused).toEqual(Array(MAILS_PER_ACCOUNT_HOUR + 1).fill(503));
      expect(await app.services.repos.users.findByEmail(email)).toBeUndefined();
      const [left] = await selectRows<{ n: number }>(
        db,
        sql`select count(*)::int as n from mail_outbox where recipient = ${email}`,
      );
      expect(left!.n).toBe(0);
      expect(mailsTo(mailer, email, 'Confirm your email address')).toHaveLength(0);
      const redis = app.services.redis;
      const key = mailsPerHourKey(mailCapKey(app.services.config.secretPepper, 'email_confirmation', email));
      if (redis) expect(Number((await redis.get(key)) ?? 0)).toBe(0);

      // Every place came back: the registration that commits is mailed.
      const made = await register();
      expect(made.statusCode, made.body).toBe(201);
      expect(mailsTo(mailer, email, 'Confirm your email address')).toHaveLength(1);
      if (redis) expect(Number(await redis.get(key))).toBe(1);
    });
  },
);

describe('the answer does not wait for the mail server', () => {
  /** A mail server that takes each message only when `release` is called. */
  const context = {
    ip: '127.0.0.1',
    userAgent: null,
    requestId: 'slow',
    actorType: 'anonymous' as const,
    actorId: null,
  };
  /** Registered through the service: the route would mail a confirmation, which the slow server holds. */
  const account = async (app: FastifyInstance) => {
    const email = uniqueEmail('outbox-slow');
    const { user } = await app.services.auth.register({ email, password: PASSWORD }, context);
    return user;
  };

  function slowMailer() {
    const sent: MailMessage[] = [];
    let release: () => void = () => undefined;
    const gate = new Promise<void>((resolve) => {
      release = resolve;
    });
    return {
      kind: 'smtp' as const,
      sent,
      release: () => release(),
      async send(message: MailMessage) {
        await gate;
        sent.push(message);
      },
      close() {},
    };
  }

  /** A slow mail server that counts the outbox's resets of it (a send given up). */
  const resettableSlowMailer = () => ({
    ...slowMailer(),
    resets: 0,
    reset() {
      this.resets += 1;
    },
  });

  it('answers forgot before the mail server has answered, and the mail goes once it does', async () => {
    const mailer = slowMailer();
    const app = await appOnOwnDatabase({ env: { PASSWORD_RESET_URL: RESET_URL }, deps: { mailer } });
    const user = await account(app);
    // The service's own call, not the test's inject (which waits for the mail the request causes).
    const answered = await Promise.race([
      app.services.passwordReset.request(user.email, context).then(() => 'answered'),
      new Promise((resolve) => setTimeout(() => resolve('waited for the mail server'), 2000)),
    ]);
    expect(answered).toBe('answered');
    expect(mailer.sent).toHaveLength(0);
    mailer.release();
    await app.services.outbox!.idle();
    expect(
      mailer.sent.filter((m) => m.to === user.email && m.subject === 'Reset your password'),
    ).toHaveLength(1);
    expect(await app.services.outbox!.pending(user.id)).toHaveLength(0);
  });

  it('sends one mail at a time, claiming the next only when its turn comes', async () => {
    const mailer = slowMailer();
    const app = await appOnOwnDatabase({ env: { PASSWORD_RESET_URL: RESET_URL }, deps: { mailer } });
    const [a, b] = [await account(app), await account(app)];
    await app.services.passwordReset.request(a.email, context);
    await app.services.passwordReset.request(b.email, context);
    await expect.poll(async () => (await app.services.outbox!.pending(a.id))[0]?.attempts).toBe(1);
    // The second waits unclaimed (any instance may take it), not in the mailer's own queue.
    expect((await app.services.outbox!.pending(b.id))[0]?.attempts).toBe(0);
    mailer.release();
    await app.services.outbox!.idle();
    expect(mailer.sent.map((m) => m.to).sort()).toEqual([a.email, b.email].sort());
  });

  it('gives up a send the server does not finish in time, resets the mailer, and retries later', async () => {
    const mailer = resettableSlowMailer();
    const app = await appOnOwnDatabase({
      env: { PASSWORD_RESET_URL: RESET_URL },
      deps: { mailer, mailSendTimeoutMs: 200 },
    });
    const user = await account(app);
    await app.services.passwordReset.request(user.email, context);
    await app.services.outbox!.idle();
    expect(mailer.resets).toBe(1);
    const [waiting] = await app.services.outbox!.pending(user.id);
    expect(waiting).toMatchObject({ attempts: 1, lastError: expect.stringContaining('200 ms') });
    expect(waiting!.nextAttemptAt.getTime()).toBeGreaterThan(Date.now() + MAIL_RETRY_FIRST_MS - 5000);
    mailer.release();
  });

  it('starts no retry run from its timer while the previous one goes on: a hung mail server does not pile them up', async () => {
    const mailer = slowMailer();
    const app = await appOnOwnDatabase({
      env: { PASSWORD_RESET_URL: RESET_URL },
      deps: { mailer, mailRetryIntervalMs: 20, mailSendTimeoutMs: 60_000 },
    });
    const outbox = app.services.outbox!;
    // The server holds this mail: the send slot stays taken, so a run the timer starts waits in it.
    const user = await account(app);
    await app.services.passwordReset.request(user.email, context);
    await expect.poll(async () => (await outbox.pending(user.id))[0]?.attempts).toBe(1);
    const runs = vi.spyOn(outbox, 'deliverDue');
    try {
      await new Promise((resolve) => setTimeout(resolve, 400));
      // Every 20 ms a run was started, each waiting for the slot behind the others, for as long as
      // the server hung (four a minute with the default 15 s; a run lasts up to three send
      // timeouts). One at a time now: the one waiting already, or one more.
      expect(runs.mock.calls.length).toBeLessThanOrEqual(1);
    } finally {
      mailer.release();
      runs.mockRestore();
      // Its timer would otherwise send the other tests' mail through this mailer.
      apps.splice(apps.indexOf(app), 1);
      await app.close();
    }
  });

  it('holds no more notices than kicked mail waiting for the send slot: past the bound they wait for the retry runs', async () => {
    const mailer = slowMailer();
    const app = await appOnOwnDatabase({ env: { PASSWORD_RESET_URL: RESET_URL }, deps: { mailer } });
    const outbox = app.services.outbox!;
    const user = await account(app);
    const extra = 5;
    // The server hangs: the first notice holds the slot, the others wait for it.
    for (let i = 0; i < MAX_WAITING_KICKS + extra; i++)
      outbox.kick([
        await outbox.notice(app.services.db, user, `notice ${i}`, 'Something changed on your account.'),
      ]);
    await expect.poll(async () => (await outbox.pending(user.id)).length).toBe(MAX_WAITING_KICKS + extra);
    mailer.release();
    await outbox.idle();
    // As many as a kick may hold went; the rest are written, and the next retry run sends them.
    expect(mailer.sent.filter((m) => m.to === user.email)).toHaveLength(MAX_WAITING_KICKS);
    expect(await outbox.pending(user.id)).toHaveLength(extra);
  });

  it('a notice written but not sent at once (the database failing the claim) is said to wait for a retry', async () => {
    const app = await appOnOwnDatabase({
      env: { PASSWORD_RESET_URL: RESET_URL },
      deps: { mailer: capturingMailer() },
    });
    const outbox = app.services.outbox!;
    const user = await account(app);
    const warned = vi.spyOn(app.services.logger, 'warn');
    // The claim's UPDATE fails once, after the notice is written.
    const update = vi.spyOn(app.services.db, 'update').mockImplementationOnce(() => {
      throw Object.assign(new Error('terminating connection due to administrator command'), {
        code: '57P01',
      });
    });
    let messages: unknown[];
    try {
      outbox.kick([
        await outbox.notice(app.services.db, user, 'a notice', 'Something changed on your account.'),
      ]);
      await outbox.idle();
      messages = warned.mock.calls.map((call) => call[1]);
    } finally {
      update.mockRestore();
      warned.mockRestore();
    }
    expect(await outbox.pending(user.id)).toHaveLength(1);
    expect(messages).toContain('a mail could not be sent at once; it waits for a retry');
  });

  it('a retry run goes on past a mail the server refuses, and stops after three refused in a row', async () => {
    const refused = new Set<string>();
    const sent: MailMessage[] = [];
    const mailer = {
      kind: 'smtp' as const,
      async send(message: MailMessage) {
        if (refused.has(message.to)) throw new Error('451 try again later');
        sent.push(message);
      },
      close() {},
    };
    const clock = createTestClock();
    const app = await appOnOwnDatabase({ env: { PASSWORD_RESET_URL: RESET_URL }, deps: { mailer, clock } });
    const users = [await account(app), await account(app), await account(app)];
    for (const u of users) refused.add(u.email);
    for (const u of users) await app.services.passwordReset.request(u.email, context);
    await app.services.outbox!.idle();
    expect(sent).toHaveLength(0);
    // One address still refused, the others taken now: the run sends them past the refusal.
    refused.delete(users[1]!.email);
    refused.delete(users[2]!.email);
    clock.advance(31);
    const run = await app.services.outbox!.deliverDue();
    expect(run.failed).toBeGreaterThanOrEqual(1);
    // (The database is this file's: other tests' due mail may go in the same run.)
    const ours = new Set(users.map((u) => u.email));
    expect(
      sent
        .filter((m) => ours.has(m.to))
        .map((m) => m.to)
        .sort(),
    ).toEqual([users[1]!.email, users[2]!.email].sort());
  });

  it('answers an email change 503 when the mail server holds its mail past the deadline', async () => {
    const mailer = resettableSlowMailer();
    const app = await appOnOwnDatabase({
      env: { PASSWORD_RESET_URL: RESET_URL },
      deps: { mailer, mailSendTimeoutMs: 200 },
    });
    const email = uniqueEmail('outbox-change');
    const { session } = await app.services.auth.register({ email, password: PASSWORD }, context);
    const started = performance.now();
    const res = await app.inject({
      method: 'POST',
      url: '/v1/auth/email/change',
      headers: bearer(session!.access_token),
      payload: { new_email: uniqueEmail('outbox-changed'), password: PASSWORD },
    });
    expect(res.statusCode, res.body).toBe(503);
    expect(res.headers['retry-after']).toBe('30');
    expect(performance.now() - started).toBeLessThan(5000);
    expect(mailer.resets).toBe(1);
    mailer.release();
  });

  it('answers an address with an account and one without no sooner than the floor', async () => {
    const app = await appOnOwnDatabase({
      env: { PASSWORD_RESET_URL: RESET_URL },
      deps: { mailer: capturingMailer() },
    });
    const user = await account(app);
    for (const email of [user.email, uniqueEmail('outbox-floor')]) {
      const started = performance.now();
      const res = await app.inject({ method: 'POST', url: '/v1/auth/password/forgot', payload: { email } });
      expect(res.statusCode).toBe(204);
      expect(performance.now() - started, email).toBeGreaterThanOrEqual(LINK_REQUEST_FLOOR_MS - 1);
    }
  });

  it('closes within a moment while a send hangs, leaving the mail for a retry', async () => {
    const mailer = slowMailer();
    const app = await appOnOwnDatabase({ env: { PASSWORD_RESET_URL: RESET_URL }, deps: { mailer } });
    const user = await account(app);
    await app.services.passwordReset.request(user.email, context);
    const started = Date.now();
    await app.close();
    expect(Date.now() - started).toBeLessThan(3000);
    // Claimed by the instance that stopped: its lease runs out and another instance sends it.
    const [left] = await selectRows<{ n: number }>(
      own.database.db,
      sql`select count(*)::int as n from mail_outbox where recipient = ${user.email} and kind = 'password_reset'`,
    );
    expect(left!.n).toBe(1);
    mailer.release();
  });
});

describe('an instance that starts', () => {
  it('sends the mail left due (by a process that died after its commit) at once, not a retry interval later', async () => {
    const writer = await appOnOwnDatabase({ deps: { mailer: capturingMailer() } });
    const email = uniqueEmail('outbox-left');
    // Written and committed, never kicked: what a process killed right after a commit leaves.
    const id = await writer.services.outbox!.enqueue(
      writer.services.db,
      { to: email, subject: 'Left due', text: 'Something changed on your account.' },
      { kind: 'notice' },
    );
    const mailer = capturingMailer();
    // Its timer's first run is an hour away: only the start's run can send it.
    const started = await appOnOwnDatabase({ deps: { mailer, mailRetryIntervalMs: 3600_000 } });
    try {
      await started.services.outbox!.idle();
      expect(mailsTo(mailer, email, 'Left due')).toHaveLength(1);
      const [left] = await selectRows<{ n: number }>(
        own.database.db,
        sql`select count(*)::int as n from mail_outbox where id = ${id}`,
      );
      expect(left!.n).toBe(0);
    } finally {
      apps.splice(apps.indexOf(started), 1);
      await started.close();
    }
  });
});

describe('queued mail on several instances', () => {
  it('is sent once, whichever instance claims it', async () => {
    const clock = createTestClock();
    const first = capturingMailer();
    const second = capturingMailer();
    const env = { PASSWORD_RESET_URL: RESET_URL };
    const a = await appOnOwnDatabase({ env, deps: { mailer: first, clock } });
    const b = await appOnOwnDatabase({ env, deps: { mailer: second, clock } });
    const users = await Promise.all([1, 2, 3].map(() => registerUser(a, 'outbox-two')));
    first.failing = true;
    for (const user of users)
      expect(
        (await a.inject({ method: 'POST', url: '/v1/auth/password/forgot', payload: { email: user.email } }))
          .statusCode,
      ).toBe(204);
    first.failing = false;
    clock.advance(31);
    await Promise.all([a.services.outbox!.deliverDue(), b.services.outbox!.deliverDue()]);
    for (const user of users) {
      const got = [...first.sent, ...second.sent].filter(
        (m) => m.to === user.email && m.subject === 'Reset your password',
      );
      expect(got, user.email).toHaveLength(1);
    }
  });
});
