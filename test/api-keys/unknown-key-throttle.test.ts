import type { FastifyInstance } from 'fastify';
import { afterEach, beforeAll, describe, expect, it, vi } from 'vitest';
import { API_KEY_FORMAT, generateSecret } from '../../src/lib/crypto.js';
import { API_KEY_MAX_FAILURES_PER_IP_PER_MINUTE } from '../../src/modules/api-keys/api-keys.schema.js';
import { API_KEY_IP_FAILURES_PREFIX } from '../../src/services.js';
import { appliedChanges, buildTestApp } from '../support/app.js';
import { createAdmin, registerUser, type TestUser } from '../support/factories.js';
import { bearer } from '../support/http.js';
import { randomAddress, redisAnswers, TEST_REDIS_URL } from '../support/redis.js';
import { createKey, createTestClock, withKey } from './helpers.js';

/** A well-formed key (its checksum right) whose lookup id names no key: anyone can make these. */
const madeUp = () => generateSecret(API_KEY_FORMAT).token;

const meFrom = (app: FastifyInstance, remoteAddress: string, headers: Record<string, string>) =>
  app.inject({ method: 'GET', url: '/v1/auth/me', remoteAddress, headers });

/**
 * An API key presented as a credential that names no key may cost a database read (a made-up lookup
 * id is new to every cache), so an address that presents too many in a minute gets 429 before
 * anything is read; a valid key waits for nothing, and one its holder has been using goes on working
 * from behind the same address.
 */
describe('api keys: keys that name no key are throttled per address', () => {
  let app: FastifyInstance;
  let admin: TestUser;
  let user: TestUser;
  const clock = createTestClock();

  beforeAll(async () => {
    app = await buildTestApp({ env: { RATE_LIMIT_ENABLED: 'true' }, deps: { clock } });
    admin = await createAdmin(app);
    user = await registerUser(app, 'akt-user');
  });
  afterEach(() => {
    vi.restoreAllMocks();
  });

  it('answers 429 with Retry-After past the limit, before any read, and lets a key in use through', async () => {
    const attacker = randomAddress();
    // Used once both applications of the creations are in (at the commit, and from the notification),
    // so a late one does not drop what the first use remembered.
    const heard = appliedChanges(app, (e) => (e.type === 'api_key_changed' ? e.lookupId : undefined));
    const inUse = await createKey(app, user.accessToken, { scopes: ['account:read'] });
    const unused = await createKey(app, user.accessToken, { scopes: ['account:read'] });
    await heard.bothHeard(inUse.prefix.slice(4));
    await heard.bothHeard(unused.prefix.slice(4));
    // The holder of `inUse` calls from the attacker's address (one NAT): matched here before the flood.
    expect((await meFrom(app, attacker, withKey(inUse.key))).statusCode).toBe(200);

    const reads = vi.spyOn(app.services.repos.apiKeys, 'findByLookupId');
    for (let i = 0; i < API_KEY_MAX_FAILURES_PER_IP_PER_MINUTE; i++) {
      const headers = i % 2 === 0 ? withKey(madeUp()) : bearer(madeUp());
      expect((await meFrom(app, attacker, headers)).statusCode).toBe(401);
    }
    // Each made-up lookup id was new: a read each, until the limit.
    expect(reads).toHaveBeenCalledTimes(API_KEY_MAX_FAILURES_PER_IP_PER_MINUTE);
    reads.mockClear();

    for (const headers of [withKey(madeUp()), bearer(madeUp()), withKey('pak_not-even-well-formed')]) {
      const res = await meFrom(app, attacker, headers);
      expect(res.statusCode, res.body).toBe(429);
      expect(res.json()).toMatchObject({ code: 'rate_limited' });
      expect(Number(res.headers['retry-after'])).toBeGreaterThan(0);
    }
    // The optional authentication of /oauth (a bearer API key as the caller) is held back too.
    const revoke = await app.inject({
      method: 'POST',
      url: '/oauth/revoke',
      remoteAddress: attacker,
      headers: { ...bearer(madeUp()), 'content-type': 'application/x-www-form-urlencoded' },
      payload: 'token=x',
    });
    expect(revoke.statusCode, revoke.body).toBe(429);
    expect(revoke.json()).toMatchObject({ error: 'temporarily_unavailable' });
    expect(reads).not.toHaveBeenCalled();

    // The key in use goes on working from there, also once its row has aged out of the cache (5 s)
    // and must be read again; a valid key not seen here yet waits like any other, elsewhere it works.
    expect((await meFrom(app, attacker, withKey(inUse.key))).statusCode).toBe(200);
    clock.advance(6);
    expect((await meFrom(app, attacker, withKey(inUse.key))).statusCode).toBe(200);
    expect((await meFrom(app, attacker, withKey(unused.key))).statusCode).toBe(429);
    expect((await meFrom(app, randomAddress(), withKey(unused.key))).statusCode).toBe(200);
    // Another address is not held back.
    expect((await meFrom(app, randomAddress(), withKey(madeUp()))).statusCode).toBe(401);

    // A minute after the first failure, the address may try again.
    clock.advance(61);
    expect((await meFrom(app, attacker, withKey(madeUp()))).statusCode).toBe(401);
  });

  it('counts only keys that name no key: valid, revoked and expired ones never', async () => {
    const from = randomAddress();
    const valid = await createKey(app, user.accessToken, { scopes: ['account:read'] });
    const revoked = await createKey(app, user.accessToken, { scopes: ['account:read'] });
    const expires = await createKey(app, user.accessToken, {
      scopes: ['account:read'],
      expires_at: new Date(clock.nowMs() + 60_000).toISOString(),
    });
    const deleted = await app.inject({
      method: 'DELETE',
      url: `/v1/api-keys/${revoked.id}`,
      headers: bearer(user.accessToken),
    });
    expect(deleted.statusCode).toBe(204);
    for (let i = 0; i < API_KEY_MAX_FAILURES_PER_IP_PER_MINUTE + 1; i++)
      expect((await meFrom(app, from, withKey(revoked.key))).statusCode).toBe(401);
    clock.advance(61);
    for (let i = 0; i < API_KEY_MAX_FAILURES_PER_IP_PER_MINUTE + 1; i++) {
      expect((await meFrom(app, from, withKey(expires.key))).statusCode).toBe(401);
      expect((await meFrom(app, from, withKey(valid.key))).statusCode).toBe(200);
    }
    // One short of the limit is still a 401, whatever came before.
    for (let i = 0; i < API_KEY_MAX_FAILURES_PER_IP_PER_MINUTE; i++)
      expect((await meFrom(app, from, withKey(madeUp()))).statusCode).toBe(401);
    expect((await meFrom(app, from, withKey(madeUp()))).statusCode).toBe(429);
  });

  it('counts the keys a caller revokes at /oauth/revoke that name no key, as its holder presents them', async () => {
    // Anyone may register and revoke their own keys: a made-up key there cost a read each too.
    const from = randomAddress();
    const revoke = (token: string) =>
      app.inject({
        method: 'POST',
        url: '/oauth/revoke',
        remoteAddress: from,
        headers: { ...bearer(user.accessToken), 'content-type': 'application/x-www-form-urlencoded' },
        payload: `token=${token}`,
      });
    const reads = vi.spyOn(app.services.repos.apiKeys, 'findByLookupId');
    for (let i = 0; i < API_KEY_MAX_FAILURES_PER_IP_PER_MINUTE; i++)
      expect((await revoke(madeUp())).statusCode).toBe(200);
    expect(reads).toHaveBeenCalledTimes(API_KEY_MAX_FAILURES_PER_IP_PER_MINUTE);
    reads.mockClear();
    const refused = await revoke(madeUp());
    expect(refused.statusCode, refused.body).toBe(429);
    expect(refused.json()).toMatchObject({ error: 'temporarily_unavailable' });
    expect(Number(refused.headers['retry-after'])).toBeGreaterThan(0);
    expect(reads).not.toHaveBeenCalled();
    // The same count as a request's credential.
    expect((await meFrom(app, from, withKey(madeUp()))).statusCode).toBe(429);
  });

  it('does not throttle the keys a service verifies for its own clients (the verify endpoint, introspection)', async () => {
    // The caller's address is the service's: counting its clients' keys against it would let anyone
    // who reaches that service stop every new key from verifying there.
    const service = randomAddress();
    for (let i = 0; i < API_KEY_MAX_FAILURES_PER_IP_PER_MINUTE + 1; i++) {
      const res = await app.inject({
        method: 'POST',
        url: '/v1/api-keys/verify',
        remoteAddress: service,
        headers: bearer(admin.accessToken),
        payload: { key: madeUp() },
      });
      expect(res.json()).toEqual({ valid: false, reason: 'not_found' });
    }
    const introspected = await app.inject({
      method: 'POST',
      url: '/oauth/introspect',
      remoteAddress: service,
      headers: { ...bearer(admin.accessToken), 'content-type': 'application/x-www-form-urlencoded' },
      payload: `token=${madeUp()}`,
    });
    expect(introspected.json()).toEqual({ active: false });
  });

  it('refuses malformed keys (wrong prefix, length, characters) with a 4xx and no database read', async () => {
    const from = randomAddress();
    const { token } = generateSecret(API_KEY_FORMAT);
    const reads = vi.spyOn(app.services.repos.apiKeys, 'findByLookupId');
    const malformed = [
      `${token.slice(0, 20)}é${token.slice(21)}`, // non-ASCII, right length
      `pak_${'\u00ff'.repeat(token.length - 4)}`, // Latin-1 bytes, as a raw header may carry
      `pak_${'😀'.repeat(30)}`,
      `pcs_${token.slice(4)}`, // a client secret's prefix
      `PAK_${token.slice(4)}`,
      token.replace(/_/g, '__'),
      `pak_${'a'.repeat(10_000)}`,
    ];
    for (const key of malformed) {
      for (const headers of [withKey(key), bearer(key)]) {
        const res = await meFrom(app, from, headers);
        expect(res.statusCode, key.slice(0, 40)).toBe(401);
        expect(res.headers['content-type']).toMatch(/problem\+json/);
      }
    }
    // In a body: a string up to 4096 characters is a key that does not exist; a NUL, a lone
    // surrogate or more than that is a malformed request.
    for (const [key, status] of [
      [`pak_\u0000${token.slice(5)}`, 400],
      [`pak_\ud800${token.slice(5)}`, 400],
      [`pak_${'a'.repeat(5_000)}`, 400],
      [`${token.slice(0, 20)}é${token.slice(21)}`, 200],
    ] as const) {
      const res = await app.inject({
        method: 'POST',
        url: '/v1/api-keys/verify',
        headers: bearer(admin.accessToken),
        payload: { key },
      });
      expect(res.statusCode, key.slice(0, 40)).toBe(status);
    }
    expect(reads).not.toHaveBeenCalled();
  });

  it('is off with RATE_LIMIT_ENABLED=false', async () => {
    const open = await buildTestApp();
    const from = randomAddress();
    for (let i = 0; i < API_KEY_MAX_FAILURES_PER_IP_PER_MINUTE + 1; i++)
      expect((await meFrom(open, from, withKey(madeUp()))).statusCode).toBe(401);
  });
});

const redisAvailable = await redisAnswers(TEST_REDIS_URL);

describe.runIf(redisAvailable)('api keys: the throttle of keys that name no key, across instances', () => {
  it('counts one address’s failures on A and B together, through Redis', async () => {
    const env = { REDIS_URL: TEST_REDIS_URL, RATE_LIMIT_ENABLED: 'true' };
    const a = await buildTestApp({ env });
    const b = await buildTestApp({ env });
    const from = randomAddress();
    try {
      for (let i = 0; i < API_KEY_MAX_FAILURES_PER_IP_PER_MINUTE; i++)
        expect((await meFrom(i % 2 === 0 ? a : b, from, withKey(madeUp()))).statusCode).toBe(401);
      expect(Number(await a.services.redis?.get(`${API_KEY_IP_FAILURES_PREFIX}${from}`))).toBe(
        API_KEY_MAX_FAILURES_PER_IP_PER_MINUTE,
      );
      // B heard the last failure bring the shared count to the limit.
      expect((await meFrom(b, from, withKey(madeUp()))).statusCode).toBe(429);
      // A last heard one short of it; its next failure tells it the shared count.
      expect((await meFrom(a, from, withKey(madeUp()))).statusCode).toBe(401);
      expect((await meFrom(a, from, withKey(madeUp()))).statusCode).toBe(429);
    } finally {
      await a.services.redis?.del(`${API_KEY_IP_FAILURES_PREFIX}${from}`);
    }
  });
});
