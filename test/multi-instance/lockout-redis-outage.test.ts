import type { FastifyInstance } from 'fastify';
import { Redis } from 'ioredis';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { loginFailuresKey } from '../../src/lib/throttle.js';
import { RedisServer } from '../faults/support/redis-server.js';
import { buildTestApp, uniqueEmail } from '../support/app.js';
import { PASSWORD } from '../support/factories.js';
import { capturingMailer } from '../support/mail.js';
import { randomAddress } from '../support/redis.js';

/**
 * The login lockout of two instances through a Redis outage (a redis-server of the test's own, killed
 * and started again on its port), through HTTP. While Redis is down each instance counts failures in
 * its own memory; when it answers again those counts are carried into Redis and memory is no longer
 * consulted, so a reset on either instance lifts the lock on both (the instance that counted it kept
 * it for the rest of the hour in its memory, whatever the other did), and a reset made during the
 * outage outweighs the failures counted elsewhere before it (README "Failure behaviour").
 */

const MAX_FAILURES = 3;
const RESET_URL = 'https://app.example.test/reset-password';
const NEW_PASSWORD = 'a fresh and long passphrase';

const missing = RedisServer.missing();
if (missing) console.warn(`lockout through a Redis outage not tested: ${missing}`);

describe.runIf(!missing)('the login lockout of two instances through a Redis outage', () => {
  let redis: RedisServer;
  let inspector: Redis;
  let a: FastifyInstance;
  let b: FastifyInstance;
  const mailer = capturingMailer();
  const remoteAddress = randomAddress();

  beforeAll(async () => {
    redis = await RedisServer.start();
    inspector = new Redis(redis.url, { lazyConnect: true, maxRetriesPerRequest: 1 });
    inspector.on('error', () => undefined);
    const env = {
      REDIS_URL: redis.url,
      RATE_LIMIT_ENABLED: 'true',
      LOGIN_MAX_FAILURES_PER_HOUR: String(MAX_FAILURES),
      PASSWORD_RESET_URL: RESET_URL,
    };
    a = await buildTestApp({ env, deps: { mailer } });
    b = await buildTestApp({ env, deps: { mailer } });
  });

  afterAll(async () => {
    inspector?.disconnect();
    await redis?.stop();
  });

  const post = (app: FastifyInstance, url: string, payload: Record<string, string>) =>
    app.inject({ method: 'POST', url, payload, remoteAddress });
  const signIn = (app: FastifyInstance, email: string, password = PASSWORD) =>
    post(app, '/v1/auth/login', { email, password });
  const answering = (app: FastifyInstance) => app.services.redisLink?.answering();

  it('a lock counted on A during the outage: lifted by a sign-in on B meanwhile; otherwise locked on both after it, until a reset on B lifts it on A too', async () => {
    const signedInMeanwhile = uniqueEmail('outage-signed-in');
    const resetAfter = uniqueEmail('outage-reset-after');
    for (const email of [signedInMeanwhile, resetAfter])
      expect((await post(a, '/v1/auth/register', { email, password: PASSWORD })).statusCode).toBe(201);

    const port = redis.port;
    await redis.kill();
    await vi.waitFor(() => expect([answering(a), answering(b)]).toEqual([false, false]), { timeout: 5000 });
    for (const email of [signedInMeanwhile, resetAfter]) {
      for (let i = 0; i < MAX_FAILURES; i++)
        expect((await signIn(a, email, 'not the password')).statusCode).toBe(401);
      expect((await signIn(a, email)).statusCode).toBe(429);
    }
    // B counted nothing of it: the owner signs in there, after the failures on A.
    expect((await signIn(b, signedInMeanwhile)).statusCode).toBe(200);

    redis = await RedisServer.start(port);
    // Both instances carry what they kept: A its counts, B its reset.
    await vi.waitFor(
      async () => {
        expect([answering(a), answering(b)]).toEqual([true, true]);
        expect(await inspector.get(loginFailuresKey(resetAfter))).toBe(String(MAX_FAILURES));
        expect(await inspector.hget(`${loginFailuresKey(signedInMeanwhile)}:times`, 'reset')).not.toBeNull();
      },
      { timeout: 10_000, interval: 50 },
    );

    // The sign-in on B outweighs the failures A counted before it.
    const onA = await signIn(a, signedInMeanwhile);
    expect(onA.statusCode, onA.body).toBe(200);

    // The other account stays locked, on B too: the outage gave no fresh allowance.
    const onB = await signIn(b, resetAfter);
    expect(onB.statusCode, onB.body).toBe(429);
    // Until its owner resets the password on B: then A lets them in.
    expect((await post(b, '/v1/auth/password/forgot', { email: resetAfter })).statusCode).toBe(204);
    const mail = mailer.sent.filter((m) => m.to === resetAfter && m.subject === 'Reset your password').at(-1);
    const token = /#token=(prs_[0-9A-Za-z_]+)/.exec(mail?.text ?? '')?.[1];
    expect(token, mail?.text).toBeDefined();
    const reset = await post(b, '/v1/auth/password/reset', { token: token!, new_password: NEW_PASSWORD });
    expect(reset.statusCode, reset.body).toBe(204);
    const afterReset = await signIn(a, resetAfter, NEW_PASSWORD);
    expect(afterReset.statusCode, afterReset.body).toBe(200);
  });
});
