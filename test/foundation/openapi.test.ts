import { Validator } from '@seriousme/openapi-schema-validator';
import { randomUUID } from 'node:crypto';
import type { FastifyInstance } from 'fastify';
import { beforeAll, describe, expect, it } from 'vitest';
import { buildTestApp } from '../support/app.js';
import { createAdmin, registerUser, setUserStatus } from '../support/factories.js';
import { bearer } from '../support/http.js';
import { createKey, withKey } from '../api-keys/helpers.js';
import { PERMISSIONS } from '../../src/lib/permissions.js';
import { OWN_SESSION_SENTENCE } from '../../src/plugins/openapi.js';
import { ALL_ROUTES } from '../authz/routes.js';
import { basic, clientToken, createClient, form, userWith } from '../clients/helpers.js';

describe('the OpenAPI document', () => {
  let app: FastifyInstance;
  let doc: {
    openapi: string;
    paths: Record<
      string,
      Record<string, { operationId?: string; tags?: string[]; summary?: string; responses?: object }>
    >;
  };
  beforeAll(async () => {
    app = await buildTestApp();
    doc = (await app.inject({ method: 'GET', url: '/openapi.json' })).json();
  });

  it('validates against the OpenAPI 3.1 schema', async () => {
    const validator = new Validator();
    const result = await validator.validate(structuredClone(doc));
    expect(result.errors ?? []).toEqual([]);
    expect(result.valid).toBe(true);
    expect(validator.version).toBe('3.1');
  });

  it('carries no $id or $schema in its schemas, so references resolve from the document root', () => {
    // A schema's $id starts a new JSON Schema resource in OpenAPI 3.1: Swagger UI then resolved
    // `#/components/schemas/Problem` inside that schema and showed "Could not resolve reference".
    const found: string[] = [];
    const walk = (node: unknown, at: string) => {
      if (Array.isArray(node)) {
        for (const [i, item] of node.entries()) walk(item, `${at}/${i}`);
      } else if (node !== null && typeof node === 'object') {
        for (const [key, value] of Object.entries(node)) {
          if ((key === '$id' || key === '$schema') && typeof value === 'string') found.push(`${at}/${key}`);
          walk(value, `${at}/${key}`);
        }
      }
    };
    walk(doc, '#');
    expect(found).toEqual([]);
  });

  it('holds the component schemas its operations use and no others (a generator writes a model for each)', () => {
    const { components } = doc as unknown as { components: { schemas: Record<string, unknown> } };
    const text = JSON.stringify(doc.paths);
    const used = new Set<string>();
    const reach = (json: string) => {
      for (const [, name] of json.matchAll(/"#\/components\/schemas\/([^"]+)"/g))
        if (!used.has(name!)) {
          used.add(name!);
          reach(JSON.stringify(components.schemas[name!] ?? null));
        }
    };
    reach(text);
    expect(Object.keys(components.schemas).filter((name) => !used.has(name))).toEqual([]);
    // Every reference resolves.
    expect([...used].filter((name) => !(name in components.schemas))).toEqual([]);
    expect(Object.keys(components.schemas)).toEqual(
      expect.arrayContaining([
        'Problem',
        'User',
        'Session',
        'ApiKey',
        'Client',
        'TokenResponse',
        'OAuthError',
      ]),
    );
  });

  it('marks optional bodies optional, never as a required body that may be null (the parser refuses null)', async () => {
    const nullable: string[] = [];
    for (const [path, item] of Object.entries(doc.paths)) {
      for (const [method, op] of Object.entries(item)) {
        const body = (op as { requestBody?: { content?: Record<string, { schema?: { anyOf?: object[] } }> } })
          .requestBody;
        for (const media of Object.values(body?.content ?? {}))
          if (media.schema?.anyOf?.some((s) => (s as { type?: string }).type === 'null'))
            nullable.push(`${method.toUpperCase()} ${path}`);
      }
    }
    expect(nullable).toEqual([]);
    const optional = [
      '/v1/auth/logout',
      '/v1/signing-keys/rotate',
      '/v1/api-keys/{id}/rotate',
      '/v1/clients/{id}/secrets',
    ];
    for (const path of optional)
      expect(
        (doc.paths[path]!.post as { requestBody?: { required?: boolean } }).requestBody?.required,
        path,
      ).toBe(false);
    // As documented: no body at all is accepted, and the JSON null is not.
    const user = await registerUser(app);
    const logout = (payload?: string) =>
      app.inject({
        method: 'POST',
        url: '/v1/auth/logout',
        headers: { ...bearer(user.accessToken), ...(payload ? { 'content-type': 'application/json' } : {}) },
        ...(payload ? { payload } : {}),
      });
    expect((await logout('null')).statusCode).toBe(400);
    expect((await logout()).statusCode).toBe(204);
  });

  it('declares errors in the media type they are sent in: problem+json, and RFC 6749 JSON under /oauth', async () => {
    const declared = new Set<string>();
    for (const [path, item] of Object.entries(doc.paths)) {
      for (const op of Object.values(item)) {
        for (const [status, response] of Object.entries(
          (op.responses ?? {}) as Record<
            string,
            { content?: Record<string, { schema?: { $ref?: string } }> }
          >,
        )) {
          if (Number(status) < 400) continue;
          for (const [type, media] of Object.entries(response.content ?? {}))
            if (media.schema?.$ref === '#/components/schemas/Problem' || path.startsWith('/oauth/'))
              declared.add(`${path.startsWith('/oauth/') ? 'oauth' : 'api'} ${type}`);
        }
      }
    }
    expect([...declared].sort()).toEqual(['api application/problem+json', 'oauth application/json']);
    const missing = await app.inject({ method: 'GET', url: '/v1/users/not-a-uuid', headers: bearer('x') });
    expect(missing.headers['content-type']).toMatch(/^application\/problem\+json/);
    const oauth = await app.inject({ method: 'POST', url: '/oauth/token', payload: {} });
    expect(oauth.headers['content-type']).toMatch(/^application\/json/);
  });

  it('declares Retry-After on every 429 and 503 but /health’s, and on the too-soon signing-key rotation', () => {
    const declared: string[] = [];
    const missing: string[] = [];
    for (const [path, item] of Object.entries(doc.paths)) {
      for (const [method, operation] of Object.entries(item)) {
        const responses = (operation.responses ?? {}) as Record<
          string,
          { headers?: Record<string, unknown> }
        >;
        for (const [status, response] of Object.entries(responses)) {
          const has = response.headers?.['Retry-After'] !== undefined;
          const expected = (status === '429' || status === '503') && !path.startsWith('/health/');
          if (has) declared.push(`${method.toUpperCase()} ${path} ${status}`);
          else if (expected) missing.push(`${method.toUpperCase()} ${path} ${status}`);
        }
      }
    }
    expect(missing).toEqual([]);
    expect(declared).toContain('POST /v1/auth/login 429');
    expect(declared).toContain('POST /v1/auth/login 503');
    expect(declared).toContain('POST /oauth/token 429');
    expect(declared).toContain('POST /v1/signing-keys/rotate 409');
    expect(declared).toContain('POST /v1/api-keys/{id}/rotate 409');
    expect(declared).toContain('POST /v1/clients/{id}/secrets 409');
    expect(declared.filter((d) => d.startsWith('GET /health/'))).toEqual([]);
  });

  it('declares the Location of what a 201 made, and the JWKS’s ETag, Cache-Control and If-None-Match', async () => {
    type Operation = {
      parameters?: Array<{ name: string; in: string }>;
      responses: Record<string, { headers?: Record<string, unknown> }>;
    };
    const op = (path: string, method: string) => doc.paths[path]![method] as unknown as Operation;
    for (const path of [
      '/v1/users',
      '/v1/roles',
      '/v1/api-keys',
      '/v1/clients',
      '/v1/auth/register',
      '/v1/auth/mfa/totp',
    ])
      expect(op(path, 'post').responses['201']!.headers?.Location, path).toBeDefined();
    // A re-invitation (200) names the user too; a client's new secret has no URL of its own.
    expect(op('/v1/users', 'post').responses['200']!.headers?.Location).toBeDefined();
    expect(op('/v1/clients/{id}/secrets', 'post').responses['201']!.headers?.Location).toBeUndefined();
    const jwks = op('/.well-known/jwks.json', 'get');
    for (const status of ['200', '304'])
      expect(Object.keys(jwks.responses[status]!.headers ?? {}), status).toEqual(['ETag', 'Cache-Control']);
    expect(jwks.parameters).toContainEqual(expect.objectContaining({ name: 'If-None-Match', in: 'header' }));
    // And the conditional request it documents works.
    const first = await app.inject({ method: 'GET', url: '/.well-known/jwks.json' });
    const again = await app.inject({
      method: 'GET',
      url: '/.well-known/jwks.json',
      headers: { 'if-none-match': String(first.headers.etag) },
    });
    expect(again.statusCode).toBe(304);
    expect(
      op('/.well-known/openid-configuration', 'get').responses['200']!.headers?.['Cache-Control'],
    ).toBeDefined();
  });

  it('declares WWW-Authenticate on every 401 of an operation that takes credentials, and on a bearer credential’s 400 and 403', () => {
    const missing: string[] = [];
    const declared = new Map<string, string>();
    for (const [path, item] of Object.entries(doc.paths)) {
      for (const [method, operation] of Object.entries(item)) {
        const { security = [], responses = {} } = operation as {
          security?: Array<Record<string, unknown>>;
          responses?: Record<string, { headers?: Record<string, { description?: string }> }>;
        };
        const schemes = new Set(security.flatMap((s) => Object.keys(s)));
        for (const [status, response] of Object.entries(responses)) {
          const header = response.headers?.['WWW-Authenticate'];
          const label = `${method.toUpperCase()} ${path} ${status}`;
          if (header?.description) declared.set(label, header.description);
          const expected =
            (status === '401' && schemes.size > 0) ||
            (status === '403' && schemes.has('bearerAuth') && !path.startsWith('/oauth/'));
          if (expected && !header) missing.push(label);
        }
      }
    }
    expect(missing).toEqual([]);
    expect(declared.get('GET /v1/users 403')).toMatch(/insufficient_scope/);
    expect(declared.get('GET /v1/users 401')).toMatch(/invalid_token/);
    expect(declared.get('GET /v1/users 400')).toMatch(/invalid_request/);
    expect(declared.get('POST /oauth/introspect 401')).toMatch(/scope="tokens:introspect"/);
    expect(declared.get('POST /oauth/token 401')).toMatch(/^`Basic/);
    // Public operations send none.
    expect([...declared.keys()].filter((k) => k.startsWith('POST /v1/auth/login '))).toEqual([]);
  });

  it('names on every protected operation the permission its route declares, and the credential when it takes no API key', () => {
    type Operation = {
      description?: string;
      security?: Array<Record<string, unknown>>;
      'x-required-permission'?: unknown;
      'x-credential'?: unknown;
    };
    const operationOf = (method: string, url: string) =>
      doc.paths[url.replace(/:([A-Za-z_]+)/g, '{$1}')]?.[method.toLowerCase()] as Operation | undefined;
    const problems: string[] = [];
    let checked = 0;
    for (const route of app.routeTable) {
      const label = `${route.method} ${route.url}`;
      const op = operationOf(route.method, route.url);
      if (route.public) {
        if (op?.['x-required-permission'] !== undefined)
          problems.push(`${label}: public, names a permission`);
        continue;
      }
      if (!op) {
        problems.push(`${label}: protected, not in the document`);
        continue;
      }
      checked++;
      const anyOf = ([] as string[]).concat(route.permission ?? []);
      const named = op['x-required-permission'];
      if (JSON.stringify(named) !== JSON.stringify(anyOf.length === 1 ? anyOf[0] : anyOf))
        problems.push(`${label}: x-required-permission ${JSON.stringify(named)}, route declares ${anyOf}`);
      const sentence = `Needs the permission ${anyOf.map((p) => `\`${p}\``).join(' or ')}.`;
      if (!op.description?.includes(sentence)) problems.push(`${label}: its description lacks "${sentence}"`);
      if (op.description?.includes(OWN_SESSION_SENTENCE) !== (route.ownSession === true))
        problems.push(`${label}: ${route.ownSession ? 'lacks' : 'has'} "${OWN_SESSION_SENTENCE}"`);
      const schemes = (op.security ?? []).flatMap((requirement) => Object.keys(requirement)).sort();
      if (route.credential) {
        if (op['x-credential'] !== route.credential)
          problems.push(`${label}: x-credential ${op['x-credential']}, route declares ${route.credential}`);
        if (!/an API key (or a service’s token )?gets 403/.test(op.description ?? ''))
          problems.push(`${label}: its description does not say an API key gets 403`);
        // An access token only: a user's, and (but for a signed-in user's routes) a service's.
        const expected =
          route.credential === 'access_token' ? '["bearerAuth","clientCredentials"]' : '["bearerAuth"]';
        if (JSON.stringify([...new Set(schemes)]) !== expected)
          problems.push(`${label}: security ${schemes}`);
      } else {
        // An operation that offers no X-API-Key declares why: the credential it takes.
        if (op['x-credential'] !== undefined) problems.push(`${label}: x-credential, none declared`);
        if (!schemes.includes('apiKey')) problems.push(`${label}: takes an API key, security ${schemes}`);
      }
    }
    expect(problems).toEqual([]);
    expect(checked).toBeGreaterThan(50);
    const users = operationOf('GET', '/v1/users');
    expect(users?.['x-required-permission']).toBe('users:read');
    expect(users?.description).toContain('Needs the permission `users:read`.');
    expect(operationOf('POST', '/v1/auth/password')?.['x-credential']).toBe('user_session');
    expect(operationOf('POST', '/v1/clients')?.['x-credential']).toBe('access_token');
  });

  it('is right about the routes that take no API key: each refuses one holding every permission (403)', async () => {
    const admin = await createAdmin(app);
    const key = await createKey(app, admin.accessToken, { scopes: ['*'] });
    const client = await createClient(app, admin.accessToken, { scopes: ['users:read'] });
    const declared = app.routeTable.filter((r) => r.credential !== undefined);
    expect(declared.length).toBeGreaterThanOrEqual(11);
    for (const route of declared) {
      const matrix = ALL_ROUTES.find((r) => r.method === route.method && r.route === route.url);
      const url = route.url.replace(':id', client.id);
      expect(url, 'a path parameter this test fills in').not.toContain(':');
      for (const headers of [withKey(key.key), bearer(key.key)]) {
        const res = await app.inject({
          method: route.method as 'POST',
          url,
          headers,
          payload: matrix?.body?.({ owner: admin, fixtures: {} }),
        });
        expect(res.statusCode, `${route.method} ${url}: ${res.body}`).toBe(403);
        expect(res.json().detail).toMatch(/API key/);
      }
    }
  });

  it('offers a service’s token (OAuth 2.0 client credentials) on the operations that take one, with their permission as the scope', () => {
    const { securitySchemes } = (
      doc as unknown as { components: { securitySchemes: Record<string, unknown> } }
    ).components;
    expect(securitySchemes.clientCredentials).toEqual({
      type: 'oauth2',
      description: expect.stringContaining('/oauth/token'),
      flows: {
        clientCredentials: { tokenUrl: 'http://auth.test/oauth/token', scopes: { ...PERMISSIONS } },
      },
    });
    type Operation = { security?: Array<Record<string, string[]>> };
    const problems: string[] = [];
    for (const route of app.routeTable) {
      const op = doc.paths[route.url.replace(/:([A-Za-z_]+)/g, '{$1}')]?.[route.method.toLowerCase()] as
        | Operation
        | undefined;
      if (!op || route.public) continue;
      const offered = (op.security ?? [])
        .filter((r) => 'clientCredentials' in r)
        .map((r) => r.clientCredentials);
      // One requirement per permission that would do, but one's own account's, which a service has not.
      const expected =
        route.credential === 'user_session'
          ? []
          : ([] as string[])
              .concat(route.permission ?? [])
              .filter((p) => !['account:read', 'account:write', 'api_keys:own'].includes(p))
              .map((p) => [p]);
      if (JSON.stringify(offered) !== JSON.stringify(expected))
        problems.push(
          `${route.method} ${route.url}: ${JSON.stringify(offered)}, expected ${JSON.stringify(expected)}`,
        );
    }
    expect(problems).toEqual([]);
    const securityOf = (path: string, method: string) => (doc.paths[path]![method] as Operation).security;
    expect(securityOf('/v1/users', 'get')).toContainEqual({ clientCredentials: ['users:read'] });
    expect(securityOf('/v1/profiles/{user_id}', 'get')).toContainEqual({
      clientCredentials: ['profiles:read'],
    });
    expect(securityOf('/oauth/introspect', 'post')).toContainEqual({
      clientCredentials: ['tokens:introspect'],
    });
    expect(securityOf('/oauth/revoke', 'post')).toContainEqual({ clientCredentials: [] });
    expect(securityOf('/oauth/token', 'post')).not.toContainEqual(
      expect.objectContaining({ clientCredentials: [] }),
    );
  });

  it('is right about where a service’s token works: refused (403) where not offered, let through where offered', async () => {
    const admin = await createAdmin(app);
    const client = await createClient(app, admin.accessToken, { scopes: ['*'] });
    const token = (await clientToken(app, client)).access_token as string;
    type Operation = { security?: Array<Record<string, string[]>> };
    let refused = 0;
    let taken = 0;
    for (const route of app.routeTable) {
      const op = doc.paths[route.url.replace(/:([A-Za-z_]+)/g, '{$1}')]?.[route.method.toLowerCase()] as
        | Operation
        | undefined;
      const schemes = (op?.security ?? []).flatMap((r) => Object.keys(r));
      if (!op || route.public || !schemes.includes('bearerAuth')) continue;
      const offered = schemes.includes('clientCredentials');
      // What is offered is tried where trying changes nothing (a read); what is not, everywhere.
      if (offered && route.method !== 'GET') continue;
      const matrix = ALL_ROUTES.find((r) => r.method === route.method && r.route === route.url);
      const res = await app.inject({
        method: route.method as 'POST',
        url: route.url.replace(/:([a-z_]+)/g, (_m, name: string) =>
          name === 'role' ? 'user' : randomUUID(),
        ),
        headers: bearer(token),
        payload: matrix?.body?.({ owner: admin, fixtures: {} }),
      });
      const where = `${route.method} ${route.url} → ${res.statusCode}: ${res.body.slice(0, 120)}`;
      if (offered) {
        taken++;
        expect([401, 403], where).not.toContain(res.statusCode);
      } else {
        refused++;
        expect(res.statusCode, where).toBe(403);
      }
    }
    expect(refused).toBeGreaterThanOrEqual(15);
    expect(taken).toBeGreaterThanOrEqual(10);
  });

  it('lets Swagger UI’s Authorize fetch a service’s token from the page’s own origin and send it', async () => {
    const admin = await createAdmin(app);
    const client = await createClient(app, admin.accessToken, { scopes: ['users:read', 'roles:read'] });
    const ui = (await app.inject({ method: 'GET', url: '/docs/json' })).json() as {
      servers: Array<{ url: string }>;
      components: {
        securitySchemes: { clientCredentials: { flows: { clientCredentials: { tokenUrl: string } } } };
      };
    };
    const tokenUrl = ui.components.securitySchemes.clientCredentials.flows.clientCredentials.tokenUrl;
    // Swagger UI resolves it against the selected server (the first: the page's origin); the page's
    // `connect-src 'self'` refuses any other origin.
    expect(tokenUrl).toBe('/oauth/token');
    const url = new URL(tokenUrl, `http://127.0.0.1:8000${ui.servers[0]!.url}`);
    expect(url.origin).toBe('http://127.0.0.1:8000');
    // What Swagger UI sends (client authentication "Basic auth header", one scope ticked).
    const res = await app.inject({
      method: 'POST',
      url: url.pathname,
      headers: {
        ...basic(client.client_id, client.client_secret),
        'content-type': 'application/x-www-form-urlencoded',
        accept: 'application/json, text/plain, */*',
        'x-requested-with': 'XMLHttpRequest',
      },
      payload: 'grant_type=client_credentials&scope=users%3Aread',
    });
    expect(res.statusCode, res.body).toBe(200);
    const { access_token: accessToken, token_type: tokenType, scope } = res.json();
    expect(tokenType).toBe('Bearer');
    expect(scope).toBe('users:read');
    // It sends `Authorization: Bearer` on the operations naming the scheme.
    const users = await app.inject({ method: 'GET', url: '/v1/users', headers: bearer(accessToken) });
    expect(users.statusCode, users.body).toBe(200);
    // The served copy differs from /openapi.json in the servers and the token URL alone.
    const { servers: _s, components: uiComponents, ...uiRest } = ui as unknown as Record<string, unknown>;
    const { servers: _d, components: docComponents, ...docRest } = doc as unknown as Record<string, unknown>;
    expect(uiRest).toEqual(docRest);
    expect(JSON.stringify(uiComponents).replace('"/oauth/token"', '"http://auth.test/oauth/token"')).toBe(
      JSON.stringify(docComponents),
    );
  });

  it('describes every response (no "Default Response")', () => {
    const undescribed: string[] = [];
    for (const [path, item] of Object.entries(doc.paths)) {
      for (const [method, op] of Object.entries(item)) {
        for (const [status, response] of Object.entries(
          (op.responses ?? {}) as Record<string, { description?: string }>,
        )) {
          if (!response.description || response.description === 'Default Response')
            undescribed.push(`${method.toUpperCase()} ${path} ${status}`);
        }
      }
    }
    expect(undescribed).toEqual([]);
  });

  it('names in each OAuth error status’s description the errors that endpoint answers with it, and no other', async () => {
    const admin = await createAdmin(app);
    const client = await createClient(app, admin.accessToken, { scopes: ['users:read'] });
    const other = await clientToken(app, await createClient(app, admin.accessToken, { scopes: [] }));
    const asClient = basic(client.client_id, client.client_secret);
    // A client acting for a user who has been disabled since.
    const creator = await userWith(app, ['clients:write', 'users:read'], 'openapi-oauth');
    const bound = await createClient(app, creator.accessToken, { scopes: ['users:read'] });
    expect((await setUserStatus(app, admin.accessToken, creator.id, 'disabled')).statusCode).toBe(200);
    const user = await registerUser(app, 'openapi-oauth-user');
    const cases: Array<[string, Record<string, string>, Record<string, string>]> = [
      ['/oauth/token', { grant_type: 'client_credentials' }, {}],
      ['/oauth/token', {}, asClient],
      ['/oauth/token', { grant_type: 'refresh_token', refresh_token: 'prt_nope' }, {}],
      ['/oauth/token', { grant_type: 'client_credentials', scope: 'audit:read' }, asClient],
      ['/oauth/token', { grant_type: 'client_credentials', audience: 'https://elsewhere.test' }, asClient],
      ['/oauth/token', { grant_type: 'client_credentials' }, basic(bound.client_id, bound.client_secret)],
      ['/oauth/token', { grant_type: 'password' }, asClient],
      ['/oauth/introspect', {}, asClient],
      ['/oauth/introspect', { token: 'x' }, {}],
      ['/oauth/introspect', { token: 'x' }, bearer('a.b.c')],
      ['/oauth/introspect', { token: 'x' }, bearer(user.accessToken)],
      ['/oauth/revoke', {}, asClient],
      ['/oauth/revoke', { token: other.access_token }, asClient],
      ['/oauth/revoke', { token: 'x' }, basic(client.client_id, 'wrong')],
      ['/oauth/revoke', { token: 'x' }, bearer('a.b.c')],
    ];
    const answered = new Map<string, Set<string>>();
    for (const [path, params, headers] of cases) {
      const res = await form(app, path, params, headers);
      const key = `${path} ${res.statusCode}`;
      answered.set(key, (answered.get(key) ?? new Set()).add(res.json().error));
    }
    const described = (path: string, status: string) =>
      (doc.paths[path]!.post!.responses as Record<string, { description: string }>)[status]!.description;
    // The error names quoted in it (`audience` or `token` name parameters, not errors).
    const named = (description: string) => new Set(description.match(/(?<=`)[a-z]+_[a-z_]+(?=`)/g));
    // The cases reach every 400 and 401 error of these endpoints.
    for (const path of ['/oauth/token', '/oauth/introspect', '/oauth/revoke'])
      for (const status of ['400', '401'])
        expect([...named(described(path, status))].sort(), `${path} ${status}`).toEqual(
          [...(answered.get(`${path} ${status}`) ?? [])].sort(),
        );
  });

  it('gives every operation a unique operationId, a tag, a summary and its responses', () => {
    const ids = new Set<string>();
    for (const [path, item] of Object.entries(doc.paths)) {
      for (const [method, op] of Object.entries(item)) {
        const where = `${method.toUpperCase()} ${path}`;
        expect(op.operationId, where).toBeTruthy();
        expect(ids.has(op.operationId!), `${where} repeats ${op.operationId}`).toBe(false);
        ids.add(op.operationId!);
        expect(op.tags?.length, where).toBeGreaterThan(0);
        expect(op.summary, where).toBeTruthy();
        expect(Object.keys(op.responses ?? {}).length, where).toBeGreaterThan(0);
      }
    }
    // Every documented route of API.md is there.
    for (const path of [
      '/v1/auth/login',
      '/oauth/token',
      '/v1/api-keys/verify',
      '/v1/clients/{id}/secrets',
      '/v1/authz/check',
    ]) {
      expect(doc.paths[path], path).toBeTruthy();
    }
  });

  it('declares for the role operations the statuses they answer: no 422, which none of them sends', () => {
    const statuses = (path: string, method: string) =>
      Object.keys((doc.paths[path]?.[method]?.responses ?? {}) as object).filter((s) => /^4/.test(s));
    // A role's name and permissions are checked by the schema (400), the ceiling (403), its existence
    // (404) and the state (409: a name taken, the admin role without `*`, a built-in role deleted).
    expect(statuses('/v1/roles', 'post')).not.toContain('422');
    expect(statuses('/v1/roles/{role}', 'patch')).not.toContain('422');
    expect(statuses('/v1/roles', 'post')).toEqual(expect.arrayContaining(['400', '401', '403', '409']));
    expect(statuses('/v1/roles/{role}', 'patch')).toEqual(
      expect.arrayContaining(['400', '401', '403', '404', '409']),
    );
  });

  it('declares its answers’ timestamps as date-time and their addresses as email, so generated clients type them', () => {
    // Every property of a response schema (or a component) named like a timestamp or an address.
    const untyped: string[] = [];
    let seen = 0;
    const formatOf = (schema: Record<string, unknown>): unknown =>
      schema.format ??
      (schema.anyOf as Array<Record<string, unknown>> | undefined)?.find((s) => s.type !== 'null')?.format;
    const walk = (node: unknown, at: string) => {
      if (Array.isArray(node)) {
        for (const [i, item] of node.entries()) walk(item, `${at}/${i}`);
      } else if (node !== null && typeof node === 'object') {
        const properties = (node as { properties?: Record<string, Record<string, unknown>> }).properties;
        for (const [name, schema] of Object.entries(properties ?? {})) {
          const expected = /_at$/.test(name)
            ? 'date-time'
            : /^(email|new_email)$/.test(name)
              ? 'email'
              : null;
          if (!expected || schema.$ref) continue;
          seen++;
          if (formatOf(schema) !== expected)
            untyped.push(`${at}/properties/${name}: ${JSON.stringify(schema)}`);
        }
        for (const [key, value] of Object.entries(node)) walk(value, `${at}/${key}`);
      }
    };
    const full = doc as unknown as { components: { schemas: object }; paths: object };
    walk(full.components.schemas, '#/components/schemas');
    for (const [path, item] of Object.entries(doc.paths))
      for (const [method, op] of Object.entries(item)) walk(op.responses, `${method.toUpperCase()} ${path}`);
    expect(untyped).toEqual([]);
    expect(seen).toBeGreaterThan(30);
  });

  it('says in its request schemas what the server checks: addresses are emails, permissions have their pattern', () => {
    type Schema = { properties?: Record<string, Schema>; items?: Schema; format?: string; pattern?: string };
    const bodyOf = (path: string, method: string) =>
      (doc.paths[path]?.[method] as { requestBody?: { content: Record<string, { schema: Schema }> } })
        ?.requestBody?.content['application/json']?.schema;
    for (const [path, field] of [
      ['/v1/auth/register', 'email'],
      ['/v1/auth/login', 'email'],
      ['/v1/auth/password/forgot', 'email'],
      ['/v1/auth/email/change', 'new_email'],
    ] as const)
      expect(bodyOf(path, 'post')?.properties?.[field]?.format, path).toBe('email');
    // The README's walk-through registers ada@example.com: the address it moves to is another.
    expect(
      (bodyOf('/v1/auth/email/change', 'post')?.properties?.new_email as { example?: string })?.example,
    ).toBe('ada.lovelace@example.org');
    const permission = bodyOf('/v1/roles', 'post')?.properties?.permissions?.items;
    const pattern = new RegExp(permission?.pattern ?? '^$');
    expect(['users:read', 'orders:*', '*'].every((p) => pattern.test(p))).toBe(true);
    expect(['x', 'Users:Read', 'users:', ' users:read'].some((p) => pattern.test(p))).toBe(false);
    expect(bodyOf('/v1/api-keys', 'post')?.properties?.scopes?.items?.pattern).toBe(permission?.pattern);
  });

  it('says in its request schemas that a name of spaces alone is refused, as the server does', async () => {
    type Schema = { properties?: Record<string, Schema>; anyOf?: Schema[]; pattern?: string };
    const fieldOf = (path: string, method: string, field: string) => {
      const body = (
        doc.paths[path]?.[method] as { requestBody?: { content: Record<string, { schema: Schema }> } }
      )?.requestBody?.content['application/json']?.schema;
      const schema = body?.properties?.[field];
      return schema?.anyOf?.find((s) => s.pattern) ?? schema;
    };
    for (const [path, method, field] of [
      ['/v1/api-keys', 'post', 'name'],
      ['/v1/api-keys/{id}', 'patch', 'name'],
      ['/v1/clients', 'post', 'name'],
      ['/v1/clients/{id}', 'patch', 'name'],
      ['/v1/auth/register', 'post', 'display_name'],
      ['/v1/users', 'post', 'display_name'],
      ['/v1/profiles/me', 'patch', 'display_name'],
    ] as const) {
      const pattern = new RegExp(fieldOf(path, method, field)?.pattern ?? '^$');
      expect(pattern.test('   '), `${method} ${path} ${field}`).toBe(false);
      expect(pattern.test(' Ada '), `${method} ${path} ${field}`).toBe(true);
    }
    const admin = await createAdmin(app);
    const blank = await app.inject({
      method: 'POST',
      url: '/v1/clients',
      headers: { authorization: `Bearer ${admin.accessToken}` },
      payload: { name: '   ', scopes: [] },
    });
    expect(blank.statusCode).toBe(400);
    expect(blank.json().errors).toEqual([expect.objectContaining({ field: 'body.name' })]);
  });

  it('has request examples Swagger UI can send as they are: none is refused as invalid', async () => {
    const admin = await createAdmin(app);
    type Schema = { properties?: Record<string, { example?: unknown }>; required?: string[] };
    let tried = 0;
    for (const [path, item] of Object.entries(doc.paths)) {
      for (const [method, op] of Object.entries(item) as [string, { requestBody?: unknown }][]) {
        const schema = (op.requestBody as { content?: Record<string, { schema: Schema }> } | undefined)
          ?.content?.['application/json']?.schema;
        const properties = Object.entries(schema?.properties ?? {}).filter(
          ([, p]) => p.example !== undefined,
        );
        if (properties.length === 0) continue;
        // Only operations whose required fields all have examples, and no path parameters.
        if ((schema?.required ?? []).some((name) => !properties.some(([key]) => key === name))) continue;
        if (path.includes('{')) continue;
        const body = Object.fromEntries(properties.map(([key, p]) => [key, p.example]));
        const res = await app.inject({
          method: method.toUpperCase() as 'POST',
          url: path,
          headers: bearer(admin.accessToken),
          payload: body,
        });
        tried++;
        // A one-time secret's example (a reset or confirmation token) cannot be a live one: its refusal is not the
        // request's shape being refused.
        if (
          res.statusCode === 400 &&
          ['invalid_reset_token', 'invalid_confirmation_token', 'incorrect_password'].includes(
            res.json().code,
          )
        )
          continue;
        expect(
          [400, 422],
          `${method.toUpperCase()} ${path} ${JSON.stringify(body)}: ${res.body}`,
        ).not.toContain(res.statusCode);
      }
    }
    expect(tried).toBeGreaterThanOrEqual(6);
  });
});

describe('the per-IP rate limits in the OpenAPI document', () => {
  type Operation = {
    'x-rate-limit'?: { max: number; window_seconds: number; counter: string };
    responses?: Record<string, { headers?: Record<string, unknown> }>;
  };
  const RATE_LIMIT_HEADERS = ['X-RateLimit-Limit', 'X-RateLimit-Remaining', 'X-RateLimit-Reset'];
  const documentOf = async (app: FastifyInstance) =>
    (await app.inject({ method: 'GET', url: '/openapi.json' })).json() as {
      paths: Record<string, Record<string, Operation>>;
    };

  it('says which operations count requests per address, with their limit, and the headers on every answer of theirs', async () => {
    const app = await buildTestApp({ env: { RATE_LIMIT_ENABLED: 'true' } });
    const doc = await documentOf(app);
    const validator = new Validator();
    expect((await validator.validate(structuredClone(doc))).errors ?? []).toEqual([]);
    expect(doc.paths['/v1/auth/login']!.post!['x-rate-limit']).toMatchObject({ max: 30, window_seconds: 60 });
    expect(doc.paths['/v1/auth/refresh']!.post!['x-rate-limit']).toMatchObject({
      max: 120,
      window_seconds: 60,
    });
    expect(doc.paths['/oauth/token']!.post!['x-rate-limit']?.counter).toContain('refresh_token grant only');
    // What the service sends, operation by operation: an anonymous request (the refresh_token grant
    // at /oauth/token), from an address of its own, carries the headers exactly where the document
    // declares them, with the limit it names.
    let limited = 0;
    for (const [path, item] of Object.entries(doc.paths)) {
      for (const [method, operation] of Object.entries(item)) {
        const declared = operation['x-rate-limit'];
        for (const response of Object.values(operation.responses ?? {}))
          for (const header of RATE_LIMIT_HEADERS)
            expect(response.headers?.[header] !== undefined, `${method} ${path} ${header}`).toBe(
              declared !== undefined,
            );
        const oauthToken = path === '/oauth/token';
        const res = await app.inject({
          method: method.toUpperCase() as 'POST',
          url: path.replace(/\{[^}]+\}/g, randomUUID()),
          remoteAddress: `10.77.${Math.floor(Math.random() * 250)}.${Math.floor(Math.random() * 250)}`,
          ...(oauthToken
            ? {
                headers: { 'content-type': 'application/x-www-form-urlencoded' },
                payload: 'grant_type=refresh_token&refresh_token=x',
              }
            : method === 'get'
              ? {}
              : { payload: {} }),
        });
        const where = `${method.toUpperCase()} ${path} → ${res.statusCode}`;
        expect(res.headers['x-ratelimit-limit'], where).toBe(declared ? String(declared.max) : undefined);
        if (declared) {
          limited++;
          expect(
            operation.responses?.[String(res.statusCode)]?.headers?.['X-RateLimit-Limit'],
            where,
          ).toBeDefined();
          expect(res.headers['x-ratelimit-remaining'], where).toBe(String(declared.max - 1));
        }
      }
    }
    expect(limited).toBeGreaterThanOrEqual(15);
  });

  it('says nothing of them when the limits are off (RATE_LIMIT_ENABLED=false), as no answer carries them', async () => {
    const app = await buildTestApp();
    const doc = await documentOf(app);
    const found = Object.values(doc.paths).flatMap((item) =>
      Object.values(item).flatMap((operation) => [
        ...(operation['x-rate-limit'] ? ['x-rate-limit'] : []),
        ...Object.values(operation.responses ?? {}).flatMap((r) =>
          RATE_LIMIT_HEADERS.filter((h) => r.headers?.[h] !== undefined),
        ),
      ]),
    );
    expect(found).toEqual([]);
    const login = await app.inject({ method: 'POST', url: '/v1/auth/login', payload: {} });
    expect(login.headers['x-ratelimit-limit']).toBeUndefined();
  });
});
