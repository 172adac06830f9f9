import { randomBytes } from 'node:crypto';
import { cpSync, existsSync, mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { builtinModules } from 'node:module';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import { readJournal } from '../../src/db/migrations.js';
import { scratchDatabase } from '../support/database.js';
import { ROOT, runUntilExit, spawnServer } from '../support/spawn-server.js';

/*
 * The Docker image runs what `npm run build` compiles (`node dist/src/server.js`, and the operator
 * scripts under dist/scripts) with production dependencies only; there is no Docker engine here to
 * build it, so this checks what that image depends on: every package the compiled code imports is a
 * runtime dependency (not only a dev one, which `npm ci --omit=dev` leaves out), the compiled server
 * starts, answers and stops, and the compiled scripts run from a directory laid out as the image is
 * (dist, drizzle, data, package*.json and `npm ci --omit=dev`: no tsx, no TypeScript, no source).
 * That last one runs `npm ci`, so it needs the npm registry or a warm npm cache.
 */

function filesUnder(dir: string): string[] {
  return readdirSync(dir, { withFileTypes: true }).flatMap((entry) =>
    entry.isDirectory() ? filesUnder(join(dir, entry.name)) : [join(dir, entry.name)],
  );
}

/** The package a bare import specifier names: `@scope/name` or `name`. */
const packageOf = (specifier: string) =>
  specifier
    .split('/')
    .slice(0, specifier.startsWith('@') ? 2 : 1)
    .join('/');

// What `npm run build` writes: the run's (test/support/global-setup.ts runs the same command once for
// the run, when other files need it), else built here, once for the file. Inside the project, so the
// compiled code finds package.json, drizzle/ and node_modules above it.
const runBuild = inject('compiledDir');
const outDir = runBuild ?? join(ROOT, '.data', `build-${randomBytes(4).toString('hex')}`);

beforeAll(async () => {
  if (runBuild) return;
  await runUntilExit({
    node: join(ROOT, 'node_modules/typescript/bin/tsc'),
    args: ['-p', 'tsconfig.build.json', '--outDir', outDir],
    timeoutMs: 120_000,
    mustSucceed: true,
  });
}, 120_000);

afterAll(() => {
  if (!runBuild) rmSync(outDir, { recursive: true, force: true });
});

describe('the production build (what the Docker image runs)', () => {
  const dataDir = mkdtempSync(join(tmpdir(), 'auth-build-'));

  afterAll(() => {
    rmSync(dataDir, { recursive: true, force: true });
  });

  it('imports only node builtins and packages listed in dependencies', () => {
    const manifest = JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as {
      dependencies: Record<string, string>;
    };
    const builtins = new Set(builtinModules);
    const imported = new Set<string>();
    for (const file of filesUnder(outDir).filter((f) => f.endsWith('.js'))) {
      const source = readFileSync(file, 'utf8');
      for (const match of source.matchAll(
        /(?:\bfrom\s*|\bimport\s*\(\s*|\bimport\s+)['"]([^'"./][^'"]*)['"]/g,
      )) {
        const specifier = match[1]!;
        if (specifier.startsWith('node:') || builtins.has(specifier)) continue;
        imported.add(packageOf(specifier));
      }
    }
    expect(imported.size).toBeGreaterThan(10);
    expect([...imported].filter((name) => !(name in manifest.dependencies))).toEqual([]);
  });

  it('compiles the operator scripts too, and the image copies them', () => {
    for (const script of [
      'migrate',
      'create-admin',
      'rotate-signing-key',
      'verify-migrations',
      'export-openapi',
    ])
      expect(existsSync(join(outDir, `scripts/${script}.js`)), script).toBe(true);
    // The benchmark is a development tool on dev dependencies (autocannon): not built.
    expect(existsSync(join(outDir, 'scripts/bench.js'))).toBe(false);
    const dockerfile = readFileSync(join(ROOT, 'Dockerfile'), 'utf8');
    expect(dockerfile).toMatch(/^COPY scripts \.\/scripts\nRUN npm run build$/m);
    expect(dockerfile).toMatch(/^COPY --from=build \/app\/dist \.\/dist$/m);
    // Restarted on liveness only: a database outage must not restart every container.
    expect(dockerfile).toMatch(/^HEALTHCHECK .*--start-period=90s/m);
    expect(dockerfile).toMatch(/\/health\/live'\)/);
    expect(dockerfile).not.toMatch(/--chown=node:node (\/app\/dist|\/app\/node_modules)/);
    const ignored = readFileSync(join(ROOT, '.dockerignore'), 'utf8').split('\n');
    for (const entry of [
      '.git',
      'node_modules',
      '.data',
      '.env',
      'dist',
      'coverage',
      'bench-results',
      '*.log',
    ])
      expect(ignored, entry).toContain(entry);
  });

  it('starts the compiled server on PGlite, answers, and exits 0 on SIGTERM', async () => {
    const server = await spawnServer({
      node: join(outDir, 'src/server.js'),
      listen: true,
      publicUrl: true,
      env: {
        NODE_ENV: 'production',
        DATA_DIR: dataDir,
        DATABASE_URL: '',
        REDIS_URL: '',
        SUPABASE_URL: '',
        AUTH_PROVIDER: 'local',
        LOG_LEVEL: 'warn',
        KEY_ENCRYPTION_KEY: randomBytes(32).toString('base64'),
        SECRET_PEPPER: randomBytes(32).toString('base64'),
      },
    });

    const base = server.baseUrl;
    const ready = await server.waitForReady(30_000);
    expect(ready, server.output).toBe(200);
    const jwks = await fetch(`${base}/.well-known/jwks.json`);
    expect(jwks.status).toBe(200);
    expect(((await jwks.json()) as { keys: unknown[] }).keys.length).toBeGreaterThan(0);
    const docs = await fetch(`${base}/docs/`);
    expect(docs.status).toBe(200);
    const register = await fetch(`${base}/v1/auth/register`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ email: 'built@example.test', password: 'a long enough passphrase 7' }),
    });
    expect(register.status, await register.clone().text()).toBe(201);

    server.kill('SIGTERM');
    expect((await server.exited).code, server.output).toBe(0);
  }, 60_000);
});

describe('the operator scripts in a production install (dist + drizzle + data + npm ci --omit=dev)', () => {
  const app = mkdtempSync(join(tmpdir(), 'auth-prod-'));
  let database: { url: string | undefined; drop(): Promise<void> } = {
    url: undefined,
    drop: async () => undefined,
  };
  const keys = {
    KEY_ENCRYPTION_KEY: randomBytes(32).toString('base64'),
    SECRET_PEPPER: randomBytes(32).toString('base64'),
  };
  /** The environment of the image (none of the test run's), NODE_ENV=production. */
  const env = () => ({
    NODE_ENV: 'production',
    LOG_LEVEL: 'warn',
    DATABASE_URL: database.url ?? '',
    DATA_DIR: join(app, '.data'),
    AUTH_PROVIDER: 'local',
    SUPABASE_URL: '',
    REDIS_URL: '',
    BOOTSTRAP_ADMIN_EMAIL: '',
    BOOTSTRAP_ADMIN_PASSWORD: '',
    ADMIN_PASSWORD: '',
    ...keys,
  });
  /** Runs `command` in the install; a non-zero exit throws (with its code, stdout and stderr). */
  const inApp = (command: string, args: string[], extra: Record<string, string> = {}) =>
    runUntilExit({
      command,
      args,
      cwd: app,
      env: { ...env(), ...extra },
      timeoutMs: 60_000,
      mustSucceed: true,
    });

  beforeAll(async () => {
    // What the image holds: the build, the migrations, the data files, the manifest.
    cpSync(outDir, join(app, 'dist'), { recursive: true });
    for (const entry of ['drizzle', 'data', 'package.json', 'package-lock.json'])
      cpSync(join(ROOT, entry), join(app, entry), { recursive: true });
    // npm's own settings (a registry, a proxy) are kept; the test run's npm_* are not.
    await runUntilExit({
      command: 'npm',
      args: ['ci', '--omit=dev', '--prefer-offline', '--no-audit', '--no-fund'],
      cwd: app,
      inheritEnv: (name) => !name.startsWith('npm_'),
      env: env(),
      timeoutMs: 300_000,
      mustSucceed: true,
    });
    if (inject('databaseUrl')) database = (await scratchDatabase('auth_prod_scripts'))!;
  }, 400_000);

  afterAll(async () => {
    await database.drop();
    rmSync(app, { recursive: true, force: true });
  });

  it('has no dev dependency and no source to fall back on', () => {
    for (const dev of ['tsx', 'typescript', 'vitest', 'drizzle-kit', '@biomejs/biome'])
      expect(existsSync(join(app, 'node_modules', dev)), dev).toBe(false);
    expect(existsSync(join(app, 'src'))).toBe(false);
    expect(existsSync(join(app, 'scripts'))).toBe(false);
  });

  it('migrates, creates an admin and rotates the signing key, by node dist/scripts/… and by npm run …:prod', async () => {
    const journaled = readJournal().length;
    // A failure is one line and exit code 1 here too: a usage error, found before the database is
    // opened, so it runs beside the rest.
    const refusing = inApp(process.execPath, ['dist/scripts/create-admin.js', '--email', 'nope']).then(
      () => undefined,
      (err: { code?: number; stderr?: string }) => err,
    );
    const migrated = await inApp(process.execPath, ['dist/scripts/migrate.js']);
    expect(migrated.stdout).toMatch(
      new RegExp(`^applied ${journaled} migrations \\((postgres|pglite)\\): 0000_init, `),
    );

    const again = await inApp('npm', ['run', '--silent', 'db:migrate:prod']);
    expect(again.stdout).toBe(
      `no migrations pending (${journaled} applied, ${database.url ? 'postgres' : 'pglite'})\n`,
    );

    const email = `prod-admin-${randomBytes(4).toString('hex')}@example.test`;
    const created = await inApp(process.execPath, ['dist/scripts/create-admin.js', '--email', email], {
      ADMIN_PASSWORD: 'a long enough passphrase 7',
    });
    expect(created.stdout).toMatch(/^created admin \S+ \(id [0-9a-f-]{36}\)\n$/);
    expect(created.stdout).toContain(`created admin ${email} `);
    const granted = await inApp('npm', ['run', '--silent', 'create-admin:prod', '--', '--email', email]);
    expect(granted.stdout).toContain(`${email} (id `);
    expect(granted.stdout).toContain('already holds the admin role; nothing changed');

    // No key to rotate before the service has started on the database: refused, nothing written.
    const early = await inApp('npm', ['run', '--silent', 'rotate-signing-key:prod', '--', '--force']).then(
      () => undefined,
      (err: { code?: number; stderr?: string }) => err,
    );
    expect(early?.code).toBe(1);
    expect(early?.stderr).toMatch(/^error: there is no signing key to rotate: /m);
    // The compiled server's start makes the first keys.
    const server = await spawnServer({
      node: 'dist/src/server.js',
      cwd: app,
      listen: true,
      publicUrl: true,
      env: env(),
    });
    expect(await server.waitForReady(60_000), server.output).toBe(200);
    expect((await server.stop()).code, server.output).toBe(0);
    const rotated = await inApp('npm', ['run', '--silent', 'rotate-signing-key:prod', '--', '--force']);
    expect(rotated.stdout).toMatch(/^active signing key: \S+\n/);
    expect(rotated.stdout).toMatch(/^retiring signing key: \S+, published until /m);

    const refused = await refusing;
    expect(refused?.code).toBe(1);
    expect(refused?.stderr).toMatch(/^not an email address: nope\n/);
  }, 120_000);

  it('verifies the database it migrated (the snapshot check needs the source, and says it skipped)', async () => {
    await inApp(process.execPath, ['dist/scripts/migrate.js']);
    const verified = await inApp('npm', ['run', '--silent', 'db:verify:prod']);
    expect(verified.stdout).toContain('- snapshot check skipped');
    expect(verified.stdout).toMatch(/✓ migrations applied to an empty database match the code/);
    if (database.url) expect(verified.stdout).toMatch(/: the schema is what the migrations make/);
  }, 120_000);
});
