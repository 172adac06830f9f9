import { randomUUID } from 'node:crypto';
import type { FastifyInstance } from 'fastify';
import { decodeJwt } from 'jose';
import type { InjectOptions } from 'light-my-request';
import pg from 'pg';
import { beforeAll, describe, expect, inject, it, vi } from 'vitest';
import { users } from '../../src/db/schema/index.js';
import { atTime } from '../support/clock.js';
import { buildTestApp } from '../support/app.js';
import {
  createAdmin,
  login,
  PASSWORD,
  registerUser,
  setUserStatus,
  type TestUser,
} from '../support/factories.js';
import { allPages, bearer } from '../support/http.js';
import { clientToken, createClient, userWith } from '../clients/helpers.js';
import { createKey, withKey } from '../api-keys/helpers.js';

describe('users and roles administration', () => {
  let app: FastifyInstance;
  let admin: TestUser;
  beforeAll(async () => {
    app = await buildTestApp();
    admin = await createAdmin(app);
  });
  const asAdmin = () => bearer(admin.accessToken);
  /** The newest audit events of a type, through the API as an administrator reads them. */
  const auditEventsOf = async (type: string) =>
    (
      await app.inject({ method: 'GET', url: `/v1/audit-events?type=${type}&limit=200`, headers: asAdmin() })
    ).json().data as Array<{ subject_id: string; outcome: string; data: Record<string, unknown> }>;

  it('creates a role, grants it, and the user can list users after refreshing — and not after it is removed', async () => {
    const roleName = `reader-${Date.now().toString(36)}`;
    const created = await app.inject({
      method: 'POST',
      url: '/v1/roles',
      headers: asAdmin(),
      payload: { name: roleName, description: 'Reads users', permissions: ['users:read'] },
    });
    expect(created.statusCode, created.body).toBe(201);
    expect(created.json()).toMatchObject({ name: roleName, permissions: ['users:read'], builtin: false });

    const user = await registerUser(app, 'reader');
    expect(
      (await app.inject({ method: 'GET', url: '/v1/users', headers: bearer(user.accessToken) })).statusCode,
    ).toBe(403);

    const grant = await app.inject({
      method: 'PUT',
      url: `/v1/users/${user.id}/roles/${roleName}`,
      headers: asAdmin(),
    });
    expect(grant.statusCode).toBe(200);
    expect(grant.json().roles).toEqual(expect.arrayContaining(['user', roleName]));
    const again = await app.inject({
      method: 'PUT',
      url: `/v1/users/${user.id}/roles/${roleName}`,
      headers: asAdmin(),
    });
    expect(again.statusCode).toBe(200); // idempotent

    const refreshed = await app.inject({
      method: 'POST',
      url: '/v1/auth/refresh',
      payload: { refresh_token: user.refreshToken },
    });
    const session = refreshed.json().session;
    const list = await app.inject({
      method: 'GET',
      url: '/v1/users?limit=5',
      headers: bearer(session.access_token),
    });
    expect(list.statusCode).toBe(200);
    expect(list.json().data.length).toBeGreaterThan(0);

    const removed = await app.inject({
      method: 'DELETE',
      url: `/v1/users/${user.id}/roles/${roleName}`,
      headers: asAdmin(),
    });
    expect(removed.statusCode).toBe(204);
    const refreshed2 = await app.inject({
      method: 'POST',
      url: '/v1/auth/refresh',
      payload: { refresh_token: session.refresh_token },
    });
    const denied = await app.inject({
      method: 'GET',
      url: '/v1/users',
      headers: bearer(refreshed2.json().session.access_token),
    });
    expect(denied.statusCode).toBe(403);

    const events = await auditEventsOf('role.granted');
    expect(events.some((e) => e.subject_id === user.id && e.data.role === roleName)).toBe(true);
    const removals = await auditEventsOf('role.removed');
    expect(removals.some((e) => e.subject_id === user.id)).toBe(true);
  });

  it('lists users with search and cursor pagination', async () => {
    const tag = `page${Date.now().toString(36)}`;
    const made = [];
    for (let i = 0; i < 3; i++) made.push(await registerUser(app, tag));
    const first = await app.inject({
      method: 'GET',
      url: `/v1/users?query=${tag}&limit=2`,
      headers: asAdmin(),
    });
    expect(first.statusCode).toBe(200);
    expect(first.json().data).toHaveLength(2);
    expect(first.json().next_cursor).toBeTruthy();
    const second = await app.inject({
      method: 'GET',
      url: `/v1/users?query=${tag}&limit=2&cursor=${first.json().next_cursor}`,
      headers: asAdmin(),
    });
    expect(second.json().data).toHaveLength(1);
    expect(second.json().next_cursor).toBeNull();
    const ids = [...first.json().data, ...second.json().data].map((u: { id: string }) => u.id).sort();
    expect(ids).toEqual(made.map((u) => u.id).sort());
    const bad = await app.inject({ method: 'GET', url: '/v1/users?cursor=garbage!!', headers: asAdmin() });
    expect(bad.statusCode).toBe(400);
    const tooMany = await app.inject({ method: 'GET', url: '/v1/users?limit=500', headers: asAdmin() });
    expect(tooMany.statusCode).toBe(400);
  });

  it('searches emails for the text as written: % and _ are not wildcards', async () => {
    const tag = Date.now().toString(36);
    const register = async (local: string) => {
      const res = await app.inject({
        method: 'POST',
        url: '/v1/auth/register',
        payload: { email: `${local}@example.test`, password: 'correct horse battery staple' },
      });
      expect(res.statusCode, res.body).toBe(201);
      return res.json().user.id as string;
    };
    const dash = await register(`wild-${tag}`);
    const underscore = await register(`wild_${tag}`);
    const search = async (text: string) =>
      (
        await app.inject({
          method: 'GET',
          url: `/v1/users?query=${encodeURIComponent(text)}`,
          headers: asAdmin(),
        })
      )
        .json()
        .data.map((u: { id: string }) => u.id);
    expect(await search(`wild_${tag}`)).toEqual([underscore]);
    expect(await search(`wild-${tag}`)).toEqual([dash]);
    expect(await search(`wild%${tag}`)).toEqual([]);
  });

  it('disables a user: sessions end, tokens stop at once, login refused; enabling lets them back in', async () => {
    const user = await registerUser(app, 'disable');
    const res = await app.inject({
      method: 'PATCH',
      url: `/v1/users/${user.id}`,
      headers: asAdmin(),
      payload: { status: 'disabled' },
    });
    expect(res.statusCode).toBe(200);
    expect(res.json().status).toBe('disabled');
    expect(
      (await app.inject({ method: 'GET', url: '/v1/auth/me', headers: bearer(user.accessToken) })).statusCode,
    ).toBe(401);
    expect(
      (
        await app.inject({
          method: 'POST',
          url: '/v1/auth/refresh',
          payload: { refresh_token: user.refreshToken },
        })
      ).statusCode,
    ).toBe(401);
    const refused = await app.inject({
      method: 'POST',
      url: '/v1/auth/login',
      payload: { email: user.email, password: PASSWORD },
    });
    expect(refused.statusCode).toBe(401);
    const audit = await auditEventsOf('user.disabled');
    expect(audit.some((e) => e.subject_id === user.id)).toBe(true);
    const failed = await auditEventsOf('auth.login');
    expect(failed.some((e) => e.subject_id === user.id && e.outcome === 'failure')).toBe(true);

    // A second after the disable, a re-enabled user's new tokens are not caught by the old revocation.
    await atTime(app, new Date(Date.now() + 2000), async () => {
      const enable = await app.inject({
        method: 'PATCH',
        url: `/v1/users/${user.id}`,
        headers: asAdmin(),
        payload: { status: 'active' },
      });
      expect(enable.statusCode).toBe(200);
      const back = await login(app, user.email);
      expect(
        (await app.inject({ method: 'GET', url: '/v1/auth/me', headers: bearer(back.session.access_token) }))
          .statusCode,
      ).toBe(200);
    });
  });

  it('answers what happened to one user: the audit log by subject_id and outcome, newest first, page by page', async () => {
    const user = await registerUser(app, 'audit-subject');
    const wrong = await app.inject({
      method: 'POST',
      url: '/v1/auth/login',
      payload: { email: user.email, password: 'not the password at all' },
    });
    expect(wrong.statusCode).toBe(401);
    await login(app, user.email);
    for (const status of ['disabled', 'active'] as const) {
      const res = await setUserStatus(app, admin.accessToken, user.id, status);
      expect(res.statusCode).toBe(200);
    }
    type Event = { type: string; outcome: string; subject_id: string; created_at: string };
    const about = await allPages<Event>(app, `/v1/audit-events?subject_id=${user.id}`, asAdmin());
    expect(about.every((e) => e.subject_id === user.id)).toBe(true);
    expect(about.map((e) => e.type)).toEqual([
      'user.enabled',
      'user.disabled',
      'auth.login',
      'auth.login',
      'user.registered',
    ]);
    const sorted = [...about].sort((a, b) => b.created_at.localeCompare(a.created_at));
    expect(about.map((e) => e.created_at)).toEqual(sorted.map((e) => e.created_at));
    // Two pages of two and one, through the cursor.
    const first = await app.inject({
      method: 'GET',
      url: `/v1/audit-events?subject_id=${user.id}&limit=2`,
      headers: asAdmin(),
    });
    expect(first.json().data).toHaveLength(2);
    expect(first.json().next_cursor).toEqual(expect.any(String));
    const failures = await allPages<Event>(
      app,
      `/v1/audit-events?subject_id=${user.id}&outcome=failure`,
      asAdmin(),
    );
    expect(failures.map((e) => e.type)).toEqual(['auth.login']);
    const bad = await app.inject({
      method: 'GET',
      url: '/v1/audit-events?outcome=maybe',
      headers: asAdmin(),
    });
    expect(bad.statusCode).toBe(400);
  });

  it('since= is at or after the instant to the last digit sent: a fraction past the millisecond is not rounded down', async () => {
    const user = await registerUser(app, 'audit-since');
    type Event = { type: string; created_at: string };
    const [registered] = await allPages<Event>(app, `/v1/audit-events?subject_id=${user.id}`, asAdmin());
    expect(registered?.type).toBe('user.registered');
    const at = registered?.created_at ?? '';
    const since = async (instant: string) =>
      (
        await allPages<Event>(
          app,
          `/v1/audit-events?subject_id=${user.id}&since=${encodeURIComponent(instant)}`,
          asAdmin(),
        )
      ).map((e) => e.type);
    // The event's own millisecond, written with more digits: still at or after.
    expect(await since(at.replace('Z', '0000Z'))).toEqual(['user.registered']);
    // A tenth of a millisecond later: the event is before it.
    expect(await since(at.replace('Z', '1Z'))).toEqual([]);
    expect(await since(at.replace('Z', '9999Z'))).toEqual([]);
  });

  it('users whose ids are not RFC 9562 UUIDs (imported into Supabase with their own) are addressed and paged through', async () => {
    // Version nibble 0 and variant c: a uuid to PostgreSQL, not a version 1–8 UUID to RFC 9562.
    const legacyId = () => {
      const u = randomUUID().split('');
      u[14] = '0';
      u[19] = 'c';
      return u.join('');
    };
    const tag = `legacy-${randomUUID().slice(0, 8)}`;
    const ids = [legacyId(), legacyId()];
    await app.services.db.insert(users).values(
      ids.map((id, i) => ({
        id,
        email: `${tag}-${i}@example.test`,
        provider: 'local' as const,
        createdAt: new Date('2026-11-01T00:00:00Z'),
      })),
    );
    const one = await app.inject({
      method: 'GET',
      url: `/v1/users/${ids[0]?.toUpperCase()}`,
      headers: asAdmin(),
    });
    expect(one.statusCode, one.body).toBe(200);
    expect(one.json().id).toBe(ids[0]);
    // A page of one ends on a legacy id: the next_cursor naming it takes the walk on.
    const first = await app.inject({
      method: 'GET',
      url: `/v1/users?query=${tag}&limit=1`,
      headers: asAdmin(),
    });
    expect(first.statusCode, first.body).toBe(200);
    const cursor = first.json().next_cursor as string;
    expect(cursor).toEqual(expect.any(String));
    const second = await app.inject({
      method: 'GET',
      url: `/v1/users?query=${tag}&limit=1&cursor=${encodeURIComponent(cursor)}`,
      headers: asAdmin(),
    });
    expect(second.statusCode, second.body).toBe(200);
    expect([...first.json().data, ...second.json().data].map((u: { id: string }) => u.id).sort()).toEqual(
      [...ids].sort(),
    );
  });

  it('audit events name the credential that acted: the session of a token, or the API key', async () => {
    const user = await registerUser(app, 'credential');
    const sessionId = decodeJwt(admin.accessToken).sid;
    expect(sessionId).toEqual(expect.any(String));
    expect((await setUserStatus(app, admin.accessToken, user.id, 'disabled')).statusCode).toBe(200);
    const key = await createKey(app, admin.accessToken, {
      scopes: ['users:write', 'account:read', 'account:write', 'api_keys:own'],
    });
    const enabled = await app.inject({
      method: 'PATCH',
      url: `/v1/users/${user.id}`,
      headers: withKey(key.key),
      payload: { status: 'active' },
    });
    expect(enabled.statusCode, enabled.body).toBe(200);

    type Event = { type: string; actor_type: string; actor_id: string; credential_id: string | null };
    const about = await allPages<Event>(app, `/v1/audit-events?subject_id=${user.id}`, asAdmin());
    expect(about.find((e) => e.type === 'user.disabled')).toMatchObject({
      actor_type: 'user',
      actor_id: admin.id,
      credential_id: sessionId,
    });
    expect(about.find((e) => e.type === 'user.enabled')).toMatchObject({
      actor_type: 'api_key',
      actor_id: admin.id,
      credential_id: key.id,
    });
    // Sign-up happens before any credential.
    expect(about.find((e) => e.type === 'user.registered')).toMatchObject({ credential_id: null });
    const byKey = await allPages<Event>(
      app,
      `/v1/audit-events?actor_id=${admin.id}&credential_id=${key.id}`,
      asAdmin(),
    );
    expect(byKey.map((e) => e.type)).toEqual(['user.enabled']);
  });

  it('deletes a user with their profile, sessions and roles; the audit log keeps the event', async () => {
    const user = await registerUser(app, 'delete');
    const del = await app.inject({ method: 'DELETE', url: `/v1/users/${user.id}`, headers: asAdmin() });
    expect(del.statusCode).toBe(204);
    expect(
      (await app.inject({ method: 'GET', url: `/v1/users/${user.id}`, headers: asAdmin() })).statusCode,
    ).toBe(404);
    expect(
      (await app.inject({ method: 'GET', url: `/v1/profiles/${user.id}`, headers: asAdmin() })).statusCode,
    ).toBe(404);
    expect(
      (await app.inject({ method: 'GET', url: '/v1/auth/me', headers: bearer(user.accessToken) })).statusCode,
    ).toBe(401);
    expect(await app.services.repos.users.rolesAndPermissions(user.id)).toEqual({
      roles: [],
      permissions: [],
    });
    const audit = await auditEventsOf('user.deleted');
    expect(audit.some((e) => e.subject_id === user.id)).toBe(true);
    expect(
      (await app.inject({ method: 'DELETE', url: `/v1/users/${user.id}`, headers: asAdmin() })).statusCode,
    ).toBe(404);
  });

  it('nobody grants what they do not hold: a role admin without * cannot create or grant wider roles', async () => {
    const limitedRole = `rolemgr-${Date.now().toString(36)}`;
    await app.inject({
      method: 'POST',
      url: '/v1/roles',
      headers: asAdmin(),
      payload: {
        name: limitedRole,
        permissions: ['roles:write', 'roles:assign', 'roles:read', 'users:read'],
      },
    });
    const manager = await registerUser(app, 'manager');
    await app.inject({
      method: 'PUT',
      url: `/v1/users/${manager.id}/roles/${limitedRole}`,
      headers: asAdmin(),
    });
    const token = (await login(app, manager.email)).session.access_token;
    const wider = await app.inject({
      method: 'POST',
      url: '/v1/roles',
      headers: bearer(token),
      payload: { name: `${limitedRole}-x`, permissions: ['users:write'] },
    });
    expect(wider.statusCode).toBe(403);
    const narrower = await app.inject({
      method: 'POST',
      url: '/v1/roles',
      headers: bearer(token),
      payload: { name: `${limitedRole}-y`, permissions: ['users:read'] },
    });
    expect(narrower.statusCode).toBe(201);
    const target = await registerUser(app, 'target');
    const grantAdmin = await app.inject({
      method: 'PUT',
      url: `/v1/users/${target.id}/roles/admin`,
      headers: bearer(token),
    });
    expect(grantAdmin.statusCode).toBe(403);
    const unknown = await app.inject({
      method: 'POST',
      url: '/v1/roles',
      headers: asAdmin(),
      payload: { name: `${limitedRole}-z`, permissions: ['Not A Permission'] },
    });
    expect(unknown.statusCode).toBe(400);
    // Other services' permissions are welcome in roles (for their tokens), within what one holds.
    const foreign = await app.inject({
      method: 'POST',
      url: '/v1/roles',
      headers: asAdmin(),
      payload: { name: `${limitedRole}-orders`, permissions: ['orders:read', 'orders:*'] },
    });
    expect(foreign.statusCode).toBe(201);
    const notHeld = await app.inject({
      method: 'POST',
      url: '/v1/roles',
      headers: bearer(token),
      payload: { name: `${limitedRole}-o2`, permissions: ['orders:read'] },
    });
    expect(notHeld.statusCode).toBe(403);
    const dup = await app.inject({
      method: 'POST',
      url: '/v1/roles',
      headers: asAdmin(),
      payload: { name: limitedRole, permissions: [] },
    });
    expect(dup.statusCode).toBe(409);
  });

  it('a refused removal or deletion says it was one, not a grant (403, audited with the same reason)', async () => {
    const manager = await userWith(
      app,
      ['roles:read', 'roles:write', 'roles:assign', 'users:read'],
      'remover',
    );
    const removal = await app.inject({
      method: 'DELETE',
      url: `/v1/users/${admin.id}/roles/admin`,
      headers: bearer(manager.accessToken),
    });
    expect(removal.statusCode, removal.body).toBe(403);
    expect(removal.json().detail).toBe(
      'You cannot remove a role that gives permissions you do not hold yourself: *',
    );
    const wider = `wider-${Date.now().toString(36)}`;
    const created = await app.inject({
      method: 'POST',
      url: '/v1/roles',
      headers: asAdmin(),
      payload: { name: wider, permissions: ['users:write'] },
    });
    expect(created.statusCode, created.body).toBe(201);
    const deletion = await app.inject({
      method: 'DELETE',
      url: `/v1/roles/${wider}`,
      headers: bearer(manager.accessToken),
    });
    expect(deletion.statusCode, deletion.body).toBe(403);
    expect(deletion.json().detail).toBe(
      'You cannot delete a role that gives permissions you do not hold yourself: users:write',
    );
    const denied = await app.services.audit.list({
      actorId: manager.id,
      type: 'authorization.denied',
      limit: 10,
    });
    expect(denied.map((e) => [e.data.action, e.data.reason])).toEqual([
      ['role.delete', deletion.json().detail],
      ['role.remove', removal.json().detail],
    ]);
  });

  it('a PATCH that changes nothing writes nothing: no updated_at bump, no role.updated event', async () => {
    const roleName = `noop-${Date.now().toString(36)}`;
    const created = await app.inject({
      method: 'POST',
      url: '/v1/roles',
      headers: asAdmin(),
      payload: { name: roleName, description: 'Same', permissions: ['users:read', 'roles:read'] },
    });
    expect(created.statusCode, created.body).toBe(201);
    const patch = (payload: object) =>
      app.inject({ method: 'PATCH', url: `/v1/roles/${roleName}`, headers: asAdmin(), payload });
    const eventsOfRole = async () =>
      (await auditEventsOf('role.updated')).filter((e) => e.subject_id === roleName);

    for (const payload of [
      {},
      { description: 'Same' },
      { permissions: ['roles:read', 'users:read', 'users:read'] },
    ]) {
      const res = await patch(payload);
      expect(res.statusCode, res.body).toBe(200);
      expect(res.json().updated_at).toBe(created.json().updated_at);
    }
    expect(await eventsOfRole()).toEqual([]);

    const changed = await patch({ description: 'Different', permissions: ['roles:read', 'users:read'] });
    expect(changed.statusCode).toBe(200);
    expect(changed.json().description).toBe('Different');
    expect((await eventsOfRole()).map((e) => e.data.changed)).toEqual([['description']]);
  });

  it('names no new role like a UUID: the audit log names users, keys and clients by theirs', async () => {
    const shaped = await app.inject({
      method: 'POST',
      url: '/v1/roles',
      headers: asAdmin(),
      payload: { name: admin.id.replace(/^[0-9]/, 'a'), permissions: ['roles:read'] },
    });
    expect(shaped.statusCode, shaped.body).toBe(400);
    expect(shaped.json().errors).toEqual([{ field: 'body.name', message: 'must not be shaped like a UUID' }]);
    // A name with a UUID inside it is a name.
    const inside = await app.inject({
      method: 'POST',
      url: '/v1/roles',
      headers: asAdmin(),
      payload: { name: `team-${admin.id}`.slice(0, 50), permissions: ['roles:read'] },
    });
    expect(inside.statusCode, inside.body).toBe(201);
  });

  it('protects built-in roles and the last admin', async () => {
    expect(
      (await app.inject({ method: 'DELETE', url: '/v1/roles/admin', headers: asAdmin() })).statusCode,
    ).toBe(409);
    expect(
      (await app.inject({ method: 'DELETE', url: '/v1/roles/user', headers: asAdmin() })).statusCode,
    ).toBe(409);
    const strip = await app.inject({
      method: 'PATCH',
      url: '/v1/roles/admin',
      headers: asAdmin(),
      payload: { permissions: ['users:read'] },
    });
    expect(strip.statusCode).toBe(409);
  });

  it('answers 409 when removing the last admin (on a fresh database)', async () => {
    const pino = (await import('pino')).default;
    const { openMemoryDatabase } = await import('../../src/db/client.js');
    const database = await openMemoryDatabase(pino({ level: 'silent' }));
    const solo = await buildTestApp({ deps: { database } });
    const only = await createAdmin(solo);
    const res = await solo.inject({
      method: 'DELETE',
      url: `/v1/users/${only.id}/roles/admin`,
      headers: bearer(only.accessToken),
    });
    expect(res.statusCode).toBe(409);
    expect(res.json().code).toBe('last_admin');
    const disable = await solo.inject({
      method: 'PATCH',
      url: `/v1/users/${only.id}`,
      headers: bearer(only.accessToken),
      payload: { status: 'disabled' },
    });
    expect(disable.statusCode).toBe(409);
    const second = await registerUser(solo, 'second-admin');
    await solo.inject({
      method: 'PUT',
      url: `/v1/users/${second.id}/roles/admin`,
      headers: bearer(only.accessToken),
    });
    const now = await solo.inject({
      method: 'DELETE',
      url: `/v1/users/${only.id}/roles/admin`,
      headers: bearer(only.accessToken),
    });
    expect(now.statusCode).toBe(204);
  });

  /**
   * A database of its own with one administrator, who invites `email` and grants them admin: the
   * invited one does not count toward the last-admin check until they hold the account.
   */
  async function soloWithInvitedAdmin(email: string, env: Record<string, string> = {}) {
    const pino = (await import('pino')).default;
    const { openMemoryDatabase } = await import('../../src/db/client.js');
    const { capturingMailer } = await import('../support/mail.js');
    const database = await openMemoryDatabase(pino({ level: 'silent' }));
    const mailer = capturingMailer();
    const solo = await buildTestApp({ env, deps: { database, mailer } });
    const only = await createAdmin(solo);
    const asOnly = bearer(only.accessToken);
    const invited = await solo.inject({
      method: 'POST',
      url: '/v1/users',
      headers: asOnly,
      payload: { email },
    });
    expect(invited.statusCode, invited.body).toBe(201);
    const invitedId: string = invited.json().id;
    const granted = await solo.inject({
      method: 'PUT',
      url: `/v1/users/${invitedId}/roles/admin`,
      headers: asOnly,
    });
    expect(granted.statusCode, granted.body).toBeLessThan(300);
    return { solo, mailer, only, asOnly, invitedId };
  }

  it('an invited administrator who has not accepted is no administrator yet: the last one keeps the role until they have', async () => {
    const email = 'next-admin@example.test';
    const { solo, mailer, only, asOnly } = await soloWithInvitedAdmin(email, {
      PASSWORD_RESET_URL: 'https://app.example.test/reset',
    });
    const stepDown = () =>
      solo.inject({ method: 'DELETE', url: `/v1/users/${only.id}/roles/admin`, headers: asOnly });
    const refused = await stepDown();
    expect(refused.statusCode, refused.body).toBe(409);
    expect(refused.json().code).toBe('last_admin');
    const disable = await solo.inject({
      method: 'PATCH',
      url: `/v1/users/${only.id}`,
      headers: asOnly,
      payload: { status: 'disabled' },
    });
    expect(disable.statusCode).toBe(409);
    const mail = mailer.sent.find((m) => m.to === email)!;
    const token = /reset#token=(prs_[0-9A-Za-z_]+)/.exec(mail.text)![1]!;
    const accepted = await solo.inject({
      method: 'POST',
      url: '/v1/auth/password/reset',
      payload: { token, new_password: 'the next admin’s passphrase' },
    });
    expect(accepted.statusCode, accepted.body).toBe(204);
    expect((await stepDown()).statusCode).toBe(204);
  });

  it('an invited administrator who proved the address and signed in by a link counts: the last one may step down', async () => {
    const { signInByLinks } = await import('../support/mail.js');
    const email = 'linked-admin@example.test';
    const { solo, mailer, only, asOnly, invitedId } = await soloWithInvitedAdmin(email);
    // No password ever chosen: the address confirmed, then a sign-in link; the role is theirs to use.
    const accessToken = await signInByLinks(solo, mailer, email);
    const listed = await solo.inject({ method: 'GET', url: '/v1/users', headers: bearer(accessToken) });
    expect(listed.statusCode, listed.body).toBe(200);
    const stepDown = await solo.inject({
      method: 'DELETE',
      url: `/v1/users/${only.id}/roles/admin`,
      headers: asOnly,
    });
    expect(stepDown.statusCode, stepDown.body).toBe(204);
    // They are the last now, and keep the role.
    const last = await solo.inject({
      method: 'DELETE',
      url: `/v1/users/${invitedId}/roles/admin`,
      headers: bearer(accessToken),
    });
    expect(last.statusCode, last.body).toBe(409);
    expect(last.json().code).toBe('last_admin');
  });

  it('a failure in the middle of a change leaves neither the change nor its event', async () => {
    const user = await registerUser(app, 'atomic');
    const spy = vi.spyOn(app.services.audit, 'record').mockImplementationOnce(async () => {
      throw new Error('disk full');
    });
    try {
      const res = await app.inject({
        method: 'PUT',
        url: `/v1/users/${user.id}/roles/admin`,
        headers: asAdmin(),
      });
      expect(res.statusCode).toBe(500);
      expect(res.json().detail).not.toContain('disk full');
    } finally {
      spy.mockRestore();
    }
    expect((await app.services.repos.users.rolesAndPermissions(user.id)).roles).toEqual(['user']);
    const events = await auditEventsOf('role.granted');
    expect(events.some((e) => e.subject_id === user.id)).toBe(false);
  });

  it('answers authz checks for services', async () => {
    const user = await registerUser(app, 'checked');
    const res = await app.inject({
      method: 'POST',
      url: '/v1/authz/check',
      headers: asAdmin(),
      payload: { subject_id: user.id, permissions: ['account:read', 'users:read'] },
    });
    expect(res.statusCode).toBe(200);
    expect(res.json()).toEqual({ allowed: false, missing: ['users:read'] });
    const ok = await app.inject({
      method: 'POST',
      url: '/v1/authz/check',
      headers: asAdmin(),
      payload: { subject_id: user.id, permissions: ['account:read'] },
    });
    expect(ok.json()).toEqual({ allowed: true, missing: [] });
  });

  it('lists users by status and by role, alone or with a search', async () => {
    const tag = `filter${Date.now().toString(36)}`;
    const kept = await registerUser(app, `${tag}-active`);
    const gone = await registerUser(app, `${tag}-disabled`);
    const holder = await registerUser(app, `${tag}-holder`);
    expect((await setUserStatus(app, admin.accessToken, gone.id, 'disabled')).statusCode).toBe(200);
    const role = `filter-${Date.now().toString(36)}`;
    const made = await app.inject({
      method: 'POST',
      url: '/v1/roles',
      headers: asAdmin(),
      payload: { name: role, permissions: ['profiles:read'] },
    });
    expect(made.statusCode, made.body).toBe(201);
    expect(
      (await app.inject({ method: 'PUT', url: `/v1/users/${holder.id}/roles/${role}`, headers: asAdmin() }))
        .statusCode,
    ).toBe(200);
    const emails = async (query: string) =>
      (await allPages<{ email: string; status: string }>(app, `/v1/users?${query}`, asAdmin())).map(
        (u) => u.email,
      );

    expect(await emails(`query=${tag}&status=disabled`)).toEqual([gone.email]);
    expect((await emails(`query=${tag}&status=active`)).sort()).toEqual([kept.email, holder.email].sort());
    expect(await emails(`role=${role}`)).toEqual([holder.email]);
    expect(await emails(`role=${role}&status=disabled`)).toEqual([]);
    const disabled = await allPages<{ status: string }>(app, '/v1/users?status=disabled', asAdmin());
    expect(disabled.every((u) => u.status === 'disabled')).toBe(true);
    for (const bad of ['status=gone', 'role=Not%20A%20Role', 'role=']) {
      const res = await app.inject({ method: 'GET', url: `/v1/users?${bad}`, headers: asAdmin() });
      expect(res.statusCode, bad).toBe(400);
    }
  });

  it('authz/check refuses a malformed permission as POST /v1/roles does (400 naming the field)', async () => {
    const user = await registerUser(app, 'checked-bad');
    for (const permission of ['not a perm', 'Users:Read', 'users:', '']) {
      const res = await app.inject({
        method: 'POST',
        url: '/v1/authz/check',
        headers: asAdmin(),
        payload: { subject_id: user.id, permissions: ['account:read', permission] },
      });
      expect(res.statusCode, permission).toBe(400);
      expect(res.headers['content-type']).toContain('application/problem+json');
      expect(res.json().code).toBe('validation_failed');
      expect(res.json().errors).toEqual([expect.objectContaining({ field: 'body.permissions.1' })]);
    }
    // Wildcards are permissions too.
    const wildcard = await app.inject({
      method: 'POST',
      url: '/v1/authz/check',
      headers: asAdmin(),
      payload: { subject_id: user.id, permissions: ['account:*'] },
    });
    expect(wildcard.json()).toEqual({ allowed: false, missing: ['account:*'] });
  });

  it('serves the permission catalogue and the roles', async () => {
    const perms = await app.inject({ method: 'GET', url: '/v1/permissions', headers: asAdmin() });
    expect(perms.json().data.map((p: { name: string }) => p.name)).toContain('roles:write');
    // Every page: on the shared database other files' roles may be more than one.
    const roles = await allPages<{ name: string }>(app, '/v1/roles', asAdmin());
    expect(roles.map((r) => r.name)).toEqual(expect.arrayContaining(['admin', 'user']));
    const one = await app.inject({ method: 'GET', url: '/v1/roles/admin', headers: asAdmin() });
    expect(one.json()).toMatchObject({ name: 'admin', permissions: ['*'], builtin: true });
    expect(
      (await app.inject({ method: 'GET', url: '/v1/roles/Bad Name', headers: asAdmin() })).statusCode,
    ).toBe(400);
  });

  it('a deleted role is removed from each holder’s history: one role.removed per holder, in their own activity', async () => {
    const roleName = `going-${Date.now().toString(36)}`;
    expect(
      (
        await app.inject({
          method: 'POST',
          url: '/v1/roles',
          headers: asAdmin(),
          payload: { name: roleName, permissions: ['users:read'] },
        })
      ).statusCode,
    ).toBe(201);
    const holders = [await registerUser(app, 'holder-a'), await registerUser(app, 'holder-b')];
    const bystander = await registerUser(app, 'holder-none');
    for (const h of holders) {
      const put = await app.inject({
        method: 'PUT',
        url: `/v1/users/${h.id}/roles/${roleName}`,
        headers: asAdmin(),
      });
      expect(put.statusCode, put.body).toBeLessThan(300);
    }
    const deleted = await app.inject({ method: 'DELETE', url: `/v1/roles/${roleName}`, headers: asAdmin() });
    expect(deleted.statusCode).toBe(204);
    const requestId = deleted.headers['x-request-id'];
    const about = async (subject: string) =>
      (
        await app.inject({ method: 'GET', url: `/v1/audit-events?subject_id=${subject}`, headers: asAdmin() })
      ).json().data as Array<{ type: string; request_id: string; data: Record<string, unknown> }>;
    expect((await about(roleName)).find((e) => e.type === 'role.deleted')).toMatchObject({
      request_id: requestId,
      data: { holders: 2 },
    });
    for (const h of holders)
      expect((await about(h.id)).filter((e) => e.type === 'role.removed')).toEqual([
        expect.objectContaining({ request_id: requestId, data: { role: roleName, reason: 'role_deleted' } }),
      ]);
    for (const h of holders) {
      const token = (await login(app, h.email, PASSWORD)).session.access_token;
      const activity = (
        await app.inject({ method: 'GET', url: '/v1/auth/activity', headers: bearer(token) })
      ).json().data as Array<{ type: string; by: string; details: Record<string, string> }>;
      expect(activity.find((e) => e.type === 'role.removed')).toMatchObject({
        by: 'administrator',
        details: { role: roleName, reason: 'role_deleted' },
      });
    }
    const theirs = (
      await app.inject({
        method: 'GET',
        url: `/v1/audit-events?subject_id=${bystander.id}`,
        headers: asAdmin(),
      })
    ).json().data as Array<{ type: string }>;
    expect(theirs.map((e) => e.type)).not.toContain('role.removed');
  });

  it('lets one of several identical concurrent deletions or disables happen, audited once', async () => {
    const concurrently = (n: number, request: InjectOptions) =>
      Promise.all(Array.from({ length: n }, () => app.inject(request))).then((r) =>
        r.map((res) => res.statusCode).sort(),
      );

    const disabled = await registerUser(app, 'disable-race');
    expect(
      await concurrently(6, {
        method: 'PATCH',
        url: `/v1/users/${disabled.id}`,
        headers: asAdmin(),
        payload: { status: 'disabled' },
      }),
    ).toEqual([200, 200, 200, 200, 200, 200]);
    expect((await auditEventsOf('user.disabled')).filter((e) => e.subject_id === disabled.id)).toHaveLength(
      1,
    );

    const deleted = await registerUser(app, 'delete-race');
    expect(
      await concurrently(6, { method: 'DELETE', url: `/v1/users/${deleted.id}`, headers: asAdmin() }),
    ).toEqual([204, 404, 404, 404, 404, 404]);
    expect((await auditEventsOf('user.deleted')).filter((e) => e.subject_id === deleted.id)).toHaveLength(1);

    const roleName = `race-${Date.now().toString(36)}`;
    const role = await app.inject({
      method: 'POST',
      url: '/v1/roles',
      headers: asAdmin(),
      payload: { name: roleName, permissions: ['users:read'] },
    });
    expect(role.statusCode).toBe(201);
    expect(
      await concurrently(6, { method: 'DELETE', url: `/v1/roles/${roleName}`, headers: asAdmin() }),
    ).toEqual([204, 404, 404, 404, 404, 404]);
    expect((await auditEventsOf('role.deleted')).filter((e) => e.subject_id === roleName)).toHaveLength(1);
  });
});

describe('role grants against concurrent changes, and by services', () => {
  let app: FastifyInstance;
  let admin: TestUser;
  beforeAll(async () => {
    app = await buildTestApp();
    admin = await createAdmin(app);
  });
  const newRole = async (permissions: string[]) => {
    const name = `race-${Math.random().toString(36).slice(2, 10)}`;
    const res = await app.inject({
      method: 'POST',
      url: '/v1/roles',
      headers: bearer(admin.accessToken),
      payload: { name, permissions },
    });
    expect(res.statusCode, res.body).toBe(201);
    return name;
  };

  it('a service holding roles:assign grants a role (its grant is recorded by client id in the audit)', async () => {
    const role = await newRole(['users:read']);
    const client = await createClient(app, admin.accessToken, {
      name: 'provisioner',
      scopes: ['roles:assign', 'users:read'],
    });
    const token = await clientToken(app, client);
    const user = await registerUser(app, 'granted-by-service');
    const res = await app.inject({
      method: 'PUT',
      url: `/v1/users/${user.id}/roles/${role}`,
      headers: bearer(token.access_token),
    });
    expect(res.statusCode, res.body).toBe(200);
    expect(res.json().roles).toContain(role);
    const [event] = await app.services.audit.list({ subjectId: user.id, type: 'role.granted', limit: 5 });
    expect(event).toMatchObject({ actorType: 'service', actorId: client.client_id, data: { role } });
  });

  it.skipIf(!inject('databaseUrl'))(
    'a grant is checked against the permissions the role gives when it commits: an edit waits for it',
    async () => {
      const role = await newRole(['users:read']);
      const granter = await registerUser(app, 'race-granter');
      // The granter holds roles:assign and users:read, and not keys:write.
      await app.services.repos.users.assignRole(
        granter.id,
        await newRole(['roles:assign', 'users:read']),
        null,
      );
      const token = (await login(app, granter.email)).session.access_token;
      const target = await registerUser(app, 'race-target');
      const other = new pg.Client({ connectionString: inject('databaseUrl') });
      await other.connect();
      try {
        // Holds the grant's insert back, after its check.
        await other.query('begin');
        await other.query('lock table user_roles in share mode');
        const grant = app.inject({
          method: 'PUT',
          url: `/v1/users/${target.id}/roles/${role}`,
          headers: bearer(token),
        });
        await new Promise((resolve) => setTimeout(resolve, 300));
        let edited = false;
        const edit = app
          .inject({
            method: 'PATCH',
            url: `/v1/roles/${role}`,
            headers: bearer(admin.accessToken),
            payload: { permissions: ['users:read', 'keys:write'] },
          })
          .then((res) => {
            edited = true;
            return res;
          });
        await new Promise((resolve) => setTimeout(resolve, 500));
        // The edit waits for the grant that checked the role as it was.
        expect(edited).toBe(false);
        await other.query('commit');
        expect((await grant).statusCode).toBe(200);
        expect((await edit).statusCode).toBe(200);
      } finally {
        await other.end();
      }
    },
  );
});

describe('users:write reaches users who hold no more than the caller', () => {
  let app: FastifyInstance;
  beforeAll(async () => {
    app = await buildTestApp();
  });

  it('a support role disables, deletes and resets the second factor of plain users, not of administrators (403, audited)', async () => {
    const admin = await createAdmin(app);
    const support = await registerUser(app, 'support');
    const role = `support-${Math.random().toString(36).slice(2, 10)}`;
    const created = await app.inject({
      method: 'POST',
      url: '/v1/roles',
      headers: bearer(admin.accessToken),
      payload: { name: role, permissions: ['users:read', 'users:write'] },
    });
    expect(created.statusCode, created.body).toBe(201);
    const granted = await app.inject({
      method: 'PUT',
      url: `/v1/users/${support.id}/roles/${role}`,
      headers: bearer(admin.accessToken),
    });
    expect(granted.statusCode).toBe(200);
    const asSupport = bearer((await login(app, support.email)).session.access_token);
    const plain = await registerUser(app, 'plain');

    const calls = (id: string): InjectOptions[] => [
      { method: 'PATCH', url: `/v1/users/${id}`, payload: { status: 'disabled' } },
      { method: 'DELETE', url: `/v1/users/${id}/mfa` },
      { method: 'DELETE', url: `/v1/users/${id}` },
    ];
    for (const call of calls(admin.id)) {
      const res = await app.inject({ ...call, headers: asSupport });
      expect(res.statusCode, `${call.method} ${call.url}: ${res.body}`).toBe(403);
      expect(res.json().detail).toContain('holds permissions you do not hold');
    }
    expect((await app.services.repos.users.findById(admin.id))?.status).toBe('active');
    const denied = await app.services.audit.list({
      actorId: support.id,
      type: 'authorization.denied',
      limit: 20,
    });
    expect(denied.length).toBeGreaterThan(0);

    for (const call of calls(plain.id)) {
      const res = await app.inject({ ...call, headers: asSupport });
      expect(res.statusCode, `${call.method} ${call.url}: ${res.body}`).toBeLessThan(300);
    }
    expect(await app.services.repos.users.findById(plain.id)).toBeUndefined();
  });

  it('a role’s description is rewritten only by a caller who holds what the role gives', async () => {
    const admin = await createAdmin(app);
    const editor = await registerUser(app, 'role-editor');
    const role = `editor-${Math.random().toString(36).slice(2, 10)}`;
    await app.inject({
      method: 'POST',
      url: '/v1/roles',
      headers: bearer(admin.accessToken),
      payload: { name: role, permissions: ['roles:read', 'roles:write'] },
    });
    await app.inject({
      method: 'PUT',
      url: `/v1/users/${editor.id}/roles/${role}`,
      headers: bearer(admin.accessToken),
    });
    const asEditor = bearer((await login(app, editor.email)).session.access_token);
    const describe = (name: string) =>
      app.inject({
        method: 'PATCH',
        url: `/v1/roles/${name}`,
        headers: asEditor,
        payload: { description: 'legacy role - do not grant' },
      });
    expect((await describe('admin')).statusCode).toBe(403);
    expect((await describe(role)).statusCode).toBe(200);
  });

  it('refuses text that is not well-formed Unicode anywhere in a JSON body (400 naming it), storing nothing', async () => {
    const admin = await createAdmin(app);
    const name = `lone-${Math.random().toString(36).slice(2, 10)}`;
    const res = await app.inject({
      method: 'POST',
      url: '/v1/roles',
      headers: { ...bearer(admin.accessToken), 'content-type': 'application/json' },
      payload: `{"name":"${name}","description":"a\\ud800b","permissions":[]}`,
    });
    expect(res.statusCode, res.body).toBe(400);
    expect(res.json().errors).toEqual([
      { field: 'body.description', message: expect.stringContaining('lone surrogate') },
    ]);
    const read = await app.inject({
      method: 'GET',
      url: `/v1/roles/${name}`,
      headers: bearer(admin.accessToken),
    });
    expect(read.statusCode).toBe(404);
    const profile = await app.inject({
      method: 'PATCH',
      url: '/v1/profiles/me',
      headers: { ...bearer(admin.accessToken), 'content-type': 'application/json' },
      payload: '{"metadata":{"tags":["ok","\\udfff"]}}',
    });
    expect(profile.statusCode).toBe(400);
    expect(profile.json().errors[0].field).toBe('body.metadata.tags.1');
    // In a key, too: named by the object holding it.
    for (const [payload, field] of [
      ['{"metadata":{"x\\ud800":"v"}}', 'body.metadata'],
      ['{"metadata":{"a":{"\\udc00":1}}}', 'body.metadata.a'],
    ]) {
      const keyed = await app.inject({
        method: 'PATCH',
        url: '/v1/profiles/me',
        headers: { ...bearer(admin.accessToken), 'content-type': 'application/json' },
        payload,
      });
      expect(keyed.statusCode, payload).toBe(400);
      expect(keyed.json().errors, payload).toEqual([
        { field, message: expect.stringContaining('lone surrogate') },
      ]);
    }
  });
});
