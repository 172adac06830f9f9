import { cpSync, mkdtempSync, rmSync, symlinkSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { spawnServer } from '../support/spawn-server.js';

/*
 * data/common-passwords.txt is part of the service, as drizzle/ is. An install without it (a copy
 * that left data/ out) started and was ready, then answered every registration 500 (ENOENT); and with
 * BOOTSTRAP_ADMIN_PASSWORD set the start said the password was not acceptable. Here, a copy of the
 * project without data/ (its node_modules linked).
 */

const ROOT = resolve(import.meta.dirname, '../..');

/** Runs `file` in `cwd` until it exits, or until it says the service is ready (then stops it). */
async function runUntilExit(
  cwd: string,
  file: string,
  options: { listen?: boolean; env?: Record<string, string> },
) {
  const child = await spawnServer({
    tsx: file,
    cwd,
    listen: options.listen,
    env: { LOG_LEVEL: 'info', DATABASE_URL: '', DATA_DIR: join(cwd, '.data'), ...options.env },
  });
  // Started without its list: what this test is against; no need to wait any longer.
  child.waitForLine(/auth service ready/, 60_000).then(
    () => child.kill('SIGKILL'),
    () => undefined,
  );
  const { code } = await child.exited;
  return { code, output: child.output };
}

describe('an install without data/common-passwords.txt', () => {
  const copy = mkdtempSync(join(tmpdir(), 'auth-no-data-'));
  for (const entry of ['src', 'scripts', 'drizzle', 'package.json', 'tsconfig.json'])
    cpSync(join(ROOT, entry), join(copy, entry), { recursive: true });
  symlinkSync(join(ROOT, 'node_modules'), join(copy, 'node_modules'));
  afterAll(() => rmSync(copy, { recursive: true, force: true }));

  const missing = join(copy, 'data/common-passwords.txt');

  it('does not start: one line naming the file, exit 1', async () => {
    const { code, output } = await runUntilExit(copy, 'src/server.ts', { listen: true });
    expect(output).not.toContain('auth service ready');
    expect(code, output).toBe(1);
    expect(output).toContain(`failed to start: cannot read the list of common passwords ${missing} (ENOENT)`);
  }, 60_000);

  it('with BOOTSTRAP_ADMIN_PASSWORD, a script says the file is missing, not that the password is not acceptable', async () => {
    const { code, output } = await runUntilExit(copy, 'scripts/migrate.ts', {
      env: {
        BOOTSTRAP_ADMIN_EMAIL: 'admin@example.test',
        BOOTSTRAP_ADMIN_PASSWORD: 'a long enough passphrase 7',
      },
    });
    expect(code, output).toBe(1);
    expect(output).toContain(`error: cannot read the list of common passwords ${missing} (ENOENT)`);
    expect(output).not.toContain('acceptable password');
  }, 60_000);
});
