// Writes the OpenAPI document generated from the routes' zod schemas: `npm run openapi [-- out.json]`.
import { randomBytes } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { parseArgs } from 'node:util';
import { runScript, UsageError } from './lib/script-context.js';

const USAGE = `usage: npm run openapi [-- <file>]

Writes the OpenAPI document of the service to <file> (default openapi.json). It builds the app on a
throwaway in-memory database: no database, secret or running service is needed.`;

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
