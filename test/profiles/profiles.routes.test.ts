import type { FastifyInstance } from 'fastify';
import { beforeAll, describe, expect, it } from 'vitest';
import { buildTestApp } from '../support/app.js';
import { createAdmin, registerUser } from '../support/factories.js';
import { bearer } from '../support/http.js';

describe('profiles', () => {
  let app: FastifyInstance;
  beforeAll(async () => {
    app = await buildTestApp();
  });

  it('creates a profile at registration and lets the user read and change it', async () => {
    const user = await registerUser(app);
    const mine = await app.inject({
      method: 'GET',
      url: '/v1/profiles/me',
      headers: bearer(user.accessToken),
    });
    expect(mine.statusCode).toBe(200);
    expect(mine.json()).toMatchObject({ user_id: user.id, display_name: null, metadata: {} });
    const patch = await app.inject({
      method: 'PATCH',
      url: '/v1/profiles/me',
      headers: bearer(user.accessToken),
      payload: {
        display_name: 'Grace Hopper',
        avatar_url: 'https://cdn.example.com/a.png',
        bio: 'COBOL',
        locale: 'en-gb',
        timezone: 'Europe/Paris',
        metadata: { theme: 'dark', shortcuts: { save: 'ctrl+s' } },
      },
    });
    expect(patch.statusCode, patch.body).toBe(200);
    expect(patch.json()).toMatchObject({
      display_name: 'Grace Hopper',
      locale: 'en-GB',
      timezone: 'Europe/Paris',
      metadata: { theme: 'dark' },
    });
    const me = await app.inject({ method: 'GET', url: '/v1/auth/me', headers: bearer(user.accessToken) });
    expect(me.json().profile.display_name).toBe('Grace Hopper');
  });

  it('validates every field and refuses mass assignment of id, roles or status', async () => {
    const user = await registerUser(app);
    const bad: Array<[string, unknown]> = [
      ['avatar_url', 'http://insecure.example.com/a.png'],
      ['avatar_url', 'javascript:alert(1)'],
      ['locale', 'not a locale!'],
      ['timezone', 'Mars/Olympus'],
      ['display_name', 'x'.repeat(101)],
      ['metadata', 'not an object'],
      ['metadata', { big: 'x'.repeat(5000) }],
      ['metadata', { a: { b: { c: { d: { e: 1 } } } } }],
      ['roles', ['admin']],
      ['status', 'active'],
      ['user_id', '00000000-0000-0000-0000-000000000000'],
      ['id', 'x'],
    ];
    for (const [field, value] of bad) {
      const res = await app.inject({
        method: 'PATCH',
        url: '/v1/profiles/me',
        headers: bearer(user.accessToken),
        payload: { [field]: value },
      });
      expect(res.statusCode, `${field}=${JSON.stringify(value).slice(0, 40)}`).toBe(400);
      expect(res.json().code).toBe('validation_failed');
    }
    const roles = await app.inject({ method: 'GET', url: '/v1/auth/me', headers: bearer(user.accessToken) });
    expect(roles.json().roles).toEqual(['user']);
  });

  it('hides another user’s profile (404) unless the caller holds profiles:read', async () => {
    const alice = await registerUser(app, 'alice');
    const bob = await registerUser(app, 'bob');
    const idor = await app.inject({
      method: 'GET',
      url: `/v1/profiles/${alice.id}`,
      headers: bearer(bob.accessToken),
    });
    expect(idor.statusCode).toBe(404);
    const missing = await app.inject({
      method: 'GET',
      url: '/v1/profiles/00000000-0000-4000-8000-000000000000',
      headers: bearer(bob.accessToken),
    });
    expect(missing.statusCode).toBe(404);
    expect(idor.json().detail).toBe(missing.json().detail);
    const own = await app.inject({
      method: 'GET',
      url: `/v1/profiles/${alice.id}`,
      headers: bearer(alice.accessToken),
    });
    expect(own.statusCode).toBe(200);
    const admin = await createAdmin(app);
    const read = await app.inject({
      method: 'GET',
      url: `/v1/profiles/${alice.id}`,
      headers: bearer(admin.accessToken),
    });
    expect(read.statusCode).toBe(200);
    expect(
      (
        await app.inject({
          method: 'GET',
          url: '/v1/profiles/not-a-uuid',
          headers: bearer(admin.accessToken),
        })
      ).statusCode,
    ).toBe(400);
  });
});
