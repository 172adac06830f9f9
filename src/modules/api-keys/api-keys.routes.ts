import type { FastifyInstance, FastifyRequest } from 'fastify';
import type { ZodTypeProvider } from 'fastify-type-provider-zod';
import { z } from 'zod';
import {
  type ApiKeyPrincipals,
  type Principal,
  principalOf,
  requestContext,
} from '../../plugins/authenticate.js';
import {
  bearerOrApiKey,
  problemResponses,
  isoDate,
  problems,
  UuidParamSchema,
} from '../shared/shared.schema.js';
import type { ApiKeyRow } from './api-keys.repository.js';
import {
  ApiKeyPageSchema,
  ApiKeySchema,
  ApiKeyWithSecretSchema,
  CreateApiKeyBodySchema,
  ListApiKeysQuerySchema,
  RotateApiKeyBodySchema,
  UpdateApiKeyBodySchema,
  VerifyApiKeyBodySchema,
  VerifyApiKeyResultSchema,
} from './api-keys.schema.js';
import { sharedAnswer } from '../../lib/shared-answer.js';
import {
  type ApiKeyActor,
  type ApiKeysService,
  type InvalidReason,
  presentedExpiresAt,
  type Verification,
} from './api-keys.service.js';

export function toApiKeyDto(k: ApiKeyRow) {
  return {
    id: k.id,
    owner_id: k.ownerId,
    name: k.name,
    prefix: k.prefix,
    last_four: k.lastFour,
    scopes: k.scopes,
    expires_at: isoDate(k.expiresAt),
    last_used_at: isoDate(k.lastUsedAt),
    parent_id: k.parentId,
    created_at: k.createdAt.toISOString(),
    updated_at: k.updatedAt.toISOString(),
  };
}

type VerificationDto =
  | { valid: false; reason: InvalidReason }
  | { valid: true; key_id: string; owner_id: string; scopes: string[]; expires_at: string | null };

// A key presented on every request gets the same verification object while its row and owner stay
// cached (see `accept`), so its answer is built once and shared (`sharedAnswer`: frozen, and
// written once per route).
const verificationDtos = new WeakMap<Verification, VerificationDto>();
function verificationDto(result: Verification): VerificationDto {
  if (!result.valid) return { valid: false, reason: result.reason };
  let dto = verificationDtos.get(result);
  if (!dto) {
    dto = sharedAnswer({
      valid: true as const,
      key_id: result.key.id,
      owner_id: result.key.ownerId,
      scopes: result.scopes,
      // When the presented string stops working: a secret a rotation replaced ends with its grace.
      expires_at: isoDate(presentedExpiresAt(result.key, result.previous)),
    });
    verificationDtos.set(result, dto);
  }
  return dto;
}

function actorOf(request: FastifyRequest): ApiKeyActor {
  const principal = principalOf(request);
  return {
    userId: principal.userId,
    ...(principal.kind === 'api_key'
      ? {
          key: {
            id: principal.id,
            expiresAt: principal.expiresAt,
            previous: principal.previous,
            secretHash: principal.secretHash,
          },
        }
      : {}),
    grantor: principal,
  };
}

/**
 * The seam of the authenticate plugin: a valid key becomes its owner's principal, within its scopes.
 * `resolveCached` answers without waiting when the key's rows are in memory, and undefined otherwise.
 *
 * `resolve` counts keys that name no key against the client's address (`verifyPresented`: 429 past
 * the limit).
 */
export function createApiKeyResolver(apiKeys: ApiKeysService): ApiKeyPrincipals {
  // The service hands back the same frozen verification for a key as long as its rows and owner stay
  // cached, so its principal is made once per verification, as a token's is per claims.
  const principals = new WeakMap<Verification, Principal>();
  const principal = (result: Verification): Principal | undefined => {
    if (!result.valid) return undefined;
    let made = principals.get(result);
    if (!made) {
      made = Object.freeze({
        kind: 'api_key',
        id: result.key.id,
        userId: result.key.ownerId,
        permissions: result.scopes,
        lookupId: result.key.lookupId,
        // When the presented secret stops: a replaced one at the end of its grace. What it creates
        // or changes is held within that (assertWithinCallerLife), a sibling's life included.
        expiresAt: presentedExpiresAt(result.key, result.previous),
        previous: result.previous,
        secretHash: result.previous ? result.key.previousSecretHash! : result.key.secretHash,
      } satisfies Principal);
      principals.set(result, made);
    }
    return made;
  };
  return {
    resolve: async (presented, address) => principal(await apiKeys.verifyPresented(presented, address)),
    resolveCached: (presented) => {
      const result = apiKeys.verifyCached(presented);
      return result && principal(result);
    },
  };
}

// Own keys need api_keys:own; another user's need api_keys:read or api_keys:write (checked per key).
const READ = ['api_keys:own', 'api_keys:read'];
const WRITE = ['api_keys:own', 'api_keys:write'];
const OTHERS = 'Another user’s key needs api_keys:read to see and api_keys:write to change; without it, 404.';

export async function apiKeysRoutes(
  app: FastifyInstance,
  deps: { apiKeys: ApiKeysService; basePath: string },
) {
  const r = app.withTypeProvider<ZodTypeProvider>();

  r.post(
    '/v1/api-keys',
    {
      config: { permission: 'api_keys:own', noStore: true },
      schema: {
        tags: ['api-keys'],
        operationId: 'createApiKey',
        summary: 'Create an API key for the caller; the key is shown in this response only',
        description:
          'Scopes must be within the caller’s permissions (403 otherwise). At every use the key is further ' +
          'limited to its owner’s current permissions. An owner has at most MAX_API_KEYS_PER_USER live ' +
          '(unrevoked, unexpired) keys (409 beyond it).',
        security: bearerOrApiKey,
        body: CreateApiKeyBodySchema,
        response: {
          201: ApiKeyWithSecretSchema,
          ...problems(400, 401, 403, 503),
          409: problemResponses[409].describe(
            'The owner has MAX_API_KEYS_PER_USER live keys already (the limit is in `detail`)',
          ),
        },
      },
    },
    async (request, reply) => {
      const { row, key } = await deps.apiKeys.create(
        actorOf(request),
        { name: request.body.name, scopes: request.body.scopes, expiresAt: request.body.expires_at },
        requestContext(request),
      );
      return reply
        .status(201)
        .header('location', `${deps.basePath}/v1/api-keys/${row.id}`)
        .send({ ...toApiKeyDto(row), key });
    },
  );

  r.get(
    '/v1/api-keys',
    {
      config: { permission: READ },
      schema: {
        tags: ['api-keys'],
        operationId: 'listApiKeys',
        summary: 'The caller’s live API keys (or, with api_keys:read, another user’s)',
        description:
          'Live: neither revoked nor expired, oldest first. Expired keys are listed only with ' +
          '`include_expired=true`; revoked keys never are.',
        security: bearerOrApiKey,
        querystring: ListApiKeysQuerySchema,
        response: { 200: ApiKeyPageSchema, ...problems(400, 401, 403) },
      },
    },
    async (request) => {
      const { rows, nextCursor } = await deps.apiKeys.list(actorOf(request), {
        ownerId: request.query.owner_id,
        limit: request.query.limit,
        cursor: request.query.cursor,
        includeExpired: request.query.include_expired === 'true',
      });
      return { data: rows.map(toApiKeyDto), next_cursor: nextCursor };
    },
  );

  r.post(
    '/v1/api-keys/verify',
    {
      config: { permission: 'api_keys:verify', heldNow: false },
      schema: {
        tags: ['api-keys'],
        operationId: 'verifyApiKey',
        summary: 'Verify an API key presented to another service',
        description:
          'Always 200 for a well-formed request: `valid: true` with the key’s id, owner, effective scopes ' +
          'and `expires_at`, when the presented key stops working, or `valid: false` with a reason. A ' +
          'secret replaced by a rotation answers `expired` once its grace is over, and until then its ' +
          '`expires_at` is the end of the grace (or the key’s expiry when that comes first).',
        security: bearerOrApiKey,
        body: VerifyApiKeyBodySchema,
        response: { 200: VerifyApiKeyResultSchema, ...problems(400, 401, 403, 503) },
      },
    },
    // Not async: a key verified before is answered from memory in the same turn (Fastify sends a
    // handler's plain return value); anything else waits for the full verification.
    (request) => {
      const cached = deps.apiKeys.verifyCached(request.body.key);
      return cached ? verificationDto(cached) : deps.apiKeys.verify(request.body.key).then(verificationDto);
    },
  );

  r.get(
    '/v1/api-keys/:id',
    {
      config: { permission: READ },
      schema: {
        tags: ['api-keys'],
        operationId: 'getApiKey',
        summary: 'One API key (never its secret)',
        description: OTHERS,
        security: bearerOrApiKey,
        params: UuidParamSchema,
        response: { 200: ApiKeySchema, ...problems(400, 401, 403, 404) },
      },
    },
    async (request) => toApiKeyDto(await deps.apiKeys.get(actorOf(request), request.params.id)),
  );

  r.patch(
    '/v1/api-keys/:id',
    {
      config: { permission: WRITE },
      schema: {
        tags: ['api-keys'],
        operationId: 'updateApiKey',
        summary: 'Rename an API key, change its scopes or its expiry',
        description:
          'New scopes must be within the caller’s and the owner’s permissions, and a later expiry (or none) ' +
          `within the caller’s (403); an expired key’s expiry and scopes cannot change (409). A key minted ` +
          'by a key (`parent_id`) cannot be given a later expiry than that key’s, nor none, nor a scope ' +
          'that key’s do not cover (400, `body.expires_at`, `body.scopes`). A new expiry brings the keys ' +
          'the key minted (and theirs) that would outlive it to it, and new scopes narrow them to what ' +
          'those cover, revoking any (with the keys it minted) left with none, in the same change; none ' +
          'is ever lengthened or widened with it. ' +
          OTHERS,
        security: bearerOrApiKey,
        params: UuidParamSchema,
        body: UpdateApiKeyBodySchema,
        response: {
          200: ApiKeySchema,
          ...problems(400, 401, 403, 404, 503),
          409: problemResponses[409].describe(
            '`expires_at` or `scopes` of a key that has expired: expiry is final',
          ),
        },
      },
    },
    async (request) => {
      const row = await deps.apiKeys.update(
        actorOf(request),
        request.params.id,
        { name: request.body.name, scopes: request.body.scopes, expiresAt: request.body.expires_at },
        requestContext(request),
      );
      return toApiKeyDto(row);
    },
  );

  r.delete(
    '/v1/api-keys/:id',
    {
      config: { permission: WRITE },
      schema: {
        tags: ['api-keys'],
        operationId: 'revokeApiKey',
        summary: 'Revoke an API key: it stops working at once, on every instance within a second',
        description: OTHERS,
        security: bearerOrApiKey,
        params: UuidParamSchema,
        response: { 204: z.null().describe('Revoked'), ...problems(400, 401, 403, 404, 503) },
      },
    },
    async (request, reply) => {
      await deps.apiKeys.revoke(actorOf(request), request.params.id, requestContext(request));
      return reply.status(204).send(null);
    },
  );

  r.post(
    '/v1/api-keys/:id/rotate',
    {
      config: { permission: WRITE, noStore: true },
      schema: {
        tags: ['api-keys'],
        operationId: 'rotateApiKey',
        summary: 'Give an API key a new secret; the old one keeps working for the grace, then stops',
        description:
          'The new key is shown in this response only. The caller must hold every permission the key ' +
          `gives (its scopes within its owner’s current permissions; 403 otherwise). ${OTHERS}`,
        security: bearerOrApiKey,
        params: UuidParamSchema,
        body: RotateApiKeyBodySchema.nullish(),
        response: { 200: ApiKeyWithSecretSchema, ...problems(400, 401, 403, 404, 409, 503) },
      },
    },
    async (request) => {
      const { row, key } = await deps.apiKeys.rotate(
        actorOf(request),
        request.params.id,
        request.body?.grace_seconds ?? 0,
        requestContext(request),
        request.body?.force ?? false,
      );
      return { ...toApiKeyDto(row), key };
    },
  );
}
