import { randomUUID } from 'node:crypto';
import type { FastifyInstance } from 'fastify';
import { beforeAll, describe, expect, it } from 'vitest';
import { buildTestApp } from '../support/app.js';
import { createAdmin, type TestUser } from '../support/factories.js';
import { bearer } from '../support/http.js';
import { capturingMailer } from '../support/mail.js';

/** RFC 9110 §15.3.2: a 201 names what it created in Location (without one it would mean the request's URI). */
describe('201 Created answers carry the Location of what they made', () => {
  let app: FastifyInstance;
  let admin: TestUser;
  beforeAll(async () => {
    app = await buildTestApp();
    admin = await createAdmin(app);
  });

  it('a role, an API key and an app client: GET on the Location gives it back', async () => {
    const creations = [
      {
        url: '/v1/roles',
        payload: { name: `made-${randomUUID().slice(0, 8)}`, permissions: ['users:read'] },
      },
      { url: '/v1/api-keys', payload: { name: 'made', scopes: ['users:read'] } },
      { url: '/v1/clients', payload: { name: 'made', scopes: ['users:read'] } },
    ];
    for (const { url, payload } of creations) {
      const created = await app.inject({ method: 'POST', url, headers: bearer(admin.accessToken), payload });
      expect(created.statusCode, created.body).toBe(201);
      const location = created.headers.location as string;
      expect(location, url).toMatch(new RegExp(`^${url}/[^/]+$`));
      const read = await app.inject({ method: 'GET', url: location, headers: bearer(admin.accessToken) });
      expect(read.statusCode, `${location}: ${read.body}`).toBe(200);
      const key = url === '/v1/roles' ? 'name' : 'id';
      expect(read.json()[key], location).toBe(created.json()[key]);
    }
  });
});

describe('behind a proxy that strips PUBLIC_URL’s path, Location is the path the client uses', () => {
  it('a user, a role, an API key and an app client: /auth/v1/…, which the proxy takes back to what was made', async () => {
    const app = await buildTestApp({
      env: { PUBLIC_URL: 'https://example.com/auth', PASSWORD_RESET_URL: 'https://app.example.test/reset' },
      deps: { mailer: capturingMailer() },
    });
    const admin = await createAdmin(app);
    const creations = [
      { url: '/v1/users', payload: { email: `made-${randomUUID().slice(0, 8)}@example.test` } },
      {
        url: '/v1/roles',
        payload: { name: `made-${randomUUID().slice(0, 8)}`, permissions: ['users:read'] },
      },
      { url: '/v1/api-keys', payload: { name: 'made', scopes: ['users:read'] } },
      { url: '/v1/clients', payload: { name: 'made', scopes: ['users:read'] } },
    ];
    for (const { url, payload } of creations) {
      const created = await app.inject({ method: 'POST', url, headers: bearer(admin.accessToken), payload });
      expect(created.statusCode, created.body).toBe(201);
      const location = created.headers.location as string;
      expect(location, url).toMatch(new RegExp(`^/auth${url}/[^/]+$`));
      // Resolved against the URL the client posted to, it stays under the prefix.
      expect(new URL(location, `https://example.com/auth${url}`).href).toBe(`https://example.com${location}`);
      // What the proxy forwards of it once it has stripped /auth.
      const forwarded = location.slice('/auth'.length);
      const read = await app.inject({ method: 'GET', url: forwarded, headers: bearer(admin.accessToken) });
      expect(read.statusCode, `${location}: ${read.body}`).toBe(200);
      const key = url === '/v1/roles' ? 'name' : 'id';
      expect(read.json()[key], location).toBe(created.json()[key]);
    }
  });
});
