import {
  existsSync,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  rmSync,
  statSync,
  utimesSync,
  writeFileSync,
} from 'node:fs';
import { hostname, tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterAll, describe, expect, it } from 'vitest';
import { acquireDirectoryLock } from '../../src/db/directory-lock.js';
import { spawnServer } from '../support/spawn-server.js';

/*
 * The embedded database's lock (src/db/client.ts's lockDataDirectory) names the process holding it.
 * PGlite's start blocks the holder's event loop for seconds (over 10 on a loaded machine): a lock
 * judged stale by its age alone was taken over from a live holder, two servers on the same files.
 */
describe('the directory lock is held while its holder lives', () => {
  const root = mkdtempSync(join(tmpdir(), 'paservices-directory-lock-'));
  let n = 0;
  const fresh = () => join(root, `lock-${++n}`);
  const quiet = { onCompromised: () => undefined };
  afterAll(() => rmSync(root, { recursive: true, force: true }));

  const age = (lockPath: string, ms: number) => {
    const then = new Date(Date.now() - ms);
    utimesSync(lockPath, then, then);
  };
  /** Another process taking `lockPath`, then doing `then` (test/support/lock-holder.ts). */
  const holder = async (lockPath: string, then: 'block' | 'hold' | 'exit') => {
    const child = await spawnServer({ tsx: 'test/support/lock-holder.ts', args: [lockPath, then] });
    await child.waitForLine(/^locked \d+$/, 20_000);
    return child;
  };

  it('a holder whose event loop is blocked long past the stale age keeps its lock, until it dies', async () => {
    const lockPath = fresh();
    const child = await holder(lockPath, 'block');
    // Its refresh cannot run: the lock's mtime gets as old as it likes.
    age(lockPath, 60_000);
    const refused = await acquireDirectoryLock(lockPath, quiet);
    expect(refused).toEqual({ acquired: false, holder: `process ${child.pid} on ${hostname()}` });
    child.kill('SIGKILL');
    await child.exited;
    const taken = await acquireDirectoryLock(lockPath, quiet);
    expect(taken.acquired).toBe(true);
    if (taken.acquired) await taken.release();
  }, 60_000);

  it('a lock whose holder died is taken over at once, however fresh', async () => {
    const lockPath = fresh();
    const child = await holder(lockPath, 'hold');
    expect((await acquireDirectoryLock(lockPath, quiet)).acquired).toBe(false);
    child.kill('SIGKILL');
    await child.exited;
    age(lockPath, 0);
    const started = Date.now();
    const taken = await acquireDirectoryLock(lockPath, quiet);
    expect(taken.acquired).toBe(true);
    expect(Date.now() - started).toBeLessThan(1000);
    if (taken.acquired) await taken.release();
    expect(existsSync(lockPath)).toBe(false);
  }, 60_000);

  it('a process exiting normally takes its lock away', async () => {
    const lockPath = fresh();
    const child = await holder(lockPath, 'exit');
    expect(await child.exited).toEqual({ code: 0, signal: null });
    expect(existsSync(lockPath)).toBe(false);
  }, 60_000);

  it('within one process, the lock is held until released', async () => {
    const lockPath = fresh();
    const first = await acquireDirectoryLock(lockPath, quiet);
    expect(first.acquired).toBe(true);
    age(lockPath, 60_000);
    expect(await acquireDirectoryLock(lockPath, quiet)).toEqual({
      acquired: false,
      holder: `process ${process.pid} on ${hostname()}`,
    });
    if (first.acquired) await first.release();
    const second = await acquireDirectoryLock(lockPath, quiet);
    expect(second.acquired).toBe(true);
    if (second.acquired) await second.release();
  });

  it.skipIf(!existsSync('/proc/self/stat'))(
    'a lock naming a live pid that another process had (the pid reused) is stale',
    async () => {
      // This process's own pid and machine, another start: what a container's restart leaves.
      const lockPath = fresh();
      const mine = await acquireDirectoryLock(lockPath, quiet);
      if (!mine.acquired) throw new Error('not acquired');
      const owner = JSON.parse(readFileSync(join(lockPath, 'owner'), 'utf8'));
      await mine.release();
      mkdirSync(lockPath);
      writeFileSync(join(lockPath, 'owner'), JSON.stringify({ ...owner, startTime: '1', token: 'earlier' }));
      const taken = await acquireDirectoryLock(lockPath, quiet);
      expect(taken.acquired).toBe(true);
      if (taken.acquired) await taken.release();
    },
  );

  it('a lock from another host, or naming nobody, is judged by its age', async () => {
    for (const owner of [{ pid: 1, hostname: 'elsewhere', token: 't' }, undefined]) {
      const lockPath = fresh();
      mkdirSync(lockPath);
      if (owner) writeFileSync(join(lockPath, 'owner'), JSON.stringify(owner));
      expect(await acquireDirectoryLock(lockPath, quiet)).toEqual({
        acquired: false,
        holder: owner ? 'process 1 on elsewhere' : 'a process that did not say which',
      });
      age(lockPath, 9_000);
      expect((await acquireDirectoryLock(lockPath, quiet)).acquired).toBe(false);
      age(lockPath, 11_000);
      const taken = await acquireDirectoryLock(lockPath, quiet);
      expect(taken.acquired).toBe(true);
      if (taken.acquired) await taken.release();
    }
  });

  it('the holder refreshes its lock, and says so when it finds it replaced; release leaves the other lock', async () => {
    const lockPath = fresh();
    const lost: string[] = [];
    const mine = await acquireDirectoryLock(lockPath, {
      updateMs: 50,
      onCompromised: (err) => lost.push(err.message),
    });
    if (!mine.acquired) throw new Error('not acquired');
    age(lockPath, 60_000);
    await expect.poll(() => Date.now() - statSync(lockPath).mtimeMs, { timeout: 5000 }).toBeLessThan(5000);
    expect(lost).toEqual([]);
    // Taken over from under it (what a wrong judgement elsewhere would do).
    rmSync(lockPath, { recursive: true });
    mkdirSync(lockPath);
    writeFileSync(
      join(lockPath, 'owner'),
      JSON.stringify({ pid: 1, hostname: 'elsewhere', token: 'theirs' }),
    );
    await expect.poll(() => lost, { timeout: 5000 }).toEqual([`the lock ${lockPath} was replaced`]);
    await mine.release();
    expect(JSON.parse(readFileSync(join(lockPath, 'owner'), 'utf8')).token).toBe('theirs');
    await sleep(200);
    expect(lost).toHaveLength(1);
  });
});
