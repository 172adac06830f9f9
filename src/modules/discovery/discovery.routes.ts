import type { FastifyInstance } from 'fastify';
import { z } from 'zod';
import { PERMISSIONS } from '../../lib/permissions.js';
import type { SigningKeysService } from '../signing-keys/signing-keys.service.js';

export interface DiscoveryDeps {
  issuer: string;
  audience: string;
  keys: SigningKeysService;
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
      async (_request, reply) =>
        reply
          .header('cache-control', 'public, max-age=3600')
          .type('application/json')
          .serializer((p) => p as string)
          .send(metadataJson),
    );
  }
}
