import type { Executor } from '../../db/client.js';
import type { Clock } from '../../lib/clock.js';
import type { AuditRepository } from './audit.repository.js';

/** Who did it, from where: taken from the request by the routes and passed down to services. */
export interface RequestContext {
  actorType: 'user' | 'service' | 'api_key' | 'anonymous' | 'system';
  actorId: string | null;
  ip: string | null;
  userAgent: string | null;
  requestId: string | null;
}

export const systemContext: RequestContext = {
  actorType: 'system',
  actorId: null,
  ip: null,
  userAgent: null,
  requestId: null,
};

/**
 * The fields a change touched, named as the API names them (snake_case: `expires_at`, not the
 * row's `expiresAt`), for an event's `changed` or `fields` list.
 */
export const changedFields = (patch: object): string[] =>
  Object.keys(patch).map((k) => k.replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`));

export interface AuditRecord {
  type: string;
  subjectId?: string | null;
  outcome?: 'success' | 'failure';
  data?: Record<string, unknown>;
}

export function createAuditService(deps: { repo: AuditRepository; clock: Clock }) {
  return {
    /** Writes the event on `tx`, the transaction of the change it records. */
    async record(tx: Executor, context: RequestContext, record: AuditRecord): Promise<void> {
      await deps.repo.insert(
        {
          type: record.type,
          actorType: context.actorType,
          actorId: context.actorId,
          subjectId: record.subjectId ?? null,
          outcome: record.outcome ?? 'success',
          ip: context.ip,
          userAgent: context.userAgent,
          requestId: context.requestId,
          data: record.data ?? {},
          createdAt: deps.clock.now(),
        },
        tx,
      );
    },
    list: deps.repo.list,
  };
}

export type AuditService = ReturnType<typeof createAuditService>;
