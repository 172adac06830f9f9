import type { Logger } from 'pino';
import type { Executor } from '../../db/client.js';
import { type Clock, epochSeconds } from '../../lib/clock.js';
import { uuidV7Ms } from '../../lib/crypto.js';
import type { AuthEvent } from '../../lib/events.js';
import { createRetryingRead } from '../../lib/retrying-read.js';
import type { RevocationsRepository } from './revocations.repository.js';
import { acceptedUntil } from './tokens.service.js';

export type RevocationKind = 'jti' | 'session' | 'subject';
/** Revocations of every token of a session or a subject (a user or a client) issued up to then. */
export type GroupRevocationKind = Exclude<RevocationKind, 'jti'>;

type RevocationEvent = Extract<AuthEvent, { type: 'revocation' }>;

interface Entry {
  revokedAt: number;
  expiresAt: number;
  /**
   * A subject's only: until when a token of it issued without showing it knew of this revocation
   * (`sub_revoked_at`) counts as revoked — REVOCATION_SETTLE_MS past the moment this instance heard of
   * it, or past the revocation's own moment if that is later.
   */
  settleUntil: number;
  /**
   * A subject's only: the count (`seen`) at which this instance's caches were known to be past the
   * revocation — its event was applied, with the cache invalidations of its transaction — or 0 while
   * they are not (a revocation only read from the database).
   */
  seq: number;
}

/**
 * How long after an instance hears of a subject's revocation a token of that subject is still
 * presumed issued on what the revocation ended, unless it shows otherwise: the longest another
 * instance may take to hear of it after this one (the notification within 1 s; a LISTEN connection
 * gone silent is found by its 5 s heartbeat within 10 s, then replaced, and everything reloaded). An
 * instance that has not heard yet still authenticates the disabled client from its caches, and a token
 * it issues then would outlive the revocation. A token issued by an instance that knew of the
 * revocation before the request began carries its moment (`sub_revoked_at`) and is not presumed
 * anything. Counted from when the instance heard of it, not from the revocation's own moment, which
 * is taken inside its transaction, before whatever else that transaction waits for.
 */
export const REVOCATION_SETTLE_MS = 15_000;

/**
 * Revoked access tokens, held in memory by every instance so verification never reads the database:
 * loaded at start, kept current by the events of every instance, merged with the database after a
 * missed-event resync and every minute as a backstop. Entries expire with the last token they could
 * concern (revocations are never undone: a reload only adds).
 */
export function createRevocationList(deps: {
  repo: RevocationsRepository;
  clock: Clock;
  logger: Logger;
  /** The longest access-token lifetime (config.tokens.maxAccessTtl): how long a token can live. */
  maxAccessTtl: number;
  /**
   * A reload found a subject's revocation this instance had not heard of: its caches may still hold
   * what it ended, so they are to be dropped (synchronously; a resync). Then the revocation counts as
   * known.
   */
  onMissed?: () => void;
}) {
  const maps: Record<RevocationKind, Map<string, Entry>> = {
    jti: new Map(),
    session: new Map(),
    subject: new Map(),
  };

  /** Counts the subjects' revocations known here: a request notes it when it begins (`seen`). */
  let applied = 0;

  /** The last moment a token of a subject issued at `settleUntil` is accepted: its entry lasts as long. */
  const coversSettled = (settleUntil: number) =>
    acceptedUntil(Math.ceil(settleUntil / 1000) + deps.maxAccessTtl).getTime();

  /**
   * Applies a revocation heard of now: from an event (`fromEvent`, applied with its transaction's
   * cache invalidations), or read from the database. Answers whether it was news to this instance
   * (a subject's revocation it had not heard of).
   */
  function apply(
    kind: RevocationKind,
    value: string,
    entry: { revokedAt: number; expiresAt: number },
    fromEvent: boolean,
  ): boolean {
    const existing = maps[kind].get(value);
    const news = !existing || existing.revokedAt < entry.revokedAt;
    const settleUntil =
      kind === 'subject' && news
        ? Math.max(entry.revokedAt, deps.clock.nowMs()) + REVOCATION_SETTLE_MS
        : (existing?.settleUntil ?? 0);
    let seq = existing?.seq ?? 0;
    if (kind === 'subject' && fromEvent && (news || seq === 0)) seq = ++applied;
    else if (news) seq = 0;
    const next: Entry = {
      revokedAt: Math.max(existing?.revokedAt ?? 0, entry.revokedAt),
      expiresAt: Math.max(
        existing?.expiresAt ?? 0,
        entry.expiresAt,
        kind === 'subject' ? coversSettled(settleUntil) : 0,
      ),
      settleUntil: Math.max(existing?.settleUntil ?? 0, settleUntil),
      seq,
    };
    if (
      !existing ||
      existing.revokedAt !== next.revokedAt ||
      existing.expiresAt !== next.expiresAt ||
      existing.settleUntil !== next.settleUntil ||
      existing.seq !== next.seq
    )
      maps[kind].set(value, next);
    return kind === 'subject' && news && !fromEvent;
  }

  /**
   * Merges the live revocations of the database in. Nothing is cleared: an event applied while the
   * read was under way is not in what it read, and stays. A subject's revocation read here first
   * means the events missed it (or it is a moment ahead of its notification): the caches are dropped
   * (`onMissed`), and it counts as known from then on.
   */
  let loaded = false;
  async function reload() {
    const rows = await deps.repo.listLive(deps.clock.now());
    const missed: string[] = [];
    for (const r of rows) {
      const news = apply(
        r.kind,
        r.value,
        { revokedAt: r.revokedAt.getTime(), expiresAt: r.expiresAt.getTime() },
        false,
      );
      if (news) missed.push(r.value);
    }
    // The first read, at start, is before anything was cached: everything it read is known.
    const first = !loaded;
    loaded = true;
    if (missed.length === 0 || (!first && !deps.onMissed)) return;
    if (!first) deps.onMissed?.();
    for (const subject of missed) {
      const entry = maps.subject.get(subject);
      if (entry && entry.seq === 0) entry.seq = ++applied;
    }
  }

  // A resync's read is tried again until it succeeds: what the notifications missed is in no other
  // read before the minute's.
  const resyncRead = createRetryingRead({
    read: reload,
    logger: deps.logger,
    what: 'the revocations after a resync',
  });

  function prune() {
    const now = deps.clock.nowMs();
    for (const m of Object.values(maps)) for (const [k, v] of m) if (v.expiresAt <= now) m.delete(k);
  }

  /**
   * Writes the revocations of several values on `tx` in one statement, and returns their events. One
   * statement, not one per value in parallel: a transaction is one connection, which runs one query
   * at a time (node-postgres queues the others, deprecated, an error from pg 9). `until` says, from
   * the moment of the revocation, when it may be forgotten.
   */
  async function write(
    tx: Executor,
    kind: RevocationKind,
    values: readonly string[],
    until: (revokedAt: Date) => Date,
  ): Promise<RevocationEvent[]> {
    const unique = [...new Set(values)];
    const revokedAt = deps.clock.now();
    const expiresAt = until(revokedAt);
    await deps.repo.upsert(
      unique.map((value) => ({ kind, value, revokedAt, expiresAt })),
      tx,
    );
    return unique.map((value) => ({
      type: 'revocation',
      kind,
      value,
      revokedAt: revokedAt.getTime(),
      expiresAt: expiresAt.getTime(),
    }));
  }

  /**
   * A session's or a subject's revocation covers every token issued up to it (`iat` in or before its
   * second), the longest-lived included: one issued in that second with the maximum lifetime expires
   * `maxAccessTtl` later and is accepted for the leeway after that, and the revocation lasts as long.
   */
  const coversEveryTokenUpTo = (revokedAt: Date) =>
    acceptedUntil(
      epochSeconds(revokedAt) +
        Math.ceil(REVOCATION_SETTLE_MS / 1000) +
        // The settling time runs from when an instance hears of it, after the commit: a minute more
        // than any transaction of the service takes, so an instance started later still reads it.
        60 +
        deps.maxAccessTtl,
    );

  /** Revokes every token of these sessions or subjects issued until now; the events tell every instance. */
  function revokeAll(tx: Executor, kind: GroupRevocationKind, values: readonly string[]) {
    return write(tx, kind, values, coversEveryTokenUpTo);
  }

  return {
    reload,
    prune,
    /** Revokes every token of a session or subject issued until now; returns the event that tells every instance. */
    async revoke(tx: Executor, kind: GroupRevocationKind, value: string): Promise<RevocationEvent> {
      const [event] = await revokeAll(tx, kind, [value]);
      return event!;
    },
    /** Revokes one access token, until the last moment it could be accepted (its `exp` plus the leeway). */
    async revokeToken(tx: Executor, claims: { jti: string; exp: number }): Promise<RevocationEvent> {
      const [event] = await write(tx, 'jti', [claims.jti], () => acceptedUntil(claims.exp));
      return event!;
    },
    revokeAll,
    handle(event: AuthEvent) {
      if (event.type === 'revocation') apply(event.kind, event.value, event, true);
      else if (event.type === 'resync') resyncRead.request();
    },
    /** Stops a resync's read from being tried again (the service is stopping). */
    stop: () => resyncRead.stop(),
    /** Where this instance stands: a request notes it before it authenticates anyone (`knownRevocation`). */
    seen: () => applied,
    /**
     * The moment of `subject`'s revocation, when this instance had applied it by `seen` (noted when
     * the request began, before it authenticated anyone): a token issued for that request was
     * decided on what came after the revocation, and says so (`sub_revoked_at`).
     */
    knownRevocation(subject: string, seen: number): number | undefined {
      const entry = maps.subject.get(subject);
      return entry && entry.seq > 0 && entry.seq <= seen ? entry.revokedAt : undefined;
    },
    /**
     * True when a token with these claims was revoked: its jti, its session, or its subject since it
     * was issued — or before its settling time ran out (REVOCATION_SETTLE_MS after this instance
     * heard of it), unless the token shows its issuer knew of that revocation (`sub_revoked_at`).
     */
    isRevoked(claims: {
      jti?: string;
      sid?: string;
      sub?: string;
      iat?: number;
      sub_revoked_at?: unknown;
    }): boolean {
      if (claims.jti && maps.jti.has(claims.jti)) return true;
      if (claims.sid && maps.session.has(claims.sid)) return true;
      if (claims.sub) {
        const subject = maps.subject.get(claims.sub);
        // When it was issued: to the millisecond from a version 7 jti; else from iat, whose one-second
        // resolution revokes a token issued in the second of the revocation too.
        if (subject) {
          const issuedMs = (claims.jti ? uuidV7Ms(claims.jti) : undefined) ?? (claims.iat ?? 0) * 1000;
          if (issuedMs <= subject.revokedAt) return true;
          const knew =
            typeof claims.sub_revoked_at === 'number' && claims.sub_revoked_at >= subject.revokedAt;
          if (!knew && issuedMs <= subject.settleUntil) return true;
        }
      }
      return false;
    },
    size: () => maps.jti.size + maps.session.size + maps.subject.size,
  };
}

export type RevocationList = ReturnType<typeof createRevocationList>;
