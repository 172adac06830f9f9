import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { isIP } from 'node:net';
import { availableParallelism } from 'node:os';
import { join, resolve } from 'node:path';
import { z } from 'zod';
import { checkPasswordStrength } from './identity/passwords.js';
import { AppError } from './lib/errors.js';
import { EmailSchema } from './modules/auth/auth.schema.js';

const bool = z
  .enum(['true', 'false', '1', '0', 'yes', 'no'], { message: 'expected true or false' })
  .transform((v) => v === 'true' || v === '1' || v === 'yes');

/**
 * A whole number of `min` to `max` in decimal digits, or undefined when unset or empty (`PORT=` in an
 * env file means the default, not 0). `0x1F40`, `1e3` and `1.5` are refused, as they are for `?limit=`.
 */
const optionalWholeNumber = (min: number, max: number) =>
  z
    .string()
    .optional()
    .transform((value, ctx): number | undefined => {
      const text = value?.trim() ?? '';
      if (text === '') return undefined;
      const n = /^\d{1,15}$/.test(text) ? Number(text) : Number.NaN;
      if (n >= min && n <= max) return n;
      ctx.addIssue({
        code: 'custom',
        message: `must be a whole number from ${min} to ${max}, in decimal digits`,
      });
      return z.NEVER;
    });

/** The same, `fallback` when unset or empty. */
const wholeNumber = (min: number, max: number, fallback: number) =>
  optionalWholeNumber(min, max).transform((n): number => n ?? fallback);

const seconds = (fallback: number) => wholeNumber(1, 31_536_000, fallback);

const base64Key32 = z
  .string()
  .refine((v) => Buffer.from(v, 'base64').length === 32, { message: 'must be 32 bytes, base64-encoded' });

const postgresUrl = z.string().refine(
  (v) => {
    try {
      const url = new URL(v);
      return (
        (url.protocol === 'postgres:' || url.protocol === 'postgresql:') &&
        url.hostname !== '' &&
        // Without a database name libpq takes the user's (`postgres`): the service's tables would go
        // into whatever database that is.
        url.pathname.replace(/^\/+/, '') !== ''
      );
    } catch {
      return false;
    }
  },
  { message: 'must be a postgres:// or postgresql:// URL with a host and a database name' },
);

/**
 * An http(s) address the service publishes or calls: a host, and no user name or password (it would
 * go into tokens, discovery documents and logs), query or fragment (RFC 8414 §2: an issuer has
 * neither; a base URL with them has paths appended after them). `refuse` names a path that is wrong.
 */
const baseUrl = (refuse?: { path: RegExp; message: string }) =>
  z.string().superRefine((v, ctx) => {
    let url: URL;
    try {
      url = new URL(v);
    } catch {
      ctx.addIssue({ code: 'custom', message: 'must be an http:// or https:// URL' });
      return;
    }
    const problem =
      url.protocol !== 'http:' && url.protocol !== 'https:'
        ? 'must be an http:// or https:// URL'
        : url.hostname === ''
          ? 'must name a host'
          : url.username || url.password
            ? 'must not hold a user name or password'
            : url.search || url.hash || v.includes('?') || v.includes('#')
              ? 'must not have a query or a fragment'
              : refuse?.path.test(url.pathname)
                ? refuse.message
                : undefined;
    if (problem) ctx.addIssue({ code: 'custom', message: problem });
  });

/** A host name or an IP address to listen on. */
const HOST_NAME =
  /^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$/;

const optionalString = z
  .string()
  .optional()
  .transform((v) => (v === undefined || v.trim() === '' ? undefined : v));

/**
 * The frontend page a mailed link opens (tokenLink): an http(s) URL; a fragment (a hash-routed page)
 * is kept and the token added to it, so it must not carry a `token` parameter of its own already.
 */
const linkPage = optionalString.pipe(
  z
    .url({ protocol: /^https?$/ })
    .refine((v) => !/(^|[?&])token=/.test(URL.parse(v)?.hash.slice(1) ?? ''), {
      message: 'must not have a token parameter in its fragment: the service adds the token there',
    })
    .optional(),
);

const EnvSchema = z.object({
  NODE_ENV: z.enum(['development', 'production', 'test']).default('development'),
  PORT: wholeNumber(1, 65535, 8000),
  HOST: z
    .string()
    .min(1)
    .refine((v) => isIP(v) !== 0 || HOST_NAME.test(v), { message: 'must be a host name or an IP address' })
    .default('0.0.0.0'),
  PUBLIC_URL: optionalString.pipe(baseUrl().optional()),
  DATABASE_URL: optionalString.pipe(postgresUrl.optional()),
  DATA_DIR: z.string().min(1).default('.data'),
  AUTH_PROVIDER: optionalString.pipe(z.enum(['local', 'supabase']).optional()),
  SUPABASE_URL: optionalString.pipe(
    baseUrl({
      path: /\/(?:auth|rest)\/v1\/?$/,
      message: 'is the project URL (https://<project>.supabase.co), without /auth/v1',
    }).optional(),
  ),
  SUPABASE_ANON_KEY: optionalString,
  SUPABASE_SERVICE_ROLE_KEY: optionalString,
  SUPABASE_TIMEOUT_MS: wholeNumber(100, 60_000, 5000),
  SUPABASE_USER_RECHECK_SECONDS: wholeNumber(0, 86_400, 300),
  KEY_ENCRYPTION_KEY: optionalString.pipe(base64Key32.optional()),
  SECRET_PEPPER: optionalString.pipe(base64Key32.optional()),
  SIGNING_ALG: z.enum(['ES256', 'EdDSA']).default('ES256'),
  REDIS_URL: optionalString.pipe(
    z
      .url({ protocol: /^rediss?$/ })
      .refine((v) => URL.parse(v)?.hostname !== '', { message: 'must name a host' })
      .optional(),
  ),
  RATE_LIMIT_ENABLED: bool.default(true),
  LOGIN_MAX_FAILURES_PER_HOUR: wholeNumber(1, 100, 20),
  ACCESS_TOKEN_TTL: seconds(900),
  REFRESH_TOKEN_IDLE_TTL: seconds(2_592_000),
  REFRESH_TOKEN_ABSOLUTE_TTL: seconds(7_776_000),
  REFRESH_REUSE_GRACE_SECONDS: wholeNumber(0, 10, 10),
  MAX_SESSIONS_PER_USER: wholeNumber(1, 10_000, 100),
  MAX_API_KEYS_PER_USER: wholeNumber(1, 10_000, 100),
  MAX_CLIENTS_PER_USER: wholeNumber(1, 10_000, 100),
  // The address rule of registration and sign-in: an admin made with one they refuse could never sign in.
  BOOTSTRAP_ADMIN_EMAIL: optionalString.pipe(EmailSchema.optional()),
  BOOTSTRAP_ADMIN_PASSWORD: optionalString,
  LOG_LEVEL: z.enum(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent']).default('info'),
  METRICS_TOKEN: optionalString.pipe(
    z
      .string()
      .regex(/^[A-Za-z0-9._~+/-]{16,256}={0,2}$/, {
        message:
          'must be a bearer token of 16 to 256 letters, digits and - . _ ~ + /, and up to two = at the end (e.g. `openssl rand -hex 32`)',
      })
      .optional(),
  ),
  CORS_ORIGINS: z.string().default(''),
  TRUST_PROXY: z.string().default(''),
  BODY_LIMIT: wholeNumber(1024, 10_485_760, 65_536),
  REQUEST_TIMEOUT_MS: wholeNumber(1000, 600_000, 30_000),
  SESSION_RETENTION_DAYS: wholeNumber(0, 3650, 7),
  AUDIT_RETENTION_DAYS: wholeNumber(0, 36_500, 0),
  DB_POOL_MAX: wholeNumber(1, 200, 10),
  DB_CONNECT_TIMEOUT_MS: wholeNumber(100, 60_000, 2000),
  DB_STATEMENT_TIMEOUT_MS: wholeNumber(100, 600_000, 5000),
  DB_TRANSACTION_TIMEOUT_MS: wholeNumber(1000, 600_000, 15_000),
  DB_MIGRATION_LOCK_TIMEOUT_MS: wholeNumber(100, 600_000, 5000),
  DB_MIGRATION_STATEMENT_TIMEOUT_MS: wholeNumber(1000, 86_400_000, 600_000),
  DB_MIGRATION_RETRY_MS: wholeNumber(0, 3_600_000, 60_000),
  SHUTDOWN_TIMEOUT_MS: wholeNumber(100, 120_000, 9000),
  SHUTDOWN_DRAIN_MS: wholeNumber(0, 60_000, 0),
  PASSWORD_HASH_CONCURRENCY: optionalWholeNumber(1, 64),
  PASSWORD_HASH_QUEUE: wholeNumber(0, 10_000, 64),
  SMTP_URL: optionalString.pipe(z.url({ protocol: /^smtps?$/ }).optional()),
  MAIL_FROM: optionalString.pipe(
    z
      .string()
      .regex(/^[^\r\n]*[^\s@<>]+@[^\s@<>]+\.[^\s@<>]+>?$/, {
        message: 'must be an address, e.g. "Name <no-reply@example.com>"',
      })
      .optional(),
  ),
  SMTP_TIMEOUT_MS: wholeNumber(100, 60_000, 10_000),
  PASSWORD_RESET_URL: linkPage,
  PASSWORD_RESET_TTL: wholeNumber(60, 86_400, 1800),
  INVITATION_TTL: wholeNumber(3600, 2_592_000, 604_800),
  EMAIL_CONFIRMATION_URL: linkPage,
  EMAIL_CONFIRMATION_TTL: wholeNumber(300, 604_800, 86_400),
  REQUIRE_EMAIL_CONFIRMATION: bool.default(false),
  EMAIL_CHANGE_URL: linkPage,
  EMAIL_CHANGE_TTL: wholeNumber(300, 86_400, 3600),
  MAGIC_LINK_URL: linkPage,
  // 10 minutes: the longest ASVS gives an out-of-band authentication token (v4 2.7.2, 5.0 6.5.5).
  MAGIC_LINK_TTL: wholeNumber(60, 3600, 600),
  MFA_ISSUER: optionalString.pipe(
    z
      .string()
      .max(64)
      .refine((name) => !/[:\p{Cc}]/u.test(name), {
        message: 'must be a name without ":" or control characters',
      })
      .optional(),
  ),
  MFA_CHALLENGE_TTL: wholeNumber(60, 1800, 300),
  // 15 minutes: a set-up is confirmed with the app at hand, and a secret shown and never confirmed
  // is no standing invitation to whoever saw it.
  MFA_SETUP_TTL: wholeNumber(60, 86_400, 900),
  MFA_REQUIRED_ROLES: z.string().default(''),
});

type Issue = { path: string; message: string };

/** A comma-separated variable's entries, trimmed, empty ones dropped. */
const listOf = (value: string | undefined) =>
  (value ?? '')
    .split(',')
    .map((s) => s.trim())
    .filter(Boolean);

/**
 * What Fastify's trustProxy (proxy-addr) accepts in a list: an address, an address with a prefix
 * length or a netmask, or one of its named ranges. Checked here, so a typo is a configuration error
 * naming the variable rather than a stack trace after the database was opened.
 */
function isProxyAddress(entry: string): boolean {
  if (['loopback', 'linklocal', 'uniquelocal'].includes(entry)) return true;
  const [address = '', range, ...rest] = entry.split('/');
  const family = isIP(address);
  if (family === 0 || rest.length > 0) return false;
  if (range === undefined) return true;
  if (/^\d{1,3}$/.test(range)) return Number(range) <= (family === 4 ? 32 : 128);
  return family === 4 && isIP(range) === 4;
}

/** A browser origin as the Origin header carries it: scheme, host and port, nothing else. */
function isOrigin(entry: string): boolean {
  try {
    const url = new URL(entry);
    return (
      (url.protocol === 'http:' || url.protocol === 'https:') &&
      !entry.includes('*') &&
      url.pathname === '/' &&
      !url.search &&
      !url.hash &&
      !url.username &&
      !url.password &&
      !entry.endsWith('?') &&
      !entry.endsWith('#')
    );
  } catch {
    return false;
  }
}

/**
 * Rules across variables. They read the raw strings, so they still run (and are reported in the same
 * message) when other variables failed to parse.
 */
function crossChecks(env: NodeJS.ProcessEnv, needsSecrets: boolean): Issue[] {
  const issues: Issue[] = [];
  const set = (name: string) => (env[name] ?? '').trim() !== '';
  const secretsRequired = env.NODE_ENV === 'production' && needsSecrets;
  if (secretsRequired && !set('KEY_ENCRYPTION_KEY'))
    issues.push({ path: 'KEY_ENCRYPTION_KEY', message: 'is required in production' });
  if (secretsRequired && !set('SECRET_PEPPER'))
    issues.push({ path: 'SECRET_PEPPER', message: 'is required in production' });
  const provider = set('AUTH_PROVIDER') ? env.AUTH_PROVIDER : set('SUPABASE_URL') ? 'supabase' : 'local';
  if (provider === 'supabase') {
    // The service-role key too: without it a user deleted here stays in Supabase, and their next
    // sign-in would bring them back.
    for (const name of ['SUPABASE_URL', 'SUPABASE_ANON_KEY', 'SUPABASE_SERVICE_ROLE_KEY'])
      if (!set(name)) issues.push({ path: name, message: 'is required when AUTH_PROVIDER=supabase' });
  }
  const requireConfirmation = ['true', '1', 'yes'].includes((env.REQUIRE_EMAIL_CONFIRMATION ?? '').trim());
  if (requireConfirmation && provider === 'supabase')
    issues.push({
      path: 'REQUIRE_EMAIL_CONFIRMATION',
      message:
        'applies to the built-in provider: with Supabase, the project\'s "Confirm email" setting decides',
    });
  else if (requireConfirmation && env.NODE_ENV === 'production' && !set('SMTP_URL'))
    issues.push({
      path: 'REQUIRE_EMAIL_CONFIRMATION',
      message: 'needs SMTP_URL: without mail, nobody could confirm an address, nor sign in',
    });
  if (set('SMTP_URL') && !set('MAIL_FROM'))
    issues.push({ path: 'MAIL_FROM', message: 'is required with SMTP_URL' });
  if (set('BOOTSTRAP_ADMIN_EMAIL') && !set('BOOTSTRAP_ADMIN_PASSWORD') && provider === 'local')
    issues.push({ path: 'BOOTSTRAP_ADMIN_PASSWORD', message: 'is required with BOOTSTRAP_ADMIN_EMAIL' });
  // Alone it would be ignored, and the operator left to wonder why no administrator appeared.
  if (set('BOOTSTRAP_ADMIN_PASSWORD') && !set('BOOTSTRAP_ADMIN_EMAIL'))
    issues.push({ path: 'BOOTSTRAP_ADMIN_EMAIL', message: 'is required with BOOTSTRAP_ADMIN_PASSWORD' });
  // The password rules a registration meets, at start rather than as a stack trace after migrating.
  if (set('BOOTSTRAP_ADMIN_PASSWORD')) {
    try {
      checkPasswordStrength(env.BOOTSTRAP_ADMIN_PASSWORD!, env.BOOTSTRAP_ADMIN_EMAIL?.trim().toLowerCase());
    } catch (err) {
      // Only the password rules' refusal is the password's fault; a list of common passwords that
      // cannot be read says so itself.
      if (!(err instanceof AppError)) throw err;
      issues.push({
        path: 'BOOTSTRAP_ADMIN_PASSWORD',
        message: err.detail ?? 'is not an acceptable password',
      });
    }
  }
  const proxies = listOf(env.TRUST_PROXY);
  for (const entry of proxies)
    if (/^\d+$/.test(entry))
      issues.push({
        path: 'TRUST_PROXY',
        message:
          `"${entry}" is a hop count, which Fastify no longer honours (5.12.1: a client reaching the ` +
          'service directly could forge the hops); name the load balancer by its address or range ' +
          '(its subnet, or uniquelocal for a private network)',
      });
    else if (!['true', 'false'].includes(entry) && !isProxyAddress(entry))
      issues.push({
        path: 'TRUST_PROXY',
        message: `"${entry}" is not an IP address, a CIDR range, loopback, linklocal or uniquelocal`,
      });
  if (proxies.length > 1 && proxies.some((e) => e === 'true' || e === 'false'))
    issues.push({ path: 'TRUST_PROXY', message: 'is true, false, or a list of addresses, not a mix' });
  for (const entry of listOf(env.MFA_REQUIRED_ROLES))
    if (!/^[a-z][a-z0-9_-]{1,49}$/.test(entry))
      issues.push({ path: 'MFA_REQUIRED_ROLES', message: `"${entry}" is not a role name` });
    else if (entry === 'user')
      issues.push({
        path: 'MFA_REQUIRED_ROLES',
        message: 'cannot name "user": a session without a second factor needs it to set one up',
      });
  for (const entry of listOf(env.CORS_ORIGINS))
    if (!isOrigin(entry))
      issues.push({
        path: 'CORS_ORIGINS',
        message:
          entry === '*'
            ? 'must list the origins: * is refused, since browsers are allowed to send credentials'
            : entry.includes('*')
              ? `"${entry}" has a wildcard: list each origin (scheme://host[:port])`
              : `"${entry}" is not an origin (scheme://host[:port], no path)`,
      });
  // As the schema reads them: empty or unset is the default (malformed ones are the schema's to name).
  const numberOr = (raw: string | undefined, fallback: number) =>
    raw === undefined || raw.trim() === '' ? fallback : Number(raw.trim());
  const idle = numberOr(env.REFRESH_TOKEN_IDLE_TTL, 2_592_000);
  const absolute = numberOr(env.REFRESH_TOKEN_ABSOLUTE_TTL, 7_776_000);
  if (idle > absolute)
    issues.push({ path: 'REFRESH_TOKEN_IDLE_TTL', message: 'must not exceed REFRESH_TOKEN_ABSOLUTE_TTL' });
  // The drain comes out of the shutdown timeout: leave at least a second for the requests in flight.
  const drain = numberOr(env.SHUTDOWN_DRAIN_MS, 0);
  const timeout = numberOr(env.SHUTDOWN_TIMEOUT_MS, 9000);
  if (drain > 0 && drain > timeout - 1000)
    issues.push({
      path: 'SHUTDOWN_DRAIN_MS',
      message: 'must be at least 1000 less than SHUTDOWN_TIMEOUT_MS',
    });
  return issues;
}

/** libuv's thread pool size as Node reads it: UV_THREADPOOL_SIZE, 4 when unset or not a number. */
function threadPoolSize(raw: string | undefined): number {
  const n = Number.parseInt(raw ?? '', 10);
  return n >= 1 ? Math.min(n, 1024) : 4;
}

/**
 * Concurrent argon2 hashes by default: every core but one, and every libuv pool thread but one. A hash
 * keeps a core busy for ~17 ms, and the rest of a login (its database round trips, in the service and
 * in PostgreSQL) costs a third of that again. With as many hashes as cores, that work and every other
 * request compete with argon2 for every core: logins reach ~0.75× what the hashing alone could do
 * (measured on 2 cores) and the hot paths' latency suffers while they run. With one core left to
 * them, logins run at the hashing capacity, the excess queues and is shed with 503, and the hot paths
 * keep their latency (README "Performance"). The free pool thread is for what else runs there:
 * WebCrypto (jose's signature checks of new tokens), DNS lookups, fs.
 */
export function defaultHashConcurrency(cores: number, threadPool: number): number {
  return Math.max(1, Math.min(cores - 1, threadPool - 1));
}

export class ConfigError extends Error {
  constructor(readonly problems: string[]) {
    super(`Invalid configuration:\n${problems.map((p) => `  - ${p}`).join('\n')}`);
    this.name = 'ConfigError';
  }
}

export interface Config {
  readonly env: 'development' | 'production' | 'test';
  readonly port: number;
  readonly host: string;
  readonly publicUrl: string;
  /** False when PUBLIC_URL was not set and `publicUrl` is the development default (a warning in production). */
  readonly publicUrlSet: boolean;
  /** The `iss` claim and the discovery issuer: PUBLIC_URL without a trailing slash. */
  readonly issuer: string;
  readonly databaseUrl: string | undefined;
  readonly dataDir: string;
  readonly authProvider: 'local' | 'supabase';
  readonly supabase:
    | {
        url: string;
        anonKey: string;
        serviceRoleKey: string;
        timeoutMs: number;
        /**
         * SUPABASE_USER_RECHECK_SECONDS: a refresh asks Supabase about its user (banned, deleted?) when
         * it has not confirmed them for this long; 0: at every refresh.
         */
        userRecheckSeconds: number;
      }
    | undefined;
  readonly keyEncryptionKey: Buffer;
  readonly secretPepper: Buffer;
  readonly signingAlg: 'ES256' | 'EdDSA';
  readonly redisUrl: string | undefined;
  readonly rateLimit: { enabled: boolean; maxLoginFailuresPerHour: number };
  readonly tokens: {
    accessTtl: number;
    refreshIdleTtl: number;
    refreshAbsoluteTtl: number;
    reuseGraceSeconds: number;
    /** The longest lifetime any access token may have (per-client lifetimes are capped to it). */
    maxAccessTtl: number;
  };
  /**
   * The most live sessions a user has (MAX_SESSIONS_PER_USER): a sign-in beyond it ends their least
   * recently used ones.
   */
  readonly sessions: { maxPerUser: number };
  /**
   * The most live (unrevoked, unexpired) API keys a user owns (MAX_API_KEYS_PER_USER): a creation
   * beyond it is refused (409).
   */
  readonly apiKeys: { maxPerUser: number };
  /**
   * The most app clients registered by (or on behalf of) one user, active or disabled
   * (MAX_CLIENTS_PER_USER): a registration beyond it is refused (409).
   */
  readonly clients: { maxPerUser: number };
  readonly bootstrapAdmin: { email: string; password: string | undefined } | undefined;
  readonly logLevel: string;
  /** The bearer token GET /metrics asks for; undefined: it answers anyone (a warning in production). */
  readonly metricsToken: string | undefined;
  readonly corsOrigins: string[];
  readonly trustProxy: boolean | string[];
  readonly bodyLimit: number;
  /** Longest a client may take to send a whole request (headers and body) before a 408. */
  readonly requestTimeoutMs: number;
  /** Days ended sessions and (when above 0) audit events are kept before housekeeping deletes them. */
  readonly retention: { sessionRetentionDays: number; auditRetentionDays: number };
  readonly db: {
    poolMax: number;
    connectTimeoutMs: number;
    statementTimeoutMs: number;
    /** A transaction still open this long after its BEGIN is rolled back instead of committed. */
    transactionTimeoutMs: number;
    /** The migration connection's lock and statement timeouts, and how long lock conflicts are retried. */
    migrations: {
      lockTimeoutMs: number;
      statementTimeoutMs: number;
      retryBudgetMs: number;
      connectTimeoutMs: number;
    };
  };
  readonly shutdownTimeoutMs: number;
  /** After SIGTERM: not ready, still serving, for this long, before the listener closes. */
  readonly shutdownDrainMs: number;
  readonly passwordHashing: { concurrency: number; queue: number };
  /** The SMTP server the built-in provider's mail (password reset links) goes through. */
  readonly mail: { smtpUrl: string; from: string; timeoutMs: number } | undefined;
  /** The page a reset link opens (the token follows in its fragment), and the link's lifetime. */
  readonly passwordReset: { url: string | undefined; ttlSeconds: number; invitationTtlSeconds: number };
  /**
   * Built-in provider: the page a confirmation link opens, the link's lifetime, and whether sign-in
   * waits for the address to be confirmed.
   */
  readonly emailConfirmation: { url: string | undefined; ttlSeconds: number; required: boolean };
  /** Built-in provider: the page an email change's links open, and their lifetime. */
  readonly emailChange: { url: string | undefined; ttlSeconds: number };
  /** Built-in provider: the page a sign-in link opens, and its lifetime. */
  readonly magicLink: { url: string | undefined; ttlSeconds: number };
  /**
   * Two-step verification: the name authenticator apps show, how long a sign-in waits for a code, how
   * long a set-up waits for its first code, and the roles whose permissions count only in a session
   * that gave a second factor.
   */
  readonly mfa: {
    issuer: string;
    challengeTtlSeconds: number;
    setupTtlSeconds: number;
    requiredRoles: string[];
  };
}

export interface LoadConfigOptions {
  /** Read or create development secrets under DATA_DIR when they are not configured. */
  generateDevSecrets?: boolean;
  /**
   * False for a command that never encrypts, hashes or signs anything with them (`db:migrate`,
   * `openapi`): production does not demand KEY_ENCRYPTION_KEY and SECRET_PEPPER, and missing ones
   * are random and in memory only, never written under DATA_DIR. Default true.
   */
  needsSecrets?: boolean;
}

function devSecret(dataDir: string, name: string, generate: boolean): Buffer {
  const file = join(dataDir, 'secrets', name);
  if (existsSync(file)) return Buffer.from(readFileSync(file, 'utf8').trim(), 'base64');
  const value = randomBytes(32);
  if (generate) {
    mkdirSync(join(dataDir, 'secrets'), { recursive: true, mode: 0o700 });
    writeFileSync(file, value.toString('base64'), { mode: 0o600 });
  }
  return value;
}

/** Parses the environment once; every bad variable is named in one ConfigError. */
export function loadConfig(source: NodeJS.ProcessEnv, options: LoadConfigOptions = {}): Config {
  const parsed = EnvSchema.safeParse(source);
  const issues: Issue[] = parsed.success
    ? []
    : parsed.error.issues.map((issue) => ({
        path: issue.path.join('.') || '(environment)',
        message: issue.message,
      }));
  const needsSecrets = options.needsSecrets ?? true;
  issues.push(...crossChecks(source, needsSecrets));
  // Never echo a value: it may be a secret.
  if (issues.length > 0 || !parsed.success)
    throw new ConfigError(issues.map((i) => `${i.path}: ${i.message}`));
  const e = parsed.data;
  const publicUrl = (e.PUBLIC_URL ?? `http://localhost:${e.PORT}`).replace(/\/+$/, '');
  const dataDir = resolve(e.DATA_DIR);
  const authProvider = e.AUTH_PROVIDER ?? (e.SUPABASE_URL ? 'supabase' : 'local');
  const generate = needsSecrets && (options.generateDevSecrets ?? true);
  const proxies = listOf(e.TRUST_PROXY);
  const config: Config = {
    env: e.NODE_ENV,
    port: e.PORT,
    host: e.HOST,
    publicUrl,
    publicUrlSet: e.PUBLIC_URL !== undefined,
    issuer: publicUrl,
    databaseUrl: e.DATABASE_URL,
    dataDir,
    authProvider,
    supabase:
      authProvider === 'supabase' && e.SUPABASE_URL && e.SUPABASE_ANON_KEY && e.SUPABASE_SERVICE_ROLE_KEY
        ? {
            url: e.SUPABASE_URL,
            anonKey: e.SUPABASE_ANON_KEY,
            serviceRoleKey: e.SUPABASE_SERVICE_ROLE_KEY,
            timeoutMs: e.SUPABASE_TIMEOUT_MS,
            userRecheckSeconds: e.SUPABASE_USER_RECHECK_SECONDS,
          }
        : undefined,
    keyEncryptionKey: e.KEY_ENCRYPTION_KEY
      ? Buffer.from(e.KEY_ENCRYPTION_KEY, 'base64')
      : devSecret(dataDir, 'key-encryption-key', generate),
    secretPepper: e.SECRET_PEPPER
      ? Buffer.from(e.SECRET_PEPPER, 'base64')
      : devSecret(dataDir, 'secret-pepper', generate),
    signingAlg: e.SIGNING_ALG,
    redisUrl: e.REDIS_URL,
    rateLimit: { enabled: e.RATE_LIMIT_ENABLED, maxLoginFailuresPerHour: e.LOGIN_MAX_FAILURES_PER_HOUR },
    tokens: {
      accessTtl: e.ACCESS_TOKEN_TTL,
      refreshIdleTtl: e.REFRESH_TOKEN_IDLE_TTL,
      refreshAbsoluteTtl: e.REFRESH_TOKEN_ABSOLUTE_TTL,
      reuseGraceSeconds: e.REFRESH_REUSE_GRACE_SECONDS,
      maxAccessTtl: Math.max(e.ACCESS_TOKEN_TTL, 86_400),
    },
    sessions: { maxPerUser: e.MAX_SESSIONS_PER_USER },
    apiKeys: { maxPerUser: e.MAX_API_KEYS_PER_USER },
    clients: { maxPerUser: e.MAX_CLIENTS_PER_USER },
    bootstrapAdmin: e.BOOTSTRAP_ADMIN_EMAIL
      ? { email: e.BOOTSTRAP_ADMIN_EMAIL.toLowerCase(), password: e.BOOTSTRAP_ADMIN_PASSWORD }
      : undefined,
    logLevel: e.LOG_LEVEL,
    metricsToken: e.METRICS_TOKEN,
    // As browsers send them: lower-case host, no default port, no trailing slash.
    corsOrigins: listOf(e.CORS_ORIGINS).map((o) => new URL(o).origin),
    // Read from the same entries the check read, so `true,` is true rather than an address "true".
    trustProxy:
      proxies.length === 0 || proxies.join() === 'false' ? false : proxies.join() === 'true' ? true : proxies,
    bodyLimit: e.BODY_LIMIT,
    requestTimeoutMs: e.REQUEST_TIMEOUT_MS,
    retention: { sessionRetentionDays: e.SESSION_RETENTION_DAYS, auditRetentionDays: e.AUDIT_RETENTION_DAYS },
    db: {
      poolMax: e.DB_POOL_MAX,
      connectTimeoutMs: e.DB_CONNECT_TIMEOUT_MS,
      statementTimeoutMs: e.DB_STATEMENT_TIMEOUT_MS,
      transactionTimeoutMs: e.DB_TRANSACTION_TIMEOUT_MS,
      migrations: {
        lockTimeoutMs: e.DB_MIGRATION_LOCK_TIMEOUT_MS,
        statementTimeoutMs: e.DB_MIGRATION_STATEMENT_TIMEOUT_MS,
        retryBudgetMs: e.DB_MIGRATION_RETRY_MS,
        // The migration connection is a connection like the pool's: DB_CONNECT_TIMEOUT_MS.
        connectTimeoutMs: e.DB_CONNECT_TIMEOUT_MS,
      },
    },
    shutdownTimeoutMs: e.SHUTDOWN_TIMEOUT_MS,
    shutdownDrainMs: e.SHUTDOWN_DRAIN_MS,
    passwordHashing: {
      concurrency:
        e.PASSWORD_HASH_CONCURRENCY ??
        defaultHashConcurrency(availableParallelism(), threadPoolSize(source.UV_THREADPOOL_SIZE)),
      queue: e.PASSWORD_HASH_QUEUE,
    },
    mail:
      e.SMTP_URL && e.MAIL_FROM
        ? { smtpUrl: e.SMTP_URL, from: e.MAIL_FROM, timeoutMs: e.SMTP_TIMEOUT_MS }
        : undefined,
    passwordReset: {
      url: e.PASSWORD_RESET_URL,
      ttlSeconds: e.PASSWORD_RESET_TTL,
      invitationTtlSeconds: e.INVITATION_TTL,
    },
    emailConfirmation: {
      url: e.EMAIL_CONFIRMATION_URL,
      ttlSeconds: e.EMAIL_CONFIRMATION_TTL,
      required: e.REQUIRE_EMAIL_CONFIRMATION,
    },
    emailChange: { url: e.EMAIL_CHANGE_URL, ttlSeconds: e.EMAIL_CHANGE_TTL },
    magicLink: { url: e.MAGIC_LINK_URL, ttlSeconds: e.MAGIC_LINK_TTL },
    mfa: {
      issuer: e.MFA_ISSUER ?? 'Paservices',
      challengeTtlSeconds: e.MFA_CHALLENGE_TTL,
      setupTtlSeconds: e.MFA_SETUP_TTL,
      requiredRoles: listOf(e.MFA_REQUIRED_ROLES),
    },
  };
  return Object.freeze(config);
}
