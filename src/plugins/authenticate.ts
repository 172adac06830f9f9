import type { FastifyInstance, FastifyRequest, onRequestHookHandler } from 'fastify';
import fp from 'fastify-plugin';
import { limitedAddress } from '../lib/client-address.js';
import { API_KEY_FORMAT } from '../lib/crypto.js';
import { AppError } from '../lib/errors.js';
import { hasPermission } from '../lib/permissions.js';
import type { RequestContext } from '../modules/audit/audit.service.js';
import type { AccessTokenClaims, TokenService } from '../modules/tokens/tokens.service.js';
import { repeatedAuthorization as repeatedAuthorizationIn } from '../verifier/raw-headers.js';

/** Whoever a request speaks for: a user (access token), a service (client token) or an API key. */
export type Principal =
  | {
      kind: 'user';
      id: string;
      userId: string;
      permissions: string[];
      roles: string[];
      sessionId: string | undefined;
      clientId: string;
      claims: AccessTokenClaims;
    }
  | {
      kind: 'service';
      id: string;
      userId: undefined;
      clientId: string;
      permissions: string[];
      claims: AccessTokenClaims;
    }
  | {
      kind: 'api_key';
      /** The key's id. */
      id: string;
      /** The key's owner: API keys act for their owner, within the key's scopes. */
      userId: string;
      permissions: string[];
      lookupId: string;
      /**
       * When the presented secret stops (null: never): the key's expiry, or for a secret a rotation
       * replaced the end of its grace if sooner. A key it creates or changes may not outlive it.
       */
      expiresAt: Date | null;
      /** Presented with the secret a rotation replaced, in its grace: it cannot rotate the key again. */
      previous: boolean;
      /**
       * The stored hash the presented secret matched (never serialized): a key minted with it is
       * refused once the key's row, locked, holds another secret (a rotation while the request ran).
       */
      secretHash: string;
    };

/**
 * The credential a route takes beyond its permission (`config.credential`), when not every one will
 * do: `user_session`, a signed-in user's access token (an API key or a service's token gets 403);
 * `access_token`, a user's or a service's access token (an API key gets 403).
 */
export type RouteCredential = 'user_session' | 'access_token';

const ROUTE_CREDENTIALS: ReadonlySet<string> = new Set<RouteCredential>(['user_session', 'access_token']);

/** The principal a route declaring `config.credential` serves. */
export interface CredentialPrincipal {
  user_session: Extract<Principal, { kind: 'user' }> & { sessionId: string };
  access_token: Exclude<Principal, { kind: 'api_key' }>;
}

/**
 * Whether a principal is a credential a route declaring `credential` takes: the one test both the
 * route's check and a handler's `principalTaking` make, so they cannot disagree.
 */
export function takesCredential<C extends RouteCredential>(
  credential: C,
  principal: Principal,
): principal is CredentialPrincipal[C] {
  return credential === 'user_session'
    ? principal.kind === 'user' && !!principal.sessionId
    : principal.kind !== 'api_key';
}

/**
 * The 403 of a credential a route does not take (`config.credential`), naming what it takes and what
 * came. No challenge: no other token of the same scheme would do (an API key sent as Bearer is still
 * an API key), and none of what the route needs is a scope. Audited as every other 403 a route
 * answers (app.ts, onError), with this as its `reason`.
 */
export function credentialRefused(credential: RouteCredential, principal: Principal): AppError {
  const came =
    principal.kind === 'api_key'
      ? 'an API key'
      : principal.kind === 'service'
        ? 'a service’s token'
        : undefined;
  const detail =
    credential === 'user_session'
      ? came
        ? `This is done from a signed-in session (a user’s access token), not with ${came}`
        : 'This is done from a signed-in session (a user’s access token): this token belongs to none'
      : 'An API key cannot do this, for what it makes would outlive the key: use a signed-in session ' +
        'or a service’s token';
  return new AppError('forbidden', { detail });
}

/**
 * Resolves an API key string to its principal, or undefined when it is not a valid key; `address`, the
 * client's as the per-address limits count it (lib/client-address.ts), for the throttle of keys that
 * name no key (429).
 */
export type ApiKeyResolver = (key: string, address: string) => Promise<Principal | undefined>;

export interface ApiKeyPrincipals {
  resolve: ApiKeyResolver;
  /** The principal when the key's answer is already in memory (valid or not: undefined means ask `resolve`). */
  resolveCached?: (key: string) => Principal | undefined;
}

/** How an API key begins (the format is in lib/crypto.ts), as against an access token. */
export const API_KEY_PREFIX = `${API_KEY_FORMAT.prefix}_`;

export interface AuthenticateOptions {
  tokens: TokenService;
  /** Filled in by the API-keys module; until then keys are refused like any unknown token. */
  apiKeys?: ApiKeyPrincipals;
  /** Records an authorization failure (403) in the audit log; `reason` when it is not the credential's scope. */
  onForbidden?: (request: FastifyRequest, permission: string, reason?: string) => Promise<void>;
  /**
   * What the principal holds now (a user's current permissions within the token's, an API key's
   * within its owner's, a service token's within its client's): routes that change something are
   * decided on it, not only on what the credential said when it was issued. Null when the
   * credential itself no longer stands (revoked, expired, its user or client disabled or gone).
   */
  heldNow?: (principal: Principal) => Promise<readonly string[] | null>;
}

/** Methods that read: a route with only these is decided on its credential's permissions alone. */
const READ_METHODS = new Set(['GET', 'HEAD', 'OPTIONS']);

/**
 * Whether a protected route with this method is decided on what its caller holds now: every method
 * that changes something, unless the route declares `heldNow: false`.
 */
export const decidedOnHeldNow = (method: string, heldNow: boolean | undefined) =>
  heldNow !== false && !READ_METHODS.has(method);

const WWW_AUTHENTICATE_INVALID = 'Bearer realm="paservices", error="invalid_token"';
/** The challenge without an error code: no credential, or one of another scheme (RFC 6750 §3.1). */
export const BEARER_CHALLENGE = 'Bearer realm="paservices"';
const WWW_AUTHENTICATE_INVALID_REQUEST = 'Bearer realm="paservices", error="invalid_request"';

/**
 * The challenge of a bearer credential that lacks a permission (RFC 6750 §3, §3.1): `scope` names the
 * permissions that would do, space-separated (where a route takes any one of several, each is one).
 */
export const insufficientScope = (permissions: readonly string[]) =>
  `${BEARER_CHALLENGE}, error="insufficient_scope", scope="${permissions.join(' ')}"`;

/**
 * A credential that was good when this instance last heard and no longer stands (revoked, expired,
 * its user or client disabled or gone, an API key's secret replaced by a rotation), found on the way
 * to a change (the held-now check, the grant ceiling, a key's own row locked in the change's
 * transaction): the 401 it gets everywhere once the news has arrived, not a 403 that sends the caller
 * off to ask for a permission. `detail` says what happened when the caller knows.
 */
export const credentialNoLongerStands = (
  detail = 'This credential has been revoked or its account disabled',
) =>
  new AppError('invalid_token', {
    detail,
    headers: { 'www-authenticate': WWW_AUTHENTICATE_INVALID },
  });

export function principalFromClaims(claims: AccessTokenClaims): Principal {
  const permissions = claims.scope ? claims.scope.split(' ').filter(Boolean) : [];
  if (Array.isArray(claims.roles)) {
    return {
      kind: 'user',
      id: claims.sub,
      userId: claims.sub,
      permissions,
      roles: claims.roles.filter((r): r is string => typeof r === 'string'),
      sessionId: typeof claims.sid === 'string' ? claims.sid : undefined,
      clientId: claims.client_id,
      claims,
    };
  }
  return {
    kind: 'service',
    id: claims.sub,
    userId: undefined,
    clientId: claims.client_id,
    permissions,
    claims,
  };
}

/**
 * The credential of a request: a bearer token (an access token or an API key) or an API key in
 * X-API-Key. Undefined when there is none, when both headers are sent (one method per request, RFC
 * 6750 §2), when X-API-Key holds anything but an API key, or when Authorization is not Bearer;
 * `refusal` says which. Tokens are never read from the URL.
 */
export function credentialOf(request: FastifyRequest): string | undefined {
  const apiKey = request.headers['x-api-key'];
  if (typeof apiKey === 'string' && apiKey.length > 0) {
    if (request.headers.authorization !== undefined) return undefined;
    const key = apiKey.trim();
    // A comma: Node joined two X-API-Key headers (refused in `refusal`); keys never have one.
    return key.startsWith(API_KEY_PREFIX) && !key.includes(',') ? key : undefined;
  }
  const header = request.headers.authorization;
  if (typeof header !== 'string' || repeatedAuthorization(request)) return undefined;
  const match = /^Bearer\s+(\S+)\s*$/i.exec(header);
  return match?.[1];
}

/**
 * Whether the request has more than one Authorization field line (RFC 9110 §5.3 allows one), which
 * is refused as ambiguous, as two X-API-Key headers are. The verifier's own walk over the raw header
 * names, so the two cannot disagree.
 */
export function repeatedAuthorization(request: FastifyRequest): boolean {
  return repeatedAuthorizationIn(request.raw.rawHeaders);
}

/** The 400 of a request with more than one Authorization header (`repeatedAuthorization`). */
export const REPEATED_AUTHORIZATION_DETAIL =
  'Send one Authorization header: with several, which one counts is left open (RFC 9110 §5.3)';

/** Whether the request sent an X-API-Key header; an empty one counts as absent, as in `credentialOf`. */
export function sentApiKey(request: FastifyRequest): boolean {
  const apiKey = request.headers['x-api-key'];
  return typeof apiKey === 'string' ? apiKey.length > 0 : apiKey !== undefined;
}

/** `Authorization: Bearer…` by its scheme, whatever follows (RFC 9110 §11.1: case-insensitive). */
const BEARER_SCHEME = /^Bearer(?:\s|$)/i;

/** The 401 of a request without authentication information: RFC 6750 §3.1, a challenge with no error. */
/** 401 for a request that needs a credential it did not send, with RFC 6750's challenge. */
export const authenticationRequired = (detail: string) =>
  new AppError('authentication_required', {
    detail,
    headers: { 'www-authenticate': BEARER_CHALLENGE },
  });

/**
 * Why a request that sent a credential header has no credential by `credentialOf`, or undefined.
 * RFC 6750 §3.1: an Authorization header of another scheme (or an empty one) is no authentication
 * information for this service — a 401 whose challenge carries no error code; the Bearer scheme with
 * no token, or more than one, is a malformed request — 400 `invalid_request`.
 */
function refusal(request: FastifyRequest): AppError | undefined {
  const hasApiKey = sentApiKey(request);
  if (hasApiKey && request.headers.authorization !== undefined) {
    return new AppError('bad_request', {
      detail: 'Send one credential: an Authorization header or an X-API-Key header, not both',
      headers: { 'www-authenticate': WWW_AUTHENTICATE_INVALID_REQUEST },
    });
  }
  if (request.headers.authorization !== undefined && repeatedAuthorization(request)) {
    return new AppError('bad_request', {
      detail: REPEATED_AUTHORIZATION_DETAIL,
      headers: { 'www-authenticate': WWW_AUTHENTICATE_INVALID_REQUEST },
    });
  }
  if (hasApiKey && String(request.headers['x-api-key']).includes(',')) {
    return new AppError('bad_request', {
      detail: 'Send one X-API-Key header with one API key',
      headers: { 'www-authenticate': WWW_AUTHENTICATE_INVALID_REQUEST },
    });
  }
  if (hasApiKey) {
    return new AppError('invalid_token', {
      detail: `X-API-Key carries an API key (${API_KEY_PREFIX}…); send access tokens as Authorization: Bearer`,
      headers: { 'www-authenticate': WWW_AUTHENTICATE_INVALID },
    });
  }
  const authorization = request.headers.authorization;
  if (authorization === undefined) return undefined;
  if (BEARER_SCHEME.test(authorization)) {
    return new AppError('bad_request', {
      detail: 'Authorization: Bearer carries one token: Bearer <token> (RFC 6750 §2.1)',
      headers: { 'www-authenticate': WWW_AUTHENTICATE_INVALID_REQUEST },
    });
  }
  return authenticationRequired(
    'Authorization uses a scheme this service does not take: send Authorization: Bearer <token>, or X-API-Key',
  );
}

/**
 * What sessions and audit events keep of the client's own description of itself, cut here once for
 * both: a User-Agent can be 16 KiB (Node's header limit), and an address taken from X-Forwarded-For
 * under TRUST_PROXY=true is whatever the client wrote there.
 */
const MAX_USER_AGENT_LENGTH = 512;
const MAX_IP_LENGTH = 64;

/** The client's address as sessions, audit events and throttles keep it. */
export const clientAddress = (request: FastifyRequest): string | null =>
  request.ip ? request.ip.slice(0, MAX_IP_LENGTH) : null;

export function requestContext(request: FastifyRequest): RequestContext {
  const p = request.principal;
  const userAgent = request.headers['user-agent'];
  return {
    actorType: p ? (p.kind === 'api_key' ? 'api_key' : p.kind) : 'anonymous',
    actorId: p ? (p.kind === 'api_key' ? p.userId : p.id) : null,
    credentialId: p?.kind === 'api_key' ? p.id : p?.kind === 'user' ? (p.sessionId ?? null) : null,
    ip: clientAddress(request),
    userAgent: typeof userAgent === 'string' ? userAgent.slice(0, MAX_USER_AGENT_LENGTH) : null,
    requestId: request.id,
  };
}

async function authenticatePlugin(app: FastifyInstance, options: AuthenticateOptions) {
  app.decorateRequest('principal', undefined);

  async function resolve(request: FastifyRequest): Promise<Principal | undefined> {
    const credential = credentialOf(request);
    if (credential === undefined) {
      const refused = refusal(request);
      if (refused) throw refused;
      return undefined;
    }
    try {
      if (credential.startsWith(API_KEY_PREFIX)) {
        const principal = await options.apiKeys?.resolve(credential, limitedAddress(request.ip));
        if (!principal) throw new AppError('invalid_token', { detail: 'The API key is not valid' });
        return principal;
      }
      return principalOfToken(await options.tokens.verify(credential));
    } catch (err) {
      if (err instanceof AppError && err.code === 'invalid_token') {
        throw new AppError('invalid_token', {
          detail: err.detail,
          headers: { 'www-authenticate': WWW_AUTHENTICATE_INVALID },
        });
      }
      throw err;
    }
  }

  // The token service hands back the same claims object for a token as long as it stays cached, so
  // its principal (the scope split into permissions, the roles filtered) is made once per token and
  // frozen, since every request with that token shares it.
  const principals = new WeakMap<AccessTokenClaims, Principal>();
  function principalOfToken(claims: AccessTokenClaims): Principal {
    let principal = principals.get(claims);
    if (!principal) {
      principal = principalFromClaims(claims);
      Object.freeze(principal.permissions);
      if (principal.kind === 'user') Object.freeze(principal.roles);
      principals.set(claims, Object.freeze(principal));
    }
    return principal;
  }

  /** The principal of a request whose credential this instance has verified and cached, or undefined. */
  function knownPrincipal(request: FastifyRequest): Principal | undefined {
    const credential = credentialOf(request);
    if (credential === undefined) return undefined;
    if (credential.startsWith(API_KEY_PREFIX)) return options.apiKeys?.resolveCached?.(credential);
    const claims = options.tokens.verifyCached(credential);
    return claims && principalOfToken(claims);
  }

  /** Resolves the principal for routes that authenticate optionally (e.g. /oauth). */
  app.decorate('resolvePrincipal', resolve);

  /**
   * The 403 of a credential lacking the route's permission (`anyOf`: any one of them will do). A
   * bearer credential (an access token, or an API key sent as `Authorization: Bearer`) gets the
   * RFC 6750 §3.1 challenge naming what it lacks; `X-API-Key` is no HTTP authentication scheme, so
   * it gets none, and the problem's `detail` names the permission.
   */
  async function refuse(
    request: FastifyRequest,
    anyOf: readonly string[],
    detail: string,
    reason?: string,
  ): Promise<never> {
    const needed = anyOf.join(' or ');
    const refusal = new AppError('forbidden', {
      detail,
      headers: sentApiKey(request) ? {} : { 'www-authenticate': insufficientScope(anyOf) },
    });
    if (options.onForbidden) {
      await options.onForbidden(request, needed, reason);
      refusal.audited = true;
    }
    throw refusal;
  }

  /**
   * Whether `permissions` let the principal in: any one of `anyOf`, or, on a route that ends the
   * caller's own session (`config.ownSession`), none at all for a signed-in user's token.
   */
  const permits = (
    anyOf: readonly string[],
    ownSession: boolean,
    principal: Principal,
    permissions: readonly string[],
  ) =>
    anyOf.some((p) => hasPermission(permissions, p)) ||
    (ownSession && takesCredential('user_session', principal));

  async function authorize(
    request: FastifyRequest,
    anyOf: readonly string[],
    changes: boolean,
    credential: RouteCredential | undefined,
    ownSession: boolean,
  ): Promise<void> {
    const principal = await resolve(request);
    if (!principal) {
      throw authenticationRequired(
        'Send an access token or API key: Authorization: Bearer <token>, or X-API-Key',
      );
    }
    request.principal = principal;
    // The credential the route takes (`config.credential`), decided here for every route that
    // declares one, before its permission, its body or its handler: no permission makes an API key a
    // signed-in session, and the refusal says what would do.
    if (credential !== undefined && !takesCredential(credential, principal)) {
      throw credentialRefused(credential, principal);
    }
    if (anyOf.length === 0) {
      // Fail closed: a route that forgot to declare its permission serves nobody.
      request.log.error({ route: request.routeOptions.url }, 'route declares no permission');
      throw new AppError('forbidden');
    }
    const needed = anyOf.join(' or ');
    if (!permits(anyOf, ownSession, principal, principal.permissions)) {
      await refuse(request, anyOf, `This needs the permission ${needed}`);
    }
    // An access token keeps its permissions until it expires (15 minutes at most), and an API key
    // its scopes while its owner's roles change: a change is decided on what is held now, and the
    // handler sees only that, so a demoted administrator's earlier token disables, renames, revokes
    // or deletes nothing of anyone's.
    if (changes && options.heldNow) {
      const now = await options.heldNow(principal);
      // Dead since it was cached or issued (the revocation's notification not yet here): a 401, as
      // the same credential gets once every instance has heard, not a 403 that says to ask for a role.
      if (now === null) throw credentialNoLongerStands();
      if (!permits(anyOf, ownSession, principal, now)) {
        await refuse(
          request,
          anyOf,
          `This needs the permission ${needed}, which has been taken away since this credential was issued`,
          'no_longer_held',
        );
      }
      request.principal = Object.freeze({ ...principal, permissions: Object.freeze([...now]) as string[] });
    }
  }

  // Decided once per route, when it is registered: a protected route gets an onRequest hook bound to
  // the permission it declares, and a public one (JWKS, the OAuth endpoints, login) none at all, so
  // the paths other services call on every request pay nothing for a check that does not apply.
  // Callback style rather than async: no promise and microtask turn beyond the check's own.
  const protectedRoutes = new Set<string>();
  app.addHook('onRoute', (route) => {
    const config = (route.config ?? {}) as {
      public?: boolean;
      permission?: string | string[];
      heldNow?: boolean;
      credential?: unknown;
      ownSession?: boolean;
    };
    // Fail closed at registration: a credential this check does not know, or one on a public route
    // (which has no check), would be declared, and documented, but not enforced.
    const { credential } = config;
    if (
      credential !== undefined &&
      (config.public === true || typeof credential !== 'string' || !ROUTE_CREDENTIALS.has(credential))
    ) {
      throw new Error(
        `${route.url}: config.credential ${JSON.stringify(credential)} ${
          config.public === true ? 'on a public route' : 'is none of user_session, access_token'
        }`,
      );
    }
    if (config.public === true) return;
    const takes = credential as RouteCredential | undefined;
    const anyOf = Object.freeze(
      config.permission === undefined ? [] : ([] as string[]).concat(config.permission),
    );
    const methods = Array.isArray(route.method) ? route.method : [route.method];
    // A route that changes something (any method but a read, unless it declares `heldNow: false`) is
    // decided on what its caller holds now.
    const changes = methods.some((m) => decidedOnHeldNow(m, config.heldNow));
    const ownSession = config.ownSession === true;
    const check: onRequestHookHandler = (request, _reply, done) => {
      // A credential verified before and allowed here is settled without a promise; anything else
      // (a new, expired or revoked token or key, a refusal, a change) takes the full path.
      const known = changes ? undefined : knownPrincipal(request);
      if (
        known &&
        (takes === undefined || takesCredential(takes, known)) &&
        permits(anyOf, ownSession, known, known.permissions)
      ) {
        request.principal = known;
        return done();
      }
      authorize(request, anyOf, changes, takes, ownSession).then(() => done(), done);
    };
    const existing = route.onRequest;
    route.onRequest =
      existing === undefined ? [check] : [...(Array.isArray(existing) ? existing : [existing]), check];
    for (const method of methods) protectedRoutes.add(`${method} ${route.url}`);
  });
  // Fail closed at start: a route registered before this plugin never got its check.
  app.addHook('onReady', (done) => {
    const unchecked = app.routeTable.filter((r) => !r.public && !protectedRoutes.has(`${r.method} ${r.url}`));
    done(
      unchecked.length > 0
        ? new Error(
            `routes registered before the authenticate plugin have no credential check: ${unchecked
              .map((r) => `${r.method} ${r.url}`)
              .join(', ')}`,
          )
        : undefined,
    );
  });
}

export default fp(authenticatePlugin, { name: 'authenticate', fastify: '5.x' });

declare module 'fastify' {
  interface FastifyRequest {
    principal: Principal | undefined;
  }
  interface FastifyInstance {
    resolvePrincipal(request: FastifyRequest): Promise<Principal | undefined>;
  }
}

/** The principal of a route behind `authenticate` (there is always one). */
export function principalOf(request: FastifyRequest): Principal {
  if (!request.principal) throw new AppError('authentication_required');
  return request.principal;
}

/** The user a self-service route acts for: the token's user or the API key's owner. */
export function userIdOf(request: FastifyRequest): string {
  const principal = principalOf(request);
  if (!principal.userId) throw new AppError('forbidden', { detail: 'This route is for users, not services' });
  return principal.userId;
}

/**
 * The principal of a route that takes only `credential`, for a handler (or the service it calls) that
 * relies on it: the route's check has refused every other credential (`config.credential`), by the
 * same test, before the request's body was read. A route that does not declare it serves nobody
 * (fail closed, as a route without a permission): the declaration is the rule, and the OpenAPI
 * document says it, so a handler relying on an undeclared rule is caught by its first test.
 */
export function principalTaking<C extends RouteCredential>(
  request: FastifyRequest,
  credential: C,
): CredentialPrincipal[C] {
  if (request.routeOptions.config.credential !== credential) {
    request.log.error(
      { route: request.routeOptions.url },
      `route takes ${credential} only but does not declare credential: '${credential}'`,
    );
    throw new AppError('forbidden');
  }
  const principal = principalOf(request);
  if (!takesCredential(credential, principal)) {
    // The route's check decides by the same test, so this is never reached unless the check was
    // bypassed: still refused, as the check would have, and said loudly.
    request.log.error(
      { route: request.routeOptions.url, credential },
      'the route’s credential check let through a credential the route does not take',
    );
    throw credentialRefused(credential, principal);
  }
  return principal;
}

/**
 * The user and session of a route that is for a signed-in user only (their own second factor, their
 * account's deletion), declared `config.credential: 'user_session'` (see `principalTaking`).
 */
export function signedInSession(request: FastifyRequest): { userId: string; sessionId: string } {
  const { userId, sessionId } = principalTaking(request, 'user_session');
  return { userId, sessionId };
}
