import { execFileSync, spawn, spawnSync } from 'node:child_process';
import {
  chownSync,
  closeSync,
  existsSync,
  mkdtempSync,
  openSync,
  readdirSync,
  readFileSync,
  rmSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import pg from 'pg';
import { freePort } from '../../support/spawn-server.js';

/**
 * A throwaway PostgreSQL cluster for the fault suite: initdb and pg_ctl from the machine's PostgreSQL
 * binaries, a data directory in a fresh temporary directory, a free port on 127.0.0.1, trust
 * authentication. The suite restarts, stops and abuses it; the machine's shared cluster on 5432 is
 * never touched.
 */

interface Binaries {
  initdb: string;
  pgCtl: string;
  /** Run a command as this OS user: initdb refuses to run as root. */
  runAs: string | undefined;
}

/** Where the binaries are, or why the fault suite cannot run here. */
export function findPostgres(): { binaries: Binaries } | { reason: string } {
  const candidates: string[] = [];
  const debianRoot = '/usr/lib/postgresql';
  if (existsSync(debianRoot)) {
    const versions = readdirSync(debianRoot).sort((x, y) => Number(y) - Number(x));
    candidates.push(...versions.map((v) => join(debianRoot, v, 'bin')));
  }
  for (const dir of (process.env.PATH ?? '').split(':')) if (dir) candidates.push(dir);
  const bin = candidates.find((dir) => existsSync(join(dir, 'initdb')) && existsSync(join(dir, 'pg_ctl')));
  if (!bin) return { reason: 'no initdb and pg_ctl under /usr/lib/postgresql/*/bin or on PATH' };
  let runAs: string | undefined;
  if (process.getuid?.() === 0) {
    if (!existsSync('/usr/sbin/runuser') && !existsSync('/sbin/runuser'))
      return { reason: 'running as root and runuser is missing (initdb refuses root)' };
    try {
      execFileSync('id', ['-u', 'postgres'], { stdio: 'ignore' });
    } catch {
      return { reason: 'running as root and there is no `postgres` OS user to run initdb as' };
    }
    runAs = 'postgres';
  }
  return { binaries: { initdb: join(bin, 'initdb'), pgCtl: join(bin, 'pg_ctl'), runAs } };
}

const running = new Set<PostgresCluster>();
let exitHookInstalled = false;

export class PostgresCluster {
  private constructor(
    private readonly binaries: Binaries,
    readonly dir: string,
    readonly port: number,
  ) {}

  get dataDir() {
    return join(this.dir, 'data');
  }

  get logFile() {
    return join(this.dir, 'postgres.log');
  }

  url(database = 'postgres') {
    return `postgres://postgres@127.0.0.1:${this.port}/${database}`;
  }

  static async create(): Promise<PostgresCluster> {
    const found = findPostgres();
    if ('reason' in found) throw new Error(found.reason);
    const dir = mkdtempSync(join(tmpdir(), 'paservices-faults-'));
    if (found.binaries.runAs) {
      const uid = Number(execFileSync('id', ['-u', found.binaries.runAs], { encoding: 'utf8' }).trim());
      const gid = Number(execFileSync('id', ['-g', found.binaries.runAs], { encoding: 'utf8' }).trim());
      chownSync(dir, uid, gid);
    }
    const cluster = new PostgresCluster(found.binaries, dir, await freePort());
    try {
      await cluster.exec(found.binaries.initdb, [
        '-D',
        cluster.dataDir,
        '-U',
        'postgres',
        '-A',
        'trust',
        '-E',
        'UTF8',
        '--no-locale',
        '--no-sync',
      ]);
    } catch (err) {
      rmSync(dir, { recursive: true, force: true });
      throw err;
    }
    if (!exitHookInstalled) {
      exitHookInstalled = true;
      // A crashed or interrupted run must not leave a postmaster or its files behind.
      process.once('exit', () => {
        for (const c of running) {
          c.killNow();
          rmSync(c.dir, { recursive: true, force: true });
        }
      });
    }
    try {
      await cluster.start();
    } catch (err) {
      await cluster.destroy();
      throw err;
    }
    return cluster;
  }

  /**
   * Runs a PostgreSQL tool, its output appended to a file: the postmaster pg_ctl starts inherits
   * these descriptors, and waiting for a pipe it holds open would wait for the server to stop.
   */
  private exec(command: string, args: string[], timeoutMs = 60_000): Promise<void> {
    const [file, argv] = this.binaries.runAs
      ? ['runuser', ['-u', this.binaries.runAs, '--', command, ...args]]
      : [command, args];
    const out = openSync(join(this.dir, 'tools.log'), 'a');
    return new Promise<void>((resolve, reject) => {
      const child = spawn(file, argv, { cwd: this.dir, stdio: ['ignore', out, out] });
      const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
      child.once('error', reject);
      child.once('exit', (code, signal) => {
        clearTimeout(timer);
        closeSync(out);
        if (code === 0) resolve();
        else reject(new Error(`${command} ${args[0]} failed (${code ?? signal}); see ${this.dir}/tools.log`));
      });
    });
  }

  async start(): Promise<void> {
    // The socket goes in our own directory, so nothing is left in /tmp or next to the shared cluster's.
    const options = `-k ${this.dir} -c listen_addresses=127.0.0.1 -p ${this.port}`;
    await this.exec(this.binaries.pgCtl, [
      'start',
      '-D',
      this.dataDir,
      '-l',
      this.logFile,
      '-w',
      '-t',
      '30',
      '-o',
      options,
    ]);
    running.add(this);
  }

  async stop(mode: 'smart' | 'fast' | 'immediate' = 'fast'): Promise<void> {
    await this.exec(this.binaries.pgCtl, ['stop', '-D', this.dataDir, '-m', mode, '-w', '-t', '30']);
    running.delete(this);
  }

  /** pg_ctl restart: stops (fast: open transactions are rolled back) and starts with the same options. */
  async restart(): Promise<void> {
    await this.exec(this.binaries.pgCtl, [
      'restart',
      '-D',
      this.dataDir,
      '-l',
      this.logFile,
      '-m',
      'fast',
      '-w',
      '-t',
      '30',
    ]);
  }

  /**
   * Tries a new connection every 20 ms until one is accepted: performance.now() at that moment, and at
   * the start of the last refused try (before it, the database surely took no one). After
   * a crash the postmaster listens before it accepts anyone: while it replays the WAL, a connection
   * is refused with "the database system is starting up" (57P03), so this comes later than pg_ctl
   * start's beginning, and may come before pg_ctl (which looks every 100 ms) returns.
   */
  async acceptsConnections(
    database = 'postgres',
    timeoutMs = 60_000,
  ): Promise<{ acceptedAt: number; lastRefusedAt: number | undefined }> {
    const deadline = performance.now() + timeoutMs;
    let lastRefusedAt: number | undefined;
    for (;;) {
      const triedAt = performance.now();
      const client = new pg.Client({
        connectionString: this.url(database),
        application_name: 'faults-harness',
        connectionTimeoutMillis: 1000,
      });
      client.on('error', () => undefined);
      try {
        await client.connect();
        return { acceptedAt: performance.now(), lastRefusedAt };
      } catch (err) {
        lastRefusedAt = triedAt;
        if (performance.now() > deadline)
          throw new Error(`no connection accepted within ${timeoutMs} ms: ${(err as Error).message}`);
      } finally {
        await client.end().catch(() => undefined);
      }
      await sleep(20);
    }
  }

  /** Runs one statement on a fresh connection (never one of the service's). */
  async query<T extends pg.QueryResultRow>(text: string, params: unknown[] = [], database = 'postgres') {
    const client = new pg.Client({
      connectionString: this.url(database),
      application_name: 'faults-harness',
      connectionTimeoutMillis: 5000,
    });
    await client.connect();
    try {
      return await client.query<T>(text, params);
    } finally {
      await client.end().catch(() => undefined);
    }
  }

  /** A dedicated connection, e.g. to hold a lock in an open transaction. */
  async connect(database = 'postgres'): Promise<pg.Client> {
    const client = new pg.Client({
      connectionString: this.url(database),
      application_name: 'faults-harness',
    });
    client.on('error', () => undefined);
    await client.connect();
    return client;
  }

  log(): string {
    try {
      return readFileSync(this.logFile, 'utf8');
    } catch {
      return '';
    }
  }

  /** The postmaster and the processes it started (backends, checkpointer, …), the postmaster first. */
  private processes(): number[] {
    const postmaster = Number(readFileSync(join(this.dataDir, 'postmaster.pid'), 'utf8').split('\n')[0]);
    const children: number[] = [];
    for (const entry of readdirSync('/proc')) {
      if (!/^\d+$/.test(entry)) continue;
      try {
        // pid (comm) state ppid …: comm may hold spaces and parentheses, so read after the last ')'.
        const stat = readFileSync(`/proc/${entry}/stat`, 'utf8');
        const ppid = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
        if (ppid === postmaster) children.push(Number(entry));
      } catch {
        // Gone meanwhile.
      }
    }
    return [postmaster, ...children];
  }

  private signalAll(signal: NodeJS.Signals) {
    for (const pid of this.processes()) {
      try {
        process.kill(pid, signal);
      } catch {
        // Exited meanwhile.
      }
    }
  }

  /**
   * A database that hangs: SIGSTOP to the postmaster (so it starts no backend: a new connection is
   * accepted by the kernel and never answered), then to every process it started (each open connection
   * stops answering). Linux only (/proc).
   */
  hang() {
    this.hung = true;
    this.signalAll('SIGSTOP');
  }

  /** SIGCONT to the same processes: everything goes on where it stopped. */
  resume() {
    this.signalAll('SIGCONT');
    this.hung = false;
  }

  private hung = false;

  private killNow() {
    // A stopped postmaster would not act on pg_ctl's signal.
    if (this.hung) this.resume();
    const args = ['stop', '-D', this.dataDir, '-m', 'immediate', '-w'];
    const [file, argv] = this.binaries.runAs
      ? ['runuser', ['-u', this.binaries.runAs, '--', this.binaries.pgCtl, ...args]]
      : [this.binaries.pgCtl, args];
    spawnSync(file, argv, { stdio: 'ignore', timeout: 10_000 });
    running.delete(this);
  }

  /** Stops the cluster (immediately: nothing in it is kept) and deletes its directory. */
  async destroy(): Promise<void> {
    if (running.has(this) || existsSync(join(this.dataDir, 'postmaster.pid'))) this.killNow();
    rmSync(this.dir, { recursive: true, force: true });
  }
}
