import type { FastifyInstance } from 'fastify';
import type { ZodTypeProvider } from 'fastify-type-provider-zod';
import { z } from 'zod';
import type { DatabaseHandle } from '../../db/client.js';

export interface HealthDeps {
  database: DatabaseHandle;
  isShuttingDown: () => boolean;
}

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
        summary: 'Readiness: the database answers within 1 s and the process is not shutting down',
        response: { 200: HealthSchema, 503: HealthSchema },
      },
    },
    async (_request, reply) => {
      if (deps.isShuttingDown()) {
        return reply.status(503).send({ status: 'unavailable', checks: { process: 'shutting_down' } });
      }
      const ok = await deps.database.ping(1000);
      if (!ok) return reply.status(503).send({ status: 'unavailable', checks: { database: 'failing' } });
      return { status: 'ok' as const, checks: { database: 'ok' as const } };
    },
  );
}
