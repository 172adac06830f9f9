import { sql } from 'drizzle-orm';
import type { FastifyInstance } from 'fastify';
import { selectRows } from '../../src/db/client.js';
import { beforeAll, describe, expect, it } from 'vitest';
import { atTime } from '../support/clock.js';
import { captureLogs } from '../support/logs.js';
import { buildTestApp, uniqueEmail } from '../support/app.js';
import { login, registerUser } from '../support/factories.js';

describe('throttling of credential endpoints', () => {
  let app: FastifyInstance;
  beforeAll(async () => {
    app = await buildTestApp({ env: { RATE_LIMIT_ENABLED: 'true', LOGIN_MAX_FAILURES_PER_HOUR: '3' } });
  });

  it('locks an account after its failures, with Retry-After, even for the right password, from any IP', async () => {
    const user = await registerUser(app, 'locked');
    for (let i = 0; i < 3; i++) {
      const res = await app.inject({
        method: 'POST',
        url: '/v1/auth/login',
        remoteAddress: `10.0.0.${i + 1}`,
        payload: { email: user.email, password: 'definitely wrong' },
      });
      expect(res.statusCode).toBe(401);
    }
    const locked = await app.inject({
      method: 'POST',
      url: '/v1/auth/login',
      remoteAddress: '10.0.0.99',
      payload: { email: user.email, password: user.password },
    });
    expect(locked.statusCode).toBe(429);
    expect(Number(locked.headers['retry-after'])).toBeGreaterThan(0);
    expect(locked.json().code).toBe('rate_limited');

    // Other accounts are unaffected; an hour later the account may try again.
    const other = await registerUser(app, 'free');
    await login(app, other.email);
    await atTime(app, new Date(Date.now() + 3601_000), async () => {
      const res = await app.inject({
        method: 'POST',
        url: '/v1/auth/login',
        payload: { email: user.email, password: user.password },
      });
      expect(res.statusCode).toBe(200);
    });
  });

  it('counts a password change’s wrong current password like a failed sign-in: no oracle through a stolen token', async () => {
    const user = await registerUser(app, 'pw-oracle');
    const change = (current: string, address: string) =>
      app.inject({
        method: 'POST',
        url: '/v1/auth/password',
        remoteAddress: address,
        headers: { authorization: `Bearer ${user.accessToken}` },
        payload: { current_password: current, new_password: 'a brand new passphrase 7' },
      });
    for (let i = 0; i < 3; i++)
      expect((await change(`wrong guess ${i}`, `10.1.0.${i + 1}`)).statusCode).toBe(400);
    // Locked for the password change, even with the right password, and for sign-in.
    const locked = await change(user.password, '10.1.0.99');
    expect(locked.statusCode, locked.body).toBe(429);
    expect(Number(locked.headers['retry-after'])).toBeGreaterThan(0);
    const signIn = await app.inject({
      method: 'POST',
      url: '/v1/auth/login',
      remoteAddress: '10.1.0.98',
      payload: { email: user.email, password: user.password },
    });
    expect(signIn.statusCode).toBe(429);
    // Each wrong guess is in the audit log, and so is the attempt the lock refused.
    const failures = await app.services.audit.list({
      subjectId: user.id,
      type: 'auth.password_changed',
      limit: 50,
    });
    expect(
      failures
        .filter((e) => e.outcome === 'failure')
        .map((e) => (e.data as { reason: string }).reason)
        .sort(),
    ).toEqual(['locked', 'wrong_password', 'wrong_password', 'wrong_password']);
  });

  it('counts guesses sent at once before checking them: no more than the limit are checked, the right one included', async () => {
    const user = await registerUser(app, 'locked-burst');
    const guess = (password: string, i: number) =>
      app.inject({
        method: 'POST',
        url: '/v1/auth/login',
        remoteAddress: `10.2.${i}.1`,
        payload: { email: user.email, password },
      });
    const answers = await Promise.all([
      ...Array.from({ length: 12 }, (_, i) => guess(`wrong guess ${i}`, i)),
      guess(user.password, 99),
    ]);
    const statuses = answers.map((a) => a.statusCode);
    // At most the limit (3) were checked; the right password, sent last, met the lock.
    expect(statuses.filter((s) => s === 401).length).toBeLessThanOrEqual(3);
    expect(statuses.filter((s) => s === 429).length).toBeGreaterThanOrEqual(10);
    expect(statuses.at(-1)).toBe(429);
    // The lock's refusals are audited under the account, with their reason: once a minute, not once each.
    const events = await app.services.audit.list({ subjectId: user.id, type: 'auth.login', limit: 50 });
    expect(events.filter((e) => (e.data as { reason?: string }).reason === 'locked')).toHaveLength(1);
    // An address without an account locks as one with (it tells nothing), and its refusals write no
    // event (its wrong guesses do).
    const nobody = uniqueEmail('nobody-locked');
    const refused = await Promise.all(
      Array.from({ length: 6 }, (_, i) =>
        app.inject({
          method: 'POST',
          url: '/v1/auth/login',
          remoteAddress: `10.4.${i}.1`,
          payload: { email: nobody, password: `guess ${i}` },
        }),
      ),
    );
    expect(refused.map((r) => r.statusCode).sort()).toEqual([401, 401, 401, 429, 429, 429]);
    const written = await selectRows<{ reason: string }>(
      app.services.db,
      sql`SELECT data->>'reason' AS reason FROM audit_events
           WHERE request_id IN (${sql.join(
             refused.map((r) => sql`${String(r.headers['x-request-id'])}`),
             sql`, `,
           )})`,
    );
    expect(written.map((w) => w.reason)).toEqual(['unknown_email', 'unknown_email', 'unknown_email']);
  });

  it('gives back the guess of a right password: it does not count toward the lock', async () => {
    const user = await registerUser(app, 'not-locked');
    // The password asked again, right each time (the request is then refused for its address: its own).
    for (let i = 0; i < 4; i++) {
      const again = await app.inject({
        method: 'POST',
        url: '/v1/auth/email/change',
        remoteAddress: `10.3.${i}.1`,
        headers: { authorization: `Bearer ${user.accessToken}` },
        payload: { new_email: user.email, password: user.password },
      });
      expect(again.statusCode, again.body).toBe(400);
    }
    const wrong = (i: number) =>
      app.inject({
        method: 'POST',
        url: '/v1/auth/login',
        remoteAddress: `10.3.9.${i}`,
        payload: { email: user.email, password: `wrong ${i}` },
      });
    for (let i = 0; i < 3; i++) expect((await wrong(i)).statusCode).toBe(401);
    expect((await wrong(3)).statusCode).toBe(429);
  });

  it('limits requests per IP on credential endpoints; X-Forwarded-For does not dodge it', async () => {
    const ip = '192.0.2.77';
    let limited = 0;
    for (let i = 0; i < 35; i++) {
      const res = await app.inject({
        method: 'POST',
        url: '/v1/auth/login',
        remoteAddress: ip,
        headers: { 'x-forwarded-for': `198.51.100.${i}` },
        payload: { email: uniqueEmail('ip'), password: 'whatever password' },
      });
      if (res.statusCode === 429) {
        limited++;
        expect(res.headers['retry-after']).toBeTruthy();
        expect(res.headers['content-type']).toContain('application/problem+json');
      }
    }
    expect(limited).toBeGreaterThan(0);
    // Another IP is not affected.
    const res = await app.inject({
      method: 'POST',
      url: '/v1/auth/login',
      remoteAddress: '192.0.2.78',
      payload: { email: uniqueEmail('ip'), password: 'whatever password' },
    });
    expect(res.statusCode).toBe(401);
  });

  it('counts an IPv6 client by its /64, and an IPv4-mapped address as the IPv4 one', async () => {
    const statuses: number[] = [];
    for (let i = 0; i < 35; i++) {
      const res = await app.inject({
        method: 'POST',
        url: '/v1/auth/login',
        // A different address of one /64 each time, and the IPv4-mapped form of an IPv4 address too.
        remoteAddress: i % 2 ? `2001:db8:77:1::${(i + 1).toString(16)}` : `2001:db8:77:1:${i + 1}::1`,
        payload: { email: uniqueEmail('ipv6'), password: 'whatever password' },
      });
      statuses.push(res.statusCode);
    }
    expect(statuses.filter((s) => s === 429).length).toBeGreaterThan(0);
    // The next /64 is another client.
    const next = await app.inject({
      method: 'POST',
      url: '/v1/auth/login',
      remoteAddress: '2001:db8:77:2::1',
      payload: { email: uniqueEmail('ipv6'), password: 'whatever password' },
    });
    expect(next.statusCode).toBe(401);
    let mapped = 0;
    for (let i = 0; i < 35; i++) {
      const res = await app.inject({
        method: 'POST',
        url: '/v1/auth/login',
        remoteAddress: i % 2 ? '192.0.2.99' : '::ffff:192.0.2.99',
        payload: { email: uniqueEmail('mapped'), password: 'whatever password' },
      });
      if (res.statusCode === 429) mapped++;
    }
    expect(mapped).toBeGreaterThan(0);
  });
});

describe('sign-ins the lock refuses, in the log (SECURITY.md: every login attempt is logged)', () => {
  it('logs each refusal by its request id, without the address', async () => {
    const { lines, logger } = captureLogs('info');
    const app = await buildTestApp({
      env: { RATE_LIMIT_ENABLED: 'true', LOGIN_MAX_FAILURES_PER_HOUR: '1' },
      deps: { logger },
    });
    const email = uniqueEmail('logged-lock');
    const attempt = (i: number) =>
      app.inject({
        method: 'POST',
        url: '/v1/auth/login',
        remoteAddress: `10.5.${i}.1`,
        payload: { email, password: `guess ${i}` },
      });
    expect((await attempt(0)).statusCode).toBe(401);
    const refused = [await attempt(1), await attempt(2)];
    for (const r of refused) {
      expect(r.statusCode).toBe(429);
      const line = lines.find(
        (l) => l.includes('the account is locked') && l.includes(String(r.headers['x-request-id'])),
      );
      expect(line, String(r.headers['x-request-id'])).toBeDefined();
      expect(line).not.toContain(email);
    }
    await app.close();
  });
});
