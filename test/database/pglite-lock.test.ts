import { mkdirSync, mkdtempSync, rmSync, utimesSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pino from 'pino';
import { afterAll, describe, expect, it } from 'vitest';
import { type DatabaseHandle, DatabaseLockedError, openDatabase } from '../../src/db/client.js';

/**
 * Two PGlite instances on one directory each run their own server on the same files, and the last to
 * close overwrites the other's writes (seen: a second process inserting a row did not see the first's).
 * The directory is locked while open.
 */
describe('the embedded database directory is locked while open', () => {
  const dataDir = mkdtempSync(join(tmpdir(), 'paservices-pglite-lock-'));
  const open = (lockWaitMs = 0) =>
    openDatabase({ url: undefined, dataDir, logger: pino({ level: 'silent' }), migrate: false, lockWaitMs });
  const handles: DatabaseHandle[] = [];
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

  it('takes over a lock left by a crashed process once it is stale', async () => {
    // What a killed process leaves: the lock, no longer refreshed.
    const lockPath = join(dataDir, 'pglite.lock');
    mkdirSync(lockPath, { recursive: true });
    const old = new Date(Date.now() - 60_000);
    utimesSync(lockPath, old, old);
    const handle = await open();
    handles.push(handle);
    expect(await handle.ping(1000)).toBe(true);
    await handle.close();
  }, 60_000);
});
