import { defineConfig } from 'vitest/config';

/**
 * The fault suite (`npm run test:faults`): each file starts its own throwaway PostgreSQL cluster and
 * the real service as a child process, then breaks things under load. One file at a time (they
 * restart databases and measure timings on a 2-core machine), no shared test database.
 */
export default defineConfig({
  test: {
    include: ['test/faults/**/*.test.ts'],
    pool: 'forks',
    maxWorkers: 1,
    fileParallelism: false,
    testTimeout: 120_000,
    hookTimeout: 120_000,
    reporters: ['default'],
  },
});
