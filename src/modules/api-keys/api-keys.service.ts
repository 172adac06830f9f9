import type { Logger } from 'pino';
import type { Database, Executor } from '../../db/client.js';
import { addSeconds, type Clock } from '../../lib/clock.js';
import { API_KEY_FORMAT, digestsEqual, generateSecret, keyedHash, parseSecret } from '../../lib/crypto.js';
import { AppError, type FieldError, forbidden, invalidFields, notFound, notYours } from '../../lib/errors.js';
import { assertNoGraceRunning } from '../../lib/rotation.js';
import { credentialNoLongerStands } from '../../plugins/authenticate.js';
import { type AuthEvent, type EventBus, inTransaction } from '../../lib/events.js';
import { decodeCursor, paginate } from '../../lib/pagination.js';
import { hasPermission, intersectPermissions, notHeld } from '../../lib/permissions.js';
import type { FailureCounter } from '../../lib/throttle.js';
import { createReadThroughCache } from '../../lib/read-through-cache.js';
import { createVerifiedCredentials } from '../../lib/verified-credentials.js';
import {
  type AuditService,
  changedFields,
  effectivePatch,
  type RequestContext,
} from '../audit/audit.service.js';
import { type GrantCeiling, GrantRefused, type Grantor } from '../roles/grant-ceiling.js';
import { createOwnerStates, type OwnerState } from '../users/owner-states.js';
import type { UsersRepository } from '../users/users.repository.js';
import type { ApiKeyPatch, ApiKeyRow, ApiKeysRepository } from './api-keys.repository.js';
import { MAX_PRESENTED_KEY_LENGTH } from './api-keys.schema.js';

/** Who asks: the request's principal, reduced to what the rules look at. */
export interface ApiKeyActor {
  /** The user the request speaks for; undefined for a service (client-credentials) principal. */
  userId: string | undefined;
  /**
   * The API key the request was authenticated with, if it was; `previous` when with the secret a
   * rotation replaced, in its grace; `secretHash`, the stored hash of the secret it came with.
   */
  key?: { id: string; expiresAt: Date | null; previous: boolean; secretHash: string };
  /**
   * The request's principal: its `permissions` decide what it may see and change; what it may grant
   * is what it holds now (roles/grant-ceiling.ts).
   */
  grantor: Grantor;
}

export type InvalidReason = 'not_found' | 'expired' | 'revoked' | 'owner_disabled';

export type Verification =
  | {
      valid: true;
      key: ApiKeyRow;
      scopes: string[];
      /** Presented with the secret a rotation replaced, in its grace. */
      previous: boolean;
    }
  | { valid: false; reason: InvalidReason };

export interface ApiKeysServiceDeps {
  db: Database;
  repo: ApiKeysRepository;
  users: UsersRepository;
  audit: AuditService;
  events: EventBus;
  grants: GrantCeiling;
  clock: Clock;
  logger: Logger;
  pepper: Buffer;
  /** The most live (unrevoked, unexpired) keys an owner may have (MAX_API_KEYS_PER_USER). */
  maxPerOwner: number;
  /** Cache bounds; the TTL is only a backstop, since every change invalidates by event. */
  cache?: { max?: number; maxAbsent?: number; ttlMs?: number };
  /** How often buffered last-use times are written (API.md: not a write per request). */
  flushIntervalMs?: number;
  /**
   * Keys their holder presented that named no key, per client address (`verifyPresented`): past
   * API_KEY_MAX_FAILURES_PER_IP_PER_MINUTE, 429. Without it nothing is counted.
   */
  unknownKeysByAddress?: FailureCounter;
}

const DEFAULT_CACHE_MAX = 10_000;
/** Lookup ids with no key, kept apart so that made-up keys cannot push real ones out. */
const DEFAULT_ABSENT_MAX = 1_000;
const DEFAULT_CACHE_TTL_MS = 5_000;
const DEFAULT_FLUSH_INTERVAL_MS = 60_000;

/**
 * When the string a valid verification was made with stops working, for whoever caches the answer
 * (the verify route's `expires_at`, introspection's `exp`): the key's expiry (null: never), or, for
 * the secret a rotation replaced, the end of its grace when that comes first.
 */
export function presentedExpiresAt(key: ApiKeyRow, previous: boolean): Date | null {
  const { expiresAt, previousSecretExpiresAt: graceEnds } = key;
  return previous && graceEnds && (!expiresAt || graceEnds < expiresAt) ? graceEnds : expiresAt;
}

/**
 * When the secret a valid verification was made with was issued (introspection's `iat`): the current
 * secret at the key's creation or its last rotation, the one a rotation replaced when that one was
 * issued. A key made, or a secret replaced, before this was recorded (migration 0017) answers the key's
 * creation: never later than the truth.
 */
export function presentedIssuedAt(key: ApiKeyRow, previous: boolean): Date {
  return (previous ? key.previousSecretIssuedAt : key.secretIssuedAt) ?? key.createdAt;
}

const invalid = (reason: InvalidReason): Verification => ({ valid: false, reason });
const NOT_FOUND = invalid('not_found');

/**
 * API keys: `pak_<lookup id>_<secret><crc>`, stored as an HMAC of the secret under the server pepper.
 * Verification runs on every request of every service, so it is built to stay in memory: the
 * checksum refuses typos and foreign strings before any read, key rows and owners' permissions sit
 * in bounded LRUs invalidated by events from every instance, and last-use times are written in
 * batches.
 */
export function createApiKeysService(deps: ApiKeysServiceDeps) {
  const { repo, clock } = deps;
  const cacheOptions = {
    max: deps.cache?.max ?? DEFAULT_CACHE_MAX,
    ttlMs: deps.cache?.ttlMs ?? DEFAULT_CACHE_TTL_MS,
    clock,
  };
  // A lookup id with no key is cached too (undefined), so repeated unknown keys stay off the database,
  // but in an LRU of its own: well-formed keys with made-up lookup ids (anyone can compute the
  // checksum) would otherwise evict real keys' rows, each of which would then cost a read again.
  const keys = createReadThroughCache<ApiKeyRow | undefined>({
    ...cacheOptions,
    maxAbsent: deps.cache?.maxAbsent ?? DEFAULT_ABSENT_MAX,
    load: (lookupId) => repo.findByLookupId(lookupId),
  });
  const owners = createOwnerStates({ ...cacheOptions, users: deps.users });

  /** Last-use times (ms) waiting for the next flush, by key id. */
  const usage = new Map<string, number>();
  let flushing: Promise<void> | undefined;
  let timer: NodeJS.Timeout | undefined;

  const hash = (secret: string) => keyedHash(deps.pepper, secret);
  // Keys that matched, by digest: a key presented on every request costs no parse, checksum or HMAC.
  const verifiedKeys = createVerifiedCredentials({ max: 10_000, ttlMs: 60_000 });

  function invalidate(what: { lookupId?: string; all?: true }) {
    if (what.all) {
      keys.clear();
      verifiedKeys.clear();
    }
    if (what.lookupId) {
      keys.delete(what.lookupId);
      verifiedKeys.forget(what.lookupId);
    }
  }

  /**
   * Whether a remembered match holds for the key's row as read now: the stored hash the string matched
   * is still its current (or previous) one. A rotation this instance did not hear of (a notification
   * lost) is then honoured once the row's cache entry ages out (5 s, the documented backstop), not
   * only once the remembered match does (60 s). Both are strings of the cached row, so this costs an
   * equality test and nothing more.
   */
  const stillMatches = (row: ApiKeyRow, known: { previous: boolean; stored: string | undefined }) =>
    (known.previous ? row.previousSecretHash : row.secretHash) === known.stored;

  /** The key a presented string is the current or previous secret of, or undefined. */
  async function match(
    presented: string,
    now: number,
  ): Promise<{ row: ApiKeyRow; previous: boolean } | undefined> {
    const credential = verifiedKeys.keyOf(presented);
    const known = verifiedKeys.get(credential, now);
    if (known) {
      const row = await keys.get(known.owner);
      if (row && stillMatches(row, known)) return { row, previous: known.previous };
    }
    const generation = verifiedKeys.generation;
    const parsed = parseSecret(API_KEY_FORMAT, presented);
    if (!parsed) return undefined;
    const row = await keys.get(parsed.lookupId);
    if (!row) return undefined;
    const presentedHash = hash(parsed.secret);
    let previous = false;
    if (!digestsEqual(presentedHash, row.secretHash)) {
      if (!row.previousSecretHash || !digestsEqual(presentedHash, row.previousSecretHash)) return undefined;
      previous = true;
    }
    // Only "whose secret this is" is remembered; its state is checked on every use below.
    const stored = previous ? row.previousSecretHash! : row.secretHash;
    verifiedKeys.remember(credential, { owner: parsed.lookupId, previous, stored }, generation, now);
    return { row, previous };
  }

  /** What a matched key's own row says: revoked or expired (a rotated-out secret past its grace). */
  function refusal(row: ApiKeyRow, previous: boolean, now: number): Verification | undefined {
    if (row.revokedAt) return invalid('revoked');
    // A secret replaced by a rotation has expired once its grace is over.
    const rotatedOut =
      previous && (!row.previousSecretExpiresAt || row.previousSecretExpiresAt.getTime() <= now);
    if (rotatedOut || (row.expiresAt && row.expiresAt.getTime() <= now)) return invalid('expired');
    return undefined;
  }

  // A key's answer is made once per pair of its cached row and its owner's cached state, and shared,
  // frozen, by every use until either is reloaded (a change drops them from their caches, and neither
  // is ever changed in place); the API-key answer of the verify route is derived from it once, too.
  const acceptedBy = new WeakMap<
    ApiKeyRow,
    { owner: OwnerState; current: Verification; previous: Verification }
  >();
  function accept(row: ApiKeyRow, owner: OwnerState, now: number, previous: boolean): Verification {
    if (!owner.active) return invalid('owner_disabled');
    usage.set(row.id, now);
    let accepted = acceptedBy.get(row);
    if (accepted?.owner !== owner) {
      const scopes = Object.freeze(intersectPermissions(row.scopes, owner.permissions)) as string[];
      const result = (previous: boolean): Verification =>
        Object.freeze({ valid: true, key: row, scopes, previous });
      accepted = { owner, current: result(false), previous: result(true) };
      acceptedBy.set(row, accepted);
    }
    return previous ? accepted.previous : accepted.current;
  }

  /**
   * The verification of a key presented before, when everything it needs is in memory (the digest it
   * matched, its row, its owner): no wait and no promise, for a key sent on every request. Undefined
   * when anything must be read, checked or parsed; `verify` answers that.
   */
  function verifyCached(presented: string): Verification | undefined {
    const now = clock.nowMs();
    const known = verifiedKeys.get(verifiedKeys.keyOf(presented), now);
    const row = known && keys.peek(known.owner)?.value;
    if (!known || !row || !stillMatches(row, known)) return undefined;
    const refused = refusal(row, known.previous, now);
    if (refused) return refused;
    const owner = owners.peek(row.ownerId);
    return owner && accept(row, owner, now, known.previous);
  }

  /**
   * Whether the string is a key in use here: one this instance matched to a key's secret within the
   * last minute (by its digest: one SHA-256), or one whose lookup id names a key whose row is in
   * memory (its verification then reads nothing). A throttle of keys that name no key lets these
   * through, so that others' made-up keys from the same address do not stop a key in use. Says nothing
   * of the key's state or its secret; `verify` still decides.
   */
  function inUse(presented: string): boolean {
    if (presented.length > MAX_PRESENTED_KEY_LENGTH) return false;
    if (verifiedKeys.get(verifiedKeys.keyOf(presented), clock.nowMs())) return true;
    const parsed = parseSecret(API_KEY_FORMAT, presented);
    return !!parsed && !!keys.peek(parsed.lookupId)?.value;
  }

  async function verify(presented: string): Promise<Verification> {
    if (presented.length > MAX_PRESENTED_KEY_LENGTH) return NOT_FOUND;
    const cached = verifyCached(presented);
    if (cached) return cached;
    const now = clock.nowMs();
    const matched = await match(presented, now);
    // Without the secret, nothing about the key's state is revealed.
    if (!matched) return NOT_FOUND;
    const { row } = matched;
    const refused = refusal(row, matched.previous, now);
    if (refused) return refused;
    return accept(row, await owners.get(row.ownerId), now, matched.previous);
  }

  /**
   * `verify` for a key its holder presents (a request's credential, a key revoked at /oauth/revoke),
   * from `address` (lib/client-address.ts). A key that names no key (`not_found`: made up, mistyped,
   * malformed, a wrong secret) is counted against the address: a made-up lookup id is new to every
   * cache, so each may cost a database read. Past API_KEY_MAX_FAILURES_PER_IP_PER_MINUTE in a minute
   * the address gets 429 before anything is read, except for a key in use here (`inUse`), so one
   * client's made-up keys do not stop another's behind the same address. Valid, revoked and expired
   * keys never count. Not for a key a service verifies for its own clients (the verify endpoint,
   * introspection): the address there is the service's. The check is a read of this instance's
   * memory; a key whose answer is in memory is answered before it (`verifyCached`).
   */
  async function verifyPresented(presented: string, address: string): Promise<Verification> {
    const failures = deps.unknownKeysByAddress;
    if (!failures) return verify(presented);
    const wait = failures.retryAfterNow?.(address) ?? (await failures.retryAfter(address));
    if (wait > 0 && !inUse(presented)) {
      failures.refused?.();
      throw new AppError('rate_limited', {
        detail: `Too many API keys that name no key from this address; retry in ${wait} s`,
        headers: { 'retry-after': String(wait) },
      });
    }
    const result = await verify(presented);
    if (!result.valid && result.reason === 'not_found') await failures.recordFailure(address);
    return result;
  }

  async function flush(): Promise<void> {
    if (flushing) return flushing;
    if (usage.size === 0) return;
    const batch = [...usage].map(([id, at]) => ({ id, at: new Date(at) }));
    usage.clear();
    flushing = repo
      .touchLastUsed(batch)
      .catch((err: unknown) => {
        // Keep them for the next flush rather than lose them while the database is away.
        for (const u of batch) if ((usage.get(u.id) ?? 0) < u.at.getTime()) usage.set(u.id, u.at.getTime());
        deps.logger.warn({ err, keys: batch.length }, 'could not record API key use; will retry');
      })
      .finally(() => {
        flushing = undefined;
      });
    return flushing;
  }

  /** The row with this instance's not-yet-flushed use, so the owner sees their own latest call. */
  function withPendingUse(row: ApiKeyRow): ApiKeyRow {
    const pending = usage.get(row.id);
    if (pending === undefined || (row.lastUsedAt && row.lastUsedAt.getTime() >= pending)) return row;
    return { ...row, lastUsedAt: new Date(pending) };
  }

  /**
   * Another user's key is invisible (404, not 403) unless the actor holds `othersPermission`: the
   * missing key's answer, and an `authorization.denied` event for `action` (`notYours`), revoked or not.
   */
  function assertVisible(
    actor: ApiKeyActor,
    row: ApiKeyRow | undefined,
    othersPermission: string,
    action: string,
  ) {
    if (!row) throw notFound('API key');
    if (row.ownerId !== actor.userId && !hasPermission(actor.grantor.permissions, othersPermission))
      throw notYours('API key', { action, subjectId: row.id, data: { owner_id: row.ownerId } });
    if (row.revokedAt) throw notFound('API key');
    return row;
  }

  /**
   * Nobody grants what they do not hold: within what the actor holds now (not what their token said
   * when it was issued) and the owner's current permissions.
   */
  async function assertGrantable(actor: ApiKeyActor, ownerId: string, scopes: string[], tx: Executor) {
    await deps.grants.assertHolds(
      actor.grantor,
      scopes,
      tx,
      'The scopes go beyond the permissions of the caller',
    );
    const held = await deps.users.rolesAndPermissions(ownerId, tx);
    const beyondOwner = notHeld(scopes, held.permissions);
    if (beyondOwner.length > 0)
      throw new GrantRefused('The scopes go beyond the permissions of the key’s owner', beyondOwner);
  }

  /**
   * What a key with `scopes` gives now: the scopes within its owner's current permissions (read on
   * `tx`), as every use limits it. What a caller must hold to give the key a new secret or a longer life.
   */
  async function givenNow(scopes: readonly string[], ownerId: string, tx: Executor) {
    const owner = await deps.users.rolesAndPermissions(ownerId, tx);
    return intersectPermissions(scopes, owner.permissions);
  }

  /**
   * What only a key's owner may do to it: take a new secret (it is the owner's identity), widen its
   * scopes or lengthen its life. A key's self-scoped permissions (`account:*`, `api_keys:own`) mean its
   * owner's account, so another caller "holding" them proves nothing; api_keys:write reaches another
   * user's key to see, rename, narrow, shorten or revoke it. 403 otherwise.
   */
  function assertOwner(actor: ApiKeyActor, row: ApiKeyRow, what: string) {
    if (row.ownerId !== actor.userId)
      throw forbidden(
        `Only the key’s owner can ${what}; api_keys:write lets others rename, narrow, shorten or revoke it`,
      );
  }

  /**
   * When `row`, read in the change's transaction (locked, so a rotation either waits for the change
   * or has committed), is the key the request was authenticated with: it still holds the secret the
   * request came with, as it came with it (current, or in a grace the replaced one), compared as
   * `stillMatches` compares a remembered match. A rotation that committed while the request ran, or
   * that the change waited for, made it the replaced one (or ended it): what the request was allowed
   * as the current secret it is no longer allowed, so nothing is made, rotated or changed with it;
   * a 401, as the secret gets from then on for what only the current one may do. Another key's row
   * says nothing of the request's secret.
   */
  function assertSecretStands(actor: ApiKeyActor, row: ApiKeyRow) {
    if (!actor.key || actor.key.id !== row.id) return;
    if (!stillMatches(row, { previous: actor.key.previous, stored: actor.key.secretHash }))
      throw credentialNoLongerStands(
        'The API key’s secret was replaced by a rotation while this request ran',
      );
  }

  /**
   * `row`, the key the request was authenticated with as read (locked) in the change's transaction,
   * still stands: neither revoked nor expired while the request ran, and, with `secret`, still with
   * the secret the request came with (`assertSecretStands`). A 401 with its challenge otherwise, saying
   * which, whatever the change and whichever key it is made to: the answer of a credential that no
   * longer stands, not the 404 of a key that is gone. Nothing when the request came with no key.
   */
  function assertActingKeyStands(actor: ApiKeyActor, row: ApiKeyRow | undefined, secret = true) {
    if (!actor.key) return;
    if (!row || row.revokedAt)
      throw credentialNoLongerStands('The API key was revoked while this request ran');
    if (hasExpired(row)) throw credentialNoLongerStands('The API key expired while this request ran');
    if (secret) assertSecretStands(actor, row);
  }

  /**
   * For a change to key `id` made with another key (one that minted it, or a sibling, or any it may
   * manage): that key's row, share-locked in `tx` as a creation holds it, so that a rotation or
   * revocation of it either waits for the change or has committed and is read here. Rows are taken
   * as every change here takes them, a key before the keys it minted (and theirs): the acting key is
   * held `before` when it is an ancestor of `id` (read now, before `id`'s parent and `id`), and
   * otherwise `after` `id` is held (a descendant of `id`, which the change may reach, or a key of
   * another line). `after(row)` answers the acting key's row: `row` itself (`id`'s, or undefined)
   * when the request came with no other key.
   */
  async function holdActingKey(actor: ApiKeyActor, id: string, tx: Executor) {
    const other = actor.key && actor.key.id !== id ? actor.key.id : undefined;
    const before =
      other && (await repo.isAncestor(other, id, tx)) ? await repo.findByIdForShare(other, tx) : undefined;
    const after = async (row: ApiKeyRow | undefined) =>
      other ? (before ?? (await repo.findByIdForShare(other, tx))) : row;
    return { before, other: other !== undefined, after };
  }

  /**
   * A request authenticated by a key that expires cannot give any key a longer life (nor none): a
   * leaked key could otherwise outlive itself. 403 otherwise.
   */
  function assertWithinCallerLife(
    actor: ApiKeyActor,
    expiresAt: Date | null,
    limit: Date | null | undefined = actor.key?.expiresAt,
  ) {
    if (!limit || (expiresAt && expiresAt.getTime() <= limit.getTime())) return;
    throw forbidden(
      `The calling API key expires at ${limit.toISOString()}: a key it creates or changes must expire by then`,
    );
  }

  /**
   * A key minted by a key (`parent_id`) stays within it, as when it was made: a new expiry later than
   * its parent's (or none where the parent has one), or a new scope its current ones do not cover and
   * its parent's do not either, is a 400 naming the field, whoever asks (the parent, read on `tx`).
   * A shortening or a narrowing is never refused.
   */
  function assertWithinParent(parent: ApiKeyRow, current: ApiKeyRow, patch: ApiKeyPatch) {
    const errors: FieldError[] = [];
    if (
      patch.expiresAt !== undefined &&
      outlives(patch.expiresAt, current.expiresAt) &&
      outlives(patch.expiresAt, parent.expiresAt)
    )
      errors.push({
        field: 'body.expires_at',
        message: `must be no later than the expiry of the key that minted this one (parent_id), ${parent.expiresAt!.toISOString()}`,
      });
    const widened = patch.scopes?.filter((scope) => !hasPermission(current.scopes, scope)) ?? [];
    const beyond = notHeld(widened, parent.scopes);
    if (beyond.length > 0)
      errors.push({
        field: 'body.scopes',
        message: `go beyond the scopes of the key that minted this one (parent_id): ${beyond.join(', ')}`,
      });
    if (errors.length > 0)
      throw new AppError('validation_failed', {
        detail: 'A key minted by a key cannot outlive it nor hold a scope it lacks',
        errors,
      });
  }

  const hasExpired = (key: ApiKeyRow) => key.expiresAt !== null && key.expiresAt.getTime() <= clock.nowMs();
  const expiredKey = (error?: { field: string; message: string }) =>
    new AppError('conflict', {
      detail: 'The key has expired, and an expired key stays expired: create a new one',
      ...(error ? { errors: [error] } : {}),
    });

  /** True when an expiry of `next` ends later than `previous` (null: never). */
  const outlives = (next: Date | null, previous: Date | null) =>
    previous !== null && (next === null || next.getTime() > previous.getTime());

  function assertFuture(expiresAt: Date | null | undefined) {
    if (expiresAt && expiresAt.getTime() <= clock.nowMs()) {
      throw new AppError('validation_failed', {
        detail: 'expires_at must be in the future',
        errors: [{ field: 'body.expires_at', message: 'must be in the future' }],
      });
    }
  }

  const changed = (row: ApiKeyRow): AuthEvent => ({ type: 'api_key_changed', lookupId: row.lookupId });
  const unique = (scopes: string[]) => [...new Set(scopes)].sort();
  const sameScopes = (a: readonly string[], b: readonly string[]) =>
    a.length === b.length && unique([...a]).join(' ') === unique([...b]).join(' ');

  /**
   * After the scopes of key `id` changed to `scopes`: every live (unrevoked, unexpired) key descended
   * from it keeps only what `scopes` cover (their intersection, `users:*` to `users:read`), in `tx`. A
   * key that would be left with nothing is revoked instead, with the keys it minted (and theirs): a
   * key that may do nothing still verifies as valid for its owner. A key that had no scopes to begin
   * with is left as it is. Passes until one finds nothing to change: a pass that waited for a creation
   * under one of them (which holds its parent) does not see the key made; the next pass does, and a
   * creation that comes later is within its parent's new scopes (the grant ceiling reads them).
   */
  async function narrowDescendants(id: string, scopes: readonly string[], now: Date, tx: Executor) {
    const narrowed = new Map<string, { row: ApiKeyRow; previousScopes: string[] }>();
    const revoked: ApiKeyRow[] = [];
    const within = (key: ApiKeyRow) => intersectPermissions(key.scopes, scopes);
    const wider = (key: ApiKeyRow) => !sameScopes(within(key), key.scopes);
    for (;;) {
      const found = (await repo.liveDescendants(id, now, tx)).filter(wider);
      if (found.length === 0) break;
      // Decided on each as it is once locked (a concurrent change to it has committed by then).
      const locked = (
        await repo.findUnrevokedForUpdate(
          found.map((key) => key.id),
          tx,
        )
      ).filter(wider);
      const emptied = new Set(locked.filter((key) => within(key).length === 0).map((key) => key.id));
      if (emptied.size > 0) {
        revoked.push(...(await repo.revokeMany([...emptied], now, tx)));
        for (;;) {
          const pass = await repo.revokeDescendants([...emptied], now, tx);
          if (pass.length === 0) break;
          revoked.push(...pass);
        }
      }
      // The rest in one statement; any just revoked with an emptied ancestor is left out there.
      const before = new Map(locked.map((key) => [key.id, key.scopes]));
      const rows = await repo.setScopes(
        locked.filter((key) => !emptied.has(key.id)).map((key) => ({ id: key.id, scopes: within(key) })),
        now,
        tx,
      );
      for (const row of rows)
        narrowed.set(row.id, {
          row,
          previousScopes: narrowed.get(row.id)?.previousScopes ?? before.get(row.id)!,
        });
    }
    return { narrowed: [...narrowed.values()], revoked };
  }

  return {
    verify,
    verifyCached,
    verifyPresented,

    async create(
      actor: ApiKeyActor,
      input: { name: string; scopes: string[]; expiresAt?: Date | undefined },
      context: RequestContext,
    ): Promise<{ row: ApiKeyRow; key: string }> {
      const ownerId = actor.userId;
      if (!ownerId) throw forbidden('API keys belong to users; a service principal cannot own one');
      const scopes = unique(input.scopes);
      assertFuture(input.expiresAt);
      const { token, lookupId, secret } = generateSecret(API_KEY_FORMAT);
      const refused = { action: 'api_key.create', subjectId: ownerId, data: { scopes } };
      const row = await deps.grants.audited(context, refused, () =>
        inTransaction(deps.db, deps.events, async (tx, emit) => {
          // A replaced secret in its grace is for the switch-over, not for minting: a key made with it
          // would outlive the rotation meant to cut a leaked secret off.
          if (actor.key?.previous)
            throw forbidden('The secret a rotation replaced cannot create keys; use the new secret');
          const now = clock.now();
          // Made by a key: that key, locked, is still live. A revocation racing this either waits and
          // then revokes the new key with its parent, or has committed and this one is refused; so
          // does a change to its expiry, which then brings the new key to it, or has committed and is
          // read here.
          let parent: ApiKeyRow | undefined;
          if (actor.key) {
            parent = await repo.findByIdForShare(actor.key.id, tx);
            // And still with the secret the request came with: a rotation meant to cut off a leaked
            // secret must not leave a key it made behind.
            assertActingKeyStands(actor, parent);
          }
          // Created by a key: it expires with its parent (as the locked row has it, not as the request
          // found it) unless told sooner, and is revoked with it.
          const expiresAt = input.expiresAt ?? parent?.expiresAt ?? null;
          assertWithinCallerLife(actor, expiresAt, parent?.expiresAt);
          await assertGrantable(actor, ownerId, scopes, tx);
          // Creations for one owner take turns from here to their commit, so two at the limit cannot
          // both count the same keys and both go in.
          await repo.lockCreationFor(ownerId, tx);
          if ((await repo.countLiveOfOwner(ownerId, now, deps.maxPerOwner, tx)) >= deps.maxPerOwner) {
            throw new AppError('conflict', {
              detail: `This account has ${deps.maxPerOwner} live API keys, the most one may have: revoke one before creating another`,
            });
          }
          const created = await repo.insert(
            {
              lookupId,
              ownerId,
              name: input.name,
              secretHash: hash(secret),
              prefix: `${API_KEY_FORMAT.prefix}_${lookupId}`,
              lastFour: token.slice(-4),
              scopes,
              expiresAt,
              parentId: actor.key?.id ?? null,
              secretIssuedAt: now,
              createdAt: now,
              updatedAt: now,
            },
            tx,
          );
          await deps.audit.record(tx, context, {
            type: 'api_key.created',
            subjectId: created.id,
            data: {
              owner_id: ownerId,
              name: created.name,
              prefix: created.prefix,
              scopes,
              expires_at: created.expiresAt?.toISOString() ?? null,
              ...(created.parentId ? { parent_id: created.parentId } : {}),
            },
          });
          // Another instance may have cached this lookup id as unknown.
          emit(changed(created));
          return created;
        }),
      );
      return { row, key: token };
    },

    /**
     * An owner's live keys (unrevoked, unexpired), oldest first; with `includeExpired`, their expired
     * keys too, which `get` still answers. Revoked keys are never listed.
     */
    async list(
      actor: ApiKeyActor,
      query: {
        ownerId?: string | undefined;
        limit: number;
        cursor?: string | undefined;
        includeExpired?: boolean | undefined;
      },
    ): Promise<{ rows: ApiKeyRow[]; nextCursor: string | null }> {
      const ownerId = query.ownerId ?? actor.userId;
      if (!ownerId)
        throw invalidFields([
          { field: 'query.owner_id', message: 'is required of a service principal, which owns no keys' },
        ]);
      if (ownerId !== actor.userId && !hasPermission(actor.grantor.permissions, 'api_keys:read'))
        throw forbidden('Listing another user’s keys needs the permission api_keys:read');
      const rows = await repo.listUnrevokedByOwner(ownerId, {
        limit: query.limit,
        cursor: decodeCursor(query.cursor),
        liveAt: query.includeExpired ? undefined : clock.now(),
      });
      const { page, nextCursor } = paginate(rows, query.limit);
      return { rows: page.map(withPendingUse), nextCursor };
    },

    async get(actor: ApiKeyActor, id: string): Promise<ApiKeyRow> {
      return withPendingUse(assertVisible(actor, await repo.findById(id), 'api_keys:read', 'api_key.read'));
    },

    async update(
      actor: ApiKeyActor,
      id: string,
      input: {
        name?: string | undefined;
        scopes?: string[] | undefined;
        expiresAt?: Date | null | undefined;
      },
      context: RequestContext,
    ): Promise<ApiKeyRow> {
      assertFuture(input.expiresAt);
      const row = await deps.grants.audited(context, { action: 'api_key.update', subjectId: id }, () =>
        inTransaction(deps.db, deps.events, async (tx, emit) => {
          // Changed with a key, itself or another: that key (held before the parent when it is an
          // ancestor of the key changed, after the key otherwise) still stands, with the secret the
          // request came with still the one it came as.
          const acting = await holdActingKey(actor, id, tx);
          // A new expiry or scopes for a key minted by a key are bounded by its parent (`parent_id`,
          // which never changes), held first (shared) as a creation holds it, then the key: a change to
          // the parent's expiry either waits for this one and then brings the key to it, or has
          // committed and is read here.
          const bounded = input.expiresAt !== undefined || input.scopes !== undefined;
          const parentId = bounded ? (await repo.findById(id, tx))?.parentId : null;
          const parent = !parentId
            ? undefined
            : parentId === acting.before?.id
              ? acting.before
              : await repo.findByIdForShare(parentId, tx);
          const found = await repo.findByIdForUpdate(id, tx);
          assertActingKeyStands(actor, await acting.after(found));
          const current = assertVisible(actor, found, 'api_keys:write', 'api_key.update');
          const requested: ApiKeyPatch = {};
          if (input.name !== undefined) requested.name = input.name;
          if (input.expiresAt !== undefined) requested.expiresAt = input.expiresAt;
          if (input.scopes !== undefined) requested.scopes = unique(input.scopes);
          // What is already so is no change: nothing written, no event, nothing granted.
          const patch = effectivePatch(requested, current);
          if (changedFields(patch).length === 0) return current;
          // Expiry is final: an expired secret found in an old log or backup stays harmless. Its name
          // may still change; what it would give, or until when, may not.
          if (hasExpired(current)) {
            const field =
              patch.expiresAt !== undefined
                ? 'expires_at'
                : patch.scopes !== undefined
                  ? 'scopes'
                  : undefined;
            if (field)
              throw expiredKey({ field: `body.${field}`, message: 'cannot change once the key has expired' });
          }
          // Wider: a scope the key's current ones do not cover (`users:*` to `users:read` is narrower).
          if (patch.scopes?.some((scope) => !hasPermission(current.scopes, scope)))
            assertOwner(actor, current, 'widen its scopes');
          if (patch.expiresAt !== undefined) {
            assertWithinCallerLife(actor, patch.expiresAt);
            // A longer life is access granted anew: the owner's, and for a caller who holds what the
            // key gives, as for a rotation.
            if (outlives(patch.expiresAt, current.expiresAt)) {
              assertOwner(actor, current, 'lengthen its life');
              await deps.grants.assertHolds(
                actor.grantor,
                await givenNow(patch.scopes ?? current.scopes, current.ownerId, tx),
                tx,
                'Extending the life of a key needs the permissions it gives',
              );
            }
          }
          if (patch.scopes !== undefined) await assertGrantable(actor, current.ownerId, patch.scopes, tx);
          // Nor past the key that minted it, whoever asks.
          if (parent) assertWithinParent(parent, current, patch);
          const now = clock.now();
          const updated = (await repo.update(id, patch, now, tx))!;
          // The keys it minted (and theirs) expire no later than it: those that would outlive its new
          // expiry are brought to it. Passes until one finds none: a pass that waited for a creation
          // under one of them (which holds its parent) does not see the key made; the next pass does,
          // and a creation that comes later reads its parent's new expiry.
          const cascaded = new Map<string, { row: ApiKeyRow; expiry: boolean; previousScopes?: string[] }>();
          if (patch.expiresAt) {
            for (;;) {
              const pass = await repo.capDescendantsExpiry(id, patch.expiresAt, now, tx);
              if (pass.length === 0) break;
              for (const row of pass) cascaded.set(row.id, { row, expiry: true });
            }
          }
          // Nor hold a scope it no longer has: narrowing a key narrows them to what it keeps, and revokes
          // those left with nothing (narrowDescendants). Never widened with it.
          const { narrowed, revoked } = patch.scopes
            ? await narrowDescendants(id, patch.scopes, now, tx)
            : { narrowed: [], revoked: [] };
          for (const { row, previousScopes } of narrowed)
            cascaded.set(row.id, { row, expiry: cascaded.has(row.id), previousScopes });
          await deps.audit.record(tx, context, [
            {
              type: 'api_key.updated',
              subjectId: id,
              data: {
                owner_id: current.ownerId,
                prefix: current.prefix,
                changed: changedFields(patch),
                ...(patch.scopes ? { scopes: patch.scopes, previous_scopes: current.scopes } : {}),
                ...(patch.expiresAt !== undefined
                  ? { expires_at: patch.expiresAt?.toISOString() ?? null }
                  : {}),
              },
            },
            ...[...cascaded.values()].map(({ row: child, expiry, previousScopes }) => ({
              type: 'api_key.updated' as const,
              subjectId: child.id,
              data: {
                owner_id: child.ownerId,
                prefix: child.prefix,
                changed: [...(expiry ? ['expires_at'] : []), ...(previousScopes ? ['scopes'] : [])],
                ...(previousScopes ? { scopes: child.scopes, previous_scopes: previousScopes } : {}),
                ...(expiry ? { expires_at: child.expiresAt?.toISOString() ?? null } : {}),
                with_ancestor: id,
              },
            })),
            ...revoked.map((child) => ({
              type: 'api_key.revoked' as const,
              subjectId: child.id,
              data: {
                owner_id: child.ownerId,
                prefix: child.prefix,
                with_ancestor: id,
                reason: 'scopes_narrowed',
              },
            })),
          ]);
          emit(changed(updated));
          for (const { row: child } of cascaded.values()) emit(changed(child));
          for (const child of revoked) emit(changed(child));
          return updated;
        }),
      );
      return withPendingUse(row);
    },

    async revoke(actor: ApiKeyActor, id: string, context: RequestContext): Promise<void> {
      await inTransaction(deps.db, deps.events, async (tx, emit) => {
        const acting = await holdActingKey(actor, id, tx);
        const found = await repo.findByIdForUpdate(id, tx);
        // Revoked with a key: that key still stands; and, revoking another key (one it minted, a
        // sibling), still with the secret the request came with, as for a change. A key revoking
        // itself may do so with a secret a rotation replaced meanwhile: that only takes away (both
        // secrets and the keys it minted), as the replaced secret may in its grace anyway.
        assertActingKeyStands(actor, await acting.after(found), acting.other);
        const current = assertVisible(actor, found, 'api_keys:write', 'api_key.revoke');
        const now = clock.now();
        const revoked = (await repo.update(id, { revokedAt: now }, now, tx))!;
        // The keys it minted (and theirs) go with it: a leaked key cannot outlive its revocation.
        // Passes until one finds none, as for an expiry: a pass that waited for a creation under one
        // of them (which holds its parent) does not see the key made; the next pass does, and a
        // creation that comes later finds its parent revoked.
        const descendants: ApiKeyRow[] = [];
        for (;;) {
          const pass = await repo.revokeDescendants(id, now, tx);
          if (pass.length === 0) break;
          descendants.push(...pass);
        }
        // One insert for all their events, however many keys the line holds (as an owner's are).
        await deps.audit.record(tx, context, [
          {
            type: 'api_key.revoked',
            subjectId: id,
            data: { owner_id: current.ownerId, prefix: current.prefix },
          },
          ...descendants.map((child) => ({
            type: 'api_key.revoked' as const,
            subjectId: child.id,
            data: { owner_id: child.ownerId, prefix: child.prefix, with_ancestor: id },
          })),
        ]);
        emit(changed(revoked));
        for (const child of descendants) emit(changed(child));
      });
    },

    /**
     * A new secret under the same lookup id; the old one keeps verifying until the grace ends and
     * then answers `expired`. A second rotation within that grace is refused unless forced
     * (lib/rotation.ts), since it would end the first one's old secret.
     */
    async rotate(
      actor: ApiKeyActor,
      id: string,
      graceSeconds: number,
      context: RequestContext,
      force = false,
    ): Promise<{ row: ApiKeyRow; key: string }> {
      return deps.grants.audited(context, { action: 'api_key.rotate', subjectId: id }, () =>
        inTransaction(deps.db, deps.events, async (tx, emit) => {
          const found = await repo.findByIdForUpdate(id, tx);
          // A key rotating itself that was revoked or expired, or whose secret a rotation replaced,
          // while this request ran (or that this one waited for): a 401, as for any change made with
          // it, not the 404 of a key that is gone nor the 409 of a session rotating an expired key. A
          // leaked secret queued behind the owner's rotation would otherwise take the new secret it made.
          if (actor.key?.id === id) assertActingKeyStands(actor, found);
          const current = assertVisible(actor, found, 'api_keys:write', 'api_key.rotate');
          assertOwner(actor, current, 'rotate it');
          // A key rotates only itself, and only with its current secret: a leaked key that rotated a
          // sibling, or a replaced secret in its grace that rotated again, would hold the only working
          // secret, and revoking the leaked one would not end it.
          if (actor.key && actor.key.id !== current.id)
            throw forbidden('An API key can rotate only itself; rotate another key from a signed-in session');
          if (actor.key?.previous)
            throw forbidden('The secret a rotation replaced cannot rotate the key again; use the new secret');
          // A new secret for an expired key would be dead on arrival.
          if (hasExpired(current)) throw expiredKey();
          assertNoGraceRunning(
            { hash: current.previousSecretHash, expiresAt: current.previousSecretExpiresAt },
            clock.now(),
            force,
          );
          // The new secret goes to the caller, so the caller must already hold what it gives: otherwise a
          // narrow key could rotate a broader sibling, or a holder of api_keys:write an admin's key, and
          // come away with more than they have.
          await deps.grants.assertHolds(
            actor.grantor,
            await givenNow(current.scopes, current.ownerId, tx),
            tx,
            'The key’s scopes go beyond the permissions of the caller',
          );
          const { token, secret } = generateSecret(API_KEY_FORMAT, current.lookupId);
          const now = clock.now();
          const graceEnds = addSeconds(now, graceSeconds);
          const rotated = (await repo.update(
            id,
            {
              secretHash: hash(secret),
              previousSecretHash: current.secretHash,
              previousSecretExpiresAt: graceEnds,
              secretIssuedAt: now,
              // Null (not recorded: made before 0017) stays so; read as the key's creation.
              previousSecretIssuedAt: current.secretIssuedAt,
              lastFour: token.slice(-4),
            },
            now,
            tx,
          ))!;
          await deps.audit.record(tx, context, {
            type: 'api_key.rotated',
            subjectId: id,
            data: {
              owner_id: current.ownerId,
              prefix: current.prefix,
              grace_seconds: graceSeconds,
              previous_secret_expires_at: graceEnds.toISOString(),
              ...(force ? { force: true } : {}),
            },
          });
          emit(changed(rotated));
          return { row: withPendingUse(rotated), key: token };
        }),
      );
    },

    /** Keeps the caches current with this and every other instance's changes. */
    handle(event: AuthEvent) {
      owners.handle(event);
      if (event.type === 'api_key_changed') invalidate({ lookupId: event.lookupId });
      else if (event.type === 'resync') invalidate({ all: true });
    },

    flush,
    start() {
      const every = deps.flushIntervalMs ?? DEFAULT_FLUSH_INTERVAL_MS;
      timer = setInterval(() => void flush(), every);
      timer.unref();
    },
    /** Stops the timer and writes what is buffered (app close). */
    async stop() {
      if (timer) clearInterval(timer);
      timer = undefined;
      await flush();
      // A flush that was already running when stop began may have left a retry behind.
      await flush();
    },
    /** For tests and metrics: how much is cached and buffered. */
    stats: () => ({ keys: keys.size, owners: owners.size, pendingUses: usage.size }),
  };
}

export type ApiKeysService = ReturnType<typeof createApiKeysService>;
