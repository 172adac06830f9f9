import { type ChildProcess, execFile, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { builtinModules } from 'node:module';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

/*
 * The Docker image runs what `npm run build` compiles (`node dist/src/server.js`) with production
 * dependencies only; there is no Docker engine here to build it, so this checks the two things that
 * image depends on: every package the compiled code imports is a runtime dependency (not only a dev
 * one, which `npm ci --omit=dev` leaves out), and the compiled server starts, answers and stops.
 */

const ROOT = resolve(import.meta.dirname, '../..');
const run = promisify(execFile);

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

describe('the production build (what the Docker image runs)', () => {
  // Inside the project, so the compiled code finds package.json, drizzle/ and node_modules above it.
  const outDir = join(ROOT, '.data', `build-${randomBytes(4).toString('hex')}`);
  const dataDir = mkdtempSync(join(tmpdir(), 'auth-build-'));
  let server: ChildProcess | undefined;

  beforeAll(async () => {
    await run(
      process.execPath,
      [join(ROOT, 'node_modules/typescript/bin/tsc'), '-p', 'tsconfig.build.json', '--outDir', outDir],
      {
        cwd: ROOT,
      },
    );
  }, 120_000);

  afterAll(() => {
    server?.kill('SIGKILL');
    rmSync(outDir, { recursive: true, force: true });
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

  it('starts the compiled server on PGlite, answers, and exits 0 on SIGTERM', async () => {
    const port = 20_000 + Math.floor(Math.random() * 20_000);
    const child = spawn(process.execPath, [join(outDir, 'src/server.js')], {
      cwd: ROOT,
      stdio: ['ignore', 'pipe', 'pipe'],
      env: {
        ...process.env,
        NODE_ENV: 'production',
        PORT: String(port),
        HOST: '127.0.0.1',
        PUBLIC_URL: `http://127.0.0.1:${port}`,
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
    server = child;
    let output = '';
    child.stdout?.on('data', (c: Buffer) => (output += c.toString()));
    child.stderr?.on('data', (c: Buffer) => (output += c.toString()));
    const exited = new Promise<number | null>((done) => child.on('exit', (code) => done(code)));

    const base = `http://127.0.0.1:${port}`;
    const deadline = Date.now() + 30_000;
    let ready = 0;
    while (Date.now() < deadline && ready !== 200) {
      ready = await fetch(`${base}/health/ready`).then(
        (r) => r.status,
        () => 0,
      );
      if (ready !== 200) await new Promise((r) => setTimeout(r, 250));
    }
    expect(ready, output).toBe(200);
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

    child.kill('SIGTERM');
    expect(await exited, output).toBe(0);
    server = undefined;
  }, 60_000);
});
