import type { FastifyInstance } from 'fastify';
import { beforeAll, describe, expect, it } from 'vitest';
import { ADMIN_ROUTES, AUTH_ROUTES, PROFILE_ROUTES } from '../authz/routes.js';
import { buildTestApp } from '../support/app.js';
import { authorizationMatrix, urlOf } from '../support/authz-matrix.js';
import { login, registerUser } from '../support/factories.js';
import { bearer } from '../support/http.js';

let app: FastifyInstance;
beforeAll(async () => {
  app = await buildTestApp();
});

authorizationMatrix('users, roles, audit, signing keys', () => app, ADMIN_ROUTES);
authorizationMatrix('profiles', () => app, PROFILE_ROUTES);
authorizationMatrix(
  'auth',
  () => app,
  AUTH_ROUTES,
  async (a, owner) => {
    const second = await login(a, owner.email, owner.password);
    const sessions = await a.inject({
      method: 'GET',
      url: '/v1/auth/sessions',
      headers: bearer(second.session.access_token),
    });
    return { sessionId: (sessions.json().data as Array<{ id: string }>)[0]!.id };
  },
);

describe('a plain user on the administration surface', () => {
  it('gets 403 on every administration route', async () => {
    const user = await registerUser(app, 'plain');
    const ctx = { owner: user, fixtures: {} };
    for (const route of ADMIN_ROUTES) {
      const res = await app.inject({
        method: route.method,
        url: urlOf(route, ctx),
        headers: bearer(user.accessToken),
        payload: route.body?.(ctx),
      });
      expect(res.statusCode, `${route.method} ${route.route}`).toBe(403);
    }
  });

  it('leaves an audit event for every authorization failure', async () => {
    const user = await registerUser(app, 'denied');
    const res = await app.inject({
      method: 'GET',
      url: '/v1/audit-events',
      headers: bearer(user.accessToken),
    });
    expect(res.statusCode).toBe(403);
    const events = await app.services.audit.list({
      type: 'authorization.denied',
      actorId: user.id,
      limit: 10,
    });
    expect(events).toHaveLength(1);
    expect(events[0]).toMatchObject({
      outcome: 'failure',
      actorType: 'user',
      data: { permission: 'audit:read', route: '/v1/audit-events', method: 'GET' },
    });
  });
});
