import { randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, relative } from 'node:path';
import { sql } from 'drizzle-orm';
import type { FastifyInstance } from 'fastify';
import pino from 'pino';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import { buildApp } from '../../src/app.js';
import {
  type Database,
  type DatabaseHandle,
  MIGRATIONS_FOLDER,
  openDatabase,
  selectRows,
} from '../../src/db/client.js';
import { createSigningKeysRepository } from '../../src/modules/signing-keys/signing-keys.repository.js';
import { createUsersRepository } from '../../src/modules/users/users.repository.js';
import { testConfig, uniqueEmail } from '../support/app.js';
import { ownDatabase, scratchDatabase } from '../support/database.js';
import { PASSWORD } from '../support/factories.js';
import { bearer } from '../support/http.js';
import { ROOT, type RunResult, runUntilExit } from '../support/spawn-server.js';

/** Each run starts node (tsx's loader when there is no compiled copy) and opens the database: generous, not slow. */
const SPAWN_TEST_TIMEOUT = 60_000;
const logger = pino({ level: 'silent' });

// The scripts and the in-process app must share these: the app decrypts the signing keys a script made.
const KEY_ENCRYPTION_KEY = randomBytes(32).toString('base64');
const SECRET_PEPPER = randomBytes(32).toString('base64');

/**
 * The database the scripts run against, thrown away afterwards: a database of its own on the test
 * PostgreSQL server (the shared one has other files' admins and keys), or a fresh PGlite directory.
 * A PGlite directory admits one process at a time, so it is opened here only while no script runs.
 */
interface Target {
  kind: 'postgres' | 'pglite';
  url: string | undefined;
  dataDir: string;
  drop(): Promise<void>;
}

async function createTarget(): Promise<Target> {
  const dataDir = mkdtempSync(join(tmpdir(), 'auth-scripts-'));
  const removeDir = () => rmSync(dataDir, { recursive: true, force: true });
  const serverUrl = inject('databaseUrl');
  if (!serverUrl) return { kind: 'pglite', url: undefined, dataDir, drop: async () => removeDir() };
  const scratch = (await scratchDatabase('auth_scripts'))!;
  return {
    kind: 'postgres',
    url: scratch.url,
    dataDir,
    async drop() {
      removeDir();
      await scratch.drop();
    },
  };
}

function run(target: Target, script: string, args: string[], env: Record<string, string> = {}) {
  // What `npx tsx scripts/<name>.ts` runs, without npx's lookup (half a second per run), or the run's
  // compiled copy of it (test/support/spawn-server.ts); stdin is not a terminal, so create-admin does
  // not wait for a password prompt.
  return runUntilExit({
    tsx: `scripts/${script}.ts`,
    args,
    env: {
      LOG_LEVEL: 'warn',
      DATABASE_URL: target.url ?? '',
      DATA_DIR: target.dataDir,
      KEY_ENCRYPTION_KEY,
      SECRET_PEPPER,
      AUTH_PROVIDER: 'local',
      SUPABASE_URL: '',
      REDIS_URL: '',
      BOOTSTRAP_ADMIN_EMAIL: '',
      BOOTSTRAP_ADMIN_PASSWORD: '',
      ADMIN_PASSWORD: '',
      ...env,
    },
  });
}

/**
 * `runs`, side by side on PostgreSQL, one after another on PGlite (its directory admits one process at
 * a time): their results in order. For scripts that open the database and whose order does not matter.
 */
async function togetherWherePossible<T extends unknown[]>(
  target: Target,
  runs: [...{ [K in keyof T]: () => Promise<T[K]> }],
): Promise<T> {
  if (target.kind === 'postgres') return (await Promise.all(runs.map((start) => start()))) as T;
  const results: unknown[] = [];
  for (const start of runs) results.push(await start());
  return results as T;
}

/** The app on a given database (not the worker's shared one), closed by the caller. */
async function startApp(database: DatabaseHandle, env: Record<string, string> = {}) {
  const app = await buildApp({
    config: testConfig({ KEY_ENCRYPTION_KEY, SECRET_PEPPER, ...env }),
    database,
    logger,
  });
  await app.ready();
  return app;
}

/** Opens the target in this process for the duration of `work`, then closes it. */
async function withDatabase<T>(target: Target, work: (database: DatabaseHandle) => Promise<T>): Promise<T> {
  const database = await openDatabase({ url: target.url, dataDir: target.dataDir, logger, migrate: true });
  try {
    return await work(database);
  } finally {
    await database.close();
  }
}

async function withApp<T>(target: Target, work: (app: FastifyInstance) => Promise<T>): Promise<T> {
  return withDatabase(target, async (database) => {
    const app = await startApp(database);
    try {
      return await work(app);
    } finally {
      await app.close();
    }
  });
}

async function countUsers(db: Database, email: string): Promise<number> {
  const rows = await selectRows<{ n: number | string }>(
    db,
    sql`SELECT count(*) AS n FROM users WHERE email = ${email}`,
  );
  return Number(rows[0]?.n ?? 0);
}

/** A user registered through the API on the target database (password PASSWORD); their id. */
async function registered(target: Target, email: string): Promise<string> {
  return withApp(target, async (app) => {
    const res = await app.inject({
      method: 'POST',
      url: '/v1/auth/register',
      payload: { email, password: PASSWORD },
    });
    expect(res.statusCode, res.body).toBe(201);
    return res.json().user.id as string;
  });
}

/** The roles a user holds on the target database. */
const rolesOf = (target: Target, userId: string) =>
  withDatabase(
    target,
    async (database) => (await createUsersRepository(database.db).rolesAndPermissions(userId)).roles,
  );

async function expectLogin(app: FastifyInstance, email: string, password: string) {
  const res = await app.inject({ method: 'POST', url: '/v1/auth/login', payload: { email, password } });
  expect(res.statusCode, res.body).toBe(200);
  const me = await app.inject({
    method: 'GET',
    url: '/v1/auth/me',
    headers: bearer(res.json().session.access_token),
  });
  expect(me.statusCode).toBe(200);
  return {
    ...(me.json() as { user: { id: string; email: string }; roles: string[] }),
    accessToken: res.json().session.access_token as string,
  };
}

describe('scripts/create-admin.ts and scripts/rotate-signing-key.ts', () => {
  let target: Target;
  beforeAll(async () => {
    target = await createTarget();
    // The service's first start makes the signing keys the rotations below rotate.
    await withApp(target, async () => undefined);
  }, SPAWN_TEST_TIMEOUT);
  afterAll(async () => {
    await target?.drop();
  });

  it(
    'create-admin creates an admin who can log in; a second run is idempotent',
    async () => {
      const email = uniqueEmail('cli-admin');
      const first = await run(target, 'create-admin', [
        '--email',
        email.toUpperCase(),
        '--password',
        PASSWORD,
      ]);
      expect(first.code, first.stderr).toBe(0);
      expect(first.stdout).toContain(`created admin ${email}`);

      // The password from ADMIN_PASSWORD this time; the user exists, so nothing changes.
      const second = await run(target, 'create-admin', ['--email', email], { ADMIN_PASSWORD: PASSWORD });
      expect(second.code, second.stderr).toBe(0);
      expect(second.stdout).toContain('already holds the admin role');

      await withApp(target, async (app) => {
        expect(await countUsers(app.services.db, email)).toBe(1);
        const me = await expectLogin(app, email, PASSWORD);
        expect(me.user.email).toBe(email);
        expect(me.roles).toEqual(expect.arrayContaining(['admin', 'user']));
        const held = await app.services.repos.users.rolesAndPermissions(me.user.id);
        expect(held.permissions).toContain('*');
      });
    },
    SPAWN_TEST_TIMEOUT,
  );

  it(
    'create-admin grants admin to an existing user without a password',
    async () => {
      const email = uniqueEmail('cli-existing');
      const userId = await registered(target, email);

      const result = await run(target, 'create-admin', ['--email', email]);
      expect(result.code, result.stderr).toBe(0);
      expect(result.stdout).toContain(`granted the admin role to the existing user ${email}`);

      await withDatabase(target, async (database) => {
        expect(await countUsers(database.db, email)).toBe(1);
      });
      expect(await rolesOf(target, userId)).toEqual(['admin', 'user']);
    },
    SPAWN_TEST_TIMEOUT,
  );

  it(
    'create-admin refuses an existing user when the password given is not theirs, granting nobody',
    async () => {
      const email = uniqueEmail('cli-other-password');
      const userId = await registered(target, email);
      const roles = () => rolesOf(target, userId);

      const other = 'the operator’s own passphrase';
      for (const refused of await togetherWherePossible(target, [
        () => run(target, 'create-admin', ['--email', email, '--password', other]),
        () => run(target, 'create-admin', ['--email', email.toUpperCase()], { ADMIN_PASSWORD: other }),
      ])) {
        expect(refused.code, refused.stdout).toBe(1);
        expect(refused.stdout).toBe('');
        const lines = refused.stderr.trim().split('\n');
        expect(lines, refused.stderr).toHaveLength(1);
        expect(lines[0]).toContain(
          `error: ${email} has an account, and the password given is not its password: nobody was made admin`,
        );
      }
      expect(await roles()).toEqual(['user']);

      // Its own password proves the account: granted, as without a password.
      const granted = await run(target, 'create-admin', ['--email', email], { ADMIN_PASSWORD: PASSWORD });
      expect(granted.code, granted.stderr).toBe(0);
      expect(granted.stdout).toContain(`granted the admin role to the existing user ${email}`);
      expect(await roles()).toEqual(['admin', 'user']);
    },
    SPAWN_TEST_TIMEOUT,
  );

  it(
    'create-admin refuses bad input with a message and exit code 1, creating nobody',
    async () => {
      const weakEmail = uniqueEmail('cli-weak');
      const noPasswordEmail = uniqueEmail('cli-nopass');
      // Usage errors are found before the database is opened, so these may run side by side.
      const [firstEmail, secondEmail] = [uniqueEmail('cli-twice'), uniqueEmail('cli-twice')];
      // 261 characters: a well-formed address over RFC 5321's 254, which registration and sign-in refuse,
      // so an admin made with it could never sign in.
      const tooLong = `${'a'.repeat(64)}@${'b'.repeat(63)}.${'c'.repeat(63)}.${'d'.repeat(63)}.test`;
      const [missing, malformed, twice, long] = await Promise.all([
        run(target, 'create-admin', []),
        run(target, 'create-admin', ['--email', 'not-an-email', '--password', PASSWORD]),
        // Which of the two did the operator mean? Neither is made an administrator.
        run(target, 'create-admin', ['--email', firstEmail, '--email', secondEmail, '--password', PASSWORD]),
        run(target, 'create-admin', ['--email', tooLong, '--password', PASSWORD]),
      ]);
      expect(twice.code, twice.stdout).toBe(1);
      expect(twice.stderr).toContain('--email is given 2 times: give it once');
      expect(twice.stderr).toContain('usage:');
      expect(missing.code).toBe(1);
      expect(missing.stderr).toContain('--email is required');
      expect(missing.stderr).toContain('usage:');
      expect(malformed.code).toBe(1);
      expect(malformed.stderr).toContain('not an email address');

      expect(long.code, long.stdout).toBe(1);
      expect(long.stderr).toContain(`not an email address: ${tooLong}`);
      await withApp(target, async (app) => {
        const login = await app.inject({
          method: 'POST',
          url: '/v1/auth/login',
          payload: { email: tooLong, password: PASSWORD },
        });
        expect(login.json().errors).toEqual([{ field: 'body.email', message: expect.any(String) }]);
        expect(await countUsers(app.services.db, tooLong)).toBe(0);
      });

      // These two open the database to look the address up.
      const [weak, noPassword] = await togetherWherePossible(target, [
        () => run(target, 'create-admin', ['--email', weakEmail, '--password', 'short']),
        () => run(target, 'create-admin', ['--email', noPasswordEmail]),
      ]);
      expect(weak.code).toBe(1);
      expect(weak.stderr).toContain('weak_password');
      expect(noPassword.code).toBe(1);
      expect(noPassword.stderr).toContain('a password is needed');
      for (const r of [missing, malformed, twice, long, weak, noPassword]) expect(r.stdout).toBe('');

      await withDatabase(target, async (database) => {
        expect(await countUsers(database.db, firstEmail)).toBe(0);
        expect(await countUsers(database.db, secondEmail)).toBe(0);
        expect(await countUsers(database.db, weakEmail)).toBe(0);
        expect(await countUsers(database.db, noPasswordEmail)).toBe(0);
      });
    },
    SPAWN_TEST_TIMEOUT,
  );

  it(
    'create-admin and rotate-signing-key exit once done while REDIS_URL does not answer',
    async () => {
      // Redis is only for the service's shared counters: a script that did its work with Redis down
      // must end, exit code 0 (the client kept reconnecting and held the process open for ever).
      const redisDown = { REDIS_URL: 'redis://127.0.0.1:1' };
      const email = uniqueEmail('cli-redis-down');
      // Each waits for Redis to give up before it exits: side by side where the database allows.
      const [created, rotated] = await togetherWherePossible(target, [
        () => run(target, 'create-admin', ['--email', email, '--password', PASSWORD], redisDown),
        () => run(target, 'rotate-signing-key', ['--force'], redisDown),
      ]);
      expect(created.stdout).toContain(`created admin ${email}`);
      expect({ code: created.code, signal: created.signal }, created.stderr).toEqual({
        code: 0,
        signal: null,
      });
      expect(rotated.stdout).toMatch(/active signing key: \S+/);
      expect({ code: rotated.code, signal: rotated.signal }, rotated.stderr).toEqual({
        code: 0,
        signal: null,
      });
    },
    SPAWN_TEST_TIMEOUT * 2,
  );

  it(
    'rotate-signing-key makes a new key active and leaves the old one retiring',
    async () => {
      const first = await run(target, 'rotate-signing-key', ['--force']);
      expect(first.code, first.stderr).toBe(0);
      const firstKid = /active signing key: (\S+)/.exec(first.stdout)?.[1];
      expect(firstKid).toBeDefined();

      // Unforced, right after: the new next key has been published for seconds only.
      const refused = await run(target, 'rotate-signing-key', []);
      expect(refused.code).toBe(1);
      expect(refused.stderr).toContain('(rotation_too_soon)');

      const second = await run(target, 'rotate-signing-key', ['--force']);
      expect(second.code, second.stderr).toBe(0);
      const secondKid = /active signing key: (\S+)/.exec(second.stdout)?.[1];
      expect(secondKid).toBeDefined();
      expect(secondKid).not.toBe(firstKid);
      expect(second.stdout).toContain(`retiring signing key: ${firstKid}, published until`);

      await withDatabase(target, async (database) => {
        // A scratch database: its few keys fit in one page.
        const keys = await createSigningKeysRepository(database.db).list({ limit: 200 });
        const state = (kid: string | undefined) => keys.find((k) => k.kid === kid)?.state;
        expect(keys.filter((k) => k.state === 'active').map((k) => k.kid)).toEqual([secondKid]);
        expect(state(firstKid)).toBe('retiring');
        expect(keys.filter((k) => k.state === 'next')).toHaveLength(1);
        const audited = await selectRows<{ user_agent: string | null }>(
          database.db,
          sql`SELECT user_agent FROM audit_events WHERE type = 'signing_key.rotated' AND subject_id = ${secondKid}`,
        );
        expect(audited).toEqual([{ user_agent: 'scripts/rotate-signing-key' }]);
      });
    },
    SPAWN_TEST_TIMEOUT,
  );

  it.skipIf(!inject('databaseUrl'))(
    'a running instance starts signing with the rotated key through the NOTIFY (PostgreSQL)',
    async () => {
      await withApp(target, async (app) => {
        const before = app.services.keys.activeKey().kid;
        const result = await run(target, 'rotate-signing-key', ['--force']);
        expect(result.code, result.stderr).toBe(0);
        const rotated = /active signing key: (\S+)/.exec(result.stdout)?.[1];
        expect(rotated).not.toBe(before);
        const deadline = Date.now() + 5000;
        while (app.services.keys.activeKey().kid !== rotated && Date.now() < deadline)
          await new Promise((r) => setTimeout(r, 25));
        expect(app.services.keys.activeKey().kid).toBe(rotated);
      });
    },
    SPAWN_TEST_TIMEOUT,
  );
  it.skipIf(!inject('databaseUrl'))(
    'rotate-signing-key --revoke-previous: a running instance drops the old key and its tokens (PostgreSQL)',
    async () => {
      await withApp(target, async (app) => {
        const before = app.services.keys.activeKey().kid;
        const { token } = await app.services.tokens.issue({
          sub: '00000000-0000-4000-8000-000000000001',
          audience: app.services.config.issuer,
          ttlSeconds: 600,
          clientId: 'scripts-test',
          permissions: [],
        });
        // Verified (and cached) before the revocation.
        await app.services.tokens.verify(token);
        const result = await run(target, 'rotate-signing-key', ['--revoke-previous']);
        expect(result.code, result.stderr).toBe(0);
        expect(result.stdout).toContain(`revoked signing key: ${before}`);
        const deadline = Date.now() + 5000;
        while (app.services.keys.verificationKey(before) && Date.now() < deadline)
          await new Promise((r) => setTimeout(r, 25));
        expect(app.services.keys.verificationKey(before)).toBeUndefined();
        await expect(app.services.tokens.verify(token)).rejects.toMatchObject({ code: 'invalid_token' });
        expect(JSON.parse(app.services.keys.jwks()).keys.map((k: { kid: string }) => k.kid)).not.toContain(
          before,
        );
      });
    },
    SPAWN_TEST_TIMEOUT,
  );
});

describe('scripts/rotate-signing-key.ts on a database the service never started on', () => {
  let target: Target;
  beforeAll(async () => {
    target = await createTarget();
  });
  afterAll(async () => {
    await target?.drop();
  });

  it(
    'refuses with exit code 1 and one line, and writes no key, forced or not',
    async () => {
      const argsTried = [[], ['--force'], ['--revoke-previous']];
      const results = await togetherWherePossible(
        target,
        argsTried.map((args) => () => run(target, 'rotate-signing-key', args)),
      );
      for (const [i, result] of results.entries()) {
        const args = argsTried[i]!;
        expect(result.code, `${args.join(' ')}: ${result.stderr}`).toBe(1);
        expect(result.stdout).toBe('');
        const lines = result.stderr.trim().split('\n');
        expect(lines, result.stderr).toHaveLength(1);
        expect(lines[0]).toBe(
          'error: there is no signing key to rotate: the service makes the first keys at its ' +
            'first start, and has not started on this database (is DATABASE_URL, or DATA_DIR, the ' +
            'service’s?); no key was made',
        );
      }
      await withDatabase(target, async (database) => {
        expect(await createSigningKeysRepository(database.db).list({ limit: 10 })).toEqual([]);
      });
      // Once the service has started on it, the same command rotates.
      await withApp(target, async () => undefined);
      const rotated = await run(target, 'rotate-signing-key', ['--force']);
      expect(rotated.code, rotated.stderr).toBe(0);
      expect(rotated.stdout).toMatch(/retiring signing key: \S+, published until/);
    },
    SPAWN_TEST_TIMEOUT * 2,
  );
});

describe('scripts/rotate-signing-key.ts with keys but none active (an operator retired the active key)', () => {
  let target: Target;
  beforeAll(async () => {
    target = await createTarget();
    await withApp(target, async () => undefined);
  }, SPAWN_TEST_TIMEOUT);
  afterAll(async () => {
    await target?.drop();
  });

  const onTarget = (statement: ReturnType<typeof sql>) =>
    withDatabase(target, async (database) => {
      await database.db.execute(statement);
    });
  /** What an operator does by hand: the keys in `states` retired. */
  const retire = (...states: string[]) =>
    onTarget(
      sql`UPDATE signing_keys SET state = 'retired', retiring_at = now(), publish_until = now()
          WHERE state IN (${sql.join(
            states.map((s) => sql`${s}`),
            sql`, `,
          )})`,
    );
  /** The active and next keys: the active one first (a key made with it has the same created_at). */
  const keys = () =>
    withDatabase(target, (database) =>
      selectRows<{ kid: string; state: string }>(
        database.db,
        sql`SELECT kid, state FROM signing_keys WHERE state IN ('active', 'next') ORDER BY state = 'next', created_at, kid`,
      ),
    );
  const refusal = (result: RunResult) => {
    expect(result.code, result.stderr).toBe(1);
    expect(result.stdout).toBe('');
    const lines = result.stderr.trim().split('\n');
    expect(lines, result.stderr).toHaveLength(1);
    return lines[0]!;
  };

  it(
    'makes the published next key active as the service does, or says exactly why not',
    async () => {
      const [active, next] = (await keys()).map((k) => k.kid);
      expect((await keys()).map((k) => k.state)).toEqual(['active', 'next']);
      await retire('active');

      // The next key published (as far as the database knows) only now: running instances may lack it.
      await onTarget(
        sql`UPDATE signing_keys SET created_at = now() + interval '1 minute' WHERE kid = ${next!}`,
      );
      expect(refusal(await run(target, 'rotate-signing-key', ['--force']))).toMatch(
        new RegExp(
          `^error: there is no active signing key, and the next key ${next} has been published for less ` +
            'than 5 s .*: it can be made active in \\d+ s .*; nothing was changed$',
        ),
      );
      expect(await keys()).toEqual([{ kid: next, state: 'next' }]);

      // Published long enough, but its row holds the retired key's private key: it cannot sign.
      const [saved] = await withDatabase(target, (database) =>
        selectRows<{ private_key_encrypted: string }>(
          database.db,
          sql`SELECT private_key_encrypted FROM signing_keys WHERE kid = ${next!}`,
        ),
      );
      await onTarget(
        sql`UPDATE signing_keys SET created_at = now() - interval '1 minute', private_key_encrypted =
              (SELECT private_key_encrypted FROM signing_keys WHERE kid = ${active!})
            WHERE kid = ${next!}`,
      );
      const cannot = refusal(await run(target, 'rotate-signing-key', []));
      expect(cannot).toMatch(
        /^error: there is no active signing key, and the published next key cannot be made active: the private key stored for the signing key/,
      );
      expect(cannot).toContain('npm run rotate-signing-key -- --revoke-previous');
      expect(await keys()).toEqual([{ kid: next, state: 'next' }]);

      // Restored: it is made active, a new next key made, and audited as the service's recovery.
      await onTarget(
        sql`UPDATE signing_keys SET private_key_encrypted = ${saved!.private_key_encrypted} WHERE kid = ${next!}`,
      );
      const promoted = await run(target, 'rotate-signing-key', []);
      expect(promoted.code, promoted.stderr).toBe(0);
      expect(promoted.stdout).toBe(
        `active signing key: ${next}\nretiring signing key: none (there was no active key: the published next key was made active)\n`,
      );
      const after = await keys();
      expect(after.map((k) => k.state)).toEqual(['active', 'next']);
      expect(after[0]!.kid).toBe(next);
      const audited = await withDatabase(target, (database) =>
        selectRows<{ data: Record<string, unknown> }>(
          database.db,
          sql`SELECT data FROM audit_events WHERE type = 'signing_key.rotated' AND subject_id = ${next!}`,
        ),
      );
      expect(audited).toHaveLength(1);
      expect(audited[0]!.data).toMatchObject({ no_active_key: true, previous: [] });

      // No next key either: one is made (and announced), to be made active 5 s later.
      await retire('active', 'next');
      expect(refusal(await run(target, 'rotate-signing-key', []))).toMatch(
        /^error: there is no active signing key, and no next key was published: a new next key was made and announced; it can be made active in 5 s/,
      );
      expect((await keys()).map((k) => k.state)).toEqual(['next']);

      // --revoke-previous (the way out of a next key that cannot sign) is not refused without an active key.
      const revoked = await run(target, 'rotate-signing-key', ['--revoke-previous']);
      expect(revoked.code, revoked.stderr).toBe(0);
      expect((await keys()).map((k) => k.state).sort()).toEqual(['active', 'next']);
    },
    SPAWN_TEST_TIMEOUT * 3,
  );
});

/** The operator scripts (scripts/bench*.ts are a development tool). */
const SCRIPTS = ['create-admin', 'rotate-signing-key', 'migrate', 'verify-migrations', 'export-openapi'];

describe('scripts/migrate.ts and scripts/export-openapi.ts', () => {
  const journaled = (
    JSON.parse(readFileSync(join(MIGRATIONS_FOLDER, 'meta/_journal.json'), 'utf8')) as { entries: unknown[] }
  ).entries.length;
  const scratchDirs: string[] = [];
  const scratchDir = () => {
    const dir = mkdtempSync(join(tmpdir(), 'auth-scripts-'));
    scratchDirs.push(dir);
    return dir;
  };
  afterAll(() => {
    for (const dir of scratchDirs) rmSync(dir, { recursive: true, force: true });
  });

  /** The failure is one line on stderr (no stack trace), nothing on stdout, exit code 1. */
  function expectOneLineFailure(result: RunResult, pattern: RegExp) {
    expect(result.code, result.stderr).toBe(1);
    expect(result.stdout).toBe('');
    expect(result.stderr.trim().split('\n'), result.stderr).toHaveLength(1);
    expect(result.stderr).toMatch(pattern);
    expect(result.stderr).not.toMatch(/^\s+at /m);
  }

  it(
    'db:migrate says how many migrations it applied, then that none were pending; logs go to stderr; production secrets are not needed',
    async () => {
      const target = await createTarget();
      try {
        // NODE_ENV=production without KEY_ENCRYPTION_KEY or SECRET_PEPPER: migrating uses neither.
        const env = { LOG_LEVEL: 'info', NODE_ENV: 'production', KEY_ENCRYPTION_KEY: '', SECRET_PEPPER: '' };
        const first = await run(target, 'migrate', [], env);
        expect(first.code, first.stderr).toBe(0);
        expect(first.stdout).toMatch(
          new RegExp(`^applied ${journaled} migrations \\(${target.kind}\\): 0000_init, `),
        );
        expect(first.stdout.trim().split('\n')).toHaveLength(1);
        // The log lines (JSON) are on stderr, and say the same.
        expect(first.stderr).toContain(`"msg":"applied ${journaled} database migrations: 0000_init`);
        expect(first.stderr).not.toContain('up to date');

        const second = await run(target, 'migrate', [], env);
        expect(second.code, second.stderr).toBe(0);
        expect(second.stdout).toBe(`no migrations pending (${journaled} applied, ${target.kind})\n`);
        expect(second.stderr).toContain('"msg":"database migrations: none pending"');
        // Nothing was generated into DATA_DIR/secrets either.
        expect(existsSync(join(target.dataDir, 'secrets'))).toBe(false);
      } finally {
        await target.drop();
      }
    },
    SPAWN_TEST_TIMEOUT,
  );

  it(
    'db:migrate and openapi report ordinary failures in one line with exit code 1, never a stack trace',
    async () => {
      const target: Target = {
        kind: 'pglite',
        url: undefined,
        dataDir: scratchDir(),
        drop: async () => undefined,
      };
      const serverUrl = inject('databaseUrl');
      const missingDatabase = serverUrl ? new URL(serverUrl) : undefined;
      if (missingDatabase) missingDatabase.pathname = `/auth_missing_${randomBytes(4).toString('hex')}`;
      // None of these opens the embedded database, so they may run side by side.
      const [badUrl, refused, missing, badPort, openapiPort] = await Promise.all([
        run(target, 'migrate', [], { DATABASE_URL: 'mysql://db.example.test/auth' }),
        run(target, 'migrate', [], { DATABASE_URL: 'postgres://postgres@127.0.0.1:1/auth' }),
        missingDatabase
          ? run(target, 'migrate', [], { DATABASE_URL: missingDatabase.toString() })
          : undefined,
        run(target, 'migrate', [], { PORT: 'abc' }),
        run(target, 'export-openapi', [join(scratchDir(), 'openapi.json')], { PORT: 'abc' }),
      ]);
      expectOneLineFailure(badUrl, /^invalid configuration: DATABASE_URL: must be a postgres:\/\//);
      expectOneLineFailure(
        refused,
        /^error: cannot connect to the database at 127\.0\.0\.1:1\/auth: connect ECONNREFUSED 127\.0\.0\.1:1$/m,
      );
      if (missing)
        expectOneLineFailure(missing, /^error: database "auth_missing_\w+" does not exist \(3D000\)$/m);
      expectOneLineFailure(badPort, /^invalid configuration: PORT: /);
      expectOneLineFailure(openapiPort, /^invalid configuration: PORT: /);
    },
    SPAWN_TEST_TIMEOUT,
  );

  it(
    'openapi refuses an output file it cannot write as a usage error, before it builds anything',
    async () => {
      const dir = scratchDir();
      const target: Target = { kind: 'pglite', url: undefined, dataDir: dir, drop: async () => undefined };
      const missingDir = join(dir, 'no-such-directory');
      const missing = join(missingDir, 'openapi.json');
      // PORT=abc fails the configuration, read before the app is built: the path is refused before it.
      const [noDirectory, aDirectory] = await Promise.all([
        run(target, 'export-openapi', [missing], { PORT: 'abc' }),
        run(target, 'export-openapi', [dir], { PORT: 'abc' }),
      ]);
      for (const [result, problem] of [
        [noDirectory, `cannot write ${missing}: the directory ${missingDir} does not exist`],
        [aDirectory, `cannot write ${dir}: it is a directory`],
      ] as const) {
        expect(result.code, result.stderr).toBe(1);
        expect(result.stdout).toBe('');
        // The usage error's form, as for a bad option: the problem, a blank line, the usage.
        expect(result.stderr.split('\n\n')[0]).toBe(problem);
        expect(result.stderr).toContain('\n\nusage: npm run openapi [-- <file>]\n');
      }
    },
    SPAWN_TEST_TIMEOUT,
  );

  it(
    'the server says why it cannot start in one line, exit code 1: the database refusing, the data directory not one',
    async () => {
      const notADirectory = join(scratchDir(), 'a-file');
      writeFileSync(notADirectory, '');
      const target: Target = {
        kind: 'pglite',
        url: undefined,
        dataDir: notADirectory,
        drop: async () => undefined,
      };
      // `scripts/../src/server` is the server itself, run as `npm start` runs it.
      const tooLong = `${'a'.repeat(64)}@${'b'.repeat(63)}.${'c'.repeat(63)}.${'d'.repeat(63)}.test`;
      const [refused, dataDir, badPort, longAdmin] = await Promise.all([
        run(target, '../src/server', [], {
          DATABASE_URL: 'postgres://postgres@127.0.0.1:1/auth',
          PORT: '8797',
        }),
        run(target, '../src/server', [], { PORT: '8798' }),
        run(target, '../src/server', [], { PORT: 'abc' }),
        // An address sign-in refuses (over 254 characters): the admin made with it could never sign in.
        run(target, '../src/server', [], {
          PORT: '8799',
          BOOTSTRAP_ADMIN_EMAIL: tooLong,
          BOOTSTRAP_ADMIN_PASSWORD: PASSWORD,
        }),
      ]);
      expectOneLineFailure(longAdmin, /^failed to start: invalid configuration: BOOTSTRAP_ADMIN_EMAIL: /m);
      expectOneLineFailure(badPort, /^failed to start: invalid configuration: PORT: must be a whole number/m);
      expectOneLineFailure(
        refused,
        /^failed to start: cannot connect to the database at 127\.0\.0\.1:1\/auth: connect ECONNREFUSED/m,
      );
      expectOneLineFailure(dataDir, /^failed to start: ENOTDIR: not a directory/m);
    },
    SPAWN_TEST_TIMEOUT,
  );

  it(
    'every script: --help is its usage (exit 0); a bad option, missing production secrets or an unreachable database are one line, exit 1',
    async () => {
      const target: Target = {
        kind: 'pglite',
        url: undefined,
        dataDir: scratchDir(),
        drop: async () => undefined,
      };
      const scripts = SCRIPTS;
      const unreachable = { DATABASE_URL: 'postgres://postgres@127.0.0.1:1/auth' };
      const noSecrets = { NODE_ENV: 'production', KEY_ENCRYPTION_KEY: '', SECRET_PEPPER: '' };
      const adminArgs = ['--email', uniqueEmail('cli-unreachable'), '--password', PASSWORD];
      // None of these opens the embedded database, so they may run side by side: a few at a time, as
      // each starts a node process. db:verify, the longest by far (it checks the snapshot and migrates
      // an in-memory database before it tries DATABASE_URL), runs beside all the others.
      const verifying = run(target, 'verify-migrations', [], unreachable);
      // Awaited below; a failure before then must not surface as an unhandled rejection too.
      verifying.catch(() => undefined);
      const help = await Promise.all(scripts.map((script) => run(target, script, ['--help'])));
      const badOption = await Promise.all(scripts.map((script) => run(target, script, ['--no-such-option'])));
      const [adminNoSecrets, rotateNoSecrets, adminUnreachable, rotateUnreachable] = await Promise.all([
        run(target, 'create-admin', adminArgs, { ...unreachable, ...noSecrets }),
        run(target, 'rotate-signing-key', ['--force'], { ...unreachable, ...noSecrets }),
        run(target, 'create-admin', adminArgs, unreachable),
        run(target, 'rotate-signing-key', ['--force'], unreachable),
      ]);
      const verifyUnreachable = await verifying;
      for (const [i, script] of scripts.entries()) {
        expect(help[i]!.code, `${script} --help: ${help[i]!.stderr}`).toBe(0);
        expect(help[i]!.stdout, script).toMatch(/^usage: npm run /);
        expect(help[i]!.stderr, script).toBe('');
        const bad = badOption[i]!;
        expect(bad.code, `${script} --no-such-option: ${bad.stdout}`).toBe(1);
        expect(bad.stdout, script).toBe('');
        expect(bad.stderr, script).toMatch(/^Unknown option '--no-such-option'.*\n\nusage: npm run /s);
        expect(bad.stderr, script).not.toMatch(/^\s+at /m);
      }
      for (const result of [adminNoSecrets, rotateNoSecrets])
        expectOneLineFailure(
          result,
          /^invalid configuration: KEY_ENCRYPTION_KEY: is required in production; SECRET_PEPPER: is required in production$/m,
        );
      for (const result of [adminUnreachable, rotateUnreachable])
        expectOneLineFailure(
          result,
          /^error: cannot connect to the database at 127\.0\.0\.1:1\/auth: connect ECONNREFUSED 127\.0\.0\.1:1$/m,
        );
      // db:verify has checked the code and the journal by then (its ✓ lines on stdout); the database is
      // one line on stderr, exit 1.
      expect(verifyUnreachable.code, verifyUnreachable.stderr).toBe(1);
      expect(verifyUnreachable.stderr.trim().split('\n')).toEqual([
        'error: cannot connect to the database at 127.0.0.1:1/auth: connect ECONNREFUSED 127.0.0.1:1',
      ]);
    },
    SPAWN_TEST_TIMEOUT * 3,
  );

  it('every script reads its arguments before it loads the configuration, the database or the services', () => {
    // What a script imports statically loads before a line of it runs, --help included: node's modules,
    // dotenv (ADMIN_PASSWORD may come from .env), the arguments' code; the rest with `await import`.
    const light = ['scripts/lib/script-context.ts', 'src/lib/paths.ts'];
    const staticImport = /^import\s+(?!type\b)(?:[^'";]*?\sfrom\s*)?['"]([^'"]+)['"]/gm;
    for (const script of SCRIPTS) {
      const files = new Set<string>();
      const packages = new Set<string>();
      const visit = (file: string) => {
        if (files.has(file)) return;
        files.add(file);
        for (const [, specifier] of readFileSync(join(ROOT, file), 'utf8').matchAll(staticImport)) {
          if (specifier!.startsWith('.'))
            visit(relative(ROOT, join(ROOT, dirname(file), specifier!.replace(/\.js$/, '.ts'))));
          else if (!specifier!.startsWith('node:')) packages.add(specifier!);
        }
      };
      visit(`scripts/${script}.ts`);
      files.delete(`scripts/${script}.ts`);
      expect(
        [...files].filter((file) => !light.includes(file)),
        script,
      ).toEqual([]);
      expect(
        [...packages].filter((name) => name !== 'dotenv/config'),
        script,
      ).toEqual([]);
    }
  });

  it(
    'openapi writes the document with NODE_ENV=production and no production secrets',
    async () => {
      const dataDir = scratchDir();
      const out = join(dataDir, 'openapi.json');
      const target: Target = { kind: 'pglite', url: undefined, dataDir, drop: async () => undefined };
      const result = await run(target, 'export-openapi', [out], {
        NODE_ENV: 'production',
        KEY_ENCRYPTION_KEY: '',
        SECRET_PEPPER: '',
      });
      expect(result.code, result.stderr).toBe(0);
      const document = JSON.parse(readFileSync(out, 'utf8')) as { openapi: string; paths: object };
      expect(document.openapi).toMatch(/^3\./);
      expect(result.stdout).toBe(`wrote ${out} (${Object.keys(document.paths).length} paths)\n`);
      expect(Object.keys(document.paths).length).toBeGreaterThan(20);
      expect(existsSync(join(dataDir, 'secrets'))).toBe(false);
    },
    SPAWN_TEST_TIMEOUT,
  );
});

describe('BOOTSTRAP_ADMIN_EMAIL / BOOTSTRAP_ADMIN_PASSWORD', () => {
  it('creates the first admin at start, once, and does nothing once an admin exists', async () => {
    // A database of its own: bootstrap acts only when no admin exists, and the shared one has admins.
    // A scratch one on the test PostgreSQL server (an in-process PGlite takes seconds to start).
    const own = await ownDatabase('auth_bootstrap');
    const { database } = own;
    const email = uniqueEmail('bootstrap');
    const env = { BOOTSTRAP_ADMIN_EMAIL: email, BOOTSTRAP_ADMIN_PASSWORD: PASSWORD };
    try {
      for (let start = 0; start < 2; start++) {
        const app = await startApp(database, env);
        await app.close();
      }
      const users = createUsersRepository(database.db);
      expect(await users.countWithRole('admin')).toBe(1);
      expect(await countUsers(database.db, email)).toBe(1);

      const other = uniqueEmail('bootstrap-late');
      const app = await startApp(database, {
        BOOTSTRAP_ADMIN_EMAIL: other,
        BOOTSTRAP_ADMIN_PASSWORD: PASSWORD,
      });
      try {
        expect(await users.findByEmail(other)).toBeUndefined();
        const me = await expectLogin(app, email, PASSWORD);
        expect(me.roles).toEqual(expect.arrayContaining(['admin', 'user']));
        // The admin's token carries admin-only permissions.
        const keys = await app.inject({
          method: 'GET',
          url: '/v1/signing-keys',
          headers: bearer(me.accessToken),
        });
        expect(keys.statusCode).toBe(200);
      } finally {
        await app.close();
      }
    } finally {
      await own.dispose();
    }
  });
});
