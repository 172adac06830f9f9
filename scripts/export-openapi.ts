// Writes the OpenAPI document generated from the routes' zod schemas: `npm run openapi [-- out.json]`.
import { writeFileSync } from 'node:fs';
import pino from 'pino';
import { buildApp } from '../src/app.js';
import { loadConfig } from '../src/config.js';
import { openMemoryDatabase } from '../src/db/client.js';

const out = process.argv[2] ?? 'openapi.json';
const logger = pino({ level: 'silent' });
const config = loadConfig({ ...process.env, LOG_LEVEL: 'silent' }, { generateDevSecrets: false });
const database = await openMemoryDatabase(logger);
const app = await buildApp({ config, database, logger });
await app.ready();
writeFileSync(out, `${JSON.stringify(app.swagger(), null, 2)}\n`);
console.log(`wrote ${out} (${Object.keys(app.swagger().paths ?? {}).length} paths)`);
await app.close();
await database.close();
