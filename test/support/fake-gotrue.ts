import { randomBytes, randomUUID } from 'node:crypto';
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import type { AddressInfo, Socket } from 'node:net';
import { createClient, type WebSocketLikeConstructor } from '@supabase/supabase-js';
import { errors as joseErrors, jwtVerify, SignJWT } from 'jose';
import ws from 'ws';

/**
 * A stand-in for Supabase Auth (GoTrue) behind the Supabase API gateway, speaking the HTTP API that
 * @supabase/auth-js calls, with GoTrue's request and response shapes: the user and session JSON, error
 * bodies in both API versions (`{ code, message }` when the request names X-Supabase-Api-Version
 * 2024-01-01 or later, as auth-js always does, else `{ code: <status>, error_code, msg }`), the
 * gateway's apikey check, HS256 access tokens and opaque rotating refresh tokens.
 */

export interface FakeGoTrueUser {
  id: string;
  email: string;
  /** Kept in clear: this is a test double. Null for a user created without one (an invite). */
  password: string | null;
  emailConfirmedAt: string | null;
  confirmationSentAt: string | null;
  lastSignInAt: string | null;
  createdAt: string;
  updatedAt: string;
  userMetadata: Record<string, unknown>;
  appMetadata: Record<string, unknown>;
  /**
   * Set by the admin API's `ban_duration`; a banned user gets no session (`user_banned`): a password
   * sign-in is refused so whatever the password, as GoTrue checks none for a banned user.
   */
  bannedUntil?: string | null;
  /**
   * Has a verified MFA factor enrolled in Supabase: GoTrue then changes the password (or the address)
   * only from an aal2 session, and refuses it from an aal1 one — every session the fake opens — with
   * 401 `insufficient_aal`, before it changes anything.
   */
  mfaVerified?: boolean;
}

export interface FakeGoTrueFailure {
  status: number;
  code?: string;
  message?: string;
}

export interface FakeGoTrueOptions {
  /** Email confirmation required (GoTrue's MAILER_AUTOCONFIRM=false). Default false. */
  confirmEmail?: boolean;
  /** Answer every request with this error (after the apikey check), e.g. `{ status: 500 }`. */
  failWith?: FakeGoTrueFailure;
  /** Access-token lifetime in seconds. Default 3600, GoTrue's. */
  accessTokenTtl?: number;
  /** GoTrue's PASSWORD_MIN_LENGTH. Default 6. */
  minPasswordLength?: number;
  /** GoTrue's SMTP_MAX_FREQUENCY, in seconds: one recovery mail per user in this long. Default 60. */
  mailMaxFrequencySeconds?: number;
}

/** A recovery mail GoTrue sent (`POST /recover`), with the state of its link. */
export interface FakeGoTrueRecovery {
  email: string;
  userId: string;
  /** The `redirect_to` query parameter as sent; null without one (GoTrue then uses its SITE_URL). */
  redirectTo: string | null;
  /** `pkce` when the request carried a code_challenge (supabase-js with flowType 'pkce'). */
  flow: 'implicit' | 'pkce';
  sentAt: string;
  /** `used` once opened; `void` when a newer mail replaced it or the password changed meanwhile. */
  state: 'sent' | 'used' | 'void';
}

export interface FakeGoTrueHold {
  arrived: Promise<void>;
  release(): void;
}

export interface CompleteRecoveryOptions {
  /** Backdates the session, as if the link had been opened this many seconds ago. Default 0. */
  openedSecondsAgo?: number;
  /**
   * The user then gave their verified factor on the recovery session (supabase-js mfa.challenge and
   * mfa.verify): the session is aal2, and its amr adds `totp`. Default false.
   */
  secondFactor?: boolean;
}

export interface FakeGoTrue {
  /** The project URL, to give to createClient: the API lives under `${url}/auth/v1`. */
  url: string;
  anonKey: string;
  serviceRoleKey: string;
  /** Users by id. */
  users: Map<string, FakeGoTrueUser>;
  /** Every request that reached the server (including those answered with an injected failure). */
  requests: Array<{ method: string; path: string }>;
  close(): Promise<void>;
  setConfirmEmail(on: boolean): void;
  /** Down: every connection is reset as soon as it opens or sends a request. */
  setDown(down: boolean): void;
  /** Delay before each request is handled. */
  setDelayMs(ms: number): void;
  /**
   * Applies each request at once but answers it `ms` later: what a client that timed out meanwhile
   * cannot tell from a request that never arrived.
   */
  setAnswerDelayMs(ms: number, picks?: (method: string, path: string) => boolean): void;
  /**
   * Holds the next request `picks` chooses (recorded in `requests`, not handled yet) until `release()`:
   * what happens here while Supabase has a request in hand. `arrived` resolves when it comes; the
   * request is then handled as any other (`setFailWith` as it stands at the release).
   */
  hold(picks: (method: string, path: string) => boolean): FakeGoTrueHold;
  /** Answers every request (or those `picks` chooses) with this error, after the apikey check. */
  setFailWith(
    failure: FakeGoTrueFailure | undefined,
    picks?: (method: string, path: string) => boolean,
  ): void;
  /** Confirms the email as the link in the confirmation mail would. */
  confirm(email: string): void;
  /** How many of the user's sessions are not revoked. */
  activeSessions(userId: string): number;
  /** Every recovery mail sent, oldest first. */
  recoveries: FakeGoTrueRecovery[];
  /**
   * Opens the newest recovery link mailed to `email`, as GoTrue's `GET /verify?type=recovery` does: the
   * link is used up and a new session of the user is opened, whose access token this returns. Its `amr`
   * is `[{ method: 'otp' }]` in the implicit flow and `[{ method: 'recovery' }]` in PKCE (where the
   * frontend would exchange a code for it). Throws when there is no live link, as the verify endpoint
   * answers an invalid or used one with an error in the redirect.
   */
  completeRecovery(email: string, options?: CompleteRecoveryOptions): Promise<string>;
  /**
   * Moves every sign-in of the user's sessions `seconds` into the past, as if they had signed in that
   * long ago: the access tokens of a later refresh carry the older `amr` timestamps, as GoTrue's do.
   */
  backdateSignIns(userId: string, seconds: number): void;
  /**
   * The user of `accessToken`'s session gives their verified factor on it, as supabase-js
   * auth.mfa.challenge and auth.mfa.verify do: the session becomes aal2 (its amr adds `totp`), and
   * this returns its new access token. Throws for a user without a verified factor, as GoTrue would.
   */
  giveSecondFactor(accessToken: string): Promise<string>;
}

interface AmrEntry {
  method: string;
  timestamp: number;
}

interface Session {
  id: string;
  userId: string;
  revoked: boolean;
  /** How the session was opened; every access token of the session carries it (GoTrue's amr claims). */
  amr: AmrEntry[];
  /** aal2 once a verified factor was given on it; aal1 otherwise. */
  aal?: 'aal1' | 'aal2';
}

interface RefreshToken {
  sessionId: string;
  revoked: boolean;
}

class HttpError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
    readonly extra: Record<string, unknown> = {},
  ) {
    super(message);
  }
}

/** GoTrue's OAuthError, used by the token endpoint for a grant it does not know. */
class OAuthError extends Error {
  constructor(
    readonly error: string,
    readonly description: string,
  ) {
    super(description);
  }
}

const EMAIL = /^[^\s@]+@[^\s@]+\.[^\s@]+$/;
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;
const ADMIN_ROLES = new Set(['service_role', 'supabase_admin']);
const BODY_LIMIT = 1_048_576;

const isRecord = (v: unknown): v is Record<string, unknown> =>
  typeof v === 'object' && v !== null && !Array.isArray(v);

function apiVersionAtLeast20240101(header: string | string[] | undefined): boolean {
  const value = Array.isArray(header) ? header[0] : header;
  if (!value || !/^\d{4}-\d{2}-\d{2}$/.test(value)) return false;
  return Date.parse(`${value}T00:00:00Z`) >= Date.parse('2024-01-01T00:00:00Z');
}

async function readJson(req: IncomingMessage): Promise<Record<string, unknown>> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of req) {
    const buf = chunk as Buffer;
    size += buf.length;
    if (size > BODY_LIMIT) throw new HttpError(413, 'request_body_too_large', 'Request body too large');
    chunks.push(buf);
  }
  const text = Buffer.concat(chunks).toString('utf8');
  if (text.trim() === '') return {};
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch (err) {
    throw new HttpError(400, 'bad_json', `Could not parse request body as JSON: ${(err as Error).message}`);
  }
  if (!isRecord(parsed)) throw new HttpError(400, 'bad_json', 'Could not parse request body as JSON');
  return parsed;
}

const str = (body: Record<string, unknown>, key: string): string =>
  typeof body[key] === 'string' ? (body[key] as string) : '';

/** The environment that points the service at this fake: AUTH_PROVIDER=supabase and its three values. */
export const supabaseEnv = (gotrue: FakeGoTrue) => ({
  AUTH_PROVIDER: 'supabase',
  SUPABASE_URL: gotrue.url,
  SUPABASE_ANON_KEY: gotrue.anonKey,
  SUPABASE_SERVICE_ROLE_KEY: gotrue.serviceRoleKey,
});

/**
 * Some other client of the same Supabase project (a frontend, a social login, a mobile app), holding
 * its own Supabase session: supabase-js with nothing stored or refreshed, on the ws package (Node 20
 * has no WebSocket).
 */
export const projectClient = (gotrue: FakeGoTrue, flowType: 'implicit' | 'pkce' = 'implicit') =>
  createClient(gotrue.url, gotrue.anonKey, {
    auth: { persistSession: false, autoRefreshToken: false, detectSessionInUrl: false, flowType },
    realtime: { transport: ws as unknown as WebSocketLikeConstructor },
  });

export async function startFakeGoTrue(options: FakeGoTrueOptions = {}): Promise<FakeGoTrue> {
  const secret = randomBytes(32);
  const accessTokenTtl = options.accessTokenTtl ?? 3600;
  const minPasswordLength = options.minPasswordLength ?? 6;
  const mailMaxFrequencyMs = (options.mailMaxFrequencySeconds ?? 60) * 1000;
  let confirmEmail = options.confirmEmail ?? false;
  let failWith = options.failWith;
  let failOnly: ((method: string, path: string) => boolean) | undefined;
  let down = false;
  let delayMs = 0;
  let answerDelayMs = 0;
  let answerDelayOnly: ((method: string, path: string) => boolean) | undefined;
  const holds: Array<{
    picks: (method: string, path: string) => boolean;
    arrive: () => void;
    released: Promise<void>;
    release: () => void;
  }> = [];

  const users = new Map<string, FakeGoTrueUser>();
  const sessions = new Map<string, Session>();
  const refreshTokens = new Map<string, RefreshToken>();
  const requests: FakeGoTrue['requests'] = [];
  const recoveries: FakeGoTrueRecovery[] = [];
  /** GoTrue's users.recovery_sent_at, in ms. */
  const recoverySentAt = new Map<string, number>();
  const sockets = new Set<Socket>();
  let baseUrl = '';

  const now = () => new Date().toISOString();
  const findByEmail = (email: string) => [...users.values()].find((u) => u.email === email.toLowerCase());

  // Real project keys are long-lived JWTs with a `role` claim, signed with the project's secret.
  const projectKey = (role: string) =>
    new SignJWT({ role, iss: 'supabase-demo' })
      .setProtectedHeader({ alg: 'HS256', typ: 'JWT' })
      .setIssuedAt()
      .setExpirationTime('10y')
      .sign(secret);
  const anonKey = await projectKey('anon');
  const serviceRoleKey = await projectKey('service_role');

  function identityJson(u: FakeGoTrueUser) {
    return {
      identity_id: u.id,
      id: u.id,
      user_id: u.id,
      identity_data: {
        email: u.email,
        email_verified: u.emailConfirmedAt !== null,
        phone_verified: false,
        sub: u.id,
      },
      provider: 'email',
      last_sign_in_at: u.lastSignInAt ?? u.createdAt,
      created_at: u.createdAt,
      updated_at: u.updatedAt,
      email: u.email,
    };
  }

  function userJson(u: FakeGoTrueUser) {
    return {
      id: u.id,
      aud: 'authenticated',
      role: 'authenticated',
      email: u.email,
      ...(u.emailConfirmedAt ? { email_confirmed_at: u.emailConfirmedAt } : {}),
      phone: '',
      ...(u.confirmationSentAt ? { confirmation_sent_at: u.confirmationSentAt } : {}),
      ...(u.emailConfirmedAt ? { confirmed_at: u.emailConfirmedAt } : {}),
      ...(u.lastSignInAt ? { last_sign_in_at: u.lastSignInAt } : {}),
      ...(u.bannedUntil ? { banned_until: u.bannedUntil } : {}),
      app_metadata: u.appMetadata,
      user_metadata: u.userMetadata,
      identities: [identityJson(u)],
      // GoTrue lists the user's factors (when there are any) with the user.
      ...(u.mfaVerified
        ? {
            factors: [
              {
                id: `${u.id.slice(0, 24)}factor000000`,
                friendly_name: 'authenticator',
                factor_type: 'totp',
                status: 'verified',
                created_at: u.createdAt,
                updated_at: u.updatedAt,
              },
            ],
          }
        : {}),
      created_at: u.createdAt,
      updated_at: u.updatedAt,
      is_anonymous: false,
    };
  }

  /** What GoTrue answers a sign-up for a confirmed address when confirmation is on (sanitizeUser). */
  function obfuscatedUserJson(email: string, data: Record<string, unknown>) {
    const at = now();
    return {
      id: randomUUID(),
      aud: 'authenticated',
      role: 'authenticated',
      email,
      phone: '',
      confirmation_sent_at: at,
      app_metadata: { provider: 'email', providers: ['email'] },
      user_metadata: data,
      identities: [],
      created_at: at,
      updated_at: at,
      is_anonymous: false,
    };
  }

  const isBanned = (user: FakeGoTrueUser) =>
    user.bannedUntil != null && Date.parse(user.bannedUntil) > Date.now();

  function newUser(email: string, password: string | null, data: Record<string, unknown>): FakeGoTrueUser {
    const at = now();
    const user: FakeGoTrueUser = {
      id: randomUUID(),
      email: email.toLowerCase(),
      password,
      emailConfirmedAt: null,
      confirmationSentAt: null,
      lastSignInAt: null,
      createdAt: at,
      updatedAt: at,
      userMetadata: data,
      appMetadata: { provider: 'email', providers: ['email'] },
    };
    users.set(user.id, user);
    return user;
  }

  /** A new session opened with `method` (or `existing` refreshed), `ageSeconds` in the past. */
  async function issueSession(
    user: FakeGoTrueUser,
    existing?: Session,
    {
      method = 'password',
      ageSeconds = 0,
      secondFactor = false,
    }: { method?: string; ageSeconds?: number; secondFactor?: boolean } = {},
  ) {
    const iat = Math.floor(Date.now() / 1000) - ageSeconds;
    const session: Session = existing ?? {
      id: randomUUID(),
      userId: user.id,
      revoked: false,
      amr: [...(secondFactor ? [{ method: 'totp', timestamp: iat }] : []), { method, timestamp: iat }],
      aal: secondFactor ? 'aal2' : 'aal1',
    };
    sessions.set(session.id, session);
    const refreshToken = randomBytes(9).toString('base64url');
    refreshTokens.set(refreshToken, { sessionId: session.id, revoked: false });
    const accessToken = await new SignJWT({
      email: user.email,
      phone: '',
      app_metadata: user.appMetadata,
      user_metadata: user.userMetadata,
      role: 'authenticated',
      aal: session.aal ?? 'aal1',
      amr: session.amr,
      session_id: session.id,
      is_anonymous: false,
    })
      .setProtectedHeader({ alg: 'HS256', typ: 'JWT' })
      .setIssuer(`${baseUrl}/auth/v1`)
      .setSubject(user.id)
      .setAudience('authenticated')
      .setIssuedAt(iat)
      .setExpirationTime(iat + accessTokenTtl)
      .sign(secret);
    user.lastSignInAt = now();
    return {
      access_token: accessToken,
      token_type: 'bearer',
      expires_in: accessTokenTtl,
      expires_at: iat + accessTokenTtl,
      refresh_token: refreshToken,
      user: userJson(user),
    };
  }

  function validatePassword(password: string) {
    if (password.length < minPasswordLength)
      throw new HttpError(
        422,
        'weak_password',
        `Password should be at least ${minPasswordLength} characters.`,
        { weak_password: { reasons: ['length'] } },
      );
  }

  function validateEmail(email: string): string {
    if (!EMAIL.test(email))
      throw new HttpError(400, 'validation_failed', 'Unable to validate email address: invalid format');
    return email.toLowerCase();
  }

  function bearer(req: IncomingMessage): string {
    const header = req.headers.authorization ?? '';
    const match = /^Bearer\s+(\S+)$/i.exec(header);
    if (!match?.[1])
      throw new HttpError(401, 'no_authorization', 'This endpoint requires a valid Bearer token');
    return match[1];
  }

  async function verify(token: string) {
    try {
      const { payload } = await jwtVerify(token, secret, { algorithms: ['HS256'] });
      return payload;
    } catch (err) {
      const reason =
        err instanceof joseErrors.JWTExpired
          ? 'token has invalid claims: token is expired'
          : 'signature is invalid';
      throw new HttpError(403, 'bad_jwt', `invalid JWT: unable to parse or verify signature, ${reason}`);
    }
  }

  /** GoTrue's requireAuthentication + maybeLoadUserOrSession. */
  async function authenticatedUser(req: IncomingMessage) {
    const claims = await verify(bearer(req));
    if (!claims.sub) throw new HttpError(403, 'bad_jwt', 'invalid claim: missing sub claim');
    const user = users.get(claims.sub);
    if (!user) throw new HttpError(403, 'user_not_found', 'User from sub claim in JWT does not exist');
    const sessionId = typeof claims.session_id === 'string' ? claims.session_id : undefined;
    const session = sessionId ? sessions.get(sessionId) : undefined;
    if (sessionId && (!session || session.revoked))
      throw new HttpError(403, 'session_not_found', 'Session from session_id claim in JWT does not exist');
    return { user, session };
  }

  async function requireAdmin(req: IncomingMessage) {
    const claims = await verify(bearer(req));
    if (typeof claims.role !== 'string' || !ADMIN_ROLES.has(claims.role))
      throw new HttpError(403, 'not_admin', 'User not allowed');
  }

  function revokeSession(session: Session) {
    session.revoked = true;
    for (const token of refreshTokens.values()) if (token.sessionId === session.id) token.revoked = true;
  }

  function revokeUserSessions(userId: string, except?: string) {
    for (const session of sessions.values())
      if (session.userId === userId && session.id !== except) revokeSession(session);
  }

  async function signup(body: Record<string, unknown>) {
    const password = str(body, 'password');
    if (!password) throw new HttpError(422, 'validation_failed', 'Signup requires a valid password');
    validatePassword(password);
    const email = validateEmail(str(body, 'email'));
    const data = isRecord(body.data) ? body.data : {};
    const existing = findByEmail(email);
    if (existing) {
      if (!confirmEmail) throw new HttpError(422, 'user_already_exists', 'User already registered');
      // Confirmation on: do not reveal the account. An unconfirmed one gets the mail again.
      if (existing.emailConfirmedAt) return obfuscatedUserJson(email, data);
      existing.confirmationSentAt = now();
      return userJson(existing);
    }
    const user = newUser(email, password, data);
    if (confirmEmail) {
      user.confirmationSentAt = now();
      return userJson(user);
    }
    user.emailConfirmedAt = now();
    return issueSession(user);
  }

  async function token(url: URL, body: Record<string, unknown>) {
    const grantType = url.searchParams.get('grant_type');
    if (grantType === 'password') {
      const email = str(body, 'email').toLowerCase();
      const password = str(body, 'password');
      if (!email)
        throw new HttpError(
          400,
          'validation_failed',
          'Only an email address or phone number should be provided',
        );
      const user = findByEmail(email);
      if (!user || user.password === null)
        throw new HttpError(400, 'invalid_credentials', 'Invalid login credentials');
      // GoTrue's ResourceOwnerPasswordGrant: a banned user is refused before the password is checked,
      // so for any password, and before the address's confirmation.
      if (isBanned(user)) throw new HttpError(400, 'user_banned', 'User is banned');
      if (user.password !== password)
        throw new HttpError(400, 'invalid_credentials', 'Invalid login credentials');
      if (!user.emailConfirmedAt) throw new HttpError(400, 'email_not_confirmed', 'Email not confirmed');
      return issueSession(user);
    }
    if (grantType === 'refresh_token') {
      const value = str(body, 'refresh_token');
      const stored = refreshTokens.get(value);
      if (!stored)
        throw new HttpError(400, 'refresh_token_not_found', 'Invalid Refresh Token: Refresh Token Not Found');
      const session = sessions.get(stored.sessionId);
      if (stored.revoked || !session || session.revoked) {
        // Reuse of a rotated token: GoTrue revokes the whole session.
        if (session) revokeSession(session);
        throw new HttpError(400, 'refresh_token_already_used', 'Invalid Refresh Token: Already Used');
      }
      const user = users.get(session.userId);
      if (!user)
        throw new HttpError(400, 'refresh_token_not_found', 'Invalid Refresh Token: Refresh Token Not Found');
      if (isBanned(user)) throw new HttpError(400, 'user_banned', 'User is banned');
      stored.revoked = true;
      return issueSession(user, session);
    }
    throw new OAuthError('unsupported_grant_type', '');
  }

  async function updateUser(req: IncomingMessage, body: Record<string, unknown>) {
    const { user, session } = await authenticatedUser(req);
    if (body.email !== undefined && body.email !== user.email)
      throw new HttpError(400, 'validation_failed', 'The fake GoTrue does not support email changes');
    // GoTrue's UserUpdate (after the password's strength): a user with a verified factor, aal1 session.
    if (
      typeof body.password === 'string' &&
      body.password !== '' &&
      user.mfaVerified &&
      session?.aal !== 'aal2'
    ) {
      validatePassword(body.password);
      throw new HttpError(
        401,
        'insufficient_aal',
        'AAL2 session is required to update email or password when MFA is enabled.',
      );
    }
    if (typeof body.password === 'string') {
      if (body.password === user.password)
        throw new HttpError(422, 'same_password', 'New password should be different from the old password.');
      validatePassword(body.password);
      user.password = body.password;
    }
    if (isRecord(body.data)) user.userMetadata = { ...user.userMetadata, ...body.data };
    user.updatedAt = now();
    return userJson(user);
  }

  /** GoTrue's Recover: answers alike whether the address has a user or not. */
  function recover(url: URL, body: Record<string, unknown>) {
    if (!str(body, 'email'))
      throw new HttpError(400, 'validation_failed', 'Password recovery requires an email');
    const email = validateEmail(str(body, 'email'));
    const user = findByEmail(email);
    if (!user) return {};
    const last = recoverySentAt.get(user.id);
    if (last !== undefined && Date.now() - last < mailMaxFrequencyMs) {
      const left = Math.floor((last + mailMaxFrequencyMs - Date.now()) / 1000);
      throw new HttpError(
        429,
        'over_email_send_rate_limit',
        `For security purposes, you can only request this after ${left} seconds.`,
      );
    }
    // One recovery token per user: a newer mail replaces the older link.
    voidRecoveries(user.id);
    const at = Date.now();
    recoverySentAt.set(user.id, at);
    recoveries.push({
      email: user.email,
      userId: user.id,
      redirectTo: url.searchParams.get('redirect_to'),
      flow: str(body, 'code_challenge') ? 'pkce' : 'implicit',
      sentAt: new Date(at).toISOString(),
      state: 'sent',
    });
    return {};
  }

  function voidRecoveries(userId: string) {
    for (const r of recoveries) if (r.userId === userId && r.state === 'sent') r.state = 'void';
  }

  async function logout(req: IncomingMessage, url: URL) {
    const { user, session } = await authenticatedUser(req);
    const scope = url.searchParams.get('scope') ?? 'global';
    if (scope === 'local') {
      if (session) revokeSession(session);
    } else if (scope === 'others') revokeUserSessions(user.id, session?.id);
    else revokeUserSessions(user.id);
  }

  function listUsers(url: URL, res: ServerResponse) {
    const page = Math.max(1, Number(url.searchParams.get('page')) || 1);
    const perPage = Math.max(1, Number(url.searchParams.get('per_page')) || 50);
    const all = [...users.values()];
    const lastPage = Math.max(1, Math.ceil(all.length / perPage));
    const links: string[] = [];
    if (page < lastPage)
      links.push(`<${baseUrl}/auth/v1/admin/users?page=${page + 1}&per_page=${perPage}>; rel="next"`);
    links.push(`<${baseUrl}/auth/v1/admin/users?page=${lastPage}&per_page=${perPage}>; rel="last"`);
    res.setHeader('x-total-count', String(all.length));
    res.setHeader('link', links.join(', '));
    return { users: all.slice((page - 1) * perPage, page * perPage).map(userJson), aud: 'authenticated' };
  }

  function createUser(body: Record<string, unknown>) {
    const email = validateEmail(str(body, 'email'));
    if (findByEmail(email))
      throw new HttpError(422, 'email_exists', 'A user with this email address has already been registered');
    const password = typeof body.password === 'string' ? body.password : null;
    if (password !== null) validatePassword(password);
    const user = newUser(email, password, isRecord(body.user_metadata) ? body.user_metadata : {});
    if (isRecord(body.app_metadata)) user.appMetadata = { ...user.appMetadata, ...body.app_metadata };
    if (body.email_confirm === true) user.emailConfirmedAt = now();
    return userJson(user);
  }

  /** GoTrue's adminUserUpdate, for what the service uses: the password, confirmation and metadata. */
  function adminUpdateUser(user: FakeGoTrueUser, body: Record<string, unknown>) {
    if (body.email !== undefined && body.email !== user.email)
      throw new HttpError(400, 'validation_failed', 'The fake GoTrue does not support email changes');
    if (body.password !== undefined) {
      if (typeof body.password !== 'string')
        throw new HttpError(400, 'bad_json', 'Could not parse request body as JSON');
      validatePassword(body.password);
    }
    if (body.email_confirm === true && !user.emailConfirmedAt) user.emailConfirmedAt = now();
    if (body.ban_duration !== undefined) {
      // GoTrue: "none" lifts a ban; otherwise a Go duration ("876000h") from now.
      const hours =
        typeof body.ban_duration === 'string' ? /^(\d+)h$/.exec(body.ban_duration)?.[1] : undefined;
      if (body.ban_duration === 'none') user.bannedUntil = null;
      else if (hours) user.bannedUntil = new Date(Date.now() + Number(hours) * 3600_000).toISOString();
      else throw new HttpError(400, 'validation_failed', 'invalid format for ban duration');
    }
    if (isRecord(body.user_metadata)) user.userMetadata = { ...user.userMetadata, ...body.user_metadata };
    if (isRecord(body.app_metadata)) user.appMetadata = { ...user.appMetadata, ...body.app_metadata };
    if (typeof body.password === 'string') {
      // models.User.UpdatePassword(tx, nil): the links mailed are voided and every session ends.
      user.password = body.password;
      recoverySentAt.delete(user.id);
      voidRecoveries(user.id);
      revokeUserSessions(user.id);
    }
    user.updatedAt = now();
    return userJson(user);
  }

  function adminUser(id: string) {
    if (!UUID.test(id)) throw new HttpError(404, 'user_not_found', 'User not found');
    const user = users.get(id);
    if (!user) throw new HttpError(404, 'user_not_found', 'User not found');
    return user;
  }

  async function route(req: IncomingMessage, res: ServerResponse, url: URL): Promise<unknown> {
    const method = req.method ?? 'GET';
    const path = url.pathname.replace(/\/+$/, '');
    const body = await readJson(req);
    if (method === 'POST' && path === '/auth/v1/signup') return signup(body);
    if (method === 'POST' && path === '/auth/v1/token') return token(url, body);
    if (method === 'GET' && path === '/auth/v1/user') return userJson((await authenticatedUser(req)).user);
    if (method === 'PUT' && path === '/auth/v1/user') return updateUser(req, body);
    if (method === 'POST' && path === '/auth/v1/recover') return recover(url, body);
    if (method === 'POST' && path === '/auth/v1/logout') {
      await logout(req, url);
      return null;
    }
    if (path === '/auth/v1/admin/users') {
      await requireAdmin(req);
      if (method === 'GET') return listUsers(url, res);
      if (method === 'POST') return createUser(body);
    }
    const adminMatch = /^\/auth\/v1\/admin\/users\/([^/]+)$/.exec(path);
    if (adminMatch?.[1]) {
      await requireAdmin(req);
      const user = adminUser(decodeURIComponent(adminMatch[1]));
      if (method === 'GET') return userJson(user);
      if (method === 'PUT') return adminUpdateUser(user, body);
      if (method === 'DELETE') {
        revokeUserSessions(user.id);
        users.delete(user.id);
        return {};
      }
    }
    throw new HttpError(404, 'not_found', `No route for ${method} ${url.pathname}`);
  }

  function send(res: ServerResponse, status: number, body: unknown) {
    if (res.destroyed || res.headersSent) return;
    if (body === null) {
      res.writeHead(status === 200 ? 204 : status).end();
      return;
    }
    const text = JSON.stringify(body);
    res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
    res.end(text);
  }

  /** GoTrue's HandleResponseError. */
  function sendError(req: IncomingMessage, res: ServerResponse, err: unknown) {
    if (err instanceof OAuthError) {
      send(res, 400, {
        error: err.error,
        ...(err.description ? { error_description: err.description } : {}),
      });
      return;
    }
    const e = err instanceof HttpError ? err : new HttpError(500, 'unexpected_failure', String(err));
    if (!res.headersSent) res.setHeader('x-sb-error-code', e.code);
    if (apiVersionAtLeast20240101(req.headers['x-supabase-api-version'])) {
      if (!res.headersSent) res.setHeader('x-supabase-api-version', '2024-01-01');
      send(res, e.status, { code: e.code, message: e.message, ...e.extra });
    } else {
      send(res, e.status, { code: e.status, error_code: e.code, msg: e.message, ...e.extra });
    }
  }

  async function handle(req: IncomingMessage, res: ServerResponse) {
    const url = new URL(req.url ?? '/', 'http://fake-gotrue');
    // The API gateway in front of GoTrue, not GoTrue, checks the key, and answers in its own shape.
    const apikey = req.headers.apikey;
    if (!apikey) return send(res, 401, { message: 'No API key found in request' });
    if (apikey !== anonKey && apikey !== serviceRoleKey)
      return send(res, 401, { message: 'Invalid API key' });
    try {
      if (failWith && (failOnly?.(req.method ?? 'GET', url.pathname) ?? true)) {
        const { status, code, message } = failWith;
        throw new HttpError(
          status,
          code ?? (status >= 500 ? 'unexpected_failure' : 'unknown'),
          message ?? 'Injected failure',
        );
      }
      const result = await route(req, res, url);
      if (answerDelayMs > 0 && (answerDelayOnly?.(req.method ?? 'GET', url.pathname) ?? true))
        await new Promise((resolve) => setTimeout(resolve, answerDelayMs));
      send(res, 200, result);
    } catch (err) {
      sendError(req, res, err);
    }
  }

  const server = createServer((req, res) => {
    if (down) {
      req.socket.destroy();
      return;
    }
    const method = req.method ?? 'GET';
    const path = new URL(req.url ?? '/', 'http://fake-gotrue').pathname;
    requests.push({ method, path });
    const handleNow = () => {
      handle(req, res).catch((err: unknown) => sendError(req, res, err));
    };
    const held = holds.findIndex((h) => h.picks(method, path));
    const hold = held >= 0 ? holds.splice(held, 1)[0] : undefined;
    const run = hold
      ? () => {
          hold.arrive();
          void hold.released.then(handleNow);
        }
      : handleNow;
    if (delayMs <= 0) return run();
    const timer = setTimeout(run, delayMs);
    res.on('close', () => clearTimeout(timer));
  });
  server.keepAliveTimeout = 1000;
  server.on('connection', (socket) => {
    if (down) {
      socket.destroy();
      return;
    }
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
  });

  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => resolve());
  });
  const { port } = server.address() as AddressInfo;
  baseUrl = `http://127.0.0.1:${port}`;

  const destroySockets = () => {
    for (const socket of sockets) socket.destroy();
    sockets.clear();
  };

  return {
    url: baseUrl,
    anonKey,
    serviceRoleKey,
    users,
    requests,
    close: () =>
      new Promise<void>((resolve, reject) => {
        destroySockets();
        server.close((err) => (err ? reject(err) : resolve()));
      }),
    setConfirmEmail(on) {
      confirmEmail = on;
    },
    setDown(value) {
      down = value;
      if (value) destroySockets();
    },
    setDelayMs(ms) {
      delayMs = ms;
    },
    setAnswerDelayMs(ms, picks) {
      answerDelayMs = ms;
      answerDelayOnly = picks;
    },
    hold(picks) {
      let arrive: () => void = () => {};
      let release: () => void = () => {};
      const arrived = new Promise<void>((resolve) => {
        arrive = () => resolve();
      });
      const released = new Promise<void>((resolve) => {
        release = () => resolve();
      });
      holds.push({ picks, arrive, released, release });
      return { arrived, release };
    },
    setFailWith(failure, picks) {
      failWith = failure;
      failOnly = picks;
    },
    confirm(email) {
      const user = findByEmail(email);
      if (!user) throw new Error(`fake GoTrue: no user with email ${email}`);
      user.emailConfirmedAt = now();
      user.updatedAt = user.emailConfirmedAt;
    },
    activeSessions(userId) {
      return [...sessions.values()].filter((s) => s.userId === userId && !s.revoked).length;
    },
    recoveries,
    async completeRecovery(email, { openedSecondsAgo = 0, secondFactor = false } = {}) {
      const link = recoveries.filter((r) => r.email === email.toLowerCase()).at(-1);
      const user = link && users.get(link.userId);
      if (link?.state !== 'sent' || !user) throw new Error(`fake GoTrue: no live recovery link for ${email}`);
      link.state = 'used';
      // Opening the link proves the mailbox: an unconfirmed address counts as confirmed from then on.
      user.emailConfirmedAt ??= now();
      const method = link.flow === 'pkce' ? 'recovery' : 'otp';
      const session = await issueSession(user, undefined, {
        method,
        ageSeconds: openedSecondsAgo,
        secondFactor,
      });
      return session.access_token;
    },
    async giveSecondFactor(accessToken) {
      const claims = await verify(accessToken);
      const user = claims.sub ? users.get(claims.sub) : undefined;
      const session = typeof claims.session_id === 'string' ? sessions.get(claims.session_id) : undefined;
      if (!user?.mfaVerified || !session || session.revoked)
        throw new Error('fake GoTrue: no live session of a user with a verified factor');
      session.aal = 'aal2';
      session.amr = [{ method: 'totp', timestamp: Math.floor(Date.now() / 1000) }, ...session.amr];
      return (await issueSession(user, session)).access_token;
    },
    backdateSignIns(userId, seconds) {
      for (const session of sessions.values())
        if (session.userId === userId) for (const entry of session.amr) entry.timestamp -= seconds;
    },
  };
}
