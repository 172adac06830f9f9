import swagger from '@fastify/swagger';
import swaggerUi from '@fastify/swagger-ui';
import type { FastifyInstance } from 'fastify';
import fp from 'fastify-plugin';
import { jsonSchemaTransform, jsonSchemaTransformObject } from 'fastify-type-provider-zod';

/** Where Swagger UI and its assets are served: HTML pages, unlike every other route. */
export const DOCS_PREFIX = '/docs';

export interface OpenApiOptions {
  publicUrl: string;
  version: string;
}

async function openApiPlugin(app: FastifyInstance, options: OpenApiOptions) {
  await app.register(swagger, {
    openapi: {
      openapi: '3.1.0',
      info: {
        title: 'Paservices auth service',
        version: options.version,
        description:
          'Login and sessions for frontends; roles, permissions, profiles, API keys and app clients; ' +
          'JWT access tokens (RFC 9068) with a JWKS, OAuth 2.0 client credentials, introspection and revocation. ' +
          'Errors are RFC 9457 problem+json, except under /oauth where they follow RFC 6749 §5.2.',
      },
      servers: [{ url: options.publicUrl }],
      components: {
        securitySchemes: {
          bearerAuth: {
            type: 'http',
            scheme: 'bearer',
            bearerFormat: 'JWT or API key',
            description: 'An access token (JWT) from /v1/auth/login or /oauth/token, or an API key.',
          },
          apiKey: { type: 'apiKey', in: 'header', name: 'X-API-Key', description: 'An API key (pak_…).' },
          clientBasic: {
            type: 'http',
            scheme: 'basic',
            description: 'OAuth client authentication (client_secret_basic) for /oauth endpoints.',
          },
        },
      },
      tags: [
        { name: 'auth', description: 'Sign-up, login, sessions (frontends)' },
        { name: 'oauth', description: 'OAuth 2.0 token, introspection and revocation endpoints' },
        { name: 'discovery', description: 'JWKS and authorization-server metadata' },
        { name: 'users', description: 'User administration' },
        { name: 'roles', description: 'Roles and permissions' },
        { name: 'profiles', description: 'User profiles' },
        { name: 'api-keys', description: 'API keys' },
        { name: 'clients', description: 'App clients (service-to-service)' },
        { name: 'signing-keys', description: 'Token signing keys' },
        { name: 'audit', description: 'Audit log' },
        { name: 'operations', description: 'Health and metrics' },
      ],
    },
    transform: jsonSchemaTransform,
    // Registers schemas named with `.meta({ id })` (User, Session, Problem, …) as components.
    transformObject: jsonSchemaTransformObject,
  });

  // Swagger UI's own routes (HTML, assets) are public documentation.
  app.addHook('onRoute', (route) => {
    if (route.url.startsWith(DOCS_PREFIX)) route.config = { ...(route.config ?? {}), public: true };
  });
  await app.register(swaggerUi, {
    routePrefix: DOCS_PREFIX,
    uiConfig: { persistAuthorization: true, deepLinking: true, tryItOutEnabled: true },
    staticCSP: false,
  });

  app.get('/openapi.json', { schema: { hide: true }, config: { public: true } }, async (_request, reply) =>
    reply.type('application/json').send(app.swagger()),
  );
}

export default fp(openApiPlugin, { name: 'openapi', fastify: '5.x' });
