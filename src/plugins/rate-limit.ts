import rateLimit from '@fastify/rate-limit';
import type { FastifyInstance } from 'fastify';
import fp from 'fastify-plugin';
import type { Redis } from 'ioredis';
import { AppError } from '../lib/errors.js';

/**
 * Per-IP throttling of credential endpoints (routes opt in with `config.rateLimit`). The IP is the
 * socket's unless TRUST_PROXY names the proxies, so X-Forwarded-For cannot dodge it. Counters live in
 * Redis when configured (shared by every instance); if Redis fails, requests are let through
 * (logged) and the per-account failure counter still applies.
 */
async function rateLimitPlugin(app: FastifyInstance, options: { redis?: Redis | undefined }) {
  await app.register(rateLimit, {
    global: false,
    ...(options.redis ? { redis: options.redis, nameSpace: 'paservices:auth:rl:' } : {}),
    skipOnError: true,
    keyGenerator: (request) => request.ip,
    errorResponseBuilder: (_request, context) =>
      new AppError('rate_limited', {
        detail: `Too many requests; retry in ${Math.ceil(context.ttl / 1000)} s`,
        headers: { 'retry-after': String(Math.ceil(context.ttl / 1000)) },
      }),
  });
}

export default fp(rateLimitPlugin, { name: 'rate-limit', fastify: '5.x' });

/** Limits for credential endpoints, per IP per minute. */
export const CREDENTIAL_RATE_LIMIT = { max: 30, timeWindow: '1 minute' } as const;
export const REFRESH_RATE_LIMIT = { max: 120, timeWindow: '1 minute' } as const;
