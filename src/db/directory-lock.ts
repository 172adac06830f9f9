import { randomBytes } from 'node:crypto';
import { readFileSync, readlinkSync, rmSync } from 'node:fs';
import { mkdir, readFile, rename, rm, stat, utimes, writeFile } from 'node:fs/promises';
import { hostname, uptime } from 'node:os';
import { join } from 'node:path';

/*
 * A lock on a directory, held by a process, as PostgreSQL's postmaster.pid is: the lock (a directory,
 * made atomically with mkdir) names its holder (pid, host, boot, the process's start time), and a lock
 * is stale when that process is gone. Whether the holder lives is asked of the kernel, never of the
 * holder: a holder whose event loop is blocked (PGlite's initdb and start are synchronous WASM work,
 * over 10 s on a loaded machine) still holds its lock. Only a lock whose holder cannot be asked about
 * (another host or container, or a lock naming nobody: one still being made, or an older release's)
 * is judged by its mtime, which the holder refreshes every few seconds.
 */

/** Who holds a lock: what the lock's `owner` file says. */
interface Owner {
  pid: number;
  hostname: string;
  /** Linux: /proc/sys/kernel/random/boot_id, new at each boot. */
  bootId?: string;
  /** Elsewhere: when the machine booted (ms since the epoch, to the second). */
  bootTime?: number;
  /** Linux: the PID namespace (/proc/self/ns/pid): pids of another namespace cannot be asked about. */
  pidNamespace?: string;
  /** Linux: the process's start time in clock ticks since boot (/proc/<pid>/stat), against pid reuse. */
  startTime?: string;
  /** This lock's own: tells it from a lock made since at the same path (inodes are reused). */
  token?: string;
}

export interface DirectoryLockOptions {
  /** A lock whose holder cannot be asked about is stale once its mtime is this old (default 10 s). */
  staleMs?: number;
  /** How often the holder refreshes its lock's mtime and checks the lock is still its own (2 s). */
  updateMs?: number;
  /** Called when the lock is found gone or replaced: another process may have taken it. */
  onCompromised: (err: Error) => void;
}

export type DirectoryLockAttempt =
  | { acquired: true; release: () => Promise<void> }
  | { acquired: false; holder: string };

/** The locks this process holds (lock path → its token). */
const held = new Map<string, string>();
let exitHookInstalled = false;

function readProcStartTime(pid: number | 'self'): string | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    // Field 22; the command name (field 2, in parentheses) may hold spaces and parentheses itself.
    return stat.slice(stat.lastIndexOf(')') + 2).split(' ')[19];
  } catch {
    return undefined;
  }
}

function optional<T>(read: () => T): T | undefined {
  try {
    return read();
  } catch {
    return undefined;
  }
}

let self: Owner | undefined;
function selfOwner(): Owner {
  if (!self) {
    const bootId = optional(() => readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim());
    self = {
      pid: process.pid,
      hostname: hostname(),
      ...(bootId ? { bootId } : { bootTime: Math.round((Date.now() - uptime() * 1000) / 1000) * 1000 }),
    };
    const pidNamespace = optional(() => readlinkSync('/proc/self/ns/pid'));
    if (pidNamespace) self.pidNamespace = pidNamespace;
    const startTime = readProcStartTime('self');
    if (startTime) self.startTime = startTime;
  }
  return self;
}

function parseOwner(text: string): Owner | undefined {
  try {
    const o = JSON.parse(text) as Partial<Owner>;
    if (!Number.isSafeInteger(o.pid) || (o.pid as number) <= 0 || typeof o.hostname !== 'string') {
      return undefined;
    }
    return o as Owner;
  } catch {
    return undefined;
  }
}

/** Whether `owner`'s pid means a process this one can ask the kernel about. */
function sameMachine(owner: Owner, me: Owner): boolean {
  if (owner.hostname !== me.hostname || owner.pidNamespace !== me.pidNamespace) return false;
  if (me.bootId !== undefined || owner.bootId !== undefined) return owner.bootId === me.bootId;
  // No boot id (not Linux): the boot time, known to about a second.
  return (
    owner.bootTime !== undefined &&
    me.bootTime !== undefined &&
    Math.abs(owner.bootTime - me.bootTime) < 60_000
  );
}

function isAlive(owner: Owner): boolean {
  try {
    process.kill(owner.pid, 0);
  } catch (err) {
    // EPERM: it exists, as another user's.
    if ((err as NodeJS.ErrnoException).code === 'ESRCH') return false;
  }
  if (owner.startTime === undefined) return true;
  // The same pid since started again (a container's restart makes the same pids): another process.
  const startTime = readProcStartTime(owner.pid);
  return startTime === undefined ? existsProc(owner.pid) : startTime === owner.startTime;
}

/** When /proc/<pid>/stat cannot be read: gone (ENOENT), or not ours to read (alive). */
function existsProc(pid: number): boolean {
  try {
    readFileSync(`/proc/${pid}/stat`);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code !== 'ENOENT';
  }
}

function holderOf(owner: Owner | undefined): string {
  return owner ? `process ${owner.pid} on ${owner.hostname}` : 'a process that did not say which';
}

/** What a stale lock was when judged so: what is removed must still be that. */
interface Judged {
  ino: number;
  mtimeMs: number;
  token: string | undefined;
}

type Verdict = { state: 'gone' } | { state: 'held'; holder: string } | ({ state: 'stale' } & Judged);

async function readOwner(lockPath: string): Promise<Owner | undefined> {
  return parseOwner(await readFile(join(lockPath, 'owner'), 'utf8').catch(() => ''));
}

async function judge(lockPath: string, staleMs: number): Promise<Verdict> {
  let ino: number;
  let mtimeMs: number;
  try {
    ({ ino, mtimeMs } = await stat(lockPath));
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return { state: 'gone' };
    throw err;
  }
  const owner = await readOwner(lockPath);
  const stale = { state: 'stale', ino, mtimeMs, token: owner?.token } as const;
  const me = selfOwner();
  if (owner && sameMachine(owner, me)) {
    const isMe = owner.pid === me.pid && owner.startTime === me.startTime;
    const alive = isMe ? owner.token !== undefined && held.get(lockPath) === owner.token : isAlive(owner);
    return alive ? { state: 'held', holder: holderOf(owner) } : stale;
  }
  // Another host or container, or no owner yet (being made) or ever (an older release's lock).
  return mtimeMs < Date.now() - staleMs ? stale : { state: 'held', holder: holderOf(owner) };
}

/**
 * Takes a stale lock away: renamed aside first, so that of two processes taking over the same lock
 * only one removes it, and then checked, so that a lock made meanwhile by a third is put back.
 */
async function removeStale(lockPath: string, judged: Judged): Promise<void> {
  const aside = `${lockPath}.stale-${process.pid}-${randomBytes(4).toString('hex')}`;
  try {
    await rename(lockPath, aside);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return;
    throw err;
  }
  const { ino, mtimeMs } = await stat(aside);
  if (ino !== judged.ino || mtimeMs !== judged.mtimeMs || (await readOwner(aside))?.token !== judged.token) {
    await rename(aside, lockPath).catch(() => undefined);
    return;
  }
  await rm(aside, { recursive: true, force: true });
}

/**
 * Tries once to take the lock `lockPath` (a directory) for this process, taking over a stale one
 * at once. Resolves to the release, or to who holds it.
 */
export async function acquireDirectoryLock(
  lockPath: string,
  options: DirectoryLockOptions,
): Promise<DirectoryLockAttempt> {
  const staleMs = options.staleMs ?? 10_000;
  for (let attempt = 0; attempt < 5; attempt++) {
    try {
      await mkdir(lockPath);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
      const verdict = await judge(lockPath, staleMs);
      if (verdict.state === 'held') return { acquired: false, holder: verdict.holder };
      if (verdict.state === 'stale') await removeStale(lockPath, verdict);
      continue;
    }
    return { acquired: true, release: await own(lockPath, options) };
  }
  return { acquired: false, holder: 'processes taking it in turn' };
}

async function own(lockPath: string, options: DirectoryLockOptions): Promise<() => Promise<void>> {
  const token = randomBytes(16).toString('hex');
  held.set(lockPath, token);
  try {
    // Written aside and renamed: whoever reads the owner reads all of it.
    const partial = join(lockPath, `owner.${token}.tmp`);
    await writeFile(partial, JSON.stringify({ ...selfOwner(), token }));
    await rename(partial, join(lockPath, 'owner'));
  } catch (err) {
    held.delete(lockPath);
    await rm(lockPath, { recursive: true, force: true }).catch(() => undefined);
    throw err;
  }
  if (!exitHookInstalled) {
    exitHookInstalled = true;
    process.on('exit', () => {
      for (const [path, token] of held) {
        const owner = optional(() => parseOwner(readFileSync(join(path, 'owner'), 'utf8')));
        if (owner?.token === token) rmSync(path, { recursive: true, force: true });
      }
    });
  }

  let released = false;
  let timer: NodeJS.Timeout | undefined;
  const compromised = (message: string) => {
    released = true;
    if (held.get(lockPath) === token) held.delete(lockPath);
    options.onCompromised(new Error(message));
  };
  const refresh = async () => {
    try {
      const text = await readFile(join(lockPath, 'owner'), 'utf8').catch((err: NodeJS.ErrnoException) => {
        if (err.code === 'ENOENT') return '';
        throw err;
      });
      if (released) return;
      if (parseOwner(text)?.token !== token) {
        const gone = await stat(lockPath).then(
          () => false,
          () => true,
        );
        if (released) return;
        return compromised(`the lock ${lockPath} was ${gone ? 'removed' : 'replaced'}`);
      }
      const date = new Date();
      await utimes(lockPath, date, date);
    } catch {
      // A full disk, a slow network filesystem: try again at the next turn.
    }
    if (!released) schedule();
  };
  const schedule = () => {
    timer = setTimeout(refresh, options.updateMs ?? 2_000);
    timer.unref();
  };
  schedule();

  return async () => {
    if (released) return;
    released = true;
    clearTimeout(timer);
    held.delete(lockPath);
    // Only our own lock: one that replaced it (after it was taken as stale) is another's.
    if ((await readOwner(lockPath))?.token === token) await rm(lockPath, { recursive: true, force: true });
  };
}
