import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pg from 'pg';
import { afterAll, describe, expect, inject, it } from 'vitest';
import { acquireDirectoryLock } from '../../src/db/directory-lock.js';
import { scratchDatabase } from '../support/database.js';
import { type SpawnedProcess, spawnServer } from '../support/spawn-server.js';

/*
 * In the image node is PID 1, and the kernel discards a signal PID 1 has no listener for: a SIGTERM
 * (docker stop, a pod's deletion) during the start's waits was ignored and the service came up
 * anyway. The start listens for it from its first line. Here the server is not PID 1, so a signal
 * without a listener would kill it; what shows the listener is the way it ends: its own line and
 * exit 0, not death by the signal.
 */

/** src/db/migrations.ts's advisory lock. */
const MIGRATION_LOCK_KEY = 7_344_021_118;

/** Starts the server; resolves once a line matches `waitingFor`. */
async function startUntil(env: Record<string, string>, waitingFor: RegExp) {
  const server = await spawnServer({
    tsx: 'src/server.ts',
    listen: true,
    env: { LOG_LEVEL: 'info', ...env },
  });
  await server.waitForLine(waitingFor, 40_000);
  return server;
}

/**
 * SIGTERM to a start that is waiting: it stops at once with its own line and exit 0, not killed by the
 * signal (which, as PID 1 in the image, would have been discarded instead).
 */
async function expectStoppedBySigterm(server: SpawnedProcess) {
  const signalledAt = performance.now();
  server.kill('SIGTERM');
  const exit = await server.exited;
  expect(exit, server.output).toEqual({ code: 0, signal: null });
  expect(performance.now() - signalledAt).toBeLessThan(5000);
  expect(server.output).toContain('start stopped by SIGTERM');
}

describe('a SIGTERM during the start', () => {
  const dataDir = mkdtempSync(join(tmpdir(), 'auth-start-signal-'));
  afterAll(() => rmSync(dataDir, { recursive: true, force: true }));

  it.runIf(inject('databaseUrl'))(
    'while another instance holds the migration lock (PostgreSQL): the start stops, exit 0, not killed by the signal',
    async () => {
      const scratch = (await scratchDatabase('auth_start_signal'))!;
      const holder = new pg.Client({ connectionString: scratch.url });
      await holder.connect();
      try {
        await holder.query('SELECT pg_advisory_lock($1)', [MIGRATION_LOCK_KEY]);
        const server = await startUntil(
          { DATABASE_URL: scratch.url, DATA_DIR: dataDir },
          /another instance is applying database migrations; waiting/,
        );
        await expectStoppedBySigterm(server);
        expect(server.output).not.toContain('auth service ready');
      } finally {
        await holder.end().catch(() => undefined);
        await scratch.drop();
      }
    },
    60_000,
  );

  it('while another process holds the embedded database: the start stops, exit 0, not killed by the signal', async () => {
    const own = join(dataDir, 'pglite-held');
    mkdirSync(join(own, 'pglite'), { recursive: true });
    // What a first `npm start` holds (src/db/client.ts's lock on the directory).
    const held = await acquireDirectoryLock(join(own, 'pglite.lock'), { onCompromised: () => undefined });
    if (!held.acquired) throw new Error(`held by ${held.holder}`);
    try {
      const server = await startUntil(
        { DATABASE_URL: '', DATA_DIR: own },
        /is locked by another process; waiting/,
      );
      await expectStoppedBySigterm(server);
    } finally {
      await held.release();
    }
  }, 60_000);
});
