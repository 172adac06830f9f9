import {
  type AuthError,
  createClient,
  isAuthError,
  isAuthRetryableFetchError,
  isAuthSessionMissingError,
  isAuthWeakPasswordError,
  type SupabaseClient,
  type User,
  type WebSocketLikeConstructor,
} from '@supabase/supabase-js';
import ws from 'ws';
import { AppError } from '../lib/errors.js';
import { normalizePassword } from './passwords.js';
import {
  AccountDisabled,
  EmailNotConfirmed,
  type IdentityProvider,
  PasswordMayHaveChanged,
  type ProviderUser,
} from './provider.js';

export interface SupabaseProviderDeps {
  url: string;
  anonKey: string;
  /** For the admin calls: deleting a user, creating the bootstrap admin already confirmed. */
  serviceRoleKey: string;
  /** Bound on every HTTP exchange with Supabase Auth, body included. */
  timeoutMs: number;
  /** How recent the mailed link behind a recovery session must be (PASSWORD_RESET_TTL; 1800 s). */
  recoveryMaxAgeSeconds?: number;
  fetch?: typeof fetch;
}

/**
 * The status of the stand-in response for a request that got no answer at all. auth-js console.errors
 * every rejected fetch and keeps only its message; answering a local 5xx with a GoTrue error body
 * instead keeps outages out of stderr and carries the reason through as an AuthApiError.
 */
const NO_ANSWER_STATUS = 599;

const RETRY_AFTER = { 'retry-after': '5' };

/** A JWT as Supabase issues it: three base64url parts (the last, the signature, never empty). */
const COMPACT_JWS = /^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$/;

/**
 * True when the JWT's `amr` (GoTrue's list of how the session was opened, unverified here: getUser
 * then verifies the token itself) has a mailed-link method no older than `maxAgeSeconds`.
 */
function provedMailboxRecently(jwt: string, maxAgeSeconds: number): boolean {
  try {
    const payload = JSON.parse(Buffer.from(jwt.split('.')[1] ?? '', 'base64url').toString('utf8')) as {
      amr?: unknown;
    };
    if (!Array.isArray(payload.amr)) return false;
    const now = Date.now() / 1000;
    return payload.amr.some((entry: unknown) => {
      const { method, timestamp } = (entry ?? {}) as { method?: unknown; timestamp?: unknown };
      return (
        (method === 'recovery' || method === 'otp' || method === 'magiclink') &&
        typeof timestamp === 'number' &&
        timestamp <= now + 30 &&
        now - timestamp <= maxAgeSeconds
      );
    });
  } catch {
    return false;
  }
}

/**
 * Whether the session of a JWT GoTrue has verified gave a second factor: its `aal` claim is `aal2`.
 */
function gaveSecondFactor(jwt: string): boolean {
  try {
    const payload = JSON.parse(Buffer.from(jwt.split('.')[1] ?? '', 'base64url').toString('utf8')) as {
      aal?: unknown;
    };
    return payload.aal === 'aal2';
  } catch {
    return false;
  }
}

/**
 * When the user signed in for the session of a JWT GoTrue has verified (getUser answered with its
 * user, `userId`): the newest `amr` timestamp (GoTrue keeps them through refreshes; a step-up adds
 * one), never later than now; null when the token names another user or carries none.
 */
function signedInAt(jwt: string, userId: string): Date | null {
  try {
    const payload = JSON.parse(Buffer.from(jwt.split('.')[1] ?? '', 'base64url').toString('utf8')) as {
      sub?: unknown;
      amr?: unknown;
    };
    if (payload.sub !== userId || !Array.isArray(payload.amr)) return null;
    let newest = Number.NEGATIVE_INFINITY;
    for (const entry of payload.amr as unknown[]) {
      const timestamp = (entry as { timestamp?: unknown } | null)?.timestamp;
      if (typeof timestamp === 'number' && Number.isFinite(timestamp) && timestamp > newest)
        newest = timestamp;
    }
    if (newest === Number.NEGATIVE_INFINITY) return null;
    return new Date(Math.min(newest * 1000, Date.now()));
  } catch {
    return null;
  }
}

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

function failureReason(err: unknown): string {
  if (!(err instanceof Error)) return String(err);
  const cause = err.cause as { code?: unknown; message?: unknown } | undefined;
  const detail = typeof cause?.code === 'string' ? cause.code : cause?.message;
  return typeof detail === 'string' ? `${err.message} (${detail})` : err.message;
}

function boundedFetch(base: typeof fetch, timeoutMs: number): typeof fetch {
  return async (input, init) => {
    const timeout = AbortSignal.timeout(timeoutMs);
    const callerSignal = init?.signal ?? undefined;
    const signal = callerSignal ? AbortSignal.any([callerSignal, timeout]) : timeout;
    try {
      return await base(input, { ...init, signal });
    } catch (err) {
      if (callerSignal?.aborted) throw err;
      const timedOut = timeout.aborted;
      const body = {
        code: timedOut ? 'request_timeout' : 'request_failed',
        message: timedOut
          ? `Supabase Auth did not answer within ${timeoutMs} ms`
          : `Supabase Auth is unreachable: ${failureReason(err)}`,
      };
      return new Response(JSON.stringify(body), {
        status: NO_ANSWER_STATUS,
        headers: { 'content-type': 'application/json', 'x-supabase-api-version': '2024-01-01' },
      });
    }
  };
}

/**
 * GoTrue's refusals of a user's own token or account. Any other 401 or 403 is Supabase refusing the
 * service itself: the API gateway's "Invalid API key" (which carries no code), or GoTrue's `not_admin`
 * for a service-role key that is not one.
 */
const USER_REFUSALS = new Set([
  'no_authorization',
  'bad_jwt',
  'user_not_found',
  'session_not_found',
  'session_expired',
  'user_banned',
]);

/** Supabase refused the service's own key: a configuration fault, never the user's. */
function isRefusedKey(error: AuthError): boolean {
  const status = error.status ?? 0;
  return (status === 401 || status === 403) && !USER_REFUSALS.has(error.code ?? '');
}

/**
 * True when Supabase could not give a real answer about the user, as opposed to refusing the request:
 * no answer, an answer that is not GoTrue's, a 5xx, a 429, or a refusal of the service's own key. A
 * login then must not count as a wrong password (or lock the account): the fault is ours.
 */
function isOutage(error: unknown): boolean {
  if (!isAuthError(error)) return true;
  // AuthUnknownError: a body that is not GoTrue's JSON, i.e. something else (a proxy) answered.
  if (isAuthRetryableFetchError(error) || error.name === 'AuthUnknownError') return true;
  const status = error.status ?? 0;
  // A 429 from Supabase throttles the whole service, not this user: for us the provider is down.
  return status >= 500 || status === 429 || isRefusedKey(error);
}

function unavailable(cause: unknown): AppError {
  // The log says which: the error handler logs a 503's cause with the request id.
  const reason = !isAuthError(cause)
    ? cause
    : isRefusedKey(cause)
      ? new Error(
          `Supabase refused the service's key (${cause.status} ${cause.message}): check SUPABASE_ANON_KEY and SUPABASE_SERVICE_ROLE_KEY`,
          { cause },
        )
      : isOutage(cause)
        ? // supabase-js reads a 502/503/504 as a fetch failure named `{}`: say what Supabase answered.
          isAuthRetryableFetchError(cause) && cause.status && !/\w/.test(cause.message)
          ? new Error(`Supabase answered ${cause.status}`, { cause })
          : cause
        : new Error(
            `Supabase answered ${cause.status} ${cause.code ?? '(no code)'} "${cause.message}", which says nothing ` +
              'about the user: check SUPABASE_URL (the project URL) and the project’s Auth settings',
            { cause },
          );
  return new AppError('provider_unavailable', { headers: { ...RETRY_AFTER }, cause: reason });
}

/**
 * How much earlier than the sign-up request Supabase's clock may date a user the request made: a
 * user dated before that existed already.
 */
const CREATED_BY_THIS_SIGN_UP_MS = 60_000;

/** GoTrue's answers to a password sign-in that are about the user: not this password. */
const SIGN_IN_REFUSALS = new Set(['invalid_credentials', 'user_not_found', 'validation_failed']);

/**
 * What a refused password sign-in says. Only GoTrue's own "no" (and its older, code-less wording) is
 * a wrong password; the right password of an unconfirmed address is said as such; a banned user
 * (`user_banned`, answered before GoTrue checks the password, so for any password) is a disabled
 * account; anything else — a 404 from a URL that is not the project's, a CAPTCHA the project
 * requires, email sign-ins turned off — is the service's fault, and must lock nobody out. (GoTrue
 * before its error codes answered a ban "Invalid login credentials": a wrong password, as it said.)
 */
function signInRefusal(error: AuthError): 'wrong' | 'unconfirmed' | 'disabled' | 'outage' {
  if (isOutage(error)) return 'outage';
  const code = error.code ?? '';
  if (code === 'email_not_confirmed') return 'unconfirmed';
  if (code === 'user_banned') return 'disabled';
  if (SIGN_IN_REFUSALS.has(code)) return 'wrong';
  if (code === '' && error.status === 400) {
    if (/invalid login credentials/i.test(error.message)) return 'wrong';
    if (/email not confirmed/i.test(error.message)) return 'unconfirmed';
  }
  return 'outage';
}

/** GoTrue's "not this password" itself (not a ban, nor an unknown user): another form may be right. */
function isInvalidCredentials(error: AuthError): boolean {
  const code = error.code ?? '';
  return (
    code === 'invalid_credentials' ||
    (code === '' && error.status === 400 && /invalid login credentials/i.test(error.message))
  );
}

/** One password sign-in: the session, or the refusal when it is a wrong password or a banned user. */
async function signInOnce(client: SupabaseClient, email: string, password: string) {
  const { data, error } = await client.auth.signInWithPassword({ email, password });
  if (!error) return { data };
  const refusal = signInRefusal(error);
  if (refusal === 'unconfirmed') throw new EmailNotConfirmed();
  if (refusal === 'outage') throw unavailable(error);
  return { refused: error, disabled: refusal === 'disabled' };
}

/**
 * Signs in with a password; undefined for a wrong one, `disabled` for a user banned at Supabase (see
 * signInRefusal for the rest). The NFKC form
 * is what the service sets in Supabase; a password set before passwords were normalised is the string
 * as typed then, so a password NFKC changes that Supabase calls invalid is tried once more as typed.
 * Not set again in its normalised form: GoTrue ends the user's other Supabase sessions and voids their
 * mailed links when a password is set, which nobody asked for here (README, Passwords).
 */
async function passwordSignIn(client: SupabaseClient, email: string, password: string) {
  const normalized = normalizePassword(password);
  const first = await signInOnce(client, email, normalized);
  if (first.data) return first.data;
  if (first.disabled) return 'disabled' as const;
  if (normalized === password || !isInvalidCredentials(first.refused)) return undefined;
  const again = await signInOnce(client, email, password);
  return again.data ?? (again.disabled ? ('disabled' as const) : undefined);
}

/** Runs one provider operation so that nothing but an AppError can leave it. */
async function guarded<T>(operation: () => Promise<T>): Promise<T> {
  try {
    return await operation();
  } catch (err) {
    if (err instanceof AppError) throw err;
    throw unavailable(err);
  }
}

/** Supabase's own password policy refused it: a 422 naming the field, as the service's own check does. */
function weakPassword(error: AuthError, field: string): AppError {
  return new AppError('weak_password', {
    detail: error.message,
    errors: [{ field, message: error.message }],
    cause: error,
  });
}

/** Supabase did not set a new password (a change or a reset): why, in the service's words. */
function newPasswordRefused(error: AuthError): AppError {
  if (isOutage(error)) return unavailable(error);
  if (isAuthWeakPasswordError(error) || error.code === 'weak_password')
    return weakPassword(error, 'body.new_password');
  return new AppError('unprocessable', {
    detail: 'The identity provider refused the new password',
    cause: error,
  });
}

/**
 * GoTrue keeps a password (or address) update of a user with a verified MFA factor for an aal2 session
 * (`insufficient_aal`, 401 in its UserUpdate; some gateways and versions answer 403), and checks it
 * before it changes anything. The service signs in with the password alone, so its session is aal1
 * and never will be more: the user changes the password where Supabase asks for that factor. Neither
 * an outage nor the service's key refused (the 401/403 reading of isRefusedKey), nor a wrong password.
 */
function secondFactorRequiredThere(error: AuthError): AppError {
  return new AppError('provider_mfa_required', {
    detail:
      'Your account has a second factor (MFA) at the identity provider, which allows a password change ' +
      'only from a session that gave it: change your password in the app where you sign in with that ' +
      'second factor. Nothing was changed',
    cause: new Error(
      `Supabase answered ${error.status} insufficient_aal "${error.message}": the user has a verified MFA ` +
        'factor in Supabase, and GoTrue changes their password only from an aal2 session, which a ' +
        "password sign-in (this service's) is not; nothing was changed",
      { cause: error },
    ),
  });
}

/** Sign-up closed in the Supabase project's settings. */
const SIGN_UP_CLOSED = new Set(['signup_disabled', 'email_provider_disabled']);

/**
 * What a refused sign-up tells the client, in the service's own words: GoTrue's messages are for
 * operators (they name settings and SMTP restrictions), and go to the log as the error's cause.
 */
function signUpFailure(error: AuthError): AppError {
  if (isOutage(error)) return unavailable(error);
  if (isAuthWeakPasswordError(error) || error.code === 'weak_password')
    return weakPassword(error, 'body.password');
  // Older GoTrue versions answer 400 with no code, only the message.
  if (
    error.code === 'user_already_exists' ||
    error.code === 'email_exists' ||
    /already (been )?registered/i.test(error.message)
  )
    return new AppError('email_taken', { cause: error });
  if (error.code === 'email_address_invalid' || error.code === 'validation_failed')
    return new AppError('validation_failed', {
      detail: 'The identity provider does not accept this email address',
      errors: [{ field: 'body.email', message: 'is not accepted by the identity provider' }],
      cause: error,
    });
  if (SIGN_UP_CLOSED.has(error.code ?? '') || /signups not allowed/i.test(error.message))
    return new AppError('registration_closed', { cause: error });
  if (error.code === 'email_address_not_authorized')
    return new AppError('unprocessable', {
      detail: 'The identity provider cannot send mail to this address',
      errors: [{ field: 'body.email', message: 'cannot receive mail from the identity provider' }],
      cause: error,
    });
  return new AppError('unprocessable', { detail: 'The identity provider refused the sign-up', cause: error });
}

/** The user is banned at Supabase now: `banned_until` later than now (null or past: not banned). */
const bannedNow = (user: User) => Date.parse(user.banned_until ?? '') > Date.now();

function toProviderUser(user: User, fallbackEmail: string): ProviderUser {
  const confirmedAt = user.email_confirmed_at ? new Date(user.email_confirmed_at) : null;
  return {
    id: user.id,
    email: user.email || fallbackEmail,
    emailConfirmedAt: confirmedAt && !Number.isNaN(confirmedAt.getTime()) ? confirmedAt : null,
  };
}

/**
 * `pu` with `secondFactorMissing` when `user` (as GoTrue answered it, factors included) has a verified
 * factor and the session of `jwt` (one GoTrue issued or verified) has not given it: not aal2.
 */
function withSecondFactor(pu: ProviderUser, user: User, jwt: string): ProviderUser {
  const missing =
    (user.factors ?? []).some((factor) => factor.status === 'verified') && !gaveSecondFactor(jwt);
  return missing ? { ...pu, secondFactorMissing: true } : pu;
}

/**
 * Supabase Auth as the identity provider, through supabase-js. Calls that sign in use a client of their
 * own, so no Supabase session is ever shared between requests; the sessions they open are revoked at
 * once in the background, since the service mints its own tokens.
 */
export function createSupabaseProvider(deps: SupabaseProviderDeps): IdentityProvider {
  const fetchImpl = boundedFetch(deps.fetch ?? globalThis.fetch, deps.timeoutMs);
  const newClient = (key: string): SupabaseClient =>
    createClient(deps.url, key, {
      auth: { persistSession: false, autoRefreshToken: false, detectSessionInUrl: false },
      // Node 20 has no global WebSocket and createClient refuses to build without one, though auth never
      // opens a socket. The cast: @types/ws types its events apart from the DOM's WebSocketLike.
      realtime: { transport: ws as unknown as WebSocketLikeConstructor },
      global: { fetch: fetchImpl },
    });
  // Only stateless calls (a token or the service role key in each request) go through shared clients.
  const anon = newClient(deps.anonKey);
  const admin = newClient(deps.serviceRoleKey);

  /**
   * The user by id (the admin API, with the service-role key); undefined for an id no Supabase user
   * can have, or when GoTrue's refusal is one `notFound` takes for "no such user". Throws
   * `provider_unavailable` for any other failure.
   */
  const userById = async (userId: string, notFound: (error: AuthError) => boolean) => {
    // auth-js throws a plain Error for a non-UUID id; no Supabase user can have one anyway.
    if (!UUID.test(userId)) return undefined;
    const { data, error } = await admin.auth.admin.getUserById(userId);
    if (error) {
      if (notFound(error)) return undefined;
      throw unavailable(error);
    }
    return data.user;
  };

  const revoke = (client: SupabaseClient, accessToken: string) => {
    // Best effort: a session left behind only expires on its own; it must not fail or slow the caller.
    void client.auth.admin.signOut(accessToken, 'local').catch(() => undefined);
  };

  return {
    name: 'supabase',

    signUp: (email, password) =>
      guarded(async () => {
        const client = newClient(deps.anonKey);
        const started = Date.now();
        const { data, error } = await client.auth.signUp({ email, password: normalizePassword(password) });
        if (error) throw signUpFailure(error);
        if (!data.user) throw unavailable(new Error('Supabase answered the sign-up without a user'));
        // With email confirmation on, GoTrue answers a sign-up for a confirmed address with a made-up
        // user (random id, no identities) rather than an error, so as not to reveal the account.
        if (data.user.identities?.length === 0) throw new AppError('email_taken');
        if (data.session) revoke(client, data.session.access_token);
        // An unconfirmed address signed up before is answered with its existing user (GoTrue mails
        // it again): made well before this request, it is not this sign-up's to undo.
        const createdAt = Date.parse(data.user.created_at);
        return {
          user: toProviderUser(data.user, email),
          passwordHash: null,
          confirmed: data.session !== null,
          created: !(createdAt < started - CREATED_BY_THIS_SIGN_UP_MS),
        };
      }),

    signIn: (email, password) =>
      guarded(async () => {
        const client = newClient(deps.anonKey);
        const data = await passwordSignIn(client, email, password);
        if (data === 'disabled') throw new AccountDisabled();
        if (!data) return undefined;
        revoke(client, data.session.access_token);
        // GoTrue answers the password grant with the user, its factors included (supabase-js reads
        // them there for mfa.getAuthenticatorAssuranceLevel): no other call. A password sign-in is
        // aal1; Supabase grants a user with a verified factor nothing more until it is given (aal2).
        return withSecondFactor(toProviderUser(data.user, email), data.user, data.session.access_token);
      }),

    exchange: (accessToken) =>
      guarded(async () => {
        // getUser() without a token would read the (empty) client session instead, and one that is not
        // a compact JWS (a character a header cannot carry, say) would fail in fetch, not at Supabase.
        if (!COMPACT_JWS.test(accessToken)) return undefined;
        const { data, error } = await anon.auth.getUser(accessToken);
        if (error) {
          // Only GoTrue refusing the token itself is a "no"; a 404 from a wrong URL is not. auth-js
          // answers GoTrue's session_not_found as an AuthSessionMissingError without the code.
          const refusal = USER_REFUSALS.has(error.code ?? '') || isAuthSessionMissingError(error);
          if (isOutage(error) || !refusal) throw unavailable(error);
          return undefined;
        }
        // Accounts here are keyed by email; a phone-only Supabase user has nothing to map to.
        if (!data.user.email) return undefined;
        // Banned there (disabled here, or in Supabase's dashboard): GoTrue still verifies the tokens it
        // issued before, until they expire; one exchanged here would open a session that outlives them.
        if (bannedNow(data.user)) throw new AccountDisabled({ id: data.user.id, email: data.user.email });
        // getUser answers with the user's factors, and has verified the token whose `aal` is read.
        return withSecondFactor(
          {
            ...toProviderUser(data.user, data.user.email),
            signedInAt: signedInAt(accessToken, data.user.id),
          },
          data.user,
          accessToken,
        );
      }),

    changePassword: (user, currentPassword, newPassword) =>
      guarded(async () => {
        const client = newClient(deps.anonKey);
        const signIn = await passwordSignIn(client, user.email, currentPassword);
        // A user banned at Supabase: GoTrue checks no password of theirs, whatever it is (as at login).
        if (signIn === 'disabled') throw new AccountDisabled();
        if (!signIn) return undefined;
        try {
          // The email now belongs to another Supabase user: changing that one's password would be worse.
          if (signIn.user.id !== user.id) return undefined;
          const { error } = await client.auth.updateUser({ password: normalizePassword(newPassword) });
          // same_password: the account already ends up with the requested password, as with local.
          if (error && error.code !== 'same_password') {
            // Refused before anything changed, whatever the status: not PasswordMayHaveChanged.
            if (error.code === 'insufficient_aal') throw secondFactorRequiredThere(error);
            // No answer is not "not changed": Supabase may have applied it before the timeout or its
            // 5xx. A 429, a refused key or a refused connection applied nothing.
            if (isOutage(error) && (error.status ?? 0) >= 500)
              throw new PasswordMayHaveChanged(unavailable(error));
            throw newPasswordRefused(error);
          }
          return { passwordHash: null, replaces: null };
        } finally {
          revoke(client, signIn.session.access_token);
        }
      }),

    createConfirmedUser: (email, password) =>
      guarded(async () => {
        const { data, error } = await admin.auth.admin.createUser({
          email,
          password: normalizePassword(password),
          email_confirm: true,
        });
        if (error) throw signUpFailure(error);
        if (!data.user) throw unavailable(new Error('Supabase created the user without answering it'));
        return { user: toProviderUser(data.user, email), passwordHash: null, confirmed: true };
      }),

    setPassword: (user, newPassword) =>
      guarded(async () => {
        const { error } = await admin.auth.admin.updateUserById(user.id, {
          password: normalizePassword(newPassword),
        });
        // same_password: the account already ends up with the requested password.
        if (error && error.code !== 'same_password') {
          // As for a change: no answer (a timeout, a 5xx) is not "not set", Supabase may have set it.
          if (isOutage(error) && (error.status ?? 0) >= 500)
            throw new PasswordMayHaveChanged(
              unavailable(error),
              'The identity provider did not answer: the new password may be in effect already, and every session of the account has ended; try again (with a new link if this one no longer works)',
            );
          throw newPasswordRefused(error);
        }
        return { passwordHash: null };
      }),

    requestPasswordRecovery: (email, redirectTo) =>
      guarded(async () => {
        const { error } = await anon.auth.resetPasswordForEmail(email, redirectTo ? { redirectTo } : {});
        // An address Supabase has no user for is no error here either: nothing is sent, alike.
        if (!error || error.code === 'user_not_found') return 'sent';
        // GoTrue mails a user at most once per SMTP_MAX_FREQUENCY (60 s) and answers a second request
        // within it 429, which for any other call means Supabase throttles the service. Here it means
        // a link is already on its way; as an outage, it would answer a known address 503 and an
        // unknown one 204. The project-wide mail limit shares the code, not the message: an outage.
        if (error.code === 'over_email_send_rate_limit' && /for security purposes/i.test(error.message))
          return 'too_soon';
        if (isOutage(error)) throw unavailable(error);
        // GoTrue answers an unknown address alike; what else it refuses is the project's settings.
        throw new AppError('unprocessable', {
          detail: 'The identity provider refused to send a reset mail to this address',
          errors: [{ field: 'body.email', message: 'is refused by the identity provider' }],
          cause: error,
        });
      }),

    recoveryIdentity: (token) =>
      guarded(async () => {
        if (!COMPACT_JWS.test(token)) return undefined;
        // A session opened by a mailed link (a recovery or magic link: amr `recovery`, or `otp` in the
        // implicit flow) within the reset lifetime: the mailbox was proved just now, as with a built-in
        // link. A session opened with the password is no licence to skip the current one.
        if (!provedMailboxRecently(token, deps.recoveryMaxAgeSeconds ?? 1800)) return undefined;
        const { data, error } = await anon.auth.getUser(token);
        if (error) {
          if (isOutage(error)) throw unavailable(error);
          return undefined;
        }
        if (!data.user.email) return undefined;
        // Not signed out yet: the reset does it once the password is set (endRecovery), so that a
        // password Supabase did not answer about can be set again with the same link.
        // GoTrue sets the password of a user with a verified factor only from an aal2 session (its
        // UserUpdate's insufficient_aal); the reset sets it with the service-role key, which GoTrue does
        // not hold to that, so the rule is kept here: the mailbox alone must not replace the password
        // Supabase guards with the second factor.
        return withSecondFactor(toProviderUser(data.user, data.user.email), data.user, token);
      }),

    endRecovery: async (token) => {
      // Best effort: GoTrue ends every session of the user when the password is set anyway.
      await admin.auth.admin.signOut(token, 'local').catch(() => undefined);
    },

    currentUser: (userId) =>
      guarded(async () => {
        const user = await userById(userId, (error) => error.status === 404);
        if (!user?.email) return undefined;
        return toProviderUser(user, user.email);
      }),

    standing: (userId) =>
      guarded(async () => {
        // Only GoTrue's own "no such user" is one: a 404 from a SUPABASE_URL that is not the
        // project's would otherwise end the sessions of everyone who refreshes.
        const user = await userById(userId, (error) => error.code === 'user_not_found');
        if (!user) return 'gone';
        return bannedNow(user) ? 'banned' : 'active';
      }),

    setBanned: (userId, banned) =>
      guarded(async () => {
        if (!UUID.test(userId)) return;
        // About a hundred years: GoTrue has no "for ever"; "none" lifts it.
        const { error } = await admin.auth.admin.updateUserById(userId, {
          ban_duration: banned ? '876000h' : 'none',
        });
        // Gone from Supabase: nothing to ban there (a sign-in cannot bring them back either).
        if (error && error.status !== 404) throw unavailable(error);
      }),

    deleteUser: (userId) =>
      guarded(async () => {
        // auth-js throws a plain Error for a non-UUID id; no Supabase user can have one anyway.
        if (!UUID.test(userId)) return;
        const { error } = await admin.auth.admin.deleteUser(userId);
        if (error && error.status !== 404) throw unavailable(error);
      }),
  };
}
