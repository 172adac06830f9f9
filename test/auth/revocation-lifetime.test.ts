import type { FastifyInstance } from 'fastify';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { decodeJwt } from 'jose';
import pino from 'pino';
import { createRevocationList } from '../../src/modules/tokens/revocations.service.js';
import { type AccessTokenClaims, CLOCK_TOLERANCE_SECONDS } from '../../src/modules/tokens/tokens.service.js';
import { basic, clientToken, createClient, createTestClock, form, userWith } from '../clients/helpers.js';
import { buildTestApp } from '../support/app.js';
import { atTime } from '../support/clock.js';
import { ownDatabase } from '../support/database.js';
import { createAdmin, login, registerUser, setUserStatus, type TestUser } from '../support/factories.js';
import { bearer } from '../support/http.js';

/*
 * A revocation by session (logout) or by subject (a disabled user, a disabled or deleted client)
 * covers tokens of the longest lifetime, which this service accepts until their `exp` plus the
 * leeway. It must last that long too: forgotten at `exp`, it would hand the token back for the rest
 * of the leeway.
 */
describe('a revocation outlives every token it covers, leeway included', () => {
  const clock = createTestClock();
  let own: Awaited<ReturnType<typeof ownDatabase>>;
  let app: FastifyInstance;
  let admin: TestUser;
  let maxTtl: number;

  beforeAll(async () => {
    // On a database of its own: the clock here runs a day ahead (the longest lifetime), past the
    // publication window of a key another file retires on the shared database (24 h + 10 min from
    // the wall clock's now), which this app's reload would unpublish (the tokens read here refused
    // as invalid, not revoked), and this app's housekeeping would retire other files' retiring keys
    // (as mfa.test.ts's TOTP describe found).
    own = await ownDatabase('auth_revocation_lifetime');
    // Users' tokens live as long as clients' may: the longest lifetime the service issues.
    app = await buildTestApp({
      env: { ACCESS_TOKEN_TTL: '86400' },
      deps: { database: own.database, clock },
    });
    maxTtl = app.services.config.tokens.maxAccessTtl;
    expect(maxTtl).toBe(86_400);
    admin = await createAdmin(app);
  });

  afterAll(async () => {
    await app?.close();
    await own?.dispose();
  });

  const read = (token: string) =>
    app.inject({ method: 'GET', url: '/v1/users?limit=1', headers: bearer(token) });
  const longClient = () =>
    createClient(app, admin.accessToken, { scopes: ['users:read'], access_token_ttl: maxTtl });

  it('logout, a disabled user, a disabled or deleted client and /oauth/revoke: refused until exp + leeway', async () => {
    const disabled = await longClient();
    const deleted = await longClient();
    const revokedByJti = await longClient();
    const untouched = await longClient();
    const loggedOut = await userWith(app, ['users:read'], 'logout');
    const disabledUser = await userWith(app, ['users:read'], 'disabled');
    const activeUser = await userWith(app, ['users:read'], 'active');

    const tokens = {
      disabledClient: (await clientToken(app, disabled)).access_token,
      deletedClient: (await clientToken(app, deleted)).access_token,
      revokedByJti: (await clientToken(app, revokedByJti)).access_token,
      loggedOut: loggedOut.accessToken,
      disabledUser: disabledUser.accessToken,
    };
    const controls = {
      client: (await clientToken(app, untouched)).access_token,
      user: activeUser.accessToken,
    };
    for (const token of [...Object.values(tokens), ...Object.values(controls)])
      expect((await read(token)).statusCode).toBe(200);

    const ok = (res: { statusCode: number; body: string }, status: number) =>
      expect(res.statusCode, res.body).toBe(status);
    ok(
      await app.inject({
        method: 'PATCH',
        url: `/v1/clients/${disabled.id}`,
        headers: bearer(admin.accessToken),
        payload: { status: 'disabled' },
      }),
      200,
    );
    ok(
      await app.inject({
        method: 'DELETE',
        url: `/v1/clients/${deleted.id}`,
        headers: bearer(admin.accessToken),
      }),
      204,
    );
    ok(
      await form(
        app,
        '/oauth/revoke',
        { token: tokens.revokedByJti },
        basic(revokedByJti.client_id, revokedByJti.client_secret),
      ),
      200,
    );
    ok(
      await app.inject({ method: 'POST', url: '/v1/auth/logout', headers: bearer(loggedOut.accessToken) }),
      204,
    );
    ok(
      await app.inject({
        method: 'PATCH',
        url: `/v1/users/${disabledUser.id}`,
        headers: bearer(admin.accessToken),
        payload: { status: 'disabled' },
      }),
      200,
    );
    for (const [name, token] of Object.entries(tokens))
      expect((await read(token)).statusCode, name).toBe(401);

    // The tokens expired 10 s ago: within the leeway, so an unrevoked one is still accepted...
    clock.advance(maxTtl + 10);
    // ...and the revocations are still held after the housekeeping drops the expired ones, in memory
    // and from the database (what every instance reloads).
    app.services.revocations.prune();
    await app.services.revocations.reload();
    for (const token of Object.values(controls)) expect((await read(token)).statusCode).toBe(200);
    for (const [name, token] of Object.entries(tokens)) {
      const res = await read(token);
      expect(res.statusCode, `${name}: ${res.body}`).toBe(401);
      expect(res.json().detail, name).toBe('The access token has been revoked');
    }
    // An instance started now (a restart, a new one behind the load balancer) has only the database's
    // rows to go by: they are still there, and revoke the same tokens.
    const fresh = createRevocationList({
      repo: app.services.repos.revocations,
      clock,
      logger: pino({ level: 'silent' }),
      maxAccessTtl: maxTtl,
    });
    await fresh.reload();
    for (const [name, token] of Object.entries(tokens))
      expect(fresh.isRevoked(decodeJwt(token) as AccessTokenClaims), name).toBe(true);
    for (const token of Object.values(controls))
      expect(fresh.isRevoked(decodeJwt(token) as AccessTokenClaims)).toBe(false);

    // Past the leeway, every one of them has expired, and the revocations may go.
    clock.advance(CLOCK_TOLERANCE_SECONDS);
    app.services.revocations.prune();
    for (const token of [...Object.values(tokens), ...Object.values(controls)]) {
      const res = await read(token);
      expect(res.statusCode).toBe(401);
      expect(res.json().detail).toBe('The access token has expired');
    }
  });
});

describe('a revocation covers the tokens issued before it, to the millisecond', () => {
  it('disabled and enabled again within one second: the token from before is revoked, the one after works', async () => {
    const app = await buildTestApp();
    const admin = await createAdmin(app);
    const user = await registerUser(app, 'same-second');
    const me = (token: string) => app.inject({ method: 'GET', url: '/v1/auth/me', headers: bearer(token) });
    const setStatus = async (status: 'active' | 'disabled') =>
      expect((await setUserStatus(app, admin.accessToken, user.id, status)).statusCode).toBe(200);
    // All of it within one second of the service's clock (whole-second `iat`s then agree), however
    // slow the machine: the clock moves a millisecond per read, not with the wall clock.
    const second = new Date(Math.ceil(Date.now() / 1000) * 1000 + 10_000);
    await atTime(
      app,
      second,
      async () => {
        const before = (await login(app, user.email)).session.access_token;
        await setStatus('disabled');
        await setStatus('active');
        const after = (await login(app, user.email)).session.access_token;
        expect((await me(before)).statusCode).toBe(401);
        expect((await me(after)).statusCode, 'a token issued after the re-enabling').toBe(200);
        const iat = (token: string) =>
          JSON.parse(Buffer.from(token.split('.')[1]!, 'base64url').toString()).iat;
        expect(iat(before)).toBe(iat(after));
      },
      { stepping: true },
    );
  });
});
