import type { FastifyInstance, LightMyRequestResponse } from 'fastify';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import { userWith } from '../clients/helpers.js';
import { buildTestApp } from '../support/app.js';
import { secondWhileFirstCalls } from '../support/database.js';
import { createAdmin, registerUser, type TestUser } from '../support/factories.js';
import { bearer } from '../support/http.js';

/**
 * Disabling or deleting a user is for a caller who holds all the user holds, decided on the
 * transaction of the change (users.service assertMayManageIn, after the admins' lock, as removeRole):
 * an administrator granting the user the admin role at that moment is waited for and seen, so a user
 * manager does not disable or delete someone who has just become an administrator. PostgreSQL only:
 * the grant holds its transaction open while the change starts.
 */
let app: FastifyInstance;
beforeAll(async () => {
  app = await buildTestApp();
});
afterAll(async () => {
  await app.close();
});

const disable = (caller: TestUser, target: TestUser) =>
  app.inject({
    method: 'PATCH',
    url: `/v1/users/${target.id}`,
    headers: bearer(caller.accessToken),
    payload: { status: 'disabled' },
  });
const remove = (caller: TestUser, target: TestUser) =>
  app.inject({ method: 'DELETE', url: `/v1/users/${target.id}`, headers: bearer(caller.accessToken) });

describe.skipIf(!inject('databaseUrl'))(
  'a user manager acting on a user as an admin makes them admin',
  () => {
    it.each([
      ['disabling', disable],
      ['deleting', remove],
    ] as const)(
      '%s them waits for the grant, sees it and is refused (403), changing nothing',
      async (_name, act) => {
        const admin = await createAdmin(app);
        const manager = await userWith(app, ['users:read', 'users:write'], 'mgr-race');
        const target = await registerUser(app, 'mgr-race-target');
        const { first: granted, second: refused } = await secondWhileFirstCalls<
          'assignRole',
          LightMyRequestResponse
        >(
          inject('databaseUrl')!,
          app.services.repos.users,
          'assignRole',
          () =>
            app.inject({
              method: 'PUT',
              url: `/v1/users/${target.id}/roles/admin`,
              headers: bearer(admin.accessToken),
            }),
          () => act(manager, target),
        );
        expect(granted.statusCode, granted.body).toBe(200);
        expect(refused.statusCode, refused.body).toBe(403);
        expect(refused.json()).toMatchObject({ code: 'forbidden' });
        const user = await app.services.repos.users.findById(target.id);
        expect(user?.status).toBe('active');
        const roles = await app.services.repos.users.rolesAndPermissions(target.id);
        expect(roles.roles).toContain('admin');
      },
    );
  },
);
