import { type ChildProcess, spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { freePort } from './cluster.js';
import { send } from './http.js';

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '../../..');

/** The settings every fault scenario runs the service with (the timeouts the assertions rely on). */
export const FAULT_ENV = {
  RATE_LIMIT_ENABLED: 'false',
  DB_STATEMENT_TIMEOUT_MS: '2000',
  DB_CONNECT_TIMEOUT_MS: '1000',
  LOG_LEVEL: 'warn',
} as const;

/** A request that failed because the database was unavailable must answer within this. */
export const FAIL_FAST_MS = Number(FAULT_ENV.DB_STATEMENT_TIMEOUT_MS) + 1000;

export interface ServiceProcess {
  baseUrl: string;
  child: ChildProcess;
  /** Every line the service wrote (pino JSON at LOG_LEVEL=warn, and anything on stderr). */
  lines: string[];
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  isRunning(): boolean;
  /** performance.now() when a line matching `pattern` is written (at once if one was already). */
  waitForLine(pattern: RegExp, timeoutMs?: number): Promise<number>;
  /** SIGTERM, then SIGKILL after 15 s; removes its data directory. */
  stop(): Promise<void>;
}

/**
 * Starts the real service (src/server.ts, through tsx's loader in one node process, so signals
 * reach the server itself) on 127.0.0.1 and waits until /health/ready answers 200.
 */
export async function startService(env: Record<string, string>): Promise<ServiceProcess> {
  const port = await freePort();
  const dataDir = mkdtempSync(join(tmpdir(), 'paservices-faults-data-'));
  const child = spawn(process.execPath, ['--import', 'tsx', 'src/server.ts'], {
    cwd: ROOT,
    // Only what the service needs: nothing from the test runner's environment leaks in.
    env: {
      PATH: process.env.PATH ?? '',
      HOME: process.env.HOME ?? tmpdir(),
      NODE_ENV: 'test',
      HOST: '127.0.0.1',
      PORT: String(port),
      PUBLIC_URL: `http://127.0.0.1:${port}`,
      DATA_DIR: dataDir,
      ...FAULT_ENV,
      ...env,
    },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const lines: string[] = [];
  const waiters = new Set<(line: string) => void>();
  for (const stream of [child.stdout, child.stderr]) {
    let partial = '';
    stream?.setEncoding('utf8');
    stream?.on('data', (chunk: string) => {
      const parts = (partial + chunk).split('\n');
      partial = parts.pop() ?? '';
      for (const line of parts.filter(Boolean)) {
        lines.push(line);
        for (const waiter of waiters) waiter(line);
      }
    });
  }
  let running = true;
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((done) => {
    child.once('exit', (code, signal) => {
      running = false;
      done({ code, signal });
    });
  });
  const baseUrl = `http://127.0.0.1:${port}`;
  const service: ServiceProcess = {
    baseUrl,
    child,
    lines,
    exited,
    isRunning: () => running,
    waitForLine(pattern, timeoutMs = 10_000) {
      if (lines.some((line) => pattern.test(line))) return Promise.resolve(performance.now());
      return new Promise((resolve, reject) => {
        const timer = setTimeout(() => {
          waiters.delete(waiter);
          reject(new Error(`no log line matching ${pattern} within ${timeoutMs} ms`));
        }, timeoutMs);
        const waiter = (line: string) => {
          if (!pattern.test(line)) return;
          clearTimeout(timer);
          waiters.delete(waiter);
          resolve(performance.now());
        };
        waiters.add(waiter);
      });
    },
    async stop() {
      if (running) {
        child.kill('SIGTERM');
        const timer = setTimeout(() => child.kill('SIGKILL'), 15_000);
        await exited;
        clearTimeout(timer);
      }
      rmSync(dataDir, { recursive: true, force: true });
    },
  };

  const deadline = Date.now() + 60_000;
  while (Date.now() < deadline) {
    if (!running) throw new Error(`the service exited during start:\n${lines.join('\n')}`);
    const ready = await send(baseUrl, 'GET', '/health/ready');
    if (ready.status === 200) return service;
    await sleep(100);
  }
  await service.stop();
  throw new Error(`the service did not become ready within 60 s:\n${lines.join('\n')}`);
}
