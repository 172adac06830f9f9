import type { FastifyInstance } from 'fastify';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { API_KEY_FORMAT, generateSecret } from '../../src/lib/crypto.js';
import { mailsPerHourKey } from '../../src/lib/throttle.js';
import { API_KEY_MAX_FAILURES_PER_IP_PER_MINUTE } from '../../src/modules/api-keys/api-keys.schema.js';
import { MAILS_PER_ACCOUNT_HOUR, mailCapKey } from '../../src/modules/auth/mailed-tokens.js';
import {
  CLIENT_AUTH_MAX_FAILURES_PER_IP_PER_MINUTE,
  CLIENT_AUTH_MAX_FAILURES_PER_MINUTE,
} from '../../src/modules/oauth/oauth.service.js';
import { PROFILE_CHANGES_PER_MINUTE } from '../../src/modules/profiles/profiles.service.js';
import { CREDENTIAL_RATE_LIMIT, REFRESH_RATE_LIMIT } from '../../src/plugins/rate-limit.js';
import { withKey } from '../api-keys/helpers.js';
import { basic, createClient, createTestClock } from '../clients/helpers.js';
import { buildTestApp } from '../support/app.js';
import { createAdmin, registerUser } from '../support/factories.js';
import { bearer } from '../support/http.js';
import { capturingMailer } from '../support/mail.js';
import { capCountings, randomAddress } from '../support/redis.js';

const LIMITERS = [
  'client_auth_failures',
  'client_auth_failures_per_ip',
  'mails_per_address',
  'profile_changes',
  'refreshes_per_ip',
  'routes_per_ip',
  'unknown_api_keys_per_ip',
];

/** auth_rate_limit_refusals_total at /metrics, by limiter. */
async function refusals(app: FastifyInstance): Promise<Record<string, number>> {
  const body = (await app.inject({ method: 'GET', url: '/metrics' })).body;
  const rows = body.matchAll(/^auth_rate_limit_refusals_total\{([^}]*)\} (\d+)$/gm);
  return Object.fromEntries([...rows].map(([, labels, n]) => [labels, Number(n)]));
}
const series = (limiter: string) => `limiter="${limiter}"`;

/**
 * Every refusal of the limits counted in Redis or in memory (services.ts, `counterOf`, and the per-IP
 * limits of plugins/rate-limit.ts) is counted in auth_rate_limit_refusals_total, by limiter: once per
 * refused attempt, under a fixed set of names.
 */
describe.each(await capCountings('rate-limit refusals'))(
  'refusals of the rate limits in /metrics, counted $counts',
  ({ env, skip }) => {
    let app: FastifyInstance;
    const clock = createTestClock();
    const mailer = capturingMailer();
    const mailCaps: string[] = [];

    beforeAll(async () => {
      if (skip) return;
      app = await buildTestApp({
        env: { RATE_LIMIT_ENABLED: 'true', MAGIC_LINK_URL: 'https://app.example.test/sign-in', ...env },
        deps: { clock, mailer },
      });
    });
    afterAll(async () => {
      for (const key of mailCaps) await app?.services.redis?.del(mailsPerHourKey(key));
    });

    /** What the test's requests add to each limiter's count. */
    async function added(work: () => Promise<void>) {
      const before = await refusals(app);
      await work();
      const after = await refusals(app);
      return Object.fromEntries(
        Object.entries(after)
          .map(([labels, n]) => [labels, n - (before[labels] ?? 0)] as const)
          .filter(([, n]) => n !== 0),
      );
    }

    it.skipIf(skip)('shows each limiter, and only those, from 0 before any refusal', async () => {
      const shown = await refusals(app);
      expect(Object.keys(shown).sort()).toEqual(LIMITERS.map(series));
    });

    it.skipIf(skip)('counts a profile change past the minute’s limit', async () => {
      const user = await registerUser(app, 'refusal-profile');
      const patch = (name: string) =>
        app.inject({
          method: 'PATCH',
          url: '/v1/profiles/me',
          headers: bearer(user.accessToken),
          payload: { display_name: name },
        });
      const counted = await added(async () => {
        for (let i = 0; i < PROFILE_CHANGES_PER_MINUTE; i++)
          expect((await patch(`n${i}`)).statusCode).toBe(200);
        expect((await patch('one too many')).statusCode).toBe(429);
      });
      expect(counted).toEqual({ [series('profile_changes')]: 1 });
    });

    it.skipIf(skip)(
      'counts a link past the hour’s mail cap of an address, though its answer is the usual',
      async () => {
        const user = await registerUser(app, 'refusal-mail');
        await app.services.repos.users.update(user.id, { emailConfirmedAt: new Date() });
        mailCaps.push(mailCapKey(app.services.config.secretPepper, 'magic_link', user.email));
        const ask = () =>
          app.inject({
            method: 'POST',
            url: '/v1/auth/magic-link',
            remoteAddress: randomAddress(),
            payload: { email: user.email },
          });
        const counted = await added(async () => {
          for (let i = 0; i < MAILS_PER_ACCOUNT_HOUR; i++) {
            expect((await ask()).statusCode).toBe(204);
            clock.advance(61);
          }
          expect((await ask()).statusCode).toBe(204);
        });
        expect(
          mailer.sent.filter((m) => m.to === user.email && m.subject === 'Your sign-in link'),
        ).toHaveLength(MAILS_PER_ACCOUNT_HOUR);
        expect(counted).toEqual({ [series('mails_per_address')]: 1 });
      },
    );

    it.skipIf(skip)(
      'counts each 429 of failed client authentications, per client and per address',
      async () => {
        const admin = await createAdmin(app);
        const client = await createClient(app, admin.accessToken, { scopes: ['tokens:introspect'] });
        const introspect = (ip: string, clientId: string, secret: string) =>
          app.inject({
            method: 'POST',
            url: '/oauth/introspect',
            remoteAddress: ip,
            headers: { 'content-type': 'application/x-www-form-urlencoded', ...basic(clientId, secret) },
            payload: 'token=x.y.z',
          });
        // Authenticated before: its header is known without a parse, a path that looks at the counts too.
        expect((await introspect(randomAddress(), client.client_id, client.client_secret)).statusCode).toBe(
          200,
        );
        const attacker = randomAddress();
        const byClient = await added(async () => {
          for (let i = 0; i < CLIENT_AUTH_MAX_FAILURES_PER_MINUTE; i++)
            expect((await introspect(attacker, client.client_id, 'pcs_wrong')).statusCode).toBe(401);
          for (const secret of ['pcs_wrong', client.client_secret])
            expect((await introspect(attacker, client.client_id, secret)).statusCode).toBe(429);
        });
        expect(byClient).toEqual({ [series('client_auth_failures')]: 2 });

        const sprayer = randomAddress();
        const unknown = (i: number) => `pci_refused${String(i).padStart(8, '0')}`;
        const byAddress = await added(async () => {
          for (let i = 0; i < CLIENT_AUTH_MAX_FAILURES_PER_IP_PER_MINUTE; i++)
            expect((await introspect(sprayer, unknown(i), 'pcs_wrong')).statusCode).toBe(401);
          expect((await introspect(sprayer, client.client_id, client.client_secret)).statusCode).toBe(429);
        });
        expect(byAddress).toEqual({ [series('client_auth_failures_per_ip')]: 1 });
      },
    );

    it.skipIf(skip)('counts each 429 of API keys that name no key from an address', async () => {
      const attacker = randomAddress();
      const me = () =>
        app.inject({
          method: 'GET',
          url: '/v1/auth/me',
          remoteAddress: attacker,
          headers: withKey(generateSecret(API_KEY_FORMAT).token),
        });
      const counted = await added(async () => {
        for (let i = 0; i < API_KEY_MAX_FAILURES_PER_IP_PER_MINUTE; i++)
          expect((await me()).statusCode).toBe(401);
        for (let i = 0; i < 2; i++) expect((await me()).statusCode).toBe(429);
      });
      expect(counted).toEqual({ [series('unknown_api_keys_per_ip')]: 2 });
    });

    it.skipIf(skip)(
      'counts each 429 of a route’s own per-IP limit, under one name for every route',
      async () => {
        const address = randomAddress();
        // Refused before the body is read (an empty one is a 400 while the limit lets it through).
        const post = (url: string) =>
          app.inject({ method: 'POST', url, remoteAddress: address, payload: {} });
        const counted = await added(async () => {
          for (let i = 0; i < CREDENTIAL_RATE_LIMIT.max; i++)
            expect((await post('/v1/auth/register')).statusCode).toBe(400);
          for (let i = 0; i < 2; i++) expect((await post('/v1/auth/register')).statusCode).toBe(429);
          for (let i = 0; i < CREDENTIAL_RATE_LIMIT.max; i++)
            expect((await post('/v1/auth/password/forgot')).statusCode).toBe(400);
          expect((await post('/v1/auth/password/forgot')).statusCode).toBe(429);
        });
        expect(counted).toEqual({ [series('routes_per_ip')]: 3 });
      },
    );

    it.skipIf(skip)(
      'counts each 429 of the per-IP refresh budget, at either route that spends it',
      async () => {
        const address = randomAddress();
        const refresh = () =>
          app.inject({ method: 'POST', url: '/v1/auth/refresh', remoteAddress: address, payload: {} });
        const counted = await added(async () => {
          for (let i = 0; i < REFRESH_RATE_LIMIT.max; i++) expect((await refresh()).statusCode).toBe(400);
          for (let i = 0; i < 2; i++) expect((await refresh()).statusCode).toBe(429);
          const grant = await app.inject({
            method: 'POST',
            url: '/oauth/token',
            remoteAddress: address,
            headers: { 'content-type': 'application/x-www-form-urlencoded' },
            payload: 'grant_type=refresh_token&refresh_token=prt_refused',
          });
          expect(grant.statusCode).toBe(429);
        });
        expect(counted).toEqual({ [series('refreshes_per_ip')]: 3 });
      },
    );
  },
);

describe('refusals of the rate limits without RATE_LIMIT_ENABLED', () => {
  it('shows no limiter: there is none', async () => {
    const app = await buildTestApp();
    expect(await refusals(app)).toEqual({});
  });
});
