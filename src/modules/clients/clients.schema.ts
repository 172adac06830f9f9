import { z } from 'zod';
import { pageOf, PaginationQuerySchema } from '../../lib/pagination.js';
import {
  isoDate,
  nonBlank,
  PermissionSchema,
  plainText,
  timestamp,
  uuidInput,
} from '../shared/shared.schema.js';
import type { ClientRow } from './clients.repository.js';
import { CLIENT_ID_PATTERN, MAX_SECRET_GRACE_SECONDS } from './clients.service.js';

const ScopeSchema = PermissionSchema;

const AudienceSchema = z
  .string()
  .min(1)
  .max(255)
  .regex(/^[\x21-\x7e]+$/, 'printable ASCII without spaces')
  // One resource server: a lax verifier could take `*` for any.
  .refine((a) => !a.includes('*'), 'names one resource server: no wildcard')
  // RFC 8707 §2: a resource is named without a fragment; one registered with it could be asked
  // for as `audience` and never as `resource`.
  .refine((a) => !a.includes('#'), 'has no fragment (#)')
  .describe('An audience (`aud`) the client may request, e.g. `https://orders.example.com`');

const ScopesSchema = z
  .array(ScopeSchema)
  .max(100)
  .describe('Permissions the client’s tokens may carry; within the creator’s own permissions')
  .meta({ example: ['tokens:introspect', 'api_keys:verify'] });
const AudiencesSchema = z
  .array(AudienceSchema)
  .max(20)
  .describe('Audiences the client may request; none: its tokens are for this service only');
const TtlSchema = z
  .number()
  .int()
  .min(60)
  .describe('Access-token lifetime in seconds (at most the service maximum); null: the service default');

export const ClientIdParamSchema = z.object({
  id: z
    .union([uuidInput(), z.string().regex(CLIENT_ID_PATTERN)])
    .describe('The client’s `id` (UUID) or its `client_id`'),
});

export const CreateClientBodySchema = z
  .object({
    name: nonBlank(100).meta({ example: 'orders-service' }),
    description: plainText(500, { trim: true }).optional(),
    scopes: ScopesSchema,
    audiences: AudiencesSchema.optional(),
    access_token_ttl: TtlSchema.nullable().optional(),
  })
  .strict();

export const UpdateClientBodySchema = z
  .object({
    name: nonBlank(100).optional(),
    description: plainText(500, { trim: true }).optional(),
    scopes: ScopesSchema.optional(),
    audiences: AudiencesSchema.optional(),
    access_token_ttl: TtlSchema.nullable().optional(),
    status: z
      .enum(['active', 'disabled'])
      .optional()
      .describe('A disabled client gets no tokens and loses those it has'),
    acts_for_creator: z
      .boolean()
      .optional()
      .describe(
        '`true` binds the client to its creator: its tokens carry only what they still hold, and those it has are revoked (anyone who may change it). `false` makes it the organisation’s, acting on its own scopes (administrators only)',
      ),
  })
  .strict();

export const RotateSecretBodySchema = z
  .object({
    grace_seconds: z
      .number()
      .int()
      .min(0)
      .max(MAX_SECRET_GRACE_SECONDS)
      .optional()
      .describe('How long the current secret keeps working (default 0: it stops now)'),
    force: z
      .boolean()
      .optional()
      .describe(
        'Rotate even while the secret the last rotation replaced is in its grace, ending that grace now',
      ),
  })
  .strict();

export const ClientListQuerySchema = PaginationQuerySchema.strict();

export const ClientSchema = z
  .object({
    id: z.guid(),
    client_id: z.string().describe('Public identifier, used as the OAuth `client_id` and the tokens’ `sub`'),
    name: z.string(),
    description: z.string(),
    scopes: z.array(z.string()),
    audiences: z.array(z.string()),
    access_token_ttl: z.number().int().nullable(),
    status: z.enum(['active', 'disabled']),
    created_by: z
      .guid()
      .nullable()
      .describe(
        'The user who registered it, or whose client registered it; null for a client made by the service itself',
      ),
    acts_for_creator: z
      .boolean()
      .describe(
        'Registered by a user who is not an administrator: its tokens carry only the scopes its creator still holds (none once the creator is disabled or deleted)',
      ),
    disabled_by_administrator: z
      .boolean()
      .describe(
        'Disabled by an administrator: only an administrator turns it back on (its creator cannot). False while it is active',
      ),
    created_at: timestamp(),
    updated_at: timestamp(),
    previous_secret_expires_at: timestamp()
      .nullable()
      .describe('Until when the secret replaced by the last rotation still works'),
  })
  .meta({ id: 'Client' });

export const ClientWithSecretSchema = ClientSchema.extend({
  client_secret: z.string().describe('Shown this once; only a keyed hash is kept'),
}).meta({ id: 'ClientWithSecret' });

export const ClientPageSchema = pageOf(ClientSchema);

export function toClientDto(c: ClientRow, now: Date) {
  return {
    id: c.id,
    client_id: c.clientId,
    name: c.name,
    description: c.description,
    scopes: c.scopes,
    audiences: c.audiences,
    access_token_ttl: c.accessTokenTtl,
    status: c.status,
    created_by: c.createdBy,
    acts_for_creator: c.actsForCreator,
    disabled_by_administrator: c.status === 'disabled' && c.disabledByAdministrator,
    created_at: c.createdAt.toISOString(),
    updated_at: c.updatedAt.toISOString(),
    previous_secret_expires_at:
      c.previousSecretExpiresAt && c.previousSecretExpiresAt > now
        ? isoDate(c.previousSecretExpiresAt)
        : null,
  };
}
