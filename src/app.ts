import { randomUUID } from 'node:crypto';
import cors from '@fastify/cors';
import formbody from '@fastify/formbody';
import helmet from '@fastify/helmet';
import Fastify, { type FastifyBaseLogger, type FastifyInstance } from 'fastify';
import { serializerCompiler, validatorCompiler } from 'fastify-type-provider-zod';
import type { Config } from './config.js';
import type { DatabaseHandle } from './db/client.js';
import { type Clock, systemClock } from './lib/clock.js';
import type { Redis } from 'ioredis';
import type { Logger } from 'pino';
import type { IdentityProvider } from './identity/provider.js';
import { authRoutes } from './modules/auth/auth.routes.js';
import { discoveryRoutes } from './modules/discovery/discovery.routes.js';
import { healthRoutes } from './modules/health/health.routes.js';
import { signingKeysRoutes } from './modules/signing-keys/signing-keys.routes.js';
import authenticate, { requestContext } from './plugins/authenticate.js';
import errorHandler from './plugins/error-handler.js';
import metricsPlugin from './plugins/metrics.js';
import openapi from './plugins/openapi.js';
import rateLimit from './plugins/rate-limit.js';
import { createServices, type Services } from './services.js';

export interface AppDeps {
  config: Config;
  database: DatabaseHandle;
  logger: Logger;
  clock?: Clock;
  /** Replaces the provider AUTH_PROVIDER would choose (tests use a fake GoTrue through the real one). */
  identityProvider?: IdentityProvider;
  redis?: Redis;
}

export const SERVICE_VERSION = '0.1.0';

const REQUEST_ID_PATTERN = /^[A-Za-z0-9._:-]{1,128}$/;

/** Builds the whole service without listening and without reading the environment. */
export async function buildApp(deps: AppDeps): Promise<FastifyInstance> {
  const { config, database } = deps;
  const clock = deps.clock ?? systemClock;
  let shuttingDown = false;

  const app = Fastify({
    loggerInstance: deps.logger as FastifyBaseLogger,
    bodyLimit: config.bodyLimit,
    trustProxy: config.trustProxy,
    requestIdHeader: false,
    genReqId: (req) => {
      const incoming = req.headers['x-request-id'];
      return typeof incoming === 'string' && REQUEST_ID_PATTERN.test(incoming) ? incoming : randomUUID();
    },
    // `__proto__` and `constructor.prototype` keys are refused with a 400 (ASVS V2).
    onProtoPoisoning: 'error',
    onConstructorPoisoning: 'error',
    return503OnClosing: true,
    forceCloseConnections: 'idle',
    routerOptions: { maxParamLength: 200 },
  });
  // JSON everywhere (and form bodies for /oauth, below); anything else is a 415.
  app.removeContentTypeParser('text/plain');
  app.setValidatorCompiler(validatorCompiler);
  app.setSerializerCompiler(serializerCompiler);

  app.decorate('isShuttingDown', () => shuttingDown);
  app.decorate('markShuttingDown', () => {
    shuttingDown = true;
  });
  app.addHook('onRequest', async (request, reply) => {
    reply.header('x-request-id', request.id);
  });

  const services = createServices({
    config,
    database,
    logger: deps.logger,
    clock,
    identityProvider: deps.identityProvider,
    redis: deps.redis,
  });
  await services.start();
  app.addHook('onClose', async () => {
    await services.stop();
  });

  await app.register(errorHandler, { renderers: [] });
  await app.register(helmet, {
    contentSecurityPolicy: {
      directives: {
        defaultSrc: ["'self'"],
        // Swagger UI's bundle applies inline styles and data: images; it needs nothing else.
        styleSrc: ["'self'", "'unsafe-inline'"],
        imgSrc: ["'self'", 'data:'],
        scriptSrc: ["'self'"],
        connectSrc: ["'self'"],
        frameAncestors: ["'none'"],
        formAction: ["'self'"],
      },
    },
    crossOriginResourcePolicy: { policy: 'same-site' },
  });
  await app.register(cors, {
    origin: config.corsOrigins.length === 0 ? false : config.corsOrigins,
    credentials: true,
    methods: ['GET', 'POST', 'PUT', 'PATCH', 'DELETE'],
    allowedHeaders: ['authorization', 'content-type', 'x-api-key', 'x-request-id'],
    exposedHeaders: ['x-request-id', 'retry-after', 'www-authenticate'],
  });
  await app.register(formbody, { bodyLimit: config.bodyLimit });
  await app.register(metricsPlugin, { metrics: services.metrics });
  if (config.rateLimit.enabled) await app.register(rateLimit, { redis: services.redis });
  await app.register(authenticate, {
    tokens: services.tokens,
    onForbidden: async (request, permission) => {
      await services.audit.record(services.db, requestContext(request), {
        type: 'authorization.denied',
        outcome: 'failure',
        data: { permission, route: request.routeOptions.url, method: request.method },
      });
    },
  });
  await app.register(openapi, { publicUrl: config.publicUrl, version: SERVICE_VERSION });

  await app.register(healthRoutes, { database, isShuttingDown: () => shuttingDown });
  await app.register(discoveryRoutes, {
    issuer: config.issuer,
    audience: services.audience,
    keys: services.keys,
  });
  await app.register(authRoutes, {
    auth: services.auth,
    users: services.repos.users,
    profiles: services.repos.profiles,
    providerName: services.provider.name,
  });
  await app.register(signingKeysRoutes, { keys: services.keys });

  app.decorate('services', services);
  app.addHook('onClose', async () => {
    shuttingDown = true;
  });
  return app;
}

declare module 'fastify' {
  interface FastifyInstance {
    services: Services;
    isShuttingDown(): boolean;
    markShuttingDown(): void;
  }
  interface FastifyContextConfig {
    /** Reachable without credentials; every other route must declare `permission`. */
    public?: boolean;
    /** The permission the principal must hold (`resource:action`). */
    permission?: string;
  }
}
