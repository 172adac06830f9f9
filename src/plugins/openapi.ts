import type { FastifyHelmetOptions } from '@fastify/helmet';
import { STATUS_CODES } from 'node:http';
import swagger from '@fastify/swagger';
import swaggerUi from '@fastify/swagger-ui';
import type { FastifyInstance, FastifyReply, FastifyRequest, FastifySchema } from 'fastify';
import fp from 'fastify-plugin';
import { jsonSchemaTransform, jsonSchemaTransformObject } from 'fastify-type-provider-zod';
import type { ZodType } from 'zod';
import { PERMISSIONS, SELF_SERVICE_PERMISSIONS } from '../lib/permissions.js';
import { API_KEY_MAX_FAILURES_PER_IP_PER_MINUTE } from '../modules/api-keys/api-keys.schema.js';
import { ProblemSchema } from '../modules/shared/shared.schema.js';
import type { RouteCredential } from './authenticate.js';
import { type PerIpLimit, perIpLimitOf } from './rate-limit.js';

/**
 * Swagger UI's request interceptor, sent to the browser as its source text (so self-contained, plain
 * JavaScript). Swagger UI sends every credential entered under Authorize that an operation accepts,
 * and this service takes one per request (RFC 6750 §2: a 400 otherwise): with both a token and an
 * API key entered, every "Try it out" would fail. The `Authorization` header wins; the key is dropped.
 */
export function oneCredential(request: { headers?: Record<string, unknown> }) {
  const headers = request.headers;
  if (headers) {
    const names = Object.keys(headers);
    const hasAuthorization = names.some((name) => name.toLowerCase() === 'authorization');
    if (hasAuthorization)
      for (const name of names) if (name.toLowerCase() === 'x-api-key') delete headers[name];
  }
  return request;
}

/** ReDoc's reference page of the OpenAPI document (the Python service had one at /redoc too). */
export const REDOC_PATH = '/redoc';

/**
 * ReDoc's standalone bundle, pinned to one version and checked by the browser against its hash (the
 * npm tarball's bundles/redoc.standalone.js, which jsDelivr serves): the page loads it from the CDN,
 * so the service carries no React stack for it.
 */
const REDOC_SCRIPT = {
  src: 'https://cdn.jsdelivr.net/npm/redoc@2.5.0/bundles/redoc.standalone.js',
  integrity: 'sha384-4vOjrBu7SuDWXcAw1qFznVLA/sKL+0l4nn+J1HY8w7cpa6twQEYuh4b0Cwuo7CyX',
};

/** helmet's configuration for Swagger UI's pages. */
export const SWAGGER_UI_HELMET: FastifyHelmetOptions = {
  contentSecurityPolicy: {
    directives: {
      defaultSrc: ["'self'"],
      // Swagger UI's bundle applies inline styles and data: images; it needs nothing else.
      styleSrc: ["'self'", "'unsafe-inline'"],
      imgSrc: ["'self'", 'data:'],
      // It loads no font at all (its CSS names system families): not helmet's default, which admits
      // fonts from any https: origin.
      fontSrc: ["'self'", 'data:'],
      scriptSrc: ["'self'"],
      connectSrc: ["'self'"],
      frameAncestors: ["'none'"],
      formAction: ["'self'"],
      // Not helmet's upgrade-insecure-requests: on a plain-http address other than localhost (a
      // development box on the LAN) it rewrote Swagger UI's own assets to https and broke /docs;
      // HSTS keeps deployments behind TLS on https.
      upgradeInsecureRequests: null,
    },
  },
  crossOriginResourcePolicy: { policy: 'same-site' },
  // As frame-ancestors 'none' says, for browsers that read only X-Frame-Options (helmet's default is
  // SAMEORIGIN, which would let a page of this origin frame the docs there).
  frameguard: { action: 'deny' },
};

/** ReDoc's page CSP: its script from the CDN only, its inline styles, and its search worker (blob:). */
export const REDOC_HELMET: FastifyHelmetOptions = {
  contentSecurityPolicy: {
    directives: {
      defaultSrc: ["'self'"],
      // The one file, not the CDN: no other package of it may run here.
      scriptSrc: [REDOC_SCRIPT.src],
      styleSrc: ["'self'", "'unsafe-inline'"],
      imgSrc: ["'self'", 'data:'],
      fontSrc: ["'self'", 'data:'],
      connectSrc: ["'self'"],
      workerSrc: ['blob:'],
      frameAncestors: ["'none'"],
      formAction: ["'self'"],
      upgradeInsecureRequests: null,
    },
  },
  crossOriginResourcePolicy: { policy: 'same-site' },
  frameguard: { action: 'deny' },
};

const REDOC_PAGE = `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Paservices auth service: API reference</title>
</head>
<body>
<redoc spec-url="./openapi.json"></redoc>
<script src="${REDOC_SCRIPT.src}" integrity="${REDOC_SCRIPT.integrity}" crossorigin="anonymous"></script>
</body>
</html>
`;

/** Where Swagger UI and its assets are served: HTML pages, unlike every other route. */
export const DOCS_PREFIX = '/docs';

/**
 * Swagger UI's page at /docs (no trailing slash) links its assets absolutely (/docs/static/…), and
 * its /docs/static/index.html redirects to /docs/: behind a proxy that strips PUBLIC_URL's path
 * (https://example.com/auth → the service's /) those miss. The page at /docs/ links them relatively,
 * so both are sent there by a relative redirect, which keeps whatever prefix the browser used.
 */
async function relativeDocsRedirects(request: FastifyRequest, reply: FastifyReply) {
  const at = request.url.indexOf('?');
  const path = at < 0 ? request.url : request.url.slice(0, at);
  const query = at < 0 ? '' : request.url.slice(at);
  if (path === DOCS_PREFIX) return uncachedRedirect(reply, `${DOCS_PREFIX.slice(1)}/${query}`);
  if (path === `${DOCS_PREFIX}/static/index.html`) return uncachedRedirect(reply, `../${query}`);
}

/**
 * A 301 that no browser keeps: without Cache-Control a 301 is cacheable by default (RFC 9111 §4.2.2)
 * and browsers keep it with no end, so a page moved later (or a route taking the address) would go
 * on being skipped by everyone who opened the docs once. These pages are opened rarely; asking again
 * costs nothing.
 */
function uncachedRedirect(reply: FastifyReply, to: string) {
  return reply.header('cache-control', 'no-store').redirect(to, 301);
}

interface DocumentedSchema {
  hide?: boolean;
  body?: unknown;
  params?: unknown;
  response?: Record<string, unknown>;
  security?: unknown[];
}

/**
 * The errors Fastify itself answers before a handler runs, declared on every operation they can reach,
 * so clients generated from the document expect them: 413 (body over BODY_LIMIT) and 415 (not JSON,
 * or form data to /oauth) wherever a body may come, 414 (a path segment over 200 characters) wherever
 * there is a path parameter. Every method but GET and HEAD may carry a body, declared or not, so
 * those two (and 400, for a body that is not JSON) go on all the others; and 400 on every operation
 * that takes a credential (two at once). Every operation may also answer 400 (a NUL character in the
 * path or the query string, or a malformed %-escape in the query string, refused before any handler),
 * 500 (a fault of the service's own, with the request id to quote) and 503 (a dependency down, or this instance shutting down). They take the
 * route's own 400 shape: problem+json, or RFC 6749 under /oauth. test/foundation/bad-input.test.ts
 * checks every status it provokes is declared, and test/support/contract.ts every answer of the suite.
 */
/**
 * `schema.describe(description)`, made once per schema and description for the process: every route
 * declares the same few framework errors, and an app built again (the tests build hundreds) then
 * hands the serializer the schemas it has compiled already (lib/serializer.ts).
 */
const describedSchemas = new WeakMap<ZodType, Map<string, ZodType>>();
function described(schema: ZodType, description: string): ZodType {
  let byDescription = describedSchemas.get(schema);
  if (!byDescription) {
    byDescription = new Map();
    describedSchemas.set(schema, byDescription);
  }
  let made = byDescription.get(description);
  if (!made) {
    made = schema.describe(description);
    byDescription.set(description, made);
  }
  return made;
}

function declareFrameworkErrors(method: string | string[], schema: DocumentedSchema | undefined) {
  const responses = schema?.response;
  if (!schema || schema.hide || !responses) return;
  const errorShape = responses[400] ?? ProblemSchema;
  const declare = (status: number, description: string) => {
    if (!(status in responses)) responses[status] = described(errorShape as ZodType, description);
  };
  const methods = Array.isArray(method) ? method : [method];
  if (methods.some((m) => m !== 'GET' && m !== 'HEAD')) {
    declare(400, 'The body is not valid JSON');
    declare(413, 'Body over the size limit');
    declare(415, 'Unsupported content type');
  }
  if (schema.params) declare(414, 'A path segment over 200 characters');
  declare(
    400,
    'A NUL character in the path or the query string, or a malformed %-escape in the query string',
  );
  declare(500, 'An unexpected fault of the service; `request_id` names it in the logs');
  declare(503, 'A dependency is unavailable, or this instance is shutting down; retry later');
  // The authenticate plugin refuses Authorization and X-API-Key sent together (RFC 6750 §2).
  if (schema.security && schema.security.length > 0) {
    declare(400, 'Two credentials at once: Authorization and X-API-Key');
    // The throttle of API keys that name no key (api-keys.service.ts, verifyPresented), sent as
    // Bearer or X-API-Key.
    declare(
      429,
      `Too many API keys that name no key from this address (${API_KEY_MAX_FAILURES_PER_IP_PER_MINUTE} a minute); see \`Retry-After\``,
    );
  }
}

/** What a route's config says of its access, as the authenticate plugin reads it. */
interface RouteAccess {
  public?: boolean;
  permission?: string | string[];
  credential?: RouteCredential;
  ownSession?: boolean;
}

/** The scheme of a route that takes no API key: an access token as `Authorization: Bearer`. */
const BEARER_ONLY = [{ bearerAuth: [] }];

/** What the description of a route that takes no API key says of the credential it takes. */
const CREDENTIAL_SENTENCES: Record<RouteCredential, string> = {
  user_session: 'Only with a signed-in user’s access token: an API key or a service’s token gets 403.',
  access_token: 'Only with an access token, a user’s or a service’s: an API key gets 403.',
};

/** What the description of a route that ends the caller's own session (config.ownSession) adds. */
export const OWN_SESSION_SENTENCE =
  'A signed-in user’s access token needs none of it to end its own session, whatever its scope.';

/** The sentence of a route's description naming its permission (any one of several will do). */
const permissionSentence = (permission: string | readonly string[]) =>
  `Needs the permission ${([] as string[])
    .concat(permission)
    .map((p) => `\`${p}\``)
    .join(' or ')}.`;

/**
 * The security requirements a service's token (OAuth 2.0 client credentials, which Swagger UI fetches
 * itself under Authorize) meets on an operation: one per permission that would do, each naming it as
 * the scope (any one of them will do, as any of the requirements will); none for a permission of
 * one's own account, which a service's token reaches nothing with (SELF_SERVICE_PERMISSIONS), nor on
 * a route for a signed-in user only.
 */
function clientCredentialsFor(access: RouteAccess): Array<Record<string, string[]>> {
  if (access.permission === undefined || access.credential === 'user_session') return [];
  return ([] as string[])
    .concat(access.permission)
    .filter((p) => !SELF_SERVICE_PERMISSIONS.has(p))
    .map((p) => ({ clientCredentials: [p] }));
}

/**
 * Each protected operation says what it needs, from the route's own declaration (`config.permission`,
 * `config.credential`, `config.ownSession`), so the document cannot drift from what the authenticate
 * plugin enforces: the permission as `x-required-permission` (a list when any one of several will do)
 * and as a sentence of its description, with another when a signed-in user's token needs none to end
 * its own session; a route that takes no API key as `x-credential` (`user_session`, `access_token`),
 * a sentence, and `bearerAuth` alone as its security (set when the route is registered, see
 * `declareFrameworkErrors`); and, beside `bearerAuth`, the `clientCredentials` requirements of a
 * service's token (clientCredentialsFor). test/foundation/openapi.test.ts checks every route of the
 * route table.
 */
const withAccess: typeof jsonSchemaTransform = (input) => {
  const result = jsonSchemaTransform(input);
  const access = (input.route.config ?? {}) as RouteAccess;
  const schema = result.schema as (FastifySchema & { hide?: boolean; description?: unknown }) | undefined;
  if (!schema || schema.hide || access.public === true || access.permission === undefined) return result;
  const sentences = [permissionSentence(access.permission)];
  if (access.ownSession === true) sentences.push(OWN_SESSION_SENTENCE);
  const documented: Record<string, unknown> = {
    'x-required-permission':
      typeof access.permission === 'string' || access.permission.length !== 1
        ? access.permission
        : access.permission[0],
  };
  if (access.credential) {
    sentences.push(CREDENTIAL_SENTENCES[access.credential]);
    documented['x-credential'] = access.credential;
  }
  const before = typeof schema.description === 'string' ? `${schema.description}\n\n` : '';
  const security = schema.security as Array<Record<string, unknown>> | undefined;
  if (security?.some((requirement) => 'bearerAuth' in requirement))
    documented.security = [...security, ...clientCredentialsFor(access)];
  return {
    ...result,
    schema: { ...schema, ...documented, description: `${before}${sentences.join(' ')}` },
  };
};

/**
 * The per-IP limit an operation counts against, from the route's own declaration (`config.rateLimit`,
 * `config.refreshRateLimit`: what plugins/rate-limit.ts applies), as `x-rate-limit`; its answers'
 * headers are declared from it (withRateLimitHeaders). Only when the limits are on (RATE_LIMIT_ENABLED):
 * otherwise no answer carries them.
 */
const withPerIpLimit =
  (on: boolean, transform: typeof jsonSchemaTransform): typeof jsonSchemaTransform =>
  (input) => {
    const result = transform(input);
    const limit = on ? perIpLimitOf(input.route.config) : undefined;
    const schema = result.schema as (FastifySchema & { hide?: boolean }) | undefined;
    if (!limit || !schema || schema.hide) return result;
    return { ...result, schema: { ...schema, 'x-rate-limit': limit } };
  };

/**
 * @fastify/rate-limit's headers on every answer of an operation with a per-IP limit (`x-rate-limit`),
 * its 429 included (whose `Retry-After` withRetryAfter declares): sent on each answer to a request
 * that was counted, which is every one past the checks that come first (a body with a NUL, a
 * compressed body, an instance shutting down).
 */
function withRateLimitHeaders<T>(document: T): T {
  const doc = document as {
    paths?: Record<
      string,
      Record<
        string,
        { 'x-rate-limit'?: PerIpLimit; responses?: Record<string, ResponseObject & { headers?: object }> }
      >
    >;
  };
  const integer = { type: 'integer', minimum: 0 };
  for (const item of Object.values(doc.paths ?? {})) {
    for (const operation of Object.values(item)) {
      const limit = operation['x-rate-limit'];
      if (!limit) continue;
      const headers = {
        'X-RateLimit-Limit': {
          description: `Requests an address may make in the window: ${limit.max} in ${limit.window_seconds} s (${limit.counter})`,
          schema: integer,
        },
        'X-RateLimit-Remaining': {
          description: 'Requests the address has left in the current window (0: the next one is a 429)',
          schema: integer,
        },
        'X-RateLimit-Reset': { description: 'Seconds until the current window ends', schema: integer },
      };
      for (const response of Object.values(operation.responses ?? {}))
        response.headers = { ...response.headers, ...headers };
    }
  }
  return document;
}

/**
 * The document without the `$id` and `$schema` keywords zod writes into each component schema
 * (`"$id": "#/components/schemas/Problem"`). In OpenAPI 3.1 a schema's `$id` starts a new JSON Schema
 * resource, so Swagger UI resolved the document's `#/components/...` references inside that schema
 * and showed "Could not resolve reference" errors on every operation it expanded. A component is
 * named by its key under `components.schemas`; the dialect is the document's.
 */
function withoutSchemaIds<T>(document: T): T {
  const walk = (node: unknown): void => {
    if (Array.isArray(node)) {
      for (const item of node) walk(item);
    } else if (node !== null && typeof node === 'object') {
      const record = node as Record<string, unknown>;
      for (const keyword of ['$id', '$schema'])
        if (typeof record[keyword] === 'string') delete record[keyword];
      for (const value of Object.values(record)) walk(value);
    }
  };
  walk((document as { components?: unknown }).components);
  walk((document as { paths?: unknown }).paths);
  return document;
}

type ResponseObject = { description?: string; content?: Record<string, { schema?: { $ref?: string } }> };

/**
 * Every answer described: @fastify/swagger writes "Default Response" where the schema has no
 * description of its own, which is every answer whose schema is a named component (a bare `$ref`).
 * Those take their component's description, the others their HTTP meaning ("No Content").
 */
function withResponseDescriptions<T>(document: T): T {
  const doc = document as {
    paths?: Record<string, Record<string, { responses?: Record<string, ResponseObject> }>>;
    components?: { schemas?: Record<string, { description?: string }> };
  };
  for (const item of Object.values(doc.paths ?? {})) {
    for (const operation of Object.values(item)) {
      for (const [status, response] of Object.entries(operation.responses ?? {})) {
        if (response.description && response.description !== 'Default Response') continue;
        const ref = Object.values(response.content ?? {})[0]?.schema?.$ref;
        const component = ref?.startsWith('#/components/schemas/')
          ? doc.components?.schemas?.[ref.slice('#/components/schemas/'.length)]
          : undefined;
        response.description = component?.description ?? STATUS_CODES[status] ?? 'Response';
      }
    }
  }
  return document;
}

interface RequestBodyObject {
  required?: boolean;
  content?: Record<string, { schema?: { anyOf?: { type?: string }[] } & Record<string, unknown> }>;
}

/**
 * Optional bodies as optional: a route takes an optional body as `Schema.nullish()`, because Fastify
 * hands an absent body to the route as null, and the generator writes that as a required body that
 * may be the JSON `null`. The parser refuses a JSON `null` (lib/json-body.ts) and an absent body is
 * fine, so the document says `required: false` with the object schema alone.
 */
function withOptionalBodies<T>(document: T): T {
  const doc = document as { paths?: Record<string, Record<string, { requestBody?: RequestBodyObject }>> };
  for (const item of Object.values(doc.paths ?? {})) {
    for (const operation of Object.values(item)) {
      const body = operation.requestBody;
      for (const media of Object.values(body?.content ?? {})) {
        const anyOf = media.schema?.anyOf;
        if (!body || !anyOf?.some((s) => s.type === 'null')) continue;
        const rest = anyOf.filter((s) => s.type !== 'null');
        if (rest.length !== 1) continue;
        media.schema = rest[0] as typeof media.schema;
        body.required = false;
      }
    }
  }
  return document;
}

/**
 * Errors as they are sent: a Problem outside /oauth is `application/problem+json` (RFC 9457), which the
 * generator writes as `application/json`; /oauth answers RFC 6749 errors as `application/json`.
 */
const PROBLEM_REF = '#/components/schemas/Problem';
/**
 * The problem schemas: RFC 9457's, the sign-in's with its second-factor challenge, and readiness's
 * with its checks.
 */
const PROBLEM_REFS = new Set([
  PROBLEM_REF,
  '#/components/schemas/MfaRequired',
  '#/components/schemas/NotReady',
]);

function withProblemMediaType<T>(document: T): T {
  const doc = document as {
    paths?: Record<string, Record<string, { responses?: Record<string, ResponseObject> }>>;
  };
  for (const [path, item] of Object.entries(doc.paths ?? {})) {
    if (path.startsWith('/oauth/')) continue;
    for (const operation of Object.values(item)) {
      for (const [status, response] of Object.entries(operation.responses ?? {})) {
        const json = response.content?.['application/json'];
        const ref = json?.schema?.$ref;
        if (Number(status) < 400 || !ref || !PROBLEM_REFS.has(ref) || !response.content) continue;
        response.content = { 'application/problem+json': json };
      }
    }
  }
  return document;
}

/**
 * `Retry-After` where it is sent: on every 429 (rate limits, failed client authentications) and every
 * 503 (password hashing full, database or provider unavailable) but /health's, on the signing-key
 * rotation's 409 when the next key has not been published long enough, and on a secret rotation's
 * 409 while the previous secret is in its grace.
 */
const RETRY_AFTER_ALSO: Record<string, Record<string, string>> = {
  '/v1/api-keys/{id}/rotate': {
    409: 'With `rotation_in_progress`: seconds until the secret the last rotation replaced stops working',
  },
  '/v1/clients/{id}/secrets': {
    409: 'With `rotation_in_progress`: seconds until the secret the last rotation replaced stops working',
  },
  '/v1/signing-keys/rotate': {
    409: 'With `rotation_too_soon`: seconds until the next key has been published for 10 minutes',
  },
};

function withRetryAfter<T>(document: T): T {
  const doc = document as {
    paths?: Record<
      string,
      Record<string, { responses?: Record<string, ResponseObject & { headers?: object }> }>
    >;
  };
  for (const [path, item] of Object.entries(doc.paths ?? {})) {
    if (path.startsWith('/health/')) continue;
    for (const operation of Object.values(item)) {
      for (const [status, response] of Object.entries(operation.responses ?? {})) {
        const description =
          RETRY_AFTER_ALSO[path]?.[status] ??
          (status === '429' || status === '503' ? 'Seconds to wait before retrying' : undefined);
        if (description === undefined) continue;
        response.headers = {
          ...response.headers,
          'Retry-After': { description, schema: { type: 'integer', minimum: 0 } },
        };
      }
    }
  }
  return document;
}

/** A 201's (or a re-invitation's 200) `Location`: the path of what was made. */
const LOCATION = {
  description:
    'The path of what was made (RFC 9110 §10.2.2), under PUBLIC_URL’s path when it has one (`/auth/v1/…`)',
  schema: { type: 'string', format: 'uri-reference' },
};
const JWKS_HEADERS = {
  ETag: {
    description:
      'The key set’s strong validator, the same on every instance: send it back as `If-None-Match`',
    schema: { type: 'string' },
  },
  'Cache-Control': {
    description:
      'How long a verifier may keep the key set (`public, max-age=300, stale-while-revalidate=60`)',
    schema: { type: 'string' },
  },
};
const METADATA_HEADERS = {
  'Cache-Control': {
    description: 'How long a client may keep the metadata (`public, max-age=3600`)',
    schema: { type: 'string' },
  },
};

/**
 * The headers an answer carries that a client acts on, beyond `Retry-After` and `WWW-Authenticate`
 * (declared by rule, below): a creation's `Location`, the JWKS's `ETag` and the discovery documents'
 * `Cache-Control`; by path, method and status. test/support/contract.ts fails any answer of the
 * suite carrying `Location`, `ETag`, `Retry-After` or `WWW-Authenticate` where the document does not
 * declare it.
 */
const RESPONSE_HEADERS: Record<string, Record<string, Record<string, Record<string, object>>>> = {
  '/v1/users': { post: { 200: { Location: LOCATION }, 201: { Location: LOCATION } } },
  '/v1/roles': { post: { 201: { Location: LOCATION } } },
  '/v1/api-keys': { post: { 201: { Location: LOCATION } } },
  '/v1/clients': { post: { 201: { Location: LOCATION } } },
  // A registration names the user made; an authenticator app set up, where its pending factor is shown.
  '/v1/auth/register': { post: { 201: { Location: LOCATION } } },
  '/v1/auth/mfa/totp': { post: { 201: { Location: LOCATION } } },
  '/.well-known/jwks.json': { get: { 200: JWKS_HEADERS, 304: JWKS_HEADERS } },
  '/.well-known/openid-configuration': { get: { 200: METADATA_HEADERS } },
  '/.well-known/oauth-authorization-server': { get: { 200: METADATA_HEADERS } },
};

/**
 * The JWKS's conditional request (RFC 9110 §13.1.2), declared here rather than as a `headers` schema
 * of the route, which would have Fastify validate the headers of every verifier's request.
 */
const IF_NONE_MATCH = {
  name: 'If-None-Match',
  in: 'header',
  required: false,
  description: 'The `ETag` of the key set held: a 304 without the keys while it is still the current one',
  schema: { type: 'string' },
};

function withResponseHeaders<T>(document: T): T {
  const doc = document as {
    paths?: Record<
      string,
      Record<
        string,
        { parameters?: object[]; responses?: Record<string, ResponseObject & { headers?: object }> }
      >
    >;
  };
  for (const [path, methods] of Object.entries(RESPONSE_HEADERS)) {
    for (const [method, statuses] of Object.entries(methods)) {
      const operation = doc.paths?.[path]?.[method];
      if (!operation) continue;
      for (const [status, headers] of Object.entries(statuses)) {
        const response = operation.responses?.[status];
        if (response) response.headers = { ...response.headers, ...headers };
      }
    }
  }
  const jwks = doc.paths?.['/.well-known/jwks.json']?.get;
  if (jwks) jwks.parameters = [...(jwks.parameters ?? []), IF_NONE_MATCH];
  return document;
}

type SecuredOperation = {
  security?: Array<Record<string, unknown>>;
  responses?: Record<string, ResponseObject & { headers?: object }>;
};

/** What the `WWW-Authenticate` of an operation's answer says, when it sends one. */
function challengeOf(path: string, status: string, schemes: Set<string>): string | undefined {
  const bearer = schemes.has('bearerAuth');
  const basic = schemes.has('clientBasic');
  if (status === '401' && bearer && basic) {
    return (
      '`Basic realm="paservices", Bearer realm="paservices"` when no caller authenticated, or with a ' +
      'scheme that is neither; `Basic realm="paservices"` for a client whose authentication failed ' +
      '(RFC 6749 §5.2); `Bearer realm="paservices", error="invalid_token"` for a bearer credential that ' +
      'does not verify (RFC 6750 §3)' +
      (path === '/oauth/introspect'
        ? ', and `Bearer realm="paservices", error="insufficient_scope", scope="tokens:introspect"` for ' +
          'one that lacks that permission (RFC 7662 §2.3)'
        : '')
    );
  }
  if (status === '401' && basic) return '`Basic realm="paservices"`, with `invalid_client` (RFC 6749 §5.2)';
  if (status === '401' && bearer) {
    return (
      '`Bearer realm="paservices"` (RFC 6750 §3): with `error="invalid_token"` when the credential sent ' +
      'does not verify, has expired or was revoked; without an error code when none was sent, or an ' +
      '`Authorization` header of another scheme (§3.1)'
    );
  }
  if (status === '400' && bearer) {
    return (
      '`Bearer realm="paservices", error="invalid_request"` when `Authorization: Bearer` carries no ' +
      'single token, or is sent with X-API-Key (RFC 6750 §3.1)'
    );
  }
  if (status === '403' && bearer && !path.startsWith('/oauth/')) {
    return (
      '`Bearer realm="paservices", error="insufficient_scope", scope="<permission>"` naming the ' +
      'permission this needs, when the credential was sent as `Authorization: Bearer` (RFC 6750 §3.1); ' +
      'no challenge for X-API-Key'
    );
  }
  return undefined;
}

/**
 * `WWW-Authenticate` where it is sent: on the 401 of every operation that takes credentials, on the
 * 400 of a malformed Bearer header, and on the 403 of a bearer credential lacking the permission.
 */
function withWwwAuthenticate<T>(document: T): T {
  const doc = document as { paths?: Record<string, Record<string, SecuredOperation>> };
  for (const [path, item] of Object.entries(doc.paths ?? {})) {
    for (const operation of Object.values(item)) {
      const schemes = new Set((operation.security ?? []).flatMap((requirement) => Object.keys(requirement)));
      if (schemes.size === 0) continue;
      for (const [status, response] of Object.entries(operation.responses ?? {})) {
        const description = challengeOf(path, status, schemes);
        if (description === undefined) continue;
        response.headers = {
          ...response.headers,
          'WWW-Authenticate': { description, schema: { type: 'string' } },
        };
      }
    }
  }
  return document;
}

/**
 * The component schemas the operations use, and no others. fastify-type-provider-zod registers each
 * named schema twice, as answered and as taken (`User` and `UserInput`), and most are only ever one of
 * them: the 26 unused twins made openapi-generator write a model class each (`UserInput`,
 * `ProblemInput`, …) and openapi-typescript a type each, beside the ones clients use. A schema
 * reached from an operation, directly or through another component, stays.
 */
function withoutUnusedSchemas<T>(document: T): T {
  const doc = document as { paths?: unknown; components?: { schemas?: Record<string, unknown> } };
  const schemas = doc.components?.schemas;
  if (!schemas) return document;
  const PREFIX = '#/components/schemas/';
  const used = new Set<string>();
  const walk = (node: unknown): void => {
    if (Array.isArray(node)) {
      for (const item of node) walk(item);
    } else if (node !== null && typeof node === 'object') {
      for (const [key, value] of Object.entries(node)) {
        if (key === '$ref' && typeof value === 'string' && value.startsWith(PREFIX)) {
          const name = value.slice(PREFIX.length);
          if (!used.has(name)) {
            used.add(name);
            walk(schemas[name]);
          }
        } else walk(value);
      }
    }
  };
  walk(doc.paths);
  for (const name of Object.keys(schemas)) if (!used.has(name)) delete schemas[name];
  return document;
}

/** The document with the clientCredentials flow's token URL replaced (a copy: the document is shared). */
function withTokenUrl<T extends Record<string, unknown>>(spec: T, tokenUrl: string): T {
  const components = spec.components as
    | { securitySchemes?: Record<string, { flows?: { clientCredentials?: object } }> }
    | undefined;
  const scheme = components?.securitySchemes?.clientCredentials;
  const flow = scheme?.flows?.clientCredentials;
  if (!components || !scheme || !flow) return spec;
  return {
    ...spec,
    components: {
      ...components,
      securitySchemes: {
        ...components.securitySchemes,
        clientCredentials: {
          ...scheme,
          flows: { ...scheme.flows, clientCredentials: { ...flow, tokenUrl } },
        },
      },
    },
  };
}

export interface OpenApiOptions {
  publicUrl: string;
  version: string;
  /** Swagger UI keeps the credentials entered under Authorize in localStorage (default true). */
  persistAuthorization?: boolean;
  /** The per-IP limits are on (RATE_LIMIT_ENABLED): their operations say so, and their headers. */
  rateLimits?: boolean;
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
          'Errors are RFC 9457 problem+json, except under /oauth where they follow RFC 6749 §5.2. ' +
          'An operation behind a permission names it in `x-required-permission` (a list when any one ' +
          'of them will do) and in its description; one that takes no API key says which credential it ' +
          'takes in `x-credential`: `user_session` (a signed-in user’s access token) or `access_token` ' +
          '(a user’s or a service’s). An operation limited per client address says its limit in ' +
          '`x-rate-limit` (`max` requests in `window_seconds`, and which counter), and its answers ' +
          'carry `X-RateLimit-Limit`, `X-RateLimit-Remaining` and `X-RateLimit-Reset`.',
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
          clientCredentials: {
            type: 'oauth2',
            description:
              'A service’s access token, from POST /oauth/token with `grant_type=client_credentials` ' +
              '(RFC 6749 §4.4): an app client’s id and secret (HTTP Basic or form fields). The scopes ' +
              'are permissions; the token carries those asked for within the client’s (all of them ' +
              'when none is asked for). Sent as `Authorization: Bearer`, as `bearerAuth` is.',
            flows: {
              clientCredentials: { tokenUrl: `${options.publicUrl}/oauth/token`, scopes: { ...PERMISSIONS } },
            },
          },
        },
      },
      tags: [
        { name: 'auth', description: 'Sign-up, login, sessions (frontends)' },
        { name: 'mfa', description: 'Two-step verification (TOTP authenticator apps and recovery codes)' },
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
    transform: withPerIpLimit(options.rateLimits ?? false, withAccess),
    // Registers schemas named with `.meta({ id })` (User, Session, Problem, …) as components.
    transformObject: (input) =>
      withoutUnusedSchemas(
        withWwwAuthenticate(
          withRateLimitHeaders(
            withRetryAfter(
              withResponseHeaders(
                withProblemMediaType(
                  withOptionalBodies(
                    withResponseDescriptions(withoutSchemaIds(jsonSchemaTransformObject(input))),
                  ),
                ),
              ),
            ),
          ),
        ),
      ),
  });

  app.addHook('onRoute', (route) => {
    const schema = route.schema as DocumentedSchema | undefined;
    // A route that takes no API key offers only `Authorization: Bearer` (before the errors: it takes
    // a credential).
    if (schema && (route.config as RouteAccess | undefined)?.credential) schema.security = BEARER_ONLY;
    declareFrameworkErrors(route.method, schema);
  });
  // Swagger UI sends "Try it out" to the document's first server. The page's own origin comes first,
  // so the docs work wherever they are opened (127.0.0.1, a pod's address, a tunnel) and not only at
  // PUBLIC_URL: another origin would be refused by the page's `connect-src 'self'` and by CORS.
  const basePath = new URL(options.publicUrl).pathname.replace(/\/+$/, '') || '/';
  // Authorize's client-credentials flow posts to the token URL from the page, so it is the page's own
  // origin too (a path, resolved by Swagger UI against the first server): PUBLIC_URL's would be
  // refused by `connect-src 'self'` wherever else the docs are open.
  const pageTokenUrl = `${basePath === '/' ? '' : basePath}/oauth/token`;
  await app.register(swaggerUi, {
    routePrefix: DOCS_PREFIX,
    transformSpecification: (spec) =>
      withTokenUrl(
        {
          ...spec,
          servers: [
            { url: basePath, description: 'This server, where these docs are open' },
            { url: options.publicUrl, description: 'PUBLIC_URL' },
          ],
        },
        pageTokenUrl,
      ),
    uiConfig: {
      persistAuthorization: options.persistAuthorization ?? true,
      deepLinking: true,
      tryItOutEnabled: true,
      requestInterceptor: oneCredential,
    },
    staticCSP: false,
    uiHooks: { onRequest: relativeDocsRedirects },
  });

  app.get('/openapi.json', { schema: { hide: true }, config: { public: true } }, async (_request, reply) =>
    reply.type('application/json').send(app.swagger()),
  );
  app.get(REDOC_PATH, { schema: { hide: true }, config: { public: true } }, async (_request, reply) =>
    reply.type('text/html; charset=utf-8').send(REDOC_PAGE),
  );
  // The page reads ./openapi.json, which under /redoc/ would be /redoc/openapi.json: send the
  // address with a trailing slash to the page (relative, so a proxy's path prefix stays).
  app.get(`${REDOC_PATH}/`, { schema: { hide: true }, config: { public: true } }, async (_request, reply) =>
    uncachedRedirect(reply, `../${REDOC_PATH.slice(1)}`),
  );
}

export default fp(openApiPlugin, { name: 'openapi', fastify: '5.x' });
