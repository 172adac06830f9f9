import { mkdirSync, mkdtempSync, rmSync, utimesSync } from 'node:fs';
import { hostname, tmpdir } from 'node:os';
import { join } from 'node:path';
import pino from 'pino';
import { afterAll, describe, expect, it } from 'vitest';
import { type DatabaseHandle, DatabaseLockedError, openDatabase } from '../../src/db/client.js';
import { spawnServer } from '../support/spawn-server.js';

/**
 * Two PGlite instances on one directory each run their own server on the same files, and the last to
 * close overwrites the other's writes (seen: a second process inserting a row did not see the first's).
 * The directory is locked while open, by a lock naming the process (test/database/directory-lock.test.ts).
 */
describe('the embedded database directory is locked while open', () => {
  const dataDir = mkdtempSync(join(tmpdir(), 'paservices-pglite-lock-'));
  const open = (lockWaitMs = 0) =>
    openDatabase({ url: undefined, dataDir, logger: pino({ level: 'silent' }), migrate: false, lockWaitMs });
  const handles: DatabaseHandle[] = [];
  const lockPath = join(dataDir, 'pglite.lock');
  const aged = (ms: number) => {
    const then = new Date(Date.now() - ms);
    utimesSync(lockPath, then, then);
  };
  afterAll(async () => {
    for (const h of handles) await h.close().catch(() => undefined);
    rmSync(dataDir, { recursive: true, force: true });
  });

  it('refuses a second opening with a message naming the directory, until the first closes', async () => {
    const first = await open();
    handles.push(first);
    await expect(open(600)).rejects.toThrow(DatabaseLockedError);
    await expect(open()).rejects.toThrow(/Another process is using the embedded database in .*pglite/);
    await first.close();
    const second = await open();
    handles.push(second);
    expect(await second.ping(1000)).toBe(true);
    await second.close();
  }, 60_000);

  it('still refuses a second opening when the first has not refreshed its lock for long (a blocked event loop)', async () => {
    // PGlite's start blocks the event loop, over 10 s on a loaded machine: the lock's refresh waits,
    // its mtime ages. The lock was then taken as stale, and two servers ran on the same files.
    const first = await open();
    handles.push(first);
    aged(60_000);
    await expect(open()).rejects.toThrow(
      `the lock ${lockPath} is held by process ${process.pid} on ${hostname()}`,
    );
    expect(await first.ping(1000)).toBe(true);
    await first.close();
  }, 60_000);

  it('takes over at once a lock whose holder was killed', async () => {
    const holder = await spawnServer({ tsx: 'test/support/lock-holder.ts', args: [lockPath, 'hold'] });
    await holder.waitForLine(/^locked \d+$/, 20_000);
    holder.kill('SIGKILL');
    await holder.exited;
    const handle = await open();
    handles.push(handle);
    expect(await handle.ping(1000)).toBe(true);
    await handle.close();
  }, 60_000);

  it("takes over a lock naming nobody (an earlier release's, left by a crash) once it is stale", async () => {
    // What a killed process of an earlier release left: the lock, naming nobody, no longer refreshed.
    mkdirSync(lockPath, { recursive: true });
    aged(60_000);
    const handle = await open();
    handles.push(handle);
    expect(await handle.ping(1000)).toBe(true);
    await handle.close();
  }, 60_000);
});
