import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join, relative } from 'node:path';
import type { TestProject } from 'vitest/node';
import { describe, expect, inject, it, vi } from 'vitest';
import setup from '../support/global-setup.js';
import { ROOT, spawnServer } from '../support/spawn-server.js';

/*
 * A run whose files start src/ or scripts/ through tsx from the project (this one does) compiles them
 * once (test/support/global-setup.ts), and spawnServer runs the compiled copy: the same program
 * without tsx's loader, which took half the CPU of each start. Whatever is not in that copy, or runs
 * from another directory, still goes through tsx.
 */

describe('the run’s compiled copy of src/ and scripts/', () => {
  const dir = inject('compiledDir');

  it('is made for the run, under .data/ in the project, which git ignores, named by the run’s pid', () => {
    expect(dir).toBeDefined();
    // The run: vitest's main process, whose child this worker is (pool: 'forks').
    expect(relative(ROOT, dir!)).toMatch(new RegExp(`^\\.data/test-build-${process.ppid}-[0-9a-f]{8}$`));
    expect(existsSync(join(dir!, 'src/server.js'))).toBe(true);
    expect(existsSync(join(dir!, 'scripts/migrate.js'))).toBe(true);
    expect(readFileSync(join(ROOT, '.gitignore'), 'utf8').split('\n')).toContain('.data/');
  });

  it('runs a script of scripts/ as its compiled file, with node alone', async () => {
    const script = await spawnServer({ tsx: 'scripts/migrate.ts', args: ['--help'] });
    expect(await script.exit(), script.output).toEqual({ code: 0, signal: null });
    expect(script.child.spawnargs).toEqual([process.execPath, join(dir!, 'scripts/migrate.js'), '--help']);
    expect(script.stdout).toMatch(/^usage: npm run db:migrate\n/);
  }, 30_000);

  it('runs a file from another directory through tsx, as without the copy', async () => {
    const script = await spawnServer({ tsx: 'migrate.ts', cwd: join(ROOT, 'scripts'), args: ['--help'] });
    expect(await script.exit(), script.output).toEqual({ code: 0, signal: null });
    expect(script.child.spawnargs).toEqual([process.execPath, '--import', 'tsx', 'migrate.ts', '--help']);
    expect(script.stdout).toMatch(/^usage: npm run db:migrate\n/);
  }, 30_000);
});

describe('the copies of runs killed before their teardown', () => {
  it('are removed when a run starts; a live run’s, and what is named otherwise, are kept', async () => {
    // A process that has ended: its pid answers nothing.
    const gone = spawnSync(process.execPath, ['-e', '']).pid;
    const make = (name: string) => {
      const made = join(ROOT, '.data', name);
      mkdirSync(join(made, 'src'), { recursive: true });
      writeFileSync(join(made, 'src/server.js'), '');
      return made;
    };
    const hex = () => randomBytes(4).toString('hex');
    const killed = make(`test-build-${gone}-${hex()}`);
    const kept = [make(`test-build-${process.pid}-${hex()}`), make(`test-build-${hex()}`)];
    const provided: Record<string, unknown> = {};
    const project = {
      vitest: { config: { watch: true } },
      provide: (key: string, value: unknown) => {
        provided[key] = value;
      },
    } as unknown as TestProject;
    vi.stubEnv('TEST_DATABASE_URL', 'postgres://unused.invalid/db');
    try {
      const teardown = await setup(project);
      await teardown();
      expect(existsSync(killed)).toBe(false);
      for (const made of kept) expect(existsSync(join(made, 'src/server.js')), made).toBe(true);
      // The run's own copy, made by its setup, is there still.
      const own = inject('compiledDir');
      if (own) expect(existsSync(join(own, 'src/server.js'))).toBe(true);
      expect(provided).toEqual({
        compiledDir: undefined,
        databaseUrl: 'postgres://unused.invalid/db',
        databaseSource: 'TEST_DATABASE_URL',
      });
    } finally {
      vi.unstubAllEnvs();
      for (const made of [killed, ...kept]) rmSync(made, { recursive: true, force: true });
    }
  });
});
