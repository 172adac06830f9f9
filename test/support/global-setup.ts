import type { TestProject } from 'vitest/node';

declare module 'vitest' {
  export interface ProvidedContext {
    databaseUrl: string | undefined;
    databaseSource: 'TEST_DATABASE_URL' | 'testcontainers' | 'pglite';
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

/**
 * Chooses the test database once for the run: TEST_DATABASE_URL when set, else a PostgreSQL
 * testcontainer when Docker answers, else embedded PGlite (each worker opens its own).
 */
export default async function setup(project: TestProject) {
  const fromEnv = process.env.TEST_DATABASE_URL;
  if (fromEnv) {
    project.provide('databaseUrl', fromEnv);
    project.provide('databaseSource', 'TEST_DATABASE_URL');
    return;
  }
  if (await dockerAnswers()) {
    const { PostgreSqlContainer } = await import('@testcontainers/postgresql');
    const container = await new PostgreSqlContainer('postgres:15-alpine').start();
    project.provide('databaseUrl', container.getConnectionUri());
    project.provide('databaseSource', 'testcontainers');
    return async () => {
      await container.stop();
    };
  }
  project.provide('databaseUrl', undefined);
  project.provide('databaseSource', 'pglite');
  return undefined;
}
