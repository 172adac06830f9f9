import type { Database, Executor } from '../../db/client.js';
import { addSeconds, type Clock } from '../../lib/clock.js';
import {
  CLIENT_SECRET_FORMAT,
  digestsEqual,
  generateSecret,
  keyedHash,
  parseSecret,
  randomBase62,
} from '../../lib/crypto.js';
import { AppError, forbidden, notFound, notYours } from '../../lib/errors.js';
import { type AuthEvent, type EventBus, inTransaction } from '../../lib/events.js';
import { type Cursor, paginate } from '../../lib/pagination.js';
import { intersectPermissions, isSubset, notHeld } from '../../lib/permissions.js';
import { assertNoGraceRunning } from '../../lib/rotation.js';
import { createReadThroughCache } from '../../lib/read-through-cache.js';
import { createVerifiedCredentials } from '../../lib/verified-credentials.js';
import {
  type AuditService,
  changedFields,
  effectivePatch,
  type RequestContext,
} from '../audit/audit.service.js';
import type { GrantCeiling, Grantor } from '../roles/grant-ceiling.js';
import type { RevocationList } from '../tokens/revocations.service.js';
import { createOwnerStates, type OwnerState } from '../users/owner-states.js';
import type { UsersRepository } from '../users/users.repository.js';
import type { ClientPatch, ClientRow, ClientsRepository } from './clients.repository.js';

/** Public client ids: `pci_` and the same lookup id that the client's secrets carry. */
export const CLIENT_ID_PREFIX = 'pci_';
export const CLIENT_ID_PATTERN = new RegExp(
  `^${CLIENT_ID_PREFIX}[0-9A-Za-z]{${CLIENT_SECRET_FORMAT.lookupLength}}$`,
);
/** Caps applied before any work, so an oversized credential costs nothing. */
const MAX_CLIENT_ID_LENGTH = 64;
const MAX_SECRET_LENGTH = 256;
/** The longest grace a rotated-out secret may keep working. */
export const MAX_SECRET_GRACE_SECONDS = 30 * 86_400;

/** Who manages clients: a user (or their API key) with their permissions, or a service. */
export interface ClientCaller {
  userId: string | undefined;
  /**
   * The request's principal: its `permissions` decide what it may see; what it may grant is what it
   * holds now (roles/grant-ceiling.ts).
   */
  grantor: Grantor;
}

/**
 * Who may register a client or take a new secret for one: a user's or a service's access token, never
 * an API key. A client secret lives until revoked, so revoking a leaked key (or its expiry) would not
 * end a client it made (the keys a key makes end with it). The routes declare it
 * (`config.credential: 'access_token'`), the authenticate plugin refuses an API key there (403), and
 * the caller is made by `principalTaking`, whose type carries no API key.
 */
export interface TokenClientCaller extends ClientCaller {
  grantor: Exclude<Grantor, { kind: 'api_key' }>;
}

export interface CreateClientInput {
  name: string;
  description?: string | undefined;
  scopes: string[];
  audiences?: string[] | undefined;
  accessTokenTtl?: number | null | undefined;
}

export interface UpdateClientInput {
  name?: string | undefined;
  description?: string | undefined;
  scopes?: string[] | undefined;
  audiences?: string[] | undefined;
  accessTokenTtl?: number | null | undefined;
  status?: 'active' | 'disabled' | undefined;
  actsForCreator?: boolean | undefined;
}

export type ClientAuthFailure = 'malformed' | 'unknown_client' | 'disabled' | 'wrong_secret';

export interface ClientsServiceDeps {
  db: Database;
  repo: ClientsRepository;
  audit: AuditService;
  events: EventBus;
  grants: GrantCeiling;
  revocations: RevocationList;
  clock: Clock;
  pepper: Buffer;
  /** The longest access-token lifetime a client may be given (config.tokens.maxAccessTtl). */
  maxAccessTtl: number;
  /** The lifetime of a client's access tokens when it sets none (config.tokens.accessTtl). */
  accessTtl: number;
  /** This service's own audience: what the tokens of a client registered with no audiences are for. */
  audience: string;
  /** Creators' current state, for the clients that act for them. */
  users: Pick<UsersRepository, 'findById' | 'rolesAndPermissions'>;
  /** The most clients, active or disabled, registered for one user (MAX_CLIENTS_PER_USER). */
  maxPerCreator: number;
}

const unique = (values: string[]) => [...new Set(values)].sort();
/** Distinguishes a remembered Basic header from a remembered (client id, secret) pair. */
const BASIC_KEY = 'basic';

/**
 * What a view of a client acting for its creator was made from: the scopes it was registered with
 * (its own are bounded by the creator's permissions), and whether that creator is active.
 */
const viewOrigins = new WeakMap<ClientRow, { registered: string[]; creatorActive: boolean }>();

/**
 * True for a client, as authentication sees it, that acts for a creator who is disabled or deleted:
 * it authenticates, but acts for nobody, and gets no tokens (`unauthorized_client`).
 */
export const actsForNobody = (client: ClientRow): boolean => viewOrigins.get(client)?.creatorActive === false;

/** The scopes a client view was registered with, before its creator's permissions bounded them. */
export const registeredScopes = (client: ClientRow): string[] =>
  viewOrigins.get(client)?.registered ?? client.scopes;

/**
 * App clients: confidential OAuth clients of other services. The secret is shown once and stored as
 * an HMAC under the server pepper; a rotation keeps the previous secret valid for a bounded grace.
 * Clients are visible to whoever registered them, and to administrators (holders of `*`): another
 * user's client answers 404 (SECURITY.md, object-level authorization).
 */
export function createClientsService(deps: ClientsServiceDeps) {
  const hash = (secret: string) => keyedHash(deps.pepper, secret);
  // Client authentication sits on the token and introspection paths; rows are cached briefly and
  // dropped on `client_changed` from any instance (or everything on `resync`).
  // A client_id with no client is cached too, in an LRU of its own: ids of the right form are anyone's
  // to make up, and a flood of them would otherwise push real clients' rows out.
  const cache = createReadThroughCache<ClientRow | undefined>({
    load: (clientId) => deps.repo.findByClientId(clientId),
    max: 10_000,
    maxAbsent: 1_000,
    ttlMs: 60_000,
    clock: deps.clock,
  });
  // Secrets that matched, by digest, so a client authenticating on every request costs no HMAC.
  const verified = createVerifiedCredentials({ max: 10_000, ttlMs: 60_000 });
  /**
   * Whether a remembered match holds for the client's row as read now: the stored hash the secret
   * matched is still its current (or previous) one. A rotation this instance did not hear of (a
   * notification lost) is then honoured once the row's cache entry ages out, not up to a minute after
   * (a remembered match can be younger than the row). Both are strings of the cached row: an equality
   * test, no allocation.
   */
  const stillMatches = (row: ClientRow, known: { previous: boolean; stored: string | undefined }) =>
    (known.previous ? row.previousSecretHash : row.secretHash) === known.stored;

  // What the creators of clients that act for them hold now, dropped by event from any instance.
  const creators = createOwnerStates({ users: deps.users, max: 10_000, ttlMs: 60_000, clock: deps.clock });
  // A client acting for its creator is seen by authentication with its scopes within what the creator
  // holds: one frozen view per pair of cached row and creator state, shared by every request.
  const views = new WeakMap<ClientRow, { creator: OwnerState | undefined; view: ClientRow }>();
  function viewWith(row: ClientRow, creator: OwnerState | undefined): ClientRow {
    const known = views.get(row);
    if (known && known.creator === creator) return known.view;
    const scopes = creator?.active ? intersectPermissions(row.scopes, creator.permissions) : [];
    const view = Object.freeze({ ...row, scopes });
    viewOrigins.set(view, { registered: row.scopes, creatorActive: creator?.active === true });
    views.set(row, { creator, view });
    return view;
  }
  /** The client as it may act now: itself, or, acting for its creator, within what they hold. */
  async function acting(row: ClientRow): Promise<ClientRow> {
    if (!row.actsForCreator) return row;
    return viewWith(row, row.createdBy ? await creators.get(row.createdBy) : undefined);
  }
  /** `acting` from memory alone; undefined when the creator's state is not in memory. */
  function actingNow(row: ClientRow): ClientRow | undefined {
    if (!row.actsForCreator) return row;
    if (!row.createdBy) return viewWith(row, undefined);
    const creator = creators.peek(row.createdBy);
    return creator && viewWith(row, creator);
  }

  const isAdministrator = (caller: ClientCaller) => isSubset(['*'], caller.grantor.permissions);
  const visibleTo = (caller: ClientCaller, row: ClientRow) =>
    isAdministrator(caller) || (caller.userId !== undefined && row.createdBy === caller.userId);

  /**
   * Nobody grants what they do not hold: within what the caller holds now, read on `tx`, and with
   * clients:write still held (a token issued before it was taken away does not go on granting).
   */
  function assertGrantable(
    caller: ClientCaller,
    scopes: string[],
    tx: Executor,
    refusal = 'A client cannot be given permissions its creator does not hold',
  ) {
    return deps.grants.assertHolds(caller.grantor, ['clients:write', ...scopes], tx, refusal);
  }

  function assertTtl(ttl: number | null | undefined) {
    if (ttl === null || ttl === undefined || ttl <= deps.maxAccessTtl) return;
    throw new AppError('validation_failed', {
      detail: `access_token_ttl may be at most ${deps.maxAccessTtl} seconds`,
      errors: [{ field: 'body.access_token_ttl', message: `must be at most ${deps.maxAccessTtl}` }],
    });
  }

  /** The audiences a client's tokens may be for under its setting (none: this service's own). */
  const audiencesOf = (audiences: string[]) => (audiences.length > 0 ? audiences : [deps.audience]);
  /** An access token's lifetime under a client's setting (null: the service's default). */
  const ttlOf = (ttl: number | null) => Math.min(ttl ?? deps.accessTtl, deps.maxAccessTtl);
  /** Whether audiences `to` allow one that `from` did not (`audiencesOf`: none is this service's own). */
  const reachesFurther = (from: string[], to: string[]) =>
    audiencesOf(to).some((a) => !audiencesOf(from).includes(a));
  /**
   * A change that lets the client's tokens do more: re-enabled, an audience it did not have (this
   * service's own included, which none means), a longer lifetime.
   */
  const widens = (before: ClientRow, patch: ClientPatch) =>
    (patch.status === 'active' && before.status !== 'active') ||
    (patch.audiences !== undefined && reachesFurther(before.audiences, patch.audiences)) ||
    (patch.accessTokenTtl !== undefined && ttlOf(patch.accessTokenTtl) > ttlOf(before.accessTokenTtl));

  /**
   * The client an id names, if the caller may see it; 404 otherwise (existence is not confirmed). One
   * that exists but is another's is audited as an `authorization.denied` of `action` (`notYours`).
   */
  async function visibleClient(
    caller: ClientCaller,
    idOrClientId: string,
    action: string,
  ): Promise<ClientRow> {
    const row = CLIENT_ID_PATTERN.test(idOrClientId)
      ? await deps.repo.findByClientId(idOrClientId)
      : await deps.repo.findById(idOrClientId);
    if (!row) throw notFound('client');
    if (!visibleTo(caller, row))
      throw notYours('client', {
        action,
        subjectId: row.id,
        data: { client_id: row.clientId, owner_id: row.createdBy },
      });
    return row;
  }

  /** Every token the client holds stops working on every instance (disable, delete). */
  function revokeTokensOf(tx: Parameters<RevocationList['revoke']>[0], clientId: string) {
    return deps.revocations.revoke(tx, 'subject', clientId);
  }

  const findCached = (clientId: string) => cache.get(clientId);

  return {
    async create(caller: TokenClientCaller, input: CreateClientInput, context: RequestContext) {
      if (caller.userId === undefined && !isAdministrator(caller)) {
        throw forbidden('App clients are registered by users (or by administrators)');
      }
      const scopes = unique(input.scopes);
      assertTtl(input.accessTokenTtl);
      const lookupId = randomBase62(CLIENT_SECRET_FORMAT.lookupLength);
      const clientId = `${CLIENT_ID_PREFIX}${lookupId}`;
      const { token: secret } = generateSecret(CLIENT_SECRET_FORMAT, lookupId);
      const now = deps.clock.now();
      const refused = { action: 'client.create', data: { scopes } };
      const client = await deps.grants.audited(context, refused, () =>
        inTransaction(deps.db, deps.events, async (tx, emit) => {
          await assertGrantable(caller, scopes, tx);
          // A client registered by a client is its registrant's user's: the lineage decides what is
          // "one's own" (an administrator does not turn off their own second factor through a client
          // of a client they registered).
          const registrant =
            caller.grantor.kind === 'service'
              ? ((await deps.repo.findByClientId(caller.grantor.clientId, tx))?.createdBy ?? null)
              : null;
          const createdBy = caller.userId ?? registrant;
          if (createdBy !== null) {
            // Registrations for one user take turns from here to their commit, so two at the limit
            // cannot both count the same clients and both go in.
            await deps.repo.lockCreationFor(createdBy, tx);
            if ((await deps.repo.countOfCreator(createdBy, deps.maxPerCreator, tx)) >= deps.maxPerCreator)
              throw new AppError('conflict', {
                detail: `This account has ${deps.maxPerCreator} app clients, the most one may have: delete one before registering another`,
              });
          }
          const row = await deps.repo.insert(
            {
              clientId,
              name: input.name,
              description: input.description ?? '',
              secretHash: hash(secret),
              scopes,
              audiences: unique(input.audiences ?? []),
              accessTokenTtl: input.accessTokenTtl ?? null,
              status: 'active',
              createdBy,
              // A user who is not an administrator registers a client that acts for them: it holds
              // no more than they do, and nothing once they are disabled or deleted.
              actsForCreator: caller.userId !== undefined && !isAdministrator(caller),
              createdAt: now,
              updatedAt: now,
            },
            tx,
          );
          await deps.audit.record(tx, context, {
            type: 'client.created',
            subjectId: row.id,
            data: { client_id: clientId, scopes: row.scopes, audiences: row.audiences },
          });
          // A negative lookup of this id may be cached somewhere.
          emit({ type: 'client_changed', clientId });
          return row;
        }),
      );
      return { client, secret };
    },

    async list(caller: ClientCaller, options: { limit: number; cursor?: Cursor | undefined }) {
      const rows = await deps.repo.list({
        ...(isAdministrator(caller)
          ? {}
          : { createdBy: caller.userId ?? '00000000-0000-0000-0000-000000000000' }),
        limit: options.limit,
        ...(options.cursor ? { cursor: options.cursor } : {}),
      });
      return paginate(rows, options.limit);
    },

    get: (caller: ClientCaller, idOrClientId: string) => visibleClient(caller, idOrClientId, 'client.read'),

    async update(
      caller: ClientCaller,
      idOrClientId: string,
      input: UpdateClientInput,
      context: RequestContext,
    ) {
      const existing = await visibleClient(caller, idOrClientId, 'client.update');
      const patch: ClientPatch = {};
      if (input.name !== undefined) patch.name = input.name;
      if (input.description !== undefined) patch.description = input.description;
      if (input.scopes !== undefined) patch.scopes = unique(input.scopes);
      if (input.audiences !== undefined) patch.audiences = unique(input.audiences);
      if (input.accessTokenTtl !== undefined) {
        assertTtl(input.accessTokenTtl);
        patch.accessTokenTtl = input.accessTokenTtl;
      }
      if (input.status !== undefined) patch.status = input.status;
      if (input.actsForCreator !== undefined) patch.actsForCreator = input.actsForCreator;
      if (changedFields(patch).length === 0) return existing;
      return deps.grants.audited(context, { action: 'client.update', subjectId: existing.id }, () =>
        inTransaction(deps.db, deps.events, async (tx, emit) => {
          const before = await deps.repo.findByIdForUpdate(existing.id, tx);
          if (!before) throw notFound('client');
          // What is already so is no change: nothing written, no event, nothing granted.
          const effective = effectivePatch(patch, before);
          // Who turned it off decides who turns it back on: an administrator's disable holds against
          // its creator, also one sent to a client its creator had disabled already (which makes it
          // the administrator's). A creator's own disable never lifts an administrator's.
          const byAdministrator =
            effective.status === 'active'
              ? false
              : patch.status === 'disabled' && isAdministrator(caller)
                ? true
                : effective.status === 'disabled'
                  ? false
                  : undefined;
          const lock =
            byAdministrator === undefined
              ? {}
              : effectivePatch({ disabledByAdministrator: byAdministrator }, before);
          // The fields the caller changed; the record of who disabled it goes with its status.
          const changed = changedFields(effective);
          if (changed.length === 0 && lock.disabledByAdministrator === undefined) return before;
          if (changed.length === 0) changed.push('disabled_by_administrator');
          Object.assign(effective, lock);
          if (effective.scopes) await assertGrantable(caller, effective.scopes, tx);
          // Turned back on, sent to other audiences or given longer-lived tokens, the client's scopes
          // reach further: as with a fresh secret, a caller who has since lost one of them (a creator
          // demoted) cannot do that, whatever else the same change does to its scopes.
          if (widens(before, effective))
            await assertGrantable(
              caller,
              effective.scopes ?? before.scopes,
              tx,
              'The client holds permissions the caller does not',
            );
          // A client that acts on its own scopes is the organisation's: once disabled, only an
          // administrator turns it back on (its creator, since demoted, could otherwise empty its scopes
          // and have it identify the service again). One that acts for its creator is bounded by them,
          // and theirs to turn back on, unless an administrator turned it off.
          if (effective.status === 'active' && before.status !== 'active' && !isAdministrator(caller)) {
            if (!(effective.actsForCreator ?? before.actsForCreator))
              throw forbidden('Only an administrator turns a client that acts on its own scopes back on');
            if (before.disabledByAdministrator)
              throw forbidden('Only an administrator turns back on a client an administrator disabled');
          }
          // Bound to its creator: it can act for nobody without one recorded.
          if (effective.actsForCreator === true && !before.createdBy)
            throw new AppError('conflict', { detail: 'This client has no recorded creator to act for' });
          // Unbound: it acts on its own scopes in full, as an administrator's client does.
          if (effective.actsForCreator === false && !isAdministrator(caller))
            throw forbidden(
              'Only an administrator makes a client act on its own scopes (acts_for_creator: false)',
            );
          const row = await deps.repo.update(existing.id, effective, deps.clock.now(), tx);
          if (!row) throw notFound('client');
          // Disabled, newly bound (its tokens may carry more than its creator holds now), or narrowed (a
          // scope or an audience taken away, this service's own included when none were registered,
          // which its tokens still carry and introspection would still report): the tokens it holds
          // are revoked on every instance, as when its creator loses a role. It asks for new ones,
          // with what it has now.
          const narrowed =
            (effective.scopes !== undefined && notHeld(before.scopes, row.scopes).length > 0) ||
            (effective.audiences !== undefined && reachesFurther(row.audiences, before.audiences));
          if (
            (before.status === 'active' && row.status === 'disabled') ||
            effective.actsForCreator === true ||
            narrowed
          ) {
            emit(await revokeTokensOf(tx, row.clientId));
          }
          await deps.audit.record(tx, context, {
            type: 'client.updated',
            subjectId: row.id,
            data: {
              client_id: row.clientId,
              changed,
              ...(effective.scopes ? { scopes: row.scopes } : {}),
              ...(effective.status ? { status: row.status } : {}),
              ...(row.status === 'disabled' && effective.disabledByAdministrator !== undefined
                ? { disabled_by_administrator: row.disabledByAdministrator }
                : {}),
              ...(effective.actsForCreator !== undefined ? { acts_for_creator: row.actsForCreator } : {}),
            },
          });
          emit({ type: 'client_changed', clientId: row.clientId });
          return row;
        }),
      );
    },

    async remove(caller: ClientCaller, idOrClientId: string, context: RequestContext): Promise<void> {
      const existing = await visibleClient(caller, idOrClientId, 'client.delete');
      const refused = {
        action: 'client.delete',
        subjectId: existing.id,
        data: { client_id: existing.clientId },
      };
      await deps.grants.audited(context, refused, () =>
        inTransaction(deps.db, deps.events, async (tx, emit) => {
          // Locked, so an administrator's disable committing meanwhile is seen here, not deleted over.
          const locked = await deps.repo.findByIdForUpdate(existing.id, tx);
          if (!locked) throw notFound('client');
          // An administrator's disable holds against its creator (as for turning it back on): deleting
          // the client would end the record of it, and let them register it afresh.
          if (locked.status === 'disabled' && locked.disabledByAdministrator && !isAdministrator(caller))
            throw forbidden('Only an administrator deletes a client an administrator disabled');
          if (!(await deps.repo.delete(existing.id, tx))) throw notFound('client');
          emit(await revokeTokensOf(tx, existing.clientId));
          await deps.audit.record(tx, context, {
            type: 'client.deleted',
            subjectId: existing.id,
            data: { client_id: existing.clientId, name: locked.name },
          });
          emit({ type: 'client_changed', clientId: existing.clientId });
        }),
      );
    },

    /** A new secret, shown once; the current one keeps working for `graceSeconds` (0: not at all). */
    async rotateSecret(
      caller: TokenClientCaller,
      idOrClientId: string,
      graceSeconds: number,
      context: RequestContext,
      force = false,
    ) {
      const existing = await visibleClient(caller, idOrClientId, 'client.rotate_secret');
      const lookupId = existing.clientId.slice(CLIENT_ID_PREFIX.length);
      const { token: secret } = generateSecret(CLIENT_SECRET_FORMAT, lookupId);
      const now = deps.clock.now();
      const refused = { action: 'client.rotate_secret', subjectId: existing.id };
      const client = await deps.grants.audited(context, refused, () =>
        inTransaction(deps.db, deps.events, async (tx, emit) => {
          const locked = await deps.repo.findByIdForUpdate(existing.id, tx);
          if (!locked) throw notFound('client');
          assertNoGraceRunning(
            { hash: locked.previousSecretHash, expiresAt: locked.previousSecretExpiresAt },
            now,
            force,
          );
          // The new secret goes to the caller: a creator who has since lost a permission the client
          // holds does not get it back through a fresh secret.
          await assertGrantable(
            caller,
            locked.scopes,
            tx,
            'The client holds permissions the caller does not',
          );
          const row = await deps.repo.update(
            locked.id,
            {
              secretHash: hash(secret),
              // Only the secret being replaced gets a grace; an older one in its grace ends now (a
              // forced rotation: otherwise it was refused above).
              previousSecretHash: graceSeconds > 0 ? locked.secretHash : null,
              previousSecretExpiresAt: graceSeconds > 0 ? addSeconds(now, graceSeconds) : null,
            },
            now,
            tx,
          );
          if (!row) throw notFound('client');
          // A forced rotation ends the grace of the secret the last one replaced: the trail says so, and
          // until when that secret would have worked.
          const cutShort =
            locked.previousSecretHash !== null &&
            locked.previousSecretExpiresAt !== null &&
            locked.previousSecretExpiresAt > now;
          await deps.audit.record(tx, context, {
            type: 'client.secret_rotated',
            subjectId: row.id,
            data: {
              client_id: row.clientId,
              grace_seconds: graceSeconds,
              previous_secret_expires_at: row.previousSecretExpiresAt?.toISOString() ?? null,
              ...(force ? { force: true } : {}),
              ...(cutShort ? { ended_grace_until: locked.previousSecretExpiresAt!.toISOString() } : {}),
            },
          });
          emit({ type: 'client_changed', clientId: row.clientId });
          return row;
        }),
      );
      return { client, secret };
    },

    /**
     * Client authentication (RFC 6749 §2.3.1): the active client whose current secret, or previous
     * secret within its grace, this is. The secret carries the client's lookup id and a checksum, so
     * a mistyped or foreign secret fails before any database read; hashes compare in constant time.
     */
    /**
     * The active client an HTTP Basic header authenticated before, from memory alone: the header's
     * digest remembered by `authenticate` (given the header), and the client's cached row. A service
     * that sends the same header on every request is known without parsing it, without an HMAC and
     * without a promise; undefined for anything else, which `authenticate` answers.
     */
    rememberedBasic(header: string): ClientRow | undefined {
      const known = verified.get(verified.keyOf(BASIC_KEY, header), deps.clock.nowMs());
      if (!known) return undefined;
      const client = cache.peek(known.owner)?.value;
      return client?.status === 'active' && stillMatches(client, known) ? actingNow(client) : undefined;
    },

    /** `basicHeader`: the Authorization header the id and secret came in, remembered with them. */
    async authenticate(
      clientId: string,
      secret: string,
      basicHeader?: string,
    ): Promise<
      { ok: true; client: ClientRow } | { ok: false; reason: ClientAuthFailure; client?: ClientRow }
    > {
      if (clientId.length > MAX_CLIENT_ID_LENGTH) return { ok: false, reason: 'malformed' };
      if (secret.length > MAX_SECRET_LENGTH) {
        // Not one of its secrets, for a registered client all the same: audited as its other failures.
        const client = CLIENT_ID_PATTERN.test(clientId) ? await findCached(clientId) : undefined;
        return client ? { ok: false, reason: 'malformed', client } : { ok: false, reason: 'malformed' };
      }
      const now = deps.clock.now();
      const credential = verified.keyOf(clientId, secret);
      const known = verified.get(credential, now.getTime());
      if (known?.owner === clientId) {
        const client = await findCached(clientId);
        // A previous secret's entry ends with its grace; the client's state is checked every time.
        if (client?.status === 'active' && stillMatches(client, known))
          return { ok: true, client: await acting(client) };
      }
      const generation = verified.generation;
      const parsed = parseSecret(CLIENT_SECRET_FORMAT, secret);
      if (!CLIENT_ID_PATTERN.test(clientId)) return { ok: false, reason: 'unknown_client' };
      const client = await findCached(clientId);
      if (!client) return { ok: false, reason: 'unknown_client' };
      // Not one of this client's secrets by its form (garbage, or another client's): a failure of a
      // registered client all the same, audited as its other failures are.
      if (!parsed || `${CLIENT_ID_PREFIX}${parsed.lookupId}` !== clientId)
        return { ok: false, reason: 'malformed', client };
      const presented = hash(secret);
      const current = digestsEqual(presented, client.secretHash);
      const previous =
        client.previousSecretHash !== null &&
        client.previousSecretExpiresAt !== null &&
        client.previousSecretExpiresAt > now &&
        digestsEqual(presented, client.previousSecretHash);
      if (!current && !previous) return { ok: false, reason: 'wrong_secret', client };
      if (client.status !== 'active') return { ok: false, reason: 'disabled', client };
      const entry = {
        owner: clientId,
        previous: !current,
        endsAtMs: current ? undefined : client.previousSecretExpiresAt?.getTime(),
        stored: current ? client.secretHash : client.previousSecretHash!,
      };
      verified.remember(credential, entry, generation, now.getTime());
      if (basicHeader !== undefined)
        verified.remember(verified.keyOf(BASIC_KEY, basicHeader), entry, generation, now.getTime());
      return { ok: true, client: await acting(client) };
    },

    /** The client registered under a client_id (cached), whatever its state. */
    findByClientId: findCached,

    handle(event: AuthEvent) {
      creators.handle(event);
      if (event.type === 'client_changed') {
        cache.delete(event.clientId);
        verified.forget(event.clientId);
      } else if (event.type === 'resync') {
        cache.clear();
        verified.clear();
      }
    },
  };
}

export type ClientsService = ReturnType<typeof createClientsService>;
