import type { FastifyInstance } from 'fastify';
import type { ZodTypeProvider } from 'fastify-type-provider-zod';
import { z } from 'zod';
import { atOrAfter, InstantSchema, isStorableInstant } from '../../lib/instant.js';
import {
  decodeCursorWithin,
  encodeCursorWithin,
  invalidCursor,
  PaginationQuerySchema,
  pageBy,
  pageOf,
} from '../../lib/pagination.js';
import { userIdOf } from '../../plugins/authenticate.js';
import { bearerOrApiKey, problems, timestamp } from '../shared/shared.schema.js';
import { AUDIT_EVENT_TYPES, type AuditEventType, type AuditService, CLOCK_SKEW_MS } from './audit.service.js';

const AuditEventSchema = z
  .object({
    id: z.guid(),
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
    created_at: timestamp(),
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

/**
 * Reading the log from an instant (`since`), up to now or only as far as it has settled (`settled`):
 * the audit list's and a user's activity's, with the same meaning. Read by `readFollowable`.
 */
const FollowQuerySchema = z.object({
  since: InstantSchema
    // Read to the millisecond at or after it (atOrAfter): the last millisecond's later fractions
    // (`9999-12-31T23:59:59.9999Z`) round up into year 10000, which no query can be given (a 500).
    // Checked only when the instant itself is in range, which InstantSchema says otherwise.
    .refine((s) => !isStorableInstant(new Date(s)) || isStorableInstant(atOrAfter(s)), {
      message: 'must be at or before 9999-12-31T23:59:59.999Z (UTC), to the millisecond',
    })
    .optional()
    .describe(
      'ISO 8601; events at or after. To follow the log without missing an event, read with ' +
        '`settled=true` and send each answer’s `complete_until` as the next read’s `since`',
    ),
  settled: z
    .enum(['true', 'false'])
    .optional()
    .describe(
      '`true`: only events stamped before `complete_until`, which no event can still join (an event is ' +
        'stamped inside the transaction that writes it, so one may commit after a later-stamped one). ' +
        '`false` (the default): up to now, the newest events included',
    ),
});

const AuditQuerySchema = PaginationQuerySchema.extend({
  actor_id: auditId().optional(),
  credential_id: auditId()
    .optional()
    .describe('Events done with this session or API key (its id); fastest with `actor_id`'),
  subject_id: auditId().optional().describe('Events about this user, API key or client (its id)'),
  outcome: z.enum(['success', 'failure']).optional(),
  type: z
    .enum(AUDIT_EVENT_TYPES, { error: `must be one of the event types: ${AUDIT_EVENT_TYPES.join(', ')}` })
    .optional()
    .describe('Events of this type (one of the types the service writes; any other is a 400)'),
  ...FollowQuerySchema.shape,
}).strict();

/** A page of the log read by `readFollowable`: with the `complete_until` its read holds all of. */
const followablePageOf = <T extends z.ZodType>(item: T) =>
  pageOf(item).extend({
    complete_until: z
      .string()
      .describe(
        'Every event stamped before this instant has committed: this read (this page and the pages its ' +
          '`next_cursor` leads to) holds all of them that match, and none will appear later. The same on ' +
          'every page of a read. A consumer following the log sends it as the next read’s `since` (or ' +
          'keeps its `since` when that is later)',
      ),
  });

type ListFilter = Parameters<AuditService['list']>[0];

/**
 * One page of the events matching `filter`, newest first, from `since` when asked and only up to
 * `complete_until` with `settled=true`. `complete_until` is taken before the read and carried by its
 * cursors, so every page of a read answers its first page's; a plain (created_at, id) cursor is taken
 * too, and starts a new `complete_until`.
 */
async function readFollowable(
  audit: AuditService,
  q: z.infer<typeof PaginationQuerySchema> & z.infer<typeof FollowQuerySchema>,
  filter: Omit<ListFilter, 'limit' | 'since' | 'before' | 'cursor'>,
) {
  const cursor = decodeCursorWithin(q.cursor);
  const completeNow = audit.completeUntil();
  // No instance issues a `complete_until` later than its clock allows, which is at most the clocks'
  // skew ahead of this one's. A later one is forged: with `settled=true` it would read events that
  // earlier-stamped ones may still join, and answer it as complete_until (a follower sending it back
  // as `since` would skip everything up to it). Refused as any cursor this service did not issue.
  if (cursor?.within && cursor.within.getTime() > completeNow.getTime() + CLOCK_SKEW_MS)
    throw invalidCursor();
  // Taken before the read, and kept by its later pages: what the read holds all of.
  const completeUntil = cursor?.within ?? completeNow;
  const rows = await audit.list({
    ...filter,
    limit: q.limit,
    ...(q.settled === 'true' ? { before: completeUntil } : {}),
    ...(q.since ? { since: atOrAfter(q.since) } : {}),
    ...(cursor ? { cursor: { at: cursor.at, id: cursor.id } } : {}),
  });
  const { page, nextCursor } = pageBy(rows, q.limit, (last) =>
    encodeCursorWithin({ at: last.createdAt, id: last.id }, completeUntil),
  );
  return { page, nextCursor, completeUntil: completeUntil.toISOString() };
}

/**
 * What a user's own activity shows: their account's sign-ins (and attempts), sign-outs, password,
 * address and second-factor changes, profile changes, and what an administrator did to it.
 */
export const ACCOUNT_ACTIVITY_TYPES = [
  'user.registered',
  'auth.login',
  'auth.mfa_challenge',
  'auth.magic_link',
  'auth.magic_link_requested',
  'auth.exchange',
  'auth.logout',
  'auth.session_ended',
  'user.sessions_ended',
  'refresh_token.reused',
  'refresh_token.revoked',
  'access_token.revoked',
  'auth.password_changed',
  'auth.password_reset_requested',
  'auth.password_reset',
  'user.email_confirmed',
  'user.email_change_requested',
  'user.email_change_cancelled',
  'user.email_changed',
  'mfa.setup_started',
  'mfa.enabled',
  'mfa.disabled',
  'mfa.recovery_codes_regenerated',
  'profile.updated',
  'user.disabled',
  'user.enabled',
  'role.granted',
  'role.removed',
] as const satisfies readonly AuditEventType[];

/** The parts of an event's data a user's activity shows (never tokens, never others' ids). */
const ACTIVITY_DETAILS = ['reason', 'role', 'scope', 'session_id', 'mfa'] as const;
/** The lists of names it shows: which fields a change changed (their names, not their values). */
const ACTIVITY_LISTS = ['fields'] as const;

const ActivityEventSchema = z
  .object({
    id: z.guid(),
    type: z.string().describe('One of the account events: auth.login, auth.password_changed, mfa.enabled, …'),
    outcome: z.enum(['success', 'failure']),
    by: z
      .enum(['you', 'administrator', 'service', 'anonymous', 'system'])
      .describe(
        'Who did it: you (a session or API key of yours), an administrator, a service, or someone unknown',
      ),
    ip: z.string().nullable().describe('Where from, when it was you or someone unknown; null otherwise'),
    user_agent: z.string().nullable(),
    details: z
      .object({
        reason: z.string().optional().describe('Why it failed, or why it happened'),
        role: z.string().optional(),
        scope: z.string().optional(),
        session_id: z.string().optional(),
        mfa: z.string().optional(),
        fields: z
          .array(z.string())
          .optional()
          .describe('Which fields changed (profile.updated): their names, never their values'),
      })
      .describe('A few of the event’s fields; never a token'),
    created_at: timestamp(),
  })
  .meta({ id: 'ActivityEvent' });

export async function auditRoutes(app: FastifyInstance, deps: { audit: AuditService }) {
  app.withTypeProvider<ZodTypeProvider>().get(
    '/v1/auth/activity',
    {
      config: { permission: 'account:read' },
      schema: {
        tags: ['auth'],
        operationId: 'listAccountActivity',
        summary:
          'The caller’s account activity, newest first: sign-ins and attempts, security and profile changes',
        description:
          'From the audit log: the events about the caller’s account (sign-ins and failed attempts, a sign-in ' +
          'waiting for its second factor, sign-outs and revoked tokens, ' +
          'password, address and two-step verification changes, profile changes (which fields, not their ' +
          'values), roles and status set by an administrator). ' +
          'Where it came from (`ip`, `user_agent`) is shown for what the caller or someone unknown did, not ' +
          'for an administrator or a service. `since`, `settled` and `complete_until` as at ' +
          'GET /v1/audit-events: a feed that reads with `settled=true` and sends each answer’s ' +
          '`complete_until` as the next read’s `since` misses no event and reads none twice.',
        security: bearerOrApiKey,
        querystring: PaginationQuerySchema.extend(FollowQuerySchema.shape).strict(),
        response: { 200: followablePageOf(ActivityEventSchema), ...problems(400, 401, 403) },
      },
    },
    async (request) => {
      const userId = userIdOf(request);
      const { page, nextCursor, completeUntil } = await readFollowable(deps.audit, request.query, {
        subjectId: userId,
        types: ACCOUNT_ACTIVITY_TYPES,
      });
      return {
        data: page.map((e) => {
          // Another user's failed attempt on the account (a link of its own confirmed from their
          // session) is someone unknown's, not an administrator's; a refused request an administrator
          // made about it (a reset link asked for again within the minute) says so
          // (`by_administrator`), and is theirs, shown without where they were.
          const by: 'you' | 'administrator' | 'service' | 'anonymous' | 'system' =
            e.actorType === 'anonymous' || e.actorType === 'system'
              ? e.actorType
              : e.actorType === 'service'
                ? 'service'
                : e.actorId === userId
                  ? 'you'
                  : e.outcome === 'failure' && e.data.by_administrator !== true
                    ? 'anonymous'
                    : 'administrator';
          const located = by === 'you' || by === 'anonymous';
          const details: Record<string, string | string[]> = {};
          for (const key of ACTIVITY_DETAILS) {
            const value = e.data[key];
            if (typeof value === 'string') details[key] = value;
          }
          for (const key of ACTIVITY_LISTS) {
            const value = e.data[key];
            if (Array.isArray(value) && value.every((name) => typeof name === 'string')) details[key] = value;
          }
          return {
            id: e.id,
            type: e.type,
            outcome: e.outcome,
            by,
            ip: located ? e.ip : null,
            user_agent: located ? e.userAgent : null,
            details,
            created_at: e.createdAt.toISOString(),
          };
        }),
        next_cursor: nextCursor,
        complete_until: completeUntil,
      };
    },
  );

  app.withTypeProvider<ZodTypeProvider>().get(
    '/v1/audit-events',
    {
      config: { permission: 'audit:read' },
      schema: {
        tags: ['audit'],
        operationId: 'listAuditEvents',
        summary: 'The audit log, newest first',
        description:
          'Events are stamped (`created_at`) inside the transaction that writes them, so one can commit a ' +
          'moment after an event stamped later. With `settled=true` the list holds only the events stamped ' +
          'before `complete_until` (behind now by the longest an event can take to commit: about 20 s by default), ' +
          'all of which have committed: a consumer that reads with `settled=true` and sends each answer’s ' +
          '`complete_until` as the next read’s `since` misses none and reads none twice. Without it the ' +
          'list reads up to now.',
        security: bearerOrApiKey,
        querystring: AuditQuerySchema,
        response: { 200: followablePageOf(AuditEventSchema), ...problems(400, 401, 403) },
      },
    },
    async (request) => {
      const q = request.query;
      const { page, nextCursor, completeUntil } = await readFollowable(deps.audit, q, {
        ...(q.actor_id ? { actorId: q.actor_id } : {}),
        ...(q.credential_id ? { credentialId: q.credential_id } : {}),
        ...(q.subject_id ? { subjectId: q.subject_id } : {}),
        ...(q.outcome ? { outcome: q.outcome } : {}),
        ...(q.type ? { type: q.type } : {}),
      });
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
        complete_until: completeUntil,
      };
    },
  );
}
