import { randomUUID } from 'node:crypto';
import { eq } from 'drizzle-orm';
import type { FastifyInstance } from 'fastify';
import pg from 'pg';
import { beforeAll, describe, expect, inject, it, vi } from 'vitest';
import { clients, roles as rolesTable } from '../../src/db/schema/index.js';
import { CLIENT_SECRET_FORMAT, generateSecret } from '../../src/lib/crypto.js';
import { CLIENT_ID_PREFIX } from '../../src/modules/clients/clients.service.js';
import { CLIENT_ROUTES } from '../authz/routes.js';
import { appliedChanges, buildTestApp } from '../support/app.js';
import { ownDatabase, waitForLockWaiters } from '../support/database.js';
import { authorizationMatrix } from '../support/authz-matrix.js';
import { createKey, grantRole, removeRole, withKey } from '../api-keys/helpers.js';
import { createAdmin, login, registerUser, setUserStatus, type TestUser } from '../support/factories.js';
import { bearer } from '../support/http.js';
import {
  basic,
  clientToken,
  createClient,
  expectNoClientToken,
  form,
  introspect,
  userWith,
} from './helpers.js';

describe('app clients: security', () => {
  let app: FastifyInstance;
  let admin: TestUser;
  beforeAll(async () => {
    app = await buildTestApp();
    admin = await createAdmin(app);
  });

  authorizationMatrix('app clients', () => app, CLIENT_ROUTES);

  it('a flood of made-up client_ids does not push a real client out of the cache', async () => {
    // A database of its own (another file's change may drop this app's caches), and a clock that
    // stands still, so the cache's expiry plays no part however slow the machine is.
    const own = await ownDatabase('clients_flood');
    const at = Date.now();
    const isolated = await buildTestApp({
      deps: { database: own.database, clock: { now: () => new Date(at), nowMs: () => at } },
    });
    try {
      const owner = await userWith(isolated, ['clients:read', 'clients:write', 'users:read']);
      // The row is cached once the client's creation is applied here both at its commit and from its
      // notification.
      const changes = appliedChanges(isolated, (e) => (e.type === 'client_changed' ? e.clientId : undefined));
      const client = await createClient(isolated, owner.accessToken, { scopes: ['users:read'] });
      await changes.bothHeard(client.client_id);
      const service = isolated.services.clients;
      expect((await service.authenticate(client.client_id, client.client_secret)).ok).toBe(true);
      const repo = isolated.services.repos.clients;
      const findByClientId = repo.findByClientId.bind(repo);
      // The made-up ones are answered without the database, so the flood costs the test no time.
      const reads = vi
        .spyOn(repo, 'findByClientId')
        .mockImplementation(async (id, ...rest) =>
          id === client.client_id ? findByClientId(id, ...rest) : undefined,
        );
      try {
        // More made-up ids of the right form than the whole cache holds.
        for (let i = 0; i < 10_001; i++) {
          const { lookupId } = generateSecret(CLIENT_SECRET_FORMAT);
          const made = await service.authenticate(`${CLIENT_ID_PREFIX}${lookupId}`, 'x');
          expect(made).toEqual({ ok: false, reason: 'unknown_client' });
        }
        expect(reads).toHaveBeenCalledTimes(10_001);
        reads.mockClear();
        expect((await service.authenticate(client.client_id, client.client_secret)).ok).toBe(true);
        expect(reads).not.toHaveBeenCalled();
      } finally {
        reads.mockRestore();
      }
    } finally {
      await isolated.close();
      await own.dispose();
    }
  });

  it('hides another user’s clients (404, never 403) and lists only one’s own', async () => {
    const owner = await userWith(app, ['clients:read', 'clients:write', 'users:read']);
    const other = await userWith(app, ['clients:read', 'clients:write', 'users:read']);
    const client = await createClient(app, owner.accessToken, { scopes: ['users:read'] });
    const h = bearer(other.accessToken);
    const attempts = [
      await app.inject({ method: 'GET', url: `/v1/clients/${client.id}`, headers: h }),
      await app.inject({ method: 'GET', url: `/v1/clients/${client.client_id}`, headers: h }),
      await app.inject({
        method: 'PATCH',
        url: `/v1/clients/${client.id}`,
        headers: h,
        payload: { name: 'mine now' },
      }),
      await app.inject({
        method: 'POST',
        url: `/v1/clients/${client.id}/secrets`,
        headers: h,
        payload: { grace_seconds: 60 },
      }),
      await app.inject({ method: 'DELETE', url: `/v1/clients/${client.id}`, headers: h }),
    ];
    // Exactly what a client that does not exist answers.
    const strip = (b: Record<string, unknown>) => ({ ...b, instance: undefined, request_id: undefined });
    const missing = await app.inject({ method: 'GET', url: '/v1/clients/pci_000000000000', headers: h });
    for (const res of attempts) {
      expect(res.statusCode, res.body).toBe(404);
      expect(strip(res.json())).toEqual(strip(missing.json()));
    }
    const list = await app.inject({ method: 'GET', url: '/v1/clients', headers: h });
    expect(list.json().data.map((c: { id: string }) => c.id)).not.toContain(client.id);
    // Untouched, and still the owner's; an administrator sees every client.
    const mine = await app.inject({
      method: 'GET',
      url: `/v1/clients/${client.id}`,
      headers: bearer(owner.accessToken),
    });
    expect(mine.json().name).toBe(client.name);
    const asAdmin = await app.inject({
      method: 'GET',
      url: `/v1/clients/${client.id}`,
      headers: bearer(admin.accessToken),
    });
    expect(asAdmin.statusCode).toBe(200);
    await clientToken(app, client);
  });

  it('an API key registers no client and takes no client secret (403, audited): a leaked key’s revocation ends what it made', async () => {
    const key = await createKey(app, admin.accessToken, {
      scopes: ['clients:read', 'clients:write', 'users:read'],
    });
    const registered = await app.inject({
      method: 'POST',
      url: '/v1/clients',
      headers: withKey(key.key),
      payload: { name: 'escape', scopes: ['users:read'] },
    });
    expect(registered.statusCode, registered.body).toBe(403);
    expect(registered.json().detail).toContain('An API key cannot do this');
    const client = await createClient(app, admin.accessToken, { scopes: ['users:read'] });
    const rotated = await app.inject({
      method: 'POST',
      url: `/v1/clients/${client.id}/secrets`,
      headers: withKey(key.key),
      payload: { grace_seconds: 0 },
    });
    expect(rotated.statusCode, rotated.body).toBe(403);
    // The client's secret is unchanged, and the key still manages what is not a credential.
    expect((await clientToken(app, client)).access_token).toBeTruthy();
    const renamed = await app.inject({
      method: 'PATCH',
      url: `/v1/clients/${client.id}`,
      headers: withKey(key.key),
      payload: { name: 'renamed by a key' },
    });
    expect(renamed.statusCode, renamed.body).toBe(200);
    const denied = await app.services.audit.list({
      credentialId: key.id,
      type: 'authorization.denied',
      limit: 5,
    });
    // Refused by the routes' declaration (config.credential), before the client was looked up.
    expect(
      denied.map((e) => {
        const data = e.data as { method: string; route: string; reason: string };
        expect(data.reason).toContain('An API key cannot do this');
        return `${data.method} ${data.route}`;
      }),
    ).toEqual(['POST /v1/clients/:id/secrets', 'POST /v1/clients']);
  });

  it('never lets a creator give a client permissions they do not hold (403)', async () => {
    const creator = await userWith(app, ['clients:read', 'clients:write', 'users:read']);
    const h = bearer(creator.accessToken);
    for (const scopes of [['audit:read'], ['users:read', 'users:write'], ['users:*'], ['*']]) {
      const res = await app.inject({
        method: 'POST',
        url: '/v1/clients',
        headers: h,
        payload: { name: 'x', scopes },
      });
      expect(res.statusCode, JSON.stringify(scopes)).toBe(403);
      expect(res.json().code).toBe('forbidden');
    }
    const client = await createClient(app, creator.accessToken, { scopes: ['users:read'] });
    const widen = await app.inject({
      method: 'PATCH',
      url: `/v1/clients/${client.id}`,
      headers: h,
      payload: { scopes: ['users:read', 'roles:write'] },
    });
    expect(widen.statusCode).toBe(403);
    expect((await clientToken(app, client)).scope).toBe('users:read');
    // A wildcard holder may grant what the wildcard covers.
    const wide = await userWith(app, ['clients:*', 'users:*']);
    const ok = await createClient(app, wide.accessToken, { scopes: ['users:*', 'users:read'] });
    expect(ok.scopes).toEqual(['users:*', 'users:read']);
  });

  it('a creator who has lost a permission the client holds cannot rotate its secret (403), and the secret stays', async () => {
    const creator = await registerUser(app, 'clients-demoted');
    const full = await grantRole(app, creator.id, ['clients:read', 'clients:write', 'users:read']);
    const client = await createClient(app, (await login(app, creator.email)).session.access_token, {
      scopes: ['users:read'],
    });
    await grantRole(app, creator.id, ['clients:read', 'clients:write']);
    await removeRole(app, creator.id, full);
    const demoted = (await login(app, creator.email)).session.access_token;
    const rotate = await app.inject({
      method: 'POST',
      url: `/v1/clients/${client.id}/secrets`,
      headers: bearer(demoted),
      payload: { grace_seconds: 0 },
    });
    expect(rotate.statusCode, rotate.body).toBe(403);
    expect(rotate.json().detail).toContain('users:read');
    // The secret stays; the client acts for its creator, who holds none of its scopes now: no token.
    await expectNoClientToken(app, client);
    // Still theirs to see, and to disable.
    const get = await app.inject({
      method: 'GET',
      url: `/v1/clients/${client.id}`,
      headers: bearer(demoted),
    });
    expect(get.statusCode).toBe(200);
  });

  it('a creator no longer holding the client’s scopes cannot turn it back on, widen its audiences or lengthen its tokens (403, audited)', async () => {
    const creator = await registerUser(app, 'clients-widen');
    const writer = await grantRole(app, creator.id, ['clients:read', 'clients:write']);
    expect(writer).toBeTruthy();
    const adminGrant = await app.inject({
      method: 'PUT',
      url: `/v1/users/${creator.id}/roles/admin`,
      headers: bearer(admin.accessToken),
    });
    expect(adminGrant.statusCode, adminGrant.body).toBe(200);
    const asAdministrator = (await login(app, creator.email)).session.access_token;
    // Registered by an administrator: it acts on its own scopes, whatever its creator holds later.
    const client = await createClient(app, asAdministrator, {
      scopes: ['users:read'],
      audiences: ['https://orders.example.test', 'https://stock.example.test'],
      access_token_ttl: 300,
    });
    expect(client.acts_for_creator).toBe(false);
    const demote = await app.inject({
      method: 'DELETE',
      url: `/v1/users/${creator.id}/roles/admin`,
      headers: bearer(admin.accessToken),
    });
    expect(demote.statusCode).toBe(204);
    const disable = await app.inject({
      method: 'PATCH',
      url: `/v1/clients/${client.id}`,
      headers: bearer(admin.accessToken),
      payload: { status: 'disabled' },
    });
    expect(disable.statusCode, disable.body).toBe(200);
    const demoted = (await login(app, creator.email)).session.access_token;
    const patch = (payload: Record<string, unknown>, token = demoted) =>
      app.inject({ method: 'PATCH', url: `/v1/clients/${client.id}`, headers: bearer(token), payload });

    for (const payload of [
      { status: 'active' },
      { audiences: ['https://orders.example.test', 'https://billing.example.test'] },
      // None: this service's own audience, which the list did not allow.
      { audiences: [] },
      { access_token_ttl: 3600 },
      { access_token_ttl: null },
    ]) {
      const res = await patch(payload);
      expect(res.statusCode, JSON.stringify(payload)).toBe(403);
      expect(res.json().detail).toContain('users:read');
    }
    // Emptying its scopes in the same change does not make turning it back on theirs to do: an
    // organisation's client, once disabled, is an administrator's to enable.
    const emptied = await patch({ status: 'active', scopes: [] });
    expect(emptied.statusCode, emptied.body).toBe(403);
    expect(emptied.json().detail).toContain('Only an administrator');
    const refused = await form(
      app,
      '/oauth/token',
      { grant_type: 'client_credentials' },
      basic(client.client_id, client.client_secret),
    );
    expect(refused.statusCode, refused.body).toBe(401);
    const unchanged = await app.inject({
      method: 'GET',
      url: `/v1/clients/${client.id}`,
      headers: bearer(admin.accessToken),
    });
    expect(unchanged.json()).toMatchObject({
      status: 'disabled',
      scopes: ['users:read'],
      audiences: ['https://orders.example.test', 'https://stock.example.test'],
      access_token_ttl: 300,
    });
    const denied = await app.services.audit.list({
      type: 'authorization.denied',
      subjectId: client.id,
      limit: 10,
    });
    expect(denied).toHaveLength(6);
    expect(denied.every((e) => (e.data as { action?: string }).action === 'client.update')).toBe(true);

    // What reaches no further stays theirs to do: a name, a shorter lifetime, an audience taken away.
    expect((await patch({ name: 'renamed', access_token_ttl: 120 })).statusCode).toBe(200);
    expect((await patch({ audiences: ['https://orders.example.test'] })).statusCode).toBe(200);
    // Audiences compare by what they allow, none meaning this service's own: listing this service
    // beside it reaches further, and so is refused...
    const withOurs = { audiences: ['http://auth.test', 'https://orders.example.test'] };
    expect((await patch(withOurs)).statusCode).toBe(403);
    expect((await patch(withOurs, admin.accessToken)).statusCode).toBe(200);
    // ...while none in its place takes the other away, and this service alone changes nothing.
    expect((await patch({ audiences: [] })).statusCode).toBe(200);
    expect((await patch({ audiences: ['http://auth.test'] })).statusCode).toBe(200);
    // An administrator, who holds the scopes, turns it back on.
    expect((await patch({ status: 'active' }, admin.accessToken)).statusCode).toBe(200);
    await clientToken(app, client);
  });

  it('a client an administrator disabled stays disabled: its creator cannot turn it back on (403, audited)', async () => {
    const creator = await userWith(app, ['clients:read', 'clients:write', 'users:read'], 'clients-admin-off');
    const client = await createClient(app, creator.accessToken, { scopes: ['users:read'] });
    expect(client).toMatchObject({ acts_for_creator: true, disabled_by_administrator: false });
    const patch = (payload: Record<string, unknown>, token = creator.accessToken) =>
      app.inject({ method: 'PATCH', url: `/v1/clients/${client.id}`, headers: bearer(token), payload });
    const statusOf = async () =>
      (
        await app.inject({
          method: 'GET',
          url: `/v1/clients/${client.id}`,
          headers: bearer(admin.accessToken),
        })
      ).json() as { status: string; disabled_by_administrator: boolean };

    // Their own disable is theirs to lift.
    expect((await patch({ status: 'disabled' })).json()).toMatchObject({
      status: 'disabled',
      disabled_by_administrator: false,
    });
    expect((await patch({ status: 'active' })).statusCode).toBe(200);
    await clientToken(app, client);

    // An administrator's is not, whatever else the same change does.
    const off = await patch({ status: 'disabled' }, admin.accessToken);
    expect(off.json()).toMatchObject({ status: 'disabled', disabled_by_administrator: true });
    for (const payload of [{ status: 'active' }, { status: 'active', name: 'back', scopes: [] }]) {
      const res = await patch(payload);
      expect(res.statusCode, res.body).toBe(403);
      expect(res.json().detail).toBe(
        'Only an administrator turns back on a client an administrator disabled',
      );
    }
    // Disabling it again themselves is no change, and does not make it theirs.
    expect((await patch({ status: 'disabled' })).statusCode).toBe(200);
    expect(await statusOf()).toMatchObject({ status: 'disabled', disabled_by_administrator: true });
    expect((await patch({ status: 'active' })).statusCode).toBe(403);
    const refused = await form(
      app,
      '/oauth/token',
      { grant_type: 'client_credentials' },
      basic(client.client_id, client.client_secret),
    );
    expect(refused.statusCode, refused.body).toBe(401);
    const denied = await app.services.audit.list({
      type: 'authorization.denied',
      subjectId: client.id,
      limit: 10,
    });
    expect(denied).toHaveLength(3);
    expect(denied.every((e) => (e.data as { action?: string }).action === 'client.update')).toBe(true);
    const disabledEvents = await app.services.audit.list({
      type: 'client.updated',
      subjectId: client.id,
      limit: 10,
    });
    expect(disabledEvents.map((e) => e.data)).toContainEqual(
      expect.objectContaining({ status: 'disabled', disabled_by_administrator: true }),
    );

    // An administrator turns it back on; from then on it is its creator's again.
    expect((await patch({ status: 'active' }, admin.accessToken)).json()).toMatchObject({
      status: 'active',
      disabled_by_administrator: false,
    });
    await clientToken(app, client);
    expect((await patch({ status: 'disabled' })).statusCode).toBe(200);
    // An administrator's disable sent to a client its creator disabled already makes it theirs.
    const locked = await patch({ status: 'disabled' }, admin.accessToken);
    expect(locked.json()).toMatchObject({ status: 'disabled', disabled_by_administrator: true });
    expect((await patch({ status: 'active' })).statusCode).toBe(403);
    expect((await patch({ status: 'active' }, admin.accessToken)).statusCode).toBe(200);
  });

  it('nor can its creator delete a client an administrator disabled (403, audited); one they disabled is theirs to delete', async () => {
    const creator = await userWith(app, ['clients:read', 'clients:write', 'users:read'], 'clients-admin-del');
    const patch = (id: string, status: string, token: string) =>
      app.inject({ method: 'PATCH', url: `/v1/clients/${id}`, headers: bearer(token), payload: { status } });
    const remove = (id: string, token = creator.accessToken) =>
      app.inject({ method: 'DELETE', url: `/v1/clients/${id}`, headers: bearer(token) });
    const exists = async (id: string) =>
      (await app.inject({ method: 'GET', url: `/v1/clients/${id}`, headers: bearer(admin.accessToken) }))
        .statusCode;

    const client = await createClient(app, creator.accessToken, { scopes: ['users:read'] });
    expect((await patch(client.id, 'disabled', admin.accessToken)).statusCode).toBe(200);
    for (const id of [client.id, client.client_id]) {
      const res = await remove(id);
      expect(res.statusCode, res.body).toBe(403);
      expect(res.headers['content-type']).toMatch(/^application\/problem\+json/);
      expect(res.json().detail).toBe('Only an administrator deletes a client an administrator disabled');
    }
    expect(await exists(client.id)).toBe(200);
    const denied = await app.services.audit.list({
      type: 'authorization.denied',
      subjectId: client.id,
      limit: 10,
    });
    expect(denied.map((e) => e.data)).toEqual([
      expect.objectContaining({ action: 'client.delete', client_id: client.client_id }),
      expect.objectContaining({ action: 'client.delete', client_id: client.client_id }),
    ]);
    expect(await app.services.audit.list({ type: 'client.deleted', subjectId: client.id, limit: 1 })).toEqual(
      [],
    );
    // Enabled again by an administrator, it is its creator's to delete.
    expect((await patch(client.id, 'active', admin.accessToken)).statusCode).toBe(200);
    expect((await remove(client.id)).statusCode).toBe(204);

    // One its creator disabled is theirs to delete; an administrator deletes either.
    const own = await createClient(app, creator.accessToken, { scopes: ['users:read'] });
    expect((await patch(own.id, 'disabled', creator.accessToken)).statusCode).toBe(200);
    expect((await remove(own.id)).statusCode).toBe(204);
    const locked = await createClient(app, creator.accessToken, { scopes: ['users:read'] });
    expect((await patch(locked.id, 'disabled', admin.accessToken)).statusCode).toBe(200);
    expect((await remove(locked.id, admin.accessToken)).statusCode).toBe(204);
    expect(await exists(locked.id)).toBe(404);
  });

  // On PostgreSQL: the administrator's disable holds the client's row, uncommitted, when the creator's
  // delete comes; PGlite has one connection, and runs them one after the other anyway.
  it.skipIf(!inject('databaseUrl'))(
    'a creator’s delete racing an administrator’s disable waits for it, and is refused (403)',
    async () => {
      const creator = await userWith(app, ['clients:read', 'clients:write'], 'clients-del-race');
      const client = await createClient(app, creator.accessToken, { scopes: [] });
      const holder = new pg.Client({ connectionString: inject('databaseUrl') });
      await holder.connect();
      let deleting: Promise<Awaited<ReturnType<typeof app.inject>>> | undefined;
      try {
        await holder.query('BEGIN');
        // As the administrator's PATCH writes it.
        await holder.query(
          `UPDATE clients SET status = 'disabled', disabled_by_administrator = true WHERE id = $1`,
          [client.id],
        );
        const { rows } = await holder.query<{ pid: number }>('SELECT pg_backend_pid() AS pid');
        deleting = app.inject({
          method: 'DELETE',
          url: `/v1/clients/${client.id}`,
          headers: bearer(creator.accessToken),
        });
        await Promise.race([waitForLockWaiters(holder, 1, rows[0]!.pid), deleting]);
        await holder.query('COMMIT');
      } finally {
        await holder.end();
      }
      const res = await deleting!;
      expect(res.statusCode, res.body).toBe(403);
      const [row] = await app.services.db.select().from(clients).where(eq(clients.id, client.id));
      expect(row).toMatchObject({ status: 'disabled', disabledByAdministrator: true });
    },
  );

  it('a creator who lost a scope cannot rotate the secret with their old token either (403, audited)', async () => {
    const creator = await registerUser(app, 'clients-old-token');
    const full = await grantRole(app, creator.id, ['clients:read', 'clients:write', 'orders:read']);
    const token = (await login(app, creator.email)).session.access_token;
    const client = await createClient(app, token, { scopes: ['orders:read'] });
    const narrower = await grantRole(app, creator.id, ['clients:read', 'clients:write']);
    // Through the API, as an administrator does it; the token still says orders:read.
    const removed = await app.inject({
      method: 'DELETE',
      url: `/v1/users/${creator.id}/roles/${full}`,
      headers: bearer(admin.accessToken),
    });
    expect(removed.statusCode).toBe(204);
    const rotate = await app.inject({
      method: 'POST',
      url: `/v1/clients/${client.id}/secrets`,
      headers: bearer(token),
      payload: { grace_seconds: 0 },
    });
    expect(rotate.statusCode, rotate.body).toBe(403);
    expect(rotate.json().detail).toContain('orders:read');
    // The old secret still works (nothing changed), within what its creator holds now.
    await expectNoClientToken(app, client);
    const widen = await app.inject({
      method: 'PATCH',
      url: `/v1/clients/${client.id}`,
      headers: bearer(token),
      // A change (clients:read is new) whose scopes still hold orders:read, no longer the creator's.
      // (Scopes sent exactly as they are would be no change, answered 200 with nothing granted.)
      payload: { scopes: ['orders:read', 'clients:read'] },
    });
    expect(widen.statusCode, widen.body).toBe(403);
    const create = await app.inject({
      method: 'POST',
      url: '/v1/clients',
      headers: bearer(token),
      payload: { name: 'again', scopes: ['orders:read'] },
    });
    expect(create.statusCode, create.body).toBe(403);

    const denied = await app.services.audit.list({
      type: 'authorization.denied',
      actorId: creator.id,
      limit: 10,
    });
    expect(denied.map((e) => e.data)).toEqual([
      expect.objectContaining({ action: 'client.create', rule: 'grant_ceiling', missing: ['orders:read'] }),
      expect.objectContaining({ action: 'client.update', rule: 'grant_ceiling', missing: ['orders:read'] }),
      expect.objectContaining({
        action: 'client.rotate_secret',
        rule: 'grant_ceiling',
        missing: ['orders:read'],
      }),
    ]);
    expect(denied[2]).toMatchObject({ outcome: 'failure', subjectId: client.id });
    expect(JSON.stringify(denied)).not.toContain(client.client_secret);
    expect(
      await app.services.audit.list({ type: 'client.secret_rotated', actorId: creator.id, limit: 10 }),
    ).toEqual([]);
    // With the narrower role alone, what is still held can be given.
    expect(narrower).toBeTruthy();
    const held = await createClient(app, token, { scopes: ['clients:read'] });
    expect(held.scopes).toEqual(['clients:read']);
  });

  it('a service principal acts within its client’s current scopes, not its token’s', async () => {
    const service = await createClient(app, admin.accessToken, { scopes: ['*'] });
    const token = (await clientToken(app, service)).access_token;
    const other = await createClient(app, admin.accessToken, { scopes: ['clients:read'] });
    // Narrowed where this instance has not heard of it yet (a PATCH would revoke the token, on every
    // instance within 1 s): the token still says `*`; the client holds clients:write but is no
    // administrator any more, so it registers nothing and sees no one else's client to change.
    await app.services.db
      .update(clients)
      .set({ scopes: ['clients:read', 'clients:write'] })
      .where(eq(clients.id, service.id));
    const create = await app.inject({
      method: 'POST',
      url: '/v1/clients',
      headers: bearer(token),
      payload: { name: 'from a service', scopes: ['users:read'] },
    });
    expect(create.statusCode, create.body).toBe(403);
    const disable = await app.inject({
      method: 'PATCH',
      url: `/v1/clients/${other.id}`,
      headers: bearer(token),
      payload: { status: 'disabled' },
    });
    expect(disable.statusCode, disable.body).toBe(404);
    expect((await app.services.repos.clients.findById(other.id))?.status).toBe('active');
    const denied = await app.services.audit.list({
      type: 'authorization.denied',
      actorId: service.client_id,
      limit: 10,
    });
    // The 403, then the 404 for a client it may no longer see, audited as not its own.
    expect(denied[1]).toMatchObject({ actorType: 'service', data: { route: '/v1/clients', method: 'POST' } });
    expect(denied[0]).toMatchObject({
      actorType: 'service',
      subjectId: other.id,
      data: { action: 'client.update', reason: 'not_owner', route: '/v1/clients/:id', method: 'PATCH' },
    });
    expect(denied).toHaveLength(2);
  });

  it('keeps only a keyed hash of the secret, and shows the secret in no later answer', async () => {
    const client = await createClient(app, admin.accessToken, { scopes: [] });
    const row = await app.services.repos.clients.findById(client.id);
    expect(row).toBeDefined();
    expect(JSON.stringify(row)).not.toContain(client.client_secret);
    expect(JSON.stringify(row)).not.toContain(client.client_secret.slice(17, 60));
    expect(row?.secretHash).toMatch(/^[A-Za-z0-9_-]{43}$/);
    const h = bearer(admin.accessToken);
    const later = [
      await app.inject({ method: 'GET', url: `/v1/clients/${client.id}`, headers: h }),
      await app.inject({ method: 'GET', url: '/v1/clients?limit=200', headers: h }),
      await app.inject({
        method: 'PATCH',
        url: `/v1/clients/${client.id}`,
        headers: h,
        payload: { name: 'n' },
      }),
      await app.inject({ method: 'GET', url: '/v1/audit-events?limit=200', headers: h }),
    ];
    for (const res of later) expect(res.body).not.toContain(client.client_secret.slice(17, 60));
  });

  it('refuses a secret with a typo before any lookup, and a secret of another client', async () => {
    const a = await createClient(app, admin.accessToken, { scopes: [] });
    const b = await createClient(app, admin.accessToken, { scopes: [] });
    const typo = `${a.client_secret.slice(0, 30)}${a.client_secret[30] === 'a' ? 'b' : 'a'}${a.client_secret.slice(31)}`;
    for (const [id, secret] of [
      [a.client_id, typo],
      [a.client_id, b.client_secret],
      [a.client_id, `${a.client_secret}x`],
      [a.client_id, 'x'.repeat(5000)],
      ['pci_000000000000', a.client_secret],
    ] as const) {
      const res = await form(app, '/oauth/token', { grant_type: 'client_credentials' }, basic(id, secret));
      expect(res.statusCode).toBe(401);
      expect(res.json().error).toBe('invalid_client');
    }
  });

  it('a client that authenticated a moment ago is refused at once when disabled, and served when enabled', async () => {
    const client = await createClient(app, admin.accessToken, { scopes: [] });
    const token = () =>
      form(
        app,
        '/oauth/token',
        { grant_type: 'client_credentials' },
        basic(client.client_id, client.client_secret),
      );
    // Authenticated, so this instance remembers the secret's digest.
    expect((await token()).statusCode).toBe(200);
    expect((await token()).statusCode).toBe(200);
    const setStatus = (status: string) =>
      app.inject({
        method: 'PATCH',
        url: `/v1/clients/${client.id}`,
        headers: bearer(admin.accessToken),
        payload: { status },
      });
    expect((await setStatus('disabled')).statusCode).toBe(200);
    expect((await token()).statusCode).toBe(401);
    expect((await setStatus('active')).statusCode).toBe(200);
    expect((await token()).statusCode).toBe(200);
  });

  it('audits failed authentications of a registered client, without the secret', async () => {
    const client = await createClient(app, admin.accessToken, { scopes: [] });
    await app.inject({
      method: 'PATCH',
      url: `/v1/clients/${client.id}`,
      headers: bearer(admin.accessToken),
      payload: { status: 'disabled' },
    });
    const res = await form(
      app,
      '/oauth/token',
      { grant_type: 'client_credentials' },
      basic(client.client_id, client.client_secret),
    );
    expect(res.statusCode).toBe(401);
    const events = await app.services.audit.list({
      subjectId: client.id,
      type: 'client.authentication_failed',
      limit: 50,
    });
    const mine = events[0];
    expect(mine).toMatchObject({
      outcome: 'failure',
      data: { client_id: client.client_id, reason: 'disabled' },
    });
    expect(JSON.stringify(events)).not.toContain(client.client_secret.slice(17, 60));
  });

  it('audits a registered client’s failures whatever the secret: garbage, or another client’s', async () => {
    const client = await createClient(app, admin.accessToken, { scopes: [] });
    const other = await createClient(app, admin.accessToken, { scopes: [] });
    for (const secret of ['wrong', `${client.client_secret}x`, other.client_secret]) {
      const res = await form(
        app,
        '/oauth/token',
        { grant_type: 'client_credentials' },
        basic(client.client_id, secret),
      );
      expect(res.statusCode, secret).toBe(401);
    }
    const events = await app.services.audit.list({
      subjectId: client.id,
      type: 'client.authentication_failed',
      limit: 50,
    });
    expect(events.map((e) => (e.data as { reason: string }).reason).sort()).toEqual([
      'malformed',
      'malformed',
      'malformed',
    ]);
    expect(JSON.stringify(events)).not.toContain(other.client_secret.slice(17, 60));
  });

  it('a client’s token is a service principal: it carries no roles and acts within its scopes only', async () => {
    const client = await createClient(app, admin.accessToken, { scopes: ['tokens:introspect'] });
    const { access_token } = await clientToken(app, client);
    // The token is accepted by this service (its own audience) as a service principal...
    const someone = await createClient(app, admin.accessToken, { scopes: [] });
    const other = await clientToken(app, someone);
    expect(await introspect(app, other.access_token, bearer(access_token))).toMatchObject({
      active: true,
      sub: someone.client_id,
    });
    // ...and is refused where a permission it lacks is needed.
    const denied = await app.inject({ method: 'GET', url: '/v1/clients', headers: bearer(access_token) });
    expect(denied.statusCode).toBe(403);
    const me = await app.inject({ method: 'GET', url: '/v1/auth/me', headers: bearer(access_token) });
    expect(me.statusCode).toBe(403);
  });

  it('a client registered by a user who is not an administrator acts for them: within what they hold now, nothing once they are disabled or deleted', async () => {
    const creator = await registerUser(app, 'clients-acting');
    const role = await grantRole(app, creator.id, [
      'clients:read',
      'clients:write',
      'users:read',
      'roles:read',
    ]);
    const token = (await login(app, creator.email)).session.access_token;
    const client = await createClient(app, token, { scopes: ['users:read', 'roles:read'] });
    expect(client).toMatchObject({ created_by: creator.id, acts_for_creator: true });
    const grant = (scope?: string) =>
      form(
        app,
        '/oauth/token',
        { grant_type: 'client_credentials', ...(scope ? { scope } : {}) },
        basic(client.client_id, client.client_secret),
      );
    expect((await grant()).json().scope).toBe('roles:read users:read');
    const serviceToken = (await grant()).json().access_token as string;
    expect(
      (await app.inject({ method: 'GET', url: '/v1/users', headers: bearer(serviceToken) })).statusCode,
    ).toBe(200);

    // The creator loses users:read (through the API, as an administrator does it).
    await grantRole(app, creator.id, ['clients:read', 'clients:write', 'roles:read']);
    const removed = await app.inject({
      method: 'DELETE',
      url: `/v1/users/${creator.id}/roles/${role}`,
      headers: bearer(admin.accessToken),
    });
    expect(removed.statusCode).toBe(204);
    expect((await grant()).json().scope).toBe('roles:read');
    const wider = await grant('users:read');
    expect(wider.statusCode).toBe(400);
    expect(wider.json().error).toBe('invalid_scope');
    expect(wider.json().error_description).toBe('The user this client acts for no longer holds: users:read');
    const unregistered = await grant('audit:read');
    expect(unregistered.json().error_description).toBe('The client is not registered for: audit:read');

    // Disabled: the client acts for nobody; deleted: the same.
    const disabled = await app.inject({
      method: 'PATCH',
      url: `/v1/users/${creator.id}`,
      headers: bearer(admin.accessToken),
      payload: { status: 'disabled' },
    });
    expect(disabled.statusCode).toBe(200);
    // It still authenticates, but gets no token: not even one with no scope, which would still say
    // "this is that service" to whoever checks only signatures and audiences.
    const refused = await grant();
    expect(refused.statusCode, refused.body).toBe(400);
    expect(refused.json()).toMatchObject({ error: 'unauthorized_client' });
    expect(refused.json().error_description).toContain('disabled or deleted');
    // Enabled again, it is served within what they hold.
    await setUserStatus(app, admin.accessToken, creator.id, 'active');
    expect((await grant()).json().scope).toBe('roles:read');
    const deleted = await app.inject({
      method: 'DELETE',
      url: `/v1/users/${creator.id}`,
      headers: bearer(admin.accessToken),
    });
    expect(deleted.statusCode).toBe(204);
    // Deleted: its creator will never be active again, so it is disabled, audited, and its secret is
    // refused as any disabled client's is; an administrator unbinding it later gives it nothing back.
    const after = await grant();
    expect(after.statusCode, after.body).toBe(401);
    expect(after.json().error).toBe('invalid_client');
    const row = await app.inject({
      method: 'GET',
      url: `/v1/clients/${client.id}`,
      headers: bearer(admin.accessToken),
    });
    expect(row.json()).toMatchObject({ status: 'disabled', created_by: null });
    const [event] = await app.services.audit.list({ type: 'client.updated', subjectId: client.id, limit: 1 });
    expect(event?.data).toMatchObject({ status: 'disabled', reason: 'creator_deleted' });
  });

  it('a client registered by an administrator is the organisation’s: it keeps its scopes whatever becomes of them', async () => {
    const exAdmin = await createAdmin(app);
    const client = await createClient(app, exAdmin.accessToken, { scopes: ['users:read'] });
    expect(client.acts_for_creator).toBe(false);
    await app.services.repos.users.removeRole(exAdmin.id, 'admin');
    app.services.events.applyLocally([{ type: 'user_changed', userId: exAdmin.id }]);
    expect((await clientToken(app, client)).scope).toBe('users:read');
  });

  it('a client made before it could be bound (migration 0005) is bound by PATCH acts_for_creator: its old tokens go, new ones carry what its creator holds', async () => {
    const creator = await userWith(
      app,
      ['clients:read', 'clients:write', 'users:read', 'roles:read'],
      'unbound',
    );
    const client = await createClient(app, creator.accessToken, { scopes: ['users:read', 'roles:read'] });
    // As migration 0005 left the clients that existed before it.
    await app.services.db.update(clients).set({ actsForCreator: false }).where(eq(clients.id, client.id));
    app.services.events.applyLocally([{ type: 'client_changed', clientId: client.client_id }]);
    const old = await clientToken(app, client);
    // The creator's role is narrowed: an unbound client does not notice.
    const { roles } = await app.services.repos.users.rolesAndPermissions(creator.id);
    const role = roles.find((r) => r.startsWith('test-'))!;
    await app.services.db
      .update(rolesTable)
      .set({ permissions: ['clients:read', 'clients:write', 'roles:read'] })
      .where(eq(rolesTable.name, role));
    app.services.events.applyLocally([{ type: 'roles_changed' }]);
    expect((await clientToken(app, client)).scope).toBe('roles:read users:read');

    // Its creator may not unbind it; an administrator decides that.
    const bind = (token: string, actsForCreator: boolean) =>
      app.inject({
        method: 'PATCH',
        url: `/v1/clients/${client.id}`,
        headers: bearer(token),
        payload: { acts_for_creator: actsForCreator },
      });
    const bound = await bind(admin.accessToken, true);
    expect(bound.statusCode, bound.body).toBe(200);
    expect(bound.json().acts_for_creator).toBe(true);
    expect(
      (await introspect(app, old.access_token, basic(client.client_id, client.client_secret))).active,
    ).toBe(false);
    expect((await clientToken(app, client)).scope).toBe('roles:read');
    const creatorToken = (await login(app, creator.email)).session.access_token;
    const unbind = await bind(creatorToken, false);
    expect(unbind.statusCode, unbind.body).toBe(403);
    expect((await app.services.repos.clients.findByClientId(client.client_id))?.actsForCreator).toBe(true);
    const updated = await app.services.audit.list({ type: 'client.updated', limit: 20 });
    expect(updated.find((e) => e.subjectId === client.id)?.data).toMatchObject({
      changed: ['acts_for_creator'],
      acts_for_creator: true,
    });
    // An administrator makes it the organisation's again.
    expect((await bind(admin.accessToken, false)).json().acts_for_creator).toBe(false);
  });

  it('a client with no recorded creator cannot be bound to one (409)', async () => {
    const client = await createClient(app, admin.accessToken, { scopes: ['users:read'] });
    await app.services.db.update(clients).set({ createdBy: null }).where(eq(clients.id, client.id));
    const res = await app.inject({
      method: 'PATCH',
      url: `/v1/clients/${client.id}`,
      headers: bearer(admin.accessToken),
      payload: { acts_for_creator: true },
    });
    expect(res.statusCode, res.body).toBe(409);
    expect(res.json().detail).toBe('This client has no recorded creator to act for');
  });

  it('a client whose scopes or audiences are narrowed loses the tokens it holds; widened or renamed, it keeps them', async () => {
    const introspector = await createClient(app, admin.accessToken, { scopes: ['tokens:introspect'] });
    const asIntrospector = basic(introspector.client_id, introspector.client_secret);
    const active = async (token: string) => (await introspect(app, token, asIntrospector)).active;
    const client = await createClient(app, admin.accessToken, {
      scopes: ['users:read', 'roles:read'],
      audiences: ['https://orders.example.com', 'https://billing.example.com'],
      access_token_ttl: 86_400,
    });
    const patch = async (payload: Record<string, unknown>) => {
      const res = await app.inject({
        method: 'PATCH',
        url: `/v1/clients/${client.id}`,
        headers: bearer(admin.accessToken),
        payload,
      });
      expect(res.statusCode, res.body).toBe(200);
    };
    const first = await clientToken(app, client);
    await patch({ name: 'renamed', scopes: ['users:*', 'roles:read'] });
    expect(await active(first.access_token)).toBe(true);
    await patch({ scopes: ['roles:read'] });
    expect(await active(first.access_token)).toBe(false);
    const second = await clientToken(app, client);
    expect(second.scope).toBe('roles:read');
    await patch({ audiences: ['https://orders.example.com'] });
    expect(await active(second.access_token)).toBe(false);
    expect(await active((await clientToken(app, client)).access_token)).toBe(true);
  });

  it('a client registered without audiences, then given others, loses this service’s audience and the tokens carrying it', async () => {
    const introspector = await createClient(app, admin.accessToken, { scopes: ['tokens:introspect'] });
    const active = async (token: string) =>
      (await introspect(app, token, basic(introspector.client_id, introspector.client_secret))).active;
    const setAudiences = async (client: { id: string }, audiences: string[]) => {
      const res = await app.inject({
        method: 'PATCH',
        url: `/v1/clients/${client.id}`,
        headers: bearer(admin.accessToken),
        payload: { audiences },
      });
      expect(res.statusCode, res.body).toBe(200);
    };
    // None registered: its tokens are for this service, and work here.
    const client = await createClient(app, admin.accessToken, { scopes: ['users:read'] });
    const ours = (await clientToken(app, client)).access_token;
    const users = () => app.inject({ method: 'GET', url: '/v1/users?limit=1', headers: bearer(ours) });
    expect((await users()).statusCode).toBe(200);
    // Only another one now: this service is no longer its tokens' audience, and the token it has goes.
    await setAudiences(client, ['https://orders.example.com']);
    expect(await active(ours)).toBe(false);
    expect((await users()).statusCode).toBe(401);
    const refused = await form(
      app,
      '/oauth/token',
      { grant_type: 'client_credentials', audience: 'http://auth.test' },
      basic(client.client_id, client.client_secret),
    );
    expect(refused.json().error).toBe('invalid_target');
    // This service's audience listed with another takes nothing away: the token stays.
    const listed = await createClient(app, admin.accessToken, { scopes: ['users:read'] });
    const kept = (await clientToken(app, listed)).access_token;
    await setAudiences(listed, ['http://auth.test', 'https://orders.example.com']);
    expect(await active(kept)).toBe(true);
  });

  it('a creator who loses a permission (a role removed, changed or deleted) ends their clients’ tokens', async () => {
    const asAdmin = bearer(admin.accessToken);
    const introspector = await createClient(app, admin.accessToken, { scopes: ['tokens:introspect'] });
    const asIntrospector = basic(introspector.client_id, introspector.client_secret);
    const active = async (token: string) => (await introspect(app, token, asIntrospector)).active;
    const newRole = async (permissions: string[]) => {
      const name = `creator-${randomUUID().slice(0, 8)}`;
      const res = await app.inject({
        method: 'POST',
        url: '/v1/roles',
        headers: asAdmin,
        payload: { name, permissions },
      });
      expect(res.statusCode, res.body).toBe(201);
      return name;
    };
    const creator = await registerUser(app, 'creator-demoted');
    const base = await newRole(['clients:read', 'clients:write']);
    const reader = await newRole(['users:read', 'roles:read']);
    for (const role of [base, reader])
      expect(
        (await app.inject({ method: 'PUT', url: `/v1/users/${creator.id}/roles/${role}`, headers: asAdmin }))
          .statusCode,
      ).toBe(200);
    const creatorToken = (await login(app, creator.email)).session.access_token;
    const client = await createClient(app, creatorToken, {
      scopes: ['users:read', 'roles:read'],
      access_token_ttl: 86_400,
    });

    // A role that gives more ends nothing.
    const first = await clientToken(app, client);
    const widened = await app.inject({
      method: 'PATCH',
      url: `/v1/roles/${reader}`,
      headers: asAdmin,
      // `users:*` covers the `users:read` it replaces: more, not less.
      payload: { permissions: ['users:*', 'roles:read', 'profiles:read'] },
    });
    expect(widened.statusCode, widened.body).toBe(200);
    expect(await active(first.access_token)).toBe(true);

    // The role gives less: the day-long token ends; a new one carries what is left.
    const narrowed = await app.inject({
      method: 'PATCH',
      url: `/v1/roles/${reader}`,
      headers: asAdmin,
      payload: { permissions: ['roles:read'] },
    });
    expect(narrowed.statusCode, narrowed.body).toBe(200);
    expect(await active(first.access_token)).toBe(false);
    const second = await clientToken(app, client);
    expect(second.scope).toBe('roles:read');

    // The role removed from them: the same.
    const removed = await app.inject({
      method: 'DELETE',
      url: `/v1/users/${creator.id}/roles/${reader}`,
      headers: asAdmin,
    });
    expect(removed.statusCode).toBe(204);
    expect(await active(second.access_token)).toBe(false);
    await expectNoClientToken(app, client);

    // A role deleted: the same.
    expect(
      (await app.inject({ method: 'PUT', url: `/v1/users/${creator.id}/roles/${reader}`, headers: asAdmin }))
        .statusCode,
    ).toBe(200);
    const third = await clientToken(app, client);
    expect(third.scope).toBe('roles:read');
    expect(
      (await app.inject({ method: 'DELETE', url: `/v1/roles/${reader}`, headers: asAdmin })).statusCode,
    ).toBe(204);
    expect(await active(third.access_token)).toBe(false);
  });

  it('disabling or deleting a creator ends the tokens their clients already hold, as it ends their own', async () => {
    const creator = await userWith(app, ['clients:read', 'clients:write', 'users:read'], 'creator-cut');
    const client = await createClient(app, creator.accessToken, { scopes: ['users:read'] });
    expect(client.acts_for_creator).toBe(true);
    const introspector = await createClient(app, admin.accessToken, { scopes: ['tokens:introspect'] });
    const asIntrospector = basic(introspector.client_id, introspector.client_secret);
    const before = await clientToken(app, client);
    const organisations = await createClient(app, creator.accessToken, { scopes: ['users:read'] });
    await app.inject({
      method: 'PATCH',
      url: `/v1/clients/${organisations.id}`,
      headers: bearer(admin.accessToken),
      payload: { acts_for_creator: false },
    });
    const unbound = await clientToken(app, organisations);

    const disabled = await setUserStatus(app, admin.accessToken, creator.id, 'disabled');
    expect(disabled.statusCode).toBe(200);
    expect((await introspect(app, before.access_token, asIntrospector)).active).toBe(false);
    const read = await app.inject({ method: 'GET', url: '/v1/users', headers: bearer(before.access_token) });
    expect(read.statusCode).toBe(401);
    // A client made the organisation's keeps its tokens.
    expect((await introspect(app, unbound.access_token, asIntrospector)).active).toBe(true);

    // Enabled again: new tokens carry what the creator holds, and work.
    await setUserStatus(app, admin.accessToken, creator.id, 'active');
    const after = await clientToken(app, client);
    expect(after.scope).toBe('users:read');
    expect((await introspect(app, after.access_token, asIntrospector)).active).toBe(true);
    const deleted = await app.inject({
      method: 'DELETE',
      url: `/v1/users/${creator.id}`,
      headers: bearer(admin.accessToken),
    });
    expect(deleted.statusCode).toBe(204);
    expect((await introspect(app, after.access_token, asIntrospector)).active).toBe(false);
  });
});
