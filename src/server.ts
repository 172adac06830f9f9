import 'dotenv/config';
import closeWithGrace from 'close-with-grace';
import { startupWarnings } from './startup-warnings.js';
import { buildApp } from './app.js';
import { ConfigError, loadConfig } from './config.js';
import { DatabaseLockedError, MigrationError, openDatabase } from './db/client.js';
import { databaseLocation, describeFailure, isOperational } from './lib/failure.js';
import { createLogger } from './lib/logger.js';
import { BootstrapAdminError, RedisDatabaseError } from './services.js';
import { KeyEncryptionKeyMismatchError } from './lib/crypto.js';
import { SigningKeyMismatchError } from './modules/signing-keys/signing-keys.service.js';
import { CommonPasswordsError, loadCommonPasswords } from './identity/passwords.js';

/**
 * Until the graceful shutdown below is in place, a SIGTERM or SIGINT ends the start at once, exit 0
 * (a stop that was asked for), with a line saying so. In the image node is PID 1, which the kernel
 * gives no default action for a signal it has no listener for: without this, a `docker stop` or a
 * pod's deletion during the migrations (the advisory lock's wait, up to a minute of retries) was
 * discarded, and the service came up anyway. A migration cut short is rolled back by PostgreSQL.
 */
function stopStartOnSignal(): () => void {
  const stop = (signal: NodeJS.Signals) => {
    process.stderr.write(`start stopped by ${signal}: the service was not ready and exits\n`);
    process.exit(0);
  };
  process.once('SIGTERM', stop);
  process.once('SIGINT', stop);
  return () => {
    process.removeListener('SIGTERM', stop);
    process.removeListener('SIGINT', stop);
  };
}

async function main() {
  const stopStartListening = stopStartOnSignal();
  let config: ReturnType<typeof loadConfig>;
  try {
    config = loadConfig(process.env);
  } catch (err) {
    if (err instanceof ConfigError) {
      process.stderr.write(`failed to start: ${describeFailure(err)}\n`);
      process.exit(1);
    }
    throw err;
  }
  const logger = createLogger(config.logLevel);
  // Before the database is opened: an install without data/ would start and answer every registration 500.
  loadCommonPasswords();
  const database = await openDatabase({
    url: config.databaseUrl,
    dataDir: config.dataDir,
    logger,
    poolMax: config.db.poolMax,
    connectTimeoutMs: config.db.connectTimeoutMs,
    statementTimeoutMs: config.db.statementTimeoutMs,
    transactionTimeoutMs: config.db.transactionTimeoutMs,
    migrate: true,
    migrations: config.db.migrations,
  });
  const app = await buildApp({ config, database, logger });

  // SIGTERM: readiness turns 503 at once; for SHUTDOWN_DRAIN_MS the service keeps serving while the
  // load balancer notices and stops sending; then the server stops accepting, in-flight requests
  // finish, the pool closes and the process exits 0.
  stopStartListening();
  closeWithGrace({ delay: config.shutdownTimeoutMs, logger }, async ({ signal, err }) => {
    if (err) logger.error({ err }, 'shutting down after an error');
    else logger.info({ signal, drainMs: config.shutdownDrainMs }, 'shutting down');
    app.markShuttingDown();
    const drainMs = !err ? config.shutdownDrainMs : 0;
    if (drainMs > 0) {
      await new Promise((r) => setTimeout(r, drainMs));
      logger.info('drained; closing the listener');
    }
    // Requests in flight get the time left, less a margin for the pool to close; a connection still
    // open then (a client trickling a body, one that never reads its answer) is cut, so the exit is
    // a clean 0 rather than close-with-grace's kill at its deadline.
    const left = config.shutdownTimeoutMs - drainMs;
    const cut = setTimeout(
      () => {
        logger.warn('requests still open at the shutdown deadline; closing their connections');
        app.server.closeAllConnections();
      },
      // Two seconds for what follows: the plugins' close hooks (the outbox waits a second at most for
      // a send in flight, key usage is flushed) and the pool.
      left - Math.min(2000, left / 4),
    );
    cut.unref();
    await app.close();
    clearTimeout(cut);
    await database.close();
  });

  for (const { fields, message } of await startupWarnings(config, database.kind, async (name) =>
    Boolean(await app.services.repos.roles.find(name)),
  ))
    logger.warn(fields ?? {}, message);
  await app.listen({ port: config.port, host: config.host });
  logger.info(
    {
      url: config.publicUrl,
      docs: `${config.publicUrl}/docs`,
      database: database.kind,
      provider: config.authProvider,
      // What decides the production checks: a .env copied from .env.example once set it back.
      env: config.env,
    },
    'auth service ready',
  );
}

main().catch((err: unknown) => {
  // A known condition with its remedy in the message: no stack trace.
  if (
    err instanceof DatabaseLockedError ||
    err instanceof MigrationError ||
    err instanceof KeyEncryptionKeyMismatchError ||
    err instanceof SigningKeyMismatchError ||
    err instanceof CommonPasswordsError ||
    err instanceof BootstrapAdminError ||
    err instanceof RedisDatabaseError
  ) {
    process.stderr.write(`failed to start: ${err.message}\n`);
    process.exit(1);
  }
  // The operator's to mend (the database unreachable or refusing, the port taken, the data directory
  // not one): one line, as the scripts say it. A fault of the code keeps its stack.
  if (isOperational(err)) {
    const line = describeFailure(err, databaseLocation(process.env.DATABASE_URL)).replace(/^error: /, '');
    process.stderr.write(`failed to start: ${line}\n`);
    process.exit(1);
  }
  process.stderr.write(
    `failed to start: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`,
  );
  process.exit(1);
});
