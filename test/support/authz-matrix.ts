import { randomUUID } from 'node:crypto';
import type { FastifyInstance } from 'fastify';
import type { InjectOptions } from 'light-my-request';
import { beforeAll, describe, expect, it } from 'vitest';
import { createKey } from '../api-keys/helpers.js';
import { createAdmin, login, registerUser, type TestUser } from './factories.js';
import { bearer } from './http.js';

type Method = 'OPTIONS' | 'GET' | 'POST' | 'PUT' | 'PATCH' | 'DELETE';

export interface MatrixContext {
  /** A plain user (the built-in `user` role) who owns objects made by `setup`. */
  owner: TestUser;
  /** Whatever `setup` returned (ids of the owner's objects). */
  fixtures: Record<string, string>;
}

export interface MatrixRoute {
  method: Method;
  /** The route pattern as registered (e.g. `/v1/users/:id`): checked against the app's route table. */
  route: string;
  /** The declared permission: one, any of several, or 'public'. */
  permission: string | string[] | 'public';
  /** The concrete URL to call; defaults to the pattern with random UUIDs for the parameters. */
  url?: (ctx: MatrixContext) => string;
  body?: (ctx: MatrixContext) => InjectOptions['payload'];
  /** For routes on an object that belongs to someone: the owner's object, requested by another user → 404. */
  foreignObject?: boolean;
  /**
   * `false` for a changing route decided on its credential alone (config.heldNow: a verification, a
   * question, ending one's own access); every other POST, PUT, PATCH and DELETE is decided on what
   * the caller holds now.
   */
  heldNow?: false;
  /**
   * `true` for a route that ends the caller's own session (config.ownSession): a signed-in user's
   * token needs no permission there, so its 403 is checked with another principal holding none, an
   * API key without scopes.
   */
  ownSession?: true;
}

/** Whether the app decides this route on what its caller holds now (as plugins/authenticate.ts does). */
export const decidedOnHeldNow = (route: MatrixRoute) =>
  route.permission !== 'public' && route.heldNow !== false && !['GET', 'OPTIONS'].includes(route.method);

const fillParams = (pattern: string) =>
  pattern.replace(/:([a-z_]+)/g, (_m, name: string) => (name === 'role' ? 'nonexistent-role' : randomUUID()));

export function urlOf(route: MatrixRoute, ctx: MatrixContext) {
  return route.url ? route.url(ctx) : fillParams(route.route);
}

/**
 * The authorization matrix every module's *.security.test.ts runs over its routes: without
 * credentials → 401; a principal without the permission → 403; another user's object → 404; on a
 * changing route, a token whose permissions were all taken away after it was issued → 403.
 */
export function authorizationMatrix(
  name: string,
  getApp: () => FastifyInstance,
  routes: MatrixRoute[],
  setup?: (app: FastifyInstance, owner: TestUser) => Promise<Record<string, string>>,
) {
  describe(`authorization matrix: ${name}`, () => {
    let app: FastifyInstance;
    let ctx: MatrixContext;
    let powerless: TestUser;
    let stranger: TestUser;
    let demoted: TestUser;
    /** An API key of the owner's with no scopes: a principal holding nothing that has no session. */
    let scopeless: string;

    beforeAll(async () => {
      app = getApp();
      const owner = await registerUser(app, 'owner');
      ctx = { owner, fixtures: setup ? await setup(app, owner) : {} };
      stranger = await registerUser(app, 'stranger');
      // A principal holding no permission at all: a user stripped of the `user` role.
      powerless = await registerUser(app, 'powerless');
      await app.services.repos.users.removeRole(powerless.id, 'user');
      const fresh = await login(app, powerless.email, powerless.password);
      powerless = { ...powerless, accessToken: fresh.session.access_token };
      // An administrator's token (scope `*`) whose every role was removed after it was issued.
      demoted = await createAdmin(app);
      for (const role of ['admin', 'user']) await app.services.repos.users.removeRole(demoted.id, role);
      scopeless = (await createKey(app, owner.accessToken, { scopes: [] })).key;
    });

    const protectedRoutes = routes.filter((r) => r.permission !== 'public');

    it.each(protectedRoutes.map((r) => [`${r.method} ${r.route}`, r] as const))(
      '%s → 401 without credentials',
      async (_label, route) => {
        const res = await app.inject({
          method: route.method,
          url: urlOf(route, ctx),
          payload: route.body?.(ctx),
        });
        expect(res.statusCode, res.body).toBe(401);
        expect(res.headers['www-authenticate']).toMatch(/^Bearer/);
        expect(res.headers['content-type']).toContain('application/problem+json');
      },
    );

    it.each(protectedRoutes.map((r) => [`${r.method} ${r.route}`, r] as const))(
      '%s → 403 for a principal without the permission',
      async (_label, route) => {
        const res = await app.inject({
          method: route.method,
          url: urlOf(route, ctx),
          headers: bearer(route.ownSession ? scopeless : powerless.accessToken),
          payload: route.body?.(ctx),
        });
        expect(res.statusCode, res.body).toBe(403);
        expect(res.json().code).toBe('forbidden');
      },
    );

    const changing = protectedRoutes.filter(decidedOnHeldNow);
    if (changing.length > 0) {
      it.each(changing.map((r) => [`${r.method} ${r.route}`, r] as const))(
        '%s → 403 for a token whose permission was taken away since it was issued, audited',
        async (_label, route) => {
          const res = await app.inject({
            method: route.method,
            url: urlOf(route, ctx),
            headers: bearer(demoted.accessToken),
            payload: route.body?.(ctx),
          });
          expect(res.statusCode, res.body).toBe(403);
          expect(res.json()).toMatchObject({
            code: 'forbidden',
            detail: expect.stringContaining('taken away'),
          });
          const [event] = await app.services.audit.list({
            type: 'authorization.denied',
            actorId: demoted.id,
            limit: 1,
          });
          expect(event?.data).toMatchObject({
            reason: 'no_longer_held',
            route: route.route,
            method: route.method,
          });
        },
      );
    }

    const foreign = routes.filter((r) => r.foreignObject);
    if (foreign.length > 0) {
      it.each(foreign.map((r) => [`${r.method} ${r.route}`, r] as const))(
        '%s → 404 on another user’s object',
        async (_label, route) => {
          const res = await app.inject({
            method: route.method,
            url: urlOf(route, ctx),
            headers: bearer(stranger.accessToken),
            payload: route.body?.(ctx),
          });
          expect(res.statusCode, res.body).toBe(404);
        },
      );
    }
  });
}
