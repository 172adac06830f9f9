import { randomUUID } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import { Redis } from 'ioredis';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loginFailuresKey } from '../../src/lib/throttle.js';
import { freePort } from '../support/spawn-server.js';
import { describeOutcome, summarize } from './support/checks.js';
import { findPostgres, PostgresCluster } from './support/cluster.js';
import { type Outcome, send } from './support/http.js';
import { LOAD_PASSWORD, startLoad } from './support/load.js';
import { RedisServer } from './support/redis-server.js';
import { type ServiceProcess, startService } from './support/service.js';

/**
 * Redis that answers no more without closing its connections (SIGSTOP of the suite's own
 * redis-server: ioredis still calls such a connection `ready`), and Redis killed and restarted under
 * load. The policy (README "Failure behaviour"): the counters fall back to this instance's memory
 * within one command timeout (500 ms) and stop asking Redis until it answers again, never a 5xx, and
 * the counts are shared again once it answers.
 */

const DATABASE = 'auth';
const MAX_FAILURES = 3;
/** The service's Redis command timeout (src/services.ts). */
const COMMAND_TIMEOUT_MS = 500;

const found = findPostgres();
const missing = 'reason' in found ? found.reason : RedisServer.missing();
if (missing) console.warn(`fault suite (Redis hangs) not run: ${missing}`);

describe.runIf(!missing)('Redis hangs, Redis restarts', () => {
  let cluster: PostgresCluster;
  let redis: RedisServer;
  let service: ServiceProcess;
  /** The harness's own client of the suite's redis-server, to see what the service counts there. */
  let inspector: Redis;

  beforeAll(async () => {
    cluster = await PostgresCluster.create();
    await cluster.query(`CREATE DATABASE ${DATABASE}`);
    redis = await RedisServer.start();
    inspector = new Redis(redis.url, { lazyConnect: true, maxRetriesPerRequest: 1 });
    inspector.on('error', () => undefined);
    service = await startService({
      DATABASE_URL: cluster.url(DATABASE),
      REDIS_URL: redis.url,
      RATE_LIMIT_ENABLED: 'true',
      LOGIN_MAX_FAILURES_PER_HOUR: String(MAX_FAILURES),
      // A mail server nobody answers: the links are kept in the outbox, and their hourly caps counted.
      SMTP_URL: `smtp://127.0.0.1:${await freePort()}`,
      MAIL_FROM: 'auth@example.test',
    });
  });

  afterAll(async () => {
    inspector?.disconnect();
    await service?.stop();
    await redis?.stop();
    await cluster?.destroy();
  });

  const outcomes: Outcome[] = [];
  const call = async (op: string, method: string, path: string, body?: unknown, token?: string) => {
    const o = await send(service.baseUrl, method, path, { op, body, token });
    outcomes.push(o);
    return o;
  };
  const register = async () => {
    const email = `redis-hang-${randomUUID().slice(0, 8)}@example.test`;
    const o = await call('register', 'POST', '/v1/auth/register', { email, password: LOAD_PASSWORD });
    expect(o.status, describeOutcome(o)).toBe(201);
    const session = (o.body as { session: { access_token: string; refresh_token: string } }).session;
    return { email, access: session.access_token, refresh: session.refresh_token };
  };

  /** performance.now() when a line after the first `from` matches `pattern`; throws past `timeoutMs`. */
  async function lineAfter(from: number, pattern: RegExp, timeoutMs: number): Promise<number> {
    const deadline = performance.now() + timeoutMs;
    while (!service.lines.slice(from).some((line) => pattern.test(line))) {
      if (performance.now() > deadline)
        throw new Error(
          `no line matching ${pattern} within ${timeoutMs} ms:\n${service.lines.slice(from).join('\n')}`,
        );
      await sleep(20);
    }
    return performance.now();
  }

  /** A failed sign-in of a fresh address is counted in Redis (the key of its count exists there). */
  async function failureCountedInRedis(): Promise<boolean> {
    const email = `counted-${randomUUID().slice(0, 8)}@example.test`;
    const o = await call('wrong login', 'POST', '/v1/auth/login', { email, password: 'not the password' });
    expect(o.status, describeOutcome(o)).toBe(401);
    return (await inspector.exists(loginFailuresKey(email))) === 1;
  }

  it('a hung Redis costs one command timeout, then memory speed; counts are shared again when it answers', async () => {
    const before = await register();
    expect(await failureCountedInRedis()).toBe(true);

    redis.hang();
    const hungAt = performance.now();
    try {
      // The requests that meet the hang: each waits for at most one command timeout.
      const first = await Promise.all([
        call('login', 'POST', '/v1/auth/login', { email: before.email, password: LOAD_PASSWORD }),
        call('refresh', 'POST', '/v1/auth/refresh', { refresh_token: before.refresh }),
        call('forgot', 'POST', '/v1/auth/password/forgot', { email: before.email }),
      ]);
      for (const o of first) {
        expect(o.status, describeOutcome(o)).toBeLessThan(300);
        expect(o.ms, describeOutcome(o)).toBeLessThan(4 * COMMAND_TIMEOUT_MS);
      }

      // Known unavailable since: the limits and counts are kept here without asking Redis, so nothing
      // waits for it (asking would cost each request 500 ms per command: 1.5 s a sign-in).
      const account = await register();
      const settled: Outcome[] = [];
      const timed = (o: Outcome) => {
        settled.push(o);
        return o;
      };
      expect(
        timed(
          await call('login', 'POST', '/v1/auth/login', { email: account.email, password: LOAD_PASSWORD }),
        ).status,
      ).toBe(200);
      for (let i = 0; i < MAX_FAILURES; i++) {
        const wrong = timed(
          await call('wrong login', 'POST', '/v1/auth/login', {
            email: account.email,
            password: 'wrong one',
          }),
        );
        expect(wrong.status, describeOutcome(wrong)).toBe(401);
      }
      // The account's lockout still holds, in this instance's memory.
      const locked = timed(
        await call('login', 'POST', '/v1/auth/login', { email: account.email, password: LOAD_PASSWORD }),
      );
      expect(locked.status, describeOutcome(locked)).toBe(429);
      timed(await call('forgot', 'POST', '/v1/auth/password/forgot', { email: account.email }));
      timed(
        await call('register', 'POST', '/v1/auth/register', {
          email: `x-${account.email}`,
          password: LOAD_PASSWORD,
        }),
      );
      for (const o of settled) {
        expect(o.status, describeOutcome(o)).toBeLessThan(500);
        expect(o.ms, describeOutcome(o)).toBeLessThan(2 * COMMAND_TIMEOUT_MS);
      }
      const refreshes: number[] = [];
      let refresh = account.refresh;
      for (let i = 0; i < 5; i++) {
        const o = await call('refresh', 'POST', '/v1/auth/refresh', { refresh_token: refresh });
        expect(o.status, describeOutcome(o)).toBe(200);
        refresh = (o.body as { session: { refresh_token: string } }).session.refresh_token;
        refreshes.push(o.ms);
      }
      refreshes.sort((a, b) => a - b);
      expect(refreshes[2], `refreshes took ${refreshes.map(Math.round).join(', ')} ms`).toBeLessThan(
        COMMAND_TIMEOUT_MS / 2,
      );

      await lineAfter(0, /Redis unavailable: rate limits fall back to in-process counters/, 1000);

      // Readiness does not look at Redis: every instance still serves, with limits of its own.
      const ready = await call('ready', 'GET', '/health/ready');
      expect(ready.status, describeOutcome(ready)).toBe(200);
      const me = await call('me', 'GET', '/v1/auth/me', undefined, account.access);
      expect(me.status, describeOutcome(me)).toBe(200);
    } finally {
      redis.resume();
    }
    const resumedAt = performance.now();
    const back = await lineAfter(0, /Redis answers again/, 5000);
    expect(back - resumedAt).toBeLessThan(3000);
    expect(await failureCountedInRedis()).toBe(true);

    summarize('Redis hung', outcomes, {
      'hang ms': resumedAt - hungAt,
      'shared again after ms': back - resumedAt,
    });
    for (const o of outcomes) expect(o.status, describeOutcome(o)).toBeLessThan(500);
    const unavailable = service.lines.filter((l) => /Redis unavailable: rate limits fall back/.test(l));
    expect(unavailable.length, 'logged once per outage').toBe(1);
    expect(service.isRunning()).toBe(true);
  });

  it('Redis killed and restarted under load: no 5xx, and counts are shared again', async () => {
    const load = startLoad(service.baseUrl, { workers: 3, maxMs: 10_000 });
    await sleep(1000);
    const linesBefore = service.lines.length;
    const killedAt = performance.now();
    await redis.restart();
    const restartedAt = performance.now();
    // Back to Redis (ioredis reconnects by itself), and the counts are kept there again: the restarted
    // Redis began empty.
    const answersAgain = lineAfter(linesBefore, /Redis answers again/, 5000);
    await sleep(1500);
    const { outcomes: loadOutcomes } = await load.stop();
    const back = await answersAgain;
    await call('refresh', 'POST', '/v1/auth/refresh', { refresh_token: 'not a refresh token' });
    expect(await inspector.dbsize(), 'nothing counted in the restarted Redis').toBeGreaterThan(0);

    summarize('Redis restarted', loadOutcomes, {
      'restart ms': restartedAt - killedAt,
      'shared again after ms': back - restartedAt,
    });
    expect(loadOutcomes.length).toBeGreaterThan(10);
    for (const o of loadOutcomes) {
      // 429: the per-IP limits of the credential endpoints, which this load reaches (one address).
      expect([200, 201, 401, 429], describeOutcome(o)).toContain(o.status);
      expect(o.ms, describeOutcome(o)).toBeLessThan(3000);
    }
    expect(service.isRunning()).toBe(true);
  });
});
