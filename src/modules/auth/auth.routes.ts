import type { FastifyInstance } from 'fastify';
import type { ZodTypeProvider } from 'fastify-type-provider-zod';
import { z } from 'zod';
import { AppError, forbidden, invalidFields, isAppError, notFound } from '../../lib/errors.js';
import { PaginationQuerySchema } from '../../lib/pagination.js';
import { hasPermission } from '../../lib/permissions.js';
import {
  credentialNoLongerStands,
  insufficientScope,
  principalOf,
  requestContext,
  signedInSession,
  userIdOf,
} from '../../plugins/authenticate.js';
import { CREDENTIAL_RATE_LIMIT } from '../../plugins/rate-limit.js';
import { bearerOrApiKey, problemResponses, problems, UuidParamSchema } from '../shared/shared.schema.js';
import type { AuditEventType, RequestContext } from '../audit/audit.service.js';
import type { AccountsCache } from './accounts.cache.js';
import { MfaRequiredSchema } from './mfa.routes.js';
import {
  AuthResultSchema,
  ChangeEmailBodySchema,
  ConfirmEmailBodySchema,
  ConfirmEmailChangeBodySchema,
  DeleteAccountBodySchema,
  EmailChangeConfirmedSchema,
  EmailChangeRequestedSchema,
  PendingEmailChangeSchema,
  ExchangeBodySchema,
  ForgotPasswordBodySchema,
  LoginBodySchema,
  LogoutBodySchema,
  MagicLinkBodySchema,
  MeSchema,
  PasswordBodySchema,
  RefreshBodySchema,
  RegisterBodySchema,
  RegisterResultSchema,
  ResetPasswordBodySchema,
  SessionListSchema,
  SessionSchema,
  toSessionInfo,
  toUserDto,
  UserSchema,
} from './auth.schema.js';
import type { UsersService } from '../users/users.service.js';
import type { AuthService } from './auth.service.js';
import type { MfaService } from './mfa.service.js';
import type { EmailChangeService } from './email-change.service.js';
import type { EmailConfirmationService } from './email-confirmation.service.js';
import type { MagicLinkService } from './magic-link.service.js';
import type { PasswordResetService } from './password-reset.service.js';

export interface AuthRoutesDeps {
  auth: AuthService;
  users: Pick<UsersService, 'delete' | 'assertDeletable'>;
  mfa: Pick<MfaService, 'isEnabled' | 'confirm' | 'confirmWithin'>;
  passwordReset: PasswordResetService;
  emailConfirmation: EmailConfirmationService;
  emailChange: EmailChangeService;
  magicLink: MagicLinkService;
  accounts: AccountsCache;
  providerName: 'local' | 'supabase';
  /** PUBLIC_URL's path ('' when it has none): what a 201's Location starts with. */
  basePath: string;
}

/**
 * The anonymous requests for a mailed link (forgot, resend, magic-link) do more for an address with an
 * account (its link and mail are written) than for one without: each answers no sooner than this after
 * it began, so the time does not tell them apart (a few milliseconds of difference otherwise).
 */
export const LINK_REQUEST_FLOOR_MS = 100;
async function noSoonerThanFloor(work: () => Promise<void>): Promise<void> {
  const startedAt = performance.now();
  await work();
  const wait = LINK_REQUEST_FLOOR_MS - (performance.now() - startedAt);
  if (wait > 0) await new Promise((resolve) => setTimeout(resolve, wait));
}

export async function authRoutes(app: FastifyInstance, deps: AuthRoutesDeps) {
  const r = app.withTypeProvider<ZodTypeProvider>();

  /** With two-step verification on, a sensitive change also takes a current code (or a recovery code). */
  /** The code to check when the user has two-step verification on (400 without one); else undefined. */
  async function secondFactorCode(userId: string, code: string | undefined): Promise<string | undefined> {
    if (!(await deps.mfa.isEnabled(userId))) return undefined;
    if (!code)
      throw invalidFields([{ field: 'body.code', message: 'is required: two-step verification is on' }]);
    return code;
  }

  async function confirmSecondFactor(
    userId: string,
    code: string | undefined,
    action: AuditEventType,
    context: RequestContext,
  ) {
    const current = await secondFactorCode(userId, code);
    if (current !== undefined) await deps.mfa.confirm(userId, current, action, context);
  }

  r.post(
    '/v1/auth/register',
    {
      config: { public: true, noStore: true, rateLimit: CREDENTIAL_RATE_LIMIT },
      schema: {
        tags: ['auth'],
        operationId: 'register',
        summary: 'Create an account',
        description:
          '201 with a session, or 202 with `session: null` when the provider asks for email confirmation first ' +
          '(Supabase’s “Confirm email”, or REQUIRE_EMAIL_CONFIRMATION). The built-in provider mails a ' +
          'confirmation link when it can send mail (`POST /v1/auth/email/confirm`).',
        body: RegisterBodySchema,
        response: {
          201: RegisterResultSchema.describe(
            'Registered and signed in (`Location`: the user, `/v1/users/{id}`, as for a user an administrator makes)',
          ),
          202: RegisterResultSchema.describe(
            'Registered; the provider asks for the email to be confirmed first (`session: null`)',
          ),
          ...problems(400, 409, 422, 429, 503),
          403: problemResponses[403].describe(
            '`registration_closed`: the identity provider accepts no sign-ups',
          ),
        },
      },
    },
    async (request, reply) => {
      // The confirmation mail is written with the account, and sent after the answer (the outbox):
      // the account is made whatever the mail server does.
      const { user, session } = await deps.auth.register(
        {
          email: request.body.email,
          password: request.body.password,
          displayName: request.body.display_name,
        },
        requestContext(request),
        { confirmation: deps.emailConfirmation },
      );
      if (!session) return reply.status(202).send({ user: toUserDto(user), session });
      // The user's own URL, as POST /v1/users names it: /v1/auth/me is whoever's credential asks.
      return reply
        .status(201)
        .header('location', `${deps.basePath}/v1/users/${user.id}`)
        .send({ user: toUserDto(user), session });
    },
  );

  r.post(
    '/v1/auth/login',
    {
      config: { public: true, noStore: true, rateLimit: CREDENTIAL_RATE_LIMIT },
      schema: {
        tags: ['auth'],
        operationId: 'login',
        summary: 'Sign in with email and password',
        description:
          'Unknown email, wrong password and disabled account all answer the same 401. With Supabase, ' +
          '409 `account_conflict` when the provider’s account has an email another account here holds, and ' +
          '403 `provider_mfa_required` for a user with a second factor enrolled there (a password sign-in ' +
          'there is aal1): give it with Supabase and use `POST /v1/auth/exchange`; no session is opened.',
        body: LoginBodySchema,
        response: {
          200: AuthResultSchema,
          ...problems(400, 401, 429, 503),
          403: MfaRequiredSchema.describe(
            '`mfa_required` (two-step verification is on: finish at `POST /v1/auth/mfa/verify` with ' +
              '`mfa_token`), `email_not_confirmed` (REQUIRE_EMAIL_CONFIRMATION), or with Supabase ' +
              '`provider_mfa_required` (a second factor enrolled there: give it with Supabase and use ' +
              '`POST /v1/auth/exchange`); after the right password only',
          ),
          409: problemResponses[409].describe(
            '`account_conflict`: the provider’s account has an email another account here holds',
          ),
        },
      },
    },
    async (request) => {
      const { user, session } = await deps.auth.login(request.body, requestContext(request));
      return { user: toUserDto(user), session };
    },
  );

  r.post(
    '/v1/auth/refresh',
    {
      config: { public: true, noStore: true, refreshRateLimit: 'always' },
      schema: {
        tags: ['auth'],
        operationId: 'refresh',
        summary: 'Exchange a refresh token for new tokens (the refresh token rotates)',
        description:
          'A rotated refresh token presented again after a grace of at most 10 s ends the whole session. ' +
          'With Supabase, a user banned or deleted there (not through this service) is refused (401) at their ' +
          'next refresh past SUPABASE_USER_RECHECK_SECONDS, and every session of theirs ends.',
        body: RefreshBodySchema,
        response: { 200: z.object({ session: SessionSchema }), ...problems(400, 401, 429, 503) },
      },
    },
    async (request) => ({
      session: await deps.auth.refresh(request.body.refresh_token, requestContext(request)),
    }),
  );

  r.post(
    '/v1/auth/exchange',
    {
      config: { public: true, noStore: true, rateLimit: CREDENTIAL_RATE_LIMIT },
      schema: {
        tags: ['auth'],
        operationId: 'exchangeProviderToken',
        summary: 'Exchange a Supabase access token (e.g. after a social login) for a session',
        description:
          'Only with AUTH_PROVIDER=supabase; 404 otherwise. A user with a second factor enrolled in Supabase ' +
          'is exchanged only from a token whose session gave it (`aal` `aal2`): an aal1 one is 403 ' +
          '`provider_mfa_required`, and no session is opened.',
        body: ExchangeBodySchema,
        response: {
          200: AuthResultSchema,
          ...problems(400, 401, 404, 429, 503),
          403: MfaRequiredSchema.describe(
            '`mfa_required`: two-step verification is on; finish at `POST /v1/auth/mfa/verify` with `mfa_token`. ' +
              '`provider_mfa_required`: a second factor enrolled in Supabase that the token’s session has not ' +
              'given (aal1); give it with Supabase and exchange the new token',
          ),
          409: problemResponses[409].describe(
            '`account_conflict`: the provider’s account has an email another account here holds',
          ),
        },
      },
    },
    async (request) => {
      if (deps.providerName !== 'supabase') throw notFound('route');
      const { user, session } = await deps.auth.exchange(request.body.access_token, requestContext(request));
      return { user: toUserDto(user), session };
    },
  );

  r.post(
    '/v1/auth/logout',
    {
      config: { permission: 'account:read', heldNow: false, ownSession: true },
      schema: {
        tags: ['auth'],
        operationId: 'logout',
        summary: 'End this session (or, with scope "all", every session)',
        security: bearerOrApiKey,
        body: LogoutBodySchema.nullish(),
        description:
          'With `scope: "all"` every session of the user ends, with sign-in links not yet opened and, when a ' +
          'signed-in session asks (not an API key), an email change in waiting; an API key needs ' +
          '`account:write` for that. A session’s token without `account:read` (its scope narrowed at a ' +
          'refresh) ends its own session, whatever `refresh_token` names; `scope: "all"` is 403 for it. A ' +
          'service’s token has no session to end: 403.',
        response: { 204: z.null().describe('Logged out'), ...problems(400, 401, 403) },
      },
    },
    async (request, reply) => {
      const principal = principalOf(request);
      // A service's token (client credentials) has no user, and so no session to end, whatever the
      // scope asked: refused as on every route that is for users, before the scope is looked at.
      const userId = userIdOf(request);
      const body = request.body ?? {};
      // A signed-in session's token ends its own session whatever its scope (config.ownSession); one
      // without account:read (narrowed to what a part of an app needs) ends that one only: not every
      // session, nor another one a refresh token names. Every other caller holds account:read here.
      const beyondOwn = hasPermission(principal.permissions, 'account:read');
      if (body.scope === 'all' && !beyondOwn) {
        throw new AppError('forbidden', {
          detail: 'Ending every session needs account:read: this token ends its own session only',
          headers: { 'www-authenticate': insufficientScope(['account:read']) },
        });
      }
      // An API key reaches every session only with account:write, so a read-only key cannot sign its
      // owner out everywhere.
      if (
        body.scope === 'all' &&
        principal.kind === 'api_key' &&
        !hasPermission(principal.permissions, 'account:write')
      ) {
        throw forbidden('Ending every session with an API key needs account:write');
      }
      await deps.auth.logout(
        userId,
        principal.kind === 'user' ? principal.sessionId : undefined,
        {
          refreshToken: beyondOwn ? body.refresh_token : undefined,
          scope: body.scope ?? 'session',
          bySession: principal.kind === 'user',
        },
        requestContext(request),
      );
      return reply.status(204).send(null);
    },
  );

  r.get(
    '/v1/auth/me',
    {
      config: { permission: 'account:read' },
      schema: {
        tags: ['auth'],
        operationId: 'me',
        summary: 'The caller: user, roles, permissions and profile',
        security: bearerOrApiKey,
        response: { 200: MeSchema, ...problems(401, 403, 404) },
      },
    },
    async (request) => {
      const principal = principalOf(request);
      // From memory until the user, their roles or their profile change (accounts.cache.ts).
      const account = await deps.accounts.get(userIdOf(request));
      if (!account) throw notFound('user');
      return {
        user: account.user,
        roles: account.roles,
        // What this request may do: the token's scope, or the API key's effective scopes.
        permissions: principal.permissions,
        profile: account.profile,
        principal: {
          kind: principal.kind,
          id: principal.id,
          session_id: principal.kind === 'user' ? (principal.sessionId ?? null) : null,
        },
      };
    },
  );

  r.delete(
    '/v1/auth/me',
    {
      config: { permission: 'account:write', credential: 'user_session', rateLimit: CREDENTIAL_RATE_LIMIT },
      schema: {
        tags: ['auth'],
        operationId: 'deleteOwnAccount',
        summary: 'Delete one’s own account: profile, sessions, API keys and roles go with it',
        description:
          'With a signed-in session (not an API key), the current password, and with two-step ' +
          'verification on a current code (or a recovery code). A wrong password counts toward the ' +
          'sign-in lockout. 409 for the last administrator. An account without a password (a social ' +
          'login through Supabase) is deleted by an administrator.',
        body: DeleteAccountBodySchema,
        response: {
          204: z.null().describe('Deleted'),
          ...problems(400, 401, 403, 409, 422, 429, 503),
        },
      },
    },
    async (request, reply) => {
      const { userId } = signedInSession(request);
      const context = requestContext(request);
      const user = await deps.auth.reauthenticate(userId, request.body.password, 'user.deleted', context);
      try {
        // Before a code is spent on it.
        await deps.users.assertDeletable(user.id);
        await confirmSecondFactor(user.id, request.body.code, 'user.deleted', context);
        await deps.users.delete(user.id, context);
      } catch (err) {
        // Deleted meanwhile (the same request sent twice at once): the session went with the
        // account, as the next request would be told.
        if (isAppError(err) && err.code === 'not_found') throw credentialNoLongerStands();
        throw err;
      }
      return reply.status(204).send(null);
    },
  );

  r.post(
    '/v1/auth/password',
    {
      config: { permission: 'account:write', credential: 'user_session', rateLimit: CREDENTIAL_RATE_LIMIT },
      schema: {
        tags: ['auth'],
        operationId: 'changePassword',
        summary: 'Change the password; every other session ends',
        description:
          'From a signed-in session (an API key gets 403, as for the address, the second factor and ' +
          'deleting the account), with the current password: a wrong one is 400 `incorrect_password` ' +
          'and counts toward the sign-in lockout. With Supabase, 403 `provider_mfa_required` for a user ' +
          'with a second factor enrolled there (Supabase changes the password only from a session that ' +
          'gave it; nothing is changed), and 401 `invalid_token` for a user banned there.',
        body: PasswordBodySchema,
        response: { 204: z.null(), ...problems(400, 401, 403, 422, 429, 503) },
      },
    },
    async (request, reply) => {
      const { userId, sessionId } = signedInSession(request);
      await deps.auth.changePassword(
        userId,
        sessionId,
        { currentPassword: request.body.current_password, newPassword: request.body.new_password },
        requestContext(request),
      );
      return reply.status(204).send(null);
    },
  );

  r.post(
    '/v1/auth/password/forgot',
    {
      config: { public: true, noStore: true, rateLimit: CREDENTIAL_RATE_LIMIT },
      schema: {
        tags: ['auth'],
        operationId: 'forgotPassword',
        summary: 'Mail a password reset link',
        description:
          '204 whether or not the address has an account, and at most one mail per account a minute. ' +
          'Built-in provider: the service mails a link to `PASSWORD_RESET_URL#token=prs_…` (or the bare ' +
          'token without it), valid for `PASSWORD_RESET_TTL` seconds and once; a newer one replaces it. 404 ' +
          'when the service has no `SMTP_URL` in production. Supabase: Supabase mails its recovery link, ' +
          'leading to `PASSWORD_RESET_URL`. A mail server refusing the service’s mail does not change the ' +
          'answer: the link is made and its mail waits for a retry. 503 when the database or Supabase is ' +
          'unavailable.',
        body: ForgotPasswordBodySchema,
        response: {
          204: z.null().describe('If the address has an active account, a reset link is on its way'),
          ...problems(400, 404, 429, 503),
          422: problemResponses[422].describe('Supabase refuses to mail a reset link to this address'),
        },
      },
    },
    async (request, reply) => {
      await noSoonerThanFloor(() => deps.passwordReset.request(request.body.email, requestContext(request)));
      return reply.status(204).send(null);
    },
  );

  r.post(
    '/v1/auth/password/reset',
    {
      config: { public: true, noStore: true, rateLimit: CREDENTIAL_RATE_LIMIT },
      schema: {
        tags: ['auth'],
        operationId: 'resetPassword',
        summary: 'Choose a new password with a reset link’s token; every session ends',
        description:
          'The token works once. Every session of the account ends, and a sign-in lockout is lifted. 400 ' +
          '`invalid_reset_token` for a token that is unknown, expired, used or for a disabled account. With ' +
          'Supabase, 403 `provider_mfa_required` for a user with a second factor enrolled there whose recovery ' +
          'session has not given it (aal1), as Supabase refuses it: nothing changes and the link still works.',
        body: ResetPasswordBodySchema,
        response: {
          204: z.null().describe('The password is changed'),
          ...problems(400, 422, 429, 503),
          403: problemResponses[403].describe(
            '`provider_mfa_required`: Supabase, a user with a second factor there; give it on the recovery session first',
          ),
        },
      },
    },
    async (request, reply) => {
      await deps.passwordReset.reset(request.body.token, request.body.new_password, requestContext(request));
      return reply.status(204).send(null);
    },
  );

  r.post(
    '/v1/auth/email/confirm',
    {
      config: { public: true, noStore: true, rateLimit: CREDENTIAL_RATE_LIMIT },
      schema: {
        tags: ['auth'],
        operationId: 'confirmEmail',
        summary: 'Confirm the email address with a confirmation link’s token',
        description:
          'Built-in provider. The token works once, for `EMAIL_CONFIRMATION_TTL` seconds; a newer link replaces ' +
          'it. 400 `invalid_confirmation_token` for one that is unknown, expired, used or for a disabled account.',
        body: ConfirmEmailBodySchema,
        response: { 200: z.object({ user: UserSchema }), ...problems(400, 429, 503) },
      },
    },
    async (request) => ({
      user: toUserDto(await deps.emailConfirmation.confirm(request.body.token, requestContext(request))),
    }),
  );

  r.post(
    '/v1/auth/email/resend',
    {
      config: { public: true, noStore: true, rateLimit: CREDENTIAL_RATE_LIMIT },
      schema: {
        tags: ['auth'],
        operationId: 'resendConfirmation',
        summary: 'Mail a new email confirmation link',
        description:
          '204 whether or not the address has an unconfirmed account, and at most one mail per account a ' +
          'minute. Built-in provider; 404 with Supabase (supabase-js `auth.resend()`) or without `SMTP_URL` in ' +
          'production. A mail server refusing the mail does not change the answer: it waits for a retry. 503 ' +
          'only when the database is unavailable.',
        body: ForgotPasswordBodySchema,
        response: {
          204: z.null().describe('If the address has an unconfirmed account, a link is on its way'),
          ...problems(400, 404, 429, 503),
        },
      },
    },
    async (request, reply) => {
      await noSoonerThanFloor(() =>
        deps.emailConfirmation.resend(request.body.email, requestContext(request)),
      );
      return reply.status(204).send(null);
    },
  );

  r.post(
    '/v1/auth/magic-link',
    {
      config: { public: true, noStore: true, rateLimit: CREDENTIAL_RATE_LIMIT },
      schema: {
        tags: ['auth'],
        operationId: 'requestMagicLink',
        summary: 'Mail a sign-in link (passwordless)',
        description:
          '204 whether or not the address has an account. Built-in provider: when it is an active ' +
          'account’s confirmed address, the service mails a link to `MAGIC_LINK_URL#token=pml_…`, valid for ' +
          '`MAGIC_LINK_TTL` seconds and once (a newer one replaces it; at most one mail per account a ' +
          'minute). An address never confirmed gets none (confirm it, or reset the password). A mail ' +
          'server refusing the mail does not change the answer: it waits for a retry. 404 with Supabase ' +
          '(supabase-js `auth.signInWithOtp`, then `POST /v1/auth/exchange`) or without `SMTP_URL` in production.',
        body: ForgotPasswordBodySchema,
        response: {
          204: z.null().describe('If the address is an active account’s confirmed one, a link is on its way'),
          ...problems(400, 404, 429, 503),
        },
      },
    },
    async (request, reply) => {
      await noSoonerThanFloor(() => deps.magicLink.request(request.body.email, requestContext(request)));
      return reply.status(204).send(null);
    },
  );

  r.post(
    '/v1/auth/magic-link/verify',
    {
      config: { public: true, noStore: true, rateLimit: CREDENTIAL_RATE_LIMIT },
      schema: {
        tags: ['auth'],
        operationId: 'verifyMagicLink',
        summary: 'Sign in with a sign-in link’s token',
        description:
          'The link works once. The session’s `amr` is `["email"]`. With two-step verification on, 403 ' +
          '`mfa_required` with `mfa_token`, as after a password. 400 `invalid_magic_link` for a token that ' +
          'is unknown, expired, used or replaced, or whose account was disabled or changed its address.',
        body: MagicLinkBodySchema,
        response: {
          200: AuthResultSchema,
          ...problems(400, 404, 429, 503),
          403: MfaRequiredSchema.describe(
            '`mfa_required`: finish at `POST /v1/auth/mfa/verify` with `mfa_token`',
          ),
        },
      },
    },
    async (request) => {
      const { user, session } = await deps.magicLink.verify(request.body.token, requestContext(request));
      return { user: toUserDto(user), session };
    },
  );

  r.post(
    '/v1/auth/email/change',
    {
      config: { permission: 'account:write', credential: 'user_session', rateLimit: CREDENTIAL_RATE_LIMIT },
      schema: {
        tags: ['auth'],
        operationId: 'changeEmail',
        summary: 'Ask to move the account to another email address',
        description:
          'Built-in provider, from a signed-in session (not an API key), with the current password and, with ' +
          'two-step verification on, a current code. Mails a link (`EMAIL_CHANGE_URL#token=pce_…`, ' +
          '`EMAIL_CHANGE_TTL` seconds, once) to the new address and, when the current address was confirmed, ' +
          'another to the current one: the change applies once every link is opened ' +
          '(`POST /v1/auth/email/change/confirm`). A newer request replaces the links; at most one a minute ' +
          '(429), and a new address gets at most five changes’ links an hour, whatever accounts ask (429). ' +
          'A wrong password counts toward the sign-in lockout. 404 with Supabase (supabase-js ' +
          '`auth.updateUser({ email })`; the service takes the new address at the next sign-in) or without ' +
          '`SMTP_URL` in production.',
        body: ChangeEmailBodySchema,
        response: {
          202: EmailChangeRequestedSchema.describe('The links are on their way'),
          ...problems(400, 401, 403, 404, 429, 503),
          409: problemResponses[409].describe('`email_taken`: the new address has an account'),
        },
      },
    },
    async (request, reply) => {
      const { userId, sessionId } = signedInSession(request);
      const context = requestContext(request);
      const user = await deps.auth.reauthenticate(
        userId,
        request.body.password,
        'user.email_change_requested',
        context,
      );
      // Before a code is spent on it; the code is then spent in the request's own transaction, so a
      // request refused there (behind a concurrent one) spends none.
      const newEmail = await deps.emailChange.check(user, request.body.new_email, context);
      const code = await secondFactorCode(user.id, request.body.code);
      const requested = await deps.emailChange.request(user, newEmail, context, {
        sessionId,
        transaction:
          code === undefined
            ? undefined
            : (work) => deps.mfa.confirmWithin(user.id, code, 'user.email_change_requested', context, work),
      });
      return reply.status(202).send({
        new_email: requested.newEmail,
        expires_at: requested.expiresAt.toISOString(),
        confirm_current: requested.confirmCurrent,
      });
    },
  );

  r.get(
    '/v1/auth/email/change',
    {
      // From a signed-in session, as the change is asked and cancelled: the address an account is
      // moving to is not for a delegated credential (an API key with account:read), which would learn
      // where a user who lost their mailbox, or support for them, is taking it. The audit log and the
      // activity keep only its domain.
      config: { permission: 'account:read', credential: 'user_session' },
      schema: {
        tags: ['auth'],
        operationId: 'getEmailChange',
        summary: 'The email change waiting for its links',
        description: '404 when none waits (none asked, or it applied, expired or was voided).',
        response: { 200: PendingEmailChangeSchema, ...problems(401, 403, 404) },
      },
    },
    async (request) => {
      const pending = await deps.emailChange.pending(signedInSession(request).userId);
      if (!pending) throw notFound('email change');
      return {
        new_email: pending.newEmail,
        expires_at: pending.expiresAt.toISOString(),
        confirm_current: pending.confirmCurrent,
        waiting_for: pending.waitingFor,
      };
    },
  );

  r.delete(
    '/v1/auth/email/change',
    {
      config: { permission: 'account:write', credential: 'user_session' },
      schema: {
        tags: ['auth'],
        operationId: 'cancelEmailChange',
        summary: 'Cancel the email change waiting for its links (they stop working)',
        description:
          'From a signed-in session, as the change is asked (an API key gets 403: a leaked key must not undo ' +
          'a change support made to lock its holder out).',
        response: { 204: z.null().describe('Cancelled'), ...problems(401, 403, 404) },
      },
    },
    async (request, reply) => {
      const { userId } = signedInSession(request);
      if (!(await deps.emailChange.cancel(userId, requestContext(request)))) throw notFound('email change');
      return reply.status(204).send(null);
    },
  );

  r.post(
    '/v1/auth/email/change/confirm',
    {
      config: { public: true, noStore: true, rateLimit: CREDENTIAL_RATE_LIMIT },
      schema: {
        tags: ['auth'],
        operationId: 'confirmEmailChange',
        summary: 'Open one of an email change’s links',
        description:
          '`changed: true` once every link of the change is opened: the account has the new address, ' +
          'confirmed, links mailed before to the old address stop working, and every other session of ' +
          'the user ends (all of them when the link is opened without a session of theirs); `changed: false` (and ' +
          '`user: null`) while the other link is still to be opened. The new address’s link of a user’s ' +
          'own request is opened signed in to the account (its access token as `Authorization: Bearer`; ' +
          '401 otherwise, and the link stays usable); the current address’s link and a link of an ' +
          'administrator’s request need no session. 400 `invalid_email_change_token` for a token that is ' +
          'unknown, expired, used, replaced or for a disabled account, and for an administrator’s request ' +
          'whose administrator (or service) no longer holds `users:write` and what the user holds; ' +
          '409 `email_taken` when the new ' +
          'address has an account by now.',
        // Optional: the new address's link of a user's own request is opened signed in.
        security: [{}, { bearerAuth: [] }],
        body: ConfirmEmailChangeBodySchema,
        response: {
          200: EmailChangeConfirmedSchema,
          ...problems(400, 401, 404, 429, 503),
          409: problemResponses[409].describe('`email_taken`: the new address has an account by now'),
        },
      },
    },
    async (request) => {
      // Optional here: the new address's link of a user's own request is opened signed in.
      const principal = await app.resolvePrincipal(request);
      // In the audit: who opened it, with which session.
      request.principal = principal;
      const signedInAs = principal?.kind === 'user' && principal.sessionId ? principal.userId : undefined;
      const result = await deps.emailChange.confirm(request.body.token, signedInAs, requestContext(request));
      return result.changed
        ? { changed: true, user: toUserDto(result.user) }
        : { changed: false, user: null };
    },
  );

  r.get(
    '/v1/auth/sessions',
    {
      config: { permission: 'account:read' },
      schema: {
        tags: ['auth'],
        operationId: 'listSessions',
        summary: 'The caller’s live sessions, newest first',
        security: bearerOrApiKey,
        querystring: PaginationQuerySchema.strict(),
        response: { 200: SessionListSchema, ...problems(400, 401, 403) },
      },
    },
    async (request) => {
      const principal = principalOf(request);
      const current = principal.kind === 'user' ? principal.sessionId : undefined;
      const { page, nextCursor } = await deps.auth.listSessions(userIdOf(request), request.query);
      return {
        data: page.map((s) => toSessionInfo(s, current)),
        next_cursor: nextCursor,
      };
    },
  );

  r.delete(
    '/v1/auth/sessions/:id',
    {
      config: { permission: 'account:write', heldNow: false },
      schema: {
        tags: ['auth'],
        operationId: 'endSession',
        summary: 'End one of the caller’s sessions',
        security: bearerOrApiKey,
        params: UuidParamSchema,
        response: { 204: z.null(), ...problems(400, 401, 403, 404) },
      },
    },
    async (request, reply) => {
      await deps.auth.endSession(userIdOf(request), request.params.id, requestContext(request));
      return reply.status(204).send(null);
    },
  );
}
