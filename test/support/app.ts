import { createHash, randomUUID } from 'node:crypto';
import type { FastifyInstance } from 'fastify';
import pino from 'pino';
import { type AppDeps, buildApp } from '../../src/app.js';
import { loadConfig } from '../../src/config.js';
import type { AuthEvent } from '../../src/lib/events.js';
import { recordContract } from './contract.js';
import { testDatabase } from './database.js';

export interface TestAppOptions {
  env?: Record<string, string>;
  deps?: Partial<AppDeps>;
  /** Runs after buildApp and before ready, e.g. to add a probe route. */
  beforeReady?: (app: FastifyInstance) => void | Promise<void>;
}

// Fixed across the run: apps built in different files share the database and its encrypted keys.
const TEST_KEY_ENCRYPTION_KEY = createHash('sha256').update('paservices-test-kek').digest('base64');
const TEST_SECRET_PEPPER = createHash('sha256').update('paservices-test-pepper').digest('base64');

export function testConfig(env: Record<string, string> = {}) {
  return loadConfig(
    {
      NODE_ENV: 'test',
      PUBLIC_URL: 'http://auth.test',
      KEY_ENCRYPTION_KEY: TEST_KEY_ENCRYPTION_KEY,
      SECRET_PEPPER: TEST_SECRET_PEPPER,
      RATE_LIMIT_ENABLED: 'false',
      LOG_LEVEL: 'silent',
      ...env,
    },
    { generateDevSecrets: false },
  );
}

const openApps: FastifyInstance[] = [];

/** Closes every app built by the file that just ran (test/support/setup.ts calls it after each file). */
export async function closeTestApps(): Promise<void> {
  const apps = openApps.splice(0);
  await Promise.all(apps.map((a) => a.close()));
}

/** Builds the real app on the worker's database; closed after the file's tests. */
export async function buildTestApp(options: TestAppOptions = {}): Promise<FastifyInstance> {
  const database = await testDatabase();
  const app = await buildApp({
    config: testConfig(options.env),
    database,
    logger: pino({ level: process.env.TEST_LOG_LEVEL ?? 'silent' }),
    // Apps of other files share the database: a timer of theirs would send this file's queued mail
    // through their mailer. Tests deliver it with services.outbox.deliverDue().
    mailRetryIntervalMs: 0,
    ...options.deps,
  });
  recordContract(app);
  // The mail a request causes goes out after its answer (the outbox, not awaited by the request): a
  // test reads its mailer once the answer is in, so each injected request waits for that mail too.
  const inject = app.inject.bind(app) as (opts: unknown) => Promise<unknown>;
  (app as unknown as { inject: (opts?: unknown) => unknown }).inject = (opts?: unknown) =>
    opts === undefined
      ? inject(opts)
      : inject(opts).then(async (res) => {
          await app.services.outbox?.idle();
          return res;
        });
  await options.beforeReady?.(app);
  await app.ready();
  openApps.push(app);
  return app;
}

export const uniqueEmail = (tag = 'user') => `${tag}-${randomUUID().slice(0, 12)}@example.test`;

/**
 * Events of one kind the app applies, counted by the id `idOf` gives. An instance applies its own
 * change at the commit and again when its notification comes back, and each drops the cached rows:
 * `bothHeard(id)` resolves once both are in, so a row cached after it stays cached (unless something
 * else changes it). Subscribe before making the change.
 */
export function appliedChanges(app: FastifyInstance, idOf: (event: AuthEvent) => string | undefined) {
  const counts = new Map<string, number>();
  const waiting = new Map<string, () => void>();
  app.services.events.subscribe((event) => {
    const id = idOf(event);
    if (id === undefined) return;
    const count = (counts.get(id) ?? 0) + 1;
    counts.set(id, count);
    if (count >= 2) waiting.get(id)?.();
  });
  return {
    bothHeard: (id: string) =>
      new Promise<void>((resolve) => {
        if ((counts.get(id) ?? 0) >= 2) resolve();
        else waiting.set(id, resolve);
      }),
  };
}
