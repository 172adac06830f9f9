import type { FastifyInstance } from 'fastify';
import * as oidc from 'openid-client';
import { beforeAll, describe, expect, it } from 'vitest';
import { routeOf } from '../../src/modules/discovery/discovery.routes.js';
import { buildTestApp } from '../support/app.js';
import { injectFetch } from '../support/http.js';

const ISSUER = 'https://example.com/auth';
const RFC8414_PATH = '/.well-known/oauth-authorization-server/auth';

/** The methods the discovery documents do not take. */
const OTHER_METHODS = ['POST', 'PUT', 'PATCH', 'DELETE', 'OPTIONS'] as const;

/** `url` is a 404 problem+json for every method, without an Allow. */
async function expectNothingAt(app: FastifyInstance, url: string) {
  for (const method of ['GET', 'HEAD', ...OTHER_METHODS] as const) {
    const res = await app.inject({ method, url });
    expect(res.statusCode, `${method} ${url}`).toBe(404);
    expect(res.headers.allow, `${method} ${url}`).toBeUndefined();
    expect(res.headers['content-type'], `${method} ${url}`).toMatch(/^application\/problem\+json/);
    if (method !== 'HEAD') expect(res.json(), `${method} ${url}`).toMatchObject({ code: 'not_found' });
  }
}

/**
 * An issuer with a path (PUBLIC_URL https://example.com/auth) behind a proxy that strips it: the
 * metadata at the issuer followed by the well-known path (OpenID Connect Discovery) and, by the proxy
 * rule README gives, at RFC 8414 §3.1's place, the well-known path followed by the issuer's.
 */
describe('discovery under an issuer with a path', () => {
  let app: FastifyInstance;
  beforeAll(async () => {
    app = await buildTestApp({ env: { PUBLIC_URL: ISSUER } });
  });

  /** The host as the proxy serves it: /auth/… stripped to the service, the RFC 8414 path as it is. */
  const throughProxy = () => {
    const service = injectFetch(app);
    return async (input: string | URL | Request, init?: RequestInit): Promise<Response> => {
      const url = new URL(input instanceof Request ? input.url : input);
      if (url.pathname === RFC8414_PATH) return service(url, init);
      if (url.pathname.startsWith('/auth/'))
        return service(new URL(url.pathname.slice('/auth'.length) + url.search, url.origin), init);
      return new Response('not here', { status: 404 });
    };
  };

  const discover = (algorithm: 'oidc' | 'oauth2') =>
    oidc.discovery(new URL(ISSUER), 'pci_000000000000', undefined, oidc.None(), {
      algorithm,
      [oidc.customFetch]: throughProxy(),
    });

  it('a standard client finds it both ways, the RFC 8414 way included', async () => {
    const byRfc8414 = (await discover('oauth2')).serverMetadata();
    const byOidc = (await discover('oidc')).serverMetadata();
    expect(byRfc8414).toMatchObject({ issuer: ISSUER, token_endpoint: `${ISSUER}/oauth/token` });
    expect(byRfc8414).toEqual(byOidc);
  });

  it('serves the RFC 8414 path as the proxy forwards it, the same document, cached alike', async () => {
    const rfc = await app.inject({ method: 'GET', url: RFC8414_PATH });
    const appended = await app.inject({ method: 'GET', url: '/.well-known/oauth-authorization-server' });
    expect(rfc.statusCode, rfc.body).toBe(200);
    expect(rfc.body).toBe(appended.body);
    expect(rfc.headers['cache-control']).toBe('public, max-age=3600');
    expect(rfc.headers['content-type']).toMatch(/^application\/json/);
    // Another issuer's path on the same host is not this one's.
    // Another issuer's path on the same host is not this one's, for any method; well-known documents
    // the service does not serve are nothing either. The served ones' other methods are a 405.
    for (const path of [
      '/.well-known/oauth-authorization-server/other',
      '/.well-known/oauth-authorization-server/auth/x',
      '/.well-known/foo',
      '/.well-known/security.txt',
    ])
      await expectNothingAt(app, path);
    for (const method of OTHER_METHODS) {
      const other = await app.inject({ method, url: RFC8414_PATH });
      expect(other.statusCode, method).toBe(405);
      expect(other.headers.allow, method).toBe('GET, HEAD');
    }
  });

  it('makes a literal route of every segment it can, a parameter admitting its value alone of the others', () => {
    expect(routeOf('')).toBeUndefined();
    expect(routeOf('/auth')).toBe('/auth');
    expect(routeOf('/tenants/a:b')).toBe('/tenants/a::b');
    expect(routeOf('/%C3%A9t%C3%A9')).toBe('/été');
    // The router matches a request's %25 with a route's `%`.
    expect(routeOf('/100%25')).toBe('/100%');
    // Escapes it keeps as they are, and a `*`, are matched by a parameter whose expression admits the
    // value decoded, and nothing else.
    expect(routeOf('/t%2Fa/x/%40team')).toBe('/:s1(^t\\/a$)/x/:s3(^@team$)');
    expect(routeOf('/a*b/%3a')).toBe('/:s1(^a\\*b$)/:s2(^:$)');
    expect(routeOf('/%zz')).toBeUndefined();
  });
});

describe('discovery under an issuer whose path holds escapes the router keeps (%2F, %40, %25…)', () => {
  const metadataAt = (app: FastifyInstance, path: string) =>
    app.inject({ method: 'GET', url: `/.well-known/oauth-authorization-server${path}` });

  it("serves the RFC 8414 path as a client writes it from the issuer, and not another issuer's", async () => {
    // The router keeps `%2F` and `%40` escaped and `%25` as itself, and decodes the other escapes
    // (`%61` is `a`), in either case of hex; a segment holding a kept escape is matched by its value
    // decoded whole (a parameter's), so `@team` is `%40team`, while `t/a` is two segments, not `t%2Fa`.
    const issuer = 'https://example.com/t%2Fa/%40team/b%25c/plain';
    const app = await buildTestApp({ env: { PUBLIC_URL: issuer } });
    for (const path of [
      '/t%2Fa/%40team/b%25c/plain',
      '/t%2fa/%40team/b%25c/plain',
      '/t%2F%61/%40team/b%25c/pl%61in',
      '/t%2Fa/@team/b%25c/plain',
    ]) {
      const res = await metadataAt(app, path);
      expect(res.statusCode, `${path}: ${res.body}`).toBe(200);
      expect(res.json().issuer, path).toBe(issuer);
      expect(res.headers['cache-control'], path).toBe('public, max-age=3600');
      // Its other methods: a 405 naming GET and HEAD.
      for (const method of OTHER_METHODS) {
        const other = await app.inject({ method, url: `/.well-known/oauth-authorization-server${path}` });
        expect(other.statusCode, `${method} ${path}`).toBe(405);
        expect(other.headers.allow, `${method} ${path}`).toBe('GET, HEAD');
      }
    }
    // Other issuers' paths: the escapes decoded, or another segment.
    for (const path of [
      '/t/a/%40team/b%25c/plain',
      '/t%2Fa/%40team/b%c/plain',
      '/t%2Fa/%40team/b%2525c/plain',
      '/t%2Fb/%40team/b%25c/plain',
      '/t%2Fa/%40team/b%25c/other',
    ]) {
      const res = await metadataAt(app, path);
      expect(res.statusCode, path).toBe(path === '/t%2Fa/%40team/b%c/plain' ? 400 : 404);
      expect(res.headers['content-type'], path).toMatch(/^application\/problem\+json/);
    }
    // Nothing is there for any method: not a 405 naming GET, which only the parameters matched.
    for (const path of ['/t%2Fb/%40team/b%25c/plain', '/t%2Fa/%40other/b%25c/plain', '/t%2Fa//b%25c/plain'])
      await expectNothingAt(app, `/.well-known/oauth-authorization-server${path}`);
  });

  it('still serves a plain issuer path, and one with only a %25, at their own place alone', async () => {
    for (const [issuer, path, other] of [
      ['https://example.com/tenants/acme', '/tenants/acme', '/tenants/acm%65x'],
      ['https://example.com/100%25', '/100%25', '/100%2525'],
    ] as const) {
      const app = await buildTestApp({ env: { PUBLIC_URL: issuer } });
      const res = await metadataAt(app, path);
      expect(res.statusCode, `${issuer}: ${res.body}`).toBe(200);
      expect(res.json().issuer).toBe(issuer);
      expect((await metadataAt(app, other)).statusCode, other).toBe(404);
    }
  });
});

describe('discovery under an issuer without a path', () => {
  it('serves no path-suffixed document', async () => {
    const app = await buildTestApp({ env: { PUBLIC_URL: 'https://auth.example.com' } });
    const res = await app.inject({ method: 'GET', url: RFC8414_PATH });
    expect(res.statusCode).toBe(404);
  });
});
