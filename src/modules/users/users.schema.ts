import { z } from 'zod';
import { PaginationQuerySchema } from '../../lib/pagination.js';
import { nonBlank, PermissionSchema, uuidInput } from '../shared/shared.schema.js';

export { UserSchema } from '../auth/auth.schema.js';
import { EmailSchema, UserSchema as BaseUserSchema } from '../auth/auth.schema.js';

/** A user as an administrator reads one: with whether their sign-ins ask for a second factor. */
export const UserDetailSchema = BaseUserSchema.extend({
  mfa_enabled: z.boolean().describe('Two-step verification is on: sign-ins ask for a code'),
}).meta({ id: 'UserDetail' });

export const RoleNameSchema = z
  .string()
  .regex(
    /^[a-z][a-z0-9_-]{1,49}$/,
    'lowercase letters, digits, _ and -, 2–50 characters, starting with a letter',
  )
  .describe('Role name')
  .meta({ example: 'support' });

export const UserIdParamsSchema = z.object({ id: uuidInput() });
export const UserRoleParamsSchema = z.object({ id: uuidInput(), role: RoleNameSchema });
export const UserSessionParamsSchema = z.object({ id: uuidInput(), session_id: uuidInput() });

export const ListUsersQuerySchema = PaginationQuerySchema.extend({
  query: z.string().trim().min(1).max(254).optional().describe('Substring of the email'),
  status: z.enum(['active', 'disabled']).optional().describe('Only users with this status'),
  role: RoleNameSchema.optional().describe('Only users holding this role (e.g. `admin`)'),
}).strict();

export const PatchUserBodySchema = z
  .object({
    status: z.enum(['active', 'disabled']).describe('disabled: sessions end, tokens and API keys stop'),
  })
  .strict();

export const InviteUserBodySchema = z
  .object({
    email: EmailSchema,
    display_name: nonBlank(100).optional().meta({ example: 'Ada Lovelace' }),
  })
  .strict();

export const AdminEmailChangeBodySchema = z
  .object({
    new_email: EmailSchema.describe('The address the user moves to, once they open its link').meta({
      example: 'ada.lovelace@example.org',
    }),
  })
  .strict();

export const UserRolesSchema = z.object({ roles: z.array(z.string()), permissions: z.array(z.string()) });

export const AuthzCheckBodySchema = z
  .object({
    subject_id: uuidInput()
      .describe('The user the decision is about')
      .meta({ example: '0193a1f2-7c3e-7b4a-9d2e-5f6a7b8c9d0e' }),
    permissions: z
      .array(PermissionSchema)
      .min(1)
      .max(100)
      .meta({ example: ['users:read', 'profiles:read'] }),
    session_id: uuidInput()
      .optional()
      .describe(
        'The session the request comes from (the access token’s `sid`): the answer is what that session ' +
          'holds. MFA_REQUIRED_ROLES count only for a session that gave a second factor; without ' +
          '`session_id` they do not count. A session that has ended holds nothing; one that is not the ' +
          'user’s is 404.',
      ),
  })
  .strict();

export const AuthzCheckResultSchema = z.object({
  allowed: z.boolean(),
  missing: z.array(z.string()),
  mfa_required: z
    .array(z.string())
    .optional()
    .describe(
      'Present when some of `missing` come with a role of MFA_REQUIRED_ROLES the user holds: a session ' +
        'that gives a second factor (step-up) would hold them',
    ),
});
