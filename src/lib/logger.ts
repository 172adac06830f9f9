import type { FastifyBaseLogger } from 'fastify';
import pino, { type Logger } from 'pino';

/** Paths pino blanks out wherever they appear in a logged object (ASVS 16.2.5). */
export const REDACTED_PATHS = [
  'req.headers.authorization',
  'req.headers["x-api-key"]',
  'req.headers.cookie',
  'headers.authorization',
  'headers["x-api-key"]',
  '*.password',
  '*.current_password',
  '*.new_password',
  '*.refresh_token',
  '*.access_token',
  '*.client_secret',
  '*.token',
  '*.key',
  '*.secret',
  'password',
  'token',
  'secret',
];

/**
 * Query parameters whose values are never logged: tokens, secrets, passwords, keys, codes — anywhere
 * in the name (`access_token`, `api%5Fkey`, `clientSecret`).
 */
const SENSITIVE_NAME =
  /token|secret|passw|passphrase|pwd|key|code|assertion|credential|auth|bearer|signature|session|jwt|cookie/i;

/**
 * Short credential names, as a word of the parameter's name (`pin`, `user_pin`, `userPin`, `otp`,
 * `pass`, `sig`) rather than inside another word (`shipping`, `footprint`, `compass`). Read on the
 * name lower-cased with its camelCase humps split.
 */
const SENSITIVE_WORD = /(?:^|[^a-z])(?:pass|pin|otp|totp|mfa|sig)(?:[^a-z]|$)/;

/**
 * Query parameters whose values are personal data, never logged either: a search (`GET /v1/users?query=`
 * is a part of an email address), an address (`mail` anywhere in the name: `email`, `e-mail`,
 * `userEmail`), a login, a name or a phone number. The others are read as words of the name, as
 * SENSITIVE_WORD is (`search_term`, `displayName`, `q`; not `filename`, `technique`, `frequency`).
 */
const PERSONAL_NAME = /mail/;
const PERSONAL_WORD =
  /(?:^|[^a-z])(?:q|query|search|filter|term|keywords?|login|username|name|phone|tel|mobile)(?:[^a-z]|$)/;

/**
 * Values that are credentials whatever their parameter is called, anywhere in the value once decoded:
 * a JWT (a word starting `eyJ`, `{"` in base64url: `Bearer eyJ…`, `{"t":"eyJ…"}`), a secret of this
 * service (`pak_` API keys, `prt_` refresh tokens, `pcs_` client secrets, and the mailed links' and
 * sign-ins' tokens: `prs_`, `pec_`, `pce_`, `pml_`, `pmf_`), or a bearer credential (`Bearer …`).
 */
const JWT_WORD = /(?<![A-Za-z0-9])eyJ/;
const SECRET_WORD = /(?<![A-Za-z0-9])(?:pak|prt|pcs|prs|pec|pce|pml|pmf)_|^\s*bearer\s/i;

/** `text` percent-decoded (and `+` as a space) until nothing changes, at most three times. */
function decoded(text: string): string {
  let value = text;
  for (let i = 0; i < 3 && value.includes('%'); i++) {
    try {
      value = decodeURIComponent(value.replace(/\+/g, ' '));
    } catch {
      break;
    }
  }
  return value.replace(/\+/g, ' ');
}

const looksLikeCredential = (raw: string) => {
  if (raw === '') return false;
  const value = decoded(raw);
  return JWT_WORD.test(value) || SECRET_WORD.test(value) || JWT_WORD.test(raw) || SECRET_WORD.test(raw);
};

/** An email address, or a part of one (`alice@`, `@example.com`): an `@` anywhere once decoded. */
const looksLikeEmail = (raw: string) => raw.includes('@') || decoded(raw).includes('@');

/** A name's words, lower-cased with its camelCase humps split (`userPin` → `user pin`). */
const wordsOf = (name: string) => name.replace(/([a-z0-9])([A-Z])/g, '$1 $2').toLowerCase();

const namedLikeCredential = (raw: string) => {
  const name = decoded(raw);
  return SENSITIVE_NAME.test(name) || SENSITIVE_WORD.test(wordsOf(name));
};

const namedLikePersonalData = (raw: string) => {
  const words = wordsOf(decoded(raw));
  return PERSONAL_NAME.test(words) || PERSONAL_WORD.test(words);
};

/** What a parameter's value, or a bare parameter, must not be logged as: a credential or an address. */
const mayNotBeLogged = (raw: string) => looksLikeCredential(raw) || looksLikeEmail(raw);

/**
 * A request URL as it may be logged: the value of every query parameter named like a credential or
 * like personal data (a search, an email address, a login, a name), or looking like a credential or
 * an email address, is `[redacted]`, and so is a bare parameter (no `=`) that looks like one.
 * Credentials belong in headers or bodies, and the service refuses them in the query, but a client
 * that sends `?access_token=…` anyway must not leave a live token in the logs; and the users' search
 * (`?query=`, a part of an address) must not leave who was looked for.
 */
export function loggableUrl(url: string): string {
  const query = url.indexOf('?');
  if (query < 0) return url;
  // Each parameter, between `&` or `;` (which some parsers take as a separator too), kept as sent.
  const parameters = url.slice(query + 1).replace(/[^&;]+/g, (parameter) => {
    const equals = parameter.indexOf('=');
    // A bare parameter is a value without a name (`?eyJ…`, as some clients send a token).
    if (equals < 0) return mayNotBeLogged(parameter) ? '[redacted]' : parameter;
    const name = parameter.slice(0, equals);
    // A name that is itself a credential or an address: nothing of it is kept.
    if (mayNotBeLogged(name)) return '[redacted]';
    const value = parameter.slice(equals + 1);
    return namedLikeCredential(name) || namedLikePersonalData(name) || mayNotBeLogged(value)
      ? `${name}=[redacted]`
      : parameter;
  });
  return `${url.slice(0, query)}?${parameters}`;
}

/** Fastify's request serializer (method, url, host, address, port), with the URL made loggable. */
function serializeRequest(request: {
  method?: string;
  url?: string;
  host?: string;
  ip?: string;
  socket?: { remotePort?: number | undefined } | null;
}) {
  return {
    method: request.method,
    url: typeof request.url === 'string' ? loggableUrl(request.url) : request.url,
    host: request.host,
    remoteAddress: request.ip,
    remotePort: request.socket?.remotePort,
  };
}

/** JSON logs to stdout (or `destination`, e.g. a test's capture stream), with secrets redacted. */
export function createLogger(level: string, destination?: pino.DestinationStream): Logger {
  const options = {
    level,
    redact: { paths: REDACTED_PATHS, censor: '[redacted]' },
    serializers: { req: serializeRequest },
  };
  return destination ? pino(options, destination) : pino(options);
}

type Level = 'fatal' | 'error' | 'warn' | 'info' | 'debug' | 'trace';

/**
 * Fastify's per-request logger, made on first use: pino's `child()` serializes the bindings through
 * the redaction on every request (~2.5 µs, a twentieth of a JWKS answer), while most requests log
 * nothing at `warn`. A call at a level the parent would drop returns at once; anything else gets the
 * real child, with the same bindings (the request id), made once. One object per request, methods on
 * the prototype, like pino's own.
 */
class LazyChildLogger implements FastifyBaseLogger {
  #child: Logger | undefined;
  constructor(
    private readonly parent: Logger,
    private readonly bindings: pino.Bindings,
    private readonly options: pino.ChildLoggerOptions,
  ) {}
  private real(): Logger {
    this.#child ??= this.parent.child(this.bindings, this.options);
    return this.#child;
  }
  private log(level: Level, args: Parameters<pino.LogFn>) {
    if (this.#child) this.#child[level](...args);
    else if (this.parent.isLevelEnabled(level)) this.real()[level](...args);
  }
  get level(): string {
    return this.#child ? this.#child.level : this.parent.level;
  }
  set level(value: string) {
    this.real().level = value;
  }
  fatal(...args: Parameters<pino.LogFn>) {
    this.log('fatal', args);
  }
  error(...args: Parameters<pino.LogFn>) {
    this.log('error', args);
  }
  warn(...args: Parameters<pino.LogFn>) {
    this.log('warn', args);
  }
  info(...args: Parameters<pino.LogFn>) {
    this.log('info', args);
  }
  debug(...args: Parameters<pino.LogFn>) {
    this.log('debug', args);
  }
  trace(...args: Parameters<pino.LogFn>) {
    this.log('trace', args);
  }
  silent() {}
  child(bindings: pino.Bindings, options?: pino.ChildLoggerOptions): FastifyBaseLogger {
    return this.real().child(bindings, options);
  }
}

export function lazyChildLogger(
  parent: Logger,
  bindings: pino.Bindings,
  options: pino.ChildLoggerOptions,
): FastifyBaseLogger {
  return new LazyChildLogger(parent, bindings, options);
}
