import { randomUUID } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import { sql } from 'drizzle-orm';
import type { Logger } from 'pino';
import type { Database, DatabaseHandle, Transaction } from '../db/client.js';
import { pgErrorCode } from './errors.js';

/**
 * Changes that every instance's caches must learn of. They travel by PostgreSQL NOTIFY issued inside
 * the transaction that made the change, so they are delivered exactly when (and only if) it commits,
 * to every instance listening on the same database, within milliseconds.
 */
export type AuthEvent =
  | {
      type: 'revocation';
      kind: 'jti' | 'session' | 'subject';
      value: string;
      revokedAt: number;
      expiresAt: number;
    }
  | { type: 'api_key_changed'; lookupId: string }
  | { type: 'user_changed'; userId: string }
  | { type: 'roles_changed' }
  /**
   * `revoked`: the kids an emergency rotation revoked (`revoke_previous`). An instance drops them at
   * once, and signs nothing more with its active key if it is one of them, before reading the keys.
   */
  | { type: 'signing_keys_changed'; revoked?: string[] }
  | { type: 'client_changed'; clientId: string }
  /** The listener reconnected and may have missed events: drop or reload everything cached. */
  | { type: 'resync' };

export type EventHandler = (event: AuthEvent) => void;

export const EVENTS_CHANNEL = 'paservices_auth_events';

/**
 * PostgreSQL refuses a NOTIFY payload of 8000 bytes or more, failing the whole transaction: a user's
 * 60 sessions ended at once (one revocation each) made "sign out everywhere", a password reset and an
 * administrator's disable answer 500. A transaction's events go in notifications of at most this many
 * bytes each, delivered in order at its commit.
 */
export const MAX_NOTIFICATION_BYTES = 7000;

/** The notifications carrying `events` from `origin`, each under MAX_NOTIFICATION_BYTES. */
export function notificationPayloads(origin: string, events: AuthEvent[]): string[] {
  const payloads: string[] = [];
  const envelope = Buffer.byteLength(JSON.stringify({ origin, events: [] }));
  let batch: string[] = [];
  let size = envelope;
  const flush = () => {
    if (batch.length > 0) payloads.push(`{"origin":${JSON.stringify(origin)},"events":[${batch.join(',')}]}`);
    batch = [];
    size = envelope;
  };
  for (const event of events) {
    const json = JSON.stringify(event);
    const bytes = Buffer.byteLength(json) + 1;
    if (envelope + bytes > MAX_NOTIFICATION_BYTES) {
      // No event is this big; were one, every instance drops and reloads what it caches instead.
      flush();
      payloads.push(JSON.stringify({ type: 'resync' }));
      continue;
    }
    if (size + bytes > MAX_NOTIFICATION_BYTES) flush();
    batch.push(json);
    size += bytes;
  }
  flush();
  return payloads;
}

export function createEventBus(deps: { database: DatabaseHandle; logger: Logger }) {
  const handlers: EventHandler[] = [];
  const instanceId = randomUUID();
  let stopListening: (() => Promise<void>) | undefined;

  function dispatch(event: AuthEvent) {
    for (const handler of handlers) {
      try {
        handler(event);
      } catch (err) {
        deps.logger.error({ err, event: event.type }, 'event handler failed');
      }
    }
  }

  return {
    instanceId,
    subscribe(handler: EventHandler) {
      handlers.push(handler);
    },
    /** Starts listening; call once at start-up. */
    async start() {
      stopListening = await deps.database.listen(EVENTS_CHANNEL, (payload) => {
        try {
          const message = JSON.parse(payload) as { origin?: string; events?: AuthEvent[]; type?: string };
          if (message.type === 'resync') return dispatch({ type: 'resync' });
          // Our own events too, though they were applied here at the commit: a commit whose answer
          // was lost (the connection dropped with it, or the client-side timeout fired as the server
          // committed) applied nothing here, and this notification is then the only word of it. Every
          // handler takes an event twice as once: it drops again what it dropped, or reads again, or
          // finds the revocation known.
          for (const event of message.events ?? []) dispatch(event);
        } catch (err) {
          deps.logger.warn({ err }, 'ignoring a malformed event notification');
        }
      });
    },
    async stop() {
      await stopListening?.();
      stopListening = undefined;
    },
    /**
     * Queues the events in the transaction: every listening instance receives them when it commits,
     * this one too (which applied them at the commit already: see `start`).
     */
    async publish(tx: Transaction | Database, events: AuthEvent[]) {
      for (const payload of notificationPayloads(instanceId, events))
        await tx.execute(sql`SELECT pg_notify(${EVENTS_CHANNEL}, ${payload})`);
    },
    /** Applies events to this instance's caches right after the commit. */
    applyLocally(events: AuthEvent[]) {
      for (const event of events) dispatch(event);
    },
  };
}

export type EventBus = ReturnType<typeof createEventBus>;

/** deadlock_detected and serialization_failure: the transaction may simply run again. */
const RETRYABLE_STATES = new Set(['40P01', '40001']);
const TRANSACTION_ATTEMPTS = 3;

/**
 * Runs `work` in one transaction; the events it emits are published inside it (NOTIFY) and applied
 * to this instance once it has committed. A change, its audit event and its notification commit
 * together or not at all. `work` may run again (up to three times) when PostgreSQL ends the
 * transaction for a deadlock or a serialization failure: it must do nothing outside the transaction.
 * `committed` runs with its result as soon as the commit is answered (in the same turn of the event
 * loop, before the events are applied here): for what this instance must hold from the moment of the
 * commit on (the signing keys a rotation left).
 */
export async function inTransaction<T>(
  db: Database,
  bus: EventBus,
  work: (tx: Transaction, emit: (event: AuthEvent) => void) => Promise<T>,
  committed?: (result: T) => void,
): Promise<T> {
  for (let attempt = 1; ; attempt++) {
    const emitted: AuthEvent[] = [];
    try {
      const result = await db.transaction(async (tx) => {
        const value = await work(tx, (event) => emitted.push(event));
        await bus.publish(tx, emitted);
        return value;
      });
      // Committed: whatever `committed` throws, the events are applied and nothing runs again.
      try {
        committed?.(result);
      } finally {
        bus.applyLocally(emitted);
      }
      return result;
    } catch (err) {
      // PostgreSQL ended this transaction to let a concurrent one through (a deadlock, e.g. a refresh
      // and the deletion of its user taking the same rows in opposite orders): nothing of it was
      // kept, so it runs again, seeing what the other committed.
      if (attempt >= TRANSACTION_ATTEMPTS || !RETRYABLE_STATES.has(pgErrorCode(err) ?? '')) throw err;
      await sleep(attempt * 5 + Math.random() * 10);
    }
  }
}
