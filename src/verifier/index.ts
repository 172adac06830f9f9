/**
 * Verifies the access tokens of the Paservices auth service in the services that consume them —
 * offline, through the service's published keys, without a call per request.
 *
 *   import { fastifyVerifier, requirePermission } from 'paservices-auth/verifier';
 *   await app.register(fastifyVerifier, { issuer: 'https://auth.example.com', audience: 'https://orders.example.com' });
 *   app.get('/orders', { onRequest: requirePermission('orders:read') }, async (request) => request.auth?.sub);
 *
 * A standalone module: it depends on jose, fastify and fastify-plugin only, never on the service.
 */
import type {
  FastifyInstance,
  FastifyReply,
  FastifyRequest,
  onRequestAsyncHookHandler,
  preHandlerAsyncHookHandler,
} from 'fastify';
import fp from 'fastify-plugin';
import {
  type CryptoKey,
  createLocalJWKSet,
  createRemoteJWKSet,
  customFetch,
  type ExportedJWKSCache,
  type FlattenedJWSInput,
  type JWKSCacheInput,
  type JWSHeaderParameters,
  type JWTPayload,
  errors as joseErrors,
  jwksCache,
  jwtVerify,
} from 'jose';
import { NO_STORE_HEADERS } from './no-store.js';
import { repeatedAuthorization } from './raw-headers.js';

/** The algorithms the auth service signs with; nothing else (never `none`, never HS*) is accepted. */
export const SUPPORTED_ALGORITHMS = ['ES256', 'EdDSA'] as const;
export type Algorithm = (typeof SUPPORTED_ALGORITHMS)[number];
/** RFC 8725 and the service's own rule: at most 30 s of clock leeway. */
export const MAX_CLOCK_TOLERANCE_SECONDS = 30;

/**
 * How long after it was fetched the last good key set keeps verifying while refetching it fails (an
 * answer that is not 200, a body that is not a key set, a timeout, no connection): one hour. The
 * service publishes a new key 10 minutes before it signs with it and keeps a retired key published
 * until its tokens have expired, so a brief outage of the JWKS costs nothing; past the hour the
 * verifier answers 503.
 */
export const STALE_KEYS_MAX_AGE_MS = 60 * 60_000;
/**
 * How long a fetched key set is used without asking again (jose's cache), unless a token names a
 * `kid` it lacks: the service's own JWKS `max-age` and `stale-while-revalidate` fit in it.
 */
const KEYS_CACHE_MAX_AGE_MS = 10 * 60_000;
/** After a failed refetch, the last good key set is used without asking again for this long. */
const REFETCH_BACKOFF_MS = 30_000;
/**
 * After a failed fetch with no keys in hand (a failed discovery, keys never fetched, or past
 * `staleKeysMaxAgeMs`), requests answer 503 without asking again for this long: shorter, since
 * nothing verifies meanwhile.
 */
const NO_KEYS_BACKOFF_MS = 5_000;

/**
 * The most of a discovery document or key set that is read: a key set of a few keys is a few
 * kilobytes. A larger answer is the keys unavailable (a 503), and is not read further.
 */
export const MAX_RESPONSE_BYTES = 1024 * 1024;

/** The longest `timeoutMs`: AbortSignal.timeout takes no more (2^31 - 1 ms, about 24 days). */
const MAX_TIMEOUT_MS = 2 ** 31 - 1;

/** A fetch: the global one, or any compatible implementation (a proxy-aware one, a test double). */
export type FetchLike = (input: string, init?: RequestInit) => Promise<Response>;

export interface VerifierOptions {
  /** The auth service's issuer (its PUBLIC_URL), compared exactly with the discovered `issuer`. */
  issuer: string;
  /** The audience this service accepts: its own identifier, as registered on its clients. */
  audience: string | string[];
  /** A subset of ES256 and EdDSA; default both. */
  algorithms?: Algorithm[];
  /** Clock leeway in seconds for `exp`, `nbf` and `iat`; 0..30, default 30. */
  clockTolerance?: number;
  fetch?: FetchLike;
  /** Timeout of the discovery and JWKS requests, in whole milliseconds (1 or more); default 5000. */
  timeoutMs?: number;
  /**
   * How long after its fetch the last key set keeps verifying while the JWKS cannot be fetched, in
   * milliseconds; default STALE_KEYS_MAX_AGE_MS (an hour), 0 for not past the 10-minute cache. A set
   * fetched less than 10 minutes ago always verifies (it is not stale: it is used without asking
   * again anyway), so any value up to 10 minutes means the same as 0. Keys revoked meanwhile (a
   * leaked key's `revoke_previous`) verify that long in an outage: lower it where that matters more.
   */
  staleKeysMaxAgeMs?: number;
}

/** The claims of a verified RFC 9068 access token. */
export interface AccessTokenClaims {
  iss: string;
  /** A user's id, or a service's client_id (client_credentials tokens). */
  sub: string;
  aud: string | string[];
  exp: number;
  iat: number;
  nbf?: number;
  jti: string;
  client_id: string;
  /** Space-separated permissions, as in the token. */
  scope: string;
  /** `scope` as a list. */
  permissions: string[];
  /** Present for users' tokens only. */
  roles?: string[];
  sid?: string;
  email?: string;
}

/** The token is missing, malformed, expired, not ours or not for this audience: answer 401. */
export class InvalidTokenError extends Error {
  readonly code = 'invalid_token';
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'InvalidTokenError';
  }
}

/** The auth service's metadata or keys could not be fetched: answer 503, not 401. */
export class VerifierUnavailableError extends Error {
  readonly code = 'verifier_unavailable';
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'VerifierUnavailableError';
  }
}

export interface Verifier {
  /** Verifies an access token (the bare JWT, without `Bearer `); throws the errors above. */
  verify(token: string): Promise<AccessTokenClaims>;
  /** The discovered authorization-server metadata (fetched once, on first use). */
  metadata(): Promise<{ issuer: string; jwks_uri: string; [name: string]: unknown }>;
}

/** Whether a grant covers a required permission: exact, `resource:*`, or `*` (as the service decides). */
export function grantCovers(grant: string, required: string): boolean {
  if (grant === '*' || grant === required) return true;
  if (grant.endsWith(':*')) return required.startsWith(grant.slice(0, -1));
  return false;
}

export function hasPermission(claims: Pick<AccessTokenClaims, 'permissions'>, required: string): boolean {
  return claims.permissions.some((grant) => grantCovers(grant, required));
}

const MAX_TOKEN_LENGTH = 8192;

/**
 * `response` with its body read, up to MAX_RESPONSE_BYTES; a larger one fails, read no further. Any
 * answer but a 200 is left as it is: it is refused unread.
 */
async function bounded(response: Response, url: string): Promise<Response> {
  if (response.status !== 200 || response.body === null) return response;
  const reader = response.body.getReader();
  const chunks: Uint8Array[] = [];
  let size = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    size += value.byteLength;
    if (size > MAX_RESPONSE_BYTES) {
      await reader.cancel().catch(() => undefined);
      throw new Error(`The answer of ${url} is larger than ${MAX_RESPONSE_BYTES} bytes`);
    }
    chunks.push(value);
  }
  return new Response(Buffer.concat(chunks), { status: 200, headers: response.headers });
}

/**
 * Whether jose failed for want of the keys rather than over the token: the JWKS request timed out or
 * failed (no connection, or an answer over MAX_RESPONSE_BYTES: not a JOSEError), answered other than
 * 200 or with a body that is not JSON (a plain JOSEError, ERR_JOSE_GENERIC — a load balancer's 502
 * page), or with JSON that is not a key set (JWKSInvalid). Each is the auth service unreachable for
 * its keys, a 503; never the token's fault.
 */
function keysUnavailable(err: unknown): boolean {
  if (!(err instanceof joseErrors.JOSEError)) return true;
  return (
    err instanceof joseErrors.JWKSTimeout ||
    err instanceof joseErrors.JWKSInvalid ||
    err.code === joseErrors.JOSEError.code
  );
}

export function createVerifier(options: VerifierOptions): Verifier {
  const algorithms = options.algorithms ?? [...SUPPORTED_ALGORITHMS];
  if (
    algorithms.length === 0 ||
    !algorithms.every((a) => (SUPPORTED_ALGORITHMS as readonly string[]).includes(a))
  ) {
    throw new TypeError(`algorithms must be a non-empty subset of ${SUPPORTED_ALGORITHMS.join(', ')}`);
  }
  const clockTolerance = options.clockTolerance ?? MAX_CLOCK_TOLERANCE_SECONDS;
  if (
    !Number.isFinite(clockTolerance) ||
    clockTolerance < 0 ||
    clockTolerance > MAX_CLOCK_TOLERANCE_SECONDS
  ) {
    throw new RangeError(`clockTolerance must be between 0 and ${MAX_CLOCK_TOLERANCE_SECONDS} seconds`);
  }
  const audiences = Array.isArray(options.audience) ? options.audience : [options.audience];
  if (audiences.length === 0 || audiences.some((a) => typeof a !== 'string' || a.length === 0)) {
    throw new TypeError('audience is required: the identifier this service accepts tokens for');
  }
  if (!URL.canParse(options.issuer)) throw new TypeError('issuer must be the auth service’s URL');
  const given: FetchLike = options.fetch ?? ((input, init) => fetch(input, init));
  // Only the discovery and the key set are fetched, each read up to MAX_RESPONSE_BYTES.
  const fetchImpl: FetchLike = async (input, init) => bounded(await given(input, init), input);
  const timeoutMs = options.timeoutMs ?? 5000;
  // Checked here, not at the first request: jose and AbortSignal.timeout refuse anything else there,
  // and each request would then answer 503.
  if (!Number.isSafeInteger(timeoutMs) || timeoutMs < 1 || timeoutMs > MAX_TIMEOUT_MS) {
    throw new RangeError(`timeoutMs must be a whole number of milliseconds from 1 to ${MAX_TIMEOUT_MS}`);
  }
  const staleKeysMaxAgeMs = options.staleKeysMaxAgeMs ?? STALE_KEYS_MAX_AGE_MS;
  if (!Number.isFinite(staleKeysMaxAgeMs) || staleKeysMaxAgeMs < 0) {
    throw new RangeError('staleKeysMaxAgeMs must be 0 or more milliseconds');
  }

  type KeyResolver = (header: JWSHeaderParameters) => Promise<CryptoKey>;
  type Discovered = {
    metadata: Awaited<ReturnType<Verifier['metadata']>>;
    jwks: KeyResolver;
  };
  let discovery: Promise<Discovered> | undefined;

  async function discover(): Promise<Discovered> {
    const url = `${options.issuer.replace(/\/+$/, '')}/.well-known/openid-configuration`;
    let body: unknown;
    try {
      const response = await fetchImpl(url, {
        headers: { accept: 'application/json' },
        redirect: 'manual',
        signal: AbortSignal.timeout(timeoutMs),
      });
      if (response.status !== 200) throw new Error(`HTTP ${response.status}`);
      body = await response.json();
    } catch (err) {
      throw new VerifierUnavailableError(`Could not discover the auth service at ${url}`, { cause: err });
    }
    const metadata = body as { issuer?: unknown; jwks_uri?: unknown };
    // RFC 8414 §3.3: the metadata must name exactly the issuer it was fetched for.
    if (metadata?.issuer !== options.issuer) {
      throw new VerifierUnavailableError(
        `The discovered issuer ${String(metadata?.issuer)} is not the configured ${options.issuer}`,
      );
    }
    if (typeof metadata.jwks_uri !== 'string' || !URL.canParse(metadata.jwks_uri)) {
      throw new VerifierUnavailableError('The discovered metadata has no valid jwks_uri');
    }
    const jwksUrl = new URL(metadata.jwks_uri);
    if (jwksUrl.protocol !== 'https:' && new URL(options.issuer).protocol === 'https:') {
      throw new VerifierUnavailableError('The jwks_uri of an https issuer must be https');
    }
    // jose records every successful fetch here (the key set and when it came), and only then.
    const lastGood: JWKSCacheInput = {};
    const remote = createRemoteJWKSet(jwksUrl, {
      timeoutDuration: timeoutMs,
      // The service publishes a new key long before it signs with it, and keeps retired keys published.
      cacheMaxAge: KEYS_CACHE_MAX_AGE_MS,
      cooldownDuration: 30_000,
      [customFetch]: (input, init) => fetchImpl(input, init),
      [jwksCache]: lastGood,
    });
    return { metadata: metadata as Discovered['metadata'], jwks: withLastGoodKeys(remote, lastGood) };
  }

  /**
   * jose's remote key set, which fails every verification while a refetch fails (its cache past
   * `cacheMaxAge`, or an unknown `kid`), falling back on the last key set it fetched, for up to
   * `staleKeysMaxAgeMs` after that fetch. A `kid` the last good set does not hold stays unanswerable
   * while the keys cannot be fetched (it may be a key published since): the fetch's failure, a 503.
   */
  function withLastGoodKeys(remote: ReturnType<typeof createRemoteJWKSet>, cache: JWKSCacheInput) {
    let stale: { uat: number; keys: ReturnType<typeof createLocalJWKSet> } | undefined;
    let failed: { at: number; error: unknown } | undefined;
    // A set still within jose's cache is in hand whatever `staleKeysMaxAgeMs` says: a refetch failed
    // for a `kid` it lacks (any request can name one) left every token a 503 for NO_KEYS_BACKOFF_MS
    // when the option was under 10 minutes, though jose itself would have verified them from it.
    const lastGoodKeys = () => {
      const { uat, jwks } = cache as Partial<ExportedJWKSCache>;
      if (uat === undefined || jwks === undefined) return undefined;
      const age = Date.now() - uat;
      if (age >= KEYS_CACHE_MAX_AGE_MS && age > staleKeysMaxAgeMs) return undefined;
      if (stale?.uat !== uat) stale = { uat, keys: createLocalJWKSet(jwks) };
      return stale.keys;
    };
    const fromLastGood = async (header: JWSHeaderParameters, cause: unknown) => {
      const keys = lastGoodKeys();
      if (!keys) throw cause;
      try {
        return await keys(header);
      } catch (err) {
        throw err instanceof joseErrors.JWKSNoMatchingKey ? cause : err;
      }
    };
    /**
     * Whether a token whose `kid` the set fetched moments ago lacks may be signed by a key published
     * since: this issuer's, issued after that fetch (a key in the JWKS then would be in the set), and
     * naming a key id the set does not hold (the service never reuses one: a known kid under another
     * algorithm, or a `kid` that is no string, is a token it did not sign). Another issuer's token, an
     * old one or such a `kid` is decided at once (401).
     */
    const mayBeNewerKey = (header: JWSHeaderParameters, token: FlattenedJWSInput | undefined) => {
      const { uat: fetchedAt, jwks } = cache as Partial<ExportedJWKSCache>;
      if (!token || fetchedAt === undefined) return false;
      const { kid } = header as { kid?: unknown };
      if (typeof kid !== 'string' || jwks?.keys.some((k) => k.kid === kid)) return false;
      try {
        const { payload } = token;
        const text =
          typeof payload === 'string'
            ? Buffer.from(payload, 'base64url').toString('utf8')
            : Buffer.from(payload).toString('utf8');
        const { iss, iat } = JSON.parse(text) as JWTPayload;
        return (
          iss === options.issuer && typeof iat === 'number' && iat * 1000 >= fetchedAt - clockTolerance * 1000
        );
      } catch {
        return false;
      }
    };
    return async (header: JWSHeaderParameters, token?: FlattenedJWSInput): Promise<CryptoKey> => {
      // A fetch that succeeded since (another request's) ends the back-off.
      if (failed && ((cache as Partial<ExportedJWKSCache>).uat ?? 0) > failed.at) failed = undefined;
      // Right after a failed refetch, the next requests do not each wait for another one, whatever
      // asked for it (a stale cache, or a `kid` not in a fresh one): the keys in hand answer, and with
      // none in hand, a 503 for a few seconds.
      if (failed) {
        const inHand = lastGoodKeys();
        const since = Date.now() - failed.at;
        if (inHand && since < REFETCH_BACKOFF_MS) return fromLastGood(header, failed.error);
        if (!inHand && since < NO_KEYS_BACKOFF_MS) throw failed.error;
      }
      // jose refetches for an unknown `kid` only once 30 s have passed since its last fetch.
      const coolingDown = remote.coolingDown;
      try {
        return await remote(header);
      } catch (err) {
        // Not refetched: the `kid` may be a key published since (a forced rotation signs with a new
        // key at once). A 503, which the client retries, and not a 401, which would make it throw a
        // good token away; after the cooldown the set is fetched again and decides.
        if (err instanceof joseErrors.JWKSNoMatchingKey && coolingDown && mayBeNewerKey(header, token))
          throw new VerifierUnavailableError(
            'The access token names a key not in the key set fetched in the last 30 s; it is fetched again after that',
            { cause: err },
          );
        if (!keysUnavailable(err)) throw err;
        failed = { at: Date.now(), error: err };
        return fromLastGood(header, err);
      }
    };
  }

  /** The last failed discovery: answered again, without asking, for NO_KEYS_BACKOFF_MS. */
  let discoveryFailed: { at: number; error: unknown } | undefined;
  function discovered(): Promise<Discovered> {
    if (!discovery) {
      // With no keys in hand, a failure is asked again after a few seconds, not by every request
      // meanwhile (a fleet of them at an auth service that is down or coming back up).
      if (discoveryFailed && Date.now() - discoveryFailed.at < NO_KEYS_BACKOFF_MS) {
        return Promise.reject(discoveryFailed.error);
      }
      const attempt = discover();
      discovery = attempt;
      attempt.then(
        () => {
          discoveryFailed = undefined;
        },
        (error: unknown) => {
          discovery = undefined;
          discoveryFailed = { at: Date.now(), error };
        },
      );
    }
    return discovery;
  }

  /**
   * The claims jwtVerify does not check, as the auth service checks them on its own tokens: `scope`,
   * `client_id`, `sub` and `jti` strings, and `iat` (which jose only checks is a number) no later
   * than now plus the leeway.
   */
  function toClaims(payload: JWTPayload): AccessTokenClaims {
    const { scope, client_id: clientId, roles, sub, jti, iat } = payload as Record<string, unknown>;
    if (typeof scope !== 'string' || typeof clientId !== 'string') {
      throw new InvalidTokenError('The access token lacks scope or client_id');
    }
    if (typeof sub !== 'string' || typeof jti !== 'string') {
      throw new InvalidTokenError('The access token has a malformed sub or jti');
    }
    if ((iat as number) > Math.floor(Date.now() / 1000) + clockTolerance) {
      throw new InvalidTokenError('The access token was issued in the future');
    }
    if (roles !== undefined && !(Array.isArray(roles) && roles.every((r) => typeof r === 'string'))) {
      throw new InvalidTokenError('The access token has malformed roles');
    }
    return {
      ...(payload as Omit<AccessTokenClaims, 'permissions'>),
      permissions: scope.split(' ').filter(Boolean),
    };
  }

  return {
    async metadata() {
      return (await discovered()).metadata;
    },

    async verify(token: string): Promise<AccessTokenClaims> {
      if (typeof token !== 'string' || token.length === 0 || token.length > MAX_TOKEN_LENGTH) {
        throw new InvalidTokenError('The access token is malformed');
      }
      const { jwks } = await discovered();
      try {
        const { payload } = await jwtVerify(token, jwks, {
          issuer: options.issuer,
          audience: audiences,
          algorithms,
          // RFC 9068 §4: an ID token, a refresh token or any other JWT is not an access token.
          typ: 'at+jwt',
          clockTolerance,
          requiredClaims: ['iss', 'sub', 'aud', 'exp', 'iat', 'jti', 'client_id'],
        });
        return toClaims(payload);
      } catch (err) {
        if (err instanceof InvalidTokenError || err instanceof VerifierUnavailableError) throw err;
        if (keysUnavailable(err)) {
          throw new VerifierUnavailableError('Could not fetch the auth service’s keys', { cause: err });
        }
        const expired = err instanceof joseErrors.JWTExpired;
        throw new InvalidTokenError(
          expired ? 'The access token has expired' : 'The access token is not valid',
          {
            cause: err,
          },
        );
      }
    },
  };
}

export interface FastifyVerifierOptions extends Partial<VerifierOptions> {
  /** A verifier made with createVerifier, instead of the options above. */
  verifier?: Verifier;
  /** The realm named in WWW-Authenticate challenges; default `api`. */
  realm?: string;
}

interface VerifierState {
  verifier: Verifier;
  realm: string;
}

const STATE = Symbol.for('paservices.verifier');
/** `Authorization: Bearer…` by its scheme, whatever follows. */
const BEARER_SCHEME = /^Bearer(?:[ \t]|$)/i;
/** The Bearer scheme with one token. */
const BEARER = /^Bearer[ \t]+(\S+)[ \t]*$/i;
/** RFC 6750 §2.1: b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"=". */
const B64TOKEN = /^[A-Za-z0-9\-._~+/]+=*$/;

/** An RFC 9457 problem, never stored by a browser or a proxy, as the auth service's own errors are. */
function problem(reply: FastifyReply, status: number, code: string, title: string, detail: string) {
  return reply
    .status(status)
    .headers(NO_STORE_HEADERS)
    .type('application/problem+json; charset=utf-8')
    .serializer(JSON.stringify)
    .send({ type: 'about:blank', title, status, detail, code });
}

function stateOf(request: FastifyRequest): VerifierState {
  const state = (request.server as unknown as { [STATE]?: VerifierState })[STATE];
  if (!state) throw new Error('Register fastifyVerifier before using requirePermission()');
  return state;
}

/**
 * Authenticates the request (once) and checks each permission; answers 401 with a Bearer challenge
 * (no error code without Bearer credentials, `invalid_token` for a bad token), 400 `invalid_request`
 * for a Bearer header without one token, 403 with `insufficient_scope`, or 503 when the auth
 * service's keys cannot be fetched.
 */
async function guard(request: FastifyRequest, reply: FastifyReply, permissions: string[]) {
  const { verifier, realm } = stateOf(request);
  if (!request.auth) {
    const header = request.headers.authorization;
    // RFC 9110 §5.3: one Authorization field line. Node keeps the first of several and drops the
    // rest, so the request would be decided on whichever came first (a Basic in front of a Bearer too).
    if (header !== undefined && repeatedAuthorization(request.raw.rawHeaders)) {
      reply.header('www-authenticate', `Bearer realm="${realm}", error="invalid_request"`);
      return problem(reply, 400, 'invalid_request', 'Bad Request', 'Send one Authorization header');
    }
    // RFC 6750 §3.1: no authentication information — no header, or one of another scheme — is a
    // challenge without an error code; a Bearer header without one token is a malformed request.
    if (header === undefined || !BEARER_SCHEME.test(header)) {
      reply.header('www-authenticate', `Bearer realm="${realm}"`);
      return problem(
        reply,
        401,
        'authentication_required',
        'Unauthorized',
        'Send Authorization: Bearer <token>',
      );
    }
    const token = BEARER.exec(header)?.[1];
    if (token === undefined) {
      reply.header('www-authenticate', `Bearer realm="${realm}", error="invalid_request"`);
      return problem(
        reply,
        400,
        'invalid_request',
        'Bad Request',
        'Authorization: Bearer carries one token: Bearer <token>',
      );
    }
    try {
      if (!B64TOKEN.test(token)) throw new InvalidTokenError('The access token is malformed');
      request.auth = await verifier.verify(token);
    } catch (err) {
      if (err instanceof InvalidTokenError) {
        reply.header('www-authenticate', `Bearer realm="${realm}", error="invalid_token"`);
        return problem(reply, 401, 'invalid_token', 'Unauthorized', err.message);
      }
      request.log.error({ err }, 'access-token verification unavailable');
      reply.header('retry-after', '5');
      return problem(
        reply,
        503,
        'verifier_unavailable',
        'Service Unavailable',
        'Authentication is unavailable',
      );
    }
  }
  const auth = request.auth;
  const missing = permissions.filter((p) => !hasPermission(auth, p));
  if (missing.length > 0) {
    reply.header(
      'www-authenticate',
      `Bearer realm="${realm}", error="insufficient_scope", scope="${missing.join(' ')}"`,
    );
    return problem(
      reply,
      403,
      'forbidden',
      'Forbidden',
      `This needs the permission ${missing.join(' and ')}`,
    );
  }
  return undefined;
}

/** A guard (onRequest or preHandler) admitting a valid access token that holds every permission named. */
export function requirePermission(
  ...permissions: string[]
): onRequestAsyncHookHandler & preHandlerAsyncHookHandler {
  // Returning the reply after sending tells Fastify the hook answered the request.
  return async function requirePermissionHook(request: FastifyRequest, reply: FastifyReply) {
    return guard(request, reply, permissions);
  };
}

/** A guard admitting any valid access token. */
export const requireAuthentication = () => requirePermission();

async function verifierPlugin(app: FastifyInstance, options: FastifyVerifierOptions) {
  const { verifier: given, realm, ...verifierOptions } = options;
  const verifier = given ?? createVerifier(verifierOptions as VerifierOptions);
  const state: VerifierState = { verifier, realm: (realm ?? 'api').replace(/["\\]/g, '') };
  app.decorate('verifier', verifier);
  app.decorate(STATE as unknown as string, state);
  app.decorateRequest('auth', null);
}

/** Decorates `app.verifier` and `request.auth` (set by the guards); use with requirePermission(). */
export const fastifyVerifier = fp(verifierPlugin, { name: 'paservices-verifier', fastify: '5.x' });

declare module 'fastify' {
  interface FastifyInstance {
    verifier: Verifier;
  }
  interface FastifyRequest {
    /** The verified access-token claims, once a guard has run; null before (or without a token). */
    auth: AccessTokenClaims | null;
  }
}
