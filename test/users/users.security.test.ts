import type { FastifyInstance } from 'fastify';
import { eq } from 'drizzle-orm';
import { beforeAll, describe, expect, it } from 'vitest';
import { apiKeys, clients, users } from '../../src/db/schema/index.js';
import { createKey, grantRole, withKey } from '../api-keys/helpers.js';
import { ADMIN_ROUTES, AUTH_ROUTES, PROFILE_ROUTES } from '../authz/routes.js';
import { clientToken, createClient } from '../clients/helpers.js';
import { buildTestApp } from '../support/app.js';
import { authorizationMatrix, urlOf } from '../support/authz-matrix.js';
import { createAdmin, login, registerUser, type TestUser } from '../support/factories.js';
import { bearer } from '../support/http.js';

let app: FastifyInstance;
beforeAll(async () => {
  app = await buildTestApp();
});

authorizationMatrix('users, roles, audit, signing keys', () => app, ADMIN_ROUTES);
authorizationMatrix('profiles', () => app, PROFILE_ROUTES);
authorizationMatrix(
  'auth',
  () => app,
  AUTH_ROUTES,
  async (a, owner) => {
    const second = await login(a, owner.email, owner.password);
    const sessions = await a.inject({
      method: 'GET',
      url: '/v1/auth/sessions',
      headers: bearer(second.session.access_token),
    });
    return { sessionId: (sessions.json().data as Array<{ id: string }>)[0]!.id };
  },
);

describe('a plain user on the administration surface', () => {
  it('gets 403 on every administration route', async () => {
    const user = await registerUser(app, 'plain');
    const ctx = { owner: user, fixtures: {} };
    for (const route of ADMIN_ROUTES) {
      const res = await app.inject({
        method: route.method,
        url: urlOf(route, ctx),
        headers: bearer(user.accessToken),
        payload: route.body?.(ctx),
      });
      expect(res.statusCode, `${route.method} ${route.route}`).toBe(403);
    }
  });

  it('leaves an audit event for every authorization failure', async () => {
    const user = await registerUser(app, 'denied');
    const res = await app.inject({
      method: 'GET',
      url: '/v1/audit-events',
      headers: bearer(user.accessToken),
    });
    expect(res.statusCode).toBe(403);
    const events = await app.services.audit.list({
      type: 'authorization.denied',
      actorId: user.id,
      limit: 10,
    });
    expect(events).toHaveLength(1);
    expect(events[0]).toMatchObject({
      outcome: 'failure',
      actorType: 'user',
      data: { permission: 'audit:read', route: '/v1/audit-events', method: 'GET' },
    });
  });
});

describe('the grant ceiling: what the caller holds now, not what their token said', () => {
  let admin: TestUser;
  beforeAll(async () => {
    admin = await createAdmin(app);
  });
  const deniedOf = async (actorId: string) =>
    app.services.audit.list({ type: 'authorization.denied', actorId, limit: 10 });
  const rolesOf = async (userId: string) =>
    (await app.services.repos.users.rolesAndPermissions(userId)).roles;

  /** A fresh role with these permissions, granted to a fresh user, whose token then carries them. */
  async function holderOf(permissions: string[], tag: string) {
    const role = `${tag}-${Date.now().toString(36)}${Math.random().toString(36).slice(2, 6)}`;
    const created = await app.inject({
      method: 'POST',
      url: '/v1/roles',
      headers: bearer(admin.accessToken),
      payload: { name: role, permissions },
    });
    expect(created.statusCode, created.body).toBe(201);
    const user = await registerUser(app, tag);
    const granted = await app.inject({
      method: 'PUT',
      url: `/v1/users/${user.id}/roles/${role}`,
      headers: bearer(admin.accessToken),
    });
    expect(granted.statusCode, granted.body).toBe(200);
    const token = (await login(app, user.email)).session.access_token;
    return { user, role, token };
  }

  it('a user whose role was removed cannot grant it back to themself with their old token (403, audited)', async () => {
    const { user, role, token } = await holderOf(['roles:assign', 'users:read'], 'assigner');
    const removed = await app.inject({
      method: 'DELETE',
      url: `/v1/users/${user.id}/roles/${role}`,
      headers: bearer(admin.accessToken),
    });
    expect(removed.statusCode).toBe(204);

    // A plain read with the still-valid token keeps the token's permissions until it expires.
    const read = await app.inject({ method: 'GET', url: `/v1/users/${user.id}`, headers: bearer(token) });
    expect(read.statusCode).toBe(200);
    const regrant = await app.inject({
      method: 'PUT',
      url: `/v1/users/${user.id}/roles/${role}`,
      headers: bearer(token),
    });
    expect(regrant.statusCode, regrant.body).toBe(403);
    expect(regrant.json()).toMatchObject({ code: 'forbidden' });
    expect(regrant.json().detail).toContain('roles:assign');
    expect(await rolesOf(user.id)).not.toContain(role);

    expect(regrant.json().detail).toContain('taken away');
    // Refused before the handler, on what the user holds now: once, with the ids the path named.
    const denied = await deniedOf(user.id);
    expect(denied).toHaveLength(1);
    expect(denied[0]).toMatchObject({
      outcome: 'failure',
      actorType: 'user',
      data: {
        permission: 'roles:assign',
        reason: 'no_longer_held',
        method: 'PUT',
        route: '/v1/users/:id/roles/:role',
        params: { id: user.id, role },
      },
    });
    expect(await app.services.audit.list({ type: 'role.granted', actorId: user.id, limit: 10 })).toEqual([]);
  });

  it('a demoted administrator’s old token still reads and ends its own sessions, and changes nothing of anyone’s', async () => {
    const exAdmin = await createAdmin(app);
    const victim = await registerUser(app, 'victim-of-ex-admin');
    const second = await login(app, exAdmin.email, exAdmin.password);
    for (const role of ['admin', 'user']) await app.services.repos.users.removeRole(exAdmin.id, role);

    // Reads are decided on the token (it says `*` until it expires)...
    const read = await app.inject({
      method: 'GET',
      url: `/v1/users/${victim.id}`,
      headers: bearer(exAdmin.accessToken),
    });
    expect(read.statusCode).toBe(200);
    // ...changes on what is held now: nothing.
    const disable = await app.inject({
      method: 'PATCH',
      url: `/v1/users/${victim.id}`,
      headers: bearer(exAdmin.accessToken),
      payload: { status: 'disabled' },
    });
    expect(disable.statusCode, disable.body).toBe(403);
    expect((await app.services.repos.users.findById(victim.id))?.status).toBe('active');
    // Ending one's own access is never refused for a permission taken away.
    const sessions = await app.inject({
      method: 'GET',
      url: '/v1/auth/sessions',
      headers: bearer(exAdmin.accessToken),
    });
    const other = (sessions.json().data as Array<{ id: string; current: boolean }>).find((x) => !x.current)!;
    const ended = await app.inject({
      method: 'DELETE',
      url: `/v1/auth/sessions/${other.id}`,
      headers: bearer(exAdmin.accessToken),
    });
    expect(ended.statusCode, ended.body).toBe(204);
    const refreshed = await app.inject({
      method: 'POST',
      url: '/v1/auth/refresh',
      payload: { refresh_token: second.session.refresh_token },
    });
    expect(refreshed.statusCode).toBe(401);
    const logout = await app.inject({
      method: 'POST',
      url: '/v1/auth/logout',
      headers: bearer(exAdmin.accessToken),
    });
    expect(logout.statusCode, logout.body).toBe(204);
  });

  it('a demoted role manager’s old token manages no roles: no removal, creation, change or deletion', async () => {
    const { user, role, token } = await holderOf(['roles:assign', 'roles:write', 'roles:read'], 'manager');
    const victim = await registerUser(app, 'victim');
    const spare = `spare-${Date.now().toString(36)}`;
    expect(
      (
        await app.inject({
          method: 'POST',
          url: '/v1/roles',
          headers: bearer(admin.accessToken),
          payload: { name: spare, description: 'as it was', permissions: ['account:read'] },
        })
      ).statusCode,
    ).toBe(201);
    const removed = await app.inject({
      method: 'DELETE',
      url: `/v1/users/${user.id}/roles/${role}`,
      headers: bearer(admin.accessToken),
    });
    expect(removed.statusCode).toBe(204);

    // Each change is about permissions the demoted user still holds (account:read as a user): only
    // the management permission they lost refuses it.
    const attempts = [
      { method: 'DELETE' as const, url: `/v1/users/${victim.id}/roles/user` },
      {
        method: 'POST' as const,
        url: '/v1/roles',
        payload: { name: `${spare}-2`, permissions: ['account:read'] },
      },
      { method: 'PATCH' as const, url: `/v1/roles/${spare}`, payload: { description: 'changed' } },
      { method: 'DELETE' as const, url: `/v1/roles/${spare}` },
    ];
    for (const attempt of attempts) {
      const res = await app.inject({ ...attempt, headers: bearer(token) });
      expect(res.statusCode, `${attempt.method} ${attempt.url}: ${res.body}`).toBe(403);
    }
    expect(await rolesOf(victim.id)).toContain('user');
    const roles = await app.inject({
      method: 'GET',
      url: `/v1/roles/${spare}`,
      headers: bearer(admin.accessToken),
    });
    expect(roles.json().description).toBe('as it was');
    expect(
      (await app.inject({ method: 'GET', url: `/v1/roles/${spare}-2`, headers: bearer(admin.accessToken) }))
        .statusCode,
    ).toBe(404);
    expect(await deniedOf(user.id)).toHaveLength(attempts.length);
  });

  it('a disabled caller holds nothing: their still-cached token grants no role (401, it no longer stands)', async () => {
    const { user, role, token } = await holderOf(['roles:assign', 'users:read'], 'assigner-off');
    const target = await registerUser(app, 'target');
    // Disabled in the database alone, as another instance would have done it before this one hears.
    await app.services.repos.users.changeStatus(user.id, 'disabled');
    const grant = await app.inject({
      method: 'PUT',
      url: `/v1/users/${target.id}/roles/${role}`,
      headers: bearer(token),
    });
    expect(grant.statusCode, grant.body).toBe(401);
    expect(grant.json()).toMatchObject({ code: 'invalid_token' });
    expect(await rolesOf(target.id)).not.toContain(role);
  });

  it('changes what the user role gives only for an administrator: it gives it to every account', async () => {
    const { token } = await holderOf(['roles:read', 'roles:write', 'users:read'], 'usermod');
    const before = (await app.services.repos.roles.find('user'))!.permissions;
    const widen = await app.inject({
      method: 'PATCH',
      url: '/v1/roles/user',
      headers: bearer(token),
      payload: { permissions: [...before, 'roles:read'] },
    });
    expect(widen.statusCode, widen.body).toBe(403);
    expect(widen.json().detail).toContain('every account');
    expect((await app.services.repos.roles.find('user'))!.permissions).toEqual(before);
    // An administrator may (the same permissions here: the shared database keeps its user role).
    const same = await app.inject({
      method: 'PATCH',
      url: '/v1/roles/user',
      headers: bearer(admin.accessToken),
      payload: { permissions: before },
    });
    expect(same.statusCode, same.body).toBe(200);
  });

  it('refuses and audits role changes beyond what the caller holds now, and changes nothing', async () => {
    const { user, role, token } = await holderOf(['roles:read', 'roles:write', 'users:read'], 'rolemgr');
    // Still held: allowed.
    const ok = await app.inject({
      method: 'POST',
      url: '/v1/roles',
      headers: bearer(token),
      payload: { name: `${role}-a`, permissions: ['users:read'] },
    });
    expect(ok.statusCode, ok.body).toBe(201);
    // users:read taken from the role: the old token still says users:read.
    const narrowed = await app.inject({
      method: 'PATCH',
      url: `/v1/roles/${role}`,
      headers: bearer(admin.accessToken),
      payload: { permissions: ['roles:read', 'roles:write'] },
    });
    expect(narrowed.statusCode).toBe(200);
    const create = await app.inject({
      method: 'POST',
      url: '/v1/roles',
      headers: bearer(token),
      payload: { name: `${role}-b`, permissions: ['users:read'] },
    });
    expect(create.statusCode, create.body).toBe(403);
    const patch = await app.inject({
      method: 'PATCH',
      url: `/v1/roles/${role}-a`,
      headers: bearer(token),
      payload: { permissions: [] },
    });
    expect(patch.statusCode, patch.body).toBe(403);
    const remove = await app.inject({ method: 'DELETE', url: `/v1/roles/${role}-a`, headers: bearer(token) });
    expect(remove.statusCode, remove.body).toBe(403);

    expect((await app.services.repos.roles.find(`${role}-b`)) ?? null).toBeNull();
    expect((await app.services.repos.roles.find(`${role}-a`))?.permissions).toEqual(['users:read']);
    const denied = await deniedOf(user.id);
    expect(denied.map((e) => e.data)).toEqual([
      expect.objectContaining({ action: 'role.delete', missing: ['users:read'] }),
      expect.objectContaining({ action: 'role.update', missing: ['users:read'] }),
      expect.objectContaining({ action: 'role.create', missing: ['users:read'] }),
    ]);
    expect(denied.map((e) => e.subjectId)).toEqual([`${role}-a`, `${role}-a`, `${role}-b`]);
  });
});

describe('acting on a user who holds more than the caller', () => {
  let admin: TestUser;
  beforeAll(async () => {
    admin = await createAdmin(app);
  });

  it('a user manager takes no role from someone holding what they do not, not even one they hold (403, audited under the target)', async () => {
    const manager = await registerUser(app, 'strip-manager');
    const managerRole = await grantRole(app, manager.id, [
      'users:read',
      'users:write',
      'roles:assign',
      'roles:read',
    ]);
    const token = (await login(app, manager.email)).session.access_token;
    const auditor = await registerUser(app, 'strip-auditor');
    await grantRole(app, auditor.id, ['audit:read']);
    const shared = await app.inject({
      method: 'PUT',
      url: `/v1/users/${auditor.id}/roles/${managerRole}`,
      headers: bearer(admin.accessToken),
    });
    expect(shared.statusCode).toBe(200);
    for (const role of [managerRole, 'user']) {
      const removed = await app.inject({
        method: 'DELETE',
        url: `/v1/users/${auditor.id}/roles/${role}`,
        headers: bearer(token),
      });
      expect(removed.statusCode, `${role}: ${removed.body}`).toBe(403);
      expect(removed.json().detail).toContain('audit:read');
    }
    const { roles } = await app.services.repos.users.rolesAndPermissions(auditor.id);
    expect(roles).toEqual(expect.arrayContaining([managerRole, 'user']));
    const denied = await app.services.audit.list({
      type: 'authorization.denied',
      subjectId: auditor.id,
      limit: 10,
    });
    expect(denied.map((e) => e.data)).toEqual([
      expect.objectContaining({ action: 'role.remove', role: 'user', missing: ['audit:read'] }),
      expect.objectContaining({ action: 'role.remove', role: managerRole, missing: ['audit:read'] }),
    ]);
    // One who holds no more than the manager loses the role.
    const peer = await registerUser(app, 'strip-peer');
    await app.inject({
      method: 'PUT',
      url: `/v1/users/${peer.id}/roles/${managerRole}`,
      headers: bearer(admin.accessToken),
    });
    const taken = await app.inject({
      method: 'DELETE',
      url: `/v1/users/${peer.id}/roles/${managerRole}`,
      headers: bearer(token),
    });
    expect(taken.statusCode, taken.body).toBe(204);
  });

  it('nor by deleting or narrowing the role: that takes it from every holder (403 while one holds more, audited)', async () => {
    const manager = await registerUser(app, 'strip-role-manager');
    await grantRole(app, manager.id, ['roles:read', 'roles:write', 'roles:assign', 'users:read']);
    const token = (await login(app, manager.email)).session.access_token;
    const asManager = bearer(token);
    const helper = `strip-helper-${Date.now().toString(36)}`;
    const created = await app.inject({
      method: 'POST',
      url: '/v1/roles',
      headers: asManager,
      payload: { name: helper, permissions: ['users:read', 'roles:read'] },
    });
    expect(created.statusCode, created.body).toBe(201);
    const grant = await app.inject({
      method: 'PUT',
      url: `/v1/users/${admin.id}/roles/${helper}`,
      headers: asManager,
    });
    expect(grant.statusCode, grant.body).toBe(200);
    const narrowed = await app.inject({
      method: 'PATCH',
      url: `/v1/roles/${helper}`,
      headers: asManager,
      payload: { permissions: ['users:read'] },
    });
    expect(narrowed.statusCode, narrowed.body).toBe(403);
    expect(narrowed.json().detail).toContain('*');
    const deleted = await app.inject({ method: 'DELETE', url: `/v1/roles/${helper}`, headers: asManager });
    expect(deleted.statusCode, deleted.body).toBe(403);
    expect((await app.services.repos.users.rolesAndPermissions(admin.id)).roles).toContain(helper);
    expect(await app.services.roles.get(helper)).toMatchObject({
      permissions: ['roles:read', 'users:read'],
    });
    const denied = await app.services.audit.list({
      type: 'authorization.denied',
      subjectId: helper,
      limit: 10,
    });
    expect(denied.map((e) => (e.data as { action: string }).action).sort()).toEqual([
      'role.delete',
      'role.update',
    ]);
    // Widening takes nothing from anyone: it needs only what it adds, whoever holds the role.
    const widened = await app.inject({
      method: 'PATCH',
      url: `/v1/roles/${helper}`,
      headers: asManager,
      payload: { permissions: ['users:read', 'roles:read', 'roles:assign'] },
    });
    expect(widened.statusCode, widened.body).toBe(200);
    // Once the holders hold no more than the caller, narrowing and deleting go through.
    await app.services.repos.users.removeRole(admin.id, helper);
    const narrowedNow = await app.inject({
      method: 'PATCH',
      url: `/v1/roles/${helper}`,
      headers: asManager,
      payload: { permissions: ['users:read'] },
    });
    expect(narrowedNow.statusCode, narrowedNow.body).toBe(200);
    const deletedNow = await app.inject({
      method: 'DELETE',
      url: `/v1/roles/${helper}`,
      headers: asManager,
    });
    expect(deletedNow.statusCode, deletedNow.body).toBe(204);
  });

  it('a PATCH that would change nothing is still refused to who may not act on the user, and the refusal names them', async () => {
    const manager = await registerUser(app, 'noop-manager');
    await grantRole(app, manager.id, ['users:write']);
    const token = (await login(app, manager.email)).session.access_token;
    const res = await app.inject({
      method: 'PATCH',
      url: `/v1/users/${admin.id}`,
      headers: bearer(token),
      payload: { status: 'active' },
    });
    expect(res.statusCode, res.body).toBe(403);
    expect(res.body).not.toContain(admin.email);
    const denied = await app.services.audit.list({
      type: 'authorization.denied',
      subjectId: admin.id,
      actorId: manager.id,
      limit: 10,
    });
    expect(denied).toHaveLength(1);
    expect(denied[0]!.data).toMatchObject({
      route: '/v1/users/:id',
      method: 'PATCH',
      params: { id: admin.id },
    });
    // The route's own permission check names the user too.
    const read = await app.inject({ method: 'GET', url: `/v1/users/${admin.id}`, headers: bearer(token) });
    expect(read.statusCode).toBe(403);
    const byRoute = await app.services.audit.list({
      type: 'authorization.denied',
      subjectId: admin.id,
      actorId: manager.id,
      limit: 10,
    });
    expect(byRoute[0]!.data).toMatchObject({ permission: 'users:read', params: { id: admin.id } });
    // Only a user's path names a user: an id put where a role, a client or a key goes writes nothing
    // into that user's history (the path's ids stay in the event's data).
    const before = byRoute.length;
    for (const url of [`/v1/roles/${admin.id}`, `/v1/clients/${admin.id}`])
      expect((await app.inject({ method: 'DELETE', url, headers: bearer(token) })).statusCode, url).toBe(403);
    const after = await app.services.audit.list({
      type: 'authorization.denied',
      subjectId: admin.id,
      actorId: manager.id,
      limit: 10,
    });
    expect(after).toHaveLength(before);
  });
});

describe('a credential that stopped standing before its notification arrived', () => {
  // The row is changed directly, with no event: what another instance sees in the moment between a
  // revocation's commit and its notification. Reads may still go by the cached credential; a change
  // re-reads it, and a dead credential is a 401 (as it is everywhere once the news arrives), not a
  // 403 that sends the caller off to ask for a role.
  const expectInvalidToken = (res: {
    statusCode: number;
    body: string;
    headers: Record<string, unknown>;
  }) => {
    expect(res.statusCode, res.body).toBe(401);
    expect(JSON.parse(res.body)).toMatchObject({ code: 'invalid_token' });
    expect(res.headers['www-authenticate']).toMatch(/error="invalid_token"/);
  };

  it('a disabled user’s token, a revoked API key and a disabled client’s token change nothing: 401', async () => {
    const admin = await createAdmin(app);
    const user = await registerUser(app, 'standing');
    const key = await createKey(app, user.accessToken, { scopes: ['api_keys:own'] });
    const client = await createClient(app, admin.accessToken, { scopes: ['users:write'] });
    const service = await clientToken(app, client);
    const target = await registerUser(app, 'standing-target');

    // Each works before.
    const keyCreates = () =>
      app.inject({
        method: 'POST',
        url: '/v1/api-keys',
        headers: withKey(key.key),
        payload: { name: 'k', scopes: [] },
      });
    expect((await keyCreates()).statusCode).toBe(201);

    await app.services.db.update(apiKeys).set({ revokedAt: new Date() }).where(eq(apiKeys.id, key.id));
    expectInvalidToken(await keyCreates());

    await app.services.db.update(users).set({ status: 'disabled' }).where(eq(users.id, user.id));
    expectInvalidToken(
      await app.inject({
        method: 'PATCH',
        url: '/v1/profiles/me',
        headers: bearer(user.accessToken),
        payload: { display_name: 'still here' },
      }),
    );

    await app.services.db.update(clients).set({ status: 'disabled' }).where(eq(clients.id, client.id));
    expectInvalidToken(
      await app.inject({
        method: 'PATCH',
        url: `/v1/users/${target.id}`,
        headers: bearer(service.access_token),
        payload: { status: 'disabled' },
      }),
    );
    expect((await app.services.repos.users.findById(target.id))?.status).toBe('active');
    // The key made before the revocation and the revoked key itself, nothing after.
    expect(await app.services.db.select().from(apiKeys).where(eq(apiKeys.ownerId, user.id))).toHaveLength(2);
  });
});

describe('administrators changing each other at the same moment', () => {
  // Each one's check of what the other holds waits for the other's change, which waits for it: one
  // is ended by PostgreSQL as a deadlock, and runs again (it was a 503).
  it('two disabling each other: never a 5xx, whatever the order', async () => {
    const statuses: number[] = [];
    for (let round = 0; round < 16; round++) {
      const [a, b] = [await createAdmin(app), await createAdmin(app)];
      const disable = (caller: TestUser, target: TestUser) =>
        app.inject({
          method: 'PATCH',
          url: `/v1/users/${target.id}`,
          headers: bearer(caller.accessToken),
          payload: { status: 'disabled' },
        });
      const answers = await Promise.all([disable(a, b), disable(b, a)]);
      statuses.push(...answers.map((r) => r.statusCode));
      expect(
        answers.some((r) => r.statusCode === 200),
        answers.map((r) => r.body).join('\n'),
      ).toBe(true);
    }
    expect(statuses.filter((s) => s >= 500)).toEqual([]);
  });
});

describe('granting a role is no way to read a user’s roles', () => {
  // Reading a user's roles and permissions needs users:read (GET /v1/users/{id}/roles); granting one
  // needs roles:assign. A grant the user already has changes nothing and writes no event, so an
  // answer carrying the user's roles let a holder of roles:assign alone read anyone's, unseen.
  it('answers 204 to a caller without users:read, and the roles to one with it', async () => {
    const admin = await createAdmin(app);
    const assigner = await registerUser(app, 'assign-only');
    await grantRole(app, assigner.id, ['roles:assign']);
    const token = (await login(app, assigner.email)).session.access_token;
    const read = await app.inject({
      method: 'GET',
      url: `/v1/users/${admin.id}/roles`,
      headers: bearer(token),
    });
    expect(read.statusCode).toBe(403);

    // The `user` role: every account holds it, and it gives only what every account holds.
    const granted = await app.inject({
      method: 'PUT',
      url: `/v1/users/${admin.id}/roles/user`,
      headers: bearer(token),
    });
    expect(granted.statusCode, granted.body).toBe(204);
    expect(granted.body).toBe('');
    expect(granted.body).not.toContain('admin');

    const reader = await registerUser(app, 'assign-and-read');
    await grantRole(app, reader.id, ['roles:assign', 'users:read']);
    const readerToken = (await login(app, reader.email)).session.access_token;
    const answered = await app.inject({
      method: 'PUT',
      url: `/v1/users/${admin.id}/roles/user`,
      headers: bearer(readerToken),
    });
    expect(answered.statusCode, answered.body).toBe(200);
    expect(answered.json()).toEqual({
      roles: ['admin', 'user'],
      permissions: ['*', 'account:read', 'account:write', 'api_keys:own'],
    });
  });
});
