import { z } from 'zod';
import { InstantSchema } from '../../lib/instant.js';
import { PaginationQuerySchema } from '../../lib/pagination.js';
import { nonBlank, PermissionSchema, timestamp, uuidInput } from '../shared/shared.schema.js';

/** Longest grace a rotation may give the old secret: a week covers any deployment cycle. */
export const MAX_GRACE_SECONDS = 7 * 24 * 3600;
/** No key of the service's is longer: a longer string is `not_found` without a lookup. */
export const MAX_PRESENTED_KEY_LENGTH = 256;
/**
 * What the verify body takes (SECURITY.md: cap input length). Between the two, a string is a key that
 * does not exist, not a malformed request (API.md: always 200 for a well-formed request): a JWT sent
 * where a key goes, say.
 */
export const MAX_VERIFIED_STRING_LENGTH = 4096;

/**
 * Keys that name no key (`not_found`: made up, mistyped, another key's lookup id with a wrong secret)
 * one client address may present (as its credential, or to revoke) in a minute; past it, 429 until
 * the minute ends (api-keys.service.ts, verifyPresented).
 */
export const API_KEY_MAX_FAILURES_PER_IP_PER_MINUTE = 60;

const ScopeSchema = PermissionSchema;

const ScopesSchema = z
  .array(ScopeSchema)
  .max(100)
  .describe('Permissions the key may use; within the creator’s own, and limited at every use to the owner’s')
  .meta({ example: ['account:read'] });

const NameSchema = nonBlank(100)
  .describe('A label for people, e.g. "CI deploy"')
  .meta({ example: 'CI deploy' });

const ExpiresAtSchema = InstantSchema.transform((s) => new Date(s))
  .describe('ISO 8601; the key stops verifying at this instant')
  .meta({ example: '2030-01-01T00:00:00Z' });

export const CreateApiKeyBodySchema = z
  .object({
    name: NameSchema,
    scopes: ScopesSchema,
    expires_at: ExpiresAtSchema.optional(),
  })
  .strict();

export const UpdateApiKeyBodySchema = z
  .object({
    name: NameSchema.optional(),
    scopes: ScopesSchema.optional(),
    expires_at: ExpiresAtSchema.nullable().optional().describe('ISO 8601, or null to remove the expiry'),
  })
  .strict()
  .refine((b) => b.name !== undefined || b.scopes !== undefined || b.expires_at !== undefined, {
    message: 'name, scopes or expires_at is required',
  });

export const RotateApiKeyBodySchema = z
  .object({
    grace_seconds: z
      .number()
      .int()
      .min(0)
      .max(MAX_GRACE_SECONDS)
      .optional()
      .describe('How long the old secret keeps working (default 0: it stops at once)'),
    force: z
      .boolean()
      .optional()
      .describe(
        'Rotate even while the secret the last rotation replaced is in its grace, ending that grace now',
      ),
  })
  .strict();

export const VerifyApiKeyBodySchema = z
  .object({
    key: z.string().max(MAX_VERIFIED_STRING_LENGTH).describe('The API key presented to the caller'),
  })
  .strict();

export const ListApiKeysQuerySchema = PaginationQuerySchema.extend({
  owner_id: uuidInput()
    .optional()
    .describe(
      'Another user’s keys (needs api_keys:read); default the caller’s. Required of a service, which owns no keys',
    ),
  include_expired: z
    .enum(['true', 'false'])
    .optional()
    .describe(
      '`true`: expired keys too, among the live ones in the same order (an expired key can still be ' +
        'read and renamed, not used). `false` (the default): live keys only. Revoked keys are never listed',
    ),
}).strict();

/** An allow-list: the hash, the previous hash and the secret can never be serialized. */
export const ApiKeySchema = z
  .object({
    id: z.guid(),
    owner_id: z.guid(),
    name: z.string(),
    prefix: z.string().describe('The public start of the key (`pak_` and the lookup id)'),
    last_four: z.string().describe('The last four characters of the key'),
    scopes: z.array(z.string()).describe('The scopes as granted; each use is further limited by the owner'),
    expires_at: timestamp().nullable(),
    last_used_at: timestamp()
      .nullable()
      .describe('Recorded in batches: may lag actual use by up to a minute across instances'),
    parent_id: z
      .guid()
      .nullable()
      .describe(
        'The key that created this one, when it was created by a request authenticated with an API key: ' +
          'revoking that key revokes this one, and this one expires no later than it (giving that key a ' +
          'shorter expiry brings this one to it, and narrowing its scopes narrows this one’s, revoking it ' +
          'when none is left; this one cannot be given a later one, nor a scope that key lacks; rotating ' +
          'that key changes nothing here)',
      ),
    created_at: timestamp(),
    updated_at: timestamp(),
  })
  .meta({ id: 'ApiKey' });

export const ApiKeyWithSecretSchema = ApiKeySchema.extend({
  key: z.string().describe('The full key: shown in this response only, never again'),
}).meta({ id: 'ApiKeyWithSecret' });

export const ApiKeyPageSchema = z.object({ data: z.array(ApiKeySchema), next_cursor: z.string().nullable() });

export const VerifyApiKeyResultSchema = z
  .discriminatedUnion('valid', [
    z.object({
      valid: z.literal(true),
      key_id: z.guid(),
      owner_id: z.guid(),
      scopes: z
        .array(z.string())
        .describe('Effective: the key’s scopes within its owner’s current permissions'),
      expires_at: timestamp()
        .nullable()
        .describe(
          'When the presented key stops working (null: never): the key’s expiry, or for a secret a ' +
            'rotation replaced, the end of its grace when that comes first',
        ),
    }),
    z.object({
      valid: z.literal(false),
      reason: z.enum(['not_found', 'expired', 'revoked', 'owner_disabled']),
    }),
  ])
  .meta({ id: 'ApiKeyVerification' });
