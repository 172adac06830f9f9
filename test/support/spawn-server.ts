import { type ChildProcess, spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { request } from 'node:http';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join, relative, resolve } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { inject, onTestFinished } from 'vitest';

/*
 * One way for the tests to run the server, a script or a tool as a child process: a small
 * environment (not the test runner's), a free port, every line it writes, a wait for a line or for
 * /health/ready, its exit code and signal. Each runs as the leader of a process group of its own, and
 * whatever it started goes with it: the group is killed when the test that started it ends (started
 * in a hook: when the file ends, see test/support/setup.ts), pass or fail, and when the worker exits.
 */

export const ROOT = resolve(import.meta.dirname, '../..');

/** What to run, from `cwd`. */
export type Program =
  /**
   * A TypeScript file through tsx's loader, in one node process (so a signal reaches it). From the
   * project, a file of src/ or scripts/ runs as the run's compiled copy instead when there is one
   * (test/support/global-setup.ts): the same code, without the loader's second or two of CPU.
   */
  | { tsx: string }
  /** A JavaScript file (the build) run by node. */
  | { node: string }
  /** A command found on PATH, e.g. npm. */
  | { command: string };

export type SpawnOptions = Program & {
  args?: string[];
  /** The project unless said. */
  cwd?: string;
  /** Set on top of the base (PATH, HOME, NODE_ENV=test), or of the inherited environment. */
  env?: Record<string, string>;
  /** Start from this process's environment (all of it, or the names the filter keeps): only when asked. */
  inheritEnv?: boolean | ((name: string) => boolean);
  /** Listen on a port free now: HOST=127.0.0.1 and PORT set (before `env`). */
  listen?: boolean;
  /** With `listen`: PUBLIC_URL set to the address it listens on. */
  publicUrl?: boolean;
};

export interface Exit {
  code: number | null;
  signal: NodeJS.Signals | null;
}

export interface RunResult extends Exit {
  stdout: string;
  stderr: string;
  /** stdout and stderr as they came. */
  output: string;
}

export interface SpawnedProcess {
  child: ChildProcess;
  pid: number;
  /** With `listen`; otherwise 0 and ''. */
  port: number;
  baseUrl: string;
  /** Every line written so far, stdout and stderr as they came (empty lines left out). */
  lines: string[];
  readonly stdout: string;
  readonly stderr: string;
  readonly output: string;
  /** Once it has exited and its output is all read. */
  exited: Promise<Exit>;
  isRunning(): boolean;
  /**
   * performance.now() when a line matching `pattern` is written (at once if one was already);
   * rejects after `timeoutMs`, or when it exits without writing one.
   */
  waitForLine(pattern: RegExp, timeoutMs?: number): Promise<number>;
  /**
   * Polls GET /health/ready until it answers 200, it exits or `timeoutMs` passes: the last status
   * (0: no answer).
   */
  waitForReady(timeoutMs?: number): Promise<number>;
  /** Sends `signal` to the process itself (not its group), as a supervisor would. */
  kill(signal: NodeJS.Signals): void;
  /** Its exit; past `timeoutMs` its group is killed and this throws, with what it wrote. */
  exit(timeoutMs?: number): Promise<Exit>;
  /** SIGTERM, then SIGKILL to the group after `graceMs`; its exit. */
  stop(graceMs?: number): Promise<Exit>;
}

/**
 * A TCP port nothing listens on right now (a random one could be an ephemeral port a connection of
 * another test holds: CI met EADDRINUSE).
 */
export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.unref();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const address = server.address();
      const port = typeof address === 'object' && address ? address.port : 0;
      server.close(() => resolve(port));
    });
  });
}

/** Spawned and not yet reaped: each is a process group to kill. */
const groups = new Set<SpawnedProcess>();

function killGroup(pid: number, signal: NodeJS.Signals) {
  try {
    process.kill(-pid, signal);
  } catch {
    // Gone already (ESRCH).
  }
}

/** Kills what a test or a file started, its descendants too, and waits for it to exit. */
export async function stopSpawned(): Promise<void> {
  const all = [...groups];
  groups.clear();
  for (const spawned of all) killGroup(spawned.pid, 'SIGKILL');
  await Promise.all(all.map((spawned) => spawned.exited.catch(() => undefined)));
  uninstallSignalHandlers();
}

// The children are not in the worker's process group, so a Ctrl-C or the worker's own SIGTERM does
// not reach them: they are killed here first, then the signal is raised again.
const relayed: NodeJS.Signals[] = ['SIGINT', 'SIGTERM'];
let exitHookInstalled = false;
let signalHandlersInstalled = false;
function onSignal(signal: NodeJS.Signals) {
  for (const spawned of groups) killGroup(spawned.pid, 'SIGKILL');
  groups.clear();
  uninstallSignalHandlers();
  if (process.listenerCount(signal) === 0) process.kill(process.pid, signal);
}
function installSignalHandlers() {
  if (!exitHookInstalled) {
    exitHookInstalled = true;
    process.once('exit', () => {
      for (const spawned of groups) killGroup(spawned.pid, 'SIGKILL');
    });
  }
  if (signalHandlersInstalled) return;
  signalHandlersInstalled = true;
  for (const signal of relayed) process.on(signal, onSignal);
}
function uninstallSignalHandlers() {
  if (!signalHandlersInstalled || groups.size > 0) return;
  signalHandlersInstalled = false;
  for (const signal of relayed) process.off(signal, onSignal);
}

function environment(options: SpawnOptions, port: number): Record<string, string> {
  const { inheritEnv } = options;
  const inherited = inheritEnv
    ? Object.fromEntries(
        Object.entries(process.env).filter(
          (entry): entry is [string, string] =>
            entry[1] !== undefined && (inheritEnv === true || inheritEnv(entry[0])),
        ),
      )
    : { PATH: process.env.PATH ?? '', HOME: process.env.HOME ?? tmpdir() };
  return {
    ...inherited,
    NODE_ENV: 'test',
    ...(options.listen ? { HOST: '127.0.0.1', PORT: String(port) } : {}),
    ...(options.listen && options.publicUrl ? { PUBLIC_URL: `http://127.0.0.1:${port}` } : {}),
    ...options.env,
  };
}

/** The run's compiled copy of `file`, run from `cwd`: only from the project, and only when it exists. */
function compiledCopy(file: string, cwd: string): string | undefined {
  const dir = inject('compiledDir');
  if (!dir || resolve(cwd) !== ROOT) return undefined;
  const source = relative(ROOT, resolve(ROOT, file));
  if (!/^(src|scripts)\/.*\.ts$/.test(source)) return undefined;
  const compiled = join(dir, source.replace(/\.ts$/, '.js'));
  return existsSync(compiled) ? compiled : undefined;
}

function commandLine(options: SpawnOptions): [string, string[]] {
  const args = options.args ?? [];
  if ('tsx' in options) {
    const compiled = compiledCopy(options.tsx, options.cwd ?? ROOT);
    if (compiled) return [process.execPath, [compiled, ...args]];
    return [process.execPath, ['--import', 'tsx', options.tsx, ...args]];
  }
  if ('node' in options) return [process.execPath, [options.node, ...args]];
  return [options.command, args];
}

/** One GET /health/ready on a connection of its own: the status, 0 when nothing answered. */
function readiness(baseUrl: string): Promise<number> {
  return new Promise((done) => {
    const req = request(`${baseUrl}/health/ready`, { agent: false, timeout: 2000 }, (res) => {
      res.resume();
      res.on('end', () => done(res.statusCode ?? 0));
      res.on('error', () => done(0));
    });
    req.on('timeout', () => req.destroy());
    req.on('error', () => done(0));
    req.end();
  });
}

/** Starts `options`' program; resolves once it is spawned (with its port when it listens). */
export async function spawnServer(options: SpawnOptions): Promise<SpawnedProcess> {
  const port = options.listen ? await freePort() : 0;
  const baseUrl = options.listen ? `http://127.0.0.1:${port}` : '';
  const [file, argv] = commandLine(options);
  const child = spawn(file, argv, {
    cwd: options.cwd ?? ROOT,
    env: environment(options, port),
    // stdin is not a terminal: nothing waits for a prompt.
    stdio: ['ignore', 'pipe', 'pipe'],
    // A process group of its own, to be killed with whatever it starts.
    detached: true,
  });

  const lines: string[] = [];
  const text = { stdout: '', stderr: '', output: '' };
  const lineWaiters = new Set<(line: string | undefined) => void>();
  const flushers: Array<() => void> = [];
  for (const name of ['stdout', 'stderr'] as const) {
    const stream = child[name];
    let partial = '';
    const take = (line: string) => {
      if (!line) return;
      lines.push(line);
      for (const waiter of lineWaiters) waiter(line);
    };
    stream.setEncoding('utf8');
    stream.on('data', (chunk: string) => {
      text[name] += chunk;
      text.output += chunk;
      const parts = (partial + chunk).split('\n');
      partial = parts.pop() ?? '';
      for (const line of parts) take(line);
    });
    flushers.push(() => {
      take(partial);
      partial = '';
    });
  }

  let running = true;
  let started = false;
  const exited = new Promise<Exit>((done, fail) => {
    let exit: Exit | undefined;
    let finished = false;
    const finish = () => {
      if (!exit || finished) return;
      finished = true;
      for (const flush of flushers) flush();
      for (const waiter of lineWaiters) waiter(undefined);
      done(exit);
    };
    child.on('error', (err) => {
      // After the spawn: a signal that could not be sent; the exit still comes.
      if (started) return;
      running = false;
      fail(err);
    });
    child.once('exit', (code, signal) => {
      running = false;
      exit = { code, signal };
      // Its output is all read at 'close', unless a descendant still holds the pipes.
      setTimeout(finish, 500).unref();
    });
    child.once('close', (code, signal) => {
      exit ??= { code, signal };
      finish();
    });
  });
  // A spawn that failed is reported by whoever awaits the exit.
  exited.catch(() => undefined);
  await new Promise<void>((done) => {
    child.once('spawn', () => {
      started = true;
      done();
    });
    child.once('error', () => done());
  });

  const described = () => `${[file, ...argv].join(' ')}\n${text.output}`;
  const spawned: SpawnedProcess = {
    child,
    pid: child.pid ?? 0,
    port,
    baseUrl,
    lines,
    get stdout() {
      return text.stdout;
    },
    get stderr() {
      return text.stderr;
    },
    get output() {
      return text.output;
    },
    exited,
    isRunning: () => running,
    waitForLine(pattern, timeoutMs = 10_000) {
      if (lines.some((line) => pattern.test(line))) return Promise.resolve(performance.now());
      return new Promise((resolve, reject) => {
        const timer = setTimeout(() => {
          lineWaiters.delete(waiter);
          reject(new Error(`no line matching ${pattern} within ${timeoutMs} ms from ${described()}`));
        }, timeoutMs);
        const waiter = (line: string | undefined) => {
          if (line !== undefined && !pattern.test(line)) return;
          clearTimeout(timer);
          lineWaiters.delete(waiter);
          if (line === undefined)
            reject(new Error(`exited with no line matching ${pattern}: ${described()}`));
          else resolve(performance.now());
        };
        lineWaiters.add(waiter);
      });
    },
    async waitForReady(timeoutMs = 30_000) {
      const deadline = Date.now() + timeoutMs;
      let status = 0;
      while (running && Date.now() < deadline) {
        status = await readiness(baseUrl);
        if (status === 200) break;
        await sleep(100);
      }
      return status;
    },
    kill(signal) {
      child.kill(signal);
    },
    async exit(timeoutMs = 60_000) {
      let timer: NodeJS.Timeout | undefined;
      const timedOut = new Promise<'timeout'>((done) => {
        timer = setTimeout(() => done('timeout'), timeoutMs);
      });
      const outcome = await Promise.race([exited, timedOut]).finally(() => clearTimeout(timer));
      if (outcome !== 'timeout') return outcome;
      killGroup(spawned.pid, 'SIGKILL');
      await exited.catch(() => undefined);
      throw new Error(`did not exit within ${timeoutMs} ms (killed): ${described()}`);
    },
    async stop(graceMs = 15_000) {
      if (running) child.kill('SIGTERM');
      const timer = setTimeout(() => killGroup(spawned.pid, 'SIGKILL'), graceMs);
      try {
        return await exited;
      } finally {
        clearTimeout(timer);
        // Done with it: nothing it started outlives it.
        reap();
      }
    },
  };

  function reap() {
    if (!groups.delete(spawned)) return;
    killGroup(spawned.pid, 'SIGKILL');
    uninstallSignalHandlers();
  }

  if (spawned.pid) {
    groups.add(spawned);
    installSignalHandlers();
    try {
      // Started by a test: gone when it ends, pass or fail.
      onTestFinished(async () => {
        reap();
        await exited.catch(() => undefined);
      });
    } catch {
      // Started by a hook: stopSpawned() after the file (test/support/setup.ts), or the file's own stop.
    }
  }
  return spawned;
}

/** Spawns `options`' program and waits for its exit (killed past `timeoutMs`, which then throws). */
export async function runUntilExit(
  options: SpawnOptions & {
    timeoutMs?: number;
    /** A non-zero exit throws, with `code` (the exit code), `stdout` and `stderr`, as execFile's error. */
    mustSucceed?: boolean;
  },
): Promise<RunResult> {
  const spawned = await spawnServer(options);
  const exit = await spawned.exit(options.timeoutMs);
  const result = { ...exit, stdout: spawned.stdout, stderr: spawned.stderr, output: spawned.output };
  if (options.mustSucceed && exit.code !== 0) {
    const program = 'tsx' in options ? options.tsx : 'node' in options ? options.node : options.command;
    throw Object.assign(
      new Error(
        `${program} ${(options.args ?? []).join(' ')} exited ${exit.code ?? exit.signal}\n${spawned.output}`,
      ),
      result,
    );
  }
  return result;
}
