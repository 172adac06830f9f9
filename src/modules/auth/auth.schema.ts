import { z } from 'zod';
import { normalizePassword } from '../../identity/passwords.js';
import { pageOf } from '../../lib/pagination.js';
import { emailAddress, nonBlank, timestamp } from '../shared/shared.schema.js';

/** An address as accounts are keyed by it: trimmed, lower case. */
export const normalizeEmail = (email: string) => email.trim().toLowerCase();

export const EmailSchema = z
  .string()
  .trim()
  .max(254)
  .pipe(z.email())
  .describe('Email address')
  // The document says what the pipe checks (its input side alone would be any string).
  .meta({ example: 'ada@example.com', format: 'email' });
/**
 * Length is checked by the service (422 weak_password), so only a hard cap lives here, and well-formed
 * Unicode: a lone surrogate (`\ud800`) is hashed as U+FFFD, so two different passwords would match.
 */
const LONE_SURROGATE = /\p{Cs}/u; // in u-mode a surrogate pair is one code point, so only lone ones match
/**
 * Up to 4096 characters here, so a new password over 128 is a 422 `weak_password` from the strength
 * check, as API.md says, for any length a person could mean; past 4096 (nobody's password, only
 * work for the hash) it is a 400.
 */
const NewPasswordSchema = z
  .string()
  .max(4096)
  .refine((p) => !LONE_SURROGATE.test(p), {
    message: 'must be well-formed Unicode (a lone surrogate is not)',
  })
  .describe('8 to 128 characters; common passwords are refused')
  .meta({ example: 'plum lantern velvet 42' });

/** A password given to be checked (a sign-in, the current one): never empty. An empty new one is 422. */
const PasswordSchema = NewPasswordSchema.min(1);

export const UserSchema = z
  .object({
    id: z.guid(),
    email: emailAddress(),
    status: z.enum(['active', 'disabled']),
    email_confirmed_at: timestamp().nullable().describe('ISO 8601, null until confirmed'),
    created_at: timestamp(),
  })
  .meta({ id: 'User' });

export const SessionSchema = z
  .object({
    access_token: z.string().describe('RFC 9068 JWT'),
    token_type: z.literal('Bearer'),
    expires_in: z.number().int().describe('Seconds until the access token expires').meta({ example: 900 }),
    refresh_token: z.string().describe('Opaque; rotates on every use'),
  })
  .meta({ id: 'Session' });

export const RegisterBodySchema = z
  .object({
    email: EmailSchema,
    password: NewPasswordSchema,
    display_name: nonBlank(100).optional().meta({ example: 'Ada Lovelace' }),
  })
  .strict();

export const LoginBodySchema = z.object({ email: EmailSchema, password: PasswordSchema }).strict();

/** A sensitive change's second factor: required (by the route) when two-step verification is on. */
const SecondFactorCodeSchema = z
  .string()
  .trim()
  .min(1)
  .max(32)
  .optional()
  .describe('With two-step verification on: a code from the app, or a recovery code');

export const DeleteAccountBodySchema = z
  .object({
    password: PasswordSchema.describe('The current password'),
    code: SecondFactorCodeSchema,
  })
  .strict();

/** Setting up a second factor changes how the account signs in: the password again, as for deleting it. */
export const EnrollTotpBodySchema = z
  .object({
    password: PasswordSchema.optional().describe(
      'The current password; without one only for an account that signs in through Supabase without a ' +
        'password, from a session `exchange` opened from a sign-in at Supabase of the last 5 minutes',
    ),
  })
  .strict();

export const RefreshBodySchema = z.object({ refresh_token: z.string().min(1).max(512) }).strict();

export const LogoutBodySchema = z
  .object({
    refresh_token: z
      .string()
      .min(1)
      .max(512)
      .optional()
      .describe(
        'Which of the caller’s sessions to end; without it (or when it is not one of theirs), the session of the access token',
      ),
    scope: z.enum(['session', 'all']).optional().describe('`all` ends every session of the user'),
  })
  .strict();

export const PasswordBodySchema = z
  .object({
    current_password: PasswordSchema,
    new_password: NewPasswordSchema.meta({ example: 'copper meadow sonnet 7' }),
  })
  .strict()
  // A "change" to the same password would end every other session and change nothing else: the
  // same once normalised ("é" as one code point or two) is the same password.
  .refine((b) => normalizePassword(b.new_password) !== normalizePassword(b.current_password), {
    path: ['new_password'],
    message: 'must differ from the current password',
  });

export const ForgotPasswordBodySchema = z.object({ email: EmailSchema }).strict();

export const ResetPasswordBodySchema = z
  .object({
    token: z
      .string()
      .min(1)
      .max(8192)
      .describe(
        'From the reset link: the `token` in its fragment (built-in provider, `prs_…`), or with Supabase the ' +
          'access token of the recovery session its link opened',
      )
      .meta({ example: 'prs_3kTMd2x0aPq7_…' }),
    new_password: NewPasswordSchema,
  })
  .strict();

export const ConfirmEmailBodySchema = z
  .object({
    token: z
      .string()
      .min(1)
      .max(512)
      .describe('From the confirmation link: the `token` in its fragment (`pec_…`)')
      .meta({ example: 'pec_7Qw2ZmN4rT1x_…' }),
  })
  .strict();

export const MagicLinkBodySchema = z
  .object({
    token: z
      .string()
      .min(1)
      .max(512)
      .describe('From the sign-in link: the `token` in its fragment (`pml_…`)')
      .meta({ example: 'pml_Vb7xQ2mK9pLz_…' }),
  })
  .strict();

export const ChangeEmailBodySchema = z
  .object({
    new_email: EmailSchema.describe('The address the account moves to').meta({
      example: 'ada.lovelace@example.org',
    }),
    password: PasswordSchema.describe('The current password'),
    code: SecondFactorCodeSchema,
  })
  .strict();

export const EmailChangeRequestedSchema = z.object({
  new_email: emailAddress().describe('The address the account moves to once the links are opened'),
  expires_at: timestamp().describe('When the links stop working (ISO 8601)'),
  confirm_current: z
    .boolean()
    .describe(
      'A link went to the current address too (it was confirmed): the change applies once both are opened',
    ),
});

export const PendingEmailChangeSchema = EmailChangeRequestedSchema.extend({
  waiting_for: z.array(z.enum(['new_address', 'current_address'])).describe('The links not opened yet'),
});

export const ConfirmEmailChangeBodySchema = z
  .object({
    token: z
      .string()
      .min(1)
      .max(512)
      .describe('From one of the email change’s links: the `token` in its fragment (`pce_…`)')
      .meta({ example: 'pce_9bX4kLm2QwEr_…' }),
  })
  .strict();

export const EmailChangeConfirmedSchema = z.object({
  user: UserSchema.nullable().describe('The account with its new address; null until it changed'),
  changed: z
    .boolean()
    .describe(
      '`true`: the account has its new address (confirmed). `false`: this link is accepted, and the ' +
        'other address’s link is still to be opened',
    ),
});

export const ExchangeBodySchema = z
  .object({ access_token: z.string().min(1).max(8192).describe('A Supabase-issued access token') })
  .strict();

export const AuthResultSchema = z.object({ user: UserSchema, session: SessionSchema });
export const RegisterResultSchema = z.object({ user: UserSchema, session: SessionSchema.nullable() });

export const ProfileSchema = z
  .object({
    user_id: z.guid(),
    display_name: z.string().nullable(),
    avatar_url: z.string().nullable(),
    bio: z.string().nullable(),
    locale: z.string().nullable(),
    timezone: z.string().nullable(),
    metadata: z.record(z.string(), z.unknown()),
    updated_at: timestamp(),
  })
  .meta({ id: 'Profile' });

export const MeSchema = z.object({
  user: UserSchema,
  roles: z.array(z.string()),
  permissions: z.array(z.string()),
  profile: ProfileSchema.nullable(),
  principal: z.object({
    kind: z.enum(['user', 'service', 'api_key']),
    id: z.string(),
    session_id: z.string().nullable(),
  }),
});

export const SessionInfoSchema = z
  .object({
    id: z.guid(),
    created_at: timestamp(),
    last_used_at: timestamp(),
    expires_at: timestamp(),
    user_agent: z.string().nullable(),
    ip: z.string().nullable(),
    amr: z
      .array(z.string())
      .describe(
        'How the session began (RFC 8176): `pwd` (a password) or `email` (a sign-in link), and `otp`/`mfa` ' +
          'after a second factor; empty if unknown',
      ),
    current: z.boolean(),
  })
  .meta({ id: 'SessionInfo' });

export const SessionListSchema = pageOf(SessionInfoSchema);

/** A live session as `SessionInfo`; `current` when it is `currentId` (the caller's own). */
export function toSessionInfo(
  s: {
    id: string;
    createdAt: Date;
    lastUsedAt: Date;
    idleExpiresAt: Date;
    userAgent: string | null;
    ip: string | null;
    amr: string[];
  },
  currentId: string | undefined,
) {
  return {
    id: s.id,
    created_at: s.createdAt.toISOString(),
    last_used_at: s.lastUsedAt.toISOString(),
    // The idle expiry never passes the absolute one (sessions.service caps it).
    expires_at: s.idleExpiresAt.toISOString(),
    user_agent: s.userAgent,
    ip: s.ip,
    amr: s.amr,
    current: s.id === currentId,
  };
}

export function toUserDto(u: {
  id: string;
  email: string;
  status: 'active' | 'disabled';
  emailConfirmedAt: Date | null;
  createdAt: Date;
}) {
  return {
    id: u.id,
    email: u.email,
    status: u.status,
    email_confirmed_at: u.emailConfirmedAt ? u.emailConfirmedAt.toISOString() : null,
    created_at: u.createdAt.toISOString(),
  };
}
