import type { FastifyInstance } from 'fastify';
import type { ZodTypeProvider } from 'fastify-type-provider-zod';
import { z } from 'zod';
import { InstantSchema } from '../../lib/instant.js';
import { decodeCursor, PaginationQuerySchema, pageOf, paginate } from '../../lib/pagination.js';
import { bearerOrApiKey, problems } from '../shared/shared.schema.js';
import type { AuditService } from './audit.service.js';

const AuditEventSchema = z
  .object({
    id: z.uuid(),
    type: z.string().describe('e.g. auth.login, role.granted, api_key.revoked'),
    outcome: z.enum(['success', 'failure']),
    actor_type: z.enum(['user', 'service', 'api_key', 'anonymous', 'system']),
    actor_id: z.string().nullable(),
    credential_id: z
      .string()
      .nullable()
      .describe('What the actor acted with: the session of a user’s token, or the API key (its id)'),
    subject_id: z.string().nullable(),
    ip: z.string().nullable(),
    user_agent: z.string().nullable(),
    request_id: z.string().nullable(),
    data: z.record(z.string(), z.unknown()),
    created_at: z.string(),
  })
  .meta({ id: 'AuditEvent' });

/** An id as audit events record it: a UUID (lower-cased, as stored) or a client's `client_id`. */
const UUID_SHAPE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;
const auditId = () =>
  z
    .string()
    .min(1)
    .max(200)
    .overwrite((id) => (UUID_SHAPE.test(id) ? id.toLowerCase() : id));

const AuditQuerySchema = PaginationQuerySchema.extend({
  actor_id: auditId().optional(),
  credential_id: auditId()
    .optional()
    .describe('Events done with this session or API key (its id); fastest with `actor_id`'),
  subject_id: auditId().optional().describe('Events about this user, API key or client (its id)'),
  outcome: z.enum(['success', 'failure']).optional(),
  type: z.string().min(1).max(100).optional(),
  since: InstantSchema.optional().describe('ISO 8601; events at or after'),
}).strict();

export async function auditRoutes(app: FastifyInstance, deps: { audit: AuditService }) {
  app.withTypeProvider<ZodTypeProvider>().get(
    '/v1/audit-events',
    {
      config: { permission: 'audit:read' },
      schema: {
        tags: ['audit'],
        operationId: 'listAuditEvents',
        summary: 'The audit log, newest first',
        security: bearerOrApiKey,
        querystring: AuditQuerySchema,
        response: { 200: pageOf(AuditEventSchema), ...problems(400, 401, 403) },
      },
    },
    async (request) => {
      const q = request.query;
      const cursor = decodeCursor(q.cursor);
      const rows = await deps.audit.list({
        limit: q.limit,
        ...(q.actor_id ? { actorId: q.actor_id } : {}),
        ...(q.credential_id ? { credentialId: q.credential_id } : {}),
        ...(q.subject_id ? { subjectId: q.subject_id } : {}),
        ...(q.outcome ? { outcome: q.outcome } : {}),
        ...(q.type ? { type: q.type } : {}),
        ...(q.since ? { since: new Date(q.since) } : {}),
        ...(cursor ? { cursor } : {}),
      });
      const { page, nextCursor } = paginate(rows, q.limit);
      return {
        data: page.map((e) => ({
          id: e.id,
          type: e.type,
          outcome: e.outcome,
          actor_type: e.actorType,
          actor_id: e.actorId,
          credential_id: e.credentialId,
          subject_id: e.subjectId,
          ip: e.ip,
          user_agent: e.userAgent,
          request_id: e.requestId,
          data: e.data,
          created_at: e.createdAt.toISOString(),
        })),
        next_cursor: nextCursor,
      };
    },
  );
}
