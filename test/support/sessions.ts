import type { FastifyInstance } from 'fastify';
import { expect } from 'vitest';
import { bearer } from './http.js';

/** A session's tokens, as a sign-in or a refresh hands them out. */
export interface SessionTokens {
  accessToken: string;
  refreshToken: string;
}

/** The tokens of a sign-in's or a registration's `session` object. */
export const tokensOf = (session: { access_token: string; refresh_token: string }): SessionTokens => ({
  accessToken: session.access_token,
  refreshToken: session.refresh_token,
});

/**
 * Whether a session stands, as its client and a resource server see it: its access token at
 * `/v1/auth/me` and at introspection, its refresh token at introspection (read, not rotated).
 * `introspector`: an access token holding `tokens:introspect`.
 */
async function standing(app: FastifyInstance, session: SessionTokens, introspector: string) {
  const introspect = async (token: string) => {
    const res = await app.inject({
      method: 'POST',
      url: '/oauth/introspect',
      headers: { ...bearer(introspector), 'content-type': 'application/x-www-form-urlencoded' },
      payload: `token=${encodeURIComponent(token)}`,
    });
    expect(res.statusCode, res.body).toBe(200);
    return (res.json() as { active: boolean }).active;
  };
  const me = await app.inject({ method: 'GET', url: '/v1/auth/me', headers: bearer(session.accessToken) });
  return {
    me: me.statusCode,
    accessActive: await introspect(session.accessToken),
    refreshActive: await introspect(session.refreshToken),
  };
}

/** The session still stands: its access token is taken, and its refresh token would be. */
export async function expectSessionLive(app: FastifyInstance, session: SessionTokens, introspector: string) {
  expect(await standing(app, session, introspector)).toEqual({
    me: 200,
    accessActive: true,
    refreshActive: true,
  });
}

/**
 * The session has ended: its refresh token gets 401 at `/v1/auth/refresh`, and its access token is
 * refused at `/v1/auth/me` and inactive at introspection.
 */
export async function expectSessionEnded(app: FastifyInstance, session: SessionTokens, introspector: string) {
  const refreshed = await app.inject({
    method: 'POST',
    url: '/v1/auth/refresh',
    payload: { refresh_token: session.refreshToken },
  });
  expect(refreshed.statusCode, 'the ended session’s refresh token at /v1/auth/refresh').toBe(401);
  expect(refreshed.json().code).toBe('invalid_refresh_token');
  expect(await standing(app, session, introspector)).toEqual({
    me: 401,
    accessActive: false,
    refreshActive: false,
  });
}
