import type { FastifyInstance, FastifyRequest } from 'fastify';
import type { ZodTypeProvider } from 'fastify-type-provider-zod';
import { z } from 'zod';
import type { Clock } from '../../lib/clock.js';
import { decodeCursor } from '../../lib/pagination.js';
import { principalOf, principalTaking, requestContext } from '../../plugins/authenticate.js';
import { bearerOrApiKey, problemResponses, problems } from '../shared/shared.schema.js';
import {
  ClientIdParamSchema,
  ClientListQuerySchema,
  ClientPageSchema,
  ClientSchema,
  ClientWithSecretSchema,
  CreateClientBodySchema,
  RotateSecretBodySchema,
  toClientDto,
  UpdateClientBodySchema,
} from './clients.schema.js';
import type { ClientCaller, ClientsService, TokenClientCaller } from './clients.service.js';

export interface ClientsRoutesDeps {
  clients: ClientsService;
  clock: Clock;
  /** PUBLIC_URL's path ('' when it has none): what a 201's Location starts with. */
  basePath: string;
}

function callerOf(request: FastifyRequest): ClientCaller {
  const principal = principalOf(request);
  return { userId: principal.userId, grantor: principal };
}

/** The caller of a route that gives a client secret: declared `credential: 'access_token'`. */
function tokenCallerOf(request: FastifyRequest): TokenClientCaller {
  const principal = principalTaking(request, 'access_token');
  return { userId: principal.userId, grantor: principal };
}

export async function clientsRoutes(app: FastifyInstance, deps: ClientsRoutesDeps) {
  const r = app.withTypeProvider<ZodTypeProvider>();
  const dto = (row: Parameters<typeof toClientDto>[0]) => toClientDto(row, deps.clock.now());

  r.post(
    '/v1/clients',
    {
      config: { permission: 'clients:write', credential: 'access_token', noStore: true },
      schema: {
        tags: ['clients'],
        operationId: 'createClient',
        summary: 'Register an app client (service-to-service); the secret is shown once',
        description:
          'The scopes must be permissions the caller holds (403 otherwise). Use `client_id` and ' +
          '`client_secret` at POST /oauth/token with `grant_type=client_credentials`. An API key registers ' +
          'none: a client secret would outlive the key. A user has at most MAX_CLIENTS_PER_USER clients, ' +
          'active or disabled (409 beyond it).',
        body: CreateClientBodySchema,
        response: {
          201: ClientWithSecretSchema,
          ...problems(400, 401, 403, 415, 503),
          409: problemResponses[409].describe(
            'The user has MAX_CLIENTS_PER_USER clients already (the limit is in `detail`)',
          ),
        },
      },
    },
    async (request, reply) => {
      const { client, secret } = await deps.clients.create(
        tokenCallerOf(request),
        {
          name: request.body.name,
          description: request.body.description,
          scopes: request.body.scopes,
          audiences: request.body.audiences,
          accessTokenTtl: request.body.access_token_ttl,
        },
        requestContext(request),
      );
      return reply
        .status(201)
        .header('location', `${deps.basePath}/v1/clients/${client.id}`)
        .send({ ...dto(client), client_secret: secret });
    },
  );

  r.get(
    '/v1/clients',
    {
      config: { permission: 'clients:read' },
      schema: {
        tags: ['clients'],
        operationId: 'listClients',
        summary: 'App clients the caller registered (every client for administrators)',
        security: bearerOrApiKey,
        querystring: ClientListQuerySchema,
        response: { 200: ClientPageSchema, ...problems(400, 401, 403) },
      },
    },
    async (request) => {
      const { page, nextCursor } = await deps.clients.list(callerOf(request), {
        limit: request.query.limit,
        cursor: decodeCursor(request.query.cursor),
      });
      return { data: page.map(dto), next_cursor: nextCursor };
    },
  );

  r.get(
    '/v1/clients/:id',
    {
      config: { permission: 'clients:read' },
      schema: {
        tags: ['clients'],
        operationId: 'getClient',
        summary: 'One app client (never its secret)',
        security: bearerOrApiKey,
        params: ClientIdParamSchema,
        response: { 200: ClientSchema, ...problems(400, 401, 403, 404) },
      },
    },
    async (request) => dto(await deps.clients.get(callerOf(request), request.params.id)),
  );

  r.patch(
    '/v1/clients/:id',
    {
      config: { permission: 'clients:write' },
      schema: {
        tags: ['clients'],
        operationId: 'updateClient',
        summary:
          'Change an app client: name, description, scopes, audiences, token lifetime, status, whom it acts for',
        description:
          'Disabling a client refuses its secret at once and revokes the access tokens it holds on every instance; so does binding it to its creator (`acts_for_creator: true`).',
        security: bearerOrApiKey,
        params: ClientIdParamSchema,
        body: UpdateClientBodySchema,
        response: { 200: ClientSchema, ...problems(400, 401, 403, 404, 409, 415, 503) },
      },
    },
    async (request) =>
      dto(
        await deps.clients.update(
          callerOf(request),
          request.params.id,
          {
            name: request.body.name,
            description: request.body.description,
            scopes: request.body.scopes,
            audiences: request.body.audiences,
            accessTokenTtl: request.body.access_token_ttl,
            status: request.body.status,
            actsForCreator: request.body.acts_for_creator,
          },
          requestContext(request),
        ),
      ),
  );

  r.delete(
    '/v1/clients/:id',
    {
      config: { permission: 'clients:write' },
      schema: {
        tags: ['clients'],
        operationId: 'deleteClient',
        summary: 'Delete an app client; the access tokens it holds are revoked',
        description:
          'A client an administrator disabled (`disabled_by_administrator: true`) is deleted by an ' +
          'administrator only (403 for its creator): the disable is theirs to lift.',
        security: bearerOrApiKey,
        params: ClientIdParamSchema,
        response: { 204: z.null().describe('Deleted'), ...problems(400, 401, 403, 404, 503) },
      },
    },
    async (request, reply) => {
      await deps.clients.remove(callerOf(request), request.params.id, requestContext(request));
      return reply.status(204).send(null);
    },
  );

  r.post(
    '/v1/clients/:id/secrets',
    {
      config: { permission: 'clients:write', credential: 'access_token', noStore: true },
      schema: {
        tags: ['clients'],
        operationId: 'rotateClientSecret',
        summary: 'Rotate the client secret; the new one is shown once',
        description:
          'The current secret keeps working for `grace_seconds` (default 0), then stops; access tokens ' +
          'already issued stay valid until they expire (disable the client to revoke them). The caller must ' +
          'hold every scope of the client (403 otherwise): the new secret is shown to the caller, and would ' +
          'outlive an API key.',
        params: ClientIdParamSchema,
        body: RotateSecretBodySchema.nullish(),
        response: {
          201: ClientWithSecretSchema.describe(
            'The client with its new secret, shown once. No `Location`: a secret has no URL of its own ' +
              '(nothing reads or deletes one), and the client is the parent of the path posted to',
          ),
          ...problems(400, 401, 403, 404, 409, 415, 503),
        },
      },
    },
    async (request, reply) => {
      const { client, secret } = await deps.clients.rotateSecret(
        tokenCallerOf(request),
        request.params.id,
        request.body?.grace_seconds ?? 0,
        requestContext(request),
        request.body?.force ?? false,
      );
      return reply.status(201).send({ ...dto(client), client_secret: secret });
    },
  );
}
