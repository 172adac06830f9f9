import type { ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { type Exit, spawnServer } from '../../support/spawn-server.js';

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
  /** Its DATA_DIR (the generated KEY_ENCRYPTION_KEY and SECRET_PEPPER are in it). */
  dataDir: string;
  child: ChildProcess;
  /** Every line the service wrote (pino JSON at LOG_LEVEL=warn, and anything on stderr). */
  lines: string[];
  exited: Promise<Exit>;
  isRunning(): boolean;
  /** performance.now() when a line matching `pattern` is written (at once if one was already). */
  waitForLine(pattern: RegExp, timeoutMs?: number): Promise<number>;
  /** SIGTERM, then SIGKILL (its process group) after 15 s; removes its data directory (if it made it). */
  stop(): Promise<void>;
}

/**
 * Starts the real service (src/server.ts, through tsx's loader in one node process, so signals
 * reach the server itself) on 127.0.0.1 and waits until /health/ready answers 200. On a new data
 * directory, or on `options.dataDir` (a restart of an earlier one: the same secrets), which is then
 * left for its maker to remove.
 */
export async function startService(
  env: Record<string, string>,
  options: { dataDir?: string } = {},
): Promise<ServiceProcess> {
  const ownsDataDir = options.dataDir === undefined;
  const dataDir = options.dataDir ?? mkdtempSync(join(tmpdir(), 'paservices-faults-data-'));
  // Only what the service needs: nothing from the test runner's environment leaks in.
  const server = await spawnServer({
    tsx: 'src/server.ts',
    listen: true,
    publicUrl: true,
    env: { DATA_DIR: dataDir, ...FAULT_ENV, ...env },
  });
  const service: ServiceProcess = {
    baseUrl: server.baseUrl,
    dataDir,
    child: server.child,
    lines: server.lines,
    exited: server.exited,
    isRunning: () => server.isRunning(),
    waitForLine: (pattern, timeoutMs) => server.waitForLine(pattern, timeoutMs),
    async stop() {
      await server.stop(15_000);
      if (ownsDataDir) rmSync(dataDir, { recursive: true, force: true });
    },
  };

  const ready = await server.waitForReady(60_000);
  if (ready === 200) return service;
  const why = server.isRunning() ? 'did not become ready within 60 s' : 'exited during start';
  await service.stop();
  throw new Error(`the service ${why}:\n${server.lines.join('\n')}`);
}
