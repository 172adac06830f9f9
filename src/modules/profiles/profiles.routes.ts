import type { FastifyInstance } from 'fastify';
import type { ZodTypeProvider } from 'fastify-type-provider-zod';
import { principalOf, requestContext, userIdOf } from '../../plugins/authenticate.js';
import { bearerOrApiKey, problems } from '../shared/shared.schema.js';
import { toProfileDto } from './profiles.repository.js';
import { PatchProfileBodySchema, ProfileParamsSchema, ProfileSchema } from './profiles.schema.js';
import { PROFILE_CHANGES_PER_MINUTE, type ProfilesService } from './profiles.service.js';

export async function profilesRoutes(app: FastifyInstance, deps: { profiles: ProfilesService }) {
  const r = app.withTypeProvider<ZodTypeProvider>();
  const security = bearerOrApiKey;

  r.get(
    '/v1/profiles/me',
    {
      config: { permission: 'account:read' },
      schema: {
        tags: ['profiles'],
        operationId: 'getMyProfile',
        summary: 'The caller’s profile',
        security,
        response: { 200: ProfileSchema, ...problems(401, 403, 404) },
      },
    },
    async (request) => toProfileDto(await deps.profiles.getOwn(userIdOf(request))),
  );

  r.patch(
    '/v1/profiles/me',
    {
      config: { permission: 'account:write' },
      schema: {
        tags: ['profiles'],
        operationId: 'updateMyProfile',
        summary: 'Change the caller’s profile',
        description:
          'Changes the fields sent and leaves the others as they are; null clears a field. `metadata` is ' +
          'the exception to field-by-field: it is replaced whole by the object sent, not merged into the ' +
          'stored one (no RFC 7396 merge), so send all of it. A change that sets what is already so ' +
          `writes nothing. With the rate limits on, a user makes at most ${PROFILE_CHANGES_PER_MINUTE} changes a minute (429 with ` +
          '`Retry-After` beyond; a change that sets what is already so does not count).',
        security,
        body: PatchProfileBodySchema,
        response: { 200: ProfileSchema, ...problems(400, 401, 403, 404, 429) },
      },
    },
    async (request) => {
      const b = request.body;
      const patch = {
        ...(b.display_name !== undefined ? { displayName: b.display_name } : {}),
        ...(b.avatar_url !== undefined ? { avatarUrl: b.avatar_url } : {}),
        ...(b.bio !== undefined ? { bio: b.bio } : {}),
        ...(b.locale !== undefined ? { locale: b.locale } : {}),
        ...(b.timezone !== undefined ? { timezone: b.timezone } : {}),
        // null clears it, as it clears the other fields: metadata is always an object, so {}.
        ...(b.metadata !== undefined ? { metadata: b.metadata ?? {} } : {}),
      };
      return toProfileDto(await deps.profiles.update(userIdOf(request), patch, requestContext(request)));
    },
  );

  r.get(
    '/v1/profiles/:user_id',
    {
      config: { permission: ['account:read', 'profiles:read'] },
      schema: {
        tags: ['profiles'],
        operationId: 'getProfile',
        summary: 'A user’s profile: one’s own, or anyone’s with profiles:read (404 otherwise)',
        security,
        params: ProfileParamsSchema,
        response: { 200: ProfileSchema, ...problems(400, 401, 403, 404) },
      },
    },
    async (request) => toProfileDto(await deps.profiles.getFor(principalOf(request), request.params.user_id)),
  );
}
