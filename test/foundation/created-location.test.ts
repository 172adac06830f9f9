import { randomUUID } from 'node:crypto';
import type { FastifyInstance } from 'fastify';
import { beforeAll, describe, expect, it } from 'vitest';
import { buildTestApp } from '../support/app.js';
import { createAdmin, PASSWORD } from '../support/factories.js';
import { bearer } from '../support/http.js';
import { capturingMailer } from '../support/mail.js';

/**
 * RFC 9110 §15.3.2: a 201 names what it created in Location (without one it would mean the request's
 * URI). Behind a proxy that strips PUBLIC_URL's path, Location is the path the client uses.
 */
describe('201 Created answers carry the Location of what they made', () => {
  const creations = () => [
    { url: '/v1/users', payload: { email: `made-${randomUUID().slice(0, 8)}@example.test` } },
    { url: '/v1/roles', payload: { name: `made-${randomUUID().slice(0, 8)}`, permissions: ['users:read'] } },
    { url: '/v1/api-keys', payload: { name: 'made', scopes: ['users:read'] } },
    { url: '/v1/clients', payload: { name: 'made', scopes: ['users:read'] } },
  ];

  describe.each([
    { prefix: '', publicUrl: 'http://auth.test' },
    { prefix: '/auth', publicUrl: 'https://example.com/auth' },
  ])('under PUBLIC_URL $publicUrl', ({ prefix, publicUrl }) => {
    let app: FastifyInstance;
    let admin: Awaited<ReturnType<typeof createAdmin>>;
    beforeAll(async () => {
      app = await buildTestApp({
        env: { PUBLIC_URL: publicUrl, PASSWORD_RESET_URL: 'https://app.example.test/reset' },
        deps: { mailer: capturingMailer() },
      });
      admin = await createAdmin(app);
    });

    it('a user, a role, an API key and an app client: GET on the Location (as the proxy forwards it) gives it back', async () => {
      const origin = new URL(publicUrl).origin;
      for (const { url, payload } of creations()) {
        const created = await app.inject({
          method: 'POST',
          url,
          headers: bearer(admin.accessToken),
          payload,
        });
        expect(created.statusCode, created.body).toBe(201);
        const location = created.headers.location as string;
        expect(location, url).toMatch(new RegExp(`^${prefix}${url}/[^/]+$`));
        // Resolved against the URL the client posted to, it stays under the prefix.
        expect(new URL(location, `${origin}${prefix}${url}`).href).toBe(`${origin}${location}`);
        // What the proxy forwards of it once it has stripped the prefix.
        const forwarded = location.slice(prefix.length);
        const read = await app.inject({ method: 'GET', url: forwarded, headers: bearer(admin.accessToken) });
        expect(read.statusCode, `${location}: ${read.body}`).toBe(200);
        const key = url === '/v1/roles' ? 'name' : 'id';
        expect(read.json()[key], location).toBe(created.json()[key]);
      }
    });

    it('a registration names the user it made, and a set-up of an authenticator app where its factor is read', async () => {
      const email = `registered-${randomUUID().slice(0, 8)}@example.test`;
      const registered = await app.inject({
        method: 'POST',
        url: '/v1/auth/register',
        payload: { email, password: PASSWORD },
      });
      expect(registered.statusCode, registered.body).toBe(201);
      const user = registered.json().user as { id: string };
      // The user's URL, as a user an administrator makes is named (/v1/auth/me is whoever asks).
      expect(registered.headers.location).toBe(`${prefix}/v1/users/${user.id}`);
      const read = await app.inject({
        method: 'GET',
        url: (registered.headers.location as string).slice(prefix.length),
        headers: bearer(admin.accessToken),
      });
      expect(read.statusCode, read.body).toBe(200);
      expect(read.json().id).toBe(user.id);

      // Where the service can confirm addresses, a factor is set up for a confirmed one.
      await app.services.repos.users.update(user.id, { emailConfirmedAt: new Date() });
      const token = registered.json().session.access_token as string;
      const enrolled = await app.inject({
        method: 'POST',
        url: '/v1/auth/mfa/totp',
        headers: bearer(token),
        payload: { password: PASSWORD },
      });
      expect(enrolled.statusCode, enrolled.body).toBe(201);
      expect(enrolled.headers.location).toBe(`${prefix}/v1/auth/mfa`);
      const status = await app.inject({
        method: 'GET',
        url: (enrolled.headers.location as string).slice(prefix.length),
        headers: bearer(token),
      });
      expect(status.statusCode, status.body).toBe(200);
      expect(status.json()).toMatchObject({
        enabled: false,
        pending: true,
        factor: { id: enrolled.json().factor_id, type: 'totp', verified_at: null },
      });
    });

    it('a client’s new secret names no Location: a secret has no URL of its own', async () => {
      const created = await app.inject({
        method: 'POST',
        url: '/v1/clients',
        headers: bearer(admin.accessToken),
        payload: { name: 'rotated', scopes: ['users:read'] },
      });
      expect(created.statusCode, created.body).toBe(201);
      const rotated = await app.inject({
        method: 'POST',
        url: `/v1/clients/${created.json().id}/secrets`,
        headers: bearer(admin.accessToken),
        payload: {},
      });
      expect(rotated.statusCode, rotated.body).toBe(201);
      expect(rotated.json().client_secret).toEqual(expect.any(String));
      expect(rotated.headers.location).toBeUndefined();
      // Nothing reads a secret back: the path posted to takes POST alone.
      const read = await app.inject({
        method: 'GET',
        url: `/v1/clients/${created.json().id}/secrets`,
        headers: bearer(admin.accessToken),
      });
      expect(read.statusCode).toBe(405);
      expect(read.headers.allow).toBe('POST');
    });

    it('a problem’s instance is the path the client sent, under the prefix as Location is', async () => {
      const id = randomUUID();
      const answers = [
        // A service's refusal, the authenticate plugin's, a validation error (the query left out), and
        // the not-found handler's 404 and 405.
        await app.inject({ method: 'GET', url: `/v1/users/${id}`, headers: bearer(admin.accessToken) }),
        await app.inject({ method: 'GET', url: `/v1/users/${id}` }),
        await app.inject({ method: 'GET', url: '/v1/users?limit=0', headers: bearer(admin.accessToken) }),
        await app.inject({ method: 'GET', url: '/v1/nothing-here' }),
        await app.inject({ method: 'PUT', url: `/v1/users/${id}` }),
      ];
      expect(answers.map((a) => a.statusCode)).toEqual([404, 401, 400, 404, 405]);
      expect(answers.map((a) => a.json().instance)).toEqual([
        `${prefix}/v1/users/${id}`,
        `${prefix}/v1/users/${id}`,
        `${prefix}/v1/users`,
        `${prefix}/v1/nothing-here`,
        `${prefix}/v1/users/${id}`,
      ]);
    });
  });
});
