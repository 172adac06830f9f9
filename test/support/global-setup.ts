import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { readdirSync, readFileSync, rmSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { promisify } from 'node:util';
import type { ProvidedContext } from 'vitest';
import type { TestProject } from 'vitest/node';

declare module 'vitest' {
  export interface ProvidedContext {
    databaseUrl: string | undefined;
    databaseSource: 'TEST_DATABASE_URL' | 'testcontainers' | 'pglite';
    /** `npm run build`'s output for this run (spawn-server.ts runs it, production-build.test.ts checks it), or undefined. */
    compiledDir: string | undefined;
  }
}

async function dockerAnswers(): Promise<boolean> {
  try {
    const { getContainerRuntimeClient } = await import('testcontainers');
    await Promise.race([
      getContainerRuntimeClient(),
      new Promise((_, reject) => setTimeout(() => reject(new Error('timeout')), 5000)),
    ]);
    return true;
  } catch {
    return false;
  }
}

const ROOT = resolve(import.meta.dirname, '../..');

/** Where a run's compiled copy goes: `test-build-<pid of the run>-<random>` (compileSources). */
const BUILDS = join(ROOT, '.data');
const BUILD_NAME = /^test-build-(\d+)-[0-9a-f]{8}$/;

/** Whether the process `pid` still runs (EPERM: it does, as another user's). */
function running(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code !== 'ESRCH';
  }
}

/**
 * Removes the compiled copies in `dir` that a run left behind when it was killed before its teardown:
 * those whose run (the pid in the name) is gone. A live run's is kept, another `npm test` beside this
 * one in the same checkout included; so is a directory of another name (an older release's copy,
 * `test-build-<random>`, whose run cannot be told).
 */
export function removeStaleBuilds(dir: string = BUILDS): string[] {
  let names: string[];
  try {
    names = readdirSync(dir);
  } catch {
    return [];
  }
  const stale = names.filter((name) => {
    const pid = BUILD_NAME.exec(name)?.[1];
    return pid !== undefined && !running(Number(pid));
  });
  for (const name of stale) rmSync(join(dir, name), { recursive: true, force: true });
  return stale;
}

/** A test file that runs the server or a script as a child process through tsx, from the project. */
const SPAWNS_SOURCE = /\btsx:\s*['"`](?:src|scripts)\//;

/**
 * The run's copy of what `npm run build` compiles (src/ and scripts/, tsconfig.build.json, the same
 * command but for --outDir), made once for the run when one of its files starts the server or a
 * script: node alone starts one in half the CPU that node with tsx's loader takes, and scripts.test.ts
 * alone starts dozens; production-build.test.ts takes it as the build instead of compiling its own.
 * Under .data/ (git and Docker ignore it), inside the project so that the compiled code finds
 * package.json, drizzle/, data/ and node_modules above it. None in watch mode, where it would go stale
 * at the first edit, nor when the build fails (a type error): the child processes then run through
 * tsx, as they would without it, and production-build.test.ts runs the build itself, and fails.
 */
async function compileSources(project: TestProject): Promise<string | undefined> {
  if (project.vitest.config.watch) return undefined;
  const spawning = project.vitest.state.getPaths().some((file) => {
    try {
      return SPAWNS_SOURCE.test(readFileSync(file, 'utf8'));
    } catch {
      return false;
    }
  });
  if (!spawning) return undefined;
  // The run's pid in the name: a run killed before its teardown leaves it, and the next removes it.
  const dir = join(BUILDS, `test-build-${process.pid}-${randomBytes(4).toString('hex')}`);
  const tsc = join(ROOT, 'node_modules/typescript/bin/tsc');
  try {
    await promisify(execFile)(process.execPath, [tsc, '-p', 'tsconfig.build.json', '--outDir', dir], {
      cwd: ROOT,
    });
    return dir;
  } catch {
    rmSync(dir, { recursive: true, force: true });
    return undefined;
  }
}

/** The test database, chosen once for the run; `stop` ends what was started for it. */
interface RunDatabase {
  url: string | undefined;
  source: ProvidedContext['databaseSource'];
  stop?: () => Promise<void>;
}

/**
 * TEST_DATABASE_URL when set, else a PostgreSQL testcontainer when Docker answers, else embedded
 * PGlite (each worker opens its own).
 */
async function chooseDatabase(): Promise<RunDatabase> {
  const fromEnv = process.env.TEST_DATABASE_URL;
  if (fromEnv) return { url: fromEnv, source: 'TEST_DATABASE_URL' };
  if (await dockerAnswers()) {
    const { PostgreSqlContainer } = await import('@testcontainers/postgresql');
    const container = await new PostgreSqlContainer('postgres:15-alpine').start();
    return {
      url: container.getConnectionUri(),
      source: 'testcontainers',
      stop: async () => {
        await container.stop();
      },
    };
  }
  return { url: undefined, source: 'pglite' };
}

/**
 * Removes the copies killed runs left (removeStaleBuilds), then compiles the sources when the run
 * needs them (compileSources) while it chooses the test database (chooseDatabase): the two are
 * independent, and each takes seconds. Should either fail, what the other made is undone and the
 * failure is the run's error, as it was (a failed compile is no failure: the run goes through tsx).
 */
export default async function setup(project: TestProject) {
  removeStaleBuilds();
  const [compiled, database] = await Promise.allSettled([compileSources(project), chooseDatabase()]);
  const removeCompiled = () => {
    if (compiled.status === 'fulfilled' && compiled.value)
      rmSync(compiled.value, { recursive: true, force: true });
  };
  if (database.status === 'rejected') {
    removeCompiled();
    throw database.reason;
  }
  const { url, source, stop } = database.value;
  if (compiled.status === 'rejected') {
    await stop?.();
    throw compiled.reason;
  }
  project.provide('compiledDir', compiled.value);
  project.provide('databaseUrl', url);
  project.provide('databaseSource', source);
  return async () => {
    try {
      await stop?.();
    } finally {
      removeCompiled();
    }
  };
}
