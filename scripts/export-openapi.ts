// Writes the OpenAPI document generated from the routes' zod schemas: `npm run openapi [-- out.json]`.
import { randomBytes } from 'node:crypto';
import { accessSync, constants, statSync, writeFileSync } from 'node:fs';
import { dirname, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import { runScript, UsageError } from './lib/script-context.js';

const USAGE = `usage: npm run openapi [-- <file>]

Writes the OpenAPI document of the service to <file> (default openapi.json). It builds the app on a
throwaway in-memory database: no database, secret or running service is needed.`;

/**
 * Why `out` could not be written, or undefined: asked before the app is built on its in-memory
 * database (seconds), so that a mistyped path is a usage error at once rather than a failure after.
 */
function unwritable(out: string): string | undefined {
  const dir = dirname(resolve(out));
  try {
    if (!statSync(dir).isDirectory()) return `${dir} is not a directory`;
    accessSync(dir, constants.W_OK);
    const existing = statSync(out, { throwIfNoEntry: false });
    if (existing?.isDirectory()) return 'it is a directory';
    if (existing) accessSync(out, constants.W_OK);
    return undefined;
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOENT' || code === 'ENOTDIR') return `the directory ${dir} does not exist`;
    if (code === 'EACCES' || code === 'EPERM' || code === 'EROFS') return 'permission denied';
    throw err;
  }
}

async function main() {
  let out = 'openapi.json';
  try {
    const { values, positionals } = parseArgs({
      options: { help: { type: 'boolean', short: 'h' } },
      strict: true,
      allowPositionals: true,
    });
    if (values.help) {
      process.stdout.write(`${USAGE}\n`);
      return;
    }
    if (positionals.length > 1) throw new Error(`one output file, not ${positionals.length}`);
    out = positionals[0] ?? out;
  } catch (err) {
    throw new UsageError(err instanceof Error ? err.message : String(err));
  }
  const problem = unwritable(out);
  if (problem) throw new UsageError(`cannot write ${out}: ${problem}`);
  const [{ default: pino }, { buildApp }, { loadConfig }, { openMemoryDatabase }] = await Promise.all([
    import('pino'),
    import('../src/app.js'),
    import('../src/config.js'),
    import('../src/db/client.js'),
  ]);
  const logger = pino({ level: 'silent' });
  // The document is built in memory and nothing is signed or stored: throwaway secrets, whatever
  // NODE_ENV says, rather than demanding production's.
  const config = loadConfig(
    {
      ...process.env,
      LOG_LEVEL: 'silent',
      KEY_ENCRYPTION_KEY: randomBytes(32).toString('base64'),
      SECRET_PEPPER: randomBytes(32).toString('base64'),
    },
    { needsSecrets: false },
  );
  const database = await openMemoryDatabase(logger);
  try {
    const app = await buildApp({ config, database, logger });
    try {
      await app.ready();
      const document = app.swagger();
      writeFileSync(out, `${JSON.stringify(document, null, 2)}\n`);
      process.stdout.write(`wrote ${out} (${Object.keys(document.paths ?? {}).length} paths)\n`);
    } finally {
      await app.close();
    }
  } finally {
    await database.close();
  }
}

await runScript(main, USAGE);
