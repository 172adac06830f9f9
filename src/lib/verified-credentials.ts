import { hash } from 'node:crypto';
import { LRUCache } from 'lru-cache';

/**
 * Credentials (client secrets, API keys) already checked against their stored HMAC, remembered by
 * the SHA-256 of the credential — never the credential itself — for a short while, so a service that
 * presents the same credential on every request costs one SHA-256 and a map lookup instead of a parse,
 * a checksum, an HMAC and constant-time comparisons. Looking up a digest of a 256-bit random secret
 * reveals nothing a timing attacker could use.
 *
 * What is remembered is only "this credential is the current (or previous) secret of X"; the caller
 * still checks X's state (revoked, expired, disabled, grace over) on every use. Entries of X are
 * dropped when X changes, and an answer that was being computed while a change came in is not
 * remembered (the generation check), so a rotation or revocation is never outlived.
 *
 * `stored`, when given, is X's stored hash the credential matched: the caller compares it with X's
 * row as it reads it now, so a secret changed without this instance hearing of it (a lost
 * notification) stops when the row's own cache entry ages out, not when this entry does.
 */
export interface VerifiedCredentials {
  /** The cache key of a credential: the SHA-256 of its parts. */
  keyOf(...parts: string[]): string;
  /** Whose credential this is, when it was verified and is still remembered. */
  get(
    key: string,
    nowMs: number,
  ): { owner: string; previous: boolean; stored: string | undefined } | undefined;
  /** The generation to pass to `remember` — read it before reading the owner's row. */
  readonly generation: number;
  /** `endsAtMs`: when the credential stops working by itself (a previous secret's grace). */
  remember(
    key: string,
    entry: {
      owner: string;
      previous: boolean;
      endsAtMs?: number | undefined;
      stored?: string | undefined;
    },
    generation: number,
    nowMs: number,
  ): void;
  /** Drops everything remembered for an owner (its secrets changed, it was disabled or deleted). */
  forget(owner: string): void;
  clear(): void;
}

type Entry = { owner: string; previous: boolean; validUntilMs: number; stored: string | undefined };

export function createVerifiedCredentials(options: { max: number; ttlMs: number }): VerifiedCredentials {
  /**
   * The keys remembered for each owner, so `forget` costs the owner's own entries: it runs once per
   * changed credential on every instance (a user's deletion revokes each of their keys), and a scan of
   * the whole cache per event held the event loop for seconds when one owner had thousands.
   */
  const byOwner = new Map<string, Set<string>>();
  const unindex = (owner: string, key: string) => {
    const keys = byOwner.get(owner);
    if (keys?.delete(key) && keys.size === 0) byOwner.delete(owner);
  };
  const entries = new LRUCache<string, Entry>({
    max: options.max,
    // Whatever drops an entry (eviction, replacement, expiry on read, `forget`, `clear`) drops it from
    // its owner's set too. Not called on a read that finds a live entry.
    dispose: (entry, key) => unindex(entry.owner, key),
  });
  let generation = 0;
  return {
    keyOf: (...parts) => hash('sha256', parts.join('\n'), 'base64'),
    get(key, nowMs) {
      const entry = entries.get(key);
      if (!entry) return undefined;
      if (entry.validUntilMs <= nowMs) {
        entries.delete(key);
        return undefined;
      }
      return entry;
    },
    get generation() {
      return generation;
    },
    remember(key, entry, at, nowMs) {
      if (at !== generation) return;
      const validUntilMs = Math.min(entry.endsAtMs ?? Number.POSITIVE_INFINITY, nowMs + options.ttlMs);
      entries.set(key, { owner: entry.owner, previous: entry.previous, validUntilMs, stored: entry.stored });
      const keys = byOwner.get(entry.owner);
      if (keys) keys.add(key);
      else byOwner.set(entry.owner, new Set([key]));
    },
    forget(owner) {
      generation++;
      const keys = byOwner.get(owner);
      if (!keys) return;
      byOwner.delete(owner);
      for (const key of keys) entries.delete(key);
    },
    clear() {
      generation++;
      entries.clear();
      byOwner.clear();
    },
  };
}
