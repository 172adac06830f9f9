import { eq } from 'drizzle-orm';
import type { FastifyInstance } from 'fastify';
import { decodeJwt } from 'jose';
import { beforeAll, describe, expect, it } from 'vitest';
import { refreshTokens, sessions } from '../../src/db/schema/index.js';
import { buildTestApp } from '../support/app.js';
import { atTime } from '../support/clock.js';
import { expiredSessions, registerUser } from '../support/factories.js';
import { bearer } from '../support/http.js';
import { basic, createClient, form, userWith } from '../clients/helpers.js';

/** Where a session ends, and which client it was issued to. */
describe('a session’s end and its client', () => {
  let app: FastifyInstance;
  beforeAll(async () => {
    app = await buildTestApp();
  });

  const sidOf = (accessToken: string) => decodeJwt(accessToken).sid as string;
  const refresh = (token: string) =>
    app.inject({ method: 'POST', url: '/v1/auth/refresh', payload: { refresh_token: token } });
  const setSession = (id: string, values: Partial<typeof sessions.$inferInsert>) =>
    app.services.db.update(sessions).set(values).where(eq(sessions.id, id));

  it('DELETE of a session past its absolute or idle expiry is 404, as of an ended one: nothing changes, nothing is audited', async () => {
    const user = await registerUser(app, 'end-expired');
    const ended = await expiredSessions(app, user.email);
    // Neither is listed: the list is of live sessions.
    const listed = await app.inject({
      method: 'GET',
      url: '/v1/auth/sessions',
      headers: bearer(user.accessToken),
    });
    expect(listed.json().data.map((s: { id: string }) => s.id)).toEqual([sidOf(user.accessToken)]);
    for (const sid of ended) {
      const res = await app.inject({
        method: 'DELETE',
        url: `/v1/auth/sessions/${sid}`,
        headers: bearer(user.accessToken),
      });
      expect(res.statusCode, res.body).toBe(404);
      expect(res.json().code).toBe('not_found');
      const [row] = await app.services.db.select().from(sessions).where(eq(sessions.id, sid));
      expect(row!.revokedAt).toBeNull();
    }
    const events = await app.services.audit.list({
      type: 'auth.session_ended',
      subjectId: user.id,
      limit: 10,
    });
    expect(events).toHaveLength(0);
  });

  it('/v1/auth/refresh refuses a refresh token of a session issued to another client, and leaves it unrotated', async () => {
    const user = await registerUser(app, 'refresh-client');
    const sid = sidOf(user.accessToken);
    await setSession(sid, { clientId: 'cli_another_app' });
    const res = await refresh(user.refreshToken);
    expect(res.statusCode, res.body).toBe(401);
    expect(res.json()).toMatchObject({
      code: 'invalid_refresh_token',
      detail: 'The refresh token is invalid, expired or revoked',
    });
    const tokens = await app.services.db.select().from(refreshTokens).where(eq(refreshTokens.sessionId, sid));
    expect(tokens).toHaveLength(1);
    expect(tokens[0]!.rotatedAt).toBeNull();
    // The first-party client's own sessions (client_id null, or its id) refresh as ever.
    await setSession(sid, { clientId: 'paservices-frontend' });
    expect((await refresh(user.refreshToken)).statusCode).toBe(200);
  });

  it('/oauth/token refreshes a session issued to a confidential client for that client, authenticated, and for nobody else', async () => {
    const manager = await userWith(app, ['clients:write', 'users:read'], 'refresh-client-owner');
    const client = await createClient(app, manager.accessToken, { scopes: ['users:read'] });
    const user = await registerUser(app, 'refresh-confidential');
    await setSession(sidOf(user.accessToken), { clientId: client.client_id });
    const grant = (token: string, headers: Record<string, string> = {}) =>
      form(app, '/oauth/token', { grant_type: 'refresh_token', refresh_token: token }, headers);
    // Without the client's authentication (the public first-party client), and at /v1/auth/refresh.
    expect((await grant(user.refreshToken)).json().error).toBe('invalid_grant');
    expect((await refresh(user.refreshToken)).statusCode).toBe(401);
    const own = await grant(user.refreshToken, basic(client.client_id, client.client_secret));
    expect(own.statusCode, own.body).toBe(200);
    expect(own.json().refresh_token).toMatch(/^prt_/);
    // Its access token names the client it was issued to (RFC 9068 §2.2).
    expect(decodeJwt(own.json().access_token).client_id).toBe(client.client_id);
  });

  it('no access token outlives its session: one refreshed a minute before the absolute end expires with it', async () => {
    const user = await registerUser(app, 'token-at-end');
    const sid = sidOf(user.accessToken);
    const end = new Date(Math.floor(Date.now() / 1000) * 1000 + 60_000);
    await setSession(sid, { expiresAt: end, idleExpiresAt: end });
    const res = await refresh(user.refreshToken);
    expect(res.statusCode, res.body).toBe(200);
    const { access_token: token, expires_in: expiresIn } = res.json().session;
    const claims = decodeJwt(token);
    expect(claims.exp).toBe(end.getTime() / 1000);
    expect(expiresIn).toBe(claims.exp! - claims.iat!);
    expect(expiresIn).toBeLessThanOrEqual(60);
    const me = () => app.inject({ method: 'GET', url: '/v1/auth/me', headers: bearer(token) });
    expect((await me()).statusCode).toBe(200);
    // Past the session's end and the verification leeway (30 s), the token is refused too.
    await atTime(app, new Date(end.getTime() + 31_000), async () => {
      expect((await me()).statusCode).toBe(401);
    });
  });
});
