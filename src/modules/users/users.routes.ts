import type { FastifyInstance } from 'fastify';
import type { ZodTypeProvider } from 'fastify-type-provider-zod';
import { z } from 'zod';
import { pageOf } from '../../lib/pagination.js';
import { hasPermission } from '../../lib/permissions.js';
import { principalOf, requestContext } from '../../plugins/authenticate.js';
import { PaginationQuerySchema } from '../../lib/pagination.js';
import {
  EmailChangeRequestedSchema,
  SessionListSchema,
  toSessionInfo,
  toUserDto,
} from '../auth/auth.schema.js';
import { bearerOrApiKey, problems } from '../shared/shared.schema.js';
import {
  AdminEmailChangeBodySchema,
  InviteUserBodySchema,
  AuthzCheckBodySchema,
  AuthzCheckResultSchema,
  ListUsersQuerySchema,
  PatchUserBodySchema,
  UserIdParamsSchema,
  UserRoleParamsSchema,
  UserRolesSchema,
  UserSessionParamsSchema,
  UserDetailSchema,
  UserSchema,
} from './users.schema.js';
import type { UsersService } from './users.service.js';
import type { PasswordResetService } from '../auth/password-reset.service.js';
import type { MfaService } from '../auth/mfa.service.js';
import type { EmailChangeService } from '../auth/email-change.service.js';

export async function usersRoutes(
  app: FastifyInstance,
  deps: {
    users: UsersService;
    passwordReset: PasswordResetService;
    emailChange: EmailChangeService;
    mfa: Pick<MfaService, 'isEnabled'>;
    /** PUBLIC_URL's path ('' when it has none): what a 201's Location starts with. */
    basePath: string;
  },
) {
  const r = app.withTypeProvider<ZodTypeProvider>();
  const security = bearerOrApiKey;

  r.get(
    '/v1/users',
    {
      config: { permission: 'users:read' },
      schema: {
        tags: ['users'],
        operationId: 'listUsers',
        summary: 'List users (search by email, filter by status or role, cursor pagination)',
        security,
        querystring: ListUsersQuerySchema,
        response: { 200: pageOf(UserSchema), ...problems(400, 401, 403) },
      },
    },
    async (request) => {
      const { page, nextCursor } = await deps.users.list(request.query);
      return { data: page.map(toUserDto), next_cursor: nextCursor };
    },
  );

  r.post(
    '/v1/users',
    {
      config: { permission: 'users:write' },
      schema: {
        tags: ['users'],
        operationId: 'inviteUser',
        summary: 'Make an account for someone and mail them an invitation to choose their password',
        description:
          'Built-in provider. The account has the `user` role and no password until its owner opens the ' +
          'invitation (`PASSWORD_RESET_URL#token=prs_…`, valid `INVITATION_TTL` seconds) and posts a ' +
          'password to `POST /v1/auth/password/reset`, which also confirms the address; until then sign-in ' +
          'answers as for a wrong password, and `POST /v1/auth/password/forgot` mails a new link. The ' +
          'caller must hold what the `user` role gives. Asked again for an account that is still an ' +
          'invitation (no password chosen, the address not confirmed), it mails a new one (200; 409 within ' +
          'a minute of the last, or once the address was mailed five invitations or reset links in the hour). 409 ' +
          '`email_taken` for any other account. The mail goes after the answer, retried while the mail server ' +
          'refuses it; 404 with ' +
          'Supabase (invite through Supabase) or without `SMTP_URL` in production.',
        security,
        body: InviteUserBodySchema,
        response: {
          201: UserSchema.describe('Made; the invitation is on its way (`Location`: the user)'),
          200: UserSchema.describe(
            'The address’s account is an invitation not yet taken: a new one is on its way, replacing the last',
          ),
          ...problems(400, 401, 403, 404, 409, 503),
        },
      },
    },
    async (request, reply) => {
      deps.passwordReset.assertInvitationsAvailable();
      const { user, created } = await deps.users.invite(
        { email: request.body.email, displayName: request.body.display_name },
        principalOf(request),
        requestContext(request),
        {
          write: (invited, tx) => deps.passwordReset.writeInvitation(invited, tx),
          reserve: (email) => deps.passwordReset.reserveInvitation(email),
        },
      );
      return reply
        .status(created ? 201 : 200)
        .header('location', `${deps.basePath}/v1/users/${user.id}`)
        .send(toUserDto(user));
    },
  );

  r.get(
    '/v1/users/:id',
    {
      config: { permission: 'users:read' },
      schema: {
        tags: ['users'],
        operationId: 'getUser',
        summary: 'Read a user',
        security,
        params: UserIdParamsSchema,
        response: { 200: UserDetailSchema, ...problems(400, 401, 403, 404) },
      },
    },
    async (request) => ({
      ...toUserDto(await deps.users.get(request.params.id)),
      mfa_enabled: await deps.mfa.isEnabled(request.params.id),
    }),
  );

  r.patch(
    '/v1/users/:id',
    {
      config: { permission: 'users:write' },
      schema: {
        tags: ['users'],
        operationId: 'updateUser',
        summary: 'Disable or enable a user',
        description: 'Disabling ends every session at once and stops the user’s tokens and API keys.',
        security,
        params: UserIdParamsSchema,
        body: PatchUserBodySchema,
        response: { 200: UserSchema, ...problems(400, 401, 403, 404, 409) },
      },
    },
    async (request) =>
      toUserDto(
        await deps.users.setStatus(
          request.params.id,
          request.body.status,
          principalOf(request),
          requestContext(request),
        ),
      ),
  );

  r.delete(
    '/v1/users/:id',
    {
      config: { permission: 'users:write' },
      schema: {
        tags: ['users'],
        operationId: 'deleteUser',
        summary: 'Delete a user with their profile, sessions, API keys and role grants (the audit log stays)',
        security,
        params: UserIdParamsSchema,
        response: { 204: z.null(), ...problems(400, 401, 403, 404, 409, 503) },
      },
    },
    async (request, reply) => {
      await deps.users.delete(request.params.id, requestContext(request), principalOf(request));
      return reply.status(204).send(null);
    },
  );

  r.post(
    '/v1/users/:id/password-reset',
    {
      config: { permission: 'users:write' },
      schema: {
        tags: ['users'],
        operationId: 'sendPasswordReset',
        summary: 'Mail the user a password reset link (for support: a user who cannot sign in)',
        description:
          'The link the user would get from `POST /v1/auth/password/forgot`; the administrator never sees ' +
          'it. 409 for a disabled user, when recovery is off (no `SMTP_URL`), or when a link was mailed less ' +
          'than a minute ago.',
        security,
        params: UserIdParamsSchema,
        response: {
          204: z.null().describe('The reset link is on its way to the user'),
          ...problems(400, 401, 403, 404, 409, 422, 503),
        },
      },
    },
    async (request, reply) => {
      const caller = principalOf(request);
      const { id } = request.params;
      // Before Supabase is asked for the address, and again on the transaction that writes the link.
      await deps.users.assertMayManage(caller, id);
      await deps.passwordReset.requestFor(id, requestContext(request), (tx) =>
        deps.users.assertMayManageLocked(tx, caller, id),
      );
      return reply.status(204).send(null);
    },
  );

  r.get(
    '/v1/users/:id/sessions',
    {
      config: { permission: 'users:read' },
      schema: {
        tags: ['users'],
        operationId: 'listUserSessions',
        summary: 'A user’s live sessions, newest first (for support)',
        security,
        params: UserIdParamsSchema,
        querystring: PaginationQuerySchema.strict(),
        response: { 200: SessionListSchema, ...problems(400, 401, 403, 404) },
      },
    },
    async (request) => {
      const principal = principalOf(request);
      const current = principal.kind === 'user' ? principal.sessionId : undefined;
      const { page, nextCursor } = await deps.users.listSessions(request.params.id, request.query);
      return { data: page.map((s) => toSessionInfo(s, current)), next_cursor: nextCursor };
    },
  );

  r.delete(
    '/v1/users/:id/sessions',
    {
      config: { permission: 'users:write' },
      schema: {
        tags: ['users'],
        operationId: 'endUserSessions',
        summary: 'Sign a user out everywhere (for support: a stolen session, a lost device)',
        description:
          'Every session of the user ends, with its access tokens, as with their own `POST /v1/auth/logout ' +
          '{scope: "all"}`; an email change in waiting and sign-in links not yet opened go too. The account ' +
          'stays active: its password, API keys and app clients are untouched (disable the user to stop ' +
          'those). Needs every permission the user holds.',
        security,
        params: UserIdParamsSchema,
        response: { 204: z.null(), ...problems(400, 401, 403, 404) },
      },
    },
    async (request, reply) => {
      await deps.users.endSessions(request.params.id, principalOf(request), requestContext(request));
      return reply.status(204).send(null);
    },
  );

  r.delete(
    '/v1/users/:id/sessions/:session_id',
    {
      config: { permission: 'users:write' },
      schema: {
        tags: ['users'],
        operationId: 'endUserSession',
        summary: 'End one of a user’s sessions (for support)',
        description: '404 unless it is a live session of the user. Needs every permission the user holds.',
        security,
        params: UserSessionParamsSchema,
        response: { 204: z.null(), ...problems(400, 401, 403, 404) },
      },
    },
    async (request, reply) => {
      await deps.users.endSessions(
        request.params.id,
        principalOf(request),
        requestContext(request),
        request.params.session_id,
      );
      return reply.status(204).send(null);
    },
  );

  r.post(
    '/v1/users/:id/email-change',
    {
      config: { permission: 'users:write' },
      schema: {
        tags: ['users'],
        operationId: 'changeUserEmail',
        summary: 'Move a user to another email address, once they confirm it (for support: a lost mailbox)',
        description:
          'Built-in provider. Mails the user’s new address the link of `POST /v1/auth/email/change` (its ' +
          'current address is not asked); the address changes when the link is opened. Never one’s own ' +
          '(403: use `POST /v1/auth/email/change`, with the password). 409 for a disabled user or an ' +
          'address with an account; 429 within a minute of the last request, or for a new address mailed ' +
          'five changes’ links in the hour; 404 with Supabase (change it there) or without `SMTP_URL` in ' +
          'production.',
        security,
        params: UserIdParamsSchema,
        body: AdminEmailChangeBodySchema,
        response: {
          202: EmailChangeRequestedSchema.describe('The link is on its way to the new address'),
          ...problems(400, 401, 403, 404, 409, 429, 503),
        },
      },
    },
    async (request, reply) => {
      deps.emailChange.assertAvailable();
      const principal = principalOf(request);
      const context = requestContext(request);
      await deps.users.assertNotOwn(
        principal,
        request.params.id,
        'Change your own address with your password: POST /v1/auth/email/change',
      );
      const user = await deps.users.get(request.params.id);
      // Before anything is refused for the address (and audited), and again on the request's transaction.
      await deps.users.assertMayManage(principal, user.id);
      const newEmail = await deps.emailChange.check(user, request.body.new_email, context, {
        byAdministrator: true,
      });
      const requested = await deps.emailChange.request(user, newEmail, context, {
        byAdministrator: true,
        authorize: (tx) => deps.users.assertMayManageLocked(tx, principal, user.id),
      });
      return reply.status(202).send({
        new_email: requested.newEmail,
        expires_at: requested.expiresAt.toISOString(),
        confirm_current: requested.confirmCurrent,
      });
    },
  );

  r.get(
    '/v1/users/:id/roles',
    {
      config: { permission: 'users:read' },
      schema: {
        tags: ['users'],
        operationId: 'listUserRoles',
        summary: 'A user’s roles and the permissions they give',
        security,
        params: UserIdParamsSchema,
        response: { 200: UserRolesSchema, ...problems(400, 401, 403, 404) },
      },
    },
    async (request) => deps.users.rolesOf(request.params.id),
  );

  r.put(
    '/v1/users/:id/roles/:role',
    {
      config: { permission: 'roles:assign' },
      schema: {
        tags: ['users'],
        operationId: 'grantRole',
        summary: 'Grant a role (idempotent); you must hold every permission it gives',
        description:
          'Answers the user’s roles and permissions (200) to a caller who may read them (`users:read`, as ' +
          'for `GET /v1/users/{id}/roles`), and 204 to one who may not. ' +
          '409 for a role of MFA_REQUIRED_ROLES to a user without two-step verification who does not hold it ' +
          'yet: they set it up first (one who holds it already gets the answer of any role held already).',
        security,
        params: UserRoleParamsSchema,
        response: {
          200: UserRolesSchema.describe('Granted (or held already): the user’s roles now'),
          204: z.null().describe('Granted (or held already); the caller does not hold users:read'),
          ...problems(400, 401, 403, 404, 409),
        },
      },
    },
    async (request, reply) => {
      const principal = principalOf(request);
      await deps.users.grantRole(request.params.id, request.params.role, principal, requestContext(request));
      // A user's roles are for users:read to read: a grant the user already had changes nothing and
      // writes no event, so answering them to roles:assign alone would let it read anyone's, unseen.
      // The permissions are what the caller holds now (the route's check of a change).
      if (!hasPermission(principal.permissions, 'users:read')) return reply.status(204).send(null);
      return deps.users.rolesOf(request.params.id);
    },
  );

  r.delete(
    '/v1/users/:id/roles/:role',
    {
      config: { permission: 'roles:assign' },
      schema: {
        tags: ['users'],
        operationId: 'removeRole',
        summary: 'Remove a role from a user (the last admin keeps theirs: 409)',
        security,
        params: UserRoleParamsSchema,
        response: { 204: z.null(), ...problems(400, 401, 403, 404, 409) },
      },
    },
    async (request, reply) => {
      await deps.users.removeRole(
        request.params.id,
        request.params.role,
        principalOf(request),
        requestContext(request),
      );
      return reply.status(204).send(null);
    },
  );

  r.post(
    '/v1/authz/check',
    {
      config: { permission: 'authz:check', heldNow: false },
      schema: {
        tags: ['roles'],
        operationId: 'checkPermissions',
        summary: 'Does this user hold these permissions now? For services deciding on a user’s request',
        security,
        body: AuthzCheckBodySchema,
        response: { 200: AuthzCheckResultSchema, ...problems(400, 401, 403, 404) },
      },
    },
    async (request) =>
      deps.users.check(request.body.subject_id, request.body.permissions, request.body.session_id),
  );
}
