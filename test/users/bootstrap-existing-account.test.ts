import type { FastifyInstance } from 'fastify';
import { afterEach, describe, expect, it } from 'vitest';
import type { DatabaseHandle } from '../../src/db/client.js';
import { BootstrapAdminError } from '../../src/services.js';
import { buildTestApp, uniqueEmail } from '../support/app.js';
import { ownDatabase } from '../support/database.js';
import { login, PASSWORD, registerUser } from '../support/factories.js';
import { bearer } from '../support/http.js';
import { captureLogs } from '../support/logs.js';

/**
 * BOOTSTRAP_ADMIN_EMAIL naming an address that already has an account: on a database with no admin
 * yet, anyone could have registered that address first (registration is open, and with
 * REQUIRE_EMAIL_CONFIRMATION=false they sign in without owning the mailbox). The start makes that
 * account admin only when BOOTSTRAP_ADMIN_PASSWORD is its password, as with an account Supabase has.
 */
describe('the bootstrap admin, for an address that already has an account', () => {
  const OPERATOR_PASSWORD = 'the operator’s bootstrap passphrase';
  const disposals: Array<() => Promise<void>> = [];
  afterEach(async () => {
    for (const dispose of disposals.splice(0)) await dispose();
  });

  /** A database of its own (the bootstrap acts only where no admin exists), with one account on it. */
  async function databaseWithAccount(password: string) {
    const own = await ownDatabase('authz_boot');
    disposals.push(() => own.dispose());
    const before = await buildTestApp({ deps: { database: own.database } });
    const account = await registerUser(before, 'boot-existing', password);
    await before.close();
    return { own, account };
  }

  const start = (database: DatabaseHandle, env: Record<string, string>) =>
    buildTestApp({ env, deps: { database } }).then((app) => {
      disposals.unshift(() => app.close());
      return app;
    });

  const rolesAt = async (app: FastifyInstance, email: string, password: string) => {
    const session = await login(app, email, password);
    const me = await app.inject({
      method: 'GET',
      url: '/v1/auth/me',
      headers: bearer(session.session.access_token),
    });
    expect(me.statusCode, me.body).toBe(200);
    return me.json().roles as string[];
  };

  it('registered by someone else (another password): the start stops naming BOOTSTRAP_ADMIN_EMAIL, and nobody is made admin', async () => {
    const { own, account } = await databaseWithAccount(PASSWORD);
    const failure = await start(own.database, {
      BOOTSTRAP_ADMIN_EMAIL: account.email,
      BOOTSTRAP_ADMIN_PASSWORD: OPERATOR_PASSWORD,
    }).then(
      () => undefined,
      (err: unknown) => err,
    );
    expect(failure).toBeInstanceOf(BootstrapAdminError);
    expect((failure as Error).message).toMatch(
      new RegExp(`^the bootstrap admin \\(BOOTSTRAP_ADMIN_EMAIL ${account.email}\\) cannot be made: `),
    );
    expect((failure as Error).message).toContain('BOOTSTRAP_ADMIN_PASSWORD is not its password');
    // Whoever registered the address holds what every account holds, and no more.
    const after = await start(own.database, {});
    expect(await rolesAt(after, account.email, PASSWORD)).toEqual(['user']);
    expect(await after.services.repos.users.countWithRole('admin')).toBe(0);
  });

  it('the operator’s own account (BOOTSTRAP_ADMIN_PASSWORD is its password): made admin, as before', async () => {
    const { own, account } = await databaseWithAccount(OPERATOR_PASSWORD);
    const app = await start(own.database, {
      BOOTSTRAP_ADMIN_EMAIL: account.email.toUpperCase(),
      BOOTSTRAP_ADMIN_PASSWORD: OPERATOR_PASSWORD,
    });
    expect(await rolesAt(app, account.email, OPERATOR_PASSWORD)).toEqual(['admin', 'user']);
  });

  it('an address nobody has yet is made as before', async () => {
    const own = await ownDatabase('authz_boot');
    disposals.push(() => own.dispose());
    const email = uniqueEmail('boot-new');
    const app = await start(own.database, {
      BOOTSTRAP_ADMIN_EMAIL: email,
      BOOTSTRAP_ADMIN_PASSWORD: OPERATOR_PASSWORD,
    });
    expect(await rolesAt(app, email, OPERATOR_PASSWORD)).toEqual(['admin', 'user']);
  });

  /**
   * Holders of `admin` nobody can act as do not make an admin: the only one disabled, or an invitation
   * granted admin and never taken (it may expire unopened). The start makes the bootstrap admin then,
   * as on a database with none.
   */
  describe('when every holder of admin is one nobody can act as', () => {
    async function databaseWithUnusableAdmin(kind: 'disabled' | 'invitation') {
      const own = await ownDatabase('authz_boot');
      disposals.push(() => own.dispose());
      const before = await buildTestApp({ deps: { database: own.database } });
      const users = before.services.repos.users;
      let holderId: string;
      if (kind === 'disabled') {
        const account = await registerUser(before, 'boot-disabled-admin');
        holderId = account.id;
        await users.update(holderId, { status: 'disabled' });
      } else {
        const row = await users.insert({
          id: crypto.randomUUID(),
          email: uniqueEmail('boot-invited-admin'),
          provider: 'local',
          passwordHash: null,
          emailConfirmedAt: null,
        });
        holderId = row!.id;
      }
      await users.assignRole(holderId, 'admin', null);
      expect(await users.countWithRole('admin')).toBe(1);
      await before.close();
      return own;
    }

    for (const kind of ['disabled', 'invitation'] as const) {
      it(`the only admin ${kind === 'disabled' ? 'disabled' : 'an invitation not taken'}: the bootstrap admin is made`, async () => {
        const own = await databaseWithUnusableAdmin(kind);
        const email = uniqueEmail('boot-after-unusable');
        const app = await start(own.database, {
          BOOTSTRAP_ADMIN_EMAIL: email,
          BOOTSTRAP_ADMIN_PASSWORD: OPERATOR_PASSWORD,
        });
        expect(await rolesAt(app, email, OPERATOR_PASSWORD)).toEqual(['admin', 'user']);
      });
    }

    it('an active admin besides: the variables are ignored, as before', async () => {
      const own = await databaseWithUnusableAdmin('disabled');
      const seed = await start(own.database, {});
      const active = await registerUser(seed, 'boot-active-admin');
      await seed.services.repos.users.assignRole(active.id, 'admin', null);
      await seed.close();
      const email = uniqueEmail('boot-ignored');
      const app = await start(own.database, {
        BOOTSTRAP_ADMIN_EMAIL: email,
        BOOTSTRAP_ADMIN_PASSWORD: OPERATOR_PASSWORD,
      });
      expect(await app.services.repos.users.findByEmail(email)).toBeUndefined();
      expect(await app.services.repos.users.countWithRole('admin')).toBe(2);
    });

    it('the bootstrap account itself the disabled admin: started, with a warning that no admin can sign in', async () => {
      const own = await ownDatabase('authz_boot');
      disposals.push(() => own.dispose());
      const before = await buildTestApp({ deps: { database: own.database } });
      const account = await registerUser(before, 'boot-own-disabled', OPERATOR_PASSWORD);
      await before.services.repos.users.assignRole(account.id, 'admin', null);
      await before.services.repos.users.update(account.id, { status: 'disabled' });
      await before.close();
      const { lines, logger } = captureLogs('info');
      const app = await buildTestApp({
        env: { BOOTSTRAP_ADMIN_EMAIL: account.email, BOOTSTRAP_ADMIN_PASSWORD: OPERATOR_PASSWORD },
        deps: { database: own.database, logger },
      });
      disposals.unshift(() => app.close());
      const warning = lines
        .map((l) => JSON.parse(l))
        .find((l) => /bootstrap admin’s account is disabled/.test(l.msg));
      expect(warning, lines.join('')).toMatchObject({ level: 40, userId: account.id });
      expect(lines.join('')).not.toContain(OPERATOR_PASSWORD);
    });
  });
});
