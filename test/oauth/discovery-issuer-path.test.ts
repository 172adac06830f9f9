import type { FastifyInstance } from 'fastify';
import * as oidc from 'openid-client';
import { beforeAll, describe, expect, it } from 'vitest';
import { routeOf } from '../../src/modules/discovery/discovery.routes.js';
import { buildTestApp } from '../support/app.js';
import { injectFetch } from '../support/http.js';

const ISSUER = 'https://example.com/auth';
const RFC8414_PATH = '/.well-known/oauth-authorization-server/auth';

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
    expect(
      (await app.inject({ method: 'GET', url: '/.well-known/oauth-authorization-server/other' })).statusCode,
    ).toBe(404);
  });

  it('makes a literal route of any issuer path it can', () => {
    expect(routeOf('')).toBeUndefined();
    expect(routeOf('/auth')).toBe('/auth');
    expect(routeOf('/tenants/a:b')).toBe('/tenants/a::b');
    expect(routeOf('/%C3%A9t%C3%A9')).toBe('/été');
    expect(routeOf('/a*b')).toBeUndefined();
    expect(routeOf('/%zz')).toBeUndefined();
  });
});

describe('discovery under an issuer without a path', () => {
  it('serves no path-suffixed document', async () => {
    const app = await buildTestApp({ env: { PUBLIC_URL: 'https://auth.example.com' } });
    const res = await app.inject({ method: 'GET', url: RFC8414_PATH });
    expect(res.statusCode).toBe(404);
  });
});
