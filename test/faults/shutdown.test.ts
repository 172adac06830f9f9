import { randomUUID } from 'node:crypto';
import { connect } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { describeOutcome, expectAcknowledgedWritesKept, summarize } from './support/checks.js';
import { findPostgres, PostgresCluster } from './support/cluster.js';
import { type Outcome, send } from './support/http.js';
import { LOAD_PASSWORD, startLoad } from './support/load.js';
import { startMailServer } from './support/mail-server.js';
import { type ServiceProcess, startService } from './support/service.js';

/**
 * SECURITY.md: SIGTERM under load — readiness turns 503 first, in-flight requests finish,
 * connections close, exit 0 within 10 s. And SIGKILL under load: nothing acknowledged is lost, and a
 * new process on the same database starts as usual.
 */

const DATABASE = 'auth';
const EXIT_WITHIN_MS = 10_000;
/** A request sent this long before the signal has surely been read by the server. */
const ACCEPTED_AFTER_MS = 150;

const found = findPostgres();
if ('reason' in found) console.warn(`fault suite (SIGTERM, SIGKILL) not run: ${found.reason}`);

describe.runIf(!('reason' in found))('SIGTERM and SIGKILL under load', () => {
  let cluster: PostgresCluster;
  let service: ServiceProcess;

  beforeAll(async () => {
    cluster = await PostgresCluster.create();
    await cluster.query(`CREATE DATABASE ${DATABASE}`);
    // At info, the service logs the moment it handles the signal ('shutting down').
    service = await startService({ DATABASE_URL: cluster.url(DATABASE), LOG_LEVEL: 'info' });
  });

  afterAll(async () => {
    await service?.stop();
    await cluster?.destroy();
  });

  it('finishes the requests in flight, is not ready from the signal on, and exits 0 within 10 s', async () => {
    const load = startLoad(service.baseUrl);
    await sleep(1000);

    // Registrations hash a password (tens of ms each, two at a time): a batch is still in flight
    // when the signal comes, though every request of it has been read by then.
    const inFlight = Array.from({ length: 6 }, () =>
      send(service.baseUrl, 'POST', '/v1/auth/register', {
        op: 'in-flight register',
        body: { email: `sigterm-${randomUUID().slice(0, 8)}@example.test`, password: LOAD_PASSWORD },
      }),
    );
    await sleep(ACCEPTED_AFTER_MS);
    const signalledAt = performance.now();
    const handled = service.waitForLine(/"msg":"shutting down"/);
    service.child.kill('SIGTERM');

    // From the moment the signal is handled, readiness never says 200: 503 while the server still
    // answers, then refused. (A probe read in the same event-loop turn as the signal may still pass.)
    const readiness: Outcome[] = [];
    while (service.isRunning() && performance.now() - signalledAt < EXIT_WITHIN_MS + 2000) {
      readiness.push(await send(service.baseUrl, 'GET', '/health/ready', { timeoutMs: 2000 }));
      await sleep(20);
    }
    const exit = await service.exited;
    const exitMs = performance.now() - signalledAt;
    const handledAt = await handled;
    // One more after the exit, so the check below never runs on nothing when the exit came quickly.
    readiness.push(await send(service.baseUrl, 'GET', '/health/ready', { timeoutMs: 2000 }));
    const finished = await Promise.all(inFlight);
    const { outcomes, users, logins } = await load.stop();

    summarize('SIGTERM', [...outcomes, ...finished], {
      'exit code': exit.code ?? exit.signal,
      'signal handled after ms': handledAt - signalledAt,
      'exit after ms': exitMs,
      'in-flight finished': finished.filter((o) => o.status === 201).length,
      'readiness after signal': [...new Set(readiness.map((o) => o.status || o.error))].join('/'),
    });

    expect(exit.code, service.lines.join('\n')).toBe(0);
    expect(exitMs).toBeLessThan(EXIT_WITHIN_MS);
    expect(handledAt - signalledAt).toBeLessThan(250);
    const probesAfter = readiness.filter((probe) => probe.start >= handledAt);
    expect(probesAfter.length).toBeGreaterThan(0);
    for (const probe of probesAfter) {
      // Refused or reset (the listener closing) is as unready as a 503; a 200 would be a lie.
      if (probe.status === 0)
        expect(['ECONNREFUSED', 'ECONNRESET'], describeOutcome(probe)).toContain(probe.error);
      else expect(probe.status, describeOutcome(probe)).toBe(503);
    }
    for (const o of finished) expect(o.status, describeOutcome(o)).toBe(201);

    for (const o of outcomes) {
      // Never a 500 or a hang. A request read before the signal gets its real answer; one sent
      // around or after it may find the listener closed (refused, or reset from the accept queue).
      expect(o.status === 500 || o.error === 'timeout', describeOutcome(o)).toBe(false);
      if (o.start < signalledAt - ACCEPTED_AFTER_MS) {
        const allowed = o.op === 'me' || o.op === 'refresh' ? [200, 401] : [200, 201];
        expect(allowed, describeOutcome(o)).toContain(o.status);
      } else if (o.status === 0) {
        expect(['ECONNREFUSED', 'ECONNRESET'], describeOutcome(o)).toContain(o.error);
      }
    }

    // It closed its database connections rather than leaving them to time out.
    const { rows } = await cluster.query<{ n: number }>(
      `SELECT count(*)::int AS n FROM pg_stat_activity WHERE application_name = 'paservices-auth'`,
    );
    expect(rows[0]?.n).toBe(0);

    const acknowledged = finished
      .filter((o) => o.status === 201)
      .map((o) => {
        const body = o.body as { user: { id: string; email: string } };
        return { id: body.user.id, email: body.user.email };
      });
    await expectAcknowledgedWritesKept(cluster, DATABASE, { users: [...users, ...acknowledged], logins });
  });

  it('with SHUTDOWN_DRAIN_MS, keeps answering everything (readiness 503) until the drain ends, then exits 0', async () => {
    const drainMs = 1500;
    // A database of its own: the first service's signing keys are sealed with its own generated key.
    await cluster.query('CREATE DATABASE auth_drain');
    const draining = await startService({
      DATABASE_URL: cluster.url('auth_drain'),
      LOG_LEVEL: 'info',
      SHUTDOWN_DRAIN_MS: String(drainMs),
    });
    try {
      const handled = draining.waitForLine(/"msg":"shutting down"/);
      const signalledAt = performance.now();
      draining.child.kill('SIGTERM');
      const handledAt = await handled;
      // What a balancer and its clients see during the drain: not ready, but served.
      const during: Outcome[] = [];
      while (performance.now() < handledAt + drainMs - 300) {
        during.push(await send(draining.baseUrl, 'GET', '/health/ready', { timeoutMs: 2000 }));
        during.push(
          await send(draining.baseUrl, 'POST', '/v1/auth/register', {
            op: 'register while draining',
            body: { email: `drain-${randomUUID().slice(0, 8)}@example.test`, password: LOAD_PASSWORD },
            timeoutMs: 5000,
          }),
        );
      }
      const exit = await draining.exited;
      const exitMs = performance.now() - signalledAt;
      expect(exit.code, draining.lines.join('\n')).toBe(0);
      expect(exitMs).toBeGreaterThanOrEqual(drainMs);
      expect(exitMs).toBeLessThan(EXIT_WITHIN_MS);
      expect(during.length).toBeGreaterThan(2);
      for (const o of during) {
        if (o.op === 'register while draining') expect(o.status, describeOutcome(o)).toBe(201);
        else expect(o.status, describeOutcome(o)).toBe(503);
      }
      // The writes acknowledged during the drain are there.
      const registered = during
        .filter((o) => o.status === 201)
        .map((o) => (o.body as { user: { id: string; email: string } }).user);
      await expectAcknowledgedWritesKept(cluster, 'auth_drain', { users: registered, logins: [] });
    } finally {
      await draining.stop();
    }
  });
  it('cuts a connection still trickling a body at the deadline, and exits 0 within 10 s all the same', async () => {
    await cluster.query('CREATE DATABASE auth_trickle');
    const trickled = await startService({
      DATABASE_URL: cluster.url('auth_trickle'),
      LOG_LEVEL: 'info',
      SHUTDOWN_TIMEOUT_MS: '4000',
    });
    const { port } = new URL(trickled.baseUrl);
    const socket = connect(Number(port), '127.0.0.1');
    let drip: NodeJS.Timeout | undefined;
    try {
      await new Promise<void>((done, fail) => {
        socket.once('connect', () => done());
        socket.once('error', fail);
      });
      socket.on('error', () => undefined);
      // A register whose body never finishes arriving: a byte every 200 ms of a thousand promised.
      socket.write(
        'POST /v1/auth/register HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{',
      );
      drip = setInterval(() => socket.write(' '), 200);
      await sleep(500);
      const signalledAt = performance.now();
      trickled.child.kill('SIGTERM');
      const exit = await trickled.exited;
      const exitMs = performance.now() - signalledAt;
      expect(exit.code, trickled.lines.join('\n')).toBe(0);
      expect(exitMs).toBeLessThan(4000);
      expect(trickled.lines.join('\n')).toContain('closing their connections');
    } finally {
      clearInterval(drip);
      socket.destroy();
      await trickled.stop();
    }
  });

  it('SIGKILL mid-transaction under load: a new process on the same database starts cleanly, with every acknowledged write', async () => {
    await cluster.query('CREATE DATABASE auth_kill');
    const mail = await startMailServer();
    // A slow mail server: confirmation mails queue in the outbox, one is mid-send at the kill.
    mail.settings.delayMs = 2000;
    const env = {
      DATABASE_URL: cluster.url('auth_kill'),
      // The issuer of its tokens, kept across the restart (the new process listens on another port).
      PUBLIC_URL: 'https://auth.example.test',
      SMTP_URL: mail.url,
      MAIL_FROM: 'Paservices <no-reply@paservices.test>',
      EMAIL_CONFIRMATION_URL: 'https://app.example.test/confirm',
    };
    const killed = await startService(env);
    let restarted: ServiceProcess | undefined;
    const holder = await cluster.connect('auth_kill');
    const inKilled = (text: string, params: unknown[] = []) =>
      cluster.query<Record<string, unknown>>(text, params, 'auth_kill');
    try {
      // A session from before the kill, used on the new process: same signing keys, same session.
      const email = `before-kill-${randomUUID().slice(0, 8)}@example.test`;
      const before = await send(killed.baseUrl, 'POST', '/v1/auth/register', {
        body: { email, password: LOAD_PASSWORD },
      });
      expect(before.status, describeOutcome(before)).toBe(201);
      const beforeBody = before.body as {
        user: { id: string };
        session: { access_token: string; refresh_token: string };
      };
      const jwksBefore = (await send(killed.baseUrl, 'GET', '/.well-known/jwks.json')).body;

      const load = startLoad(killed.baseUrl);
      await sleep(1000);
      // Writes caught inside their transactions: each waits on its audit event's insert (a lock held
      // here) when the process dies, its connection's transaction open.
      await holder.query('BEGIN');
      await holder.query('LOCK TABLE audit_events IN ACCESS EXCLUSIVE MODE');
      const waitingOnLock = async () => {
        const { rows } = await inKilled(
          `SELECT count(*)::int AS n FROM pg_stat_activity
            WHERE datname = current_database() AND application_name = 'paservices-auth'
              AND wait_event_type = 'Lock' AND xact_start IS NOT NULL`,
        );
        return Number(rows[0]?.n ?? 0);
      };
      let cutOff = 0;
      for (const deadline = performance.now() + 1500; cutOff === 0 && performance.now() < deadline; ) {
        cutOff = await waitingOnLock();
        if (cutOff === 0) await sleep(20);
      }
      expect(cutOff, 'no transaction waited on the lock').toBeGreaterThan(0);
      killed.child.kill('SIGKILL');
      const exit = await killed.exited;
      const { outcomes, users, logins } = await load.stop();
      await holder.query('COMMIT');
      expect(exit.signal).toBe('SIGKILL');

      // What the dead process held is let go: its backends end once they next read from the client
      // (the transactions cut off roll back), and no advisory lock outlives them.
      let left = Number.POSITIVE_INFINITY;
      for (const deadline = performance.now() + 5000; left > 0 && performance.now() < deadline; ) {
        const { rows } = await inKilled(
          `SELECT count(*)::int AS n FROM pg_stat_activity
            WHERE datname = current_database() AND application_name LIKE 'paservices-auth%'`,
        );
        left = Number(rows[0]?.n ?? 0);
        if (left > 0) await sleep(50);
      }
      expect(left, 'backends of the killed process still open').toBe(0);
      const advisory = await inKilled(`SELECT count(*)::int AS n FROM pg_locks
          WHERE locktype = 'advisory' AND database = (SELECT oid FROM pg_database WHERE datname = current_database())`);
      expect(advisory.rows[0]?.n).toBe(0);
      // The outbox as the killed process left it: mail due now (written, not yet taken), and the mail
      // it was sending (taken for a lease, so another instance does not send it at the same time).
      const outbox = await inKilled(
        `SELECT id, recipient, attempts, next_attempt_at <= now() AS due FROM mail_outbox`,
      );
      const due = outbox.rows.filter((r) => r.due);
      const leased = outbox.rows.filter((r) => !r.due);
      expect(due.length, 'no mail was left waiting in the outbox').toBeGreaterThan(0);

      mail.settings.delayMs = 0;
      const startedAt = performance.now();
      restarted = await startService({ ...env, LOG_LEVEL: 'info' }, { dataDir: killed.dataDir });
      const readyMs = performance.now() - startedAt;
      // A start like any other: no migration lock to wait for, nothing to warn about.
      const startup = [...restarted.lines];
      expect(startup.join('\n')).toContain('database migrations: none pending');
      for (const line of startup) expect(line).not.toMatch(/"level":(40|50|60)/);
      // The same key set: nothing was made anew, and a token and a refresh token from before work.
      expect((await send(restarted.baseUrl, 'GET', '/.well-known/jwks.json')).body).toEqual(jwksBefore);
      const me = await send(restarted.baseUrl, 'GET', '/v1/auth/me', {
        token: beforeBody.session.access_token,
      });
      expect(me.status, describeOutcome(me)).toBe(200);
      const refreshed = await send(restarted.baseUrl, 'POST', '/v1/auth/refresh', {
        body: { refresh_token: beforeBody.session.refresh_token },
      });
      expect(refreshed.status, describeOutcome(refreshed)).toBe(200);

      // Before the kill every answer was a real one; at it, no answer at all (reset, or refused).
      for (const o of outcomes) {
        if (o.status === 0) expect(['ECONNREFUSED', 'ECONNRESET'], describeOutcome(o)).toContain(o.error);
        else {
          const allowed = o.op === 'me' || o.op === 'refresh' ? [200, 401] : [200, 201];
          expect(allowed, describeOutcome(o)).toContain(o.status);
        }
      }
      await expectAcknowledgedWritesKept(cluster, 'auth_kill', {
        users: [...users, { id: beforeBody.user.id, email }],
        logins,
      });
      // And nothing half-written: no account without its audit event.
      const orphans = await inKilled(
        `SELECT count(*)::int AS n FROM users u WHERE NOT EXISTS (SELECT 1 FROM audit_events a
            WHERE a.type = 'user.registered' AND a.subject_id = u.id::text)`,
      );
      expect(orphans.rows[0]?.n).toBe(0);

      // The mail left due is sent by the new process's retry run at its start (then every 15 s); the
      // one cut off mid-send is left alone until its lease ends (the dead process's send might still be under
      // way, as far as anyone can tell), then sent again: at least once.
      const dueIds = due.map((r) => String(r.id));
      let waiting = dueIds.length;
      for (const deadline = startedAt + 30_000; waiting > 0 && performance.now() < deadline; ) {
        await sleep(250);
        const { rows } = await inKilled(
          'SELECT count(*)::int AS n FROM mail_outbox WHERE id = ANY($1::uuid[])',
          [dueIds],
        );
        waiting = Number(rows[0]?.n ?? 0);
      }
      const sentMs = performance.now() - startedAt;
      expect(waiting, 'mail left due by the killed process still unsent').toBe(0);
      for (const row of due)
        expect(
          mail.received.some((m) => m.at >= startedAt && m.to.includes(String(row.recipient))),
          `no mail to ${row.recipient} after the restart`,
        ).toBe(true);
      if (leased.length > 0) {
        const still = await inKilled(
          `SELECT count(*)::int AS n FROM mail_outbox
            WHERE id = ANY($1::uuid[]) AND attempts = 1 AND next_attempt_at > now()`,
          [leased.map((r) => String(r.id))],
        );
        expect(still.rows[0]?.n).toBe(leased.length);
      }

      summarize('SIGKILL', outcomes, {
        'cut off mid-transaction': cutOff,
        'acknowledged registrations': users.length,
        'acknowledged logins': logins.length,
        'restarted ready after ms': readyMs,
        'mail due': due.length,
        'mail mid-send': leased.length,
        'due mail sent after ms': sentMs,
      });
    } finally {
      await holder.end().catch(() => undefined);
      await restarted?.stop();
      await killed.stop();
      await mail.close();
    }
  });
});
