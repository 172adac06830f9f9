import type { FastifyInstance } from 'fastify';
import type { ZodTypeProvider } from 'fastify-type-provider-zod';
import { z } from 'zod';
import { type DatabaseHandle, withTimeout } from '../../db/client.js';
import { AppError } from '../../lib/errors.js';

export interface HealthDeps {
  database: DatabaseHandle;
  /** Reads the table nearly every request needs; fails while it is locked or unreadable. */
  probeData: () => Promise<void>;
  isShuttingDown: () => boolean;
}

const READY_TIMEOUT_MS = 1000;

const HealthSchema = z.object({
  status: z.literal('ok'),
  checks: z.record(z.string(), z.enum(['ok', 'failing', 'shutting_down'])).optional(),
});

/** A 503 of readiness: the problem, with the checks that say what failed. */
const NotReadySchema = z
  .object({
    type: z.string(),
    title: z.string(),
    status: z.literal(503),
    detail: z.string(),
    code: z.string().describe('`service_unavailable`'),
    instance: z.string().optional(),
    request_id: z.string().optional(),
    checks: z.record(z.string(), z.enum(['ok', 'failing', 'shutting_down'])),
  })
  .meta({ id: 'NotReady', description: 'RFC 9457 problem details, with the readiness checks' });

/** Not ready: a 503 problem whose `checks` say what failed. */
const notReady = (checks: Record<string, string>, why: string) =>
  new AppError('service_unavailable', {
    detail: `Not ready: ${why}`,
    extensions: { checks },
  });

export async function healthRoutes(app: FastifyInstance, deps: HealthDeps) {
  const r = app.withTypeProvider<ZodTypeProvider>();
  r.get(
    '/health/live',
    {
      config: { public: true, rateLimit: false },
      schema: {
        tags: ['operations'],
        operationId: 'healthLive',
        summary: 'Liveness: the process is up',
        response: { 200: HealthSchema },
      },
    },
    async () => ({ status: 'ok' as const }),
  );

  r.get(
    '/health/ready',
    {
      config: { public: true, rateLimit: false },
      schema: {
        tags: ['operations'],
        operationId: 'healthReady',
        summary:
          'Readiness: the database answers and its users table can be read within 1 s, and the process is not shutting down',
        description:
          'Not ready is a 503 problem+json (API.md: every error is one), `code: service_unavailable`, ' +
          'with the failing `checks` as an extension member.',
        response: { 200: HealthSchema, 503: NotReadySchema },
      },
    },
    async () => {
      if (deps.isShuttingDown()) throw notReady({ process: 'shutting_down' }, 'the process is shutting down');
      // Both within the same second: PostgreSQL answering is not enough when the table every login,
      // refresh and key lookup reads is locked or unreadable (requests would only get 503s).
      const [database, data] = await Promise.all([
        deps.database.ping(READY_TIMEOUT_MS),
        withTimeout(deps.probeData(), READY_TIMEOUT_MS).then(
          () => true,
          () => false,
        ),
      ]);
      const checks = { database: database ? 'ok' : 'failing', data: data ? 'ok' : 'failing' } as const;
      if (!database || !data)
        throw notReady(
          checks,
          !database ? 'the database does not answer' : 'the users table cannot be read within 1 s',
        );
      return { status: 'ok' as const, checks };
    },
  );
}
