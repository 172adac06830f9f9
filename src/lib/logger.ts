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

/** Query parameters whose values are never logged: tokens, secrets, passwords, keys, codes. */
const SENSITIVE_PARAMETER = /token|secret|passw|key|code|assertion|credential|auth|signature|session|jwt/i;

/**
 * Values that are credentials whatever their parameter is called: a JWT (`eyJ…`, also
 * percent-encoded) or a secret of this service (`pak_` API keys, `prt_` refresh tokens, `pcs_` client
 * secrets, and the mailed links' and sign-ins' tokens: `prs_`, `pec_`, `pce_`, `pml_`, `pmf_`).
 */
const CREDENTIAL_VALUE = /^(?:eyJ|ey%4A|pak_|prt_|pcs_|prs_|pec_|pce_|pml_|pmf_)/i;

/**
 * A request URL as it may be logged: the value of every query parameter named like a credential is
 * `[redacted]`. Credentials belong in headers or bodies, and the service refuses them in the query,
 * but a client that sends `?access_token=…` anyway must not leave a live token in the logs.
 */
export function loggableUrl(url: string): string {
  const query = url.indexOf('?');
  if (query < 0) return url;
  // Each `name=value`, between `&` or `;` (which some parsers take as a separator too), kept as sent.
  const parameters = url
    .slice(query + 1)
    .replace(/([^&;=]*)=([^&;]*)/g, (whole, raw: string, value: string) => {
      let name: string;
      try {
        name = decodeURIComponent(raw.replace(/\+/g, ' '));
      } catch {
        name = raw;
      }
      return SENSITIVE_PARAMETER.test(name) || CREDENTIAL_VALUE.test(value) ? `${raw}=[redacted]` : whole;
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
