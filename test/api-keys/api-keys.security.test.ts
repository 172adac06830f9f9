import { setTimeout as sleep } from 'node:timers/promises';
import { sql } from 'drizzle-orm';
import type { FastifyInstance, LightMyRequestResponse } from 'fastify';
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from 'vitest';
import { selectRows } from '../../src/db/client.js';
import { API_KEY_FORMAT, generateSecret } from '../../src/lib/crypto.js';
import { API_KEY_ROUTES } from '../authz/routes.js';
import { appliedChanges, buildTestApp } from '../support/app.js';
import { atTime } from '../support/clock.js';
import { ownDatabase } from '../support/database.js';
import { authorizationMatrix } from '../support/authz-matrix.js';
import { createAdmin, login, registerUser, type TestUser } from '../support/factories.js';
import { bearer } from '../support/http.js';
import { clientToken, createClient } from '../clients/helpers.js';
import {
  createKey,
  createTestClock,
  grantRole,
  removeRole,
  verifyKey,
  withKey,
  withTypo,
} from './helpers.js';

/** A key minted with `key` (which holds api_keys:own): 201, and the key made. */
async function mintWith(app: FastifyInstance, key: string, payload: { name: string; scopes: string[] }) {
  const res = await app.inject({ method: 'POST', url: '/v1/api-keys', headers: withKey(key), payload });
  expect(res.statusCode, res.body).toBe(201);
  return res.json() as { id: string; key: string };
}

describe('api keys: security', () => {
  let app: FastifyInstance;
  let admin: TestUser;
  const clock = createTestClock();

  beforeAll(async () => {
    app = await buildTestApp({ deps: { clock } });
    admin = await createAdmin(app);
  });
  afterEach(() => {
    vi.restoreAllMocks();
  });

  const me = (headers: Record<string, string>, on = app) =>
    on.inject({ method: 'GET', url: '/v1/auth/me', headers });

  authorizationMatrix(
    'api keys',
    () => app,
    API_KEY_ROUTES,
    async (a, owner) => ({
      apiKeyId: (await createKey(a, owner.accessToken, { scopes: ['account:read'] })).id,
    }),
  );

  it('keeps the secret nowhere in the database and in no later response', async () => {
    const user = await registerUser(app, 'aks-secret');
    const created = await createKey(app, user.accessToken, { name: 'secret scan', scopes: ['account:read'] });
    const secret = created.key.slice(17, 60);
    expect(secret).toHaveLength(43);
    expect((await me(withKey(created.key))).statusCode).toBe(200);
    const h = bearer(user.accessToken);
    const later = [
      await app.inject({ method: 'GET', url: `/v1/api-keys/${created.id}`, headers: h }),
      await app.inject({ method: 'GET', url: '/v1/api-keys', headers: h }),
      await app.inject({
        method: 'PATCH',
        url: `/v1/api-keys/${created.id}`,
        headers: h,
        payload: { name: 'n' },
      }),
      await app.inject({
        method: 'POST',
        url: '/v1/api-keys/verify',
        headers: bearer(admin.accessToken),
        payload: { key: created.key },
      }),
      await me(withKey(created.key)),
      await app.inject({
        method: 'GET',
        url: '/v1/audit-events?limit=200',
        headers: bearer(admin.accessToken),
      }),
    ];
    const rotated = await app.inject({
      method: 'POST',
      url: `/v1/api-keys/${created.id}/rotate`,
      headers: h,
      payload: { grace_seconds: 60 },
    });
    expect(rotated.statusCode).toBe(200);
    later.push(rotated);
    for (const [i, res] of later.entries()) expect(res.body, `response ${i}`).not.toContain(secret);
    await app.services.apiKeys.flush();

    // Every row of every table, as text: neither the old nor the new secret, nor either whole key.
    const newSecret = (rotated.json().key as string).slice(17, 60);
    const tables = await selectRows<{ name: string }>(
      app.services.db,
      sql`SELECT table_name AS name FROM information_schema.tables
          WHERE table_schema = 'public' AND table_type = 'BASE TABLE'`,
    );
    expect(tables.map((t) => t.name)).toEqual(expect.arrayContaining(['api_keys', 'audit_events']));
    for (const { name } of tables) {
      for (const needle of [secret, newSecret]) {
        const hits = await selectRows<{ n: number }>(
          app.services.db,
          sql`SELECT count(*)::int AS n FROM ${sql.identifier(name)} t WHERE t::text LIKE ${`%${needle}%`}`,
        );
        expect(hits[0]!.n, `${name} holds a secret`).toBe(0);
      }
    }
  });

  it('takes one credential per request: X-API-Key carries API keys only, and both headers at once are a 400', async () => {
    const user = await registerUser(app, 'aks-one-credential');
    const other = await registerUser(app, 'aks-one-credential-other');
    const created = await createKey(app, user.accessToken, { scopes: ['account:read', 'account:write'] });

    // A JWT in X-API-Key is not an API key.
    const jwtAsKey = await me(withKey(user.accessToken));
    expect(jwtAsKey.statusCode).toBe(401);
    expect(jwtAsKey.json().code).toBe('invalid_token');
    expect(jwtAsKey.headers['www-authenticate']).toContain('error="invalid_token"');

    // A key and another user's token: neither silently wins (RFC 6750 §2: one method per request).
    for (const headers of [
      { ...withKey(created.key), ...bearer(other.accessToken) },
      { ...withKey(created.key), ...bearer(created.key) },
      { ...withKey(created.key), authorization: 'Basic Og==' },
    ]) {
      const both = await me(headers);
      expect(both.statusCode, both.body).toBe(400);
      expect(both.headers['content-type']).toContain('application/problem+json');
      expect(both.json().code).toBe('bad_request');
      expect(both.headers['www-authenticate']).toContain('error="invalid_request"');
    }
    // Two X-API-Key headers (which Node joins with a comma) are as ambiguous.
    const second = await createKey(app, other.accessToken, { scopes: ['account:read'] });
    for (const value of [[created.key, second.key], `${created.key}, ${second.key}`]) {
      const two = await me({ 'x-api-key': value as string });
      expect(two.statusCode, two.body).toBe(400);
      expect(two.json().detail).toBe('Send one X-API-Key header with one API key');
      expect(two.headers['www-authenticate']).toContain('error="invalid_request"');
    }
    // Nothing changes under an ambiguous request either.
    const logout = await app.inject({
      method: 'POST',
      url: '/v1/auth/logout',
      headers: { ...withKey(created.key), ...bearer(other.accessToken) },
      payload: { scope: 'all' },
    });
    expect(logout.statusCode).toBe(400);
    expect((await me(bearer(other.accessToken))).statusCode).toBe(200);

    const document = (await app.inject({ method: 'GET', url: '/openapi.json' })).json();
    expect(Object.keys(document.paths['/v1/auth/me'].get.responses)).toContain('400');
    // Each alone still works, and an empty X-API-Key counts as absent.
    expect((await me(withKey(created.key))).json().user.id).toBe(user.id);
    expect((await me({ ...bearer(other.accessToken), 'x-api-key': '' })).json().user.id).toBe(other.id);
  });

  it('audits every 403 once: a service’s own refusal (a read-only key ending all sessions) and a route’s', async () => {
    const user = await registerUser(app, 'aks-audited-403');
    const readOnly = await createKey(app, user.accessToken, { scopes: ['account:read'] });
    const denials = async () =>
      (
        await app.inject({
          method: 'GET',
          url: `/v1/audit-events?type=authorization.denied&actor_id=${user.id}`,
          headers: bearer(admin.accessToken),
        })
      ).json().data as { outcome: string; data: Record<string, unknown> }[];

    const logoutAll = await app.inject({
      method: 'POST',
      url: '/v1/auth/logout',
      headers: withKey(readOnly.key),
      payload: { scope: 'all' },
    });
    expect(logoutAll.statusCode).toBe(403);
    expect(await denials()).toEqual([
      expect.objectContaining({
        outcome: 'failure',
        data: expect.objectContaining({ route: '/v1/auth/logout', reason: logoutAll.json().detail }),
      }),
    ]);
    expect((await me(bearer(user.accessToken))).statusCode).toBe(200); // nothing was ended

    // A route's own permission check writes its event once, not a second one from the fallback.
    expect(
      (await app.inject({ method: 'GET', url: '/v1/users', headers: withKey(readOnly.key) })).statusCode,
    ).toBe(403);
    const after = await denials();
    expect(after).toHaveLength(2);
    expect(after.filter((e) => e.data.permission === 'users:read')).toHaveLength(1);
  });

  it('refuses scopes beyond the creator’s permissions (403), at creation and on update', async () => {
    const user = await registerUser(app, 'aks-beyond');
    for (const scopes of [['users:read'], ['*'], ['api_keys:*'], ['account:read', 'roles:write']]) {
      const res = await app.inject({
        method: 'POST',
        url: '/v1/api-keys',
        headers: bearer(user.accessToken),
        payload: { name: 'too much', scopes },
      });
      expect(res.statusCode, JSON.stringify(scopes)).toBe(403);
      expect(res.json().code).toBe('forbidden');
    }
    const list = await app.inject({ method: 'GET', url: '/v1/api-keys', headers: bearer(user.accessToken) });
    expect(list.json().data).toEqual([]);

    const created = await createKey(app, user.accessToken, { scopes: ['account:read'] });
    const patch = await app.inject({
      method: 'PATCH',
      url: `/v1/api-keys/${created.id}`,
      headers: bearer(user.accessToken),
      payload: { scopes: ['users:write'] },
    });
    expect(patch.statusCode).toBe(403);

    // An administrator cannot widen someone's key at all: that is its owner's to do.
    const byAdmin = await app.inject({
      method: 'PATCH',
      url: `/v1/api-keys/${created.id}`,
      headers: bearer(admin.accessToken),
      payload: { scopes: ['users:read'] },
    });
    expect(byAdmin.statusCode).toBe(403);
    expect((await me(withKey(created.key))).json().permissions).toEqual(['account:read']);

    // Every refusal is audited with what was missing; the admin's with the owner's missing permission.
    const denied = await app.services.audit.list({
      type: 'authorization.denied',
      actorId: user.id,
      limit: 10,
    });
    expect(denied.map((e) => (e.data as { action: string }).action)).toEqual([
      'api_key.update',
      ...Array(4).fill('api_key.create'),
    ]);
    expect(denied.at(-1)).toMatchObject({
      outcome: 'failure',
      subjectId: user.id,
      data: { rule: 'grant_ceiling', missing: ['users:read'], scopes: ['users:read'] },
    });
    expect(denied[0]?.data).toMatchObject({ missing: ['users:write'] });
    const byAdminDenied = await app.services.audit.list({
      type: 'authorization.denied',
      actorId: admin.id,
      limit: 1,
    });
    expect(byAdminDenied[0]).toMatchObject({
      subjectId: created.id,
      data: { action: 'api_key.update', reason: expect.stringContaining('Only the key’s owner can widen') },
    });
  });

  it('a key cannot mint a key with more than the key itself may do', async () => {
    const user = await registerUser(app, 'aks-mint');
    const { key } = await createKey(app, user.accessToken, { scopes: ['api_keys:own', 'account:read'] });
    const wider = await app.inject({
      method: 'POST',
      url: '/v1/api-keys',
      headers: withKey(key),
      payload: { name: 'wider', scopes: ['account:write'] },
    });
    expect(wider.statusCode).toBe(403);
    const narrower = await app.inject({
      method: 'POST',
      url: '/v1/api-keys',
      headers: withKey(key),
      payload: { name: 'narrower', scopes: ['account:read'] },
    });
    expect(narrower.statusCode, narrower.body).toBe(201);
    expect(narrower.json().owner_id).toBe(user.id);
  });

  it('a key cannot outlive itself through the keys it mints: they expire with it and are revoked with it', async () => {
    const user = await registerUser(app, 'aks-lineage');
    const expiresAt = new Date(clock.now().getTime() + 30 * 86_400_000).toISOString();
    const parent = await createKey(app, user.accessToken, {
      scopes: ['api_keys:own', 'account:read'],
      expires_at: expiresAt,
    });
    const mint = (payload: Record<string, unknown>) =>
      app.inject({ method: 'POST', url: '/v1/api-keys', headers: withKey(parent.key), payload });

    // Without expires_at the child expires with its parent; later, or never, is refused.
    const child = await mint({ name: 'child', scopes: ['api_keys:own', 'account:read'] });
    expect(child.statusCode, child.body).toBe(201);
    expect(child.json()).toMatchObject({ parent_id: parent.id, expires_at: expiresAt });
    const later = new Date(Date.parse(expiresAt) + 1000).toISOString();
    expect((await mint({ name: 'later', scopes: ['account:read'], expires_at: later })).statusCode).toBe(403);
    const patch = (
      id: string,
      body: Record<string, unknown>,
      headers: Record<string, string> = withKey(parent.key),
    ) => app.inject({ method: 'PATCH', url: `/v1/api-keys/${id}`, headers, payload: body });
    for (const expires_at of [later, null]) {
      const res = await patch(child.json().id, { expires_at });
      expect(res.statusCode, res.body).toBe(403);
      expect((await patch(parent.id, { expires_at })).statusCode).toBe(403);
    }
    // Sooner is fine; the owner's session is not bound by any key.
    expect(
      (await patch(child.json().id, { expires_at: new Date(Date.parse(expiresAt) - 1000).toISOString() }))
        .statusCode,
    ).toBe(200);
    expect((await patch(parent.id, { expires_at: later }, bearer(user.accessToken))).statusCode).toBe(200);

    // A grandchild, then revoking the parent revokes the whole line, each audited.
    const grandchild = await app.inject({
      method: 'POST',
      url: '/v1/api-keys',
      headers: withKey(child.json().key),
      payload: { name: 'grandchild', scopes: ['account:read'] },
    });
    expect(grandchild.statusCode, grandchild.body).toBe(201);
    expect(grandchild.json().parent_id).toBe(child.json().id);
    const sibling = await createKey(app, user.accessToken, { scopes: ['account:read'] });
    for (const k of [child.json().key, grandchild.json().key])
      expect((await me(withKey(k))).statusCode).toBe(200);

    const revoked = await app.inject({
      method: 'DELETE',
      url: `/v1/api-keys/${parent.id}`,
      headers: bearer(user.accessToken),
    });
    expect(revoked.statusCode).toBe(204);
    for (const k of [parent.key, child.json().key, grandchild.json().key]) {
      expect(await verifyKey(app, admin.accessToken, k)).toMatchObject({ valid: false, reason: 'revoked' });
      expect((await me(withKey(k))).statusCode).toBe(401);
    }
    // A key the owner made with a session is no one's child.
    expect((await me(withKey(sibling.key))).statusCode).toBe(200);
    const events = await app.services.audit.list({ type: 'api_key.revoked', limit: 100 });
    const audited = events.filter((e) =>
      [parent.id, child.json().id, grandchild.json().id].includes(e.subjectId ?? ''),
    );
    expect(audited).toHaveLength(3);
  });

  it('revoking a key writes the events of its whole line in one insert, each there', async () => {
    const user = await registerUser(app, 'aks-line-audit');
    const scopes = ['api_keys:own', 'account:read'];
    const parent = await createKey(app, user.accessToken, { scopes });
    const mint = (key: string) => mintWith(app, key, { name: 'line', scopes });
    const children = [];
    for (let i = 0; i < 20; i++) children.push(await mint(parent.key));
    const grandchildren = [];
    for (let i = 0; i < 10; i++) grandchildren.push(await mint(children[0]!.key));
    const line = [...children, ...grandchildren].map((k) => k.id);

    const inserts = vi.spyOn(app.services.repos.audit, 'insert');
    const revoked = await app.inject({
      method: 'DELETE',
      url: `/v1/api-keys/${parent.id}`,
      headers: bearer(user.accessToken),
    });
    expect(revoked.statusCode).toBe(204);
    // One statement (up to 1,000 rows each), not one per key.
    expect(inserts).toHaveBeenCalledTimes(1);
    expect(inserts.mock.calls[0]![0]).toHaveLength(1 + line.length);

    const events = await app.services.audit.list({ type: 'api_key.revoked', limit: 100 });
    const own = events.filter((e) => e.subjectId === parent.id);
    expect(own).toHaveLength(1);
    expect(own[0]!.data).toEqual({ owner_id: user.id, prefix: parent.prefix });
    const cascaded = events.filter((e) => line.includes(e.subjectId ?? ''));
    expect(cascaded.map((e) => e.subjectId).sort()).toEqual([...line].sort());
    for (const e of cascaded) {
      expect(e.data).toMatchObject({ owner_id: user.id, with_ancestor: parent.id });
      expect(e.actorId).toBe(user.id);
    }
    for (const k of [children[5]!, grandchildren[9]!])
      expect(await verifyKey(app, admin.accessToken, k.key)).toMatchObject({
        valid: false,
        reason: 'revoked',
      });
  });

  it('rotation gives the new secret only to a caller who holds everything the key gives', async () => {
    let user = await registerUser(app, 'aks-rotate');
    const role = await grantRole(app, user.id, ['users:read', 'audit:read']);
    const session = await login(app, user.email, user.password);
    user = { ...user, accessToken: session.session.access_token };
    const narrow = await createKey(app, user.accessToken, { scopes: ['api_keys:own', 'account:read'] });
    const broad = await createKey(app, user.accessToken, {
      scopes: ['api_keys:own', 'users:read', 'audit:read'],
    });
    const rotate = (id: string, headers: Record<string, string>) =>
      app.inject({
        method: 'POST',
        url: `/v1/api-keys/${id}/rotate`,
        headers,
        payload: { grace_seconds: 0 },
      });

    // The narrow key may see its sibling, but not take its secret, and the sibling is untouched.
    const refused = await rotate(broad.id, withKey(narrow.key));
    expect(refused.statusCode, refused.body).toBe(403);
    expect(refused.json().code).toBe('forbidden');
    expect(await verifyKey(app, admin.accessToken, broad.key)).toMatchObject({ valid: true });
    // It may rotate itself, and its owner may rotate either.
    const itself = await rotate(narrow.id, withKey(narrow.key));
    expect(itself.statusCode, itself.body).toBe(200);
    expect((await rotate(broad.id, bearer(user.accessToken))).statusCode).toBe(200);

    // A holder of api_keys:write who lacks what an administrator's key gives may not rotate it.
    const keyManager = await registerUser(app, 'aks-rotate-manager');
    await grantRole(app, keyManager.id, ['api_keys:read', 'api_keys:write']);
    const managerSession = await login(app, keyManager.email, keyManager.password);
    const adminKey = await createKey(app, admin.accessToken, { scopes: ['users:write'] });
    const escalation = await rotate(adminKey.id, bearer(managerSession.session.access_token));
    expect(escalation.statusCode, escalation.body).toBe(403);
    expect(await verifyKey(app, admin.accessToken, adminKey.key)).toMatchObject({ valid: true });
    // Revoking it stays theirs to do.
    const revoked = await app.inject({
      method: 'DELETE',
      url: `/v1/api-keys/${adminKey.id}`,
      headers: bearer(managerSession.session.access_token),
    });
    expect(revoked.statusCode).toBe(204);

    // What the owner no longer holds the key no longer gives: the owner may still rotate it.
    await removeRole(app, user.id, role);
    const after = await login(app, user.email, user.password);
    const rotated = await rotate(broad.id, bearer(after.session.access_token));
    expect(rotated.statusCode, rotated.body).toBe(200);
  });

  it('api_keys:write reaches another user’s key to rename, narrow, shorten or revoke it, never to take it over', async () => {
    // The manager holds account:write and api_keys:own for their own account, as every user does.
    const owner = await registerUser(app, 'aks-takeover-owner');
    const victim = await createKey(app, owner.accessToken, { scopes: ['account:read', 'account:write'] });
    const manager = await registerUser(app, 'aks-takeover-manager');
    await grantRole(app, manager.id, ['api_keys:read', 'api_keys:write']);
    const asManager = bearer((await login(app, manager.email, manager.password)).session.access_token);
    const patch = (payload: Record<string, unknown>) =>
      app.inject({ method: 'PATCH', url: `/v1/api-keys/${victim.id}`, headers: asManager, payload });

    const refused = [
      await patch({ scopes: ['account:read', 'account:write', 'api_keys:own'] }),
      await app.inject({
        method: 'POST',
        url: `/v1/api-keys/${victim.id}/rotate`,
        headers: asManager,
        payload: { grace_seconds: 0 },
      }),
    ];
    for (const res of refused) {
      expect(res.statusCode, res.body).toBe(403);
      expect(res.json().detail).toContain('Only the key’s owner');
    }
    // The key is untouched: its secret works, with its scopes.
    expect(await verifyKey(app, admin.accessToken, victim.key)).toMatchObject({
      valid: true,
      scopes: ['account:read', 'account:write'],
    });
    const soon = new Date(clock.nowMs() + 3_600_000).toISOString();
    expect((await patch({ expires_at: soon })).statusCode).toBe(200);
    expect((await patch({ expires_at: null })).statusCode).toBe(403);
    const narrowed = await patch({ scopes: ['account:read'], name: 'narrowed by the manager' });
    expect(narrowed.statusCode, narrowed.body).toBe(200);
    expect((await me(withKey(victim.key))).json().permissions).toEqual(['account:read']);
    // Narrower is by coverage, not by name: the manager takes a colleague's key from users:* to
    // users:read, and not back.
    const colleague = await registerUser(app, 'aks-takeover-colleague');
    await grantRole(app, colleague.id, ['users:*']);
    const broad = await createKey(
      app,
      (await login(app, colleague.email, colleague.password)).session.access_token,
      {
        scopes: ['users:*'],
      },
    );
    await grantRole(app, manager.id, ['users:read']);
    const asReader = bearer((await login(app, manager.email, manager.password)).session.access_token);
    const scopesOf = (scopes: string[]) =>
      app.inject({
        method: 'PATCH',
        url: `/v1/api-keys/${broad.id}`,
        headers: asReader,
        payload: { scopes },
      });
    const toRead = await scopesOf(['users:read']);
    expect(toRead.statusCode, toRead.body).toBe(200);
    expect((await scopesOf(['users:*'])).statusCode).toBe(403);
    // The owner widens and extends their own key again.
    const own = await app.inject({
      method: 'PATCH',
      url: `/v1/api-keys/${victim.id}`,
      headers: bearer(owner.accessToken),
      payload: { scopes: ['account:read', 'account:write'], expires_at: null },
    });
    expect(own.statusCode, own.body).toBe(200);
    const revoked = await app.inject({
      method: 'DELETE',
      url: `/v1/api-keys/${victim.id}`,
      headers: asManager,
    });
    expect(revoked.statusCode).toBe(204);
    expect((await me(withKey(victim.key))).statusCode).toBe(401);
  });

  it('a key rotates only itself, and only with its current secret: a leaked key keeps no secret past its revocation', async () => {
    const user = await registerUser(app, 'aks-rotate-self');
    const leaked = await createKey(app, user.accessToken, {
      scopes: ['account:read', 'api_keys:own'],
      expires_at: new Date(clock.nowMs() + 60_000).toISOString(),
    });
    const sibling = await createKey(app, user.accessToken, { scopes: ['account:read'] });
    const rotate = (id: string, key: string, payload: Record<string, unknown> = { grace_seconds: 600 }) =>
      app.inject({ method: 'POST', url: `/v1/api-keys/${id}/rotate`, headers: withKey(key), payload });

    const sideways = await rotate(sibling.id, leaked.key, { grace_seconds: 604_800 });
    expect(sideways.statusCode, sideways.body).toBe(403);
    expect(sideways.json().detail).toContain('only itself');
    expect(await verifyKey(app, admin.accessToken, sibling.key)).toMatchObject({ valid: true });

    // It rotates itself; the secret it replaced works for the grace, but cannot take the key back.
    const itself = await rotate(leaked.id, leaked.key);
    expect(itself.statusCode, itself.body).toBe(200);
    const fresh = itself.json().key as string;
    expect((await me(withKey(leaked.key))).statusCode).toBe(200);
    const back = await rotate(leaked.id, leaked.key, { grace_seconds: 0, force: true });
    expect(back.statusCode, back.body).toBe(403);
    expect(back.json().detail).toContain('replaced');
    expect((await me(withKey(fresh))).statusCode).toBe(200);
    // Nor make a key: one made with it would outlive the rotation.
    const minted = await app.inject({
      method: 'POST',
      url: '/v1/api-keys',
      headers: withKey(leaked.key),
      payload: { name: 'from the old secret', scopes: ['account:read'] },
    });
    expect(minted.statusCode, minted.body).toBe(403);
    expect(minted.json().detail).toContain('replaced');
    // Forced by the new secret, the rotation says so in its event.
    const forced = await rotate(leaked.id, fresh, { grace_seconds: 0, force: true });
    expect(forced.statusCode, forced.body).toBe(200);
    const [event] = await app.services.audit.list({
      subjectId: leaked.id,
      type: 'api_key.rotated',
      limit: 1,
    });
    expect(event?.data).toMatchObject({ force: true, grace_seconds: 0 });
  });

  it('a secret a rotation replaced lives only to the end of its grace, and lengthens no sibling key past it', async () => {
    const user = await registerUser(app, 'aks-grace-life');
    // Neither key expires of itself: only the grace bounds the replaced secret.
    const leaked = await createKey(app, user.accessToken, { scopes: ['account:read', 'api_keys:own'] });
    const sibling = await createKey(app, user.accessToken, {
      scopes: ['account:read'],
      expires_at: new Date(clock.nowMs() + 3_600_000).toISOString(),
    });
    const rotated = await app.inject({
      method: 'POST',
      url: `/v1/api-keys/${leaked.id}/rotate`,
      headers: withKey(leaked.key),
      payload: { grace_seconds: 600 },
    });
    expect(rotated.statusCode, rotated.body).toBe(200);
    const patchSibling = (key: string, expiresAt: string | null) =>
      app.inject({
        method: 'PATCH',
        url: `/v1/api-keys/${sibling.id}`,
        headers: withKey(key),
        payload: { expires_at: expiresAt },
      });
    // The old secret, in its grace, cannot give the sibling a life past that grace: not none, not a day.
    for (const later of [null, new Date(clock.nowMs() + 86_400_000).toISOString()]) {
      const res = await patchSibling(leaked.key, later);
      expect(res.statusCode, res.body).toBe(403);
      expect(res.json().detail).toContain('expires at');
    }
    const unchanged = await app.inject({
      method: 'GET',
      url: `/v1/api-keys/${sibling.id}`,
      headers: bearer(user.accessToken),
    });
    expect(unchanged.json().expires_at).toBe(sibling.expires_at);
    // Within the grace it may still shorten one, and the new secret is bound by the key's own life.
    const shorter = await patchSibling(leaked.key, new Date(clock.nowMs() + 300_000).toISOString());
    expect(shorter.statusCode, shorter.body).toBe(200);
    const byFresh = await patchSibling(rotated.json().key as string, null);
    expect(byFresh.statusCode, byFresh.body).toBe(200);
  });

  it('a key manager who lost a permission cannot hand it out with their old token: scopes or rotation (403, audited)', async () => {
    const owner = await registerUser(app, 'aks-held-owner');
    await grantRole(app, owner.id, ['users:write']);
    const key = await createKey(app, (await login(app, owner.email)).session.access_token, {
      scopes: ['users:write'],
    });
    const narrow = await createKey(app, (await login(app, owner.email)).session.access_token, {
      scopes: ['account:read'],
    });
    const manager = await registerUser(app, 'aks-held-manager');
    const full = await grantRole(app, manager.id, ['api_keys:read', 'api_keys:write', 'users:write']);
    const token = (await login(app, manager.email)).session.access_token;
    const removed = await app.inject({
      method: 'DELETE',
      url: `/v1/users/${manager.id}/roles/${full}`,
      headers: bearer(admin.accessToken),
    });
    expect(removed.statusCode).toBe(204);
    await grantRole(app, manager.id, ['api_keys:read', 'api_keys:write']);

    // The token still says users:write; the manager no longer holds it.
    const widen = await app.inject({
      method: 'PATCH',
      url: `/v1/api-keys/${narrow.id}`,
      headers: bearer(token),
      payload: { scopes: ['account:read', 'users:write'] },
    });
    expect(widen.statusCode, widen.body).toBe(403);
    expect(widen.json().detail).toContain('Only the key’s owner');
    const rotate = await app.inject({
      method: 'POST',
      url: `/v1/api-keys/${key.id}/rotate`,
      headers: bearer(token),
      payload: { grace_seconds: 0 },
    });
    expect(rotate.statusCode, rotate.body).toBe(403);
    // Nothing changed: the old secret works and the narrow key keeps its scopes.
    expect(await verifyKey(app, admin.accessToken, key.key)).toMatchObject({ valid: true });
    expect((await app.services.repos.apiKeys.findById(narrow.id))?.scopes).toEqual(['account:read']);
    // What is still held can still be done.
    const rename = await app.inject({
      method: 'PATCH',
      url: `/v1/api-keys/${key.id}`,
      headers: bearer(token),
      payload: { name: 'renamed' },
    });
    expect(rename.statusCode, rename.body).toBe(200);

    const denied = await app.services.audit.list({
      type: 'authorization.denied',
      actorId: manager.id,
      limit: 10,
    });
    expect(denied.map((e) => [e.subjectId, e.data])).toEqual([
      [
        key.id,
        expect.objectContaining({ action: 'api_key.rotate', reason: expect.stringContaining('owner') }),
      ],
      [
        narrow.id,
        expect.objectContaining({ action: 'api_key.update', reason: expect.stringContaining('owner') }),
      ],
    ]);
    expect(JSON.stringify(denied)).not.toContain(key.key.slice(17, 60));
  });

  it('removing a role from the owner removes it from the key', async () => {
    let user = await registerUser(app, 'aks-role');
    const role = await grantRole(app, user.id, ['users:read', 'audit:read']);
    // The creator's permissions are the token's as well as the database's: log in again for the new role.
    const session = await login(app, user.email, user.password);
    user = { ...user, accessToken: session.session.access_token };
    const created = await createKey(app, user.accessToken, { scopes: ['account:read', 'users:read'] });
    expect((await me(withKey(created.key))).json().permissions).toEqual(['account:read', 'users:read']);
    expect(await verifyKey(app, admin.accessToken, created.key)).toMatchObject({
      scopes: ['account:read', 'users:read'],
    });

    await removeRole(app, user.id, role);
    expect((await me(withKey(created.key))).json().permissions).toEqual(['account:read']);
    expect(await verifyKey(app, admin.accessToken, created.key)).toMatchObject({
      valid: true,
      scopes: ['account:read'],
    });
    // The key keeps its granted scopes; only their effect shrinks.
    const got = await app.inject({
      method: 'GET',
      url: `/v1/api-keys/${created.id}`,
      headers: bearer(user.accessToken),
    });
    expect(got.json().scopes).toEqual(['account:read', 'users:read']);
  });

  it('even without an event, a change reaches a cached key once the cache entry ages out', async () => {
    const user = await registerUser(app, 'aks-ttl');
    const role = await grantRole(app, user.id, ['users:read']);
    const session = await login(app, user.email, user.password);
    const created = await createKey(app, session.session.access_token, {
      scopes: ['account:read', 'users:read'],
    });
    expect((await me(withKey(created.key))).json().permissions).toContain('users:read');
    await removeRole(app, user.id, role, false);
    clock.advance(6);
    expect((await me(withKey(created.key))).json().permissions).toEqual(['account:read']);
  });

  it('even without an event, a rotation reaches a cached key once the cache entry ages out', async () => {
    const user = await registerUser(app, 'aks-ttl-rotate');
    const created = await createKey(app, user.accessToken, { scopes: ['account:read'] });
    // Used on routes and verified: the key's row is cached and its digest remembered.
    expect((await me(withKey(created.key))).statusCode).toBe(200);
    expect(await verifyKey(app, admin.accessToken, created.key)).toMatchObject({ valid: true });
    // Another instance rotates it with no grace, and its notification never arrives here.
    const row = (await app.services.repos.apiKeys.findById(created.id))!;
    await app.services.repos.apiKeys.update(
      created.id,
      {
        secretHash: 'rotated-elsewhere',
        previousSecretHash: row.secretHash,
        previousSecretExpiresAt: clock.now(),
      },
      clock.now(),
    );
    clock.advance(6);
    expect((await me(withKey(created.key))).statusCode).toBe(401);
    expect(await verifyKey(app, admin.accessToken, created.key)).toEqual({ valid: false, reason: 'expired' });
  });

  it('another user cannot see, change, rotate or revoke a key (404); api_keys:read/write can', async () => {
    const owner = await registerUser(app, 'aks-owner');
    const stranger = await registerUser(app, 'aks-stranger');
    const created = await createKey(app, owner.accessToken, { scopes: ['account:read'] });
    const h = bearer(stranger.accessToken);
    const attempts = [
      { method: 'GET' as const, url: `/v1/api-keys/${created.id}` },
      { method: 'PATCH' as const, url: `/v1/api-keys/${created.id}`, payload: { name: 'mine now' } },
      { method: 'POST' as const, url: `/v1/api-keys/${created.id}/rotate`, payload: { grace_seconds: 0 } },
      { method: 'DELETE' as const, url: `/v1/api-keys/${created.id}` },
    ];
    const unknownId = await app.inject({
      method: 'GET',
      url: '/v1/api-keys/00000000-0000-4000-8000-000000000000',
      headers: h,
    });
    for (const a of attempts) {
      const res = await app.inject({ ...a, headers: h });
      expect(res.statusCode, `${a.method} ${a.url}`).toBe(404);
      // Indistinguishable from a key that does not exist.
      expect({ ...res.json(), instance: undefined, request_id: undefined }).toEqual({
        ...unknownId.json(),
        instance: undefined,
        request_id: undefined,
      });
    }
    const list = await app.inject({ method: 'GET', url: '/v1/api-keys', headers: h });
    expect(list.json().data).toEqual([]);
    // Nothing happened to it.
    expect((await me(withKey(created.key))).statusCode).toBe(200);
    const got = await app.inject({
      method: 'GET',
      url: `/v1/api-keys/${created.id}`,
      headers: bearer(owner.accessToken),
    });
    expect(got.json().name).not.toBe('mine now');

    // An administrator (api_keys:read and api_keys:write) may.
    const seen = await app.inject({
      method: 'GET',
      url: `/v1/api-keys/${created.id}`,
      headers: bearer(admin.accessToken),
    });
    expect(seen.statusCode).toBe(200);
    const revoked = await app.inject({
      method: 'DELETE',
      url: `/v1/api-keys/${created.id}`,
      headers: bearer(admin.accessToken),
    });
    expect(revoked.statusCode).toBe(204);
    expect((await me(withKey(created.key))).statusCode).toBe(401);
  });

  it('refuses a one-character typo, a foreign string or an oversized key without a database read', async () => {
    // A database of its own: another file's change, on the shared one, may drop this app's caches
    // (a revocation read before its notification), and the reads counted here would count that.
    const own = await ownDatabase('aks_reads');
    const isolated = await buildTestApp({ deps: { database: own.database } });
    try {
      const owner = await createAdmin(isolated);
      const user = await registerUser(isolated, 'aks-typo');
      const created = await createKey(isolated, user.accessToken, { scopes: ['account:read'] });
      const reads = vi.spyOn(isolated.services.repos.apiKeys, 'findByLookupId');
      const ownerReads = vi.spyOn(isolated.services.repos.users, 'rolesAndPermissions');

      // A cold cache reads once; a key seen in the last seconds is not read again (the owner neither).
      isolated.services.events.applyLocally([{ type: 'resync' }]);
      for (let i = 0; i < 3; i++)
        expect(await verifyKey(isolated, owner.accessToken, created.key)).toMatchObject({ valid: true });
      expect(reads).toHaveBeenCalledTimes(1);
      expect(ownerReads).toHaveBeenCalledTimes(1);
      expect((await me(withKey(created.key), isolated)).statusCode).toBe(200);
      expect(reads).toHaveBeenCalledTimes(1);

      reads.mockClear();
      ownerReads.mockClear();
      isolated.services.events.applyLocally([{ type: 'resync' }]);
      const refused = [
        withTypo(created.key, 30), // in the secret
        withTypo(created.key, 8), // in the lookup id
        withTypo(created.key, created.key.length - 1), // in the checksum
        created.key.slice(0, -1),
        `pak_${'x'.repeat(3_000)}`,
        'pak_live_4eC39HqLyjWDarjtT1zdp7dc',
        // A user's access token sent where a key goes: a string, and no key (API.md: always 200).
        owner.accessToken,
      ];
      for (const key of refused) {
        const res = await me(withKey(key), isolated);
        expect(res.statusCode, key).toBe(401);
        if (key !== owner.accessToken) expect((await me(bearer(key), isolated)).statusCode, key).toBe(401);
        expect(await verifyKey(isolated, owner.accessToken, key)).toEqual({
          valid: false,
          reason: 'not_found',
        });
      }
      expect(reads).not.toHaveBeenCalled();
      expect(ownerReads).not.toHaveBeenCalled();
      // Past the body's cap, the request itself is refused.
      const huge = await isolated.inject({
        method: 'POST',
        url: '/v1/api-keys/verify',
        headers: bearer(owner.accessToken),
        payload: { key: `pak_${'x'.repeat(5_000)}` },
      });
      expect(huge.statusCode).toBe(400);
    } finally {
      await isolated.close();
      await own.dispose();
    }
  });

  it('an unknown but well-formed key is read once, then answered from the cache', async () => {
    const user = await registerUser(app, 'aks-unknown');
    const created = await createKey(app, user.accessToken, { scopes: [] });
    await app.inject({
      method: 'DELETE',
      url: `/v1/api-keys/${created.id}`,
      headers: bearer(user.accessToken),
    });
    // The owner is deleted: the key row goes with them (ON DELETE CASCADE).
    await app.services.repos.users.delete(user.id);
    app.services.events.applyLocally([{ type: 'user_changed', userId: user.id }]);
    const reads = vi.spyOn(app.services.repos.apiKeys, 'findByLookupId');
    app.services.events.applyLocally([{ type: 'api_key_changed', lookupId: created.prefix.slice(4) }]);
    for (let i = 0; i < 3; i++)
      expect(await verifyKey(app, admin.accessToken, created.key)).toEqual({
        valid: false,
        reason: 'not_found',
      });
    expect(reads).toHaveBeenCalledTimes(1);
  });

  it('a flood of well-formed keys with made-up lookup ids does not push a real key out of the cache', async () => {
    // A database of its own (another file's change may drop this app's caches), and a clock that
    // stands still, so the 5 s expiry plays no part however slow the machine is.
    const own = await ownDatabase('aks_flood');
    const at = Date.now();
    const isolated = await buildTestApp({
      deps: { database: own.database, clock: { now: () => new Date(at), nowMs: () => at } },
    });
    try {
      const user = await registerUser(isolated, 'aks-flood');
      // The row is cached once the key's creation is applied here both at its commit and from its
      // notification.
      const keys = appliedChanges(isolated, (e) => (e.type === 'api_key_changed' ? e.lookupId : undefined));
      const created = await createKey(isolated, user.accessToken, { scopes: ['account:read'] });
      const lookupId = created.prefix.slice(4);
      await keys.bothHeard(lookupId);
      expect((await me(withKey(created.key), isolated)).statusCode).toBe(200);
      const repo = isolated.services.repos.apiKeys;
      const findByLookupId = repo.findByLookupId.bind(repo);
      // The made-up ones are answered without the database, so the flood costs the test no time.
      const reads = vi
        .spyOn(repo, 'findByLookupId')
        .mockImplementation(async (id, ...rest) =>
          id === lookupId ? findByLookupId(id, ...rest) : undefined,
        );
      // More made-up keys than the whole cache holds, each with a valid checksum.
      for (let i = 0; i < 10_001; i++) {
        const { token } = generateSecret(API_KEY_FORMAT);
        expect((await isolated.services.apiKeys.verify(token)).valid).toBe(false);
      }
      expect(reads).toHaveBeenCalledTimes(10_001);
      reads.mockClear();
      expect((await me(withKey(created.key), isolated)).statusCode).toBe(200);
      expect(reads).not.toHaveBeenCalled();
    } finally {
      await isolated.close();
      await own.dispose();
    }
  });

  it('the verify endpoint needs api_keys:verify (403 otherwise), by token or by key', async () => {
    const user = await registerUser(app, 'aks-verifier');
    const created = await createKey(app, user.accessToken, { scopes: ['account:read'] });
    const denied = await app.inject({
      method: 'POST',
      url: '/v1/api-keys/verify',
      headers: bearer(user.accessToken),
      payload: { key: created.key },
    });
    expect(denied.statusCode).toBe(403);
    expect(denied.json().code).toBe('forbidden');
    const byOwnKey = await app.inject({
      method: 'POST',
      url: '/v1/api-keys/verify',
      headers: withKey(created.key),
      payload: { key: created.key },
    });
    expect(byOwnKey.statusCode).toBe(403);

    const verifier = await createKey(app, admin.accessToken, {
      name: 'gateway',
      scopes: ['api_keys:verify'],
    });
    const allowed = await app.inject({
      method: 'POST',
      url: '/v1/api-keys/verify',
      headers: withKey(verifier.key),
      payload: { key: created.key },
    });
    expect(allowed.statusCode).toBe(200);
    expect(allowed.json()).toEqual({
      valid: true,
      key_id: created.id,
      owner_id: user.id,
      scopes: ['account:read'],
      expires_at: null,
    });
  });

  it('a service with api_keys:read lists the keys of the owner it names; naming none is a 400, not a denial', async () => {
    const user = await registerUser(app, 'aks-service-list');
    const created = await createKey(app, user.accessToken, { scopes: ['account:read'] });
    const client = await createClient(app, admin.accessToken, { scopes: ['api_keys:read'] });
    const service = await clientToken(app, client);
    const named = await app.inject({
      method: 'GET',
      url: `/v1/api-keys?owner_id=${user.id}`,
      headers: bearer(service.access_token),
    });
    expect(named.statusCode, named.body).toBe(200);
    expect(named.json().data.map((k: { id: string }) => k.id)).toEqual([created.id]);

    const unnamed = await app.inject({
      method: 'GET',
      url: '/v1/api-keys',
      headers: bearer(service.access_token),
    });
    expect(unnamed.statusCode, unnamed.body).toBe(400);
    expect(unnamed.json()).toMatchObject({
      code: 'validation_failed',
      errors: [expect.objectContaining({ field: 'query.owner_id' })],
    });
    // A request short of a parameter is not an attempt at something forbidden.
    expect(
      await app.services.audit.list({ type: 'authorization.denied', actorId: client.client_id, limit: 10 }),
    ).toEqual([]);
  });

  it('a revocation on one instance is honoured by another within 1 s', async () => {
    const other = await buildTestApp();
    const user = await registerUser(app, 'aks-instances');
    const created = await createKey(app, user.accessToken, { scopes: ['account:read'] });
    // Warm the other instance's cache so only the event can tell it.
    expect((await me(withKey(created.key), other)).statusCode).toBe(200);
    expect((await me(withKey(created.key), other)).statusCode).toBe(200);

    const res = await app.inject({
      method: 'DELETE',
      url: `/v1/api-keys/${created.id}`,
      headers: bearer(user.accessToken),
    });
    expect(res.statusCode).toBe(204);
    const start = performance.now();
    while ((await me(withKey(created.key), other)).statusCode !== 401) {
      expect(performance.now() - start).toBeLessThan(1000);
      await sleep(20);
    }
  });
});

/*
 * On a database of its own: the clock here runs a day ahead (a key's expiry), past the publication
 * window of a key another file retires on the shared database (24 h + 10 min from the wall clock's
 * now). A forced rotation there would unpublish, for this app, the key its tokens were just signed
 * with (401 `invalid_token` mid-test), and this app's minute housekeeping would retire other files'
 * retiring keys (as mfa.test.ts's TOTP describe found).
 */
describe('api keys: expiry is final', () => {
  let own: Awaited<ReturnType<typeof ownDatabase>>;
  let app: FastifyInstance;
  const clock = createTestClock();

  beforeAll(async () => {
    own = await ownDatabase('aks_expiry');
    app = await buildTestApp({ deps: { database: own.database, clock } });
  });

  afterAll(async () => {
    await app?.close();
    await own?.dispose();
  });

  it('an expired key stays expired, and only a caller holding what a key gives may lengthen its life', async () => {
    const admin = await createAdmin(app);
    const keyManager = await registerUser(app, 'aks-expiry-manager');
    await grantRole(app, keyManager.id, ['api_keys:read', 'api_keys:write']);
    let manager = bearer((await login(app, keyManager.email, keyManager.password)).session.access_token);
    const patch = (id: string, headers: Record<string, string>, body: Record<string, unknown>) =>
      app.inject({ method: 'PATCH', url: `/v1/api-keys/${id}`, headers, payload: body });
    const inDays = (days: number) => new Date(clock.nowMs() + days * 86_400_000).toISOString();

    // An administrator's broad key, expiring in a day.
    const adminKey = await createKey(app, admin.accessToken, { scopes: ['*'], expires_at: inDays(1) });
    // A holder of api_keys:write lacking what it gives may not lengthen its life, nor remove its expiry…
    for (const expires_at of [null, inDays(30)]) {
      const refused = await patch(adminKey.id, manager, { expires_at });
      expect(refused.statusCode, refused.body).toBe(403);
    }
    // …but may shorten it, and rename it.
    expect((await patch(adminKey.id, manager, { expires_at: inDays(0.5) })).statusCode).toBe(200);
    expect((await patch(adminKey.id, manager, { name: 'renamed by the manager' })).statusCode).toBe(200);

    // Once expired, nobody brings it back: not the manager, not its owner, not with a later date.
    clock.advance(86_400);
    // Signed in again: their tokens of a day ago have expired too.
    admin.accessToken = (await login(app, admin.email, admin.password)).session.access_token;
    manager = bearer((await login(app, keyManager.email, keyManager.password)).session.access_token);
    expect((await verifyKey(app, admin.accessToken, adminKey.key)).valid).toBe(false);
    for (const [headers, expires_at] of [
      [manager, null],
      [bearer(admin.accessToken), null],
      [bearer(admin.accessToken), inDays(30)],
    ] as const) {
      const revived = await patch(adminKey.id, headers, { expires_at });
      expect(revived.statusCode, revived.body).toBe(409);
      expect(revived.json()).toMatchObject({
        code: 'conflict',
        errors: [{ field: 'body.expires_at', message: 'cannot change once the key has expired' }],
      });
    }
    const escalation = await app.inject({
      method: 'GET',
      url: '/v1/users',
      headers: withKey(adminKey.key),
    });
    expect(escalation.statusCode).toBe(401);
    expect((await verifyKey(app, admin.accessToken, adminKey.key)).valid).toBe(false);
    // Nor its scopes, nor a new secret for it (dead on arrival).
    const rescoped = await patch(adminKey.id, bearer(admin.accessToken), { scopes: ['account:read'] });
    expect(rescoped.statusCode).toBe(409);
    expect(rescoped.json().errors).toEqual([
      { field: 'body.scopes', message: 'cannot change once the key has expired' },
    ]);
    const rotated = await app.inject({
      method: 'POST',
      url: `/v1/api-keys/${adminKey.id}/rotate`,
      headers: bearer(admin.accessToken),
      payload: {},
    });
    expect(rotated.statusCode, rotated.body).toBe(409);
    // Its owner may still rename it or revoke it.
    expect((await patch(adminKey.id, bearer(admin.accessToken), { name: 'expired, kept' })).statusCode).toBe(
      200,
    );
  });

  it('its owner may lengthen the life of a key whose scopes they no longer all hold: it gives only what they do', async () => {
    const user = await registerUser(app, 'aks-expiry-demoted');
    const role = await grantRole(app, user.id, ['roles:read']);
    const token = (await login(app, user.email, user.password)).session.access_token;
    const inDays = (days: number) => new Date(clock.nowMs() + days * 86_400_000).toISOString();
    const key = await createKey(app, token, {
      scopes: ['account:read', 'roles:read'],
      expires_at: inDays(1),
    });
    await removeRole(app, user.id, role);
    // What the key gives now is account:read, which the owner holds: as for a rotation.
    const later = inDays(30);
    const lengthened = await app.inject({
      method: 'PATCH',
      url: `/v1/api-keys/${key.id}`,
      headers: bearer(token),
      payload: { expires_at: later },
    });
    expect(lengthened.statusCode, lengthened.body).toBe(200);
    expect(lengthened.json().expires_at).toBe(later);
    const roles = await app.inject({ method: 'GET', url: '/v1/roles', headers: withKey(key.key) });
    expect(roles.statusCode).toBe(403);
  });
});

describe('api keys: a request that outlives its session', () => {
  let app: FastifyInstance;
  let reached: () => void = () => {};
  let release: () => void = () => {};

  beforeAll(async () => {
    app = await buildTestApp({
      // Holds a request marked x-test-pause after authentication, before its handler: the request
      // authenticated while its session was live, and reaches the change after the session ended.
      beforeReady: (a) => {
        a.addHook('preHandler', async (request) => {
          if (request.headers['x-test-pause'] === undefined) return;
          reached();
          await new Promise<void>((resolve) => {
            release = resolve;
          });
        });
      },
    });
  });

  /**
   * Sends `request` with the user's token, holds it once authenticated, ends every session of the
   * user (logout everywhere), then lets it reach its change, which must be refused as the token's is.
   */
  async function afterSessionEnds(
    user: TestUser,
    request: { method: 'POST' | 'PATCH'; url: string; payload: object },
  ) {
    const arrived = new Promise<void>((resolve) => {
      reached = resolve;
    });
    const pending = app.inject({
      ...request,
      headers: { ...bearer(user.accessToken), 'x-test-pause': '1' },
    });
    await arrived;
    const out = await app.inject({
      method: 'POST',
      url: '/v1/auth/logout',
      headers: bearer(user.accessToken),
      payload: { scope: 'all' },
    });
    expect(out.statusCode).toBe(204);
    release();
    const res = await pending;
    expect(res.statusCode, res.body).toBe(401);
    expect(res.json().code).toBe('invalid_token');
  }

  const keyCount = async (ownerId: string) =>
    (
      await selectRows<{ n: number }>(
        app.services.db,
        sql`select count(*)::int as n from api_keys where owner_id = ${ownerId}`,
      )
    )[0]?.n;

  // A key with no scopes gives nothing to check against what the caller holds, but it is still a
  // working key: POST /v1/api-keys/verify answers it valid, with its owner.
  it.each([
    ['with scopes', ['account:read']],
    ['with none', []],
  ])(
    'makes no key once the session its token belongs to has ended (logout everywhere, reset), %s',
    async (_, scopes) => {
      const user = await registerUser(app, 'aks-late');
      await afterSessionEnds(user, {
        method: 'POST',
        url: '/v1/api-keys',
        payload: { name: 'late', scopes },
      });
      expect(await keyCount(user.id)).toBe(0);
    },
  );

  type HeldRequest = { method: 'POST' | 'PATCH' | 'DELETE'; url: string; payload?: object };

  /**
   * Sends `request` with `key`, holds it once authenticated, runs `meanwhile` (which must succeed),
   * then lets it reach its change (through `resume`: at once, or e.g. at a later time): 401
   * `invalid_token` with its challenge, its `detail` naming what happened (`what`). What `meanwhile`
   * answered.
   */
  async function heldWhile(
    key: string,
    request: HeldRequest,
    what: string,
    meanwhile: () => Promise<LightMyRequestResponse>,
    resume: (go: () => Promise<LightMyRequestResponse>) => Promise<LightMyRequestResponse> = (go) => go(),
  ) {
    const arrived = new Promise<void>((resolve) => {
      reached = resolve;
    });
    const pending = app.inject({ ...request, headers: { ...withKey(key), 'x-test-pause': '1' } });
    await arrived;
    const done = await meanwhile();
    expect(done.statusCode, done.body).toBeLessThan(300);
    const res = await resume(() => {
      release();
      return pending;
    });
    expect(res.statusCode, res.body).toBe(401);
    expect(res.headers['content-type']).toMatch(/^application\/problem\+json/);
    expect(res.json()).toMatchObject({ code: 'invalid_token', detail: expect.stringContaining(what) });
    expect(res.headers['www-authenticate']).toBe('Bearer realm="paservices", error="invalid_token"');
    return done;
  }

  /**
   * `heldWhile` the owner rotates the key `rotatedId` (with `grace`): the request is refused as made
   * with a secret a rotation replaced. The owner's rotation, as it answered.
   */
  async function afterRotation(
    user: TestUser,
    key: string,
    rotatedId: string,
    grace: number,
    request: HeldRequest,
  ) {
    const rotated = await heldWhile(key, request, 'replaced by a rotation', () =>
      app.inject({
        method: 'POST',
        url: `/v1/api-keys/${rotatedId}/rotate`,
        headers: bearer(user.accessToken),
        payload: { grace_seconds: grace },
      }),
    );
    expect(rotated.statusCode, rotated.body).toBe(200);
    return rotated.json() as { key: string };
  }

  const eventsOf = (type: string, subjectId: string) =>
    app.services.audit.list({ type, subjectId, limit: 10 });

  // Held after authentication as above, the rotation commits in between: the secret the request came
  // with is now the replaced one (working still for a grace, or not at all), which mints nothing.
  it.each([0, 600])(
    'makes no key with a secret a rotation replaced while the request ran (grace %i s): 401, nothing written',
    async (grace) => {
      const user = await registerUser(app, 'aks-late-rotated');
      const parent = await createKey(app, user.accessToken, { scopes: ['account:read', 'api_keys:own'] });
      const request = {
        method: 'POST' as const,
        url: '/v1/api-keys',
        payload: { name: 'minted', scopes: ['account:read'] },
      };
      const rotated = await afterRotation(user, parent.key, parent.id, grace, request);
      expect(await keyCount(user.id)).toBe(1);
      const created = await app.services.audit.list({ actorId: user.id, type: 'api_key.created', limit: 10 });
      expect(created.map((e) => e.subjectId)).toEqual([parent.id]);
      // The new secret mints as before.
      const fresh = await app.inject({ ...request, headers: withKey(rotated.key) });
      expect(fresh.statusCode, fresh.body).toBe(201);
      expect(fresh.json().parent_id).toBe(parent.id);
    },
  );

  // A leaked secret queued behind the owner's rotation (forced, so no running grace stops it) would
  // otherwise take the new secret that rotation made, and with it the key.
  it.each([0, 600])(
    'a key does not rotate itself with a secret a rotation replaced while the request ran (grace %i s)',
    async (grace) => {
      const user = await registerUser(app, 'aks-late-self-rotate');
      const key = await createKey(app, user.accessToken, { scopes: ['account:read', 'api_keys:own'] });
      const url = `/v1/api-keys/${key.id}/rotate`;
      const owners = await afterRotation(user, key.key, key.id, grace, {
        method: 'POST',
        url,
        payload: { grace_seconds: 0, force: true },
      });
      expect(await eventsOf('api_key.rotated', key.id)).toHaveLength(1);
      // The key is the owner's new secret's: it works, and it is the only rotation there was.
      const own = await app.inject({
        method: 'GET',
        url: `/v1/api-keys/${key.id}`,
        headers: withKey(owners.key),
      });
      expect(own.statusCode, own.body).toBe(200);
      expect(own.json().last_four).toBe(owners.key.slice(-4));
    },
  );

  // With no grace the secret is dead once the rotation commits: the key's name, scopes and expiry are
  // the owner's to change with the new one, not the old one's.
  it('a key does not change itself with a secret a rotation replaced while the request ran', async () => {
    const user = await registerUser(app, 'aks-late-self-update');
    const key = await createKey(app, user.accessToken, {
      name: 'mine',
      scopes: ['account:read', 'api_keys:own'],
    });
    await afterRotation(user, key.key, key.id, 0, {
      method: 'PATCH',
      url: `/v1/api-keys/${key.id}`,
      payload: { name: 'taken', scopes: ['api_keys:own'] },
    });
    const after = await app.inject({
      method: 'GET',
      url: `/v1/api-keys/${key.id}`,
      headers: bearer(user.accessToken),
    });
    expect(after.json()).toMatchObject({ name: 'mine', scopes: ['account:read', 'api_keys:own'] });
    expect(await eventsOf('api_key.updated', key.id)).toEqual([]);
  });

  // The key that minted another bounds its life: with its secret replaced (in a 10-minute grace) it may
  // give it no later expiry than the grace's end, which a request that began before the rotation must
  // not escape.
  it('a key does not prolong the key it minted with a secret a rotation replaced while the request ran', async () => {
    const user = await registerUser(app, 'aks-late-prolong');
    const parent = await createKey(app, user.accessToken, {
      scopes: ['account:read', 'api_keys:own'],
      expires_at: new Date(Date.now() + 48 * 3_600_000).toISOString(),
    });
    const soon = new Date(Date.now() + 3_600_000).toISOString();
    const made = await app.inject({
      method: 'POST',
      url: '/v1/api-keys',
      headers: withKey(parent.key),
      payload: { name: 'minted', scopes: ['account:read'], expires_at: soon },
    });
    expect(made.statusCode, made.body).toBe(201);
    const child = made.json() as { id: string; expires_at: string };
    await afterRotation(user, parent.key, parent.id, 600, {
      method: 'PATCH',
      url: `/v1/api-keys/${child.id}`,
      payload: { expires_at: new Date(Date.now() + 47 * 3_600_000).toISOString() },
    });
    const after = await app.inject({
      method: 'GET',
      url: `/v1/api-keys/${child.id}`,
      headers: bearer(user.accessToken),
    });
    expect(after.json().expires_at).toBe(child.expires_at);
    expect(await eventsOf('api_key.updated', child.id)).toEqual([]);
  });

  // Any key a key may change or revoke besides itself (one it minted, one minted under that, a sibling
  // of the same owner): not with a secret a rotation replaced while the request ran, in its grace or
  // not, as for the key itself.
  it.each([
    ['rename the key it minted', 'child', 'PATCH', { name: 'taken' }, 0],
    ['revoke the key it minted', 'child', 'DELETE', undefined, 600],
    ['shorten a key minted under the one it minted', 'grandchild', 'PATCH', { expires_at: 'soon' }, 600],
    ['revoke a key minted under the one it minted', 'grandchild', 'DELETE', undefined, 0],
    ['rename a sibling', 'sibling', 'PATCH', { name: 'taken' }, 600],
    ['revoke a sibling', 'sibling', 'DELETE', undefined, 0],
  ] as const)(
    'a key does not %s (%s) with a secret a rotation replaced while the request ran',
    async (_, target, method, payload, grace) => {
      const user = await registerUser(app, `aks-late-${target}`);
      const scopes = ['account:read', 'api_keys:own'];
      const inHours = (hours: number) => new Date(Date.now() + hours * 3_600_000).toISOString();
      const acting = await createKey(app, user.accessToken, { scopes, expires_at: inHours(48) });
      const mint = (key: string) => mintWith(app, key, { name: 'minted', scopes });
      const changed =
        target === 'sibling'
          ? await createKey(app, user.accessToken, { name: 'sibling', scopes })
          : target === 'child'
            ? await mint(acting.key)
            : await mint((await mint(acting.key)).key);
      const url = `/v1/api-keys/${changed.id}`;
      const read = async () => {
        const res = await app.inject({ method: 'GET', url, headers: bearer(user.accessToken) });
        expect(res.statusCode, res.body).toBe(200);
        return res.json();
      };
      const before = await read();
      await afterRotation(user, acting.key, acting.id, grace, {
        method,
        url,
        ...(payload ? { payload: 'expires_at' in payload ? { expires_at: inHours(1) } : payload } : {}),
      });
      expect(await read()).toEqual(before);
      expect(await eventsOf('api_key.updated', changed.id)).toEqual([]);
      expect(await eventsOf('api_key.revoked', changed.id)).toEqual([]);
    },
  );

  // Revoked meanwhile, the key's own rotation is refused as any other request made with a credential
  // that no longer stands: 401 with its challenge, not a 404 saying the key is gone.
  it('a key revoked while the request ran does not rotate itself: 401, as for any change made with it', async () => {
    const user = await registerUser(app, 'aks-late-revoked-rotate');
    const key = await createKey(app, user.accessToken, { scopes: ['account:read', 'api_keys:own'] });
    await heldWhile(
      key.key,
      { method: 'POST', url: `/v1/api-keys/${key.id}/rotate`, payload: {} },
      'revoked',
      () =>
        app.inject({ method: 'DELETE', url: `/v1/api-keys/${key.id}`, headers: bearer(user.accessToken) }),
    );
    expect(await eventsOf('api_key.rotated', key.id)).toEqual([]);
  });

  // Expired while the request ran: the mint's refusal says so, rather than that the key was revoked.
  it('a key that expired while the request ran mints nothing, and the 401 says it expired', async () => {
    const user = await registerUser(app, 'aks-late-expired-mint');
    const expiresAt = new Date(Date.now() + 3_600_000);
    const key = await createKey(app, user.accessToken, {
      scopes: ['account:read', 'api_keys:own'],
      expires_at: expiresAt.toISOString(),
    });
    await heldWhile(
      key.key,
      { method: 'POST', url: '/v1/api-keys', payload: { name: 'late', scopes: ['account:read'] } },
      'expired',
      () => app.inject({ method: 'GET', url: '/v1/auth/me', headers: bearer(user.accessToken) }),
      (go) => atTime(app, new Date(expiresAt.getTime() + 1000), go),
    );
    expect(await keyCount(user.id)).toBe(1);
  });

  it('gives a key that gives nothing no new secret nor a longer life once the session has ended', async () => {
    const user = await registerUser(app, 'aks-late-key');
    const created = await createKey(app, user.accessToken, {
      scopes: [],
      expires_at: new Date(Date.now() + 86_400_000).toISOString(),
    });
    const row = async () =>
      (
        await selectRows<{ secret_hash: string; expires_at: Date | null }>(
          app.services.db,
          sql`select secret_hash, expires_at from api_keys where id = ${created.id}`,
        )
      )[0];
    const before = await row();
    const url = `/v1/api-keys/${created.id}`;
    await afterSessionEnds(user, { method: 'POST', url: `${url}/rotate`, payload: {} });
    const again = await login(app, user.email);
    await afterSessionEnds(
      { ...user, accessToken: again.session.access_token },
      { method: 'PATCH', url, payload: { expires_at: null } },
    );
    expect(await row()).toEqual(before);
  });
});
