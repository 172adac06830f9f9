import { mkdtempSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { spawnServer } from '../support/spawn-server.js';

const alive = (pid: number) => {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
};

describe('npm start under a supervisor', () => {
  const dataDir = mkdtempSync(join(tmpdir(), 'auth-npm-start-'));
  afterAll(() => rmSync(dataDir, { recursive: true, force: true }));

  it('a SIGTERM sent to npm reaches the server: it shuts down and exits, leaving no process behind', async () => {
    const npm = await spawnServer({
      command: 'npm',
      args: ['start', '--silent'],
      listen: true,
      env: {
        NODE_ENV: 'development',
        DATABASE_URL: '',
        DATA_DIR: dataDir,
        REDIS_URL: '',
        SMTP_URL: '',
        BOOTSTRAP_ADMIN_EMAIL: '',
        BOOTSTRAP_ADMIN_PASSWORD: '',
        LOG_LEVEL: 'info',
      },
    });
    const { port } = npm;
    await npm.waitForLine(/auth service ready/, 60_000);
    const serverPid = Number(/"pid":(\d+)/.exec(npm.output)?.[1]);
    expect(serverPid).toBeGreaterThan(0);

    // What a supervisor does: signal the process it started, npm.
    npm.kill('SIGTERM');
    await npm.exited;
    try {
      await expect.poll(() => alive(serverPid), { timeout: 15_000, interval: 100 }).toBe(false);
    } finally {
      // Left running (the failure this test is for): not past the test.
      if (alive(serverPid)) process.kill(serverPid, 'SIGKILL');
    }
    expect(npm.output).toContain('shutting down');
    // The port is free again: nothing orphaned holds it.
    const again = createServer();
    await new Promise<void>((done, fail) => {
      again.once('error', fail);
      again.listen(port, '127.0.0.1', () => done());
    });
    await new Promise((done) => again.close(done));
  }, 90_000);
});
