import type { FastifyInstance } from 'fastify';
import type { ZodTypeProvider } from 'fastify-type-provider-zod';
import { z } from 'zod';
import { PaginationQuerySchema, pageOf } from '../../lib/pagination.js';
import { requestContext } from '../../plugins/authenticate.js';
import { bearerOrApiKey, problems, timestamp } from '../shared/shared.schema.js';
import type { SigningKeyRow } from './signing-keys.repository.js';
import type { SigningKeysService } from './signing-keys.service.js';

const SigningKeySchema = z
  .object({
    kid: z.string(),
    alg: z.enum(['ES256', 'EdDSA']),
    state: z
      .enum(['next', 'active', 'retiring', 'retired'])
      .describe(
        'next: published, signs after the next rotation; retiring: published until its tokens expire',
      ),
    public_jwk: z.record(z.string(), z.unknown()),
    created_at: timestamp(),
    activated_at: timestamp().nullable(),
    retiring_at: timestamp().nullable(),
    published_until: z.string().nullable(),
  })
  .meta({ id: 'SigningKey' });

const toDto = (k: SigningKeyRow) => ({
  kid: k.kid,
  alg: k.alg,
  state: k.state,
  public_jwk: k.publicJwk,
  created_at: k.createdAt.toISOString(),
  activated_at: k.activatedAt?.toISOString() ?? null,
  retiring_at: k.retiringAt?.toISOString() ?? null,
  published_until: k.state === 'retired' ? null : (k.publishUntil?.toISOString() ?? null),
});

const RotateSigningKeyBodySchema = z
  .object({
    force: z
      .boolean()
      .optional()
      .describe(
        'Rotate even though the next key has been published for less than 10 minutes (a compromised key): ' +
          'verifiers holding an older cached JWKS must refetch it to accept the new tokens',
      ),
    revoke_previous: z
      .boolean()
      .optional()
      .describe(
        'Revoke every key published so far, the previous one, the retiring ones and the next one, and ' +
          'sign with a key made now (implies `force`): they leave the JWKS and every instance at once, ' +
          'and every token they signed stops verifying here (users refresh, services request new tokens; ' +
          'verifiers caching the JWKS drop them within 10 minutes). For a key that leaked',
      ),
  })
  .strict()
  .meta({ id: 'RotateSigningKeyBody' });

export async function signingKeysRoutes(app: FastifyInstance, deps: { keys: SigningKeysService }) {
  const r = app.withTypeProvider<ZodTypeProvider>();
  r.get(
    '/v1/signing-keys',
    {
      config: { permission: 'keys:read' },
      schema: {
        tags: ['signing-keys'],
        operationId: 'listSigningKeys',
        summary: 'Signing keys: public parts and states, oldest first',
        security: bearerOrApiKey,
        querystring: PaginationQuerySchema.strict(),
        response: { 200: pageOf(SigningKeySchema), ...problems(400, 401, 403) },
      },
    },
    async (request) => {
      const { page, nextCursor } = await deps.keys.list(request.query);
      return { data: page.map(toDto), next_cursor: nextCursor };
    },
  );

  r.post(
    '/v1/signing-keys/rotate',
    {
      config: { permission: 'keys:write' },
      schema: {
        tags: ['signing-keys'],
        operationId: 'rotateSigningKey',
        summary:
          'Rotate: the published next key starts signing; the old one verifies until its tokens expire',
        description:
          'The next key must have been in the JWKS for 10 minutes (verifiers cache it that long): before ' +
          'that, 409 `rotation_too_soon` with `Retry-After`, and nothing changes, unless `force: true`. ' +
          '`revoke_previous: true` revokes every key published so far at once and signs with a new one ' +
          '(a leaked key).',
        security: bearerOrApiKey,
        body: RotateSigningKeyBodySchema.nullish(),
        response: {
          200: z.object({ active_kid: z.string(), previous_kid: z.string().nullable() }),
          ...problems(400, 401, 403, 409, 503),
        },
      },
    },
    async (request) => {
      const result = await deps.keys.rotate(requestContext(request), {
        force: request.body?.force,
        revokePrevious: request.body?.revoke_previous,
      });
      return { active_kid: result.kid, previous_kid: result.previous };
    },
  );
}
