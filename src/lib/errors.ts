/**
 * The one catalogue of error codes. Every error a client can see is an AppError with one of these
 * codes; the error handler renders it as RFC 9457 problem+json (or RFC 6749 JSON under /oauth).
 */
export const ERROR_CATALOGUE = {
  validation_failed: { status: 400, title: 'The request is not valid' },
  invalid_json: { status: 400, title: 'The body is not valid JSON' },
  bad_request: { status: 400, title: 'Bad request' },
  invalid_reset_token: { status: 400, title: 'The password reset token is invalid, expired or used' },
  invalid_magic_link: { status: 400, title: 'The sign-in link is invalid, expired or used' },
  invalid_confirmation_token: {
    status: 400,
    title: 'The email confirmation token is invalid, expired or used',
  },
  invalid_email_change_token: { status: 400, title: 'The email change token is invalid, expired or used' },
  invalid_mfa_code: { status: 400, title: 'The verification code is incorrect, expired or used' },
  // Not a 401: the request's credential is good, and a 401 tells clients to sign in again (RFC 9110
  // §15.5.2: a 401 carries a challenge the credential failed).
  incorrect_password: { status: 400, title: 'The password given to confirm this is incorrect' },
  authentication_required: { status: 401, title: 'Authentication is required' },
  invalid_token: { status: 401, title: 'The token is invalid, expired or revoked' },
  invalid_credentials: { status: 401, title: 'Invalid email or password' },
  invalid_refresh_token: { status: 401, title: 'The refresh token is invalid, expired or revoked' },
  invalid_client: { status: 401, title: 'Client authentication failed' },
  invalid_mfa_token: { status: 401, title: 'The sign-in challenge is invalid, expired or used' },
  forbidden: { status: 403, title: 'The principal lacks a permission this needs' },
  registration_closed: { status: 403, title: 'Sign-up is closed' },
  email_not_confirmed: { status: 403, title: 'The email address is not confirmed yet' },
  mfa_required: { status: 403, title: 'A second factor is needed to finish signing in' },
  // Supabase: the user has a second factor there, and it grants a session that has not given it (aal1)
  // neither a password change nor a sign-in here (a password login, an exchange of an aal1 token).
  provider_mfa_required: {
    status: 403,
    title: 'The identity provider asks for a second factor first',
  },
  not_found: { status: 404, title: 'Not found' },
  method_not_allowed: { status: 405, title: 'Method not allowed' },
  request_timeout: { status: 408, title: 'The request took too long to arrive' },
  conflict: { status: 409, title: 'Conflict' },
  email_taken: { status: 409, title: 'An account with this email exists' },
  account_conflict: {
    status: 409,
    title: 'The identity provider and this service disagree about this account',
  },
  last_admin: { status: 409, title: 'The last admin cannot lose the admin role' },
  rotation_in_progress: { status: 409, title: 'The previous secret is still in its grace period' },
  rotation_too_soon: { status: 409, title: 'The next signing key has not been published long enough' },
  precondition_failed: { status: 412, title: 'A precondition of the request is not met' },
  payload_too_large: { status: 413, title: 'The body is too large' },
  uri_too_long: { status: 414, title: 'The URI is too long' },
  unsupported_media_type: { status: 415, title: 'Unsupported content type' },
  range_not_satisfiable: { status: 416, title: 'The requested range is not satisfiable' },
  expectation_failed: { status: 417, title: 'The expectation cannot be met' },
  headers_too_large: { status: 431, title: 'The request headers are too large' },
  weak_password: { status: 422, title: 'The password is too weak' },
  unprocessable: { status: 422, title: 'The request cannot be processed' },
  rate_limited: { status: 429, title: 'Too many requests' },
  internal_error: { status: 500, title: 'Internal server error' },
  service_unavailable: { status: 503, title: 'The service is temporarily unavailable' },
  provider_unavailable: { status: 503, title: 'The identity provider is unavailable' },
  overloaded: { status: 503, title: 'The service is overloaded; retry later' },
} as const satisfies Record<string, { status: number; title: string }>;

export type ErrorCode = keyof typeof ERROR_CATALOGUE;

export interface FieldError {
  /** JSON pointer-ish path of the bad field, e.g. `body.email`. */
  field: string;
  message: string;
}

export interface AppErrorOptions {
  detail?: string;
  errors?: FieldError[];
  headers?: Record<string, string>;
  cause?: unknown;
  /** Overrides the catalogue status, e.g. 202-less flows never need it; used sparingly. */
  status?: number;
  /** RFC 6749 error for the OAuth renderer when it differs from the default mapping. */
  oauthError?: string;
  /** RFC 9457 §3.2 extension members of the problem (e.g. `mfa_token`), beside the standard ones. */
  extensions?: Record<string, unknown>;
}

export class AppError extends Error {
  readonly code: ErrorCode;
  readonly status: number;
  readonly title: string;
  readonly detail: string;
  readonly errors: FieldError[] | undefined;
  readonly headers: Record<string, string>;
  readonly oauthError: string | undefined;
  readonly extensions: Record<string, unknown> | undefined;
  /**
   * Set by whoever wrote this refusal's audit event (a 403's `authorization.denied`), so the app's
   * onError hook, which audits every other 403, does not write a second one.
   */
  audited = false;
  /**
   * Set on a 404 that answers for something that exists but is another's (ASVS V8: answered as a
   * missing one, so existence is not revealed): the app's onError hook writes its
   * `authorization.denied` event once the request has failed, outside any transaction it rolled back.
   */
  concealed: ConcealedDenial | undefined = undefined;

  constructor(code: ErrorCode, options: AppErrorOptions = {}) {
    const entry = ERROR_CATALOGUE[code];
    super(options.detail ?? entry.title, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'AppError';
    this.code = code;
    this.status = options.status ?? entry.status;
    this.title = entry.title;
    this.detail = options.detail ?? entry.title;
    this.errors = options.errors;
    this.headers = options.headers ?? {};
    this.oauthError = options.oauthError;
    this.extensions = options.extensions;
  }
}

export const isAppError = (err: unknown): err is AppError => err instanceof AppError;

/** The 400 of a request with bad fields, each named in `errors` (API.md). */
export const invalidFields = (errors: FieldError[]) =>
  new AppError('validation_failed', { detail: 'One or more fields are invalid', errors });

export const notFound = (what = 'resource') =>
  new AppError('not_found', { detail: `The ${what} does not exist` });
/**
 * What a 404 hid: the caller asked for something of another's they may not see. Written as an
 * `authorization.denied` event (`reason: not_owner`); the answer stays the missing one's.
 */
export interface ConcealedDenial {
  /** e.g. `api_key.read`, `client.update`, `session.end`. */
  action: string;
  /** The resource's id as the audit log names it (a key's or client's UUID, a user's for a profile). */
  subjectId: string;
  /** What else identifies it (its owner), never a secret. */
  data?: Record<string, unknown> | undefined;
}

/**
 * The 404 of something that exists but is another's: the same answer as `notFound(what)`, byte for
 * byte, and no other work than the audit event's insert.
 */
export const notYours = (what: string, denial: ConcealedDenial) => {
  const error = notFound(what);
  error.concealed = denial;
  return error;
};
export const forbidden = (detail?: string) => new AppError('forbidden', detail ? { detail } : {});

const TRANSIENT_PG_CODES = new Set([
  '57P01', // admin_shutdown (backend terminated)
  '57P02', // crash_shutdown
  '57P03', // cannot_connect_now
  '57014', // query_canceled (statement_timeout)
  '55P03', // lock_not_available (lock_timeout)
  '25P03', // idle_in_transaction_session_timeout
  '25P04', // transaction_timeout (PostgreSQL 17; DB_TRANSACTION_TIMEOUT_MS, src/db/pg-transaction-fix.ts)
  '53300', // too_many_connections
  '53000', // insufficient_resources
  '53100', // disk_full
  '53200', // out_of_memory
  '55000', // object_not_in_prerequisite_state (e.g. the database does not allow connections)
  '57P04', // database_dropped
  '3D000', // invalid_catalog_name (the database does not exist)
  '28000', // invalid_authorization_specification (the service's own login refused)
  '28P01', // invalid_password (the service's own password refused)
  '40001', // serialization_failure
  '40P01', // deadlock_detected
]);

/** True for failures of the database itself (down, restarting, timing out), not of the query. */
export function isDatabaseUnavailable(err: unknown): boolean {
  let cur: unknown = err;
  for (let depth = 0; cur && depth < 5; depth++) {
    const e = cur as { code?: unknown; message?: unknown; cause?: unknown; syscall?: unknown };
    const code = typeof e.code === 'string' ? e.code : '';
    if (TRANSIENT_PG_CODES.has(code) || code.startsWith('08')) return true;
    const message = typeof e.message === 'string' ? e.message : '';
    // An HTTP request whose client went away before its body arrived is an ECONNRESET too (Node's
    // 'aborted', of no system call), not the database's: a reset of the database's connection is a
    // socket call's ('read ECONNRESET') or a TLS handshake cut short.
    const clientAborted = code === 'ECONNRESET' && message === 'aborted' && e.syscall === undefined;
    if (
      ['ECONNREFUSED', 'ECONNRESET', 'ETIMEDOUT', 'EPIPE', 'ENOTFOUND', 'EHOSTUNREACH'].includes(code) &&
      !clientAborted
    )
      return true;
    if (
      /Connection terminated|connection timeout|timeout exceeded when trying to connect|Query read timeout|Client has encountered a connection error|Connection ended|the database system is (starting up|shutting down|in recovery)|terminating connection|Cannot use a pool after calling end/i.test(
        message,
      )
    )
      return true;
    cur = e.cause;
  }
  return false;
}

/** The PostgreSQL SQLSTATE of a driver error, looking through Drizzle's wrapping. */
export function pgErrorCode(err: unknown): string | undefined {
  let cur: unknown = err;
  for (let depth = 0; cur && depth < 5; depth++) {
    const e = cur as { code?: unknown; cause?: unknown };
    if (typeof e.code === 'string' && /^[0-9A-Z]{5}$/.test(e.code)) return e.code;
    cur = e.cause;
  }
  return undefined;
}
