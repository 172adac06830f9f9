import { afterAll, expect } from 'vitest';
import { closeTestApps } from './app.js';
import { takeContractViolations } from './contract.js';
import { stopSpawned } from './spawn-server.js';

// Registered at the top level of every test file (a setup file), so the apps a file built are closed
// when it ends: their timers stop and buffered writes (API-key last use) are flushed.
afterAll(async () => {
  await closeTestApps();
});

// Every answer the file's apps gave must be one the OpenAPI document declares (test/support/contract.ts).
afterAll(() => {
  expect(takeContractViolations(), 'answers that differ from the OpenAPI document').toEqual([]);
});

// What a hook of the file spawned (test/support/spawn-server.ts) and did not stop: killed with its group.
afterAll(async () => {
  await stopSpawned();
});
