import type { Logger } from 'pino';
import { randomUUID } from 'node:crypto';
import type { Database, Executor, Transaction } from '../../db/client.js';
import type { IdentityProvider } from '../../identity/provider.js';
import { AppError, forbidden, notFound } from '../../lib/errors.js';
import { type AuthEvent, type EventBus, inTransaction } from '../../lib/events.js';
import { decodeCursor, paginate } from '../../lib/pagination.js';
import { hasPermission } from '../../lib/permissions.js';
import type { AuditService, RequestContext } from '../audit/audit.service.js';
import type { AuthService } from '../auth/auth.service.js';
import type { SessionsRepository } from '../auth/sessions.repository.js';
import type { SessionsService } from '../auth/sessions.service.js';
import type { GrantCeiling, Grantor } from '../roles/grant-ceiling.js';
import type { RolesRepository } from '../roles/roles.repository.js';
import { ROLE_REFUSAL } from '../roles/roles.service.js';
import { isUntakenInvitation, type UserRow, type UsersRepository } from './users.repository.js';
import type { ClientsRepository } from '../clients/clients.repository.js';
import type { ApiKeysRepository } from '../api-keys/api-keys.repository.js';
import { revokeKeysOfOwner } from '../api-keys/owner-keys.js';
import type { EmailTokensRepository } from '../auth/email-tokens.repository.js';
import type { MfaService } from '../auth/mfa.service.js';
import { normalizeEmail } from '../auth/auth.schema.js';
import { MAILS_PER_ACCOUNT_HOUR, waitBeforeNextMail } from '../auth/mailed-tokens.js';
import type { Reservation } from '../../lib/throttle.js';
import type { Clock } from '../../lib/clock.js';

const ADMIN_ROLE = 'admin';
/** The role every account has from its start. */
const USER_ROLE = 'user';

/** An active account an administrator made whose owner has not taken it yet (users.repository). */
const isInvitation = (user: UserRow) => user.status === 'active' && isUntakenInvitation(user);
const MANAGE_REFUSAL = 'You cannot act on a user who holds permissions you do not hold yourself';
/** Taking a role away takes what it gives: the grant ceiling's refusal, said of a removal. */
const REMOVAL_REFUSAL = 'You cannot remove a role that gives permissions you do not hold yourself';
/** An invited account is given the `user` role: the grant ceiling's refusal, said of an invitation. */
const INVITATION_REFUSAL =
  'You cannot invite a user: every account holds the user role, which gives permissions you do not hold yourself';

export function createUsersService(deps: {
  db: Database;
  repo: UsersRepository;
  roles: RolesRepository;
  sessions: SessionsService;
  auth: AuthService;
  provider: IdentityProvider;
  audit: AuditService;
  events: EventBus;
  grants: GrantCeiling;
  clients: Pick<ClientsRepository, 'clientIdsActingFor' | 'findByClientId' | 'disableActingFor'>;
  apiKeys: Pick<ApiKeysRepository, 'revokeAllOfOwner'>;
  /** Links already mailed (password reset, email confirmation) stop working when the user is cut off. */
  emailTokens: Pick<EmailTokensRepository, 'discardUnused' | 'latestFor' | 'expireRequestedBy'>;
  /** MFA_REQUIRED_ROLES: granted only to users with a second factor. */
  mfaRequiredRoles: readonly string[];
  mfa: Pick<MfaService, 'isEnabled'>;
  /** The session an authorization check may name (its `amr`: whether it gave a second factor). */
  sessionRows: Pick<SessionsRepository, 'findSession'>;
  clock: Clock;
  logger?: Pick<Logger, 'error'>;
}) {
  async function findOrThrow(id: string): Promise<UserRow> {
    const user = await deps.repo.findById(id);
    if (!user) throw notFound('user');
    return user;
  }

  /**
   * Granting or removing a role, on the transaction of the change: the user and the role exist, and
   * the caller holds, now, roles:assign and all the role gives (else 403 saying `refusal`).
   */
  async function assertMayChangeGrant(
    tx: Transaction,
    id: string,
    roleName: string,
    caller: Grantor,
    refusal: string,
  ) {
    // Locked: a deletion racing the grant either waits for it or has happened (404), never leaving
    // the grant to refer to a user who is gone.
    if (!(await deps.repo.findByIdForKeyShare(id, tx))) throw notFound('user');
    const role = await deps.roles.findForShare(roleName, tx);
    if (!role) throw notFound('role');
    await deps.grants.assertHolds(caller, ['roles:assign', ...role.permissions], tx, refusal);
  }

  /**
   * Disabling, deleting, turning off the second factor or mailing a reset link is for a caller who
   * holds everything the user holds: what removing their roles would need (`users:write` alone
   * does not reach an administrator). 403 otherwise (audited as every refusal is). Its transaction is
   * run again when PostgreSQL ends it for a deadlock (two administrators disabling each other: each
   * check waits for the other's change, which waits for it), as every changing transaction is.
   */
  async function assertMayManage(caller: Grantor, id: string): Promise<void> {
    await inTransaction(deps.db, deps.events, (tx) => assertMayManageIn(tx, caller, id));
  }

  /** assertMayManage on the caller's transaction (a change that takes its own locks first). */
  async function assertMayManageIn(tx: Executor, caller: Grantor, id: string): Promise<void> {
    const { permissions } = await deps.repo.rolesAndPermissions(id, tx);
    await deps.grants.assertHolds(caller, permissions, tx, MANAGE_REFUSAL);
  }

  /**
   * assertMayManageIn on the transaction of an administrator's change to the user that takes no
   * admins' lock (ending their sessions, mailing a reset link, moving their address, turning their
   * second factor off), first thing, after locking the user's row FOR UPDATE: a role granted them
   * meanwhile (whose grant key-share locks that row until it commits) is waited for and seen, so who
   * lacks it is refused (403) and nothing changes. 404 for no such user; else the user, as locked.
   */
  async function assertMayManageLocked(tx: Executor, caller: Grantor, id: string): Promise<UserRow> {
    const user = await deps.repo.findByIdForKeyUpdate(id, tx);
    if (!user) throw notFound('user');
    await assertMayManageIn(tx, caller, id);
    return user;
  }

  /** Refuses a change that would leave no active admin (API.md: removing the last admin → 409). */
  async function assertNotLastAdmin(tx: Transaction, userId: string): Promise<void> {
    refuseLastAdmin(await deps.repo.lockRoleHolders(ADMIN_ROLE, tx), userId);
  }

  /** The 409 of taking `userId` out of `admins`, the active admins as locked (lockRoleHolders), if it is the last. */
  function refuseLastAdmin(admins: readonly string[], userId: string): void {
    if (admins.includes(userId) && admins.length <= 1) {
      throw new AppError('last_admin', {
        detail: 'This is the last active admin; grant admin to someone else first',
      });
    }
  }

  /**
   * Ends everything a user holds, on every instance: sessions, access tokens (by subject), cached keys,
   * password reset links already mailed, the email changes they asked for other users as an
   * administrator (an address they would move after their removal), and the access tokens of the
   * clients that act for them (their scopes were what the user held when issued; new ones carry none).
   */
  async function cutOff(tx: Transaction, userId: string, reason: string, emit: (e: AuthEvent) => void) {
    (await deps.sessions.endAllSessions(tx, userId, reason)).forEach(emit);
    await deps.emailTokens.discardUnused(userId, undefined, tx);
    await deps.emailTokens.expireRequestedBy(userId, deps.clock.now(), tx);
    emit(await deps.auth.subjectRevocation(tx, userId));
    for (const clientId of await deps.clients.clientIdsActingFor(userId, tx))
      emit(await deps.auth.subjectRevocation(tx, clientId));
    emit({ type: 'user_changed', userId });
  }

  return {
    async list(options: {
      query?: string | undefined;
      status?: 'active' | 'disabled' | undefined;
      role?: string | undefined;
      limit: number;
      cursor?: string | undefined;
    }) {
      const cursor = decodeCursor(options.cursor);
      const rows = await deps.repo.list({
        limit: options.limit,
        ...(options.query ? { query: options.query } : {}),
        ...(options.status ? { status: options.status } : {}),
        ...(options.role ? { role: options.role } : {}),
        ...(cursor ? { cursor } : {}),
      });
      return paginate(rows, options.limit);
    },

    get: findOrThrow,

    async setStatus(
      id: string,
      status: 'active' | 'disabled',
      caller: Grantor,
      context: RequestContext,
    ): Promise<UserRow> {
      const user = await findOrThrow(id);
      // Checked before the no-op: what is already so is answered only to who may change it; and before
      // Supabase is asked (a ban is no part of the transaction). Checked again in the change's.
      await assertMayManage(caller, id);
      const banned = user.provider === deps.provider.name && deps.provider.setBanned;
      // Disabled by a deletion still asking Supabase (`delete`): disabling them is a change, which that
      // deletion, if Supabase refuses it, leaves in place rather than enabling them again.
      const deleting = user.status === 'disabled' && user.deletingSince !== null;
      if (user.status === status && !(status === 'disabled' && deleting)) {
        // Enabling an active user lifts a ban Supabase may still hold: one a disable applied there
        // while it answered too late (a 503 here), which nothing else would lift.
        if (banned && status === 'active') {
          await deps.provider.setBanned!(id, false);
          // A disable that committed meanwhile (its ban sent before this lifted it) keeps its ban.
          const now = await findOrThrow(id);
          if (now.status === 'disabled') await deps.provider.setBanned!(id, true);
          return now;
        }
        return user;
      }
      // The provider first, as for a deletion: if Supabase refuses, nothing changed here and the
      // client may retry. (A ban applied for a disable that then fails here, or that Supabase may have
      // applied though its answer failed, is lifted again.)
      if (banned && status === 'disabled')
        await inTransaction(deps.db, deps.events, (tx) => assertNotLastAdmin(tx, id));
      if (banned)
        await deps.provider.setBanned!(id, status === 'disabled').catch(async (err: unknown) => {
          if (status === 'disabled') await deps.provider.setBanned!(id, false).catch(() => undefined);
          throw err;
        });
      const changed = await inTransaction(deps.db, deps.events, async (tx, emit) => {
        // As removeRole: the admins locked first, then what the user holds, on the transaction that
        // changes them. A role granted them since the check above (an admin's grant, which holds its
        // granter's row until it commits, is waited for) is seen: not disabled by who lacks it.
        if (status === 'disabled') await assertNotLastAdmin(tx, id);
        await assertMayManageIn(tx, caller, id);
        // Conditional, so of concurrent identical requests one changes the user (and is audited), and
        // the others find it done.
        const updated = await deps.repo.changeStatus(id, status, tx);
        if (!updated) return undefined;
        if (status === 'disabled') await cutOff(tx, id, 'user_disabled', emit);
        else emit({ type: 'user_changed', userId: id });
        await deps.audit.record(tx, context, {
          type: status === 'disabled' ? 'user.disabled' : 'user.enabled',
          subjectId: id,
        });
        return updated;
      }).catch(async (err: unknown) => {
        if (banned && status === 'disabled') await deps.provider.setBanned!(id, false).catch(() => undefined);
        throw err;
      });
      return changed ?? findOrThrow(id);
    },

    /**
     * An account made by an administrator (`caller`) for `email`: active, with the `user` role and a
     * profile, no password and the address unconfirmed, until its owner opens the invitation that
     * `write` stores with its mail and chooses a password (a password reset, which confirms the
     * address). The caller must hold what the `user` role gives. The account, its link and its mail
     * commit together, and the mail goes once they have (the step `write` returns): nothing is visible
     * before, and nothing waits for the mail server. An address whose account is still an invitation
     * (built-in, no password chosen nor address proven yet) gets its invitation again (`created:
     * false`; 409 within a minute of the last mail); any other account is 409 `email_taken`. Each
     * invitation mailed takes the address's place under the hourly cap of its links (`reserve`, shared
     * with the reset links anyone may ask for: MAILS_PER_ACCOUNT_HOUR, with rate limiting on): 409 once
     * the address had its cap, and an administrator sending it again every minute floods no mailbox.
     */
    async invite(
      input: { email: string; displayName?: string | undefined },
      caller: Grantor,
      context: RequestContext,
      mail: {
        write: (user: UserRow, tx: Transaction) => Promise<() => void>;
        reserve: (email: string) => Promise<Reservation | undefined>;
      },
    ): Promise<{ user: UserRow; created: boolean }> {
      const email = normalizeEmail(input.email);
      let send: () => void = () => undefined;
      // Taken once the request is known to mail (after the checks that refuse it), once however often
      // the transaction is run, and given back when it does not commit.
      let place: Promise<Reservation | undefined> | undefined;
      const takePlace = async () => {
        place ??= mail.reserve(email);
        const slot = await place;
        if (slot && slot.retryAfter > 0)
          throw new AppError('conflict', {
            detail: `${MAILS_PER_ACCOUNT_HOUR} invitations or reset links were mailed to this address in the last hour; wait before another`,
          });
      };
      const invited = await inTransaction(deps.db, deps.events, async (tx) => {
        const role = await deps.roles.findForShare(USER_ROLE, tx);
        await deps.grants.assertHolds(caller, role?.permissions ?? [], tx, INVITATION_REFUSAL);
        const existing = await deps.repo.findByEmail(email, tx);
        if (existing) {
          const user = await deps.repo.findByIdForUpdate(existing.id, tx);
          if (!user || !isInvitation(user)) throw new AppError('email_taken');
          // Mailing it again voids the link mailed before, as a reset link does: for a caller who
          // holds everything the invited user holds (an invited administrator is not one for
          // `users:write` alone), as `assertMayManage` asks.
          const held = await deps.repo.rolesAndPermissions(user.id, tx);
          await deps.grants.assertHolds(caller, held.permissions, tx, MANAGE_REFUSAL);
          const last = await deps.emailTokens.latestFor(user.id, 'password_reset', tx);
          if (waitBeforeNextMail(last, deps.clock.now()) > 0)
            throw new AppError('conflict', { detail: 'An invitation was mailed less than a minute ago' });
          await takePlace();
          // A name given again is the one the invitation now says (nobody has signed in to set it).
          // The audit event says when it changed the name, as a profile change would.
          const renamed =
            input.displayName !== undefined &&
            (await deps.repo.setDisplayName(user.id, input.displayName, deps.clock.now(), tx));
          send = await mail.write(user, tx);
          await deps.audit.record(tx, context, {
            type: 'user.invited',
            subjectId: user.id,
            data: {
              email_domain: email.split('@')[1] ?? null,
              again: true,
              ...(renamed ? { display_name_changed: true } : {}),
            },
          });
          return { user, created: false };
        }
        const row = await deps.repo.insert(
          { id: randomUUID(), email, provider: 'local', passwordHash: null, emailConfirmedAt: null },
          tx,
        );
        if (!row) {
          // Made meanwhile (the same invitation sent twice at once, or a registration): what a
          // request a moment later would be told.
          const taken = await deps.repo.findByEmail(email, tx);
          if (taken && isInvitation(taken))
            throw new AppError('conflict', { detail: 'An invitation was mailed less than a minute ago' });
          throw new AppError('email_taken');
        }
        await takePlace();
        // `granted_by` names a user (an API key's owner); a service's grant is in the audit event.
        const grantedBy = context.actorType === 'service' ? null : context.actorId;
        await deps.repo.assignRole(row.id, USER_ROLE, grantedBy, tx);
        await deps.repo.createProfile(row.id, input.displayName ?? null, tx);
        send = await mail.write(row, tx);
        await deps.audit.record(tx, context, {
          type: 'user.invited',
          subjectId: row.id,
          data: { email_domain: email.split('@')[1] ?? null },
        });
        return { user: row, created: true };
      }).catch(async (err: unknown) => {
        const slot = await place?.catch(() => undefined);
        if (slot && slot.retryAfter === 0) await slot.release();
        throw err;
      });
      send();
      return invited;
    },

    /** 409 when deleting the user would leave no admin (checked again by `delete`). */
    async assertDeletable(id: string): Promise<void> {
      await inTransaction(deps.db, deps.events, (tx) => assertNotLastAdmin(tx, id));
    },

    assertMayManage,

    assertMayManageLocked,

    /** A user's live sessions, newest first (404 for no such user). */
    async listSessions(id: string, options: { limit: number; cursor?: string | undefined }) {
      await findOrThrow(id);
      return deps.auth.listSessions(id, options);
    },

    /**
     * Signs a user out: one session (`sessionId`; 404 unless it is one of theirs, live), or every one,
     * with their access tokens, email change in waiting and sign-in links not yet opened, as their own
     * logout-all does. For support: a stolen session, a lost device. Needs all the user holds.
     */
    async endSessions(id: string, caller: Grantor, context: RequestContext, sessionId?: string) {
      await inTransaction(deps.db, deps.events, async (tx, emit) => {
        await assertMayManageLocked(tx, caller, id);
        let ended: string[];
        if (sessionId) {
          const session = await deps.sessionRows.findSession(sessionId, tx);
          // Live, as the list shows them: one past its idle or absolute end is 404, as a revoked one.
          if (!session || session.userId !== id || !deps.sessions.isLive(session)) throw notFound('session');
          const events = await deps.sessions.endSession(tx, sessionId, 'ended_by_administrator');
          // Ended meanwhile (the same request twice at once): 404, as after it, and one event.
          if (events.length === 0) throw notFound('session');
          events.forEach(emit);
          ended = [sessionId];
        } else {
          const events = await deps.sessions.endAllSessions(tx, id, 'ended_by_administrator');
          events.forEach(emit);
          await deps.emailTokens.discardUnused(id, 'email_change', tx);
          await deps.emailTokens.discardUnused(id, 'magic_link', tx);
          ended = events.flatMap((e) => (e.type === 'revocation' ? [e.value] : []));
        }
        await deps.audit.record(tx, context, {
          type: 'user.sessions_ended',
          subjectId: id,
          data: { scope: sessionId ? 'session' : 'all', sessions: ended },
        });
      });
    },

    /**
     * 403 when `caller` is `userId` themselves, whatever credential holds the permission: a session, an
     * API key, or an app client the user registered (one made before a second factor, say). For what a
     * user does to their own account otherwise, with their password or a code.
     */
    async assertNotOwn(caller: Grantor, userId: string, detail: string): Promise<void> {
      const behind =
        caller.kind === 'service'
          ? (await deps.clients.findByClientId(caller.clientId))?.createdBy
          : caller.userId;
      if (behind === userId) throw forbidden(detail);
    },

    /** `caller` absent: the user deletes themselves (DELETE /v1/auth/me). */
    async delete(id: string, context: RequestContext, caller?: Grantor): Promise<void> {
      const user = await findOrThrow(id);
      // Checked before Supabase is asked, and again (as removeRole does: after the admins' lock) in the
      // transaction that decides the deletion, which sees a role granted the user meanwhile.
      if (caller) await assertMayManage(caller, id);
      const supabase = user.provider === deps.provider.name && deps.provider.name !== 'local';
      if (supabase) {
        // Supabase's deletion cannot be undone, so this one is decided here first: the user is
        // disabled (which takes them out of the last-admin count, and ends what they hold) in a
        // transaction that checks they are not the last admin. Two administrators deleting each other
        // at once then see one another's, and one is refused before Supabase is asked. If Supabase
        // fails, an account that was active is enabled again (its sessions stay ended), unless its
        // status changed meanwhile: an administrator who disabled it (or enabled it) has the last word.
        const reserved = await inTransaction(deps.db, deps.events, async (tx, emit) => {
          await assertNotLastAdmin(tx, id);
          if (caller) await assertMayManageIn(tx, caller, id);
          const disabled = await deps.repo.disableForDeletion(id, tx);
          if (disabled) await cutOff(tx, id, 'user_deleted', emit);
          return disabled?.deletingSince ?? undefined;
        });
        try {
          await deps.provider.deleteUser(id);
        } catch (err) {
          if (reserved)
            await inTransaction(deps.db, deps.events, async (tx, emit) => {
              if (await deps.repo.enableAfterRefusedDeletion(id, reserved, tx))
                emit({ type: 'user_changed', userId: id });
            }).catch((restore: unknown) =>
              // The account stays disabled with nothing saying why but this: an administrator enables it.
              deps.logger?.error(
                { err: restore, userId: id, reqId: context.requestId },
                'a deletion Supabase refused left the user disabled: enabling them again failed',
              ),
            );
          throw err;
        }
      } else {
        await inTransaction(deps.db, deps.events, (tx) => assertNotLastAdmin(tx, id));
      }
      await inTransaction(deps.db, deps.events, async (tx, emit) => {
        await assertNotLastAdmin(tx, id);
        // Supabase's deletion, done, was decided in its own transaction (above): not refused after it.
        if (caller && !supabase) await assertMayManageIn(tx, caller, id);
        await cutOff(tx, id, 'user_deleted', emit);
        // The keys go with the row; each one's history says how it ended, and every instance forgets
        // it at once (a cached key would answer owner_disabled, not not_found, until it aged out).
        const at = deps.clock.now();
        for (let pass = 0; pass < 5; pass++)
          if ((await revokeKeysOfOwner(deps, tx, id, at, context, 'owner_deleted', emit)) === 0) break;
        // The clients that act for them can never act again: disabled while they still name their
        // creator, so their secrets are refused (invalid_client) rather than told to wait for a user
        // who will not come back, and no later change of theirs hands the secret its scopes again.
        for (const client of await deps.clients.disableActingFor(id, at, tx)) {
          await deps.audit.record(tx, context, {
            type: 'client.updated',
            subjectId: client.id,
            data: {
              client_id: client.clientId,
              changed: ['status'],
              status: 'disabled',
              reason: 'creator_deleted',
            },
          });
          emit({ type: 'client_changed', clientId: client.clientId });
        }
        // Profile, sessions, refresh tokens, API keys and role grants go with the row (ON DELETE CASCADE);
        // audit events are kept: they are not foreign keys. A concurrent deletion that got there first
        // makes this one a 404, its revocations and event rolled back.
        if (!(await deps.repo.delete(id, tx))) throw notFound('user');
        await deps.audit.record(tx, context, {
          type: 'user.deleted',
          subjectId: id,
          data: { email_domain: user.email.split('@')[1] },
        });
      });
    },

    async rolesOf(id: string) {
      await findOrThrow(id);
      return deps.repo.rolesAndPermissions(id);
    },

    async grantRole(id: string, roleName: string, caller: Grantor, context: RequestContext) {
      return deps.grants.audited(
        context,
        { action: 'role.grant', subjectId: id, data: { role: roleName } },
        () =>
          inTransaction(deps.db, deps.events, async (tx, emit) => {
            await assertMayChangeGrant(tx, id, roleName, caller, ROLE_REFUSAL);
            // `granted_by` names a user; a service's grant is in the audit event, by its client id.
            const grantedBy = context.actorType === 'service' ? null : context.actorId;
            const added = await deps.repo.assignRole(id, roleName, grantedBy, tx);
            // A role that counts only with a second factor goes to users who have one: else whoever
            // has their password would set one up and hold the role (MFA_REQUIRED_ROLES). Asked of a
            // new assignment only (refused, it rolls back): the PUT is idempotent, so a role held
            // already (granted before MFA_REQUIRED_ROLES named it) is "held already", not a 409.
            if (
              added &&
              deps.mfaRequiredRoles.includes(roleName) &&
              !(await deps.mfa.isEnabled(id, tx, true))
            ) {
              throw new AppError('conflict', {
                detail: `The ${roleName} role is for users with two-step verification on: they set it up first`,
              });
            }
            if (added) {
              await deps.audit.record(tx, context, {
                type: 'role.granted',
                subjectId: id,
                data: { role: roleName },
              });
              emit({ type: 'user_changed', userId: id });
            }
            return { added };
          }),
      );
    },

    async removeRole(id: string, roleName: string, caller: Grantor, context: RequestContext) {
      await deps.grants.audited(
        context,
        { action: 'role.remove', subjectId: id, data: { role: roleName } },
        () =>
          inTransaction(deps.db, deps.events, async (tx, emit) => {
            // The admins are locked first, as every change that may take the last one does (a disable,
            // a deletion): taken after the locks the checks below take (the caller's session, the
            // user's row), two administrators acting on each other waited on each other's.
            const admins =
              roleName === ADMIN_ROLE ? await deps.repo.lockRoleHolders(ADMIN_ROLE, tx) : undefined;
            await assertMayChangeGrant(tx, id, roleName, caller, REMOVAL_REFUSAL);
            // Taking a role away acts on the user, as disabling does: not on one who holds more than
            // the caller (a user manager would strip an auditor's roles, an administrator's `user`).
            await assertMayManageIn(tx, caller, id);
            if (admins) refuseLastAdmin(admins, id);
            const removed = await deps.repo.removeRole(id, roleName, tx);
            if (!removed) throw notFound('role assignment');
            // The clients acting for them carry what they held in tokens of up to a day: those end.
            for (const clientId of await deps.clients.clientIdsActingFor(id, tx))
              emit(await deps.auth.subjectRevocation(tx, clientId));
            await deps.audit.record(tx, context, {
              type: 'role.removed',
              subjectId: id,
              data: { role: roleName },
            });
            emit({ type: 'user_changed', userId: id });
          }),
      );
    },

    /**
     * For services deciding on a user's request: which of these permissions the user holds now. The
     * roles of MFA_REQUIRED_ROLES count only for a session that gave a second factor, as in the
     * session's own tokens: with `sessionId` (the access token's `sid`), as that session holds them;
     * without, as a session that did not. `mfa_required` names what is missing that a second factor
     * would give. A session that has ended holds nothing.
     */
    async check(subjectId: string, permissions: string[], sessionId?: string) {
      const user = await deps.repo.findById(subjectId);
      if (!user) throw notFound('user');
      let secondFactor = false;
      let live = user.status === 'active';
      if (sessionId !== undefined) {
        const session = await deps.sessionRows.findSession(sessionId);
        if (!session || session.userId !== subjectId)
          throw new AppError('not_found', {
            detail: 'The user has no session with this id',
            errors: [{ field: 'body.session_id', message: 'is not a session of subject_id' }],
          });
        const now = deps.clock.now();
        live &&= !session.revokedAt && session.idleExpiresAt > now && session.expiresAt > now;
        secondFactor = session.amr.includes('mfa');
      }
      if (!live) return { allowed: false, missing: permissions };
      const withheld = secondFactor ? [] : deps.mfaRequiredRoles;
      const held = (await deps.repo.rolesAndPermissions(subjectId, undefined, { except: withheld }))
        .permissions;
      const missing = permissions.filter((p) => !hasPermission(held, p));
      if (missing.length === 0 || withheld.length === 0) return { allowed: missing.length === 0, missing };
      const withFactor = (await deps.repo.rolesAndPermissions(subjectId)).permissions;
      const mfaRequired = missing.filter((p) => hasPermission(withFactor, p));
      return { allowed: false, missing, ...(mfaRequired.length ? { mfa_required: mfaRequired } : {}) };
    },
  };
}

export type UsersService = ReturnType<typeof createUsersService>;
