import type { FastifyInstance } from 'fastify';
import { beforeAll, describe, expect, inject, it } from 'vitest';
import { buildTestApp } from '../support/app.js';
import { secondWhileFirstInserts } from '../support/database.js';
import { createAdmin, type TestUser } from '../support/factories.js';
import { bearer } from '../support/http.js';
import { clientToken, createClient, userWith } from './helpers.js';

/** MAX_CLIENTS_PER_USER for this file: small, so that a few registrations reach it. */
const CAP = 3;

describe('MAX_CLIENTS_PER_USER: a user has at most so many app clients; one more is a 409', () => {
  let app: FastifyInstance;

  beforeAll(async () => {
    app = await buildTestApp({ env: { MAX_CLIENTS_PER_USER: String(CAP) } });
  });

  const create = (token: string, body: Record<string, unknown> = {}) =>
    app.inject({
      method: 'POST',
      url: '/v1/clients',
      headers: bearer(token),
      payload: { name: 'one more', scopes: [], ...body },
    });
  /** The clients the user sees as theirs. */
  const ids = async (user: TestUser) => {
    const res = await app.inject({
      method: 'GET',
      url: '/v1/clients?limit=100',
      headers: bearer(user.accessToken),
    });
    expect(res.statusCode, res.body).toBe(200);
    return (res.json().data as Array<{ id: string; created_by: string }>)
      .filter((c) => c.created_by === user.id)
      .map((c) => c.id);
  };
  const expectRefused = (res: { statusCode: number; headers: Record<string, unknown>; json(): unknown }) => {
    expect(res.statusCode).toBe(409);
    expect(res.headers['content-type']).toMatch(/^application\/problem\+json/);
    expect(res.json()).toMatchObject({
      status: 409,
      code: 'conflict',
      detail: `This account has ${CAP} app clients, the most one may have: delete one before registering another`,
    });
  };

  it('refuses one client past the limit, disabled ones counted, creating nothing; a deletion makes room', async () => {
    const user = await userWith(app, ['clients:read', 'clients:write'], 'ccl-cap');
    const made = [];
    for (let i = 0; i < CAP; i++) made.push(await createClient(app, user.accessToken, { scopes: [] }));
    const disabled = await app.inject({
      method: 'PATCH',
      url: `/v1/clients/${made[0]!.id}`,
      headers: bearer(user.accessToken),
      payload: { status: 'disabled' },
    });
    expect(disabled.statusCode).toBe(200);
    expectRefused(await create(user.accessToken));
    expect(await ids(user)).toHaveLength(CAP);
    expect(
      await app.services.audit.list({ type: 'client.created', actorId: user.id, limit: 10 }),
    ).toHaveLength(CAP);
    // Another user is not counted with them.
    const other = await userWith(app, ['clients:read', 'clients:write'], 'ccl-other');
    await createClient(app, other.accessToken, { scopes: [] });

    const removed = await app.inject({
      method: 'DELETE',
      url: `/v1/clients/${made[0]!.id}`,
      headers: bearer(user.accessToken),
    });
    expect(removed.statusCode).toBe(204);
    expect((await create(user.accessToken)).statusCode).toBe(201);
    expectRefused(await create(user.accessToken));
  });

  it('counts the clients a user’s client registered against that user, administrators included', async () => {
    const admin = await createAdmin(app);
    const registrar = await createClient(app, admin.accessToken, { scopes: ['*'] });
    const service = (await clientToken(app, registrar)).access_token;
    // The registrar is one of the administrator's; its own registration is the second, theirs the third.
    const byService = await create(service);
    expect(byService.statusCode, byService.body).toBe(201);
    expect(byService.json().created_by).toBe(admin.id);
    await createClient(app, admin.accessToken, { scopes: [] });
    expectRefused(await create(service));
    expectRefused(await create(admin.accessToken));
  });

  // On PostgreSQL: a second registration starts while the first, past its count, has not committed;
  // PGlite has one connection, and runs them one after the other anyway.
  it.skipIf(!inject('databaseUrl'))(
    'two registrations at once at the limit: the second waits for the first, counts its client and is refused',
    async () => {
      const user = await userWith(app, ['clients:read', 'clients:write'], 'ccl-race');
      for (let i = 0; i < CAP - 1; i++) await createClient(app, user.accessToken, { scopes: [] });
      const { first, second } = await secondWhileFirstInserts(
        inject('databaseUrl')!,
        app.services.repos.clients,
        () => create(user.accessToken, { name: 'first' }),
        () => create(user.accessToken, { name: 'second' }),
      );
      expect(first.statusCode, first.body).toBe(201);
      expectRefused(second);
      expect(await ids(user)).toHaveLength(CAP);
    },
  );
});
