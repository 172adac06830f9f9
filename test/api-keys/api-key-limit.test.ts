import type { FastifyInstance } from 'fastify';
import { beforeAll, describe, expect, inject, it } from 'vitest';
import { buildTestApp } from '../support/app.js';
import { secondWhileFirstInserts } from '../support/database.js';
import { registerUser, type TestUser } from '../support/factories.js';
import { bearer } from '../support/http.js';
import { createKey, createTestClock, withKey } from './helpers.js';

/** MAX_API_KEYS_PER_USER for this file: small, so that a few creations reach it. */
const CAP = 3;

describe('MAX_API_KEYS_PER_USER: an owner has at most so many live keys; one more is a 409', () => {
  const clock = createTestClock();
  let app: FastifyInstance;

  beforeAll(async () => {
    app = await buildTestApp({ env: { MAX_API_KEYS_PER_USER: String(CAP) }, deps: { clock } });
  });

  const create = (headers: Record<string, string>, body: Record<string, unknown> = {}) =>
    app.inject({
      method: 'POST',
      url: '/v1/api-keys',
      headers,
      payload: { name: 'one more', scopes: ['account:read'], ...body },
    });
  /** The owner's live keys as they list them. */
  const liveIds = async (user: TestUser) => {
    const res = await app.inject({
      method: 'GET',
      url: '/v1/api-keys?limit=100',
      headers: bearer(user.accessToken),
    });
    expect(res.statusCode, res.body).toBe(200);
    return (res.json().data as Array<{ id: string }>).map((k) => k.id);
  };
  const expectRefused = (res: { statusCode: number; headers: Record<string, unknown>; json(): unknown }) => {
    expect(res.statusCode).toBe(409);
    expect(res.headers['content-type']).toMatch(/^application\/problem\+json/);
    expect(res.json()).toMatchObject({
      status: 409,
      code: 'conflict',
      detail: `This account has ${CAP} live API keys, the most one may have: revoke one before creating another`,
    });
  };

  it('refuses one key past the limit with a problem naming it, creating nothing; a revocation makes room', async () => {
    const user = await registerUser(app, 'akl-cap');
    const keys = [];
    for (let i = 0; i < CAP; i++)
      keys.push(await createKey(app, user.accessToken, { scopes: ['account:read'] }));
    expectRefused(await create(bearer(user.accessToken)));
    expect(await liveIds(user)).toHaveLength(CAP);
    // Another user is not counted with them.
    const other = await registerUser(app, 'akl-other');
    await createKey(app, other.accessToken, { scopes: [] });

    const revoked = await app.inject({
      method: 'DELETE',
      url: `/v1/api-keys/${keys[0]!.id}`,
      headers: bearer(user.accessToken),
    });
    expect(revoked.statusCode).toBe(204);
    expect((await create(bearer(user.accessToken))).statusCode).toBe(201);
    expectRefused(await create(bearer(user.accessToken)));
  });

  it('counts keys made by the owner’s keys (api_keys:own), and not the expired ones', async () => {
    const user = await registerUser(app, 'akl-children');
    const parent = await createKey(app, user.accessToken, { scopes: ['api_keys:own', 'account:read'] });
    const soon = new Date(clock.nowMs() + 60_000).toISOString();
    await createKey(app, user.accessToken, { scopes: [], expires_at: soon });
    // The parent makes the third; the fourth, by the parent or by the owner, is refused.
    expect((await create(withKey(parent.key))).statusCode).toBe(201);
    expectRefused(await create(withKey(parent.key)));
    expectRefused(await create(bearer(user.accessToken)));
    clock.advance(61);
    try {
      // The key that expired counts no more.
      expect((await create(withKey(parent.key))).statusCode).toBe(201);
      expectRefused(await create(bearer(user.accessToken)));
    } finally {
      clock.advance(-61);
    }
  });

  // On PostgreSQL: a second creation starts while the first, past its count, has not committed;
  // PGlite has one connection, and runs them one after the other anyway.
  it.skipIf(!inject('databaseUrl'))(
    'two creations at once at the limit: the second waits for the first, counts its key and is refused',
    async () => {
      const user = await registerUser(app, 'akl-race');
      for (let i = 0; i < CAP - 1; i++) await createKey(app, user.accessToken, { scopes: [] });
      const { first, second } = await secondWhileFirstInserts(
        inject('databaseUrl')!,
        app.services.repos.apiKeys,
        () => create(bearer(user.accessToken), { name: 'first' }),
        () => create(bearer(user.accessToken), { name: 'second' }),
      );
      expect(first.statusCode, first.body).toBe(201);
      expectRefused(second);
      expect(await liveIds(user)).toHaveLength(CAP);
    },
  );
});
