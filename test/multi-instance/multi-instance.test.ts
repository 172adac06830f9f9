import { randomUUID } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { sql } from 'drizzle-orm';
import type { FastifyInstance } from 'fastify';
import { decodeProtectedHeader } from 'jose';
import pg from 'pg';
import pino from 'pino';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import { buildApp } from '../../src/app.js';
import { type DatabaseHandle, MIGRATIONS_FOLDER } from '../../src/db/client.js';
import {
  CLIENT_AUTH_MAX_FAILURES_PER_IP_PER_MINUTE,
  CLIENT_AUTH_MAX_FAILURES_PER_MINUTE,
} from '../../src/modules/oauth/oauth.service.js';
import { CREDENTIAL_RATE_LIMIT, REFRESH_RATE_LIMIT } from '../../src/plugins/rate-limit.js';
import { loginFailuresKey } from '../../src/lib/throttle.js';
import { systemContext } from '../../src/modules/audit/audit.service.js';
import { CLIENT_AUTH_FAILURES_PREFIX, CLIENT_AUTH_IP_FAILURES_PREFIX } from '../../src/services.js';
import { createKey, verifyKey, withKey } from '../api-keys/helpers.js';
import { basic, createClient, form, userWith } from '../clients/helpers.js';
import { testConfig, uniqueEmail } from '../support/app.js';
import { openTestDatabase, scratchDatabase, testDatabase } from '../support/database.js';
import { createAdmin, login, PASSWORD, registerUser } from '../support/factories.js';
import { bearer } from '../support/http.js';
import { randomAddress, redisAnswers, TEST_REDIS_URL } from '../support/redis.js';

/**
 * Two instances of the service on one database, as behind a load balancer: what one instance revokes,
 * the other refuses within 1 s (SECURITY.md "Faults and load"). On PostgreSQL each instance has its own
 * pool and its own LISTEN connection on a database of their own; on PGlite both share the worker's
 * database, which delivers a NOTIFY to every listener in the process.
 */

const PROPAGATION_LIMIT_MS = 1000;
const POLL_INTERVAL_MS = 50;
const REDIS_URL = TEST_REDIS_URL;

const databaseUrl = inject('databaseUrl');
const silent = pino({ level: process.env.TEST_LOG_LEVEL ?? 'silent' });

/** Milliseconds until `check` holds, polling every 50 ms; Infinity when it does not within 3 s. */
async function msUntil(check: () => Promise<boolean>): Promise<number> {
  const start = performance.now();
  for (;;) {
    if (await check()) return performance.now() - start;
    if (performance.now() - start > 3 * PROPAGATION_LIMIT_MS) return Number.POSITIVE_INFINITY;
    await sleep(POLL_INTERVAL_MS);
  }
}

/**
 * Two apps on one database; closed after the file. On PostgreSQL the database is their own, so the
 * key rotations and notifications of test files running in the other worker do not interleave.
 */
async function buildInstances(env: Record<string, string> = {}, envA: Record<string, string> = {}) {
  const scratch = await scratchDatabase('auth_mi');
  const handles = scratch
    ? [await openTestDatabase(scratch.url), await openTestDatabase(scratch.url)]
    : await Promise.all([testDatabase(), testDatabase()]);
  const apps: FastifyInstance[] = [];
  for (const [i, database] of handles.entries()) {
    const app = await buildApp({
      config: testConfig({ ...env, ...(i === 0 ? envA : {}) }),
      database,
      logger: silent,
    });
    await app.ready();
    apps.push(app);
  }
  cleanups.push(async () => {
    await Promise.all(apps.map((app) => app.close()));
    // The worker's shared PGlite handle is not ours to close.
    if (scratch) {
      await Promise.all(handles.map((h) => h.close()));
      await scratch.drop();
    }
  });
  return { a: apps[0]!, b: apps[1]!, url: scratch?.url };
}

// An afterAll registered while a beforeAll runs is never called (vitest 4), so the instances built in
// the hooks below leave their cleanup here, for the file's own afterAll.
const cleanups: Array<() => Promise<void>> = [];
afterAll(async () => {
  for (const cleanup of cleanups.splice(0)) await cleanup();
});

const me = (app: FastifyInstance, token: string) =>
  app.inject({ method: 'GET', url: '/v1/auth/me', headers: bearer(token) });

/** POST /v1/signing-keys/rotate on `app` with an administrator's token. */
const rotateKeys = (app: FastifyInstance, token: string, payload: Record<string, unknown>) =>
  app.inject({ method: 'POST', url: '/v1/signing-keys/rotate', headers: bearer(token), payload });

/** Resolves once the token is refused by `app`; the time it took. */
const msUntilRefused = (app: FastifyInstance, token: string) =>
  msUntil(async () => (await me(app, token)).statusCode === 401);

describe('several instances on one database: revocations reach every instance within 1 s', () => {
  let a: FastifyInstance;
  let b: FastifyInstance;
  beforeAll(async () => {
    // Instance A answers a replayed refresh token at once (no grace), so family revocation is testable.
    ({ a, b } = await buildInstances({}, { REFRESH_REUSE_GRACE_SECONDS: '0' }));
  });

  it('a logout on A makes the access token fail on B', async () => {
    const user = await registerUser(a, 'mi-logout');
    expect((await me(b, user.accessToken)).statusCode).toBe(200);
    const out = await a.inject({ method: 'POST', url: '/v1/auth/logout', headers: bearer(user.accessToken) });
    expect(out.statusCode).toBe(204);
    expect(await msUntilRefused(b, user.accessToken)).toBeLessThan(PROPAGATION_LIMIT_MS);
  });

  it('a refresh-token replay on A ends the family, and B refuses its access token', async () => {
    const user = await registerUser(a, 'mi-family');
    const rotated = await a.inject({
      method: 'POST',
      url: '/v1/auth/refresh',
      payload: { refresh_token: user.refreshToken },
    });
    expect(rotated.statusCode).toBe(200);
    const accessToken = rotated.json().session.access_token as string;
    expect((await me(b, accessToken)).statusCode).toBe(200);

    await sleep(5); // past A's zero grace
    const replay = await a.inject({
      method: 'POST',
      url: '/v1/auth/refresh',
      payload: { refresh_token: user.refreshToken },
    });
    expect(replay.statusCode).toBe(401);
    expect(await msUntilRefused(b, accessToken)).toBeLessThan(PROPAGATION_LIMIT_MS);
  });

  it('a logout of every session on A makes every access token of the user fail on B', async () => {
    const user = await registerUser(a, 'mi-all');
    const onB = await login(b, user.email);
    const tokens = [user.accessToken, onB.session.access_token];
    for (const token of tokens) expect((await me(b, token)).statusCode).toBe(200);
    const out = await a.inject({
      method: 'POST',
      url: '/v1/auth/logout',
      headers: bearer(user.accessToken),
      payload: { scope: 'all' },
    });
    expect(out.statusCode).toBe(204);
    const elapsed = await msUntil(async () => {
      const answers = await Promise.all(tokens.map((t) => me(b, t)));
      return answers.every((r) => r.statusCode === 401);
    });
    expect(elapsed).toBeLessThan(PROPAGATION_LIMIT_MS);
  });

  it('ending 80 sessions at once (past one notification’s 8000 bytes) answers 204, and B refuses every token within 1 s', async () => {
    const user = await registerUser(a, 'mi-many');
    const sessions = [{ access_token: user.accessToken, refresh_token: user.refreshToken }];
    for (let batch = 0; batch < 8; batch++)
      sessions.push(
        ...(await Promise.all(Array.from({ length: 10 }, () => login(a, user.email)))).map((r) => r.session),
      );
    for (const s of [sessions[0]!, sessions[80]!]) expect((await me(b, s.access_token)).statusCode).toBe(200);
    const out = await a.inject({
      method: 'POST',
      url: '/v1/auth/logout',
      headers: bearer(user.accessToken),
      payload: { scope: 'all' },
    });
    expect(out.statusCode, out.body).toBe(204);
    const elapsed = await msUntil(async () => {
      const answers = await Promise.all(sessions.map((s) => me(b, s.access_token)));
      return answers.every((r) => r.statusCode === 401);
    });
    expect(elapsed).toBeLessThan(PROPAGATION_LIMIT_MS);
    const refreshed = await b.inject({
      method: 'POST',
      url: '/v1/auth/refresh',
      payload: { refresh_token: sessions[40]!.refresh_token },
    });
    expect(refreshed.statusCode).toBe(401);
  });

  it('an access token revoked on A (POST /oauth/revoke, by its jti) is refused by B', async () => {
    const user = await registerUser(a, 'mi-jti');
    expect((await me(b, user.accessToken)).statusCode).toBe(200);
    const revoked = await form(a, '/oauth/revoke', { token: user.accessToken }, bearer(user.accessToken));
    expect(revoked.statusCode, revoked.body).toBe(200);
    expect(await msUntilRefused(b, user.accessToken)).toBeLessThan(PROPAGATION_LIMIT_MS);
  });

  it('a user disabled on A (PATCH /v1/users/{id}) is refused by B', async () => {
    const admin = await createAdmin(a);
    const user = await registerUser(a, 'mi-disabled');
    expect((await me(b, user.accessToken)).statusCode).toBe(200);
    const disabled = await a.inject({
      method: 'PATCH',
      url: `/v1/users/${user.id}`,
      headers: bearer(admin.accessToken),
      payload: { status: 'disabled' },
    });
    expect(disabled.statusCode, disabled.body).toBe(200);
    expect(await msUntilRefused(b, user.accessToken)).toBeLessThan(PROPAGATION_LIMIT_MS);
    const res = await b.inject({
      method: 'POST',
      url: '/v1/auth/login',
      payload: { email: user.email, password: PASSWORD },
    });
    expect(res.statusCode).toBe(401);
  });

  it('an API key revoked on A stops working on B', async () => {
    const user = await registerUser(a, 'mi-apikey');
    const { id, key } = await createKey(a, user.accessToken, { scopes: ['account:read'] });
    const meOnB = () => b.inject({ method: 'GET', url: '/v1/auth/me', headers: withKey(key) });
    expect((await meOnB()).statusCode).toBe(200); // B has looked the key up (and cached it)
    const revoked = await a.inject({
      method: 'DELETE',
      url: `/v1/api-keys/${id}`,
      headers: bearer(user.accessToken),
    });
    expect(revoked.statusCode).toBe(204);
    expect(await msUntil(async () => (await meOnB()).statusCode === 401)).toBeLessThan(PROPAGATION_LIMIT_MS);
  });

  it('an API key rotated on A without grace: B refuses the old secret (it had remembered) and takes the new', async () => {
    const user = await registerUser(a, 'mi-apikey-rotate');
    const { id, key } = await createKey(a, user.accessToken, { scopes: ['account:read'] });
    const onB = (k: string) => b.inject({ method: 'GET', url: '/v1/auth/me', headers: withKey(k) });
    // B verifies the secret and remembers that it matched.
    expect((await onB(key)).statusCode).toBe(200);
    expect((await onB(key)).statusCode).toBe(200);
    const rotated = await a.inject({
      method: 'POST',
      url: `/v1/api-keys/${id}/rotate`,
      headers: bearer(user.accessToken),
    });
    expect(rotated.statusCode, rotated.body).toBe(200);
    expect(await msUntil(async () => (await onB(key)).statusCode === 401)).toBeLessThan(PROPAGATION_LIMIT_MS);
    expect((await onB(rotated.json().key)).statusCode).toBe(200);
  });

  it('a key narrowed on A: the key it minted, cached on B, is narrowed on B by the same notification', async () => {
    const admin = await createAdmin(a);
    const user = await registerUser(a, 'mi-apikey-narrow');
    const parent = await createKey(a, user.accessToken, { scopes: ['account:read', 'api_keys:own'] });
    const minted = await a.inject({
      method: 'POST',
      url: '/v1/api-keys',
      headers: withKey(parent.key),
      payload: { name: 'minted', scopes: ['account:read', 'api_keys:own'] },
    });
    expect(minted.statusCode, minted.body).toBe(201);
    const child = minted.json() as { key: string };
    const meOnB = () => b.inject({ method: 'GET', url: '/v1/auth/me', headers: withKey(child.key) });
    expect((await meOnB()).statusCode).toBe(200); // B has looked the key up (and cached it)
    // The parent's change and the child's travel in one notification (one transaction), in that order,
    // and B applies all of its events at once: once B has the parent's, it has the child's.
    const heard = new Promise<void>((resolve) =>
      b.services.events.subscribe((e) => {
        if (e.type === 'api_key_changed' && e.lookupId === parent.prefix.slice('pak_'.length)) resolve();
      }),
    );
    const narrowed = await a.inject({
      method: 'PATCH',
      url: `/v1/api-keys/${parent.id}`,
      headers: bearer(user.accessToken),
      payload: { scopes: ['api_keys:own'] },
    });
    expect(narrowed.statusCode, narrowed.body).toBe(200);
    await heard;
    expect((await meOnB()).statusCode).toBe(403);
    expect(await verifyKey(b, admin.accessToken, child.key)).toMatchObject({
      valid: true,
      scopes: ['api_keys:own'],
    });
  });

  it('a role removed on A takes its permission from the owner’s API key on B', async () => {
    const admin = await createAdmin(a);
    const role = `mi-readers-${randomUUID().slice(0, 8)}`;
    const made = await a.inject({
      method: 'POST',
      url: '/v1/roles',
      headers: bearer(admin.accessToken),
      payload: { name: role, permissions: ['users:read'] },
    });
    expect(made.statusCode, made.body).toBe(201);
    const user = await registerUser(a, 'mi-role');
    const granted = await a.inject({
      method: 'PUT',
      url: `/v1/users/${user.id}/roles/${role}`,
      headers: bearer(admin.accessToken),
    });
    expect(granted.statusCode, granted.body).toBeLessThan(300);
    const fresh = await login(a, user.email);
    const { key } = await createKey(a, fresh.session.access_token, { scopes: ['users:read'] });
    const readOnB = () => b.inject({ method: 'GET', url: `/v1/users/${user.id}`, headers: withKey(key) });
    expect((await readOnB()).statusCode).toBe(200);

    const removed = await a.inject({
      method: 'DELETE',
      url: `/v1/users/${user.id}/roles/${role}`,
      headers: bearer(admin.accessToken),
    });
    expect(removed.statusCode, removed.body).toBe(204);
    expect(await msUntil(async () => (await readOnB()).statusCode === 403)).toBeLessThan(
      PROPAGATION_LIMIT_MS,
    );
  });

  it('a client secret rotated on A without grace stops working on B', async () => {
    const admin = await createAdmin(a);
    const client = await createClient(a, admin.accessToken, { scopes: ['users:read'] });
    const tokenOnB = () =>
      form(
        b,
        '/oauth/token',
        { grant_type: 'client_credentials' },
        basic(client.client_id, client.client_secret),
      );
    expect((await tokenOnB()).statusCode).toBe(200); // B has authenticated the client (and cached it)
    const rotated = await a.inject({
      method: 'POST',
      url: `/v1/clients/${client.id}/secrets`,
      headers: bearer(admin.accessToken),
      payload: { grace_seconds: 0 },
    });
    expect(rotated.statusCode, rotated.body).toBeLessThan(300);
    expect(await msUntil(async () => (await tokenOnB()).statusCode === 401)).toBeLessThan(
      PROPAGATION_LIMIT_MS,
    );
  });

  /** The role `userWith` made for `userId`. */
  const testRoleOf = async (userId: string) =>
    (await a.services.repos.users.rolesAndPermissions(userId)).roles.find((r) => r.startsWith('test-'))!;

  it('a role narrowed or deleted on A: its holders’ API keys on B lose what it gave', async () => {
    const admin = await createAdmin(a);
    const [narrowed, deleted] = await Promise.all([
      userWith(a, ['users:read', 'account:read'], 'mi-role-narrowed'),
      userWith(a, ['users:read'], 'mi-role-deleted'),
    ]);
    const keys = await Promise.all(
      [narrowed, deleted].map((u) => createKey(a, u.accessToken, { scopes: ['users:read'] })),
    );
    const readOnB = (i: number) =>
      b.inject({
        method: 'GET',
        url: `/v1/users/${[narrowed, deleted][i]!.id}`,
        headers: withKey(keys[i]!.key),
      });
    for (const i of [0, 1]) expect((await readOnB(i)).statusCode).toBe(200);
    const changes = await Promise.all([
      a.inject({
        method: 'PATCH',
        url: `/v1/roles/${await testRoleOf(narrowed.id)}`,
        headers: bearer(admin.accessToken),
        payload: { permissions: ['account:read'] },
      }),
      a.inject({
        method: 'DELETE',
        url: `/v1/roles/${await testRoleOf(deleted.id)}`,
        headers: bearer(admin.accessToken),
      }),
    ]);
    for (const change of changes) expect(change.statusCode, change.body).toBeLessThan(300);
    const elapsed = await msUntil(async () =>
      (await Promise.all([readOnB(0), readOnB(1)])).every((r) => r.statusCode === 403),
    );
    expect(elapsed).toBeLessThan(PROPAGATION_LIMIT_MS);
  });

  it('a user deleted on A, by an administrator or by themselves: B answers their API keys not_found', async () => {
    const admin = await createAdmin(a);
    const [removed, leaving] = await Promise.all([
      registerUser(a, 'mi-deleted'),
      registerUser(a, 'mi-leaving'),
    ]);
    const keys = await Promise.all(
      [removed, leaving].map((u) => createKey(a, u.accessToken, { scopes: ['account:read'] })),
    );
    const verifyOnB = (key: string) => verifyKey(b, admin.accessToken, key);
    for (const { key } of keys) expect(await verifyOnB(key)).toMatchObject({ valid: true });
    const deletions = await Promise.all([
      a.inject({ method: 'DELETE', url: `/v1/users/${removed.id}`, headers: bearer(admin.accessToken) }),
      a.inject({
        method: 'DELETE',
        url: '/v1/auth/me',
        headers: bearer(leaving.accessToken),
        payload: { password: PASSWORD },
      }),
    ]);
    for (const deletion of deletions) expect(deletion.statusCode, deletion.body).toBe(204);
    const elapsed = await msUntil(async () =>
      (await Promise.all(keys.map(({ key }) => verifyOnB(key)))).every(
        (r) => r.valid === false && r.reason === 'not_found',
      ),
    );
    expect(elapsed).toBeLessThan(PROPAGATION_LIMIT_MS);
  });

  it('a client disabled, deleted or narrowed on A: B refuses the secrets it remembered, and narrows its tokens', async () => {
    const admin = await createAdmin(a);
    const [disabled, deleted, narrowed] = await Promise.all([
      createClient(a, admin.accessToken, { scopes: ['tokens:introspect'] }),
      createClient(a, admin.accessToken, { scopes: ['tokens:introspect'] }),
      createClient(a, admin.accessToken, { scopes: ['tokens:introspect', 'users:read'] }),
    ]);
    // Introspection with the same Basic header twice: B remembers it (answered from memory after).
    const introspectOnB = (client: { client_id: string; client_secret: string }) =>
      form(b, '/oauth/introspect', { token: 'x.y.z' }, basic(client.client_id, client.client_secret));
    const tokenOnB = () =>
      form(
        b,
        '/oauth/token',
        { grant_type: 'client_credentials' },
        basic(narrowed.client_id, narrowed.client_secret),
      );
    for (let i = 0; i < 2; i++)
      for (const client of [disabled, deleted]) expect((await introspectOnB(client)).statusCode).toBe(200);
    expect((await tokenOnB()).json().scope).toBe('tokens:introspect users:read');
    const changes = await Promise.all([
      a.inject({
        method: 'PATCH',
        url: `/v1/clients/${disabled.id}`,
        headers: bearer(admin.accessToken),
        payload: { status: 'disabled' },
      }),
      a.inject({ method: 'DELETE', url: `/v1/clients/${deleted.id}`, headers: bearer(admin.accessToken) }),
      a.inject({
        method: 'PATCH',
        url: `/v1/clients/${narrowed.id}`,
        headers: bearer(admin.accessToken),
        payload: { scopes: ['tokens:introspect'] },
      }),
    ]);
    for (const change of changes) expect(change.statusCode, change.body).toBeLessThan(300);
    const elapsed = await msUntil(async () => {
      const refused = await Promise.all([introspectOnB(disabled), introspectOnB(deleted)]);
      return (
        refused.every((r) => r.statusCode === 401) && (await tokenOnB()).json().scope === 'tokens:introspect'
      );
    });
    expect(elapsed).toBeLessThan(PROPAGATION_LIMIT_MS);
  });

  it('the creator of a client acting for them loses a role on A: B’s tokens for the client carry less', async () => {
    const admin = await createAdmin(a);
    const creator = await userWith(a, ['clients:write', 'users:read', 'account:read'], 'mi-creator');
    const client = await createClient(a, creator.accessToken, { scopes: ['users:read', 'account:read'] });
    expect(client.acts_for_creator).toBe(true);
    const tokenOnB = () =>
      form(
        b,
        '/oauth/token',
        { grant_type: 'client_credentials' },
        basic(client.client_id, client.client_secret),
      );
    expect((await tokenOnB()).json().scope).toBe('account:read users:read');
    // What the creator keeps: the `user` role's account:read.
    const removed = await a.inject({
      method: 'DELETE',
      url: `/v1/users/${creator.id}/roles/${await testRoleOf(creator.id)}`,
      headers: bearer(admin.accessToken),
    });
    expect(removed.statusCode, removed.body).toBe(204);
    expect(await msUntil(async () => (await tokenOnB()).json().scope === 'account:read')).toBeLessThan(
      PROPAGATION_LIMIT_MS,
    );
  });

  it('create-admin granting admin to an existing user (bootstrapAdmin, forced) reaches B’s /v1/auth/me', async () => {
    const user = await registerUser(a, 'mi-create-admin');
    const rolesOnB = async () => (await me(b, user.accessToken)).json().roles as string[];
    expect(await rolesOnB()).toEqual(['user']);
    // What scripts/create-admin.ts runs: its own services, which do not listen, send the same NOTIFY.
    const granted = await a.services.auth.bootstrapAdmin(
      { email: user.email, password: undefined, force: true },
      { ...systemContext, userAgent: 'scripts/create-admin' },
    );
    expect(granted).toMatchObject({ created: false, granted: true });
    expect(await msUntil(async () => (await rolesOnB()).includes('admin'))).toBeLessThan(
      PROPAGATION_LIMIT_MS,
    );
  });

  it('a signing-key rotation on A: B signs with the new key within 1 s, and only with published keys', async () => {
    const admin = await createAdmin(a);
    const jwksKids = async (app: FastifyInstance) =>
      (
        (await app.inject({ method: 'GET', url: '/.well-known/jwks.json' })).json().keys as Array<{
          kid: string;
        }>
      )
        .map((k) => k.kid)
        .sort();
    const publishedBefore = await jwksKids(a);
    // B publishes what A publishes: both read the same keys.
    expect(await jwksKids(b)).toEqual(publishedBefore);

    // B's tokens come from refreshes on B; each one is signed with B's active key at that moment.
    let refreshToken = (await login(b, admin.email)).session.refresh_token;
    const signOnB = async () => {
      const res = await b.inject({
        method: 'POST',
        url: '/v1/auth/refresh',
        payload: { refresh_token: refreshToken },
      });
      expect(res.statusCode, res.body).toBe(200);
      refreshToken = res.json().session.refresh_token;
      return decodeProtectedHeader(res.json().session.access_token).kid!;
    };
    const oldKid = await signOnB();

    // force: the next key was published seconds ago, at the instances' start.
    const rotate = await rotateKeys(a, admin.accessToken, { force: true });
    expect(rotate.statusCode, rotate.body).toBe(200);
    const newKid = rotate.json().active_kid as string;
    expect(newKid).not.toBe(oldKid);
    // The new active key was A's published `next` key before it ever signed.
    expect(publishedBefore).toContain(newKid);

    const kidsSignedByB: string[] = [];
    const elapsed = await msUntil(async () => {
      const kid = await signOnB();
      kidsSignedByB.push(kid);
      return kid === newKid;
    });
    expect(elapsed).toBeLessThan(PROPAGATION_LIMIT_MS);
    for (const kid of kidsSignedByB) expect(publishedBefore).toContain(kid);
    const publishedByB = await jwksKids(b);
    expect(publishedByB).toContain(newKid);
    expect(publishedByB).toContain(oldKid); // still verifying the tokens it signed
  });
});

describe('an emergency signing-key rotation on A, while B issues tokens', () => {
  let a: FastifyInstance;
  let b: FastifyInstance;
  /** How long B's reads of the signing keys outside a transaction (its reloads) take while slow. */
  const SLOW_READ_MS = 300;
  let slowReadsOnB = false;
  // Instances of their own: the rotation here revokes every key they share.
  beforeAll(async () => {
    ({ a, b } = await buildInstances());
    const repo = b.services.repos.signingKeys;
    const listPublished = repo.listPublished;
    repo.listPublished = async (now, tx) => {
      if (slowReadsOnB && tx === undefined) await sleep(SLOW_READ_MS);
      return listPublished(now, tx);
    };
  });

  it('B hands out no token signed with a revoked key once it has heard of the revocation, though its reload is slow', async () => {
    const admin = await createAdmin(a);
    const client = await createClient(a, admin.accessToken, { scopes: ['users:read'] });
    const auth = basic(client.client_id, client.client_secret);
    // When each of B's issuances ended, and when B heard of the rotation.
    const issuedAt = new Map<string, number>();
    const { tokens } = b.services;
    const issue = tokens.issue.bind(tokens);
    tokens.issue = async (input) => {
      const issued = await issue(input);
      issuedAt.set(issued.token, performance.now());
      return issued;
    };
    let heardAt: number | undefined;
    b.services.events.subscribe((event) => {
      if (event.type === 'signing_keys_changed') heardAt ??= performance.now();
    });
    const issuedOnB: string[] = [];
    let stopAt = Number.POSITIVE_INFINITY;
    const issuing = (async () => {
      while (performance.now() < stopAt) {
        await Promise.all(
          Array.from({ length: 8 }, async () => {
            const res = await form(b, '/oauth/token', { grant_type: 'client_credentials' }, auth);
            expect(res.statusCode, res.body).toBe(200);
            issuedOnB.push(res.json().access_token);
          }),
        );
      }
    })();
    try {
      // Tokens on both sides of the rotation: some are issued before it.
      while (issuedOnB.length < 16) await Promise.race([sleep(10), issuing]);
      slowReadsOnB = true;
      const rotated = await rotateKeys(a, admin.accessToken, { revoke_previous: true });
      expect(rotated.statusCode, rotated.body).toBe(200);
      expect(await msUntil(async () => heardAt !== undefined)).toBeLessThan(PROPAGATION_LIMIT_MS);
      stopAt = performance.now() + 2 * SLOW_READ_MS;
      await issuing;
      const { active_kid: newKid, previous_kid: oldKid } = rotated.json();

      const before = issuedOnB.filter((token) => issuedAt.get(token)! < heardAt!);
      const after = issuedOnB.filter((token) => issuedAt.get(token)! > heardAt!);
      expect(before.length).toBeGreaterThan(0);
      expect(after.length).toBeGreaterThan(0);
      expect(decodeProtectedHeader(before[0]!).kid).toBe(oldKid);
      // B signs with the new key only once its own JWKS shows it.
      expect(JSON.parse(b.services.keys.jwks()).keys.map((k: { kid: string }) => k.kid)).toContain(newKid);
      const dead: string[] = [];
      for (const token of after) {
        const introspected = await form(a, '/oauth/introspect', { token }, auth);
        if (decodeProtectedHeader(token).kid !== newKid || introspected.json().active !== true)
          dead.push(token);
      }
      expect(dead, `${dead.length} of ${after.length} tokens B issued after it heard`).toEqual([]);
    } finally {
      stopAt = 0;
      await issuing.catch(() => undefined);
      slowReadsOnB = false;
      tokens.issue = issue;
    }
  });
});

describe('a next signing key made by A’s ensureKeys (none was left)', () => {
  let a: FastifyInstance;
  let b: FastifyInstance;
  // Instances of their own: the next key they share is retired here.
  beforeAll(async () => {
    ({ a, b } = await buildInstances());
  });

  it('B publishes it within 1 s, through the notification, not at its minute’s reload', async () => {
    const jwksKids = (app: FastifyInstance) =>
      (JSON.parse(app.services.keys.jwks()).keys as Array<{ kid: string }>).map((k) => k.kid);
    const next = () => a.services.keys.loadedKeys().find((k) => k.state === 'next')?.kid;
    const before = next();
    expect(before).toBeDefined();
    // No next key left (as on a database an operator edited): the minute's ensureKeys makes one.
    await a.services.db.execute(
      sql`UPDATE signing_keys SET state = 'retired', publish_until = now() WHERE state = 'next'`,
    );
    await a.services.keys.ensureKeys();
    const made = next();
    expect(made).toBeDefined();
    expect(made).not.toBe(before);
    // It counts as published from its creation: a rotation 10 minutes on signs with it, and B's JWKS
    // must have been showing it all along, not from B's next reload (up to a minute later).
    expect(await msUntil(async () => jwksKids(b).includes(made!))).toBeLessThan(PROPAGATION_LIMIT_MS);
    expect(jwksKids(b)).not.toContain(before);
  });
});

if (!databaseUrl)
  console.info(
    'multi-instance: two instances starting on an empty database is a PostgreSQL case (CREATE DATABASE, ' +
      'advisory locks); not run on PGlite. Set TEST_DATABASE_URL (or have Docker) to run it.',
  );

describe('several instances with MAX_SESSIONS_PER_USER: a session a sign-in on A ends is refused by B', () => {
  let a: FastifyInstance;
  let b: FastifyInstance;
  beforeAll(async () => {
    ({ a, b } = await buildInstances({ MAX_SESSIONS_PER_USER: '2' }));
  });

  it('the third sign-in on A ends the first session, and B refuses its access token within 1 s', async () => {
    const user = await registerUser(a, 'mi-cap');
    const second = await login(b, user.email);
    expect((await me(b, user.accessToken)).statusCode).toBe(200);
    await sleep(5); // the sessions told apart by when they were last used
    const third = await login(a, user.email);
    expect(await msUntilRefused(b, user.accessToken)).toBeLessThan(PROPAGATION_LIMIT_MS);
    for (const session of [second.session, third.session])
      expect((await me(b, session.access_token)).statusCode).toBe(200);
  });
});

/**
 * Ends the LISTEN connections of the instances on the database at `url` (their last statement is the
 * LISTEN or the heartbeat's SELECT 1): each reconnects after 250 ms and resyncs. What commits meanwhile
 * is a notification nobody hears. The number ended.
 */
async function endListeners(url: string): Promise<number> {
  const client = new pg.Client({ connectionString: url });
  await client.connect();
  try {
    const ended = await client.query(
      `SELECT pg_terminate_backend(pid) FROM pg_stat_activity
        WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'
          AND (query LIKE 'LISTEN %' OR query = 'SELECT 1')`,
    );
    return ended.rowCount ?? 0;
  } finally {
    await client.end();
  }
}

/** The next call of `repo[method]` outside a transaction (a reload) fails, as on a dead pooled connection. */
function failNextRead<R extends Record<M, (...args: never[]) => Promise<unknown>>, M extends keyof R>(
  repo: R,
  method: M,
): { failed: () => boolean } {
  const original = repo[method];
  let failed = false;
  repo[method] = (async (...args: never[]) => {
    // A read on a transaction (the minute's ensureKeys) has its own connection: not this one.
    if (!failed && args[1] === undefined) {
      failed = true;
      repo[method] = original;
      throw new Error('Connection terminated unexpectedly');
    }
    return original.apply(repo, args);
  }) as R[M];
  return { failed: () => failed };
}

describe.runIf(databaseUrl)(
  'B’s LISTEN connection dropped while A changes things: B catches up once it is back',
  () => {
    let a: FastifyInstance;
    let b: FastifyInstance;
    let url: string;
    let admin: Awaited<ReturnType<typeof createAdmin>>;
    /** Within the reconnect's 250 ms backoff, its connection, and the reads of the resync. */
    const RECONNECTED_LIMIT_MS = 1500;
    beforeAll(async () => {
      const built = await buildInstances();
      ({ a, b } = built);
      url = built.url!;
      admin = await createAdmin(a);
    });

    it('an API key revoked, a client disabled and an owner disabled while B was deaf: B answers each anew', async () => {
      const user = await registerUser(a, 'mi-deaf');
      const { id, key } = await createKey(a, user.accessToken, { scopes: ['account:read'] });
      const owner = await registerUser(a, 'mi-deaf-owner');
      const ownersKey = (await createKey(a, owner.accessToken, { scopes: ['account:read'] })).key;
      const client = await createClient(a, admin.accessToken, { scopes: ['tokens:introspect'] });
      const meOnB = (k: string) => b.inject({ method: 'GET', url: '/v1/auth/me', headers: withKey(k) });
      const introspectOnB = () =>
        form(b, '/oauth/introspect', { token: 'x.y.z' }, basic(client.client_id, client.client_secret));
      // Cached on B, the client's secret remembered too.
      for (let i = 0; i < 2; i++) {
        expect((await meOnB(key)).statusCode).toBe(200);
        expect((await meOnB(ownersKey)).statusCode).toBe(200);
        expect((await introspectOnB()).statusCode).toBe(200);
      }

      expect(await endListeners(url)).toBe(2);
      const changes = await Promise.all([
        a.inject({ method: 'DELETE', url: `/v1/api-keys/${id}`, headers: bearer(user.accessToken) }),
        a.inject({
          method: 'PATCH',
          url: `/v1/clients/${client.id}`,
          headers: bearer(admin.accessToken),
          payload: { status: 'disabled' },
        }),
        a.inject({
          method: 'PATCH',
          url: `/v1/users/${owner.id}`,
          headers: bearer(admin.accessToken),
          payload: { status: 'disabled' },
        }),
      ]);
      for (const change of changes) expect(change.statusCode, change.body).toBeLessThan(300);
      const elapsed = await msUntil(async () => {
        const answers = await Promise.all([meOnB(key), meOnB(ownersKey), introspectOnB()]);
        return answers.every((r) => r.statusCode === 401);
      });
      expect(elapsed).toBeLessThan(RECONNECTED_LIMIT_MS);
    });

    it('the resync’s read of the revocations fails: it is tried again, and a token revoked meanwhile is refused', async () => {
      const user = await registerUser(a, 'mi-resync-revocations');
      expect((await me(b, user.accessToken)).statusCode).toBe(200);
      const read = failNextRead(b.services.repos.revocations, 'listLive');
      expect(await endListeners(url)).toBe(2);
      const revoked = await form(a, '/oauth/revoke', { token: user.accessToken }, bearer(user.accessToken));
      expect(revoked.statusCode, revoked.body).toBe(200);
      expect(await msUntilRefused(b, user.accessToken)).toBeLessThan(RECONNECTED_LIMIT_MS);
      expect(read.failed()).toBe(true);
    });

    it('the resync’s read of the signing keys fails: it is tried again, and keys revoked meanwhile stop verifying', async () => {
      const user = await registerUser(a, 'mi-resync-keys');
      const onB = (await login(b, user.email)).session.access_token;
      expect((await me(b, onB)).statusCode).toBe(200);
      const read = failNextRead(b.services.repos.signingKeys, 'listPublished');
      expect(await endListeners(url)).toBe(2);
      const rotated = await rotateKeys(a, admin.accessToken, { revoke_previous: true });
      expect(rotated.statusCode, rotated.body).toBe(200);
      expect(decodeProtectedHeader(onB).kid).not.toBe(rotated.json().active_kid);
      expect(await msUntilRefused(b, onB)).toBeLessThan(RECONNECTED_LIMIT_MS);
      expect(read.failed()).toBe(true);
      // And B signs with the new key.
      const fresh = (await login(b, user.email)).session.access_token;
      expect(decodeProtectedHeader(fresh).kid).toBe(rotated.json().active_kid);
    });
  },
);

describe.runIf(databaseUrl)('a change whose COMMIT answer A never got, though it committed', () => {
  let a: FastifyInstance;
  let b: FastifyInstance;
  beforeAll(async () => {
    ({ a, b } = await buildInstances());
  });

  /**
   * A's next transaction commits, and A is told it failed (its connection lost with the COMMIT's
   * answer, or the client-side timeout firing as the server committed): A applies none of its events.
   */
  function loseNextCommitAnswer(app: FastifyInstance) {
    const db = app.services.db;
    const transaction = db.transaction;
    db.transaction = (async (...args: Parameters<typeof transaction>) => {
      db.transaction = transaction;
      await transaction.apply(db, args);
      throw new Error('Connection terminated unexpectedly');
    }) as typeof transaction;
  }

  it('A learns of its own revocation from its notification: the token is refused on A as on B', async () => {
    const user = await registerUser(a, 'mi-lost-commit');
    expect((await me(a, user.accessToken)).statusCode).toBe(200);
    expect((await me(b, user.accessToken)).statusCode).toBe(200);
    loseNextCommitAnswer(a);
    const logout = await a.inject({
      method: 'POST',
      url: '/v1/auth/logout',
      headers: bearer(user.accessToken),
    });
    expect(logout.statusCode).toBeGreaterThanOrEqual(500);
    // It did commit: B, which heard the notification, refuses the token.
    expect(await msUntilRefused(b, user.accessToken)).toBeLessThan(PROPAGATION_LIMIT_MS);
    expect(await msUntilRefused(a, user.accessToken)).toBeLessThan(PROPAGATION_LIMIT_MS);
  });

  it('A learns of its own API-key revocation from its notification: the key stops working on A', async () => {
    const user = await registerUser(a, 'mi-lost-commit-key');
    const { id, key } = await createKey(a, user.accessToken, { scopes: ['account:read'] });
    const onA = () => a.inject({ method: 'GET', url: '/v1/auth/me', headers: withKey(key) });
    expect((await onA()).statusCode).toBe(200);
    loseNextCommitAnswer(a);
    const revoked = await a.inject({
      method: 'DELETE',
      url: `/v1/api-keys/${id}`,
      headers: bearer(user.accessToken),
    });
    expect(revoked.statusCode).toBeGreaterThanOrEqual(500);
    expect(await msUntil(async () => (await onA()).statusCode === 401)).toBeLessThan(PROPAGATION_LIMIT_MS);
  });
});

describe.runIf(databaseUrl)('an instance starting while another revokes the signing keys', () => {
  it('B, whose keys were read just before it listened, drops the keys A revoked in between within 1 s', async () => {
    const scratch = (await scratchDatabase('auth_mi'))!;
    const handles: DatabaseHandle[] = [];
    const apps: FastifyInstance[] = [];
    try {
      handles.push(await openTestDatabase(scratch.url));
      const a = await buildApp({ config: testConfig(), database: handles[0]!, logger: silent });
      apps.push(a);
      await a.ready();
      const admin = await createAdmin(a);
      const user = await registerUser(a, 'mi-start');
      // B reads the keys at its start, then listens; A's emergency rotation commits in between, so its
      // notification reaches nobody on B.
      const database = await openTestDatabase(scratch.url);
      handles.push(database);
      const listen = database.listen.bind(database);
      let rotated: { active_kid: string } | undefined;
      database.listen = async (channel, handler) => {
        const res = await rotateKeys(a, admin.accessToken, { revoke_previous: true });
        expect(res.statusCode, res.body).toBe(200);
        rotated = res.json();
        return listen(channel, handler);
      };
      const b = await buildApp({ config: testConfig(), database, logger: silent });
      apps.push(b);
      await b.ready();
      expect(rotated).toBeDefined();
      expect(decodeProtectedHeader(user.accessToken).kid).not.toBe(rotated!.active_kid);
      expect((await me(a, user.accessToken)).statusCode).toBe(401);
      expect(await msUntilRefused(b, user.accessToken)).toBeLessThan(PROPAGATION_LIMIT_MS);
      const fresh = (await login(b, user.email)).session.access_token;
      expect(decodeProtectedHeader(fresh).kid).toBe(rotated!.active_kid);
    } finally {
      await Promise.all(apps.map((app) => app.close()));
      await Promise.all(handles.map((h) => h.close()));
      await scratch.drop();
    }
  });
});

describe.runIf(databaseUrl)('several instances starting together on an empty PostgreSQL database', () => {
  it('both come up, and the migrations and the first signing keys are made once', async () => {
    const scratch = (await scratchDatabase('auth_mi'))!;
    const handles: DatabaseHandle[] = [];
    const apps: FastifyInstance[] = [];
    try {
      const start = async () => {
        const database = await openTestDatabase(scratch.url);
        handles.push(database);
        const app = await buildApp({ config: testConfig(), database, logger: silent });
        apps.push(app);
        await app.ready();
        return app;
      };
      const started = await Promise.all([start(), start()]);
      for (const app of started) {
        const ready = await app.inject({ method: 'GET', url: '/health/ready' });
        expect(ready.statusCode).toBe(200);
        await registerUser(app, 'mi-empty');
      }

      const check = new pg.Client({ connectionString: scratch.url });
      await check.connect();
      try {
        const journal = JSON.parse(readFileSync(`${MIGRATIONS_FOLDER}/meta/_journal.json`, 'utf8')) as {
          entries: unknown[];
        };
        const migrations = await check.query('SELECT hash FROM drizzle.__drizzle_migrations');
        expect(migrations.rowCount).toBe(journal.entries.length);
        const keys = await check.query<{ state: string; n: number }>(
          `SELECT state, count(*)::int AS n FROM signing_keys GROUP BY state ORDER BY state`,
        );
        expect(keys.rows).toEqual([
          { state: 'active', n: 1 },
          { state: 'next', n: 1 },
        ]);
      } finally {
        await check.end();
      }
    } finally {
      await Promise.all(apps.map((app) => app.close()));
      await Promise.all(handles.map((h) => h.close()));
      await scratch.drop();
    }
  });
});

const redisAvailable = await redisAnswers(REDIS_URL);
if (!redisAvailable)
  console.warn(
    `multi-instance: Redis does not answer at ${REDIS_URL}; the shared rate-limit test is not run`,
  );

describe.runIf(redisAvailable)('several instances share rate-limit counters through Redis', () => {
  let a: FastifyInstance;
  let b: FastifyInstance;
  beforeAll(async () => {
    ({ a, b } = await buildInstances({
      REDIS_URL,
      RATE_LIMIT_ENABLED: 'true',
      LOGIN_MAX_FAILURES_PER_HOUR: '3',
    }));
  });

  it('failed logins for one account spread over A and B lock it on both after 3 in total', async () => {
    const remoteAddress = randomAddress();
    const email = uniqueEmail('mi-throttle');
    const post = (app: FastifyInstance, url: string, payload: Record<string, string>) =>
      app.inject({ method: 'POST', url, payload, remoteAddress });
    try {
      expect((await post(a, '/v1/auth/register', { email, password: PASSWORD })).statusCode).toBe(201);
      for (const app of [a, b, a]) {
        const res = await post(app, '/v1/auth/login', { email, password: 'not the right password' });
        expect(res.statusCode).toBe(401);
      }
      for (const app of [a, b]) {
        // Even the right password: the account is locked for the rest of the window.
        const res = await post(app, '/v1/auth/login', { email, password: PASSWORD });
        expect(res.statusCode, res.body).toBe(429);
        expect(Number(res.headers['retry-after'])).toBeGreaterThan(0);
        expect(res.json().code).toBe('rate_limited');
      }
      // The count lives under the address's hash, not the address.
      expect(Number(await a.services.redis?.get(loginFailuresKey(email)))).toBeGreaterThanOrEqual(1);
      const keys = (await a.services.redis?.keys('paservices:auth:login-failures:*')) ?? [];
      expect(keys.some((k) => k.includes(email) || k.includes(email.split('@')[0]!))).toBe(false);
    } finally {
      await a.services.redis?.del(loginFailuresKey(email));
    }
  });

  it('failed client authentications spread over A and B are counted together: each stops the source at its next failure past the limit', async () => {
    const remoteAddress = randomAddress();
    const admin = await createAdmin(a);
    const client = await createClient(a, admin.accessToken, { scopes: ['tokens:introspect'] });
    const introspect = (app: FastifyInstance, secret: string) =>
      app.inject({
        method: 'POST',
        url: '/oauth/introspect',
        remoteAddress,
        headers: { 'content-type': 'application/x-www-form-urlencoded', ...basic(client.client_id, secret) },
        payload: 'token=x.y.z',
      });
    const wrong = 'not-the-secret';
    const half = CLIENT_AUTH_MAX_FAILURES_PER_MINUTE / 2;
    try {
      // Authenticated calls are not counted, and never reach Redis.
      expect((await introspect(a, client.client_secret)).statusCode).toBe(200);
      expect(
        await a.services.redis?.exists(`${CLIENT_AUTH_FAILURES_PREFIX}${remoteAddress} ${client.client_id}`),
      ).toBe(0);
      for (const app of [a, b]) {
        for (let i = 0; i < half; i++) expect((await introspect(app, wrong)).statusCode).toBe(401);
      }
      // B's last failure brought the shared count to the limit: B refuses before any check.
      const onB = await introspect(b, client.client_secret);
      expect(onB.statusCode, onB.body).toBe(429);
      expect(Number(onB.headers['retry-after'])).toBeGreaterThan(0);
      // A last heard the count at half the limit: one more failure there tells it the shared count.
      expect((await introspect(a, wrong)).statusCode).toBe(401);
      for (const secret of [wrong, client.client_secret]) {
        const onA = await introspect(a, secret);
        expect(onA.statusCode, onA.body).toBe(429);
        expect(onA.json().error).toBe('temporarily_unavailable');
      }
    } finally {
      await a.services.redis?.del(`${CLIENT_AUTH_FAILURES_PREFIX}${remoteAddress} ${client.client_id}`);
    }
  });

  it('failed client authentications from one address, each for another client, are counted together on A and B', async () => {
    const remoteAddress = randomAddress();
    const admin = await createAdmin(a);
    const client = await createClient(a, admin.accessToken, { scopes: ['tokens:introspect'] });
    const introspect = (app: FastifyInstance, clientId: string, secret: string) =>
      app.inject({
        method: 'POST',
        url: '/oauth/introspect',
        remoteAddress,
        headers: { 'content-type': 'application/x-www-form-urlencoded', ...basic(clientId, secret) },
        payload: 'token=x.y.z',
      });
    try {
      // Each failure names a client of its own, so only the per-address count can add up.
      for (let i = 0; i < CLIENT_AUTH_MAX_FAILURES_PER_IP_PER_MINUTE; i++) {
        const res = await introspect(i % 2 === 0 ? a : b, `pci_unknown${i}`, 'not-a-secret');
        expect(res.statusCode, res.body).toBe(401);
      }
      expect(Number(await a.services.redis?.get(`${CLIENT_AUTH_IP_FAILURES_PREFIX}${remoteAddress}`))).toBe(
        CLIENT_AUTH_MAX_FAILURES_PER_IP_PER_MINUTE,
      );
      // B heard the last failure bring the shared count to the limit: even the right secret waits.
      const onB = await introspect(b, client.client_id, client.client_secret);
      expect(onB.statusCode, onB.body).toBe(429);
      expect(Number(onB.headers['retry-after'])).toBeGreaterThan(0);
      // A last heard one short of it; its next failure tells it the shared count.
      expect((await introspect(a, 'pci_unknown-last', 'not-a-secret')).statusCode).toBe(401);
      const onA = await introspect(a, client.client_id, client.client_secret);
      expect(onA.statusCode, onA.body).toBe(429);
      expect(onA.json().error).toBe('temporarily_unavailable');
      // Another address is not held back.
      const elsewhere = await a.inject({
        method: 'POST',
        url: '/oauth/introspect',
        remoteAddress: randomAddress(),
        headers: {
          'content-type': 'application/x-www-form-urlencoded',
          ...basic(client.client_id, client.client_secret),
        },
        payload: 'token=x.y.z',
      });
      expect(elsewhere.statusCode, elsewhere.body).toBe(200);
    } finally {
      await a.services.redis?.del(`${CLIENT_AUTH_IP_FAILURES_PREFIX}${remoteAddress}`);
    }
  });

  it('one per-address refresh budget on A and B, across /v1/auth/refresh and the refresh_token grant', async () => {
    const remoteAddress = randomAddress();
    const refresh = (app: FastifyInstance, i: number) =>
      i % 2 === 0
        ? app.inject({
            method: 'POST',
            url: '/v1/auth/refresh',
            remoteAddress,
            payload: { refresh_token: `prt_garbage${i}` },
          })
        : app.inject({
            method: 'POST',
            url: '/oauth/token',
            remoteAddress,
            headers: { 'content-type': 'application/x-www-form-urlencoded' },
            payload: `grant_type=refresh_token&refresh_token=prt_garbage${i}`,
          });
    // Alternating instances and routes: A takes the /v1 calls, B the grants.
    for (let i = 0; i < REFRESH_RATE_LIMIT.max; i++) {
      const res = await refresh(i % 2 === 0 ? a : b, i);
      expect(res.statusCode, res.body).toBe(i % 2 === 0 ? 401 : 400);
    }
    for (const [app, i] of [
      [a, 0],
      [a, 1],
      [b, 0],
      [b, 1],
    ] as const) {
      const res = await refresh(app, i);
      expect(res.statusCode, res.body).toBe(429);
      expect(Number(res.headers['retry-after'])).toBeGreaterThan(0);
    }
  });

  it('the per-IP limit of a credential endpoint counts the calls to A and B together', async () => {
    const remoteAddress = randomAddress();
    const attempt = (app: FastifyInstance) =>
      app.inject({
        method: 'POST',
        url: '/v1/auth/login',
        payload: { email: uniqueEmail('mi-ip'), password: 'not the right password' },
        remoteAddress,
      });
    for (let i = 0; i < CREDENTIAL_RATE_LIMIT.max; i++) {
      const res = await attempt(i % 2 === 0 ? a : b);
      expect(res.statusCode, res.body).toBe(401);
    }
    for (const app of [a, b]) {
      const res = await attempt(app);
      expect(res.statusCode, res.body).toBe(429);
      expect(Number(res.headers['retry-after'])).toBeGreaterThan(0);
    }
  });
});
