import { Redis } from 'ioredis';
import type { Logger } from 'pino';
import type { Config } from './config.js';
import type { DatabaseHandle } from './db/client.js';
import { createLocalProvider } from './identity/local.js';
import { createPasswordHasher, loadCommonPasswords } from './identity/passwords.js';
import type { IdentityProvider } from './identity/provider.js';
import { createSupabaseProvider } from './identity/supabase.js';
import type { Clock } from './lib/clock.js';
import { isAppError } from './lib/errors.js';
import { createEventBus } from './lib/events.js';
import {
  createMemoryFailureCounter,
  createRedisFailureCounter,
  createSharedFailureCounter,
  type FailureCounter,
  type GuessCounter,
  loginFailuresKey,
  mailsPerHourKey,
  profileChangesKey,
} from './lib/throttle.js';
import { createAuditRepository } from './modules/audit/audit.repository.js';
import { createAuditService, systemContext } from './modules/audit/audit.service.js';
import { createAccountsCache } from './modules/auth/accounts.cache.js';
import { createAuthService } from './modules/auth/auth.service.js';
import { createSessionsRepository } from './modules/auth/sessions.repository.js';
import { createProviderStanding } from './modules/auth/provider-standing.js';
import { createSessionsService } from './modules/auth/sessions.service.js';
import { createProfilesRepository } from './modules/profiles/profiles.repository.js';
import { createSigningKeysRepository } from './modules/signing-keys/signing-keys.repository.js';
import { createSigningKeysService } from './modules/signing-keys/signing-keys.service.js';
import { createRevocationsRepository } from './modules/tokens/revocations.repository.js';
import { createRevocationList } from './modules/tokens/revocations.service.js';
import { createTokenService } from './modules/tokens/tokens.service.js';
import { createUsersRepository } from './modules/users/users.repository.js';
import { createUsersService } from './modules/users/users.service.js';
import { createRolesRepository } from './modules/roles/roles.repository.js';
import { createGrantCeiling } from './modules/roles/grant-ceiling.js';
import { createRolesService } from './modules/roles/roles.service.js';
import { createProfilesService, PROFILE_CHANGES_PER_MINUTE } from './modules/profiles/profiles.service.js';
import { createApiKeysRepository } from './modules/api-keys/api-keys.repository.js';
import { API_KEY_MAX_FAILURES_PER_IP_PER_MINUTE } from './modules/api-keys/api-keys.schema.js';
import { createApiKeysService } from './modules/api-keys/api-keys.service.js';
import { createClientsRepository } from './modules/clients/clients.repository.js';
import { createClientsService } from './modules/clients/clients.service.js';
import { createRetention } from './modules/housekeeping/retention.js';
import { createMailOutbox } from './modules/mail/mail-outbox.js';
import { createMagicLinkService } from './modules/auth/magic-link.service.js';
import { MAILS_PER_ACCOUNT_HOUR } from './modules/auth/mailed-tokens.js';
import { apiKeysForOAuth } from './modules/oauth/oauth.api-keys.js';
import {
  CLIENT_AUTH_MAX_FAILURES_PER_IP_PER_MINUTE,
  CLIENT_AUTH_MAX_FAILURES_PER_MINUTE,
  createOAuthService,
} from './modules/oauth/oauth.service.js';
import { createMetrics, type RateLimiter } from './plugins/metrics.js';
import { createLogMailer, createSmtpMailer, type Mailer } from './lib/mailer.js';
import { createRedisLink } from './lib/redis-link.js';
import { createMfaRepository } from './modules/auth/mfa.repository.js';
import { createMfaService } from './modules/auth/mfa.service.js';
import { createEmailTokensRepository } from './modules/auth/email-tokens.repository.js';
import { createPasswordResetService } from './modules/auth/password-reset.service.js';
import { createEmailChangeService } from './modules/auth/email-change.service.js';
import { createEmailConfirmationService } from './modules/auth/email-confirmation.service.js';
import { createSigner } from './lib/signer.js';

export interface ServicesDeps {
  config: Config;
  database: DatabaseHandle;
  logger: Logger;
  clock: Clock;
  identityProvider?: IdentityProvider | undefined;
  /** A Redis client for shared counters; by default one is made from REDIS_URL when set. */
  redis?: Redis | undefined;
  /**
   * Where the service's own mail goes (password reset and confirmation links). By default: SMTP_URL's
   * server; without it, the log in development, and nowhere otherwise (password recovery is then off).
   */
  mailer?: Mailer | undefined;
  /** How often the bootstrap admin is tried again while the provider is down (default 15 s). */
  bootstrapRetryMs?: number | undefined;
  /** How often mail the mail server refused is looked at for a retry (default 15 s; 0: only when asked). */
  mailRetryIntervalMs?: number | undefined;
  /** How long a queued mail's send may take before it is given up (default: 3 × SMTP_TIMEOUT_MS). */
  mailSendTimeoutMs?: number | undefined;
}

/** How often caches are checked against the database, as a backstop to the change notifications. */
const HOUSEKEEPING_INTERVAL_MS = 60_000;
/** How often the bootstrap admin is tried again while the identity provider is unavailable at start. */
const BOOTSTRAP_RETRY_MS = 15_000;
/** How often queued mail is looked at for a retry (modules/mail/mail-outbox.ts). */
const MAIL_RETRY_INTERVAL_MS = 15_000;
/** How often expired rows are deleted (modules/housekeeping/retention.ts). */
const PURGE_INTERVAL_MS = 3600_000;
/** The first wait after a failed purge; it doubles with each failure in a row, up to PURGE_INTERVAL_MS. */
const PURGE_RETRY_MS = 60_000;

/** Redis key prefix of the shared counts of failed client authentications, per IP and client_id. */
export const CLIENT_AUTH_FAILURES_PREFIX = 'paservices:auth:client-auth-failures:';
export const CLIENT_AUTH_IP_FAILURES_PREFIX = 'paservices:auth:client-auth-ip-failures:';
/** Redis key prefix of the shared counts, per IP, of API keys presented that name no key. */
export const API_KEY_IP_FAILURES_PREFIX = 'paservices:auth:api-key-ip-failures:';

/** The bootstrap admin cannot be made with the configured email and password; the start stops. */
export class BootstrapAdminError extends Error {
  override name = 'BootstrapAdminError';
}

/** REDIS_URL names a database the Redis server refuses: no wait and no restart mends it. */
export class RedisDatabaseError extends Error {
  override name = 'RedisDatabaseError';
}

/** How long the start waits for Redis's first answer (or its absence) before going on without it. */
const REDIS_FIRST_ANSWER_MS = 2000;

/**
 * Wires every repository and service once. The HTTP app and the scripts (create-admin,
 * rotate-signing-key) share it, so a rule lives in one place whichever door it is reached by.
 */
export function createServices(deps: ServicesDeps) {
  const { config, database, logger, clock } = deps;
  const db = database.db;
  const metrics = createMetrics();
  const events = createEventBus({ database, logger });
  const ownsRedis = !deps.redis && !!config.redisUrl;
  const redis =
    deps.redis ??
    (config.redisUrl
      ? new Redis(config.redisUrl, {
          lazyConnect: false,
          enableOfflineQueue: false,
          maxRetriesPerRequest: 1,
          connectTimeout: 1000,
          commandTimeout: 500,
        })
      : undefined);
  // A database REDIS_URL names that the server does not have (`/99` where it has 16): ioredis reports
  // the SELECT's refusal as an error and goes on, on database 0, among other applications' keys. The
  // client is closed then, before any command (they wait for `ready`, which comes after), so nothing
  // is counted there, and the limits stay in this instance's memory as with Redis down. At the start
  // it stops the start (start() below), with one line naming REDIS_URL; later (Redis restarted with
  // fewer databases) it is logged as an error.
  let redisRefused: RedisDatabaseError | undefined;
  let redisChecked = false;
  const redisFirstAnswer = redis
    ? new Promise<void>((resolve) => {
        if (redis.status === 'ready') return resolve();
        for (const event of ['ready', 'close', 'end'] as const) redis.once(event, () => resolve());
        setTimeout(resolve, REDIS_FIRST_ANSWER_MS).unref();
      })
    : Promise.resolve();
  // Whether Redis answers, for every counter kept there: one line when it goes away (a connection
  // error, or a command failed or unanswered within commandTimeout: a hung Redis keeps its connection)
  // and one when it is back, not one per reconnect attempt. Meanwhile the rate limits and failure
  // counts stay in this instance's memory without asking it (README "Failure behaviour"); ioredis
  // keeps reconnecting by itself, and the link asks again every second.
  const redisLink = redis ? createRedisLink(redis, logger) : undefined;
  redis?.on('error', (err: Error & { command?: { name?: string; args?: unknown[] } }) => {
    if (err.command?.name === 'select') {
      redis.disconnect();
      redisLink?.close();
      const location = URL.parse(config.redisUrl ?? '');
      redisRefused = new RedisDatabaseError(
        `REDIS_URL names database ${String(err.command.args?.[0])}, which the Redis server` +
          `${location ? ` at ${location.host}` : ''} refuses (${err.message}): name one it has ` +
          '(0 to one below its `databases` setting, 16 by default)',
      );
      if (redisChecked)
        logger.error(
          { err: err.message },
          `${redisRefused.message}; rate limits stay in this instance's memory until it restarts`,
        );
      return;
    }
    redisLink?.failed(err);
  });
  // A connection lost without an error (Redis stopped or restarted): commands would fail at once.
  redis?.on('close', () => redisLink?.failed(new Error('connection closed')));
  redis?.on('ready', () => redisLink?.answered());

  const repos = {
    users: createUsersRepository(db),
    audit: createAuditRepository(db),
    sessions: createSessionsRepository(db),
    signingKeys: createSigningKeysRepository(db),
    revocations: createRevocationsRepository(db),
    profiles: createProfilesRepository(db),
    roles: createRolesRepository(db),
    apiKeys: createApiKeysRepository(db),
    clients: createClientsRepository(db),
    emailTokens: createEmailTokensRepository(db),
    mfa: createMfaRepository(db),
  };
  const audit = createAuditService({ repo: repos.audit, clock, visibleWithinMs: database.visibleWithinMs });
  const keys = createSigningKeysService({
    db,
    repo: repos.signingKeys,
    audit,
    events,
    clock,
    logger,
    keyEncryptionKey: config.keyEncryptionKey,
    alg: config.signingAlg,
    maxAccessTtl: config.tokens.maxAccessTtl,
  });
  const revocations = createRevocationList({
    repo: repos.revocations,
    clock,
    logger,
    maxAccessTtl: config.tokens.maxAccessTtl,
    // A revocation the events missed: every cache may hold what it ended (a resync, as after a
    // LISTEN reconnect).
    onMissed: () => {
      logger.warn('a revocation was read before its notification arrived: caches dropped');
      events.applyLocally([{ type: 'resync' }]);
    },
  });
  const audience = config.issuer;
  const signer = createSigner({
    onThreadFailure: (err) =>
      logger.error({ err }, 'the token-signing thread failed: signing on libuv’s pool'),
  });
  const tokens = createTokenService({
    keys,
    signer,
    revocations,
    clock,
    issuer: config.issuer,
    audience,
    maxTtl: config.tokens.maxAccessTtl,
  });
  const hasher = createPasswordHasher(config.passwordHashing);
  // Now rather than at the first registration: a missing file stops the start, naming it.
  loadCommonPasswords();
  const provider: IdentityProvider =
    deps.identityProvider ??
    (config.authProvider === 'supabase' && config.supabase
      ? createSupabaseProvider({
          url: config.supabase.url,
          anonKey: config.supabase.anonKey,
          serviceRoleKey: config.supabase.serviceRoleKey,
          timeoutMs: config.supabase.timeoutMs,
          recoveryMaxAgeSeconds: config.passwordReset.ttlSeconds,
        })
      : createLocalProvider({
          users: repos.users,
          hasher,
          requireEmailConfirmation: config.emailConfirmation.required,
        }));
  /** What every limit of `counterOf` has: its name in the metrics, its count and what it counts. */
  type Limit = {
    /** Absent for the login lock alone: its refusals are auth_logins_total's `locked`. */
    limiter?: RateLimiter;
    max: number;
    windowSeconds: number;
    /** For the line when Redis does not answer: "Redis unavailable: counting <what> in this instance only". */
    what: string;
  };
  /**
   * A limit's counter, undefined without RATE_LIMIT_ENABLED: at most `max` per key in a window, shared
   * through Redis when there is one, in this instance's memory while it does not answer (logged once)
   * or when there is none. Its refusals are counted in auth_rate_limit_refusals_total under `limiter`,
   * where it has one. With `redisKey`, read and written in Redis on every call (exact on every
   * instance), and every `reserve` it refuses counted here; `label` names what is counted when
   * memory's counts are carried into Redis. With `prefix`, read from memory and only failures sent to
   * Redis (nothing to wait for on a hot path: createSharedFailureCounter), and its caller tells it a
   * refusal (`refused`).
   */
  function counterOf(
    limit: Limit & { redisKey: (key: string) => string; label: string },
  ): GuessCounter | undefined;
  function counterOf(limit: Limit & { prefix: string }): FailureCounter | undefined;
  function counterOf(
    limit: Limit & ({ redisKey: (key: string) => string; label: string } | { prefix: string }),
  ): GuessCounter | FailureCounter | undefined {
    if (!config.rateLimit.enabled) return undefined;
    const { limiter, max, windowSeconds } = limit;
    const common = { link: redisLink, max, windowSeconds, clock, logger };
    const fallbackMessage = `Redis unavailable: counting ${limit.what} in this instance only`;
    const refused = limiter ? metrics.refusalsOf(limiter) : undefined;
    if ('prefix' in limit) {
      const counter: FailureCounter = redis
        ? createSharedFailureCounter({ ...common, redis, prefix: limit.prefix, fallbackMessage })
        : createMemoryFailureCounter({ max, windowSeconds, clock });
      return refused ? { ...counter, refused } : counter;
    }
    const counter = redis
      ? createRedisFailureCounter({
          ...common,
          redis,
          redisKey: limit.redisKey,
          fallbackMessage,
          label: limit.label,
        })
      : createMemoryFailureCounter({ max, windowSeconds, clock });
    if (!refused) return counter;
    return {
      ...counter,
      async reserve(key: string) {
        const slot = await counter.reserve(key);
        if (slot.retryAfter > 0) refused();
        return slot;
      },
    };
  }
  /** A counter that refuses nothing, where a limit's count is needed without RATE_LIMIT_ENABLED. */
  const unlimited = (windowSeconds: number) =>
    createMemoryFailureCounter({ max: Number.MAX_SAFE_INTEGER, windowSeconds, clock });
  // Failed sign-ins per account an hour (the lockout, auth.service.ts): without RATE_LIMIT_ENABLED,
  // counted in memory against no limit.
  const failures =
    counterOf({
      max: config.rateLimit.maxLoginFailuresPerHour,
      windowSeconds: 3600,
      redisKey: loginFailuresKey,
      what: 'login failures',
      label: 'Login failures',
    }) ?? unlimited(3600);
  // At most MAILS_PER_ACCOUNT_HOUR links of a purpose per address an hour, on every instance.
  const mailsPerHour = counterOf({
    limiter: 'mails_per_address',
    max: MAILS_PER_ACCOUNT_HOUR,
    windowSeconds: 3600,
    redisKey: mailsPerHourKey,
    what: 'the mails per address',
    label: 'Mails per address',
  });
  const sessions = createSessionsService({
    db,
    repo: repos.sessions,
    users: repos.users,
    tokens,
    revocations,
    audit,
    events,
    clock,
    pepper: config.secretPepper,
    audience,
    ttl: {
      access: config.tokens.accessTtl,
      refreshIdle: config.tokens.refreshIdleTtl,
      refreshAbsolute: config.tokens.refreshAbsoluteTtl,
      reuseGrace: config.tokens.reuseGraceSeconds,
    },
    onIssued: (grant) => metrics.tokensIssued.inc({ grant }),
    mfaRequiredRoles: config.mfa.requiredRoles,
    maxPerUser: config.sessions.maxPerUser,
    providerStanding: createProviderStanding({
      provider,
      clock,
      logger,
      recheckSeconds: config.supabase?.userRecheckSeconds ?? 0,
    }),
  });
  const ownsMailer = !deps.mailer;
  const mailer =
    deps.mailer ??
    (config.mail
      ? createSmtpMailer({
          url: config.mail.smtpUrl,
          from: config.mail.from,
          timeoutMs: config.mail.timeoutMs,
        })
      : config.env === 'development'
        ? createLogMailer(logger)
        : undefined);
  const outbox = mailer
    ? createMailOutbox({
        db,
        mailer,
        clock,
        keyEncryptionKey: config.keyEncryptionKey,
        logger,
        onOutcome: (kind, outcome) => metrics.mail.inc({ kind, outcome }),
        onWaiting: (count) => metrics.mailOutboxWaiting.set(count),
        intervalMs: deps.mailRetryIntervalMs ?? MAIL_RETRY_INTERVAL_MS,
        // A send is given up after three of the mailer's timeouts (connection, greeting, an exchange);
        // the lease outlasts that, so no other instance takes a mail while it may still be going.
        sendTimeoutMs: deps.mailSendTimeoutMs ?? 3 * (config.mail?.timeoutMs ?? 10_000),
        leaseMs: Math.max(120_000, 6 * (config.mail?.timeoutMs ?? 10_000)),
      })
    : undefined;
  const mfa = createMfaService({
    db,
    repo: repos.mfa,
    users: repos.users,
    sessions,
    audit,
    events,
    clock,
    pepper: config.secretPepper,
    keyEncryptionKey: config.keyEncryptionKey,
    issuer: config.mfa.issuer,
    challengeTtlSeconds: config.mfa.challengeTtlSeconds,
    setupTtlSeconds: config.mfa.setupTtlSeconds,
    onLogin: (outcome) => metrics.logins.inc({ outcome }),
    requireConfirmedEmail: provider.name === 'supabase' || mailer !== undefined,
    mfaRequiredRoles: config.mfa.requiredRoles,
    outbox,
    logger,
  });
  const auth = createAuthService({
    db,
    users: repos.users,
    provider,
    sessions,
    revocations,
    audit,
    events,
    clock,
    failures,
    logger,
    onLogin: (outcome) => metrics.logins.inc({ outcome }),
    emailTokens: repos.emailTokens,
    mfa,
    outbox,
    requireEmailConfirmation: config.emailConfirmation.required && provider.name === 'local',
  });
  const grants = createGrantCeiling({
    db,
    users: repos.users,
    clients: repos.clients,
    apiKeys: repos.apiKeys,
    sessions: repos.sessions,
    audit,
    clock,
  });
  // What the services of mailed links (confirmation, email change) share.
  const mailedLinks = {
    db,
    users: repos.users,
    tokens: repos.emailTokens,
    audit,
    events,
    clock,
    pepper: config.secretPepper,
    providerName: provider.name,
    mailer,
    outbox,
    mailsPerHour,
    logger,
  };
  const emailConfirmation = createEmailConfirmationService({ ...mailedLinks, ...config.emailConfirmation });
  const emailChange = createEmailChangeService({
    ...mailedLinks,
    ...config.emailChange,
    sessions: repos.sessions,
    sessionEnds: sessions,
    grants,
  });
  const magicLink = createMagicLinkService({
    ...mailedLinks,
    ...config.magicLink,
    auth,
    mfa,
    failures,
    onLogin: (outcome) => metrics.logins.inc({ outcome }),
  });
  const passwordReset = createPasswordResetService({
    db,
    users: repos.users,
    tokens: repos.emailTokens,
    provider,
    sessions,
    audit,
    events,
    clock,
    failures,
    mailer,
    outbox,
    mailsPerHour,
    pepper: config.secretPepper,
    url: config.passwordReset.url,
    ttlSeconds: config.passwordReset.ttlSeconds,
    invitationTtlSeconds: config.passwordReset.invitationTtlSeconds,
    logger,
    withCurrentEmail: auth.withCurrentEmail,
    unproven: {
      apiKeys: repos.apiKeys,
      clients: repos.clients,
      subjectRevocation: auth.subjectRevocation,
      mfa,
    },
  });

  const roles = createRolesService({
    db,
    repo: repos.roles,
    users: repos.users,
    audit,
    events,
    grants,
    clients: repos.clients,
    subjectRevocation: auth.subjectRevocation,
  });
  const users = createUsersService({
    db,
    repo: repos.users,
    roles: repos.roles,
    sessions,
    auth,
    provider,
    audit,
    events,
    grants,
    clients: repos.clients,
    apiKeys: repos.apiKeys,
    emailTokens: repos.emailTokens,
    mfaRequiredRoles: config.mfa.requiredRoles,
    mfa,
    sessionRows: repos.sessions,
    clock,
    logger,
  });
  // At most PROFILE_CHANGES_PER_MINUTE profile changes a minute per user, on every instance.
  const profileChanges = counterOf({
    limiter: 'profile_changes',
    max: PROFILE_CHANGES_PER_MINUTE,
    windowSeconds: 60,
    redisKey: profileChangesKey,
    what: 'profile changes',
    label: 'Profile changes',
  });
  const profiles = createProfilesService({
    db,
    repo: repos.profiles,
    audit,
    events,
    changes: profileChanges,
  });
  const accounts = createAccountsCache({ users: repos.users, profiles: repos.profiles, clock });

  // API keys their holder presents that name no key, per client address (api-keys.service.ts,
  // `verifyPresented`): read from memory, as the client-authentication counts are, so a valid key
  // waits for nothing. Not counted at all without RATE_LIMIT_ENABLED.
  const apiKeyFailuresByIp = counterOf({
    limiter: 'unknown_api_keys_per_ip',
    max: API_KEY_MAX_FAILURES_PER_IP_PER_MINUTE,
    windowSeconds: 60,
    prefix: API_KEY_IP_FAILURES_PREFIX,
    what: 'API keys that name no key',
  });
  // Failed client authentications a minute (oauth.service.ts): without RATE_LIMIT_ENABLED, counted
  // in memory against no limit.
  const clientAuthFailureCounter = (limit: Limit & { prefix: string }) =>
    counterOf(limit) ?? unlimited(limit.windowSeconds);

  const apiKeys = createApiKeysService({
    db,
    repo: repos.apiKeys,
    users: repos.users,
    audit,
    events,
    grants,
    clock,
    logger,
    pepper: config.secretPepper,
    maxPerOwner: config.apiKeys.maxPerUser,
    unknownKeysByAddress: apiKeyFailuresByIp,
  });

  const clients = createClientsService({
    db,
    repo: repos.clients,
    audit,
    events,
    grants,
    revocations,
    clock,
    pepper: config.secretPepper,
    maxAccessTtl: config.tokens.maxAccessTtl,
    accessTtl: config.tokens.accessTtl,
    audience,
    users: repos.users,
    maxPerCreator: config.clients.maxPerUser,
  });
  const oauth = createOAuthService({
    db,
    clients,
    tokens,
    sessions,
    revocations,
    audit,
    events,
    clock,
    audience,
    accessTtl: config.tokens.accessTtl,
    maxAccessTtl: config.tokens.maxAccessTtl,
    apiKeys: apiKeysForOAuth(apiKeys),
    // Shared through Redis when there is one, but read from memory: only failures reach Redis, so
    // introspections that authenticate never wait for it.
    clientAuthFailures: clientAuthFailureCounter({
      limiter: 'client_auth_failures',
      max: CLIENT_AUTH_MAX_FAILURES_PER_MINUTE,
      windowSeconds: 60,
      prefix: CLIENT_AUTH_FAILURES_PREFIX,
      what: 'failed client authentications',
    }),
    clientAuthFailuresByIp: clientAuthFailureCounter({
      limiter: 'client_auth_failures_per_ip',
      max: CLIENT_AUTH_MAX_FAILURES_PER_IP_PER_MINUTE,
      windowSeconds: 60,
      prefix: CLIENT_AUTH_IP_FAILURES_PREFIX,
      what: 'failed client authentications',
    }),
    onIssued: (grant) => metrics.tokensIssued.inc({ grant }),
    onClientAuthFailure: (reason) => metrics.clientAuthFailures.inc({ reason }),
  });

  events.subscribe((event) => revocations.handle(event));
  // Key changes, the owners' role and status changes, and resyncs drop cached keys and permissions.
  events.subscribe((event) => apiKeys.handle(event));
  // Client changes from any instance drop the cached client rows that client authentication reads.
  events.subscribe((event) => clients.handle(event));
  // User, role and profile changes drop the cached /v1/auth/me views.
  events.subscribe((event) => accounts.handle(event));
  // Key changes and resyncs read the signing keys again; keys revoked elsewhere are dropped at once.
  events.subscribe((event) => keys.handle(event));

  const retention = createRetention({
    db,
    clock,
    logger,
    options: { ...config.retention, mfaSetupTtlSeconds: config.mfa.setupTtlSeconds },
  });
  /** When the next purge is due (wall clock), and how long the last failed one made it wait. */
  let nextPurge = Number.NEGATIVE_INFINITY;
  let purgeBackoff = 0;
  let timer: NodeJS.Timeout | undefined;
  let bootstrapTimer: NodeJS.Timeout | undefined;
  /** The housekeeping under way: the next minute's joins it rather than starting a second purge beside it. */
  let housekeepingRun: Promise<void> | undefined;
  function housekeeping(): Promise<void> {
    housekeepingRun ??= housekeepOnce().finally(() => {
      housekeepingRun = undefined;
    });
    return housekeepingRun;
  }
  /**
   * The minute's work. Each step runs whatever became of the ones before it (a failed ensureKeys must
   * not leave the revocations unread, nor the purge undone); the run then fails with the step's
   * error, or an AggregateError of the steps' errors, for the timer's one log line.
   */
  async function housekeepOnce() {
    revocations.prune();
    const failures: unknown[] = [];
    const step = (work: () => Promise<void>) =>
      work().catch((err: unknown) => {
        failures.push(err);
      });
    await step(() => keys.ensureKeys());
    await step(() => revocations.reload());
    await step(purgeIfDue);
    if (failures.length === 1) throw failures[0];
    if (failures.length > 1)
      throw new AggregateError(
        failures,
        `housekeeping: ${failures.length} steps failed: ${failures
          .map((err) => (err instanceof Error ? err.message : String(err)))
          .join('; ')}`,
      );
  }
  async function purgeIfDue() {
    // By the wall clock, not the injectable one: a test that moves its app's clock days ahead must
    // not purge, from a timer, the rows other tests on the same database wrote moments ago.
    // (In production the two are the same clock.)
    const wallNow = Date.now();
    if (wallNow >= nextPurge) {
      try {
        await retention.purge(new Date(wallNow));
      } catch (err) {
        // A purge the database refused is tried again sooner than in an hour, but not every minute
        // for ever: a failure that stays (a batch past the statement timeout) would redo its work
        // each time. 1, 2, 4… minutes, up to the hour.
        purgeBackoff = Math.min(Math.max(purgeBackoff * 2, PURGE_RETRY_MS), PURGE_INTERVAL_MS);
        nextPurge = wallNow + purgeBackoff;
        throw err;
      }
      purgeBackoff = 0;
      nextPurge = wallNow + PURGE_INTERVAL_MS;
    }
  }

  return {
    config,
    db,
    logger,
    clock,
    metrics,
    events,
    redis,
    /** Whether Redis answers, shared by everything counted there; undefined without Redis. */
    redisLink,
    repos,
    audit,
    keys,
    revocations,
    retention,
    tokens,
    /** The token signatures' thread (tests hold a signature back through it). */
    signer,
    hasher,
    provider,
    sessions,
    auth,
    passwordReset,
    emailConfirmation,
    emailChange,
    magicLink,
    mfa,
    roles,
    /** The grant ceiling: what a principal holds now. */
    grants,
    users,
    profiles,
    accounts,
    apiKeys,
    clients,
    oauth,
    audience,
    /** Mail the mail server refused, kept for retries; undefined when the service sends no mail. */
    outbox,
    /** One run of what the service does every minute (HOUSEKEEPING_INTERVAL_MS), for tests. */
    housekeeping,
    /** Loads keys and revocations, starts listening for other instances' changes, bootstraps the admin. */
    async start() {
      // Redis down at the start does not keep the service down (README "Redis down"); a database it
      // refuses does, for it never works.
      await redisFirstAnswer;
      redisChecked = true;
      if (redisRefused) throw redisRefused;
      // Before any key is made: a start refused for the key would otherwise leave signing keys written
      // under it, which the right key then cannot open either.
      await mfa.assertSecretsReadable();
      await keys.ensureKeys();
      // Listening first: a revocation committed between the read and the LISTEN would go unseen until
      // the minute's reload (the read only adds to what the events applied meanwhile). The keys are
      // read again once listening for the same reason: an emergency rotation committed since
      // ensureKeys read them would otherwise leave the keys it revoked verifying here, and the revoked
      // active key signing, until the minute's reload.
      await events.start();
      await keys.reload();
      await revocations.reload();
      apiKeys.start();
      outbox?.start();
      if (config.bootstrapAdmin) {
        const bootstrap = config.bootstrapAdmin;
        const retryMs = deps.bootstrapRetryMs ?? BOOTSTRAP_RETRY_MS;
        const attempt = async () => {
          const result = await auth.bootstrapAdmin(bootstrap, systemContext);
          // An existing account made admin (or already one) that is disabled: no admin can sign in yet.
          if (!('ignored' in result) && result.user && result.user.status !== 'active')
            logger.warn(
              { email: bootstrap.email, userId: result.user.id },
              'the bootstrap admin’s account is disabled: it holds admin but cannot sign in, and no active admin exists',
            );
          else if (result.created || result.granted)
            logger.info({ email: bootstrap.email }, 'bootstrap admin ready');
        };
        // The identity provider down at start (Supabase unreachable) does not keep the service down:
        // everything else works, and the admin is made once the provider answers.
        const retry = () => {
          bootstrapTimer = setTimeout(() => {
            attempt().catch((err: unknown) => {
              if (isAppError(err) && err.code === 'provider_unavailable') return retry();
              logger.error({ err }, 'bootstrap admin failed; it will not be retried');
            });
          }, retryMs);
          bootstrapTimer.unref();
        };
        await attempt().catch((err: unknown) => {
          // A refusal of the operator's settings (an unconfirmed address, a wrong or weak password):
          // one line naming the variables, not a request's problem with a stack trace.
          if (isAppError(err) && err.code !== 'provider_unavailable')
            throw new BootstrapAdminError(
              `the bootstrap admin (BOOTSTRAP_ADMIN_EMAIL ${bootstrap.email}) cannot be made: ${err.detail}`,
              { cause: err },
            );
          if (!(isAppError(err) && err.code === 'provider_unavailable')) throw err;
          logger.warn(
            { err, retryInMs: retryMs },
            'bootstrap admin postponed: the identity provider is unavailable; retrying until it answers',
          );
          retry();
        });
      }
      timer = setInterval(() => {
        // A run that outlasts the minute (a long purge): its failure is logged once, by its own tick.
        if (housekeepingRun) return;
        housekeeping().catch((err: unknown) => logger.warn({ err }, 'housekeeping failed; will retry'));
      }, HOUSEKEEPING_INTERVAL_MS);
      timer.unref();
    },
    async stop() {
      if (timer) clearInterval(timer);
      if (bootstrapTimer) clearTimeout(bootstrapTimer);
      // A purge under way ends with its batch in flight (at most a statement), before the pool closes.
      retention.stop();
      await housekeepingRun?.catch(() => undefined);
      // Buffered API-key last-use times are written before the database goes away.
      await apiKeys.stop();
      await outbox?.stop();
      await events.stop();
      // Nor are the reads a resync asked for tried again.
      revocations.stop();
      keys.stop();
      await signer.stop();
      redisLink?.close();
      if (ownsRedis && redis) {
        // QUIT goes over a live connection. With Redis down (the client reconnecting) it fails at once,
        // having no offline queue, and the client went on reconnecting, holding the process open: a
        // script that had done its work never exited. Whatever QUIT did, the client ends here.
        await redis.quit().catch(() => undefined);
        if (redis.status !== 'end') redis.disconnect();
      }
      if (ownsMailer) mailer?.close();
    },
  };
}

export type Services = ReturnType<typeof createServices>;
