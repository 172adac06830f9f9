import { createHash } from 'node:crypto';
import type { FastifyInstance } from 'fastify';
import fp from 'fastify-plugin';
import { Counter, collectDefaultMetrics, Gauge, Registry } from 'prom-client';
import { constantTimeEqual } from '../lib/crypto.js';
import { AppError } from '../lib/errors.js';
import { HttpRequestMetrics } from '../lib/http-metrics.js';
import { REPEATED_AUTHORIZATION_DETAIL, repeatedAuthorization } from './authenticate.js';

/** One registry per app, so several apps in one process (tests) do not collide. */
export function createMetrics() {
  const registry = new Registry();
  collectDefaultMetrics({ register: registry });
  const rateLimitRefusals = new Counter({
    name: 'auth_rate_limit_refusals_total',
    help:
      'Attempts a rate limit refused, by limiter: answered 429 (409 for an invitation or a reset link an ' +
      "administrator asks for), or, for a link mailed at anyone's request, the usual answer and no mail",
    labelNames: ['limiter'] as const,
    registers: [registry],
  });
  return {
    registry,
    http: new HttpRequestMetrics(
      registry,
      [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5],
    ),
    logins: new Counter({
      name: 'auth_logins_total',
      help: 'Login attempts by outcome',
      labelNames: ['outcome'] as const,
      registers: [registry],
    }),
    tokensIssued: new Counter({
      name: 'auth_tokens_issued_total',
      help: 'Access tokens issued by grant',
      labelNames: ['grant'] as const,
      registers: [registry],
    }),
    mail: new Counter({
      name: 'auth_mail_total',
      help:
        'Mail the service sends, by kind and outcome: sent; queued (refused, kept for retries); retried ' +
        '(sent from the queue); retry_failed; dropped (expired, its link used or replaced, its account gone, ' +
        'or refused for good by the mail server: a 5xx to RCPT TO or DATA)',
      labelNames: ['kind', 'outcome'] as const,
      registers: [registry],
    }),
    mailOutboxWaiting: new Gauge({
      name: 'auth_mail_outbox_waiting',
      help:
        "Mails waiting in the outbox (mail_outbox: due, or backing off after a refusal; every instance's), " +
        'counted at the end of each retry run of this instance',
      registers: [registry],
    }),
    clientAuthFailures: new Counter({
      name: 'auth_client_authentication_failures_total',
      help: 'Failed OAuth client authentications by reason (throttled: refused before any check)',
      labelNames: ['reason'] as const,
      registers: [registry],
    }),
    rateLimitRefusals,
    /**
     * What counts one refusal of `limiter` in auth_rate_limit_refusals_total; its series is at 0 from
     * now on, so a rate over it has a series to start from. Called once per limiter, where it is made.
     */
    refusalsOf(limiter: RateLimiter): () => void {
      rateLimitRefusals.inc({ limiter }, 0);
      return () => rateLimitRefusals.inc({ limiter });
    },
  };
}

/**
 * The limits counted in auth_rate_limit_refusals_total: a fixed set, no user data. Those of
 * services.ts (`counterOf`): mails of a purpose per address an hour; profile changes per user a
 * minute; failed client authentications per IP and client_id, and per IP, a minute; API keys naming no
 * key per IP a minute. Those of plugins/rate-limit.ts (@fastify/rate-limit): the requests per IP a
 * minute to a route with its own limit (`config.rateLimit`, any such route), and the refresh-token
 * redemptions per IP a minute (`config.refreshRateLimit`).
 */
export type RateLimiter =
  | 'mails_per_address'
  | 'profile_changes'
  | 'client_auth_failures'
  | 'client_auth_failures_per_ip'
  | 'unknown_api_keys_per_ip'
  | 'routes_per_ip'
  | 'refreshes_per_ip';

export type Metrics = ReturnType<typeof createMetrics>;

/** `Authorization: Bearer <token>`'s token (the scheme in any case), or undefined. */
const BEARER = /^Bearer +([^\s]+) *$/i;

const digest = (value: string) => createHash('sha256').update(value).digest('base64url');

async function metricsPlugin(
  app: FastifyInstance,
  options: { metrics: Metrics; token?: string | undefined },
) {
  const { metrics } = options;
  // Compared as SHA-256 digests (always of one length) by the service's constant-time compare: neither
  // the token's characters nor its length show in how long a refusal takes.
  const expected = options.token === undefined ? undefined : digest(options.token);
  // Synchronous on purpose: this runs after every response, and an async hook costs a promise and a
  // microtask turn per request on the paths other services call the most.
  app.addHook('onResponse', (request, reply, done) => {
    // The route pattern, not the URL, keeps label cardinality bounded.
    metrics.http.record(
      request.method,
      request.routeOptions.url ?? 'unmatched',
      reply.statusCode,
      reply.elapsedTime / 1000,
    );
    done();
  });

  // Public to the authenticate plugin (no user or key holds it): METRICS_TOKEN, when set, is the check.
  // The counters say what the API keeps to itself (whether a reset mail went out, whether a client id
  // exists), so only the scraper may read them.
  app.get('/metrics', { schema: { hide: true }, config: { public: true } }, async (request, reply) => {
    if (expected !== undefined) {
      const authorization = request.headers.authorization;
      // Node keeps the first of several Authorization headers and drops the others: refused, as
      // everywhere else, rather than scraped for whichever came first. Checked here, in this route
      // alone, so no other request pays for it.
      if (authorization !== undefined && repeatedAuthorization(request))
        throw new AppError('bad_request', {
          detail: REPEATED_AUTHORIZATION_DETAIL,
          headers: { 'www-authenticate': 'Bearer realm="metrics", error="invalid_request"' },
        });
      const presented = BEARER.exec(authorization ?? '')?.[1];
      if (presented === undefined || !constantTimeEqual(digest(presented), expected))
        throw new AppError('authentication_required', {
          detail: 'GET /metrics needs Authorization: Bearer <METRICS_TOKEN>',
          headers: { 'www-authenticate': 'Bearer realm="metrics"' },
        });
    }
    return reply.type(metrics.registry.contentType).send(await metrics.registry.metrics());
  });
}

export default fp(metricsPlugin, { name: 'metrics', fastify: '5.x' });
