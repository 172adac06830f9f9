import type { Executor } from '../../db/client.js';
import type { Clock } from '../../lib/clock.js';
import type { AuditRepository } from './audit.repository.js';

/** Who did it, from where: taken from the request by the routes and passed down to services. */
export interface RequestContext {
  actorType: 'user' | 'service' | 'api_key' | 'anonymous' | 'system';
  actorId: string | null;
  /**
   * The credential the actor used, when it tells more than the actor: the session a user's token
   * belongs to, or the API key (whose actor is its owner).
   */
  credentialId?: string | null;
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

const sameValue = (a: unknown, b: unknown): boolean => {
  if (Array.isArray(a) && Array.isArray(b))
    return a.length === b.length && [...a].sort().join('\u0000') === [...b].sort().join('\u0000');
  if (a instanceof Date || b instanceof Date)
    return a instanceof Date && b instanceof Date && a.getTime() === b.getTime();
  return canonicalJson(a) === canonicalJson(b);
};

/** JSON with every object's keys in order: jsonb keeps its own key order, not the order sent. */
const canonicalJson = (value: unknown): string =>
  JSON.stringify(value, (_key, v: unknown) =>
    v !== null && typeof v === 'object' && !Array.isArray(v)
      ? Object.fromEntries(Object.entries(v).sort(([x], [y]) => (x < y ? -1 : x > y ? 1 : 0)))
      : v,
  );

/**
 * The part of `patch` that would change `current` (the row it applies to, with the same field
 * names): lists of strings (scopes, audiences) are compared as sets, dates by time, the rest by
 * value. An empty result means the change is a no-op: no write, no `updated_at` bump, no event.
 */
export function effectivePatch<P extends object>(patch: P, current: object): Partial<P> {
  const out: Partial<P> = {};
  for (const key of Object.keys(patch) as (keyof P & string)[]) {
    const value = patch[key];
    if (value !== undefined && !sameValue(value, (current as Record<string, unknown>)[key])) out[key] = value;
  }
  return out;
}

/**
 * Every type of event the service writes (`AuditRecord.type` takes no other, so a new one is added
 * here or does not compile): what `GET /v1/audit-events?type=` accepts and its document lists, so a
 * mistyped filter is a 400 naming these rather than an empty page.
 */
export const AUDIT_EVENT_TYPES = [
  'access_token.revoked',
  'api_key.created',
  'api_key.revoked',
  'api_key.rotated',
  'api_key.updated',
  'auth.email_confirmation_sent',
  'auth.exchange',
  'auth.login',
  'auth.logout',
  'auth.magic_link',
  'auth.magic_link_requested',
  'auth.mfa_challenge',
  'auth.password_changed',
  'auth.password_reset',
  'auth.password_reset_requested',
  'auth.session_ended',
  'authorization.denied',
  'client.authentication_failed',
  'client.created',
  'client.deleted',
  'client.secret_rotated',
  'client.updated',
  'mfa.disabled',
  'mfa.enabled',
  'mfa.recovery_codes_regenerated',
  'mfa.setup_started',
  'profile.updated',
  'refresh_token.reused',
  'refresh_token.revoked',
  'role.created',
  'role.deleted',
  'role.granted',
  'role.removed',
  'role.updated',
  'signing_key.rotated',
  'user.deleted',
  'user.disabled',
  'user.email_change_cancelled',
  'user.email_change_confirmed',
  'user.email_change_requested',
  'user.email_changed',
  'user.email_confirmed',
  'user.enabled',
  'user.invited',
  'user.registered',
  'user.sessions_ended',
] as const;

export type AuditEventType = (typeof AUDIT_EVENT_TYPES)[number];

export interface AuditRecord {
  type: AuditEventType;
  subjectId?: string | null;
  outcome?: 'success' | 'failure';
  data?: Record<string, unknown>;
}

/**
 * How far apart the clocks of the instances (and the database's) may be, in milliseconds: events are
 * stamped by the clock of the instance that writes them, and `complete_until` is read off the clock of
 * the one answering.
 */
export const CLOCK_SKEW_MS = 1000;

export function createAuditService(deps: {
  repo: AuditRepository;
  clock: Clock;
  /**
   * How long after its stamp an event can still commit (DatabaseHandle.visibleWithinMs): what
   * `completeUntil` stays behind the clock.
   */
  visibleWithinMs: number;
}) {
  const settleMs = deps.visibleWithinMs > 0 ? deps.visibleWithinMs + CLOCK_SKEW_MS : 0;
  return {
    /** How far `completeUntil` stays behind the clock. */
    settleMs,
    /**
     * The instant before which the log is complete: every event stamped earlier has committed (or
     * never will), so a read now holds all of them, and one stamped earlier never appears later.
     * Events stamped in a transaction still open (the stamp is taken inside it, the commit comes
     * after) are what it stays behind for.
     */
    completeUntil(): Date {
      return new Date(deps.clock.nowMs() - settleMs);
    },
    /**
     * Writes the event on `tx`, the transaction of the change it records; a list of events (one per
     * user a change reached) is written in as few statements as it takes.
     */
    async record(tx: Executor, context: RequestContext, record: AuditRecord | AuditRecord[]): Promise<void> {
      const createdAt = deps.clock.now();
      const row = (r: AuditRecord) => ({
        type: r.type,
        actorType: context.actorType,
        actorId: context.actorId,
        credentialId: context.credentialId ?? null,
        subjectId: r.subjectId ?? null,
        outcome: r.outcome ?? 'success',
        ip: context.ip,
        userAgent: context.userAgent,
        requestId: context.requestId,
        data: r.data ?? {},
        createdAt,
      });
      await deps.repo.insert(Array.isArray(record) ? record.map(row) : row(record), tx);
    },
    list: deps.repo.list,
  };
}

export type AuditService = ReturnType<typeof createAuditService>;
