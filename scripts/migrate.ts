// Applies pending migrations in drizzle/ to DATABASE_URL (or the embedded database under .data/),
// under the same advisory lock the service takes at start.
import 'dotenv/config';
import { loadConfig } from '../src/config.js';
import { openDatabase } from '../src/db/client.js';
import { createLogger } from '../src/lib/logger.js';

const config = loadConfig(process.env);
const logger = createLogger('info');
const database = await openDatabase({
  url: config.databaseUrl,
  dataDir: config.dataDir,
  logger,
  migrate: true,
});
logger.info({ database: database.kind }, 'migrations applied');
await database.close();
