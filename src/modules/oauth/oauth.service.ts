import { limitedAddress } from '../../lib/client-address.js';
import { decodeJwt } from 'jose';
import type { Database } from '../../db/client.js';
import type { Clock } from '../../lib/clock.js';
import { REFRESH_TOKEN_FORMAT } from '../../lib/crypto.js';
import { AppError } from '../../lib/errors.js';
import type { FailureCounter } from '../../lib/throttle.js';
import { type EventBus, inTransaction } from '../../lib/events.js';
import { hasPermission, isPermissionString, notHeld } from '../../lib/permissions.js';
import { sharedAnswer } from '../../lib/shared-answer.js';
import {
  API_KEY_PREFIX,
  BEARER_CHALLENGE,
  insufficientScope,
  type Principal,
} from '../../plugins/authenticate.js';
import type { AuditService, RequestContext } from '../audit/audit.service.js';
import type { SessionsService } from '../auth/sessions.service.js';
import type { ClientRow } from '../clients/clients.repository.js';
import {
  actsForNobody,
  CLIENT_ID_PATTERN,
  type ClientsService,
  registeredScopes,
} from '../clients/clients.service.js';
import { BASIC_CHALLENGE } from './oauth.client-auth.js';
import type { RevocationList } from '../tokens/revocations.service.js';
import {
  type AccessTokenClaims,
  FIRST_PARTY_CLIENT_ID,
  type TokenService,
} from '../tokens/tokens.service.js';

export const INTROSPECT_PERMISSION = 'tokens:introspect';
/** Failed authentications of one client_id from one IP per minute, on one instance, before 429. */
export const CLIENT_AUTH_MAX_FAILURES_PER_MINUTE = 30;
/**
 * Failed client authentications from one IP per minute, whatever the client_id, before 429: twice the
 * per-client limit, so one client retrying a stale secret (stopped at 30) never locks out the other
 * clients behind its NAT or proxy, while varying the client_id no longer dodges the throttle.
 */
export const CLIENT_AUTH_MAX_FAILURES_PER_IP_PER_MINUTE = 60;
const REFRESH_TOKEN_PREFIX = `${REFRESH_TOKEN_FORMAT.prefix}_`;
/** Longer than any token this service issues; the body limit bounds it anyway. */
const MAX_TOKEN_LENGTH = 8192;

/**
 * What the OAuth endpoints need of API keys. The API-keys module provides it; until it is wired in
 * services.ts (`oauth.apiKeys`), API keys introspect as `{active: false}` and revoke as a no-op.
 */
export interface ApiKeyTokenPort {
  /** The key a string names when it would be accepted now (unexpired, unrevoked, owner active). */
  inspect(key: string): Promise<
    | {
        keyId: string;
        ownerId: string;
        scopes: string[];
        expiresAt: Date | null;
        /** When the secret presented was issued (the key's creation, or the rotation that made it). */
        issuedAt: Date;
      }
    | undefined
  >;
  /**
   * Revokes the key (audit and cross-instance event included) when `ownerId` owns it: `not_owned`
   * when it is a live key of someone else, `done` otherwise.
   */
  revokeOwned(key: string, ownerId: string, context: RequestContext): Promise<'done' | 'not_owned'>;
}

/** Who is calling an OAuth endpoint. */
export type OAuthCaller =
  /** A confidential client that authenticated with its secret. */
  | { kind: 'client'; client: ClientRow }
  /** A bearer access token or API key (introspection and revocation only). */
  | { kind: 'principal'; principal: Principal }
  /** No credentials: the first-party (public) client, whose refresh tokens need no client secret. */
  | { kind: 'public'; clientId: string };

export interface TokenRequest {
  grantType: string | undefined;
  scope: string | undefined;
  audiences: string[];
  resources: string[];
  refreshToken: string | undefined;
  /** `revocations.seen()` noted before the client was authenticated (tokens.issue's `revocationsSeen`). */
  revocationsSeen?: number;
}

export interface TokenResponse {
  access_token: string;
  token_type: 'Bearer';
  expires_in: number;
  scope: string;
  refresh_token?: string;
}

export interface Introspection {
  active: boolean;
  scope?: string;
  client_id?: string;
  sub?: string;
  aud?: string | string[];
  iss?: string;
  exp?: number;
  iat?: number;
  nbf?: number;
  jti?: string;
  token_type?: string;
  token_use?: 'access_token' | 'refresh_token' | 'api_key';
  roles?: string[];
  sid?: string;
  amr?: string[];
  key_id?: string;
}

export interface OAuthServiceDeps {
  db: Database;
  clients: ClientsService;
  tokens: TokenService;
  sessions: SessionsService;
  revocations: RevocationList;
  audit: AuditService;
  events: EventBus;
  clock: Clock;
  /** This service's own audience: what a client with no registered audiences gets. */
  audience: string;
  accessTtl: number;
  maxAccessTtl: number;
  apiKeys?: ApiKeyTokenPort | undefined;
  /**
   * Failed client authentications per caller IP and client_id (every /oauth endpoint). Only failures
   * count, so a resource server introspecting on every request is never slowed; past the limit that
   * client_id from that IP gets 429 before any lookup, which also bounds the audit rows failures
   * write. Keyed by the pair, not the IP alone: services behind one NAT or proxy share an address, and
   * one of them retrying a stale secret must not lock the others out.
   */
  clientAuthFailures: FailureCounter;
  /** Failed client authentications per caller IP, any client_id: the same rules, a higher limit. */
  clientAuthFailuresByIp: FailureCounter;
  onIssued?: (grant: string) => void;
  /** A client authentication failed: its reason, or `throttled` when refused before any check. */
  onClientAuthFailure?: (reason: string) => void;
}

const INACTIVE: Introspection = sharedAnswer({ active: false });
/**
 * RFC 6749 §3.3: scope = scope-token *( SP scope-token ), scope-token = 1*( %x21 / %x23-5B / %x5D-7E ):
 * at least one token, separated by single spaces, with no space before or after.
 */
const SCOPE = /^[\x21\x23-\x5b\x5d-\x7e]+(?: [\x21\x23-\x5b\x5d-\x7e]+)*$/;

/**
 * RFC 7009 §2.1: a live token issued to someone else is refused, and the caller told, rather than
 * answered 200 as if revoked (an operator revoking a leaked token of another client would believe it
 * done). Invalid, expired and unknown tokens still answer 200 (§2.2).
 */
const notIssuedToCaller = () =>
  oauthError('unauthorized_client', 'This token was not issued to the caller: it is not revoked');

const oauthError = (oauth: string, detail: string) =>
  new AppError('bad_request', { status: 400, detail, oauthError: oauth });

const epoch = (d: Date) => Math.floor(d.getTime() / 1000);
/** Whose failures a client authentication counts against: the caller's address and the client id. */
/** The keys of the failure counters: the caller's address, and that address with the client_id. */
const addressOf = limitedAddress;
const sourceOf = (ip: string | null | undefined, clientId: string) =>
  `${addressOf(ip)} ${clientId.slice(0, 64)}`;

/** The token endpoint's grants, introspection (RFC 7662) and revocation (RFC 7009). */
export function createOAuthService(deps: OAuthServiceDeps) {
  // Two dots, no more: a compact JWS, without splitting a 700-character string to count its parts.
  const looksLikeJwt = (token: string) => {
    const first = token.indexOf('.');
    const second = first < 0 ? -1 : token.indexOf('.', first + 1);
    return second > 0 && token.indexOf('.', second + 1) < 0;
  };

  /**
   * RFC 6749 §3.3: scope tokens separated by single spaces, deduplicated. A scope that is present but
   * not that — only spaces, a space too many, a character outside the scope-token set — is malformed:
   * `invalid_scope` (§5.2), never an empty scope. Only an absent or empty parameter (§3.1) means the
   * default, and the routes pass it on as undefined.
   */
  function parseScope(requested: string): string[] {
    if (!SCOPE.test(requested)) {
      throw oauthError(
        'invalid_scope',
        'The scope is malformed: scope tokens separated by single spaces (RFC 6749 section 3.3)',
      );
    }
    const scopes = [...new Set(requested.split(' '))];
    // Scopes are permissions (`resource:action`, `resource:*`, `*`): anything else is no scope this
    // server grants, even under a wildcard that would otherwise cover it.
    const unknown = scopes.filter((scope) => !isPermissionString(scope));
    if (unknown.length > 0) {
      throw oauthError('invalid_scope', `Not a scope this server grants: ${unknown.join(' ')}`);
    }
    return scopes;
  }

  function grantedScopes(client: ClientRow, requested: string | undefined): string[] {
    const registered = registeredScopes(client);
    if (requested === undefined) {
      // A client registered with scopes, acting for a creator who now holds none of them, gets no
      // token rather than an empty one (a client registered without scopes is an identity, and gets one).
      if (client.scopes.length === 0 && registered.length > 0)
        throw oauthError('invalid_scope', 'The user this client acts for holds none of its scopes now');
      return client.scopes;
    }
    const scopes = parseScope(requested);
    const foreign = notHeld(scopes, client.scopes);
    if (foreign.length > 0) {
      const lost = foreign.filter((scope) => notHeld([scope], registered).length === 0);
      throw oauthError(
        'invalid_scope',
        lost.length === foreign.length
          ? `The user this client acts for no longer holds: ${foreign.join(' ')}`
          : `The client is not registered for: ${foreign.join(' ')}`,
      );
    }
    return scopes;
  }

  function grantedAudience(client: ClientRow, request: TokenRequest): string | string[] {
    // An audience with a fragment (registered before they were refused) is no resource's name
    // (RFC 8707 §2): granted neither as `resource` nor as `audience`, nor by default.
    const allowed =
      client.audiences.length > 0 ? client.audiences.filter((a) => !a.includes('#')) : [deps.audience];
    if (allowed.length === 0)
      throw oauthError('invalid_target', 'The client has no audience it may be given: correct its audiences');
    for (const r of request.resources) {
      // RFC 8707 §2: an absolute URI without a fragment.
      if (!URL.canParse(r) || r.includes('#'))
        throw oauthError('invalid_target', 'A resource must be an absolute URI without a fragment');
    }
    const requested = [...new Set([...request.audiences, ...request.resources])];
    const foreign = requested.filter((a) => !allowed.includes(a));
    if (foreign.length > 0) {
      throw oauthError('invalid_target', `The client may not request the audience ${foreign.join(' ')}`);
    }
    const audience = requested.length > 0 ? requested : allowed;
    return audience.length === 1 ? audience[0]! : audience;
  }

  async function clientCredentials(caller: OAuthCaller, request: TokenRequest): Promise<TokenResponse> {
    // §4.4: confidential clients only.
    if (caller.kind !== 'client') {
      throw new AppError('invalid_client', {
        detail: 'client_credentials needs client authentication (HTTP Basic or client_secret_post)',
        headers: { 'www-authenticate': BASIC_CHALLENGE },
      });
    }
    const { client } = caller;
    // A token with no scope would still say "this is that service" to whoever checks only its
    // signature and audience: a client acting for a departed user gets none.
    if (actsForNobody(client))
      throw oauthError(
        'unauthorized_client',
        'The user this client acts for is disabled or deleted: it gets no tokens until they are active again',
      );
    const scopes = grantedScopes(client, request.scope);
    const audience = grantedAudience(client, request);
    const ttl = Math.min(client.accessTokenTtl ?? deps.accessTtl, deps.maxAccessTtl);
    const issued = await deps.tokens.issue({
      sub: client.clientId,
      audience,
      ttlSeconds: ttl,
      clientId: client.clientId,
      permissions: scopes,
      revocationsSeen: request.revocationsSeen,
    });
    deps.onIssued?.('client_credentials');
    return {
      access_token: issued.token,
      token_type: 'Bearer',
      expires_in: issued.expiresIn,
      scope: scopes.join(' '),
    };
  }

  async function refreshGrant(
    caller: OAuthCaller,
    request: TokenRequest,
    context: RequestContext,
  ): Promise<TokenResponse> {
    if (!request.refreshToken) throw oauthError('invalid_request', 'refresh_token is required');
    if (caller.kind === 'principal')
      throw oauthError('invalid_request', 'Bearer credentials are not a grant');
    // §6: a refresh token is only good in the hands of the client it was issued to. sessions.refresh
    // checks that inside its locked transaction and answers another client's token as it answers an
    // unknown one (invalid_grant), so another client learns nothing of whether it exists.
    const callerId = caller.kind === 'client' ? caller.client.clientId : caller.clientId;
    // RFC 8707 §2: a session's tokens are for this service; asking for another audience is refused,
    // never silently ignored.
    const requested = [...new Set([...request.audiences, ...request.resources])];
    const foreign = requested.filter((a) => a !== deps.audience);
    if (foreign.length > 0) {
      throw oauthError(
        'invalid_target',
        `A session's tokens are for ${deps.audience} only, not ${foreign.join(' ')}`,
      );
    }
    // §6: a narrower scope for this access token; never one beyond the original grant.
    const scope = request.scope === undefined ? undefined : parseScope(request.scope);
    const tokens = await deps.sessions.refresh(request.refreshToken, context, {
      clientId: callerId,
      ...(scope ? { scope } : {}),
    });
    const claims = decodeJwt(tokens.access_token);
    return { ...tokens, scope: typeof claims.scope === 'string' ? claims.scope : '' };
  }

  /** Whether a caller may see (introspection) everything, not only what was issued to it. */
  function seesEverything(caller: OAuthCaller): boolean {
    if (caller.kind === 'client') return hasPermission(caller.client.scopes, INTROSPECT_PERMISSION);
    if (caller.kind === 'principal')
      return hasPermission(caller.principal.permissions, INTROSPECT_PERMISSION);
    return false;
  }

  /** The client id a caller speaks for, when it is a client. */
  function clientIdOf(caller: OAuthCaller): string | undefined {
    if (caller.kind === 'client') return caller.client.clientId;
    if (caller.kind === 'public') return caller.clientId;
    return caller.principal.kind === 'service' ? caller.principal.clientId : undefined;
  }

  /** Whether the caller may revoke an access token: one issued to it, or (users) one of its own. */
  function ownsAccessToken(caller: OAuthCaller, claims: AccessTokenClaims): boolean {
    if (caller.kind === 'principal' && caller.principal.kind !== 'service')
      return claims.sub === caller.principal.userId;
    return claims.client_id === clientIdOf(caller);
  }

  // The token service hands back the same claims object for a token while it stays cached, so its
  // answer is built once per token; every introspection of it shares that object (`sharedAnswer`:
  // frozen, and written once per route).
  const answers = new WeakMap<AccessTokenClaims, Introspection>();
  function activeAccessToken(claims: AccessTokenClaims): Introspection {
    let answer = answers.get(claims);
    if (!answer) {
      answer = sharedAnswer({
        active: true,
        scope: claims.scope,
        client_id: claims.client_id,
        sub: claims.sub,
        aud: Array.isArray(claims.aud) ? [...claims.aud] : claims.aud,
        iss: claims.iss,
        exp: claims.exp,
        iat: claims.iat,
        ...(typeof claims.nbf === 'number' ? { nbf: claims.nbf } : {}),
        jti: claims.jti,
        token_type: 'Bearer',
        token_use: 'access_token' as const,
        ...(Array.isArray(claims.roles) ? { roles: [...claims.roles] } : {}),
        ...(typeof claims.sid === 'string' ? { sid: claims.sid } : {}),
        ...(Array.isArray(claims.amr) ? { amr: [...claims.amr] } : {}),
      });
      answers.set(claims, answer);
    }
    return answer;
  }

  /**
   * Introspection answers for the issuer, which needs no allowance for other clocks: a token is
   * inactive from its `exp` on (RFC 7662 §2.2, RFC 7519 §4.1.4), not `exp` plus the 30 s leeway the
   * verification grants offline verifiers and this service's own endpoints. (`nbf` and `iat` keep the
   * leeway: another instance's clock may run slightly ahead of this one's.)
   */
  const expiredNow = (claims: AccessTokenClaims) => claims.exp * 1000 <= deps.clock.nowMs();

  async function verifyAccessToken(token: string): Promise<AccessTokenClaims | undefined> {
    try {
      return await deps.tokens.verify(token, { anyAudience: true });
    } catch {
      return undefined;
    }
  }

  return {
    /** Noted by the token endpoint before it authenticates the client (TokenRequest.revocationsSeen). */
    revocationsSeen: () => deps.tokens.revocationsSeen(),
    /** The token endpoint (RFC 6749 §4.4 and §6). */
    async token(caller: OAuthCaller, request: TokenRequest, context: RequestContext): Promise<TokenResponse> {
      switch (request.grantType) {
        case undefined:
          throw oauthError('invalid_request', 'grant_type is required');
        case 'client_credentials':
          return clientCredentials(caller, request);
        case 'refresh_token':
          return refreshGrant(caller, request, context);
        default:
          throw oauthError(
            'unsupported_grant_type',
            `The grant type ${request.grantType.slice(0, 64)} is not supported`,
          );
      }
    },

    /**
     * RFC 7662. A client sees the tokens issued to it; holders of tokens:introspect see every token.
     * Anything invalid, expired, revoked or not the caller's to see is only `{active: false}`. The
     * token's shape decides where it is looked up, so a wrong `token_type_hint` changes nothing.
     */
    async introspect(caller: OAuthCaller, token: string): Promise<Introspection> {
      if (caller.kind === 'public') {
        throw new AppError('invalid_client', {
          detail: 'Introspection needs an authenticated caller',
          headers: { 'www-authenticate': `${BASIC_CHALLENGE}, ${BEARER_CHALLENGE}` },
        });
      }
      if (
        caller.kind === 'principal' &&
        !hasPermission(caller.principal.permissions, INTROSPECT_PERMISSION)
      ) {
        // RFC 7662 §2.3: a bearer credential without the privileges is answered 401 as in RFC 6750
        // §3, with the challenge naming what it lacks. Still an authorization failure, audited.
        throw new AppError('forbidden', {
          status: 401,
          oauthError: 'insufficient_scope',
          detail: `Introspection with a bearer credential needs ${INTROSPECT_PERMISSION}`,
          headers: { 'www-authenticate': insufficientScope([INTROSPECT_PERMISSION]) },
        });
      }
      if (token.length > MAX_TOKEN_LENGTH) return INACTIVE;
      const all = seesEverything(caller);
      const callerClientId = clientIdOf(caller);

      if (token.startsWith(REFRESH_TOKEN_PREFIX)) {
        const live = await deps.sessions.findLiveRefreshToken(token);
        if (!live) return INACTIVE;
        const clientId = live.session.clientId ?? FIRST_PARTY_CLIENT_ID;
        if (!all && clientId !== callerClientId) return INACTIVE;
        return {
          active: true,
          client_id: clientId,
          sub: live.session.userId,
          exp: epoch(live.expiresAt),
          iat: epoch(live.issuedAt),
          sid: live.session.id,
          ...(live.session.amr.length ? { amr: [...live.session.amr] } : {}),
          token_use: 'refresh_token',
        };
      }
      if (token.startsWith(API_KEY_PREFIX)) {
        // API keys belong to users, never to clients: only tokens:introspect holders see them.
        if (!all || !deps.apiKeys) return INACTIVE;
        const key = await deps.apiKeys.inspect(token);
        if (!key) return INACTIVE;
        return {
          active: true,
          sub: key.ownerId,
          scope: key.scopes.join(' '),
          iat: epoch(key.issuedAt),
          ...(key.expiresAt ? { exp: epoch(key.expiresAt) } : {}),
          key_id: key.keyId,
          token_type: 'Bearer',
          token_use: 'api_key',
        };
      }
      if (!looksLikeJwt(token)) return INACTIVE;
      const claims = await verifyAccessToken(token);
      if (!claims || expiredNow(claims)) return INACTIVE;
      return all || claims.client_id === callerClientId ? activeAccessToken(claims) : INACTIVE;
    },

    /**
     * `introspect`'s answer, without waiting, for a client asking about an access token this instance
     * has verified and cached (a resource server introspecting the tokens it is sent); undefined for
     * any other caller or token, which `introspect` answers.
     */
    introspectKnown(caller: OAuthCaller, token: string): Introspection | undefined {
      if (caller.kind !== 'client' || token.length > MAX_TOKEN_LENGTH || !looksLikeJwt(token))
        return undefined;
      const claims = deps.tokens.verifyCached(token, { anyAudience: true });
      if (!claims) return undefined;
      if (expiredNow(claims)) return INACTIVE;
      return seesEverything(caller) || claims.client_id === caller.client.clientId
        ? activeAccessToken(claims)
        : INACTIVE;
    },

    /**
     * RFC 7009. Revokes a refresh token (its whole session), an access token (its jti until it
     * expires, on every instance) or an API key — only the caller's own. A live token issued to
     * someone else is refused (§2.1: 400 unauthorized_client) and stays; unknown, invalid, expired or
     * ended tokens are 200 with nothing done (§2.2). API keys are a user's: for any other caller an
     * API key is not looked at (200), so nobody else learns whether one is live, nor marks it used.
     */
    async revoke(caller: OAuthCaller, token: string, context: RequestContext): Promise<void> {
      if (token.length > MAX_TOKEN_LENGTH) return;
      if (token.startsWith(REFRESH_TOKEN_PREFIX)) {
        // Ended or expired: nothing to revoke, 200 whoever asks (§2.2), telling nothing of whose.
        const session = await deps.sessions.findLiveSessionOf(token);
        if (!session) return;
        const mine =
          caller.kind === 'principal'
            ? caller.principal.userId === session.userId
            : (session.clientId ?? FIRST_PARTY_CLIENT_ID) === clientIdOf(caller);
        if (!mine) throw notIssuedToCaller();
        await inTransaction(deps.db, deps.events, async (tx, emit) => {
          const events = await deps.sessions.endSession(tx, session.id, 'revoked');
          if (events.length === 0) return;
          events.forEach(emit);
          await deps.audit.record(tx, context, {
            type: 'refresh_token.revoked',
            subjectId: session.userId,
            data: { session_id: session.id },
          });
        });
        return;
      }
      if (token.startsWith(API_KEY_PREFIX)) {
        if (caller.kind !== 'principal' || !caller.principal.userId || !deps.apiKeys) return;
        const outcome = await deps.apiKeys.revokeOwned(token, caller.principal.userId, context);
        if (outcome === 'not_owned') throw notIssuedToCaller();
        return;
      }
      if (!looksLikeJwt(token)) return;
      const claims = await verifyAccessToken(token);
      if (!claims) return;
      if (!ownsAccessToken(caller, claims)) throw notIssuedToCaller();
      // A client's token is audited under the client's id, as everything else about the client is
      // (its `sub` is the client_id, which the data keeps).
      const client = CLIENT_ID_PATTERN.test(claims.sub)
        ? await deps.clients.findByClientId(claims.sub)
        : undefined;
      await inTransaction(deps.db, deps.events, async (tx, emit) => {
        // Until the last moment any instance could still accept it (exp plus the leeway).
        emit(await deps.revocations.revokeToken(tx, claims));
        await deps.audit.record(tx, context, {
          type: 'access_token.revoked',
          subjectId: client?.id ?? claims.sub,
          data: { jti: claims.jti, client_id: claims.client_id },
        });
      });
    },

    /**
     * Client authentication (RFC 6749 §2.3.1). A failure is one `invalid_client` whatever the cause
     * (unknown, wrong or rotated-out secret, disabled); failures of a registered client are audited.
     */
    /**
     * The client an HTTP Basic header authenticated before, when memory alone says so and its source
     * is not throttled: no parse, no promise. Undefined for anything else (`authenticateClient`).
     */
    knownBasicClient(header: string, ip: string | null): OAuthCaller | undefined {
      const client = deps.clients.rememberedBasic(header);
      if (!client) return undefined;
      const wait = deps.clientAuthFailures.retryAfterNow?.(sourceOf(ip, client.clientId));
      if (wait !== 0 || deps.clientAuthFailuresByIp.retryAfterNow?.(addressOf(ip)) !== 0) return undefined;
      return { kind: 'client', client };
    },

    /** `basicHeader`: the Authorization header the credentials came in, for `knownBasicClient`. */
    async authenticateClient(
      clientId: string,
      secret: string,
      context: RequestContext,
      basicHeader?: string,
    ): Promise<OAuthCaller> {
      const source = sourceOf(context.ip, clientId);
      const address = addressOf(context.ip);
      // Either throttle answers 429 even for the right secret: otherwise guessing could go on, the
      // success showing through.
      const wait = await deps.clientAuthFailures.retryAfter(source);
      const addressWait = wait > 0 ? 0 : await deps.clientAuthFailuresByIp.retryAfter(address);
      if (wait > 0 || addressWait > 0) {
        deps.onClientAuthFailure?.('throttled');
        (wait > 0 ? deps.clientAuthFailures : deps.clientAuthFailuresByIp).refused?.();
        throw new AppError('rate_limited', {
          detail:
            wait > 0
              ? `Too many failed authentications of this client from this address; retry in ${wait} s`
              : `Too many failed client authentications from this address; retry in ${addressWait} s`,
          headers: { 'retry-after': String(Math.max(wait, addressWait)) },
        });
      }
      const result = await deps.clients.authenticate(clientId, secret, basicHeader);
      if (result.ok) return { kind: 'client', client: result.client };
      await deps.clientAuthFailures.recordFailure(source);
      await deps.clientAuthFailuresByIp.recordFailure(address);
      deps.onClientAuthFailure?.(result.reason);
      if (result.client) {
        await deps.audit.record(deps.db, context, {
          type: 'client.authentication_failed',
          subjectId: result.client.id,
          outcome: 'failure',
          data: { client_id: result.client.clientId, reason: result.reason },
        });
      }
      throw new AppError('invalid_client', {
        detail: 'Client authentication failed',
        headers: { 'www-authenticate': BASIC_CHALLENGE },
      });
    },
  };
}

export type OAuthService = ReturnType<typeof createOAuthService>;
