import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

/**
 * The directory holding package.json, found from this file upwards: the same answer whether the
 * code runs from src/ (tsx) or from the compiled dist/src/ (the Docker image), so drizzle/ and
 * data/ are found in both.
 */
function findProjectRoot(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  for (;;) {
    if (existsSync(join(dir, 'package.json')) && existsSync(join(dir, 'drizzle'))) return dir;
    const parent = dirname(dir);
    if (parent === dir) throw new Error('cannot find the project root (package.json with drizzle/)');
    dir = parent;
  }
}

export const PROJECT_ROOT = findProjectRoot();
