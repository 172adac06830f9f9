import type { FastifyInstance } from 'fastify';
import { beforeAll, describe, expect, it } from 'vitest';
import type { Clock } from '../../src/lib/clock.js';
import { buildTestApp } from '../support/app.js';
import { registerUser } from '../support/factories.js';

/**
 * The wall clock, but never the same millisecond twice: no replay is decided in the millisecond of
 * the rotation it replays (which even a zero grace covers), whatever the machine's speed.
 */
function strictlyIncreasingClock(): Clock {
  let last = 0;
  const nowMs = () => {
    last = Math.max(Date.now(), last + 1);
    return last;
  };
  return { now: () => new Date(nowMs()), nowMs };
}

describe('refresh-token reuse with no grace (REFRESH_REUSE_GRACE_SECONDS=0)', () => {
  let app: FastifyInstance;
  beforeAll(async () => {
    app = await buildTestApp({
      env: { REFRESH_REUSE_GRACE_SECONDS: '0' },
      deps: { clock: strictlyIncreasingClock() },
    });
  });

  const refresh = (token: string) =>
    app.inject({ method: 'POST', url: '/v1/auth/refresh', payload: { refresh_token: token } });

  it('of 10 refreshes of one token at once, one rotates it; the others are replays that end the family, audited once', async () => {
    const user = await registerUser(app, 'reuse-at-once');
    const results = await Promise.all(Array.from({ length: 10 }, () => refresh(user.refreshToken)));
    const statuses = results.map((r) => r.statusCode);
    // Those that waited for the first one's lock on the session are replays too: decided on the token
    // as it is once they hold the lock, not as it was when they began.
    expect(statuses.filter((s) => s === 200)).toHaveLength(1);
    expect(statuses.filter((s) => s === 401)).toHaveLength(9);
    const rotated = results.find((r) => r.statusCode === 200)!.json().session;
    expect((await refresh(rotated.refresh_token)).statusCode).toBe(401);
    const me = await app.inject({
      method: 'GET',
      url: '/v1/auth/me',
      headers: { authorization: `Bearer ${rotated.access_token}` },
    });
    expect(me.statusCode).toBe(401);
    const reused = await app.services.audit.list({
      actorId: undefined,
      type: 'refresh_token.reused',
      limit: 200,
    });
    expect(reused.filter((e) => e.subjectId === user.id)).toHaveLength(1);
  });
});
