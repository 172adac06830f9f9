import type { FastifyInstance } from 'fastify';
import { beforeAll, describe, expect, it } from 'vitest';
import { atTime } from '../support/clock.js';
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
      expect((await change(`wrong guess ${i}`, `10.1.0.${i + 1}`)).statusCode).toBe(401);
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
    // Each wrong guess is in the audit log.
    const failures = await app.services.audit.list({
      subjectId: user.id,
      type: 'auth.password_changed',
      limit: 50,
    });
    expect(failures.filter((e) => e.outcome === 'failure')).toHaveLength(3);
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
});
