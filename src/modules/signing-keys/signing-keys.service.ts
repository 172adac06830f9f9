import { createHash, createPrivateKey, createPublicKey, type KeyObject, randomUUID } from 'node:crypto';
import { exportJWK, exportPKCS8, generateKeyPair, type JWK } from 'jose';
import type { Logger } from 'pino';
import { z } from 'zod';
import type { Database, Transaction } from '../../db/client.js';
import { addSeconds, type Clock } from '../../lib/clock.js';
import {
  decrypt,
  encrypt,
  KEY_ENCRYPTION_KEY_REMEDY,
  KeyEncryptionKeyMismatchError,
} from '../../lib/crypto.js';
import { AppError } from '../../lib/errors.js';
import { type AuthEvent, type EventBus, inTransaction } from '../../lib/events.js';
import { decodeCursor, encodeCursor, pageBy } from '../../lib/pagination.js';
import { createRetryingRead } from '../../lib/retrying-read.js';
import { type AuditService, type RequestContext, systemContext } from '../audit/audit.service.js';
import type { SigningKeyRow, SigningKeysRepository } from './signing-keys.repository.js';

export type SigningAlg = 'ES256' | 'EdDSA';

export interface VerificationKey {
  kid: string;
  alg: SigningAlg;
  key: KeyObject;
}

export interface ActiveSigningKey extends VerificationKey {
  privateKey: KeyObject;
}

/** A kid in a list cursor: new keys get a UUID, but the column takes any text. */
const KidSchema = z.string().min(1).max(200);

/** What the JWKS publishes: public members only (RFC 7517), never d, p, q, dp, dq, qi, oth or k. */
const PUBLIC_JWK_MEMBERS = ['kty', 'crv', 'x', 'y', 'n', 'e'] as const;

function publicJwk(jwk: JWK, kid: string, alg: SigningAlg): Record<string, string> {
  const out: Record<string, string> = {};
  for (const m of PUBLIC_JWK_MEMBERS) {
    const v = jwk[m];
    if (typeof v === 'string') out[m] = v;
  }
  return { ...out, kid, alg, use: 'sig' };
}

export interface SigningKeysServiceDeps {
  db: Database;
  repo: SigningKeysRepository;
  audit: AuditService;
  events: EventBus;
  clock: Clock;
  logger: Logger;
  keyEncryptionKey: Buffer;
  alg: SigningAlg;
  /** The longest access-token lifetime: a retiring key stays published this long + 10 minutes. */
  maxAccessTtl: number;
}

/** Verifiers cache a JWKS for up to 10 minutes (SECURITY.md); retired keys stay this much longer. */
export const JWKS_CACHE_SECONDS = 600;

/**
 * When no active key is left (an operator retired it): how long the next key must have been
 * published (its row committed with its NOTIFY) before it is made active without a rotation. The
 * other instances apply the notification within milliseconds, and one whose LISTEN connection dropped
 * reads its keys again within a few seconds; meanwhile issuance answers 503 with Retry-After.
 */
export const REPLACEMENT_PUBLISHED_SECONDS = 5;

/** How long issuance answers 503 from memory after no key could be made active (an altered next key). */
const REPLACEMENT_FAILED_RETRY_SECONDS = 30;

/**
 * Signing keys: next (published, not signing) → active → retiring (published until its last token
 * expired + 10 min) → retired. Because the next key is published from its creation, a rotation only
 * ever starts signing with a key verifiers have already been shown; and a rotation waits until the
 * next key has been published for JWKS_CACHE_SECONDS, so that no verifier's cached JWKS lacks it,
 * unless it is forced (a compromised key must stop signing now).
 */
function decryptPrivateKey(
  keyEncryptionKey: Buffer,
  row: Pick<SigningKeyRow, 'kid' | 'privateKeyEncrypted'>,
) {
  try {
    return decrypt(keyEncryptionKey, row.privateKeyEncrypted);
  } catch (err) {
    throw new KeyEncryptionKeyMismatchError(
      `the signing key ${row.kid} cannot be decrypted with KEY_ENCRYPTION_KEY: it is not the key the ` +
        `signing keys were encrypted with. ${KEY_ENCRYPTION_KEY_REMEDY}`,
      { cause: err },
    );
  }
}

/**
 * A signing key's stored private key is not the one its row's public key (and `alg`) belongs to: the
 * row was altered (its private_key_encrypted copied from another key's row, say). Signing with it
 * would hand out tokens that verify nowhere, so it is refused: a start fails with this message, a
 * reload keeps the keys it had, a rotation does not promote it.
 */
export class SigningKeyMismatchError extends Error {
  override name = 'SigningKeyMismatchError';
}

/** What token issuance answers while no key can sign: 503 problem+json, and when to try again. */
export const signingUnavailable = (seconds: number): AppError =>
  new AppError('service_unavailable', {
    detail: `No signing key can sign tokens at the moment: retry in ${seconds} s.`,
    headers: { 'retry-after': String(seconds) },
  });

/** A stored key that cannot sign (an altered row, another KEY_ENCRYPTION_KEY): not the request's fault. */
const cannotSign = (err: unknown) =>
  err instanceof SigningKeyMismatchError || err instanceof KeyEncryptionKeyMismatchError;

/** Whether `key` is a key of `alg`: a P-256 key for ES256, an Ed25519 key for EdDSA. */
function fitsAlg(key: KeyObject, alg: SigningAlg): boolean {
  if (alg === 'EdDSA') return key.asymmetricKeyType === 'ed25519';
  return key.asymmetricKeyType === 'ec' && key.asymmetricKeyDetails?.namedCurve === 'prime256v1';
}

/**
 * The private key of `row`, decrypted, once it is known to be the one its public key belongs to. The
 * ciphertext carries nothing of its row, so one copied from another row decrypts: the comparison with
 * the row's public key is what tells (a few microseconds, when the active key is read).
 */
function openPrivateKey(keyEncryptionKey: Buffer, row: SigningKeyRow, publicKey: KeyObject): KeyObject {
  const privateKey = createPrivateKey(decryptPrivateKey(keyEncryptionKey, row));
  if (!fitsAlg(privateKey, row.alg) || !createPublicKey(privateKey).equals(publicKey))
    throw new SigningKeyMismatchError(
      `the private key stored for the signing key ${row.kid} is not the one its public key (${row.alg}) ` +
        'belongs to: its row was altered (private_key_encrypted copied from another row?). Tokens signed ' +
        'with it would verify nowhere. Restore the row, or revoke every published key and sign with a ' +
        'new one: `npm run rotate-signing-key -- --revoke-previous`',
    );
  return privateKey;
}

export function createSigningKeysService(deps: SigningKeysServiceDeps) {
  let active: ActiveSigningKey | undefined;
  const verification = new Map<string, VerificationKey>();
  let jwksJson = '{"keys":[]}';
  let jwksEtag = '""';
  let loaded: SigningKeyRow[] = [];
  /** Told when a key this instance verified with is gone (revoked, or past its publication). */
  const removedListeners: Array<() => void> = [];
  /** Counts the reloads that removed a key: a verification begun before one is not to be cached. */
  let removals = 0;
  /**
   * Counts the changes made to the keys in memory other than by a read: a rotation of this
   * instance's applied at its commit, a revocation heard of. A read begun before one may have read
   * the keys from before it, and is dropped (the one asked for after it applies).
   */
  let changes = 0;
  /**
   * While no key can sign: until when (clock ms) issuance answers 503 from memory rather than try
   * again, and why (one log line when that changes). Cleared once a key signs.
   */
  let unavailable: { until: number; why: 'publishing' | 'cannot_sign' } | undefined;
  /** The error the minute's reload last kept the previous keys for (logged once); cleared by a read. */
  let keptSince: string | undefined;
  /** The replacement of a missing active key under way (replaceActive): shared by the requests meanwhile. */
  let replacing: Promise<void> | undefined;

  async function newKeyRow(state: 'next' | 'active', now: Date) {
    const kid = randomUUID();
    const { publicKey, privateKey } = await generateKeyPair(deps.alg, {
      extractable: true,
      crv: deps.alg === 'EdDSA' ? 'Ed25519' : undefined,
    });
    const jwk = await exportJWK(publicKey);
    const pem = await exportPKCS8(privateKey);
    return {
      kid,
      alg: deps.alg,
      state,
      publicJwk: publicJwk(jwk, kid, deps.alg),
      privateKeyEncrypted: encrypt(deps.keyEncryptionKey, pem),
      createdAt: now,
      activatedAt: state === 'active' ? now : null,
    };
  }

  /**
   * Reads the published keys into memory: the only place `kid`s are looked up (never SQL, never files).
   * One read at a time: a reload asked for while one runs is one more read after it, shared by every
   * caller meanwhile, so an older read never lands after a newer one (a key revoked by a rotation,
   * its notice and the minute's reload racing, came back until the next reload) and every caller
   * sees a read begun after it asked.
   */
  let reading: Promise<void> | undefined;
  let readAgain: Promise<void> | undefined;
  function reload(): Promise<void> {
    if (!reading) {
      reading = readKeys().finally(() => {
        reading = undefined;
      });
      return reading;
    }
    readAgain ??= reading
      .catch(() => undefined)
      .then(() => {
        readAgain = undefined;
        return reload();
      });
    return readAgain;
  }

  const changedRead = createRetryingRead({
    read: reload,
    logger: deps.logger,
    what: 'the signing keys after a change or a resync',
    // A key row that cannot sign (altered, or under another KEY_ENCRYPTION_KEY) stays so until mended.
    lasting: cannotSign,
  });

  async function readKeys(): Promise<void> {
    const seen = changes;
    const rows = await deps.repo.listPublished(deps.clock.now());
    if (changes !== seen) return;
    apply(rows);
  }

  /** Makes `rows` (every published key) the keys this instance signs, verifies and publishes with. */
  function apply(rows: SigningKeyRow[]): void {
    const nextVerification = new Map<string, VerificationKey>();
    for (const row of rows) {
      const key = createPublicKey({ key: row.publicJwk as JWK & { kty: string }, format: 'jwk' });
      nextVerification.set(row.kid, { kid: row.kid, alg: row.alg, key });
    }
    const activatedAt = (r: SigningKeyRow) => (r.activatedAt ?? r.createdAt).getTime();
    const activeRow = rows
      .filter((r) => r.state === 'active')
      .sort((a, b) => activatedAt(b) - activatedAt(a))[0];
    const activeKey = activeRow && nextVerification.get(activeRow.kid)!;
    const nextActive: ActiveSigningKey | undefined = activeRow && {
      ...activeKey!,
      privateKey: openPrivateKey(deps.keyEncryptionKey, activeRow, activeKey!.key),
    };
    const removed = [...verification.keys()].some((kid) => !nextVerification.has(kid));
    verification.clear();
    for (const [k, v] of nextVerification) verification.set(k, v);
    active = nextActive;
    keptSince = undefined;
    publish(rows);
    if (removed) keysRemoved();
    if (active && unavailable) {
      unavailable = undefined;
      deps.logger.info({ kid: active.kid }, 'a signing key signs again: token issuance resumes');
    }
  }

  function publish(rows: SigningKeyRow[]): void {
    loaded = rows;
    jwksJson = JSON.stringify({ keys: rows.map((r) => r.publicJwk) });
    jwksEtag = `"${createHash('sha256').update(jwksJson).digest('base64url').slice(0, 22)}"`;
  }

  /** Tokens verified with a key that is gone (cached by the token service) stop being good. */
  function keysRemoved(): void {
    removals++;
    for (const listener of removedListeners) listener();
  }

  /**
   * Another instance (or the script) revoked these keys: they stop verifying and leave the JWKS here
   * at once, and if the active key is one of them nothing more is signed with it (`signingKey()`
   * waits for the read of its successor), instead of both going on until that read lands.
   */
  function dropRevoked(kids: readonly string[]): void {
    let removed = false;
    for (const kid of kids) removed = verification.delete(kid) || removed;
    if (!removed) return;
    changes++;
    publish(loaded.filter((r) => verification.has(r.kid)));
    keysRemoved();
  }

  /** The active key, unless it was revoked since it was read. */
  const usableActive = (): ActiveSigningKey | undefined =>
    active && verification.has(active.kid) ? active : undefined;

  /**
   * No active key among `rows` (every published key, read under the lock): the published next key is
   * made active once it has been published for REPLACEMENT_PUBLISHED_SECONDS, and a new next key
   * made, as a rotation does; with no next key, one is made (and announced) that signs once it has
   * been published that long. Never a key made now that signs at once: the other instances would
   * refuse its tokens until they heard of it. `waitSeconds`: how long until a key can sign.
   */
  async function replaceActiveIn(
    tx: Transaction,
    rows: SigningKeyRow[],
    now: Date,
    emit: (event: AuthEvent) => void,
  ): Promise<{ kid: string; publishedFor: number } | { waitSeconds: number }> {
    const next = rows.find((r) => r.state === 'next');
    if (!next) {
      await deps.repo.insert(await newKeyRow('next', now), tx);
      emit({ type: 'signing_keys_changed' });
      return { waitSeconds: REPLACEMENT_PUBLISHED_SECONDS };
    }
    const publishedMs = now.getTime() - next.createdAt.getTime();
    if (publishedMs < REPLACEMENT_PUBLISHED_SECONDS * 1000)
      return { waitSeconds: Math.ceil((REPLACEMENT_PUBLISHED_SECONDS * 1000 - publishedMs) / 1000) };
    // Not made active unless it can sign (its row unaltered): SigningKeyMismatchError otherwise.
    openPrivateKey(
      deps.keyEncryptionKey,
      next,
      createPublicKey({ key: next.publicJwk as JWK & { kty: string }, format: 'jwk' }),
    );
    const publishedFor = Math.floor(publishedMs / 1000);
    await deps.repo.update(next.kid, { state: 'active', activatedAt: now }, tx);
    await deps.repo.insert(await newKeyRow('next', now), tx);
    await deps.audit.record(tx, systemContext, {
      type: 'signing_key.rotated',
      subjectId: next.kid,
      data: { previous: [], alg: next.alg, forced: false, published_for: publishedFor, no_active_key: true },
    });
    emit({ type: 'signing_keys_changed' });
    return { kid: next.kid, publishedFor };
  }

  /**
   * Creates the first active key and a published next key on a database that never had a key;
   * creates a published next key when missing; makes the next key active when no active key is left
   * (replaceActiveIn); retires expired keys. A key it creates is announced to the other instances in
   * its transaction (NOTIFY), as a rotation's are: a next key counts as published from its
   * `createdAt`, and a rotation may promote it 10 minutes later, so the others must publish it then,
   * not at their next minute's reload.
   */
  async function ensureKeys(): Promise<void> {
    const promoted = await inTransaction(deps.db, deps.events, async (tx, emit) => {
      await deps.repo.lock(tx);
      const now = deps.clock.now();
      await deps.repo.retireExpired(now, tx);
      const rows = await deps.repo.listPublished(now, tx);
      if (rows.length === 0 && (await deps.repo.list({ limit: 1 }, tx)).length === 0) {
        // The first start on this database: nothing has signed yet, and no instance has a key.
        for (const state of ['active', 'next'] as const)
          await deps.repo.insert(await newKeyRow(state, now), tx);
        emit({ type: 'signing_keys_changed' });
        return undefined;
      }
      if (!rows.some((r) => r.state === 'active')) {
        const replaced = await replaceActiveIn(tx, rows, now, emit);
        return 'kid' in replaced ? replaced : undefined;
      }
      if (!rows.some((r) => r.state === 'next')) {
        await deps.repo.insert(await newKeyRow('next', now), tx);
        emit({ type: 'signing_keys_changed' });
      }
      return undefined;
    });
    if (promoted) logPromoted(promoted);
    try {
      await reload();
    } catch (err) {
      // A running instance keeps the keys it had, and the minute's housekeeping goes on to the
      // revocations and the purge; at the start (nothing loaded yet) the start is refused.
      if (!(err instanceof SigningKeyMismatchError) || !active) throw err;
      // Once, not every minute while it lasts: again only when it says something else.
      if (keptSince === err.message) return;
      keptSince = err.message;
      deps.logger.error({ err }, 'the signing keys were not reloaded: the keys read before are kept');
    }
  }

  function logPromoted(promoted: { kid: string; publishedFor: number }): void {
    deps.logger.warn(
      { kid: promoted.kid, publishedFor: promoted.publishedFor },
      'no active signing key was left: the published next key signs now',
    );
  }

  function becomeUnavailable(why: 'publishing' | 'cannot_sign', seconds: number, err?: unknown): void {
    if (unavailable?.why !== why) {
      if (why === 'publishing')
        deps.logger.warn(
          { waitSeconds: seconds },
          'no signing key can sign: the next key signs once it has been published long enough; token ' +
            'issuance answers 503 meanwhile',
        );
      else
        deps.logger.error(
          { err },
          'no signing key can sign, and none can be made active: token issuance answers 503. Revoke every ' +
            'published key and sign with a new one: POST /v1/signing-keys/rotate {"revoke_previous": true}',
        );
    }
    unavailable = { until: deps.clock.nowMs() + seconds * 1000, why };
  }

  /** What issuance answers while no key can sign: 503, and when to try again. */
  function noSigningKey(): AppError {
    return signingUnavailable(
      Math.max(1, Math.ceil(((unavailable?.until ?? 0) - deps.clock.nowMs()) / 1000)),
    );
  }

  /**
   * Makes a key active when none is (replaceActiveIn), under the lock; this instance holds the keys it
   * left from its commit on. `active`: a key is active already (another instance, or the minute's
   * housekeeping, made one meanwhile), read here; `waitSeconds`: none can sign yet, `next` the next key
   * that will once published long enough (undefined: there was none, and one was made). Throws
   * SigningKeyMismatchError or KeyEncryptionKeyMismatchError when the next key cannot sign.
   */
  async function replaceActiveNow(): Promise<
    | { active: string }
    | { promoted: { kid: string; publishedFor: number } }
    | { waitSeconds: number; next: string | undefined }
  > {
    type Replaced =
      | { active: string; published: SigningKeyRow[] }
      | { promoted: { kid: string; publishedFor: number }; published: SigningKeyRow[] }
      | { waitSeconds: number; next: string | undefined };
    const result = await inTransaction(
      deps.db,
      deps.events,
      async (tx, emit): Promise<Replaced> => {
        await deps.repo.lock(tx);
        const now = deps.clock.now();
        const rows = await deps.repo.listPublished(now, tx);
        const current = rows.find((r) => r.state === 'active');
        if (current) return { active: current.kid, published: rows };
        const replaced = await replaceActiveIn(tx, rows, now, emit);
        if ('waitSeconds' in replaced)
          return { waitSeconds: replaced.waitSeconds, next: rows.find((r) => r.state === 'next')?.kid };
        return { promoted: replaced, published: await deps.repo.listPublished(now, tx) };
      },
      (r) => {
        if (!('published' in r)) return;
        changes++;
        apply(r.published);
      },
    );
    if ('promoted' in result) logPromoted(result.promoted);
    return result;
  }

  /**
   * replaceActiveNow for issuance: a next key not published long enough, or one that cannot sign,
   * makes issuance answer 503 for a while. One at a time on this instance: requests meanwhile share it.
   */
  function replaceActive(): Promise<void> {
    replacing ??= (async () => {
      try {
        const result = await replaceActiveNow();
        if ('waitSeconds' in result) becomeUnavailable('publishing', result.waitSeconds);
      } catch (err) {
        if (!cannotSign(err)) throw err;
        // The next key cannot sign (its row altered, or KEY_ENCRYPTION_KEY not its key): an
        // operator's matter; issuance answers 503 and tries again now and then.
        becomeUnavailable('cannot_sign', REPLACEMENT_FAILED_RETRY_SECONDS, err);
      } finally {
        replacing = undefined;
      }
    })();
    return replacing;
  }

  /** `published`: every key published once it commits, when it changed any. */
  type Rotation = (
    | { kid: string; previous: string | null; revoked?: string[] }
    | { tooSoonBy: number; createdNext: boolean }
  ) & { published?: SigningKeyRow[] };

  async function rotateIn(
    tx: Transaction,
    context: RequestContext,
    force: boolean,
    revokePrevious: boolean,
  ): Promise<Rotation> {
    await deps.repo.lock(tx);
    const now = deps.clock.now();
    const rows = await deps.repo.listPublished(now, tx);
    const current = rows.filter((r) => r.state === 'active');
    if (revokePrevious) {
      // A leaked key most likely leaked with the others (they are stored alike): every published key
      // is revoked, the next one included, and a key made now signs. It leaves the JWKS and every
      // instance's keys at once, and every token signed before stops verifying (forgeries too).
      for (const r of rows)
        await deps.repo.update(r.kid, { state: 'retired', retiringAt: now, publishUntil: now }, tx);
      const fresh = await newKeyRow('active', now);
      await deps.repo.insert(fresh, tx);
      await deps.repo.insert(await newKeyRow('next', now), tx);
      await deps.audit.record(tx, context, {
        type: 'signing_key.rotated',
        subjectId: fresh.kid,
        data: {
          previous: current.map((c) => c.kid),
          revoked: rows.map((r) => r.kid),
          alg: fresh.alg,
          forced: true,
          revoked_previous: true,
        },
      });
      return {
        kid: fresh.kid,
        previous: current[0]?.kid ?? null,
        revoked: rows.map((r) => r.kid),
        published: await deps.repo.listPublished(now, tx),
      };
    }
    let next = rows.find((r) => r.state === 'next');
    const createdNext = !next;
    if (!next) {
      const row = await newKeyRow('next', now);
      await deps.repo.insert(row, tx);
      next = { ...row, retiringAt: null, publishUntil: null } as SigningKeyRow;
    }
    const publishedFor = Math.floor((now.getTime() - next.createdAt.getTime()) / 1000);
    // Refused, not thrown: a next key created just now is kept (committed) for the later rotation.
    if (!force && publishedFor < JWKS_CACHE_SECONDS)
      return {
        tooSoonBy: JWKS_CACHE_SECONDS - publishedFor,
        createdNext,
        published: createdNext ? await deps.repo.listPublished(now, tx) : undefined,
      };
    // Not promoted unless it can sign: a next key whose row was altered would leave every instance
    // failing to read its keys once the rotation committed, still signing with the old one.
    if (!createdNext)
      openPrivateKey(
        deps.keyEncryptionKey,
        next,
        createPublicKey({ key: next.publicJwk as JWK & { kty: string }, format: 'jwk' }),
      );
    for (const c of current) {
      await deps.repo.update(
        c.kid,
        {
          state: 'retiring',
          retiringAt: now,
          publishUntil: addSeconds(now, deps.maxAccessTtl + JWKS_CACHE_SECONDS),
        },
        tx,
      );
    }
    await deps.repo.update(next.kid, { state: 'active', activatedAt: now }, tx);
    await deps.repo.insert(await newKeyRow('next', now), tx);
    await deps.audit.record(tx, context, {
      type: 'signing_key.rotated',
      subjectId: next.kid,
      data: {
        previous: current.map((c) => c.kid),
        alg: next.alg,
        forced: force,
        published_for: publishedFor,
      },
    });
    return {
      kid: next.kid,
      previous: current[0]?.kid ?? null,
      published: await deps.repo.listPublished(now, tx),
    };
  }

  return {
    ensureKeys,
    reload,
    /** The active key as last read (it may have been revoked since: tokens are signed with `signingKey`). */
    activeKey(): ActiveSigningKey {
      if (!active) throw new Error('no active signing key loaded');
      return active;
    },
    /** The key new tokens are signed with now; undefined while its revocation is known and its successor is read. */
    signingKeyNow: usableActive,
    /**
     * The key new tokens are signed with: after a revocation of the active key heard from another
     * instance, the one read after it (never the revoked key, whose tokens would be refused at once).
     * With no active key in the database (an operator retired it), the published next key is made
     * active (replaceActiveIn); until one can sign, AppError `service_unavailable` (503, Retry-After).
     */
    async signingKey(): Promise<ActiveSigningKey> {
      const current = usableActive();
      if (current) return current;
      // No key could be made active a moment ago: answered from memory until it can be tried again.
      if (unavailable && deps.clock.nowMs() < unavailable.until) throw noSigningKey();
      try {
        // Each read is begun after the call; one is dropped only for a change that asks for another.
        for (let reads = 0; reads < 3 && !usableActive(); reads++) await reload();
        // None in the database either (an operator retired it): the published next key is made
        // active, or, not published long enough yet, 503 until it is.
        if (!usableActive()) await replaceActive();
      } catch (err) {
        if (!cannotSign(err)) throw err;
        // The active key read cannot sign (its row altered): 503, not a 500, until that changes.
        becomeUnavailable('cannot_sign', REPLACEMENT_FAILED_RETRY_SECONDS, err);
      }
      const key = usableActive();
      if (!key) throw noSigningKey();
      return key;
    },
    /**
     * Applies a change of the keys another instance (or the script) made: see AuthEvent. The read it
     * asks for is tried again until it succeeds, rather than leave keys revoked meanwhile verifying
     * (and the active one signing) until the minute's reload.
     */
    handle(event: AuthEvent): void {
      if (event.type !== 'signing_keys_changed' && event.type !== 'resync') return;
      if (event.type === 'signing_keys_changed' && event.revoked) dropRevoked(event.revoked);
      changedRead.request();
    },
    /** Stops a read asked for by an event from being tried again (the service is stopping). */
    stop: () => changedRead.stop(),
    /** How many times a key was removed: unchanged across a verification, its result may be cached. */
    removals: () => removals,
    /** `listener` runs whenever a key this instance verified with is no longer published. */
    onKeyRemoved(listener: () => void): void {
      removedListeners.push(listener);
    },
    /** Looks a `kid` up among the published keys, in memory. */
    verificationKey(kid: string): VerificationKey | undefined {
      return verification.get(kid);
    },
    jwks(): string {
      return jwksJson;
    },
    /** The strong ETag of `jwks()` (RFC 9110 §8.8.3): a hash of its bytes, the same on every instance. */
    jwksEtag(): string {
      return jwksEtag;
    },
    /**
     * Promotes the next key. Refused with 409 `rotation_too_soon` (and Retry-After) while the next
     * key has been published for less than JWKS_CACHE_SECONDS, unless `force`. `revokePrevious`
     * (which forces) retires the previous key at once instead of letting its tokens run out: for a
     * key that leaked, whose holder could sign tokens of their own with it.
     */
    async rotate(context: RequestContext, options: { force?: boolean; revokePrevious?: boolean } = {}) {
      const revokePrevious = options.revokePrevious === true;
      const force = options.force === true || revokePrevious;
      const result = await inTransaction(
        deps.db,
        deps.events,
        async (tx, emit) => {
          const r = await rotateIn(tx, context, force, revokePrevious);
          if (r.published)
            emit(
              'revoked' in r && r.revoked
                ? { type: 'signing_keys_changed', revoked: r.revoked }
                : { type: 'signing_keys_changed' },
            );
          return r;
        },
        // This instance signs with the new key from the commit on, and verifies and publishes what
        // the rotation left, without waiting for a read: a revoked key signs nothing here after its
        // revocation committed (those tokens would be refused at once), and the key it signs with
        // is in its JWKS already. A read begun before the commit is dropped when it lands.
        (r) => {
          if (!r.published) return;
          changes++;
          apply(r.published);
        },
      );
      if ('tooSoonBy' in result) {
        throw new AppError('rotation_too_soon', {
          detail:
            `The next signing key has been published for less than ${JWKS_CACHE_SECONDS / 60} minutes, and ` +
            `verifiers may cache the JWKS that long: rotate again in ${result.tooSoonBy} s, or with ` +
            '`force: true` (the script’s --force) to sign with it now, for a compromised key.',
          headers: { 'retry-after': String(result.tooSoonBy) },
        });
      }
      // With the request id: the line is found beside the request that rotated (null from the script).
      const logged = { reqId: context.requestId, kid: result.kid, previous: result.previous };
      if (revokePrevious)
        deps.logger.warn(
          logged,
          'signing key rotated, and the previous one revoked: every token it signed stops verifying',
        );
      else if (force) deps.logger.warn(logged, 'signing key rotated (forced)');
      else deps.logger.info(logged, 'signing key rotated');
      return { kid: result.kid, previous: result.previous };
    },
    /**
     * What issuance does when no active key is left (replaceActiveNow), for `npm run
     * rotate-signing-key`: the published next key made active once published
     * REPLACEMENT_PUBLISHED_SECONDS, or why not.
     */
    replaceMissingActive: replaceActiveNow,
    find: (kid: string) => deps.repo.find(kid),
    /** Every key, oldest first, a page at a time. */
    async list(options: { limit: number; cursor?: string | undefined }) {
      const rows = await deps.repo.list({
        limit: options.limit,
        cursor: decodeCursor(options.cursor, KidSchema),
      });
      return pageBy(rows, options.limit, (last) => encodeCursor({ at: last.createdAt, id: last.kid }));
    },
    loadedKeys: () => loaded,
  };
}

export type SigningKeysService = ReturnType<typeof createSigningKeysService>;
