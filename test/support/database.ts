import pino from 'pino';
import { inject } from 'vitest';
import { type DatabaseHandle, openDatabase, openMemoryDatabase } from '../../src/db/client.js';

let shared: Promise<DatabaseHandle> | undefined;

/** The worker's database: shared by every test file the worker runs (tests use their own rows). */
export function testDatabase(): Promise<DatabaseHandle> {
  if (!shared) {
    const url = inject('databaseUrl');
    const logger = pino({ level: 'silent' });
    shared = url
      ? openDatabase({ url, dataDir: '.data/test', logger, migrate: true, connectTimeoutMs: 5000 })
      : openMemoryDatabase(logger);
  }
  return shared;
}

export const databaseSource = () => inject('databaseSource');
