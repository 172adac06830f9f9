import { randomUUID } from 'node:crypto';
import { eq, sql } from 'drizzle-orm';
import type { FastifyInstance } from 'fastify';
import { beforeAll, describe, expect, it, vi } from 'vitest';
import { profiles, users } from '../../src/db/schema/index.js';
import { type AuthEvent, inTransaction } from '../../src/lib/events.js';
import { systemContext } from '../../src/modules/audit/audit.service.js';
import { buildTestApp } from '../support/app.js';
import { createAdmin, registerUser, type TestUser } from '../support/factories.js';
import { bearer } from '../support/http.js';

/**
 * Requests that race over the same rows: PostgreSQL may end one transaction (a deadlock) or find a
 * row gone; the client gets an answer about the data (200, 204, 401, 404), never a 5xx.
 */
let app: FastifyInstance;
let admin: TestUser;
beforeAll(async () => {
  app = await buildTestApp();
  admin = await createAdmin(app);
});

const pgError = (code: string) => Object.assign(new Error(`simulated ${code}`), { code });

describe('inTransaction', () => {
  it('runs the work again when PostgreSQL ends the transaction for a deadlock or a serialization failure', async () => {
    const { db, events } = app.services;
    for (const code of ['40P01', '40001']) {
      let runs = 0;
      const applied: AuthEvent[] = [];
      let collecting = true;
      events.subscribe((e) => {
        if (collecting) applied.push(e);
      });
      // An event no other test sends: files on other workers share the database and its notifications.
      const marker = randomUUID();
      const result = await inTransaction(db, events, async (tx, emit) => {
        runs++;
        emit({ type: 'user_changed', userId: `${marker}-${runs}` });
        await tx.execute(sql`select 1`);
        if (runs === 1) throw pgError(code);
        return 'done';
      });
      const ofRun = (run: number) =>
        applied.filter((e) => e.type === 'user_changed' && e.userId === `${marker}-${run}`);
      // Applied at the commit, and again from its own notification (on PGlite it comes in the commit):
      // once that is in, anything the failed run had sent would be too.
      await vi.waitFor(() => expect(ofRun(2).length).toBeGreaterThanOrEqual(2));
      collecting = false;
      expect(result).toBe('done');
      expect(runs).toBe(2);
      // The failed run's events went with it: only the run that committed was applied.
      expect(ofRun(1)).toEqual([]);
    }
  });

  it('gives up after three runs, and never runs again for any other error', async () => {
    const { db, events } = app.services;
    let runs = 0;
    await expect(
      inTransaction(db, events, async () => {
        runs++;
        throw pgError('40P01');
      }),
    ).rejects.toThrow('simulated 40P01');
    expect(runs).toBe(3);
    runs = 0;
    await expect(
      inTransaction(db, events, async () => {
        runs++;
        throw pgError('23505');
      }),
    ).rejects.toThrow('simulated 23505');
    expect(runs).toBe(1);
  });
});

describe('races through HTTP', () => {
  it('role grants racing the user’s deletion: each grant is 200 or 404, never a 500', async () => {
    for (let round = 0; round < 5; round++) {
      const user = await registerUser(app, `race-grant-${round}`);
      const [deletion, ...grants] = await Promise.all([
        app.inject({ method: 'DELETE', url: `/v1/users/${user.id}`, headers: bearer(admin.accessToken) }),
        ...Array.from({ length: 4 }, () =>
          app.inject({
            method: 'PUT',
            url: `/v1/users/${user.id}/roles/user`,
            headers: bearer(admin.accessToken),
          }),
        ),
      ]);
      expect(deletion!.statusCode, deletion!.body).toBe(204);
      for (const g of grants) {
        expect([200, 404], g.body).toContain(g.statusCode);
      }
      expect(await app.services.repos.users.findById(user.id)).toBeUndefined();
    }
  });

  it('refreshes racing the user’s deletion: 200 or 401, the deletion 204, never a 5xx', async () => {
    for (let round = 0; round < 5; round++) {
      const user = await registerUser(app, `race-refresh-${round}`);
      const [deletion, ...refreshes] = await Promise.all([
        app.inject({ method: 'DELETE', url: `/v1/users/${user.id}`, headers: bearer(admin.accessToken) }),
        ...Array.from({ length: 4 }, () =>
          app.inject({
            method: 'POST',
            url: '/v1/auth/refresh',
            payload: { refresh_token: user.refreshToken },
          }),
        ),
      ]);
      expect(deletion!.statusCode, deletion!.body).toBe(204);
      for (const r of refreshes) expect([200, 401], r.body).toContain(r.statusCode);
    }
  });
});

describe('races that must leave nothing live behind', () => {
  it('keys made by a key while it is revoked are revoked with it, or refused', async () => {
    const owner = await registerUser(app, 'race-children');
    for (let round = 0; round < 5; round++) {
      const parent = await app.inject({
        method: 'POST',
        url: '/v1/api-keys',
        headers: bearer(owner.accessToken),
        payload: { name: `parent-${round}`, scopes: ['api_keys:own', 'account:read'] },
      });
      const { id, key } = parent.json() as { id: string; key: string };
      const [, ...children] = await Promise.all([
        app.inject({ method: 'DELETE', url: `/v1/api-keys/${id}`, headers: bearer(owner.accessToken) }),
        ...Array.from({ length: 6 }, (_, i) =>
          app.inject({
            method: 'POST',
            url: '/v1/api-keys',
            headers: { 'x-api-key': key },
            payload: { name: `child-${round}-${i}`, scopes: ['account:read'] },
          }),
        ),
      ]);
      for (const child of children) {
        expect([201, 401], child.body).toContain(child.statusCode);
        if (child.statusCode !== 201) continue;
        const row = await app.services.repos.apiKeys.findById(child.json().id);
        expect(row?.revokedAt, `child of a revoked key, round ${round}`).not.toBeNull();
      }
    }
  });

  it('a session is not started for a user disabled after the login read them (the window of that race)', async () => {
    const user = await registerUser(app, 'race-window');
    const readBeforeDisabling = (await app.services.repos.users.findById(user.id))!;
    const disabled = await app.inject({
      method: 'PATCH',
      url: `/v1/users/${user.id}`,
      headers: bearer(admin.accessToken),
      payload: { status: 'disabled' },
    });
    expect(disabled.statusCode).toBe(200);
    await expect(
      app.services.sessions.issuingTransaction((tx, emit) =>
        app.services.sessions.start(
          tx,
          readBeforeDisabling,
          { ip: null, userAgent: null, amr: [] },
          { context: systemContext, emit },
        ),
      ),
    ).rejects.toMatchObject({ code: 'invalid_credentials' });
  });

  it('a login racing the account’s disabling leaves no session that works once it is enabled again', async () => {
    for (let round = 0; round < 3; round++) {
      const user = await registerUser(app, `race-disable-${round}`);
      const disable = (status: 'active' | 'disabled') =>
        app.inject({
          method: 'PATCH',
          url: `/v1/users/${user.id}`,
          headers: bearer(admin.accessToken),
          payload: { status },
        });
      const [, ...logins] = await Promise.all([
        disable('disabled'),
        ...Array.from({ length: 6 }, () =>
          app.inject({
            method: 'POST',
            url: '/v1/auth/login',
            payload: { email: user.email, password: user.password },
          }),
        ),
      ]);
      expect((await disable('active')).statusCode).toBe(200);
      for (const login of logins) {
        expect([200, 401], login.body).toContain(login.statusCode);
        if (login.statusCode !== 200) continue;
        const refreshed = await app.inject({
          method: 'POST',
          url: '/v1/auth/refresh',
          payload: { refresh_token: login.json().session.refresh_token },
        });
        expect(refreshed.statusCode, `a session from before the disabling, round ${round}`).toBe(401);
      }
    }
  });
});

describe('the grant ceiling against a user deleted while it reads', () => {
  it('a credential whose user is gone is a 401, never a 403 for a permission they held', async () => {
    const user = await registerUser(app, 'ceiling-gone');
    const grantor = { kind: 'user' as const, userId: user.id, permissions: ['account:read', 'api_keys:own'] };
    // Deleted between the two reads of the ceiling: after their permissions, before their row.
    const repo = app.services.repos.users;
    const original = repo.rolesAndPermissions.bind(repo);
    const spy = vi.spyOn(repo, 'rolesAndPermissions').mockImplementationOnce(async (id, tx) => {
      const answer = await original(id, tx);
      await app.services.db.delete(users).where(eq(users.id, user.id));
      return answer;
    });
    try {
      const refusal = await app.services.grants
        .assertHolds(grantor, ['account:read'], app.services.db, 'refused')
        .then(
          () => undefined,
          (err: unknown) => err,
        );
      expect(refusal).toMatchObject({ code: 'invalid_token', status: 401 });
    } finally {
      spy.mockRestore();
    }
  });

  it('a user being deleted waits for a change the ceiling allowed, so the change never fails on its foreign key', async () => {
    const user = await registerUser(app, 'ceiling-lock');
    const grantor = { kind: 'user' as const, userId: user.id, permissions: ['account:read', 'api_keys:own'] };
    let deleted = false;
    await app.services.db.transaction(async (tx) => {
      await app.services.grants.assertHolds(grantor, ['account:read'], tx, 'refused');
      // The deletion, on another connection, waits for this transaction's key-share lock.
      const deletion = app.services.db
        .delete(users)
        .where(eq(users.id, user.id))
        .then(() => {
          deleted = true;
        });
      await new Promise((r) => setTimeout(r, 200));
      expect(deleted).toBe(false);
      await tx.insert(profiles).values({ userId: user.id }).onConflictDoNothing();
      void deletion;
    });
    await expect.poll(() => deleted, { timeout: 5000 }).toBe(true);
  });
});
