import type { FastifyInstance, FastifyRequest } from 'fastify';
import type { ZodTypeProvider } from 'fastify-type-provider-zod';
import { z } from 'zod';
import { principalOf, requestContext, signedInSession } from '../../plugins/authenticate.js';
import { CREDENTIAL_RATE_LIMIT } from '../../plugins/rate-limit.js';
import { isoDate, problems, timestamp, UuidParamSchema } from '../shared/shared.schema.js';
import { AuthResultSchema, EnrollTotpBodySchema, toUserDto } from './auth.schema.js';
import type { AuthService } from './auth.service.js';
import type { UsersService } from '../users/users.service.js';
import { type MfaService, RECOVERY_CODE_COUNT } from './mfa.service.js';

const CodeSchema = z
  .string()
  .trim()
  .min(1)
  .max(32)
  .describe('A six-digit code from the authenticator app, or (where said) a recovery code')
  .meta({ example: '123456' });

const CodeBodySchema = z.object({ code: CodeSchema }).strict();

const VerifyBodySchema = z
  .object({
    mfa_token: z.string().min(1).max(128).describe('From the `mfa_required` answer of the sign-in'),
    code: CodeSchema,
  })
  .strict();

const RecoveryCodesSchema = z
  .object({
    recovery_codes: z
      .array(z.string())
      .describe(
        `${RECOVERY_CODE_COUNT} one-use codes for signing in without the app; shown this once, ` +
          'any earlier ones stop working',
      )
      .meta({ example: ['7k2mq-9xw4h'] }),
  })
  .meta({ id: 'MfaRecoveryCodes' });

const EnrollmentSchema = z
  .object({
    factor_id: z.guid(),
    type: z.literal('totp'),
    secret: z.string().describe('Base32, shown this once: for typing into an app that cannot scan'),
    otpauth_uri: z.string().describe('`otpauth://totp/…`: render it as a QR code for the app to scan'),
    algorithm: z.literal('SHA1'),
    digits: z.literal(6),
    period: z.literal(30),
  })
  .meta({ id: 'MfaEnrollment' });

const StatusSchema = z
  .object({
    enabled: z.boolean().describe('Sign-ins ask for a code'),
    pending: z.boolean().describe('A set-up was begun and not yet confirmed with a code'),
    factor: z
      .object({
        id: z.guid(),
        type: z.literal('totp'),
        created_at: timestamp(),
        verified_at: timestamp().nullable(),
        last_used_at: timestamp().nullable(),
      })
      .nullable(),
    recovery_codes_remaining: z.number().int(),
  })
  .meta({ id: 'MfaStatus' });

/** The `mfa_required` refusal of a sign-in: the problem, with what `POST /v1/auth/mfa/verify` takes. */
export const MfaRequiredSchema = z
  .object({
    type: z.string(),
    title: z.string(),
    status: z.literal(403),
    detail: z.string(),
    code: z
      .string()
      .describe(
        '`mfa_required` (or, without the other members, `email_not_confirmed` or `provider_mfa_required`)',
      ),
    instance: z.string().optional(),
    request_id: z.string().optional(),
    mfa_token: z.string().optional().describe('Give it to `POST /v1/auth/mfa/verify` with a code'),
    mfa_token_expires_in: z.number().int().optional().describe('Seconds the token stays good'),
    mfa_methods: z.array(z.enum(['totp', 'recovery_code'])).optional(),
  })
  .meta({
    id: 'MfaRequired',
    description: 'RFC 9457 problem details, with the challenge of a second factor',
  });

/** Two-step verification is the user's own, set up and turned off from a signed-in session. */
const sessionOf = (request: FastifyRequest) => signedInSession(request);
const sessionUserId = (request: FastifyRequest) => sessionOf(request).userId;

export async function mfaRoutes(
  app: FastifyInstance,
  deps: {
    mfa: MfaService;
    users: Pick<UsersService, 'assertMayManageLocked' | 'assertNotOwn'>;
    auth: Pick<AuthService, 'reauthenticate' | 'reauthenticateBySession'>;
    /** PUBLIC_URL's path ('' when it has none): what a 201's Location starts with. */
    basePath: string;
  },
) {
  const r = app.withTypeProvider<ZodTypeProvider>();

  r.get(
    '/v1/auth/mfa',
    {
      config: { permission: 'account:read', credential: 'user_session', noStore: true },
      schema: {
        tags: ['mfa'],
        operationId: 'getMfaStatus',
        summary: 'Whether two-step verification is on, and how many recovery codes are left',
        response: { 200: StatusSchema, ...problems(401, 403) },
      },
    },
    async (request) => {
      const status = await deps.mfa.status(sessionUserId(request));
      return {
        ...status,
        factor: status.factor && {
          ...status.factor,
          created_at: status.factor.created_at.toISOString(),
          verified_at: isoDate(status.factor.verified_at),
          last_used_at: isoDate(status.factor.last_used_at),
        },
      };
    },
  );

  r.post(
    '/v1/auth/mfa/totp',
    {
      config: {
        permission: 'account:write',
        credential: 'user_session',
        noStore: true,
        rateLimit: CREDENTIAL_RATE_LIMIT,
      },
      schema: {
        tags: ['mfa'],
        operationId: 'enrollTotp',
        summary: 'Begin setting up an authenticator app (TOTP)',
        description:
          'With the current password (a wrong one is 400 `incorrect_password`, counts toward the sign-in ' +
          'lockout and is audited): a stolen access token alone must not put a factor of its holder’s on ' +
          'the account and lock its owner out. An account that signs in through Supabase without a ' +
          'password (a social login) leaves it out, from a session `exchange` opened within 5 minutes of ' +
          'a sign-in at Supabase (the exchanged token’s `amr` says when; not a Supabase session refreshed since). ' +
          'A new secret, shown once, as an `otpauth://` URI for a QR ' +
          'code. Nothing changes for sign-ins until a code from the app confirms it ' +
          '(`POST /v1/auth/mfa/totp/activate`); asking again replaces a set-up not yet confirmed. 409 when ' +
          'two-step verification is on already; 403 `email_not_confirmed` where the service can confirm ' +
          'addresses and this one is not confirmed yet.',
        body: EnrollTotpBodySchema,
        response: {
          201: EnrollmentSchema.describe(
            'Begun: the factor, with its secret shown this once. `Location`: `/v1/auth/mfa`, where the ' +
              'factor is read (`factor.id`, `pending: true`); it has no URL of its own',
          ),
          ...problems(400, 401, 403, 409, 429, 503),
        },
      },
    },
    async (request, reply) => {
      const { userId, sessionId } = sessionOf(request);
      if (request.body.password === undefined) await deps.auth.reauthenticateBySession(userId, sessionId);
      else
        await deps.auth.reauthenticate(
          userId,
          request.body.password,
          'mfa.setup_started',
          requestContext(request),
        );
      const enrollment = await deps.mfa.enroll(userId, sessionId, requestContext(request));
      return reply.status(201).header('location', `${deps.basePath}/v1/auth/mfa`).send(enrollment);
    },
  );

  r.post(
    '/v1/auth/mfa/totp/activate',
    {
      config: {
        permission: 'account:write',
        credential: 'user_session',
        noStore: true,
        rateLimit: CREDENTIAL_RATE_LIMIT,
      },
      schema: {
        tags: ['mfa'],
        operationId: 'activateTotp',
        summary: 'Confirm the set-up with a code from the app: sign-ins ask for codes from now on',
        description:
          `Answers ${RECOVERY_CODE_COUNT} recovery codes, shown this once. Every other session of the user ` +
          'ends; this one carries `mfa` in `amr` from its next refresh. A wrong code is 400 ' +
          '`invalid_mfa_code`; after five wrong codes in a row each further one locks for longer (429). A ' +
          'set-up not confirmed within MFA_SETUP_TTL (15 minutes by default) of its start has expired: 409, ' +
          'begin again.',
        body: CodeBodySchema,
        response: { 200: RecoveryCodesSchema, ...problems(400, 401, 403, 409, 429) },
      },
    },
    async (request) => {
      const { userId, sessionId } = sessionOf(request);
      return {
        recovery_codes: await deps.mfa.activate(
          userId,
          sessionId,
          request.body.code,
          requestContext(request),
        ),
      };
    },
  );

  r.post(
    '/v1/auth/mfa/totp/deactivate',
    {
      config: {
        permission: 'account:write',
        credential: 'user_session',
        noStore: true,
        rateLimit: CREDENTIAL_RATE_LIMIT,
      },
      schema: {
        tags: ['mfa'],
        operationId: 'deactivateTotp',
        summary: 'Turn two-step verification off, with a current code or a recovery code',
        description:
          'Every other session of the user ends, as when it is turned on; this one stays. 409 while the ' +
          'user holds a role of MFA_REQUIRED_ROLES (an administrator takes the role first, or resets the ' +
          'factor for a lost app), and when it is not on; no code is spent by a 409.',
        body: CodeBodySchema,
        response: {
          204: z.null().describe('Off; the recovery codes are gone'),
          ...problems(400, 401, 403, 409, 429),
        },
      },
    },
    async (request, reply) => {
      const { userId, sessionId } = sessionOf(request);
      await deps.mfa.deactivate(userId, sessionId, request.body.code, requestContext(request));
      return reply.status(204).send(null);
    },
  );

  r.post(
    '/v1/auth/mfa/recovery-codes',
    {
      config: {
        permission: 'account:write',
        credential: 'user_session',
        noStore: true,
        rateLimit: CREDENTIAL_RATE_LIMIT,
      },
      schema: {
        tags: ['mfa'],
        operationId: 'regenerateRecoveryCodes',
        summary: 'New recovery codes, with a code from the app; the old ones stop working',
        body: CodeBodySchema,
        response: { 200: RecoveryCodesSchema, ...problems(400, 401, 403, 409, 429) },
      },
    },
    async (request) => ({
      recovery_codes: await deps.mfa.regenerateRecoveryCodes(
        sessionUserId(request),
        request.body.code,
        requestContext(request),
      ),
    }),
  );

  r.post(
    '/v1/auth/mfa/verify',
    {
      config: { public: true, noStore: true, rateLimit: CREDENTIAL_RATE_LIMIT },
      schema: {
        tags: ['mfa'],
        operationId: 'verifyMfa',
        summary: 'Finish a sign-in that answered `mfa_required`, with a code',
        description:
          'The `mfa_token` of the sign-in’s 403 and a code from the app or a recovery code (each works ' +
          'once) → the session. A wrong code is 400 `invalid_mfa_code` and the token stays good until it ' +
          'expires; an expired or used token is 401 `invalid_mfa_token` (sign in again). After five wrong ' +
          'codes in a row each further one locks the account’s codes for longer, up to an hour (429).',
        body: VerifyBodySchema,
        response: { 200: AuthResultSchema, ...problems(400, 401, 429, 503) },
      },
    },
    async (request) => {
      const { user, session } = await deps.mfa.verify(
        request.body.mfa_token,
        request.body.code,
        requestContext(request),
      );
      return { user: toUserDto(user), session };
    },
  );

  r.delete(
    '/v1/users/:id/mfa',
    {
      config: { permission: 'users:write' },
      schema: {
        tags: ['users'],
        operationId: 'resetUserMfa',
        summary:
          'Turn a user’s two-step verification off (for support: a lost phone and lost recovery codes)',
        security: [{ bearerAuth: [] }, { apiKey: [] }],
        params: UuidParamSchema,
        response: {
          204: z
            .null()
            .describe('Off; the user signs in with their password alone until they set it up again'),
          ...problems(400, 401, 403, 404),
        },
      },
    },
    async (request, reply) => {
      const principal = principalOf(request);
      await deps.users.assertNotOwn(
        principal,
        request.params.id,
        'Turn your own two-step verification off with a code: POST /v1/auth/mfa/totp/deactivate',
      );
      const { id } = request.params;
      await deps.mfa.resetByAdministrator(id, requestContext(request), (tx) =>
        deps.users.assertMayManageLocked(tx, principal, id),
      );
      return reply.status(204).send(null);
    },
  );
}
