import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { z } from 'zod';
import { PERMISSIONS } from '../../lib/permissions.js';
import type { SigningKeysService } from '../signing-keys/signing-keys.service.js';

export interface DiscoveryDeps {
  issuer: string;
  audience: string;
  keys: SigningKeysService;
  /** PUBLIC_URL's path ('' when it has none): the issuer's path, which RFC 8414 §3.1 appends to its metadata's URL. */
  basePath: string;
}

const JwksSchema = z
  .object({
    keys: z.array(
      z
        .object({
          kty: z.string(),
          kid: z.string(),
          alg: z.string(),
          use: z.literal('sig'),
          crv: z.string().optional(),
          x: z.string().optional(),
          y: z.string().optional(),
        })
        .describe('A public signing key (RFC 7517); private members are never published'),
    ),
  })
  .meta({ id: 'Jwks' });

const MetadataSchema = z
  .object({
    issuer: z.string(),
    jwks_uri: z.string(),
    token_endpoint: z.string(),
    introspection_endpoint: z.string(),
    revocation_endpoint: z.string(),
    grant_types_supported: z.array(z.string()),
    response_types_supported: z.array(z.string()),
    token_endpoint_auth_methods_supported: z.array(z.string()),
    introspection_endpoint_auth_methods_supported: z.array(z.string()),
    revocation_endpoint_auth_methods_supported: z.array(z.string()),
    scopes_supported: z.array(z.string()),
    access_token_signing_alg_values_supported: z.array(z.string()),
    subject_types_supported: z.array(z.string()),
    id_token_signing_alg_values_supported: z.array(z.string()),
    default_audience: z.string().describe('The `aud` of user access tokens; verify it'),
    service_documentation: z.string(),
  })
  .meta({ id: 'AuthorizationServerMetadata' });

/**
 * RFC 9110 §13.1.2: whether an If-None-Match header names `etag` (weak comparison: `W/"x"` matches
 * `"x"`) or is `*`.
 */
export function matchesEtag(header: string | undefined, etag: string): boolean {
  if (header === undefined) return false;
  for (const raw of header.split(',')) {
    const tag = raw.trim();
    if (tag === '*' || tag === etag || (tag.startsWith('W/') && tag.slice(2) === etag)) return true;
  }
  return false;
}

/** Verifiers may cache the key set; a new key is published as `next` long before it signs. */
const JWKS_CACHE_CONTROL = 'public, max-age=300, stale-while-revalidate=60';

export async function discoveryRoutes(app: FastifyInstance, deps: DiscoveryDeps) {
  // Untyped on purpose: these answers are pre-serialised strings, sent as they are.
  const r = app;
  const clientAuth = ['client_secret_basic', 'client_secret_post'];
  const metadata = {
    issuer: deps.issuer,
    jwks_uri: `${deps.issuer}/.well-known/jwks.json`,
    token_endpoint: `${deps.issuer}/oauth/token`,
    introspection_endpoint: `${deps.issuer}/oauth/introspect`,
    revocation_endpoint: `${deps.issuer}/oauth/revoke`,
    grant_types_supported: ['client_credentials', 'refresh_token'],
    // No authorization endpoint, so no response type: the member is required (RFC 8414 §2), empty here.
    response_types_supported: [],
    // `none`: the first-party frontend (a public client) redeems its refresh tokens unauthenticated.
    token_endpoint_auth_methods_supported: [...clientAuth, 'none'],
    introspection_endpoint_auth_methods_supported: clientAuth,
    // First-party (public) refresh and access tokens may be revoked without client authentication.
    revocation_endpoint_auth_methods_supported: [...clientAuth, 'none'],
    scopes_supported: Object.keys(PERMISSIONS),
    access_token_signing_alg_values_supported: ['ES256', 'EdDSA'],
    // OpenID discovery parsers require these two; no ID tokens are issued.
    subject_types_supported: ['public'],
    id_token_signing_alg_values_supported: ['ES256'],
    default_audience: deps.audience,
    service_documentation: `${deps.issuer}/docs`,
  };
  const metadataJson = JSON.stringify(metadata);

  r.get(
    '/.well-known/jwks.json',
    {
      config: { public: true },
      schema: {
        tags: ['discovery'],
        operationId: 'jwks',
        summary: 'The public keys that sign access tokens (RFC 7517)',
        response: {
          200: JwksSchema,
          304: z.null().describe('Not Modified: the key set is the one the `If-None-Match` ETag names'),
        },
      },
    },
    async (request, reply) => {
      // Pre-serialised, with its ETag, when the key set changes: this is hit by every verifier, and a
      // verifier revalidating its copy gets a 304 without the keys until they change.
      const etag = deps.keys.jwksEtag();
      reply.header('cache-control', JWKS_CACHE_CONTROL).header('etag', etag);
      if (matchesEtag(request.headers['if-none-match'], etag)) return reply.status(304).send();
      return reply
        .type('application/json')
        .serializer((p) => p as string)
        .send(deps.keys.jwks());
    },
  );

  const sendMetadata = async (_request: FastifyRequest, reply: FastifyReply) =>
    reply
      .header('cache-control', 'public, max-age=3600')
      .type('application/json')
      .serializer((p) => p as string)
      .send(metadataJson);

  // The issuer followed by the well-known path: OpenID Connect Discovery's place, and the one RFC 8414
  // §5 keeps for openid-configuration; under an issuer with a path, a proxy that strips it brings both here.
  for (const path of ['/.well-known/openid-configuration', '/.well-known/oauth-authorization-server']) {
    r.get(
      path,
      {
        config: { public: true },
        schema: {
          tags: ['discovery'],
          operationId: path.endsWith('openid-configuration')
            ? 'openidConfiguration'
            : 'authorizationServerMetadata',
          summary: 'Authorization-server metadata (RFC 8414)',
          response: { 200: MetadataSchema },
        },
      },
      sendMetadata,
    );
  }

  // RFC 8414 §3.1: for an issuer with a path (https://host/auth) the metadata lives at the host's root,
  // the path after the well-known part (https://host/.well-known/oauth-authorization-server/auth):
  // outside the prefix a proxy sends here, so it arrives only by a rule of the proxy's that forwards
  // that path as it is (README). Out of the OpenAPI document, whose paths are under PUBLIC_URL.
  const issuerRoute = routeOf(deps.basePath);
  if (issuerRoute)
    r.get(
      `/.well-known/oauth-authorization-server${issuerRoute}`,
      { config: { public: true }, schema: { hide: true } },
      sendMetadata,
    );
}

/**
 * What the router (find-my-way) keeps %-escaped in a request's path when it matches it: the escapes
 * decodeURI leaves (RFC 3986's reserved characters) and `%25`. A static route cannot hold the first
 * kind: the router writes each `%` of a route as `%25`, so a route's `%` matches a request's `%25`.
 */
const KEPT_ESCAPE = /%(?:2[346BCF]|3[ABDF]|40)/i;

/** `value` as a regular expression matching it alone. */
const exactly = (value: string) => `^${value.replace(/[.*+?^${}()|[\]\\/]/g, '\\$&')}$`;

/**
 * A URL's path as a route that matches it, and only its equivalent spellings, as the router matches
 * requests: each segment decoded, with `:` escaped (`::`), where a static route can hold it; a segment
 * that it cannot (a `*`, an escaped `/`, `@`, `:`…, which the router compares escaped) is a parameter
 * whose regular expression admits its decoded value alone (the router tests the value decoded), so
 * another issuer's path is no route at all, for any method: a 404, not a 405 naming GET. Undefined for
 * none ('') or a broken escape.
 */
export function routeOf(path: string): string | undefined {
  if (path === '') return undefined;
  const segments: string[] = [];
  for (const segment of path.split('/')) {
    let decoded: string;
    try {
      decoded = decodeURIComponent(segment);
    } catch {
      return undefined;
    }
    if (KEPT_ESCAPE.test(segment) || decoded.includes('*'))
      segments.push(`:s${segments.length}(${exactly(decoded)})`);
    else segments.push(decoded.replaceAll(':', '::'));
  }
  return segments.join('/');
}
