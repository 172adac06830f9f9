import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import type { ZodTypeProvider } from 'fastify-type-provider-zod';
import { z } from 'zod';
import { AppError, isAppError } from '../../lib/errors.js';
import {
  BEARER_CHALLENGE,
  clientAddress,
  REPEATED_AUTHORIZATION_DETAIL,
  repeatedAuthorization,
  requestContext,
  sentApiKey,
} from '../../plugins/authenticate.js';
import { NO_STORE_HEADERS } from '../../plugins/security-headers.js';
import type { RequestContext } from '../audit/audit.service.js';
import { FIRST_PARTY_CLIENT_ID } from '../tokens/tokens.service.js';
import { BASIC_CHALLENGE, isBasicAuthorization, parseBasicCredentials } from './oauth.client-auth.js';
import {
  IntrospectBodySchema,
  IntrospectionSchema,
  oauthErrors,
  RevokeBodySchema,
  TokenBodySchema,
  TokenResponseSchema,
} from './oauth.schema.js';
import type { OAuthCaller, OAuthService } from './oauth.service.js';

export interface OAuthRoutesDeps {
  oauth: OAuthService;
}

/** Parameters that may legitimately repeat (RFC 8707 §2: several resources). */
const MULTI_VALUED = new Set(['resource', 'audience']);

/**
 * RFC 6749 §3.1: a parameter the endpoint recognises must not be sent more than once, and §3.2: one it
 * does not recognise is ignored, repeated or not. A preValidation hook for a route whose body is
 * `schema`: it refuses a repeated parameter of that schema (a form field sent twice, or a JSON array)
 * unless it is multi-valued, and lets every other name through to be ignored.
 */
function refuseRepeated(schema: z.ZodObject) {
  const singleValued = new Set(Object.keys(schema.shape).filter((name) => !MULTI_VALUED.has(name)));
  return (request: FastifyRequest, _reply: FastifyReply, done: (err?: Error) => void) => {
    const body = request.body as Record<string, unknown> | null | undefined;
    if (body && typeof body === 'object') {
      for (const name of singleValued) {
        if (Array.isArray(body[name])) {
          return done(invalidRequest(`The parameter ${name} is repeated (RFC 6749 §3.1)`));
        }
      }
    }
    done();
  };
}
/** Credentials never travel in a URL: it ends up in logs, history and Referer headers. */
const CREDENTIAL_PARAMS = [
  'client_secret',
  'token',
  'refresh_token',
  'access_token',
  'password',
  'client_assertion',
];
const CREDENTIAL_PARAM_SET = new Set(CREDENTIAL_PARAMS);

/**
 * §5.1: token responses (and every other answer here, errors and 404s included) must not be cached.
 * app.ts puts them on every response under /oauth/ in its one onRequest hook, before anything can fail.
 */
export const OAUTH_RESPONSE_HEADERS: Readonly<Record<string, string>> = NO_STORE_HEADERS;

/** The 429 of the endpoints that take a client's credentials or a bearer one. */
const CREDENTIAL_FAILURES_429 =
  '`temporarily_unavailable`: too many failed client authentications, or (a bearer API key) too many ' +
  'API keys that name no key, from this address; see `Retry-After`';

/** RFC 6749 §3.2 asks for form bodies; JSON is accepted as well. */
const OAUTH_CONTENT_TYPES = ['application/x-www-form-urlencoded', 'application/json'];

const invalidClient = (detail: string) =>
  new AppError('invalid_client', { detail, headers: { 'www-authenticate': BASIC_CHALLENGE } });
const invalidRequest = (detail: string) =>
  new AppError('bad_request', { detail, oauthError: 'invalid_request' });

/** RFC 6749 §3.1: a parameter sent without a value is treated as if it were omitted. */
const present = (value: string | undefined) => (value === undefined || value === '' ? undefined : value);
const asList = (value: string | string[] | undefined) =>
  (Array.isArray(value) ? value : value === undefined ? [] : [value]).filter((v) => v !== '');

interface ClientParams {
  client_id?: string | undefined;
  client_secret?: string | undefined;
}

export async function oauthRoutes(app: FastifyInstance, deps: OAuthRoutesDeps) {
  const r = app.withTypeProvider<ZodTypeProvider>();

  // Synchronous, since these routes are on other services' hot path; each route refuses its own
  // repeated parameters after this (refuseRepeated).
  app.addHook('preValidation', (request, _reply, done) => {
    const query = request.query as Record<string, unknown> | undefined;
    // Most calls have no query string at all: the list is only made when one names a credential.
    for (const name in query) {
      if (!CREDENTIAL_PARAM_SET.has(name)) continue;
      const inUrl = CREDENTIAL_PARAMS.filter((p) => Object.hasOwn(query, p));
      return done(invalidRequest(`Send ${inUrl.join(', ')} in the request body, never in the URL`));
    }
    done();
  });

  function contextFor(request: FastifyRequest, caller: OAuthCaller): RequestContext {
    const context = requestContext(request);
    return caller.kind === 'client'
      ? { ...context, actorType: 'service', actorId: caller.client.clientId }
      : context;
  }

  /**
   * Who is calling: a client authenticating with HTTP Basic (§2.3.1, form-urlencoded id and secret)
   * or with client_secret_post, a bearer token or API key (where `bearer` allows it), or nobody —
   * the first-party public client. More than one method at once is refused (§2.3).
   */
  async function principalCaller(request: FastifyRequest): Promise<OAuthCaller> {
    const principal = await app.resolvePrincipal(request).catch((err: unknown) => {
      // An Authorization scheme that is neither Basic nor Bearer: no authentication this endpoint
      // takes (RFC 6749 §5.2), and the challenges say which ones it does.
      if (isAppError(err) && err.code === 'authentication_required') {
        throw new AppError('invalid_client', {
          detail: 'Authenticate the client with HTTP Basic, or send Authorization: Bearer <token>',
          headers: { 'www-authenticate': `${BASIC_CHALLENGE}, ${BEARER_CHALLENGE}` },
        });
      }
      throw err;
    });
    if (!principal) throw invalidClient('Authenticate the client or send a bearer token');
    request.principal = principal;
    return { kind: 'principal', principal };
  }

  function introspect(caller: OAuthCaller, presented: string | undefined) {
    const token = present(presented);
    if (token === undefined) throw invalidRequest('token is required');
    return deps.oauth.introspectKnown(caller, token) ?? deps.oauth.introspect(caller, token);
  }

  function callerOf(
    request: FastifyRequest,
    params: ClientParams,
    bearer: boolean,
  ): OAuthCaller | Promise<OAuthCaller> {
    const authorization = request.headers.authorization;
    // Two Authorization headers (two clients' Basic, Basic and Bearer) are two methods too; Node
    // would show only the first.
    if (authorization !== undefined && repeatedAuthorization(request)) {
      throw invalidRequest(REPEATED_AUTHORIZATION_DETAIL);
    }
    const basic = isBasicAuthorization(authorization);
    const secret = present(params.client_secret);
    const clientId = present(params.client_id);
    // Every credential counts, X-API-Key beside Basic too: one that is ignored would let a revocation
    // answer 200 for a caller the request did not mean (an empty header counts as absent, as on /v1).
    const hasApiKey = sentApiKey(request);
    const otherAuthorization = !basic && authorization !== undefined;
    const otherCredential = otherAuthorization || hasApiKey;
    const methods =
      (basic ? 1 : 0) + (secret !== undefined ? 1 : 0) + (otherAuthorization ? 1 : 0) + (hasApiKey ? 1 : 0);
    if (methods > 1) {
      throw invalidRequest('Use exactly one client authentication method (RFC 6749 §2.3)');
    }
    if (basic) {
      // A header that authenticated before is known from memory, in this turn (RFC 6749 §2.3.1
      // does not change: it was parsed and checked the first time).
      const known = deps.oauth.knownBasicClient(authorization, clientAddress(request));
      const knownId = known?.kind === 'client' ? known.client.clientId : undefined;
      if (known && (clientId === undefined || clientId === knownId)) return known;
      const credentials = parseBasicCredentials(authorization);
      if (!credentials) throw invalidClient('The Basic credentials are malformed');
      if (clientId !== undefined && clientId !== credentials.clientId) {
        throw invalidRequest('client_id differs from the client in the Authorization header');
      }
      return deps.oauth.authenticateClient(
        credentials.clientId,
        credentials.secret,
        requestContext(request),
        authorization,
      );
    }
    if (secret !== undefined) {
      if (clientId === undefined) throw invalidClient('client_secret needs client_id');
      return deps.oauth.authenticateClient(clientId, secret, requestContext(request));
    }
    if (otherCredential) {
      if (!bearer) throw invalidClient('Authenticate the client with HTTP Basic or client_secret_post');
      return principalCaller(request);
    }
    if (clientId !== undefined && clientId !== FIRST_PARTY_CLIENT_ID) {
      throw invalidClient('This client must authenticate with its secret');
    }
    return { kind: 'public', clientId: FIRST_PARTY_CLIENT_ID };
  }

  // No per-IP limit on every request here: services legitimately take client_credentials tokens many
  // times a second from one address. Failed client authentications are throttled per IP and per
  // client (the service), and the refresh_token grant spends the per-IP refresh budget it shares with
  // /v1/auth/refresh (checked once the body says which grant it is).
  r.post(
    '/oauth/token',
    {
      config: { public: true, refreshRateLimit: 'refresh_token_grant' },
      preValidation: refuseRepeated(TokenBodySchema),
      schema: {
        tags: ['oauth'],
        consumes: OAUTH_CONTENT_TYPES,
        operationId: 'token',
        summary: 'OAuth 2.0 token endpoint: client_credentials and refresh_token (RFC 6749)',
        description:
          '`application/x-www-form-urlencoded` (or JSON). Client authentication by HTTP Basic ' +
          '(client_secret_basic, form-urlencoded id and secret) or by `client_id` and `client_secret` ' +
          'in the body. Errors follow RFC 6749 §5.2.',
        security: [{ clientBasic: [] }, {}],
        body: TokenBodySchema,
        response: {
          200: TokenResponseSchema,
          ...oauthErrors([400, 401, 413, 415, 429, 503], {
            400:
              '`invalid_request`; `invalid_grant`: the refresh token is unknown, used, expired or not the ' +
              'client’s; `invalid_scope`; `invalid_target`: an `audience` or `resource` the client may not ' +
              'have (RFC 8707); `unauthorized_client`: the client acts for a user who is disabled or ' +
              'deleted; `unsupported_grant_type`',
            401: '`invalid_client`: client authentication failed (`WWW-Authenticate: Basic`)',
            429:
              '`temporarily_unavailable`: too many failed client authentications, or refresh_token ' +
              'grants, from this address; see `Retry-After`',
          }),
        },
      },
    },
    async (request) => {
      const body = request.body;
      // Before the client is authenticated: a revocation applied after this is one its caches may not
      // have seen yet, and the token it gets counts as issued before it.
      const revocationsSeen = deps.oauth.revocationsSeen();
      const caller = await callerOf(request, body, false);
      return deps.oauth.token(
        caller,
        {
          grantType: present(body.grant_type),
          scope: present(body.scope),
          audiences: asList(body.audience),
          resources: asList(body.resource),
          refreshToken: present(body.refresh_token),
          revocationsSeen,
        },
        contextFor(request, caller),
      );
    },
  );

  r.post(
    '/oauth/introspect',
    {
      config: { public: true },
      preValidation: refuseRepeated(IntrospectBodySchema),
      schema: {
        tags: ['oauth'],
        consumes: OAUTH_CONTENT_TYPES,
        operationId: 'introspect',
        summary: 'Token introspection (RFC 7662): access tokens, refresh tokens and API keys',
        description:
          'For an authenticated client (it sees the tokens issued to it) or a bearer token / API key ' +
          'holding tokens:introspect (it sees every token). Anything invalid, expired, revoked or not ' +
          'the caller’s to see answers `{"active": false}`.',
        security: [
          { clientBasic: [] },
          { bearerAuth: [] },
          { apiKey: [] },
          { clientCredentials: ['tokens:introspect'] },
        ],
        body: IntrospectBodySchema,
        response: {
          200: IntrospectionSchema,
          ...oauthErrors([400, 401, 413, 415, 429, 503], {
            400: '`invalid_request`: no `token`, a parameter repeated, or more than one way of authenticating',
            401:
              '`invalid_client`: no caller, or client authentication failed; `invalid_token`: the bearer ' +
              'credential does not verify; `insufficient_scope`: it lacks tokens:introspect (RFC 7662 §2.3)',
            429: CREDENTIAL_FAILURES_429,
          }),
        },
      },
    },
    // Not async: a known client asking about a token this instance has verified is answered in the
    // same turn (Fastify sends a handler's plain return value); anything else waits.
    (request) => {
      const caller = callerOf(request, request.body, true);
      const token = request.body.token;
      return caller instanceof Promise ? caller.then((c) => introspect(c, token)) : introspect(caller, token);
    },
  );

  r.post(
    '/oauth/revoke',
    {
      config: { public: true },
      preValidation: refuseRepeated(RevokeBodySchema),
      schema: {
        tags: ['oauth'],
        consumes: OAUTH_CONTENT_TYPES,
        operationId: 'revoke',
        summary: 'Token revocation (RFC 7009): refresh tokens, access tokens and API keys',
        description:
          'Revokes a refresh token (its whole session), an access token (its `jti`, on every instance, ' +
          'until it expires) or an API key — only the caller’s own. 200 for unknown, invalid, expired ' +
          'or ended tokens; 400 `unauthorized_client` for a live token issued to someone else, which ' +
          'stays (RFC 7009 §2.1). ' +
          'First-party refresh and access tokens can be revoked without client authentication.',
        security: [{ clientBasic: [] }, { bearerAuth: [] }, { apiKey: [] }, { clientCredentials: [] }, {}],
        body: RevokeBodySchema,
        response: {
          200: z.null().describe('Revoked, or nothing to revoke'),
          ...oauthErrors([400, 401, 413, 415, 429, 503], {
            400:
              '`invalid_request`: no `token`, a parameter repeated, or more than one way of ' +
              'authenticating; `unauthorized_client`: a live token issued to someone else, which stays ' +
              '(RFC 7009 §2.1)',
            401:
              '`invalid_client`: client authentication failed (or a client other than the first-party ' +
              'one sent no secret); `invalid_token`: the bearer credential does not verify',
            429: CREDENTIAL_FAILURES_429,
          }),
        },
      },
    },
    async (request, reply) => {
      const caller = await callerOf(request, request.body, true);
      const token = present(request.body.token);
      if (token === undefined) throw invalidRequest('token is required');
      await deps.oauth.revoke(caller, token, contextFor(request, caller));
      // RFC 7009 §2.2: the body is empty (and ignored by clients).
      return reply
        .status(200)
        .serializer(() => '')
        .send(null);
    },
  );
}
