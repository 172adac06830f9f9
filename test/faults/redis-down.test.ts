import { randomUUID } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { describeOutcome, summarize } from './support/checks.js';
import { freePort } from '../support/spawn-server.js';
import { findPostgres, PostgresCluster } from './support/cluster.js';
import { type Outcome, send } from './support/http.js';
import { LOAD_PASSWORD } from './support/load.js';
import { type ServiceProcess, startService } from './support/service.js';

/**
 * Redis down (REDIS_URL set, nothing listening): the documented policy is that rate limits and
 * login-failure counts fall back to this instance's memory, the log says so, and nothing answers 500.
 */

const DATABASE = 'auth';
const MAX_FAILURES = 3;
/** CREDENTIAL_RATE_LIMIT: logins per IP per minute. */
const LOGINS_PER_MINUTE = 30;

const found = findPostgres();
if ('reason' in found) console.warn(`fault suite (Redis down) not run: ${found.reason}`);

describe.runIf(!('reason' in found))('Redis down', () => {
  let cluster: PostgresCluster;
  let service: ServiceProcess;

  beforeAll(async () => {
    cluster = await PostgresCluster.create();
    await cluster.query(`CREATE DATABASE ${DATABASE}`);
    service = await startService({
      DATABASE_URL: cluster.url(DATABASE),
      REDIS_URL: `redis://127.0.0.1:${await freePort()}`,
      RATE_LIMIT_ENABLED: 'true',
      LOGIN_MAX_FAILURES_PER_HOUR: String(MAX_FAILURES),
    });
  });

  afterAll(async () => {
    await service?.stop();
    await cluster?.destroy();
  });

  it('logins work, limits fall back to this instance, the log says so, never a 500', async () => {
    const outcomes: Outcome[] = [];
    const post = async (path: string, body: Record<string, string>) => {
      const o = await send(service.baseUrl, 'POST', path, { op: path, body });
      outcomes.push(o);
      return o;
    };
    const email = `redis-down-${randomUUID().slice(0, 8)}@example.test`;
    expect((await post('/v1/auth/register', { email, password: LOAD_PASSWORD })).status).toBe(201);
    for (let i = 0; i < 3; i++) {
      const ok = await post('/v1/auth/login', { email, password: LOAD_PASSWORD });
      expect(ok.status, describeOutcome(ok)).toBe(200);
    }

    // The per-account failure count still applies, in this instance's memory.
    for (let i = 0; i < MAX_FAILURES; i++) {
      const wrong = await post('/v1/auth/login', { email, password: 'not the right password' });
      expect(wrong.status, describeOutcome(wrong)).toBe(401);
    }
    const locked = await post('/v1/auth/login', { email, password: LOAD_PASSWORD });
    expect(locked.status, describeOutcome(locked)).toBe(429);
    expect(Number(locked.headers['retry-after'])).toBeGreaterThan(0);

    // So does the per-IP limit of the credential endpoints: it does not fail open.
    let ipLimited: Outcome | undefined;
    for (let i = 0; i <= LOGINS_PER_MINUTE && !ipLimited; i++) {
      const o = await post('/v1/auth/login', {
        email: `nobody-${randomUUID().slice(0, 8)}@example.test`,
        password: 'not the right password',
      });
      if (o.status === 429) ipLimited = o;
      else expect(o.status, describeOutcome(o)).toBe(401);
    }
    expect(ipLimited, 'the per-IP limit never answered 429').toBeDefined();
    expect(ipLimited!.body).toMatchObject({ code: 'rate_limited' });
    expect(Number(ipLimited!.headers['retry-after'])).toBeGreaterThan(0);

    summarize('Redis down', outcomes);
    for (const o of outcomes) expect(o.status, describeOutcome(o)).toBeLessThan(500);
    expect(service.isRunning()).toBe(true);
    const fallback = service.lines.filter((line) => /Redis unavailable/.test(line));
    expect(fallback.length, service.lines.join('\n')).toBeGreaterThan(0);
    expect(fallback.join('\n')).toMatch(/in-process/);
    // Said once per outage, not once per reconnect attempt.
    expect(fallback.length).toBeLessThanOrEqual(2);
  });
});
