import { randomUUID } from 'node:crypto';
import type { IncomingMessage, ServerResponse } from 'node:http';
import cors from '@fastify/cors';
import Fastify, {
  type FastifyBaseLogger,
  type FastifyInstance,
  type FastifyReply,
  type FastifyRequest,
  LogController,
  type onRequestHookHandler,
  type preValidationHookHandler,
} from 'fastify';
import { validatorCompiler } from 'fastify-type-provider-zod';
import type { Config } from './config.js';
import type { DatabaseHandle } from './db/client.js';
import { type Clock, systemClock } from './lib/clock.js';
import { AppError, invalidFields } from './lib/errors.js';
import { lazyChildLogger } from './lib/logger.js';
import { serializerCompiler } from './lib/serializer.js';
import { hasMalformedEscapes, malformedEscapesError, parseFormBody } from './lib/form.js';
import { duplicateMemberError, forbiddenKeyError, jsonBodyError, jsonBodyText } from './lib/json-body.js';
import { jsonMayHoldNul, nulError, nulFields } from './lib/nul-characters.js';
import type { Redis } from 'ioredis';
import type { Logger } from 'pino';
import type { IdentityProvider } from './identity/provider.js';
import { apiKeysRoutes, createApiKeyResolver } from './modules/api-keys/api-keys.routes.js';
import { auditRoutes } from './modules/audit/audit.routes.js';
import { authRoutes } from './modules/auth/auth.routes.js';
import { mfaRoutes } from './modules/auth/mfa.routes.js';
import { profilesRoutes } from './modules/profiles/profiles.routes.js';
import { rolesRoutes } from './modules/roles/roles.routes.js';
import { usersRoutes } from './modules/users/users.routes.js';
import { discoveryRoutes } from './modules/discovery/discovery.routes.js';
import { healthRoutes } from './modules/health/health.routes.js';
import { signingKeysRoutes } from './modules/signing-keys/signing-keys.routes.js';
import { clientsRoutes } from './modules/clients/clients.routes.js';
import { renderOAuthError } from './modules/oauth/oauth.errors.js';
import { OAUTH_RESPONSE_HEADERS, oauthRoutes } from './modules/oauth/oauth.routes.js';
import authenticate, {
  decidedOnHeldNow,
  type RouteCredential,
  requestContext,
} from './plugins/authenticate.js';
import errorHandler, {
  answerClientError,
  answerExpectationFailed,
  type ClientErrorAnswer,
  refuseOtherMethodsOfLiteralPaths,
  routePathOf,
} from './plugins/error-handler.js';
import metricsPlugin from './plugins/metrics.js';
import openapi, { DOCS_PREFIX, REDOC_HELMET, REDOC_PATH, SWAGGER_UI_HELMET } from './plugins/openapi.js';
import rateLimit from './plugins/rate-limit.js';
import { isAtOrUnder, NO_STORE_HEADERS, responseHeaders } from './plugins/security-headers.js';
import { createServices, type Services } from './services.js';
import type { Mailer } from './lib/mailer.js';

export interface AppDeps {
  config: Config;
  database: DatabaseHandle;
  logger: Logger;
  clock?: Clock;
  /** Replaces the provider AUTH_PROVIDER would choose (tests use a fake GoTrue through the real one). */
  identityProvider?: IdentityProvider;
  redis?: Redis;
  /** Where the service's mail goes; by default SMTP_URL's server (services.ts). */
  mailer?: Mailer;
  /** How often the bootstrap admin is tried again while the identity provider is down at start. */
  bootstrapRetryMs?: number;
  /** How often mail the mail server refused is retried (default 15 s; 0: only when `deliverDue` is called). */
  mailRetryIntervalMs?: number;
  /** How long a queued mail's send may take before it is given up (default: 3 × SMTP_TIMEOUT_MS). */
  mailSendTimeoutMs?: number;
}

export const SERVICE_VERSION = '0.1.0';

export interface RouteEntry {
  method: string;
  url: string;
  public: boolean;
  permission: string | string[] | undefined;
  /** Answered with `Cache-Control: no-store` (config.noStore). */
  noStore?: boolean;
  /** Decided on what the caller holds now, not only on their credential (config.heldNow). */
  heldNow?: boolean;
  /** The credential it takes, when not every one will do (config.credential). */
  credential?: RouteCredential | undefined;
  /** A signed-in user's token ends its own session here without the permission (config.ownSession). */
  ownSession?: boolean;
}

const REQUEST_ID_PATTERN = /^[A-Za-z0-9._:-]{1,128}$/;

/** No content coding at all, or `identity`: the only ones the body parsers read. */
const IDENTITY = /^\s*(?:identity)?\s*$/i;

/** RFC 9110 §15.5.16: an unsupported content coding is a 415, with the codings that would do. */
const unsupportedContentCoding = () =>
  new AppError('unsupported_media_type', {
    detail: 'Send the body without a Content-Encoding: compressed bodies are not accepted',
    headers: { 'accept-encoding': 'identity' },
  });

const sendNoStore: onRequestHookHandler = (_request, reply, done) => {
  reply.headers(NO_STORE_HEADERS);
  done();
};

/**
 * What a CORS answer to a listed origin carries besides the origin itself (and `Vary`). The headers a
 * browser app may read beyond the CORS-safelisted ones: a 201's `Location` (what it made), a 405's
 * `Allow`, and the per-IP limits' `X-RateLimit-*` (what is left, and when it resets) among them.
 */
const CORS_ANSWER_HEADERS = {
  'access-control-allow-credentials': 'true',
  'access-control-expose-headers':
    'x-request-id,retry-after,www-authenticate,location,allow,x-ratelimit-limit,x-ratelimit-remaining,x-ratelimit-reset',
} as const;

/** How long a browser may keep a preflight's answer (Access-Control-Max-Age). */
const CORS_PREFLIGHT_MAX_AGE_SECONDS = 600;

/**
 * The CORS headers of an answer no hook of @fastify/cors wrote (the router's and the HTTP parser's
 * refusals, and the errors of the first onRequest hook, which runs before its), as it writes them:
 * for a listed origin only (compared exactly, so the value written is one of the configured origins).
 */
const corsHeadersFor =
  (origins: readonly string[]) =>
  (origin: string): Readonly<Record<string, string>> | undefined =>
    origins.includes(origin)
      ? { ...CORS_ANSWER_HEADERS, 'access-control-allow-origin': origin, vary: 'Origin' }
      : undefined;

/** Methods whose requests carry no body by their definition. */
const BODILESS_METHODS = new Set(['GET', 'HEAD', 'OPTIONS']);

/** A route's hooks of one kind (none, one or a list, as declared) with `hook` run after them. */
const withHook = <H>(existing: H | H[] | undefined, hook: H): H[] =>
  existing === undefined ? [hook] : ([...[existing].flat(), hook] as H[]);

/**
 * A preValidation hook refusing, with a 400 naming each, the fields of a part of the request that an
 * operation does not take at all.
 */
const refuseFieldsOf =
  (
    part: 'body' | 'query',
    taken: (request: FastifyRequest) => unknown,
    message: string,
  ): preValidationHookHandler =>
  (request, _reply, done) => {
    const value = taken(request);
    const names = value == null ? [] : Object.keys(value);
    if (names.length === 0) return done();
    done(invalidFields(names.map((name) => ({ field: `${part}.${name}`, message }))));
  };

/**
 * An operation without a body: a body with fields is a 400 naming them. The body parsers hand over
 * an object or nothing (lib/json-body.ts refuses any other JSON).
 */
const refuseBody = refuseFieldsOf(
  'body',
  (request) => request.body,
  'is not accepted: this operation takes no body',
);

/**
 * An API write without query parameters: any is a 400 naming it, rather than silently ignored
 * (`POST /v1/api-keys?owner_id=…` made a key for the caller, not for the user named; `?key=` on verify
 * would put a key in access logs).
 */
const refuseQuery = refuseFieldsOf(
  'query',
  (request) => request.query,
  'is not accepted: this operation takes no query parameters',
);

/** A request that arrived once the server began closing (in-flight ones finish). */
const shuttingDownError = () =>
  new AppError('service_unavailable', {
    detail: 'This instance is shutting down; retry, and another instance will answer',
    headers: { 'retry-after': '1' },
  });

/** A non-empty plain object (route params). */
const hasKeys = (value: unknown) =>
  typeof value === 'object' && value !== null && Object.keys(value).length > 0;

/** A UUID, as users' ids are written in paths (any case). */
const UUID_PATH_ID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

/**
 * What a refused request was about, as the audit log's `subject_id` names it: the user of the path
 * (`/v1/users/:id…`, `/v1/profiles/:user_id`), so `?subject_id=` finds the attempts on an account
 * beside what was done to it. Only there, and only a UUID: the check runs before the path is
 * validated, and a role's, key's or client's path would let anyone write into a user's history by
 * naming their id as a role or a client. Every path's ids stay in `data.params`.
 */
function refusalAbout(request: FastifyRequest) {
  const params = (request.params ?? {}) as Record<string, unknown>;
  const url = request.routeOptions.url ?? '';
  const user = url.startsWith('/v1/users/:id')
    ? params.id
    : url === '/v1/profiles/:user_id'
      ? params.user_id
      : undefined;
  return {
    subjectId: typeof user === 'string' && UUID_PATH_ID.test(user) ? user.toLowerCase() : null,
    ...(hasKeys(params) ? { params } : {}),
  };
}

/** Builds the whole service without listening and without reading the environment. */
export async function buildApp(deps: AppDeps): Promise<FastifyInstance> {
  const { config, database } = deps;
  const clock = deps.clock ?? systemClock;
  let shuttingDown = false;
  const requestLogging = deps.logger.isLevelEnabled('info');
  const corsHeaders = corsHeadersFor(config.corsOrigins);

  /**
   * A request the router refused before any route (and so any hook) ran: counted in the metrics as
   * an unmatched one, and its "request completed" line written, as for every other request.
   */
  const completeUnrouted = (request: FastifyRequest, reply: FastifyReply) => {
    const started = performance.now();
    reply.raw.once('finish', () => {
      const ms = performance.now() - started;
      services.metrics.http.record(request.method, 'unmatched', reply.statusCode, ms / 1000);
      if (requestLogging) request.log.info({ res: reply, responseTime: ms }, 'request completed');
    });
  };

  /**
   * A request answered before Fastify had it (by the HTTP parser's handler, or Node's server): counted
   * in the metrics as an unmatched request (how long it took is not known: 0) and logged.
   */
  const recordRefusal =
    (message: string) =>
    ({ status, method, target, reason, remoteAddress }: ClientErrorAnswer) => {
      services.metrics.http.record(method, 'unmatched', status, 0);
      if (requestLogging)
        deps.logger.info(
          { req: { method, url: target, ip: remoteAddress }, res: { statusCode: status }, reason },
          message,
        );
    };

  const app: FastifyInstance = Fastify({
    loggerInstance: deps.logger as FastifyBaseLogger,
    childLoggerFactory: (logger, bindings, options) => lazyChildLogger(logger as Logger, bindings, options),
    // Fastify's own "incoming request" / "request completed" lines are info; below that level they
    // would be dropped anyway, so Fastify is told not to build them on every request. (Through its
    // log controller: the top-level `disableRequestLogging` option is deprecated since Fastify 5.12.)
    logController: new LogController({ disableRequestLogging: !requestLogging }),
    bodyLimit: config.bodyLimit,
    // A client that trickles its request in (slowloris) gets a 408 and its connection closed, instead
    // of holding a socket forever: Fastify's default is no limit. Node checks every second.
    requestTimeout: config.requestTimeoutMs,
    http: {
      headersTimeout: Math.min(60_000, config.requestTimeoutMs),
      connectionsCheckingInterval: 1000,
    },
    trustProxy: config.trustProxy,
    requestIdHeader: false,
    genReqId: (req) => {
      const incoming = req.headers['x-request-id'];
      return typeof incoming === 'string' && REQUEST_ID_PATTERN.test(incoming) ? incoming : randomUUID();
    },
    // `__proto__` and `constructor.prototype` keys are refused with a 400 naming the key (ASVS V2;
    // lib/json-body.ts says where, since Fastify's error calls the body invalid JSON).
    onProtoPoisoning: 'error',
    onConstructorPoisoning: 'error',
    // A request that arrives on an open connection once the server is closing is answered 503 by the
    // onRequest hook below, in problem+json with Retry-After (Fastify's own 503 is a fixed JSON body).
    return503OnClosing: false,
    forceCloseConnections: 'idle',
    routerOptions: { maxParamLength: 200 },
    // What Node's HTTP parser refuses (bad syntax, oversized headers, REQUEST_TIMEOUT_MS) in problem+json;
    // counted in the metrics as an unmatched request (how long it took is not known: 0) and logged.
    clientErrorHandler: (err, socket) =>
      answerClientError(err, socket, recordRefusal('request refused by the HTTP parser'), corsHeaders),
    // A URL the router refuses before any route runs (bad percent-encoding, a path parameter over
    // maxParamLength) is answered by the service's own error handler, in its error format, with the
    // headers every API answer carries: no hook runs for it.
    frameworkErrors: (error, request, reply) => {
      // Nor does @fastify/cors's: the error handler writes a listed origin's CORS headers.
      reply.header('x-request-id', request.id).headers(headersFor(request.url));
      completeUnrouted(request, reply);
      return app.errorHandler(error, request, reply);
    },
  });
  // An `Expect` other than 100-continue: Node answers it before Fastify sees the request, and without
  // this listener with a bare 417. Node emits it for those requests alone.
  app.server.on('checkExpectation', (request: IncomingMessage, response: ServerResponse) =>
    answerExpectationFailed(
      request,
      response,
      recordRefusal('request refused: an expectation it cannot meet'),
      corsHeaders,
    ),
  );
  // JSON everywhere (and form bodies under /oauth, in its scope below); anything else is a 415.
  app.removeContentTypeParser('text/plain');
  // Fastify's own JSON parser (with the poisoning checks above), then the depth and number checks of
  // lib/json-body (before anything that recurses reads the value), no member twice in one object, and
  // the NUL check of lib/nul-characters,
  // on the body's bytes checked as UTF-8 first (lib/json-body's jsonBodyText).
  const parseJson = app.getDefaultJsonParser('error', 'error');
  app.removeContentTypeParser('application/json');
  app.addContentTypeParser('application/json', { parseAs: 'buffer' }, (request, raw, done) => {
    // No bytes at all is no body, whatever the header says: HTTP clients configured to send
    // `Content-Type: application/json` on every request do so on a DELETE too. An operation that
    // needs a body still says it is missing.
    if ((raw as Buffer).length === 0) return done(null, undefined);
    const text = jsonBodyText(raw as Buffer, request.headers['content-type']);
    if (typeof text !== 'string') return done(text);
    parseJson(request, text, (err, value) => {
      // Fastify calls a forbidden key invalid JSON; the answer says what it is.
      if ((err as { code?: string } | null)?.code === 'FST_ERR_CTP_INVALID_JSON_BODY')
        return done(forbiddenKeyError(text) ?? err);
      if (err) return done(err, value);
      const invalid = jsonBodyError(value, text) ?? duplicateMemberError(value, text);
      if (invalid) return done(invalid);
      if (!jsonMayHoldNul(text)) return done(null, value);
      const fields = nulFields(value, 'body');
      return fields.length > 0 ? done(nulError(fields)) : done(null, value);
    });
  });
  app.setValidatorCompiler(validatorCompiler);
  app.setSerializerCompiler(serializerCompiler);

  // Every route with its declared access, so a test can prove none was left undeclared.
  const routeTable: RouteEntry[] = [];
  app.decorate('routeTable', routeTable);
  app.addHook('onRoute', (route) => {
    // CORS preflights carry no credentials by design (the cors plugin answers them), and Swagger UI's
    // own routes (HTML, assets) are public documentation: /docs and what is under /docs/, not any path
    // that merely starts with those letters (/docsX). Marked here, in the first onRoute hook, so the
    // authenticate plugin sees it.
    if (route.method === 'OPTIONS' || isAtOrUnder(route.url, DOCS_PREFIX))
      route.config = { ...(route.config ?? {}), public: true };
    const config = (route.config ?? {}) as {
      public?: boolean;
      permission?: string | string[];
      noStore?: boolean;
      heldNow?: boolean;
      credential?: RouteCredential;
      ownSession?: boolean;
    };
    // Every API answer is no-store (the header set); a route answering with a credential also gets
    // RFC 6749 §5.1's Pragma from a hook of its own.
    if (config.noStore === true) route.onRequest = withHook(route.onRequest, sendNoStore);
    const methods = Array.isArray(route.method) ? route.method : [route.method];
    const writes = methods.some((m) => !BODILESS_METHODS.has(m));
    // An operation that declares no body refuses one with fields, rather than ignoring what the
    // client meant by it (`{}` and no body at all are the same thing).
    if (writes && route.schema?.body === undefined)
      route.preValidation = withHook(route.preValidation, refuseBody);
    // A write only: a read ignores what it does not take (a cache-buster's `?_=…` on GET /v1/auth/me),
    // while a write that ignored `?owner_id=` did something other than what was asked.
    if (writes && route.url.startsWith('/v1/') && route.schema?.querystring === undefined)
      route.preValidation = withHook(route.preValidation, refuseQuery);
    for (const method of methods) {
      if (method === 'HEAD') continue;
      routeTable.push({
        method,
        url: route.url,
        public: config.public === true,
        permission: config.permission,
        noStore: config.noStore === true,
        heldNow: config.public !== true && decidedOnHeldNow(method, config.heldNow),
        credential: config.credential,
        ownSession: config.public !== true && config.ownSession === true,
      });
    }
  });
  app.decorate('isShuttingDown', () => shuttingDown);
  app.decorate('markShuttingDown', () => {
    shuttingDown = true;
  });
  // The REST header set on API answers (with no-store on the OAuth endpoints), helmet's on the
  // documentation pages (Swagger UI's, ReDoc's); all computed once at start.
  const headersFor = await responseHeaders({
    extra: [{ prefix: '/oauth/', headers: OAUTH_RESPONSE_HEADERS }],
    pages: [
      { prefix: REDOC_PATH, helmet: REDOC_HELMET },
      { prefix: DOCS_PREFIX, helmet: SWAGGER_UI_HELMET },
    ],
  });
  // Everything every request gets, in one synchronous hook: an async hook costs a promise and a
  // microtask turn on every request, and each hook a turn through Fastify's hook runner. It runs
  // before @fastify/cors's: the error handler gives the errors it raises a listed origin's CORS headers.
  let closing = false;
  app.addHook('preClose', (done) => {
    closing = true;
    done();
  });
  app.addHook('onRequest', (request, reply, done) => {
    reply.header('x-request-id', request.id);
    reply.headers(headersFor(routePathOf(request)));
    // Fastify has set `Connection: close`; the request goes to another instance.
    if (closing) return done(shuttingDownError());
    // A %-escape is looked for once: a URL without one (the hot paths' POSTs) costs the two searches
    // urlEncodedMayHoldNul made. The router refuses a malformed one in the path; fast-querystring
    // would read one in the query string as literal text (`?query=%zz`), so it is refused here.
    const url = request.url;
    const escaped = url.includes('%');
    if (escaped) {
      const query = url.indexOf('?');
      if (query !== -1 && hasMalformedEscapes(url.slice(query + 1)))
        return done(malformedEscapesError('The query string'));
    }
    // urlEncodedMayHoldNul, its `%00` search made only where there is a `%`.
    if ((escaped && url.includes('%00')) || url.includes('\u0000')) {
      const fields = [...nulFields(request.params, 'path'), ...nulFields(request.query, 'query')];
      if (fields.length > 0) return done(nulError(fields));
    }
    const coding = request.headers['content-encoding'];
    if (
      coding !== undefined &&
      request.method !== 'GET' &&
      request.method !== 'HEAD' &&
      !IDENTITY.test(coding)
    )
      return done(unsupportedContentCoding());
    done();
  });

  const services = createServices({
    config,
    database,
    logger: deps.logger,
    clock,
    identityProvider: deps.identityProvider,
    redis: deps.redis,
    bootstrapRetryMs: deps.bootstrapRetryMs,
    mailer: deps.mailer,
    mailRetryIntervalMs: deps.mailRetryIntervalMs,
    mailSendTimeoutMs: deps.mailSendTimeoutMs,
  });
  await services.start();
  app.addHook('onClose', async () => {
    await services.stop();
  });

  // A path as the client sees it: behind a proxy that strips PUBLIC_URL's path
  // (https://example.com/auth), /auth/v1/roles/x, not /v1/roles/x, which would resolve outside it. A
  // 201's Location is one, and so is a problem's `instance`.
  const basePath = new URL(config.publicUrl).pathname.replace(/\/+$/, '');
  // RFC 6749 §5.2 errors under /oauth; problem+json everywhere else.
  await app.register(errorHandler, {
    renderers: [{ prefix: '/oauth/', render: renderOAuthError }],
    basePath,
    // Errors raised before @fastify/cors's hook ran (the router's, the hook above's) carry a listed
    // origin's CORS headers too.
    corsHeaders: config.corsOrigins.length > 0 ? corsHeaders : undefined,
  });
  // Browsers on the configured origins only. With none, there is no CORS at all: no headers, no
  // preflight route (OPTIONS answers 405, a method no route takes), and no per-request CORS work.
  if (config.corsOrigins.length > 0) {
    await app.register(cors, {
      origin: config.corsOrigins,
      credentials: true,
      // An OPTIONS that is no complete preflight (no Origin, no Access-Control-Request-Method) is
      // answered as one (204, no Allow-Origin for an origin not listed), not with the plugin's
      // plain-text 400, which no client reads as a problem.
      strictPreflight: false,
      methods: ['GET', 'POST', 'PUT', 'PATCH', 'DELETE'],
      allowedHeaders: ['authorization', 'content-type', 'x-api-key', 'x-request-id'],
      // As a string, written as it is: a list is joined again on every answer.
      exposedHeaders: CORS_ANSWER_HEADERS['access-control-expose-headers'],
      // Without Access-Control-Max-Age a browser keeps a preflight 5 s, so a page preflights nearly
      // every JSON or authenticated request: one more round trip, and one more request here, each
      // time. 10 minutes bounds how long an origin taken out of CORS_ORIGINS can still send (not read)
      // non-simple requests from a preflight its browser kept. Written once at start, on preflights only.
      maxAge: CORS_PREFLIGHT_MAX_AGE_SECONDS,
    });
  }
  // GET /v1/api-keys/verify is a 405 (the path takes POST), not GET /v1/api-keys/{id} with a bad id.
  refuseOtherMethodsOfLiteralPaths(app, routeTable);
  await app.register(metricsPlugin, { metrics: services.metrics, token: config.metricsToken });
  if (config.rateLimit.enabled)
    await app.register(rateLimit, { link: services.redisLink, metrics: services.metrics });
  await app.register(authenticate, {
    tokens: services.tokens,
    apiKeys: createApiKeyResolver(services.apiKeys),
    onForbidden: async (request, permission, reason) => {
      const { subjectId, params } = refusalAbout(request);
      await services.audit.record(services.db, requestContext(request), {
        type: 'authorization.denied',
        outcome: 'failure',
        subjectId,
        data: {
          permission,
          route: request.routeOptions.url,
          method: request.method,
          // The path's ids (a user, a role, a client): what the refused request was about.
          ...(params ? { params } : {}),
          ...(reason ? { reason } : {}),
        },
      });
    },
    heldNow: (principal) => services.grants.standing(principal, services.db),
  });
  // Every authorization failure is audited (SECURITY.md): the route's permission check and the grant
  // ceiling write their own, richer event and mark the error; any other 403 a service raises (a key
  // that may not log out every session, a service that may not own keys), a credential a route does
  // not take (`config.credential`, refused by the authenticate plugin), and a `forbidden` answered
  // with another status (introspection's 401, RFC 7662 §2.3), gets one here. A 403 that is no
  // authorization decision (`registration_closed`: the provider takes no sign-ups) is not one. Runs
  // only for requests that failed, after the change's transaction has rolled back.
  // A 404 that hid something of another's (`notYours`: a profile, an API key, a session, a client
  // the caller may not see) is one too: the same one event, written here, the answer unchanged.
  app.addHook('onError', async (request, _reply, error) => {
    if (!(error instanceof AppError) || error.audited) return;
    const concealed = error.code === 'not_found' ? error.concealed : undefined;
    if (error.code !== 'forbidden' && !concealed) return;
    try {
      const { subjectId, params } = refusalAbout(request);
      await services.audit.record(services.db, requestContext(request), {
        type: 'authorization.denied',
        outcome: 'failure',
        subjectId: concealed ? concealed.subjectId : subjectId,
        data: {
          ...(concealed ? { action: concealed.action, ...concealed.data } : {}),
          route: request.routeOptions.url,
          method: request.method,
          ...(params ? { params } : {}),
          reason: concealed ? 'not_owner' : error.detail,
        },
      });
      error.audited = true;
    } catch (err) {
      request.log.warn({ err }, 'the audit event of a refusal could not be written');
    }
  });
  await app.register(openapi, {
    publicUrl: config.publicUrl,
    version: SERVICE_VERSION,
    // Keeping what was entered under Authorize across reloads is a developer's convenience; in
    // production a token or key typed into the docs stays in that tab only, not in localStorage.
    persistAuthorization: config.env !== 'production',
    rateLimits: config.rateLimit.enabled,
  });

  await app.register(healthRoutes, {
    database,
    probeData: () => services.repos.users.probe(),
    isShuttingDown: () => shuttingDown,
  });
  await app.register(discoveryRoutes, {
    issuer: config.issuer,
    audience: services.audience,
    keys: services.keys,
    basePath,
  });
  await app.register(authRoutes, {
    auth: services.auth,
    users: services.users,
    mfa: services.mfa,
    passwordReset: services.passwordReset,
    emailConfirmation: services.emailConfirmation,
    emailChange: services.emailChange,
    magicLink: services.magicLink,
    accounts: services.accounts,
    providerName: services.provider.name,
    basePath,
  });
  await app.register(mfaRoutes, { mfa: services.mfa, users: services.users, auth: services.auth, basePath });
  await app.register(signingKeysRoutes, { keys: services.keys });
  await app.register(usersRoutes, {
    basePath,
    users: services.users,
    passwordReset: services.passwordReset,
    emailChange: services.emailChange,
    mfa: services.mfa,
  });
  await app.register(rolesRoutes, { roles: services.roles, basePath });
  await app.register(profilesRoutes, { profiles: services.profiles });
  await app.register(auditRoutes, { audit: services.audit });
  await app.register(apiKeysRoutes, { apiKeys: services.apiKeys, basePath });
  await app.register(clientsRoutes, { clients: services.clients, clock, basePath });
  // Form bodies (RFC 6749 §3.2) are parsed in the OAuth routes' own scope and nowhere else: every
  // other route answers one with 415, so a cross-site HTML form (which posts without a CORS preflight)
  // cannot log in, register or change anything.
  await app.register(async (scope) => {
    // The form parser is registered here, not by a plugin: it needs the request's Content-Type, which
    // a parser of the text alone (@fastify/formbody's) does not see, and a hook reading it would run on
    // every /oauth request, the introspections other services send on every call of theirs included.
    scope.addContentTypeParser(
      'application/x-www-form-urlencoded',
      { parseAs: 'buffer', bodyLimit: config.bodyLimit },
      (request, body, done) => {
        try {
          done(null, parseFormBody(request.headers['content-type'], body as Buffer));
        } catch (err) {
          done(err as Error, undefined);
        }
      },
    );
    await scope.register(oauthRoutes, { oauth: services.oauth });
  });

  app.decorate('services', services);
  app.addHook('onClose', async () => {
    shuttingDown = true;
  });
  return app;
}

declare module 'fastify' {
  interface FastifyInstance {
    services: Services;
    routeTable: RouteEntry[];
    isShuttingDown(): boolean;
    markShuttingDown(): void;
  }
  interface FastifyContextConfig {
    /** Reachable without credentials; every other route must declare `permission`. */
    public?: boolean;
    /** The permission the principal must hold (`resource:action`), or a list of which any one will do. */
    permission?: string | string[];
    /**
     * `false`: decided on the credential's own permissions, as reads are. Every POST, PUT, PATCH and
     * DELETE is otherwise decided on what the caller holds now (plugins/authenticate.ts); `false` is
     * for those that change nothing (a verification, a question) or only end the caller's own access
     * (logout, ending one of one's sessions), which a permission taken away must not block.
     */
    heldNow?: boolean;
    /** The answer holds a credential (tokens, a secret, a key): sent with `Cache-Control: no-store`. */
    noStore?: boolean;
    /**
     * The credential the route takes beyond its permission, when not every one will do (an API key
     * gets 403): `user_session`, a signed-in user's access token; `access_token`, a user's or a
     * service's. The authenticate plugin refuses any other (403) before the permission, the body or
     * the handler; a handler relying on it takes its principal with `principalTaking` (or
     * `signedInSession`), which serves nobody on a route not declaring it. The OpenAPI document says
     * it (plugins/openapi.ts).
     */
    credential?: RouteCredential;
    /**
     * `true`: the route ends the caller's own session (logout), which a signed-in user's access token
     * may always do, whatever its scope (one narrowed at a refresh, one whose roles were taken): that
     * token needs no `permission` here; any other credential (an API key, a token of no session)
     * still does, and what goes beyond the token's own session is the handler's to decide. The
     * OpenAPI document says it (plugins/openapi.ts).
     */
    ownSession?: boolean;
  }
}
