import { existsSync, readFileSync } from 'node:fs';
import { join, relative } from 'node:path';
import { describe, expect, inject, it } from 'vitest';
import { ROOT, spawnServer } from '../support/spawn-server.js';

/*
 * A run whose files start src/ or scripts/ through tsx from the project (this one does) compiles them
 * once (test/support/global-setup.ts), and spawnServer runs the compiled copy: the same program
 * without tsx's loader, which took half the CPU of each start. Whatever is not in that copy, or runs
 * from another directory, still goes through tsx.
 */

describe('the run’s compiled copy of src/ and scripts/', () => {
  const dir = inject('compiledDir');

  it('is made for the run, under .data/ in the project, which git ignores', () => {
    expect(dir).toBeDefined();
    expect(relative(ROOT, dir!)).toMatch(/^\.data\/test-build-[0-9a-f]{8}$/);
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
