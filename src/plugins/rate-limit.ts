import { limitedAddress } from '../lib/client-address.js';
import rateLimit, { type FastifyRateLimitStore } from '@fastify/rate-limit';
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import fp from 'fastify-plugin';
import { LRUCache } from 'lru-cache';
import { AppError } from '../lib/errors.js';
import type { RedisLink } from '../lib/redis-link.js';
import type { Metrics } from './metrics.js';

type IncrCallback = (error: Error | null, result?: { current: number; ttl: number }) => void;

/**
 * Fixed-window counters in Redis, shared by every instance. While Redis does not answer, this
 * instance counts on its own (the documented policy: the limits stay on, per instance, rather than
 * failing open), without asking Redis while the link knows it does not answer (a hung Redis would
 * cost each request the command timeout), and goes back to Redis as soon as it answers; the link
 * logs both transitions.
 */
function sharedStoreWithFallback(link: RedisLink) {
  const { redis } = link;
  return class SharedRateLimitStore implements FastifyRateLimitStore {
    private readonly local = new LRUCache<string, { current: number; resetAt: number }>({ max: 10_000 });

    constructor(
      _options: unknown,
      private readonly prefix = 'paservices:auth:rl:',
    ) {}

    incr(key: string, callback: IncrCallback, timeWindow = 60_000): void {
      const k = this.prefix + key;
      if (!link.answering()) {
        callback(null, this.countLocally(k, timeWindow));
        return;
      }
      redis
        .multi()
        .incr(k)
        .pexpire(k, timeWindow, 'NX')
        .pttl(k)
        .exec()
        .then((replies) => {
          const [current, , ttl] = (replies ?? []).map(([err, value]) => {
            if (err) throw err;
            return Number(value);
          });
          if (current === undefined || ttl === undefined) throw new Error('rate-limit transaction aborted');
          callback(null, { current, ttl });
        })
        .catch((err: unknown) => {
          link.failed(err);
          callback(null, this.countLocally(k, timeWindow));
        });
    }

    private countLocally(key: string, timeWindow: number) {
      const now = Date.now();
      const entry = this.local.get(key);
      const counter = entry && entry.resetAt > now ? entry : { current: 0, resetAt: now + timeWindow };
      counter.current++;
      this.local.set(key, counter);
      return { current: counter.current, ttl: counter.resetAt - now };
    }

    child(routeOptions: unknown): SharedRateLimitStore {
      // Like the plugin's own Redis store: one counter per route, so limits do not add up across routes.
      const route = (routeOptions as { routeInfo?: { method?: string; url?: string } }).routeInfo;
      return new SharedRateLimitStore(undefined, `${this.prefix}${route?.method ?? ''}${route?.url ?? ''}-`);
    }
  };
}

/**
 * Per-IP throttling of credential endpoints (routes opt in with `config.rateLimit`). The IP is the
 * socket's unless TRUST_PROXY names the proxies, so X-Forwarded-For cannot dodge it; an IPv6 client is
 * counted by its /64 (lib/client-address.ts). Counters live in
 * Redis when configured (shared by every instance), in this instance's memory otherwise or while Redis
 * is down; the per-account failure counter applies on top.
 */
async function rateLimitPlugin(
  app: FastifyInstance,
  options: { link?: RedisLink | undefined; metrics: Pick<Metrics, 'refusalsOf'> },
) {
  await app.register(rateLimit, {
    global: false,
    ...(options.link ? { store: sharedStoreWithFallback(options.link) } : {}),
    skipOnError: true,
    keyGenerator: (request) => limitedAddress(request.ip),
    // Called on a refusal only (auth_rate_limit_refusals_total): nothing on a request it lets through.
    onExceeded: options.metrics.refusalsOf('routes_per_ip'),
    errorResponseBuilder: (_request, context) =>
      new AppError('rate_limited', {
        detail: `Too many requests; retry in ${Math.ceil(context.ttl / 1000)} s`,
        headers: { 'retry-after': String(Math.ceil(context.ttl / 1000)) },
      }),
  });
  // One counter for every route that declares it: refreshing at /oauth/token must not dodge
  // /v1/auth/refresh's limit.
  const refreshLimit = app
    .rateLimit({
      ...REFRESH_RATE_LIMIT,
      keyGenerator: (request) => `refresh-${limitedAddress(request.ip)}`,
      onExceeded: options.metrics.refusalsOf('refreshes_per_ip'),
    })
    .bind(app);
  // The refresh_token grant is known once the body is read: a preHandler, for that grant only.
  const refreshGrantLimit = (request: FastifyRequest, reply: FastifyReply) =>
    (request.body as { grant_type?: unknown } | undefined)?.grant_type === 'refresh_token'
      ? refreshLimit(request, reply)
      : Promise.resolve();
  app.addHook('onRoute', (route) => {
    const spends = (route.config as { refreshRateLimit?: RefreshRateLimitUse } | undefined)?.refreshRateLimit;
    if (spends === 'always') route.onRequest = [...[route.onRequest ?? []].flat(), refreshLimit];
    else if (spends === 'refresh_token_grant')
      route.preHandler = [...[route.preHandler ?? []].flat(), refreshGrantLimit];
  });
}

export default fp(rateLimitPlugin, { name: 'rate-limit', fastify: '5.x' });

/** Limits for credential endpoints, per IP per minute. */
export const CREDENTIAL_RATE_LIMIT = { max: 30, timeWindow: '1 minute' } as const;
export const REFRESH_RATE_LIMIT = { max: 120, timeWindow: '1 minute' } as const;

/** When a route spends the shared refresh budget: on every request, or on the refresh_token grant's. */
export type RefreshRateLimitUse = 'always' | 'refresh_token_grant';

/** The per-IP limit a route's answers count against, as the OpenAPI document says it (`x-rate-limit`). */
export interface PerIpLimit {
  /** Requests one address may make in the window. */
  max: number;
  /** The window, in seconds. */
  window_seconds: number;
  /** What shares the counter, when not the operation alone; and when the operation spends it. */
  counter: string;
}

const SECONDS = { second: 1, minute: 60, hour: 3600 } as const;
const windowSeconds = (window: string) => {
  const [count, unit] = window.split(' ');
  return Number(count) * SECONDS[(unit ?? '').replace(/s$/, '') as keyof typeof SECONDS];
};

/**
 * The per-IP limit a route's config declares, read where the limits are applied: its own counter
 * (`config.rateLimit`, @fastify/rate-limit's) or the refresh budget (`config.refreshRateLimit`, above).
 */
export function perIpLimitOf(config: unknown): PerIpLimit | undefined {
  const { rateLimit, refreshRateLimit } = (config ?? {}) as {
    rateLimit?: unknown;
    refreshRateLimit?: RefreshRateLimitUse;
  };
  if (refreshRateLimit !== undefined)
    return {
      max: REFRESH_RATE_LIMIT.max,
      window_seconds: windowSeconds(REFRESH_RATE_LIMIT.timeWindow),
      counter:
        'one per address, shared by every refresh-token redemption (/v1/auth/refresh and the ' +
        'refresh_token grant of /oauth/token)' +
        (refreshRateLimit === 'refresh_token_grant' ? '; spent by the refresh_token grant only' : ''),
    };
  if (typeof rateLimit === 'object' && rateLimit !== null) {
    const { max, timeWindow } = rateLimit as { max: number; timeWindow: string };
    return { max, window_seconds: windowSeconds(timeWindow), counter: 'one per address for this operation' };
  }
  return undefined;
}

declare module 'fastify' {
  interface FastifyContextConfig {
    /**
     * The route spends the per-IP budget of refresh-token redemptions (REFRESH_RATE_LIMIT), one counter
     * shared by every route that declares it: on every request, or on the refresh_token grant's only.
     */
    refreshRateLimit?: RefreshRateLimitUse;
  }
}
