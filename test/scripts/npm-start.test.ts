import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';

const ROOT = resolve(import.meta.dirname, '../..');

/** A port nobody listens on now. */
const freePort = () =>
  new Promise<number>((done, fail) => {
    const probe = createServer();
    probe.once('error', fail);
    probe.listen(0, '127.0.0.1', () => {
      const { port } = probe.address() as { port: number };
      probe.close(() => done(port));
    });
  });

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
    const port = await freePort();
    const npm = spawn('npm', ['start', '--silent'], {
      cwd: ROOT,
      stdio: ['ignore', 'pipe', 'pipe'],
      env: {
        ...process.env,
        NODE_ENV: 'development',
        PORT: String(port),
        HOST: '127.0.0.1',
        DATABASE_URL: '',
        DATA_DIR: dataDir,
        REDIS_URL: '',
        SMTP_URL: '',
        BOOTSTRAP_ADMIN_EMAIL: '',
        BOOTSTRAP_ADMIN_PASSWORD: '',
        LOG_LEVEL: 'info',
      },
    });
    let out = '';
    npm.stdout.on('data', (chunk: Buffer) => {
      out += chunk.toString();
    });
    npm.stderr.on('data', (chunk: Buffer) => {
      out += chunk.toString();
    });
    const exited = new Promise<number | null>((done) => npm.on('exit', (code) => done(code)));
    await expect
      .poll(() => out.includes('auth service ready'), { timeout: 60_000, interval: 200 })
      .toBe(true);
    const serverPid = Number(/"pid":(\d+)/.exec(out)?.[1]);
    expect(serverPid).toBeGreaterThan(0);

    // What a supervisor does: signal the process it started, npm.
    npm.kill('SIGTERM');
    await exited;
    try {
      await expect.poll(() => alive(serverPid), { timeout: 15_000, interval: 100 }).toBe(false);
    } finally {
      // Left running (the failure this test is for): not past the test.
      if (alive(serverPid)) process.kill(serverPid, 'SIGKILL');
    }
    expect(out).toContain('shutting down');
    // The port is free again: nothing orphaned holds it.
    const again = createServer();
    await new Promise<void>((done, fail) => {
      again.once('error', fail);
      again.listen(port, '127.0.0.1', () => done());
    });
    await new Promise((done) => again.close(done));
  }, 90_000);
});
