import type { FastifyInstance } from 'fastify';
import { beforeAll, describe, expect, it } from 'vitest';
import { createKey } from '../api-keys/helpers.js';
import { createClient } from '../clients/helpers.js';
import { buildTestApp } from '../support/app.js';
import { createAdmin, registerUser, type TestUser } from '../support/factories.js';
import { bearer } from '../support/http.js';

/**
 * A PATCH that sets what is already so changes nothing: the same answer, no `updated_at` bump, no
 * audit event, no cache invalidation. Roles are covered in test/users/users.routes.test.ts.
 */
let app: FastifyInstance;
let admin: TestUser;
beforeAll(async () => {
  app = await buildTestApp();
  admin = await createAdmin(app);
});

async function eventsAbout(type: string, subjectId: string) {
  return (await app.services.audit.list({ type, limit: 100 })).filter((e) => e.subjectId === subjectId);
}

describe('a PATCH that changes nothing writes nothing', () => {
  it('app clients: same name, scopes in another order, same status', async () => {
    const client = await createClient(app, admin.accessToken, {
      name: 'steady',
      scopes: ['users:read', 'roles:read'],
      audiences: ['https://a.example.test', 'https://b.example.test'],
    });
    const patch = (payload: object) =>
      app.inject({
        method: 'PATCH',
        url: `/v1/clients/${client.id}`,
        headers: bearer(admin.accessToken),
        payload,
      });
    for (const payload of [
      { name: 'steady' },
      { scopes: ['roles:read', 'users:read', 'roles:read'] },
      { status: 'active', audiences: ['https://b.example.test', 'https://a.example.test'] },
    ]) {
      const res = await patch(payload);
      expect(res.statusCode, res.body).toBe(200);
      expect(res.json().updated_at).toBe(client.updated_at);
    }
    expect(await eventsAbout('client.updated', client.id)).toEqual([]);

    // A real change names only what changed, even beside fields sent as they were.
    const changed = await patch({ name: 'steady', description: 'now described' });
    expect(changed.statusCode).toBe(200);
    expect(changed.json().updated_at).not.toBe(client.updated_at);
    expect((await eventsAbout('client.updated', client.id)).map((e) => e.data.changed)).toEqual([
      ['description'],
    ]);
  });

  it('API keys: same name, same scopes, same expiry', async () => {
    const user = await registerUser(app, 'noop-key');
    const expiresAt = new Date(Date.now() + 86_400_000).toISOString();
    const key = await createKey(app, user.accessToken, {
      name: 'steady',
      scopes: ['account:read'],
      expires_at: expiresAt,
    });
    const before = await app.inject({
      method: 'GET',
      url: `/v1/api-keys/${key.id}`,
      headers: bearer(user.accessToken),
    });
    const patch = (payload: object) =>
      app.inject({
        method: 'PATCH',
        url: `/v1/api-keys/${key.id}`,
        headers: bearer(user.accessToken),
        payload,
      });
    for (const payload of [{ name: 'steady' }, { scopes: ['account:read'] }, { expires_at: expiresAt }]) {
      const res = await patch(payload);
      expect(res.statusCode, res.body).toBe(200);
      expect(res.json().updated_at).toBe(before.json().updated_at);
    }
    expect(await eventsAbout('api_key.updated', key.id)).toEqual([]);

    const changed = await patch({ name: 'renamed', scopes: ['account:read'] });
    expect(changed.statusCode).toBe(200);
    expect((await eventsAbout('api_key.updated', key.id)).map((e) => e.data.changed)).toEqual([['name']]);
  });

  it('profiles: same fields, metadata with its keys in another order', async () => {
    const user = await registerUser(app, 'noop-profile');
    const patch = (payload: object) =>
      app.inject({ method: 'PATCH', url: '/v1/profiles/me', headers: bearer(user.accessToken), payload });
    const set = await patch({
      display_name: 'Ada',
      metadata: { theme: 'dark', layout: { a: 1, b: [1, 2] } },
    });
    expect(set.statusCode, set.body).toBe(200);
    const eventsBefore = (await eventsAbout('profile.updated', user.id)).length;
    for (const payload of [
      { display_name: 'Ada' },
      { metadata: { layout: { b: [1, 2], a: 1 }, theme: 'dark' } },
      { display_name: 'Ada', bio: null },
    ]) {
      const res = await patch(payload);
      expect(res.statusCode, res.body).toBe(200);
      expect(res.json().updated_at).toBe(set.json().updated_at);
    }
    expect(await eventsAbout('profile.updated', user.id)).toHaveLength(eventsBefore);

    // Order inside a list is data: a reordered list is a change.
    const changed = await patch({
      display_name: 'Ada',
      metadata: { theme: 'dark', layout: { a: 1, b: [2, 1] } },
    });
    expect(changed.statusCode).toBe(200);
    const events = await eventsAbout('profile.updated', user.id);
    expect(events).toHaveLength(eventsBefore + 1);
    expect(events[0]?.data.fields).toEqual(['metadata']);
  });
});
