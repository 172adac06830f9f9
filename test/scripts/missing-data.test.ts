import { spawn } from 'node:child_process';
import { cpSync, mkdtempSync, rmSync, symlinkSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { freePort } from '../faults/support/cluster.js';

/*
 * data/common-passwords.txt is part of the service, as drizzle/ is. An install without it (a copy
 * that left data/ out) started and was ready, then answered every registration 500 (ENOENT); and with
 * BOOTSTRAP_ADMIN_PASSWORD set the start said the password was not acceptable. Here, a copy of the
 * project without data/ (its node_modules linked).
 */

const ROOT = resolve(import.meta.dirname, '../..');

interface Outcome {
  code: number | null;
  output: string;
}

/** Runs `file` in `cwd` until it exits, or until it says the service is ready (then stops it). */
function runUntilExit(cwd: string, file: string, env: Record<string, string>): Promise<Outcome> {
  return new Promise((done, fail) => {
    const child = spawn(process.execPath, ['--import', 'tsx', file], {
      cwd,
      stdio: ['ignore', 'pipe', 'pipe'],
      env: {
        PATH: process.env.PATH ?? '',
        HOME: process.env.HOME ?? tmpdir(),
        NODE_ENV: 'test',
        LOG_LEVEL: 'info',
        DATABASE_URL: '',
        DATA_DIR: join(cwd, '.data'),
        ...env,
      },
    });
    let output = '';
    for (const stream of [child.stdout, child.stderr])
      stream.on('data', (chunk: Buffer) => {
        output += chunk.toString();
        // Started without its list: what this test is against; no need to wait any longer.
        if (output.includes('auth service ready')) child.kill('SIGKILL');
      });
    child.on('error', fail);
    child.on('close', (code) => done({ code, output }));
  });
}

describe('an install without data/common-passwords.txt', () => {
  const copy = mkdtempSync(join(tmpdir(), 'auth-no-data-'));
  for (const entry of ['src', 'scripts', 'drizzle', 'package.json', 'tsconfig.json'])
    cpSync(join(ROOT, entry), join(copy, entry), { recursive: true });
  symlinkSync(join(ROOT, 'node_modules'), join(copy, 'node_modules'));
  afterAll(() => rmSync(copy, { recursive: true, force: true }));

  const missing = join(copy, 'data/common-passwords.txt');

  it('does not start: one line naming the file, exit 1', async () => {
    const port = await freePort();
    const { code, output } = await runUntilExit(copy, 'src/server.ts', {
      HOST: '127.0.0.1',
      PORT: String(port),
    });
    expect(output).not.toContain('auth service ready');
    expect(code, output).toBe(1);
    expect(output).toContain(`failed to start: cannot read the list of common passwords ${missing} (ENOENT)`);
  }, 60_000);

  it('with BOOTSTRAP_ADMIN_PASSWORD, a script says the file is missing, not that the password is not acceptable', async () => {
    const { code, output } = await runUntilExit(copy, 'scripts/migrate.ts', {
      BOOTSTRAP_ADMIN_EMAIL: 'admin@example.test',
      BOOTSTRAP_ADMIN_PASSWORD: 'a long enough passphrase 7',
    });
    expect(code, output).toBe(1);
    expect(output).toContain(`error: cannot read the list of common passwords ${missing} (ENOENT)`);
    expect(output).not.toContain('acceptable password');
  }, 60_000);
});
