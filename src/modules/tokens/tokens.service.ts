import type { KeyObject } from 'node:crypto';
import { errors as joseErrors, type JWTPayload, jwtVerify } from 'jose';
import { LRUCache } from 'lru-cache';
import { type Clock, epochSeconds } from '../../lib/clock.js';
import { AppError } from '../../lib/errors.js';
import type { Signer } from '../../lib/signer.js';
import {
  type SigningAlg,
  type SigningKeysService,
  signingUnavailable,
} from '../signing-keys/signing-keys.service.js';
import type { RevocationList } from './revocations.service.js';
import { uuidV7 } from '../../lib/crypto.js';

/** RFC 9068 access-token claims, plus `roles`, `sid`, `email` and `amr` (RFC 8176) for users. */
export interface AccessTokenClaims extends JWTPayload {
  iss: string;
  sub: string;
  aud: string | string[];
  exp: number;
  iat: number;
  jti: string;
  client_id: string;
  scope: string;
  roles?: string[];
  sid?: string;
  email?: string;
  amr?: string[];
  /** The subject's revocation the issuer knew of (ms since the epoch): see revocations.service.ts. */
  sub_revoked_at?: number;
}

export interface IssueAccessToken {
  sub: string;
  audience: string | string[];
  ttlSeconds: number;
  clientId: string;
  permissions: string[];
  roles?: string[];
  sessionId?: string;
  email?: string;
  /** How the session's user authenticated (RFC 8176); absent when unknown. */
  amr?: readonly string[];
  /**
   * The end of the session the token is issued for: it expires then at the latest (a second after
   * it is issued at the soonest), so no access token outlives its session's idle or absolute
   * lifetime, as Keycloak caps tokens at its session's.
   */
  notAfter?: Date;
  /**
   * `revocations.seen()` noted when the request began, before anyone was authenticated: a revocation
   * of `sub` applied here by then is one the token was decided after, and it says so
   * (`sub_revoked_at`); without it, a token issued just after such a revocation counts as revoked.
   */
  revocationsSeen?: number;
}

/** The client id first-party logins (frontends through /v1/auth) are issued under. */
export const FIRST_PARTY_CLIENT_ID = 'paservices-frontend';
/** SECURITY.md: leeway at most 30 s. */
export const CLOCK_TOLERANCE_SECONDS = 30;

/**
 * The moment from which a token expiring at `exp` (epoch seconds) is refused everywhere: this service
 * and verifiers accept it until `exp` plus the leeway. A revocation must last until then, or the
 * token it covers is good again for the rest of the leeway.
 */
export const acceptedUntil = (exp: number): Date => new Date((exp + CLOCK_TOLERANCE_SECONDS) * 1000);
export const ACCESS_TOKEN_ALGORITHMS = ['ES256', 'EdDSA'];

const segment = (value: unknown) => Buffer.from(JSON.stringify(value)).toString('base64url');

/** A signing key's protected header is the same for every token it signs: encoded once. */
const headerSegments = new Map<string, string>();
function headerSegment(header: { alg: SigningAlg; kid: string; typ: string }): string {
  const key = `${header.alg} ${header.kid} ${header.typ}`;
  let encoded = headerSegments.get(key);
  if (encoded === undefined) {
    encoded = segment({ alg: header.alg, kid: header.kid, typ: header.typ });
    headerSegments.set(key, encoded);
  }
  return encoded;
}

/**
 * A JWS in compact serialization (RFC 7515 §7.1), signed with node:crypto by the signer (its own
 * thread, lib/signer.ts): jose signs through WebCrypto instead, a KeyObject converted to a CryptoKey
 * per token. Verification stays with jose (jwtVerify), where the checks are.
 */
async function signCompact(
  signer: Signer,
  header: { alg: SigningAlg; kid: string; typ: string },
  payload: Record<string, unknown>,
  key: { privateKey: KeyObject },
): Promise<string> {
  const input = `${headerSegment(header)}.${segment(payload)}`;
  return `${input}.${await signer.sign(header.alg, key.privateKey, input)}`;
}

/**
 * Tokens whose signature and claims were checked, keyed by their signature segment and confirmed by
 * the whole token. A token arrives as a new string on every request, and hashing a 700-character key
 * for the map was the largest single cost of a cached check; the 86-character signature is enough
 * to find the entry, and the equality check of the whole token (a plain memory comparison) makes a
 * forged header or payload under a copied signature a miss, verified in full like any other.
 */
function createVerifiedTokens(max: number) {
  const entries = new LRUCache<string, { token: string; claims: AccessTokenClaims }>({ max });
  const keyOf = (scope: string, token: string) => {
    const signature = token.slice(token.lastIndexOf('.') + 1);
    return scope === '' ? signature : `${scope}\u0000${signature}`;
  };
  return {
    get(scope: string, token: string): AccessTokenClaims | undefined {
      const entry = entries.get(keyOf(scope, token));
      return entry?.token === token ? entry.claims : undefined;
    },
    set(scope: string, token: string, claims: AccessTokenClaims, ttlMs: number) {
      entries.set(keyOf(scope, token), { token, claims }, { ttl: ttlMs });
    },
    delete(scope: string, token: string) {
      const key = keyOf(scope, token);
      if (entries.get(key)?.token === token) entries.delete(key);
    },
    clear() {
      entries.clear();
    },
  };
}

export function createTokenService(deps: {
  keys: SigningKeysService;
  /** Makes the signatures (lib/signer.ts). */
  signer: Signer;
  revocations: RevocationList;
  clock: Clock;
  issuer: string;
  /** This service's own audience: what user tokens carry and what it accepts. */
  audience: string;
  /** The longest lifetime it issues (config.tokens.maxAccessTtl): no token of its own lives longer. */
  maxTtl: number;
}) {
  // Signature checks are the expensive part; their result is cached until the token expires.
  // Revocation is checked on every use, so the cache never outlives one. Tokens checked for any
  // audience (introspection, revocation) have a cache of their own.
  const verified = createVerifiedTokens(10_000);
  const verifiedAnyAudience = createVerifiedTokens(10_000);
  // A key gone (revoked with a rotation, or past its publication) takes its tokens with it: they are
  // checked again, against the keys there are now.
  deps.keys.onKeyRemoved(() => {
    verified.clear();
    verifiedAnyAudience.clear();
  });
  /** A cached token past its expiry (with jwtVerify's tolerance), by the clock read as a number. */
  const expired = (claims: AccessTokenClaims) =>
    claims.exp + CLOCK_TOLERANCE_SECONDS <= Math.floor(deps.clock.nowMs() / 1000);

  /** `audience` undefined skips the audience check (the OAuth introspection and revocation endpoints only). */
  async function verifySignature(token: string, audience: string | undefined): Promise<AccessTokenClaims> {
    const { payload } = await jwtVerify(
      token,
      (header) => {
        // Only our own keys, by kid, from memory; jku, x5u, jwk and x5c are never looked at.
        const key = typeof header.kid === 'string' ? deps.keys.verificationKey(header.kid) : undefined;
        if (!key || key.alg !== header.alg) throw new joseErrors.JWKSNoMatchingKey();
        return key.key;
      },
      {
        algorithms: ACCESS_TOKEN_ALGORITHMS,
        issuer: deps.issuer,
        ...(audience === undefined ? {} : { audience }),
        typ: 'at+jwt',
        clockTolerance: CLOCK_TOLERANCE_SECONDS,
        currentDate: deps.clock.now(),
        requiredClaims: ['exp', 'iat', 'jti', 'sub', 'client_id'],
      },
    );
    if (typeof payload.scope !== 'string' || typeof payload.client_id !== 'string') {
      throw new joseErrors.JWTClaimValidationFailed('missing scope or client_id', payload);
    }
    // What this service issues, and nothing else even under its key: strings for the ids revocation
    // goes by, issued no later than now (within the leeway), and living no longer than it issues,
    // which is what revocations are kept for.
    const { iat, exp, jti, sub } = payload as { iat: number; exp: number; jti: unknown; sub: unknown };
    if (
      typeof jti !== 'string' ||
      typeof sub !== 'string' ||
      iat > deps.clock.nowMs() / 1000 + CLOCK_TOLERANCE_SECONDS ||
      exp - iat > deps.maxTtl
    ) {
      throw new joseErrors.JWTClaimValidationFailed('not a token this service issues', payload);
    }
    return payload as AccessTokenClaims;
  }

  return {
    /** Where the revocation list stands (IssueAccessToken.revocationsSeen). */
    revocationsSeen: () => deps.revocations.seen(),
    /**
     * Resolves once a key can sign (from memory, while one can); AppError `service_unavailable` (503,
     * Retry-After) while none can. Asked before a change a token is issued after (a session opened, a
     * refresh token rotated), so that such a 503 comes before the change, not after it.
     */
    signingReady(): Promise<unknown> | undefined {
      return deps.keys.signingKeyNow() ? undefined : deps.keys.signingKey();
    },
    async issue(input: IssueAccessToken) {
      let key = deps.keys.signingKeyNow() ?? (await deps.keys.signingKey());
      const now = deps.clock.now();
      const iat = epochSeconds(now);
      const exp =
        input.notAfter === undefined
          ? iat + input.ttlSeconds
          : Math.max(iat + 1, Math.min(iat + input.ttlSeconds, epochSeconds(input.notAfter)));
      // Issued when, to the millisecond: what a subject's revocation is compared with.
      const jti = uuidV7(now.getTime());
      const claims: Record<string, unknown> = {
        client_id: input.clientId,
        scope: input.permissions.join(' '),
      };
      if (input.roles) claims.roles = input.roles;
      if (input.sessionId) claims.sid = input.sessionId;
      if (input.email) claims.email = input.email;
      if (input.amr?.length) claims.amr = [...input.amr];
      if (input.revocationsSeen !== undefined) {
        const known = deps.revocations.knownRevocation(input.sub, input.revocationsSeen);
        if (known !== undefined) claims.sub_revoked_at = known;
      }
      Object.assign(claims, {
        iss: deps.issuer,
        sub: input.sub,
        aud: input.audience,
        iat,
        nbf: iat,
        exp,
        jti,
      });
      let token = await signCompact(deps.signer, { alg: key.alg, kid: key.kid, typ: 'at+jwt' }, claims, key);
      // An emergency rotation committed while it was being signed: its key is revoked, and the token
      // would be refused at once everywhere. It is signed again with the key that replaced it; revoked
      // during each of three signatures, the keys are changing too fast to sign now: 503, not a 500.
      for (let again = 0; !deps.keys.verificationKey(key.kid); again++) {
        if (again === 2) throw signingUnavailable(1);
        key = await deps.keys.signingKey();
        token = await signCompact(deps.signer, { alg: key.alg, kid: key.kid, typ: 'at+jwt' }, claims, key);
      }
      return { token, jti, expiresIn: exp - iat, expiresAt: new Date(exp * 1000) };
    },

    /**
     * The one verification of access tokens: explicit algorithms, our keys by kid, exact issuer,
     * audience, `typ: at+jwt`, ≤ 30 s leeway, then revocation (jti, session, subject).
     * Throws AppError `invalid_token`. `anyAudience` skips the audience check: only the OAuth
     * endpoints use it (introspection, RFC 7662, and revocation, RFC 7009), since they answer for
     * tokens meant for any resource server; never use it to authenticate a request.
     */
    /**
     * The claims of a token this instance verified before and that is still good (cached, unexpired,
     * unrevoked), without waiting for anything; undefined for anything else, which `verify` answers.
     * For the request hooks: a token presented on every request is checked without a promise.
     */
    verifyCached(
      token: string,
      options: { audience?: string; anyAudience?: boolean } = {},
    ): AccessTokenClaims | undefined {
      if (token.length > 8192) return undefined;
      const audience = options.audience ?? deps.audience;
      const claims = options.anyAudience
        ? verifiedAnyAudience.get('', token)
        : verified.get(audience === deps.audience ? '' : audience, token);
      if (!claims || expired(claims)) return undefined;
      return deps.revocations.isRevoked(claims) ? undefined : claims;
    },

    async verify(
      token: string,
      options: { audience?: string; anyAudience?: boolean } = {},
    ): Promise<AccessTokenClaims> {
      const audience = options.anyAudience ? undefined : (options.audience ?? deps.audience);
      if (token.length > 8192) throw new AppError('invalid_token');
      const cache = audience === undefined ? verifiedAnyAudience : verified;
      // Under another audience than our own, the audience is part of the key.
      const scope = audience === undefined || audience === deps.audience ? '' : audience;
      let claims = cache.get(scope, token);
      if (claims) {
        if (expired(claims)) {
          cache.delete(scope, token);
          throw new AppError('invalid_token', { detail: 'The access token has expired' });
        }
      } else {
        // A key removed while the signature was being checked (a revocation's reload, which clears
        // the cache) must not leave the result cached: checked again, against the keys there are now.
        let removals: number;
        do {
          removals = deps.keys.removals();
          try {
            claims = await verifySignature(token, audience);
          } catch (err) {
            throw new AppError('invalid_token', {
              detail:
                err instanceof joseErrors.JWTExpired
                  ? 'The access token has expired'
                  : 'The access token is not valid',
            });
          }
        } while (deps.keys.removals() !== removals);
        cache.set(scope, token, claims, Math.max(1, claims.exp * 1000 - deps.clock.nowMs()));
      }
      if (deps.revocations.isRevoked(claims)) {
        throw new AppError('invalid_token', { detail: 'The access token has been revoked' });
      }
      return claims;
    },
  };
}

export type TokenService = ReturnType<typeof createTokenService>;
