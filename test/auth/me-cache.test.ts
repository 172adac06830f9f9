import { setTimeout as sleep } from 'node:timers/promises';
import type { FastifyInstance } from 'fastify';
import { beforeAll, describe, expect, it } from 'vitest';
import { buildTestApp } from '../support/app.js';
import { createAdmin, registerUser, type TestUser } from '../support/factories.js';
import { bearer } from '../support/http.js';

/**
 * /v1/auth/me is served from a cache (accounts.cache.ts); every change it shows must still show at
 * once on the instance that made it, and within 1 s on another instance of the same database.
 */
describe('/v1/auth/me stays current while cached', () => {
  let a: FastifyInstance;
  let b: FastifyInstance;
  let admin: TestUser;
  beforeAll(async () => {
    [a, b] = await Promise.all([buildTestApp(), buildTestApp()]);
    admin = await createAdmin(a);
  });

  const me = async (app: FastifyInstance, token: string) => {
    const res = await app.inject({ method: 'GET', url: '/v1/auth/me', headers: bearer(token) });
    expect(res.statusCode, res.body).toBe(200);
    return res.json() as { roles: string[]; profile: { display_name: string | null } | null };
  };

  /** Polls `check` on instance b for up to 1 s. */
  async function eventually(check: () => Promise<boolean>) {
    const deadline = Date.now() + 1000;
    while (!(await check())) {
      if (Date.now() > deadline) return false;
      await sleep(25);
    }
    return true;
  }

  it('shows a profile change at once here and within 1 s on the other instance', async () => {
    const user = await registerUser(a);
    expect((await me(a, user.accessToken)).profile?.display_name).toBeNull();
    expect((await me(b, user.accessToken)).profile?.display_name).toBeNull();
    const patch = await a.inject({
      method: 'PATCH',
      url: '/v1/profiles/me',
      headers: bearer(user.accessToken),
      payload: { display_name: 'Ada Lovelace' },
    });
    expect(patch.statusCode, patch.body).toBe(200);
    expect((await me(a, user.accessToken)).profile?.display_name).toBe('Ada Lovelace');
    expect(
      await eventually(async () => (await me(b, user.accessToken)).profile?.display_name === 'Ada Lovelace'),
    ).toBe(true);
  });

  it('shows a role granted or removed, and a role deleted, on both instances', async () => {
    const roleName = `viewer-${Date.now().toString(36)}`;
    const created = await a.inject({
      method: 'POST',
      url: '/v1/roles',
      headers: bearer(admin.accessToken),
      payload: { name: roleName, permissions: ['users:read'] },
    });
    expect(created.statusCode, created.body).toBe(201);
    const user = await registerUser(a);
    expect((await me(a, user.accessToken)).roles).toEqual(['user']);
    expect((await me(b, user.accessToken)).roles).toEqual(['user']);

    const grant = await a.inject({
      method: 'PUT',
      url: `/v1/users/${user.id}/roles/${roleName}`,
      headers: bearer(admin.accessToken),
    });
    expect(grant.statusCode, grant.body).toBe(200);
    expect((await me(a, user.accessToken)).roles).toEqual(expect.arrayContaining([roleName]));
    expect(await eventually(async () => (await me(b, user.accessToken)).roles.includes(roleName))).toBe(true);

    const deleted = await a.inject({
      method: 'DELETE',
      url: `/v1/roles/${roleName}`,
      headers: bearer(admin.accessToken),
    });
    expect(deleted.statusCode, deleted.body).toBeLessThan(300);
    expect((await me(a, user.accessToken)).roles).toEqual(['user']);
    expect(await eventually(async () => !(await me(b, user.accessToken)).roles.includes(roleName))).toBe(
      true,
    );
  });
});
