import { describe, expect, it } from 'vitest';
import { buildTestApp } from '../support/app.js';
import { registerUser } from '../support/factories.js';

describe('login overload', () => {
  it('sheds logins beyond the argon2 queue with 503 + Retry-After, and serves the rest', async () => {
    const app = await buildTestApp({ env: { PASSWORD_HASH_CONCURRENCY: '1', PASSWORD_HASH_QUEUE: '1' } });
    const user = await registerUser(app, 'busy');
    const answers = await Promise.all(
      Array.from({ length: 8 }, () =>
        app.inject({
          method: 'POST',
          url: '/v1/auth/login',
          payload: { email: user.email, password: user.password },
        }),
      ),
    );
    const statuses = answers.map((a) => a.statusCode);
    expect(statuses.filter((s) => s === 200).length).toBeGreaterThanOrEqual(2);
    const shed = answers.filter((a) => a.statusCode === 503);
    expect(shed.length).toBeGreaterThan(0);
    for (const a of shed) {
      expect(a.headers['retry-after']).toBeTruthy();
      expect(a.headers['content-type']).toContain('application/problem+json');
      expect(a.json().code).toBe('overloaded');
    }
    expect(statuses.every((s) => s === 200 || s === 503)).toBe(true);
    // Once the queue drains, logins are served again.
    const after = await app.inject({
      method: 'POST',
      url: '/v1/auth/login',
      payload: { email: user.email, password: user.password },
    });
    expect(after.statusCode).toBe(200);
  });
});
