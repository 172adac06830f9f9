import Fastify, { type FastifyInstance } from 'fastify';
import { beforeAll, describe, expect, it } from 'vitest';
import authenticate, { principalTaking, signedInSession } from '../../src/plugins/authenticate.js';
import { buildTestApp } from '../support/app.js';
import { decidedOnHeldNow } from '../support/authz-matrix.js';
import { ALL_ROUTES } from './routes.js';

describe('every route declares its access', () => {
  let app: FastifyInstance;
  beforeAll(async () => {
    // With CORS origins, so the preflight route exists too.
    app = await buildTestApp({ env: { CORS_ORIGINS: 'https://app.example.test' } });
  });

  const own = (url: string) => !url.startsWith('/docs');

  it('has a permission or an explicit public marker on every route', () => {
    const undeclared = app.routeTable.filter((r) => !r.public && !r.permission);
    expect(undeclared.map((r) => `${r.method} ${r.url}`)).toEqual([]);
    // Swagger UI's pages are public by the docs prefix, not by accident.
    expect(app.routeTable.filter((r) => r.url.startsWith('/docs')).every((r) => r.public)).toBe(true);
  });

  it('refuses to start when a protected route was registered before the credential check', async () => {
    const bare = Fastify({ logger: false });
    // As buildApp's route table records it: a route nobody marked public, registered too early.
    bare.decorate('routeTable', [{ method: 'GET', url: '/early', public: false, permission: 'users:read' }]);
    bare.get('/early', async () => 'unchecked');
    await bare.register(authenticate, { tokens: app.services.tokens });
    await expect(bare.ready()).rejects.toThrow(/no credential check: GET \/early/);
    await bare.close().catch(() => {});
  });

  it('serves nobody on a route whose handler relies on a credential the route does not declare (the document would not say)', async () => {
    const bare = Fastify({ logger: false });
    bare.get('/undeclared', async (request) => signedInSession(request));
    bare.get('/other', { config: { credential: 'access_token' } }, async (request) =>
      signedInSession(request),
    );
    bare.get('/tokens', async (request) => principalTaking(request, 'access_token'));
    bare.get('/declared', { config: { credential: 'user_session' } }, async (request) =>
      signedInSession(request),
    );
    // Refused before the caller is looked at (a signed-in one too); declared, it asks for the session.
    for (const url of ['/undeclared', '/other', '/tokens'])
      expect((await bare.inject({ url })).statusCode, url).toBe(403);
    expect((await bare.inject({ url: '/declared' })).statusCode).toBe(401);
    await bare.close();
  });

  it('lists every route of the app in the authorization matrix, with the same declaration', () => {
    // The permission, whether a change is decided on what is held now (`heldNow: false` marks the
    // changing routes decided on the credential alone), and whether a signed-in user's token needs no
    // permission to end its own session there (`ownSession`).
    const declared = new Map(
      ALL_ROUTES.map((r) => [
        `${r.method} ${r.route}`,
        { permission: r.permission, heldNow: decidedOnHeldNow(r), ownSession: r.ownSession === true },
      ]),
    );
    const problems: string[] = [];
    for (const r of app.routeTable.filter((x) => own(x.url))) {
      const key = `${r.method} ${r.url}`;
      if (!declared.has(key)) problems.push(`${key}: missing from test/authz/routes.ts`);
      else {
        const expected = declared.get(key);
        const actual = {
          permission: r.public ? 'public' : r.permission,
          heldNow: r.heldNow === true,
          ownSession: r.ownSession === true,
        };
        if (JSON.stringify(expected) !== JSON.stringify(actual))
          problems.push(
            `${key}: declares ${JSON.stringify(actual)}, matrix says ${JSON.stringify(expected)}`,
          );
      }
    }
    const appRoutes = new Set(app.routeTable.map((r) => `${r.method} ${r.url}`));
    for (const key of declared.keys())
      if (!appRoutes.has(key)) problems.push(`${key}: in the matrix but not in the app`);
    expect(problems).toEqual([]);
  });
});
