import type { FastifyInstance } from 'fastify';
import type { ZodTypeProvider } from 'fastify-type-provider-zod';
import { z } from 'zod';
import { type DatabaseHandle, withTimeout } from '../../db/client.js';

export interface HealthDeps {
  database: DatabaseHandle;
  /** Reads the table nearly every request needs; fails while it is locked or unreadable. */
  probeData: () => Promise<void>;
  isShuttingDown: () => boolean;
}

const READY_TIMEOUT_MS = 1000;

const HealthSchema = z.object({
  status: z.enum(['ok', 'unavailable']),
  checks: z.record(z.string(), z.enum(['ok', 'failing', 'shutting_down'])).optional(),
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
        response: { 200: HealthSchema, 503: HealthSchema },
      },
    },
    async (_request, reply) => {
      if (deps.isShuttingDown()) {
        return reply.status(503).send({ status: 'unavailable', checks: { process: 'shutting_down' } });
      }
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
      if (!database || !data) return reply.status(503).send({ status: 'unavailable', checks });
      return { status: 'ok' as const, checks };
    },
  );
}
