import { afterAll } from 'vitest';
import { closeTestApps } from './app.js';

// Registered at the top level of every test file (a setup file), so the apps a file built are closed
// when it ends: their timers stop and buffered writes (API-key last use) are flushed.
afterAll(async () => {
  await closeTestApps();
});
