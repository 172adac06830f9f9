import { randomUUID } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import { decodeJwt } from 'jose';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { EVENTS_CHANNEL } from '../../src/lib/events.js';
import { findPostgres, PostgresCluster } from './support/cluster.js';
import { type Outcome, send } from './support/http.js';
import { describeOutcome, expectAcknowledgedWritesKept, summarize } from './support/checks.js';
import { LOAD_PASSWORD, type LoadResult, startLoad, startProbes } from './support/load.js';
import { FAIL_FAST_MS, type ServiceProcess, startService } from './support/service.js';

/**
 * SECURITY.md "Faults and load", against the real service (a child process) on a throwaway
 * PostgreSQL cluster, under load: the process stays up, liveness stays 200, readiness is 503 while the
 * database is out, requests fail fast with 503 problem+json, the service resumes by itself within
 * 5 s of the database coming back, and every acknowledged write is there afterwards with its audit
 * event.
 */

const RESUME_WITHIN_MS = 5000;
/** How long a crashed PostgreSQL stays down before it is started again (and recovers). */
const CRASH_DOWN_MS = 1000;
const DATABASE = 'auth';
/**
 * From the moment a database stops answering altogether, a request on it answers 503 within the
 * client-side timeout (the statement timeout plus one second), and nothing more is waited for (no
 * ROLLBACK sent to a server that does not answer, which would wait as long again); a second of slack
 * for a busy machine.
 */
const HUNG_FAIL_MS = FAIL_FAST_MS + 1000;
/** The pool's size (DB_POOL_MAX's default). */
const POOL_MAX = 10;
const ADMIN = { email: 'admin@example.test', password: 'a long admin passphrase 42' };

const found = findPostgres();
if ('reason' in found) console.warn(`fault suite not run: ${found.reason}`);

/** A fault's window: when the database went out and when it was back (performance.now()). */
interface Window {
  downAt: number;
  upAt: number;
  /**
   * Until when it was surely out, where `upAt` is only when the harness saw it back (it polls, so the
   * service may see it first): the start of the harness's last refused connection. `upAt` if unset.
   */
  outUntil?: number | undefined;
}

interface ScenarioResult {
  load: LoadResult;
  live: Outcome[];
  ready: Outcome[];
  window: Window;
  /** From the database's return until a register, a login and /me all succeeded again. */
  resumedMs: number;
}

const within = (o: Outcome, w: Window) => o.start >= w.downAt && o.end <= (w.outUntil ?? w.upAt);

/**
 * What a request may answer while the database is out: 503, except /me, which may still answer from
 * memory (the account cache, and the revocation list for a 401): it needs the database only on a miss.
 */
const answersDuringOutage = (o: Outcome) => (o.op === 'me' ? [200, 401, 503] : [503]);

describe.runIf(!('reason' in found))('database faults under load (throwaway PostgreSQL cluster)', () => {
  let cluster: PostgresCluster;
  let service: ServiceProcess;

  beforeAll(async () => {
    cluster = await PostgresCluster.create();
    await cluster.query(`CREATE DATABASE ${DATABASE}`);
    service = await startService({
      DATABASE_URL: cluster.url(DATABASE),
      BOOTSTRAP_ADMIN_EMAIL: ADMIN.email,
      BOOTSTRAP_ADMIN_PASSWORD: ADMIN.password,
    });
  });

  afterAll(async () => {
    await service?.stop();
    await cluster?.destroy();
  });

  /** Polls until a register, a login and /me all succeed; the time since `since`. */
  async function waitUntilResumed(since: number): Promise<number> {
    const deadline = since + 3 * RESUME_WITHIN_MS;
    while (performance.now() < deadline) {
      const email = `resume-${randomUUID().slice(0, 8)}@example.test`;
      const reg = await send(service.baseUrl, 'POST', '/v1/auth/register', {
        body: { email, password: LOAD_PASSWORD },
      });
      if (reg.status === 201) {
        const login = await send(service.baseUrl, 'POST', '/v1/auth/login', {
          body: { email, password: LOAD_PASSWORD },
        });
        const token = (login.body as { session?: { access_token: string } }).session?.access_token;
        const me = token ? await send(service.baseUrl, 'GET', '/v1/auth/me', { token }) : undefined;
        const ready = await send(service.baseUrl, 'GET', '/health/ready');
        if (me?.status === 200 && ready.status === 200) return performance.now() - since;
      }
      await sleep(100);
    }
    return Number.POSITIVE_INFINITY;
  }

  /** Runs `fault` under load with probes, then waits for the service to resume. */
  async function underLoad(fault: () => Promise<Window>): Promise<ScenarioResult> {
    const probes = startProbes(service.baseUrl);
    const load = startLoad(service.baseUrl);
    await sleep(1000);
    const window = await fault();
    const resumedMs = await waitUntilResumed(window.upAt);
    await sleep(500);
    const result = await load.stop();
    const { live, ready } = await probes.stop();
    return { load: result, live, ready, window, resumedMs };
  }

  /**
   * What every database fault must leave true; a 503 within `failFastMs` of `since` (by default, of
   * its request's start).
   */
  async function expectSurvived(
    name: string,
    result: ScenarioResult,
    failFastMs = FAIL_FAST_MS,
    since: (o: Outcome) => number = (o) => o.start,
  ) {
    summarize(name, result.load.outcomes, {
      'fault ms': result.window.upAt - result.window.downAt,
      'resumed after ms': result.resumedMs,
      'readiness 503s': result.ready.filter((p) => p.status === 503).length,
      'acknowledged registrations': result.load.users.length,
      'acknowledged logins': result.load.logins.length,
    });
    expect(service.isRunning(), service.lines.join('\n')).toBe(true);
    expect(result.live.length).toBeGreaterThan(10);
    for (const probe of result.live) expect(probe.status, describeOutcome(probe)).toBe(200);
    for (const probe of result.ready) expect([200, 503], describeOutcome(probe)).toContain(probe.status);

    const { outcomes } = result.load;
    expect(outcomes.length).toBeGreaterThan(20);
    for (const o of outcomes) {
      // Never a 500, a reset or a hang: an answer, and a 401 only for a session a fault cost.
      const allowed = o.op === 'me' || o.op === 'refresh' ? [200, 401, 503] : [200, 201, 503];
      expect(allowed, describeOutcome(o)).toContain(o.status);
      if (o.status === 503) {
        expect(o.contentType, describeOutcome(o)).toMatch(/^application\/problem\+json/);
        expect(o.body).toMatchObject({ status: 503, code: 'service_unavailable' });
        expect(o.headers['retry-after']).toBeTruthy();
        expect(o.end - since(o), describeOutcome(o)).toBeLessThan(failFastMs);
      }
    }
    expect(result.resumedMs).toBeLessThan(RESUME_WITHIN_MS);
    await expectAcknowledgedWritesKept(cluster, DATABASE, result.load);
  }

  /**
   * Another instance revokes an access token (a row and a NOTIFY in one transaction, as the event
   * bus does): the service must refuse it, which proves its LISTEN connection is back (or, if it
   * reconnected after the NOTIFY, that the reconnect resynchronised from the table).
   */
  async function msUntilForeignRevocationHonoured(): Promise<number> {
    const email = `listen-${randomUUID().slice(0, 8)}@example.test`;
    const reg = await send(service.baseUrl, 'POST', '/v1/auth/register', {
      body: { email, password: LOAD_PASSWORD },
    });
    expect(reg.status, describeOutcome(reg)).toBe(201);
    const token = (reg.body as { session: { access_token: string } }).session.access_token;
    const { jti, exp } = decodeJwt(token);
    const client = await cluster.connect(DATABASE);
    const start = performance.now();
    try {
      await client.query('BEGIN');
      await client.query(
        `INSERT INTO revocations (kind, value, revoked_at, expires_at) VALUES ('jti', $1, now(), to_timestamp($2))`,
        [jti, exp],
      );
      const event = {
        type: 'revocation',
        kind: 'jti',
        value: jti,
        revokedAt: Date.now(),
        expiresAt: exp! * 1000,
      };
      await client.query('SELECT pg_notify($1, $2)', [
        EVENTS_CHANNEL,
        JSON.stringify({ origin: 'fault-harness', events: [event] }),
      ]);
      await client.query('COMMIT');
    } finally {
      await client.end();
    }
    while (performance.now() - start < 2 * RESUME_WITHIN_MS) {
      const me = await send(service.baseUrl, 'GET', '/v1/auth/me', { token });
      if (me.status === 401) return performance.now() - start;
      await sleep(50);
    }
    return Number.POSITIVE_INFINITY;
  }

  it('survives a PostgreSQL restart (pg_ctl restart -m fast) under load', async () => {
    const result = await underLoad(async () => {
      const downAt = performance.now();
      await cluster.restart();
      return { downAt, upAt: performance.now() };
    });
    await expectSurvived('restart', result);
    // Readiness noticed the restart: 503 at some point around it.
    const around = { downAt: result.window.downAt, upAt: result.window.upAt + RESUME_WITHIN_MS };
    expect(result.ready.some((p) => p.status === 503 && within(p, around))).toBe(true);
    expect(await msUntilForeignRevocationHonoured()).toBeLessThan(RESUME_WITHIN_MS);
  });

  it('survives PostgreSQL stopped for 10 s under load: readiness 503, database requests a fast 503', async () => {
    const result = await underLoad(async () => {
      await cluster.stop('fast');
      const downAt = performance.now();
      await sleep(10_000);
      const upAt = performance.now();
      await cluster.start();
      return { downAt, upAt };
    });
    await expectSurvived('stop', result);
    const readyDuring = result.ready.filter((p) => within(p, result.window));
    expect(readyDuring.length).toBeGreaterThan(10);
    for (const p of readyDuring) expect(p.status, describeOutcome(p)).toBe(503);
    const during = result.load.outcomes.filter((o) => within(o, result.window));
    expect(during.filter((o) => o.status === 503).length).toBeGreaterThan(10);
    for (const o of during) expect(answersDuringOutage(o), describeOutcome(o)).toContain(o.status);
    expect(await msUntilForeignRevocationHonoured()).toBeLessThan(RESUME_WITHIN_MS);
  });

  it('survives a PostgreSQL crash (pg_ctl stop -m immediate, WAL recovery at the start) under load', async () => {
    const logFrom = cluster.log().length;
    const result = await underLoad(async () => {
      // Immediate: every server process quits at once, nothing is checkpointed, the transactions in
      // flight are cut off; the start then replays the WAL from the last checkpoint first.
      await cluster.stop('immediate');
      const downAt = performance.now();
      await sleep(CRASH_DOWN_MS);
      // Timed from when it accepts a connection again, past its recovery, not from the start's call.
      // Within the window, only what ended before the harness's last refused connection: the service
      // may reconnect between that and the harness's next try.
      const [, back] = await Promise.all([cluster.start(), cluster.acceptsConnections(DATABASE)]);
      return { downAt, upAt: back.acceptedAt, outUntil: back.lastRefusedAt ?? downAt };
    });
    const log = cluster.log().slice(logFrom);
    expect(log, log).toContain('database system was not properly shut down; automatic recovery in progress');
    expect(log, log).toMatch(/redo done at/);
    await expectSurvived('crash', result);
    const readyDuring = result.ready.filter((p) => within(p, result.window));
    expect(readyDuring.length).toBeGreaterThan(5);
    for (const p of readyDuring) expect(p.status, describeOutcome(p)).toBe(503);
    const during = result.load.outcomes.filter((o) => within(o, result.window));
    expect(during.filter((o) => o.status === 503).length).toBeGreaterThan(5);
    for (const o of during) expect(answersDuringOutage(o), describeOutcome(o)).toContain(o.status);
    expect(await msUntilForeignRevocationHonoured()).toBeLessThan(RESUME_WITHIN_MS);
  });

  it('survives its backends being terminated inside transactions, repeatedly, under load', async () => {
    let killed = 0;
    let killedInTransaction = 0;
    const result = await underLoad(async () => {
      const downAt = performance.now();
      for (let round = 0; round < 20; round++) {
        const { rows } = await cluster.query<{ killed: number; in_transaction: number }>(
          `WITH victims AS (
             SELECT pid, xact_start IS NOT NULL AS in_transaction FROM pg_stat_activity
              WHERE application_name = 'paservices-auth' AND pid <> pg_backend_pid())
           SELECT count(*) FILTER (WHERE pg_terminate_backend(pid))::int AS killed,
                  count(*) FILTER (WHERE in_transaction)::int AS in_transaction
             FROM victims`,
          [],
          DATABASE,
        );
        killed += rows[0]?.killed ?? 0;
        killedInTransaction += rows[0]?.in_transaction ?? 0;
        await sleep(150 + Math.random() * 150);
      }
      return { downAt, upAt: performance.now() };
    });
    expect(killed).toBeGreaterThan(20);
    expect(killedInTransaction).toBeGreaterThan(0);
    await expectSurvived('terminate', result);
    expect(result.load.outcomes.some((o) => o.status === 503 && within(o, result.window))).toBe(true);
    expect(await msUntilForeignRevocationHonoured()).toBeLessThan(RESUME_WITHIN_MS);
  });

  it('answers 503 within the lock timeout while a lock makes queries on users hang, and recovers on release', async () => {
    const holder = await cluster.connect(DATABASE);
    const result = await underLoad(async () => {
      await holder.query('BEGIN');
      await holder.query('LOCK TABLE users IN ACCESS EXCLUSIVE MODE');
      const lockedAt = performance.now();
      await sleep(6000);
      // The window closes as the release is sent: a request the release let through is not inside it.
      const releasedAt = performance.now();
      await holder.query('COMMIT');
      return { downAt: lockedAt, upAt: releasedAt };
    });
    await holder.end();
    await expectSurvived('lock', result);
    // Every call here reads or writes users (but /me on a cache hit): each one that ran inside the
    // lock waited for the lock timeout (2 s), then answered 503 (checked fast in expectSurvived).
    const during = result.load.outcomes.filter((o) => within(o, result.window));
    expect(during.filter((o) => o.status === 503).length).toBeGreaterThanOrEqual(3);
    for (const o of during) expect(answersDuringOutage(o), describeOutcome(o)).toContain(o.status);
    // Readiness reads the users table too: while it is locked the instance cannot serve logins,
    // refreshes or key lookups, so it says so (503) within its 1 s deadline, and turns 200 again after.
    const readyDuring = result.ready.filter((p) => within(p, result.window));
    expect(readyDuring.length).toBeGreaterThan(3);
    const settled = readyDuring.filter((p) => p.start - result.window.downAt > 1500);
    expect(settled.length).toBeGreaterThan(0);
    for (const p of settled) expect(p.status, describeOutcome(p)).toBe(503);
  });

  it('answers 503 within the client-side timeout while PostgreSQL hangs (every process stopped), and resumes', async () => {
    const email = `hang-${randomUUID().slice(0, 8)}@example.test`;
    const reg = await send(service.baseUrl, 'POST', '/v1/auth/register', {
      body: { email, password: LOAD_PASSWORD },
    });
    expect(reg.status, describeOutcome(reg)).toBe(201);
    const holder = await cluster.connect(DATABASE);
    let midTransaction: Promise<Outcome>[] = [];
    const result = await underLoad(async () => {
      // Sign-ins caught inside their transaction when the server stops: each waits on its audit
      // event's insert (a lock held here) as everything stops, so it meets the client-side timeout
      // mid-transaction, where a ROLLBACK would wait as long again for the same silent server.
      await holder.query('BEGIN');
      await holder.query('LOCK TABLE audit_events IN ACCESS EXCLUSIVE MODE');
      midTransaction = [0, 1].map(() =>
        send(service.baseUrl, 'POST', '/v1/auth/login', {
          op: 'login',
          body: { email, password: LOAD_PASSWORD },
        }),
      );
      // Stopped once one of them (or of the load's writes) waits on the lock, within the lock timeout.
      const waiting = async () => {
        const { rows } = await cluster.query<{ n: number }>(
          `SELECT count(*)::int AS n FROM pg_stat_activity
            WHERE application_name = 'paservices-auth' AND wait_event_type = 'Lock' AND xact_start IS NOT NULL`,
        );
        return (rows[0]?.n ?? 0) > 0;
      };
      const deadline = performance.now() + 1500;
      let caught = false;
      while (!caught && performance.now() < deadline) {
        caught = await waiting();
        if (!caught) await sleep(20);
      }
      expect(caught, 'no transaction waited on the lock').toBe(true);
      const downAt = performance.now();
      cluster.hang();
      await sleep(6000);
      const upAt = performance.now();
      cluster.resume();
      await holder.query('COMMIT');
      return { downAt, upAt };
    });
    await holder.end();
    // Timed from the stop: what they did before it (the wait for the lock included) is not the hang's.
    const sinceStop = (o: Outcome) => Math.max(o.start, result.window.downAt);
    for (const o of await Promise.all(midTransaction)) {
      expect(o.status, describeOutcome(o)).toBe(503);
      expect(o.end - sinceStop(o), describeOutcome(o)).toBeLessThan(HUNG_FAIL_MS);
    }
    await expectSurvived('hang', result, HUNG_FAIL_MS, sinceStop);
    const during = result.load.outcomes.filter((o) => within(o, result.window));
    expect(during.filter((o) => o.status === 503).length).toBeGreaterThanOrEqual(3);
    for (const o of during) expect(answersDuringOutage(o), describeOutcome(o)).toContain(o.status);
    // Readiness's own 1 s deadline: 503 throughout, once the probes in flight at the stop are answered.
    const settled = result.ready.filter(
      (p) => within(p, result.window) && p.start - result.window.downAt > 1500,
    );
    expect(settled.length).toBeGreaterThan(2);
    for (const p of settled) expect(p.status, describeOutcome(p)).toBe(503);
    expect(await msUntilForeignRevocationHonoured()).toBeLessThan(RESUME_WITHIN_MS);
  });

  it('keeps answering what needs no database while every pooled connection waits on a lock', async () => {
    const admin = await send(service.baseUrl, 'POST', '/v1/auth/login', { body: ADMIN });
    expect(admin.status, describeOutcome(admin)).toBe(200);
    const adminToken = (admin.body as { session: { access_token: string } }).session.access_token;
    const created = await send(service.baseUrl, 'POST', '/v1/clients', {
      token: adminToken,
      body: { name: 'resource server', scopes: ['users:read'] },
    });
    expect(created.status, describeOutcome(created)).toBe(201);
    const { client_id, client_secret } = created.body as { client_id: string; client_secret: string };
    const basic = {
      authorization: `Basic ${Buffer.from(`${client_id}:${client_secret}`).toString('base64')}`,
    };
    const issued = await send(service.baseUrl, 'POST', '/oauth/token', {
      headers: basic,
      body: { grant_type: 'client_credentials' },
    });
    expect(issued.status, describeOutcome(issued)).toBe(200);
    const clientToken = (issued.body as { access_token: string }).access_token;
    const email = `pool-${randomUUID().slice(0, 8)}@example.test`;
    const reg = await send(service.baseUrl, 'POST', '/v1/auth/register', {
      body: { email, password: LOAD_PASSWORD },
    });
    expect(reg.status, describeOutcome(reg)).toBe(201);
    const userToken = (reg.body as { session: { access_token: string } }).session.access_token;
    // What is served from memory: the key set, discovery, an account's /me and a token's introspection
    // once cached (each asked once first).
    const fromMemory = [
      () => send(service.baseUrl, 'GET', '/.well-known/jwks.json', { op: 'jwks' }),
      () => send(service.baseUrl, 'GET', '/.well-known/openid-configuration', { op: 'discovery' }),
      () => send(service.baseUrl, 'GET', '/v1/auth/me', { op: 'me', token: userToken }),
      () =>
        send(service.baseUrl, 'POST', '/oauth/introspect', {
          op: 'introspect',
          headers: basic,
          body: { token: clientToken },
        }),
    ];
    for (const ask of fromMemory) {
      const o = await ask();
      expect(o.status, describeOutcome(o)).toBe(200);
    }

    const holder = await cluster.connect(DATABASE);
    await holder.query('BEGIN');
    await holder.query('LOCK TABLE users IN ACCESS EXCLUSIVE MODE');
    const lockedAt = performance.now();
    // Listings of users (no password hashing to pile up afterwards), each holding a pooled connection
    // on the lock for the lock timeout: several times the pool's worth at once, and more every 50 ms.
    const flood: Promise<Outcome>[] = [];
    let flooding = true;
    const list = () =>
      flood.push(send(service.baseUrl, 'GET', '/v1/users?limit=1', { op: 'list users', token: adminToken }));
    for (let i = 0; i < 3 * POOL_MAX; i++) list();
    const flooder = (async () => {
      while (flooding) {
        list();
        await sleep(50);
      }
    })();
    const answers: Outcome[] = [];
    try {
      await sleep(300);
      while (performance.now() - lockedAt < 3000) for (const ask of fromMemory) answers.push(await ask());
    } finally {
      flooding = false;
      await flooder;
      await holder.query('COMMIT');
      await holder.end();
    }
    const listings = await Promise.all(flood);
    summarize('pool exhausted', [...listings, ...answers], { 'requests at once': 3 * POOL_MAX });
    // The pool was exhausted: listings answered 503 after waiting for a connection (the connect
    // timeout, 1 s), sooner than the lock timeout (2 s) could end any of them.
    expect(listings.filter((o) => o.status === 503 && o.ms < 1800).length).toBeGreaterThan(0);
    for (const o of listings) {
      expect([200, 503], describeOutcome(o)).toContain(o.status);
      // A connection within the connect timeout, then a statement within the lock timeout.
      if (o.status === 503) expect(o.ms, describeOutcome(o)).toBeLessThan(FAIL_FAST_MS + 1000);
    }
    expect(answers.length).toBeGreaterThan(8);
    for (const o of answers) {
      expect(o.status, describeOutcome(o)).toBe(200);
      expect(o.ms, describeOutcome(o)).toBeLessThan(500);
    }
    expect(service.isRunning()).toBe(true);
  });
});
