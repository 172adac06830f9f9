import { sql } from 'drizzle-orm';
import { describe, expect, it } from 'vitest';
import { selectRows } from '../../src/db/client.js';
import { buildTestApp, closeTestApps } from '../support/app.js';
import { ownDatabase } from '../support/database.js';
import { createAdmin, login, registerUser, setUserStatus } from '../support/factories.js';

/**
 * A PostgreSQL statement takes at most 65,535 parameters: the revocations of a user's sessions, four
 * parameters each, were one statement, so a user with 16,384 sessions (a script signing in and never
 * out, or someone with the password doing it on purpose) could not be disabled, deleted or signed out.
 */
describe('a user with more sessions than one statement can name', () => {
  it('is disabled: every session ends, and the revocations are all written', async () => {
    // Its own database: 17,000 revocations are not for every other file's apps to load.
    const own = await ownDatabase('many_sessions');
    try {
      const app = await buildTestApp({ deps: { database: own.database } });
      const admin = await createAdmin(app);
      const user = await registerUser(app, 'many-sessions');
      await app.services.db.execute(sql`
        INSERT INTO sessions (user_id, idle_expires_at, expires_at)
        SELECT ${user.id}::uuid, now() + interval '20 days', now() + interval '60 days'
        FROM generate_series(1, 17000)`);
      const live = async () =>
        (
          await selectRows<{ n: number }>(
            app.services.db,
            sql`SELECT count(*)::int AS n FROM sessions WHERE user_id = ${user.id} AND revoked_at IS NULL`,
          )
        )[0]!.n;
      expect(await live()).toBe(17001);

      const res = await setUserStatus(app, admin.accessToken, user.id, 'disabled');
      expect(res.statusCode, res.body).toBe(200);
      expect(await live()).toBe(0);
      const [revoked] = await selectRows<{ n: number }>(
        app.services.db,
        sql`SELECT count(*)::int AS n FROM revocations WHERE kind = 'session'`,
      );
      expect(revoked!.n).toBeGreaterThanOrEqual(17001);
      const me = await app.inject({
        method: 'GET',
        url: '/v1/auth/me',
        headers: { authorization: `Bearer ${user.accessToken}` },
      });
      expect(me.statusCode).toBe(401);
      expect((await setUserStatus(app, admin.accessToken, user.id, 'active')).statusCode).toBe(200);
      await login(app, user.email);
    } finally {
      await closeTestApps();
      await own.dispose();
    }
  }, 120_000);
});
