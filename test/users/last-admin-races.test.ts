import { sql } from 'drizzle-orm';
import type { FastifyInstance, LightMyRequestResponse } from 'fastify';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { selectRows } from '../../src/db/client.js';
import { buildTestApp } from '../support/app.js';
import { ownDatabase } from '../support/database.js';
import { createAdmin, type TestUser } from '../support/factories.js';
import { bearer } from '../support/http.js';

/**
 * The last active admin stays, also when two administrators act at the same moment: each removing,
 * disabling or deleting the other. On PostgreSQL the two checks run at once, and only the lock the
 * check takes on the admins (users.repository lockRoleHolders) makes the second see the first's
 * change. A database of its own: the worker's has admins from every other file.
 */
let app: FastifyInstance;
let own: Awaited<ReturnType<typeof ownDatabase>>;
beforeAll(async () => {
  own = await ownDatabase('authz_last_admin');
  app = await buildTestApp({ deps: { database: own.database } });
});
afterAll(async () => {
  await app.close();
  await own.dispose();
});

const activeAdmins = async () =>
  (
    await selectRows<{ n: number }>(
      own.database.db,
      sql`SELECT count(*)::int AS n FROM user_roles r JOIN users u ON u.id = r.user_id
          WHERE r.role_name = 'admin' AND u.status = 'active'`,
    )
  )[0]!.n;

type Act = (caller: TestUser, target: TestUser) => Promise<LightMyRequestResponse>;
const removeAdmin: Act = (caller, target) =>
  app.inject({
    method: 'DELETE',
    url: `/v1/users/${target.id}/roles/admin`,
    headers: bearer(caller.accessToken),
  });
const disable: Act = (caller, target) =>
  app.inject({
    method: 'PATCH',
    url: `/v1/users/${target.id}`,
    headers: bearer(caller.accessToken),
    payload: { status: 'disabled' },
  });
const remove: Act = (caller, target) =>
  app.inject({ method: 'DELETE', url: `/v1/users/${target.id}`, headers: bearer(caller.accessToken) });

describe('two administrators, each taking the other’s admin at the same moment', () => {
  it.each([
    ['removing each other’s admin role', removeAdmin, removeAdmin],
    ['disabling each other', disable, disable],
    ['deleting each other', remove, remove],
    ['one removing the other’s role as the other disables them', removeAdmin, disable],
  ] as const)('%s: one goes through, and one active admin is left', async (_name, first, second) => {
    for (let round = 0; round < 3; round++) {
      // The two of this round are the only admins.
      await own.database.db.execute(sql`DELETE FROM user_roles WHERE role_name = 'admin'`);
      const [a, b] = [await createAdmin(app), await createAdmin(app)];
      const answers = await Promise.all([first(a, b), second(b, a)]);
      const statuses = answers.map((r) => r.statusCode);
      expect(await activeAdmins(), answers.map((r) => r.body).join('\n')).toBe(1);
      // One change went through; the other was refused: the last admin (409), or a caller whose admin
      // had just gone (403 for the role, 401 once disabled or deleted).
      expect(
        statuses.filter((s) => s < 300),
        statuses.join(' '),
      ).toHaveLength(1);
      expect(
        statuses.filter((s) => [401, 403, 409].includes(s)),
        statuses.join(' '),
      ).toHaveLength(1);
    }
  });
});

describe('three administrators, each acting on every one of them (themselves too) at the same moment', () => {
  it('never a 5xx, and one active admin is left', async () => {
    const acts = [removeAdmin, disable, remove];
    for (let round = 0; round < 3; round++) {
      await own.database.db.execute(sql`DELETE FROM user_roles WHERE role_name = 'admin'`);
      const admins = [await createAdmin(app), await createAdmin(app), await createAdmin(app)];
      // Nine changes at once, each kind on each admin: removals wait on a disable's or a deletion's
      // lock of the admins, and those on a removal's. Each takes that lock before any other, so none
      // waits on another that waits on it (a deadlock, retried until the statement timeout: 503).
      const answers = await Promise.all(
        admins.flatMap((caller, i) =>
          admins.map((target, j) => acts[(round + i + j) % acts.length]!(caller, target)),
        ),
      );
      const statuses = answers.map((r) => r.statusCode);
      expect(
        statuses.filter((s) => s >= 500),
        answers
          .filter((r) => r.statusCode >= 500)
          .map((r) => r.body)
          .join('\n'),
      ).toEqual([]);
      expect(await activeAdmins(), statuses.join(' ')).toBe(1);
    }
  });
});
