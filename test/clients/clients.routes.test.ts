import type { FastifyInstance } from 'fastify';
import { decodeJwt } from 'jose';
import { beforeAll, describe, expect, it } from 'vitest';
import { appliedChanges, buildTestApp } from '../support/app.js';
import { createAdmin, type TestUser } from '../support/factories.js';
import { bearer } from '../support/http.js';
import { basic, clientToken, createClient, createTestClock, form, introspect, userWith } from './helpers.js';

describe('app clients: registration, listing, changes, rotation, deletion', () => {
  let app: FastifyInstance;
  let admin: TestUser;
  const clock = createTestClock();

  beforeAll(async () => {
    app = await buildTestApp({ deps: { clock } });
    admin = await createAdmin(app);
  });

  const auditOf = async (subjectId: string) =>
    (await app.services.audit.list({ actorId: admin.id, limit: 200 }))
      .filter((e) => e.subjectId === subjectId)
      .map((e) => e.type);

  it('registers a client: 201 with a public client_id and a secret shown once', async () => {
    const res = await app.inject({
      method: 'POST',
      url: '/v1/clients',
      headers: bearer(admin.accessToken),
      payload: {
        name: 'orders service',
        description: 'reads users',
        scopes: ['users:read', 'audit:read'],
        audiences: ['https://orders.test'],
        access_token_ttl: 600,
      },
    });
    expect(res.statusCode, res.body).toBe(201);
    const body = res.json();
    expect(body).toMatchObject({
      name: 'orders service',
      description: 'reads users',
      scopes: ['audit:read', 'users:read'],
      audiences: ['https://orders.test'],
      access_token_ttl: 600,
      status: 'active',
      created_by: admin.id,
      previous_secret_expires_at: null,
    });
    expect(body.id).toMatch(/^[0-9a-f-]{36}$/);
    expect(body.client_id).toMatch(/^pci_[0-9A-Za-z]{12}$/);
    // The secret carries the client's lookup id, so a secret names the client it belongs to.
    expect(body.client_secret).toMatch(new RegExp(`^pcs_${body.client_id.slice(4)}_[0-9A-Za-z]{49}$`));
    expect(await auditOf(body.id)).toContain('client.created');

    const get = await app.inject({
      method: 'GET',
      url: `/v1/clients/${body.id}`,
      headers: bearer(admin.accessToken),
    });
    expect(get.statusCode).toBe(200);
    expect(get.json()).toEqual({ ...body, client_secret: undefined });
    expect(get.body).not.toContain(body.client_secret);
    expect(get.json()).not.toHaveProperty('client_secret');
    // The client_id names it as well as the id does.
    const byClientId = await app.inject({
      method: 'GET',
      url: `/v1/clients/${body.client_id}`,
      headers: bearer(admin.accessToken),
    });
    expect(byClientId.json().id).toBe(body.id);
  });

  it('defaults: no description, no audiences, the service’s token lifetime', async () => {
    const client = await createClient(app, admin.accessToken, { scopes: [] });
    expect(client).toMatchObject({ description: '', audiences: [], access_token_ttl: null, scopes: [] });
    const token = await clientToken(app, client);
    expect(token.expires_in).toBe(app.services.config.tokens.accessTtl);
    expect(token.scope).toBe('');
  });

  it('pages through the caller’s clients with an opaque cursor', async () => {
    const owner = await userWith(app, ['clients:read', 'clients:write', 'users:read']);
    const made = [];
    for (let i = 0; i < 5; i++)
      made.push(await createClient(app, owner.accessToken, { scopes: ['users:read'] }));
    const seen: string[] = [];
    let cursor: string | null = null;
    do {
      const url: string = `/v1/clients?limit=2${cursor ? `&cursor=${encodeURIComponent(cursor)}` : ''}`;
      const res = await app.inject({ method: 'GET', url, headers: bearer(owner.accessToken) });
      expect(res.statusCode, res.body).toBe(200);
      const page = res.json() as { data: Array<{ id: string }>; next_cursor: string | null };
      expect(page.data.length).toBeLessThanOrEqual(2);
      expect(JSON.stringify(page)).not.toMatch(/pcs_|secret_hash|client_secret/);
      seen.push(...page.data.map((c) => c.id));
      cursor = page.next_cursor;
    } while (cursor);
    expect(seen).toEqual(made.map((c) => c.id));

    const bad = await app.inject({
      method: 'GET',
      url: '/v1/clients?cursor=nope',
      headers: bearer(owner.accessToken),
    });
    expect(bad.statusCode).toBe(400);
    const tooMany = await app.inject({
      method: 'GET',
      url: '/v1/clients?limit=500',
      headers: bearer(owner.accessToken),
    });
    expect(tooMany.statusCode).toBe(400);
  });

  it('changes name, description, scopes, audiences, lifetime and status, audited', async () => {
    const client = await createClient(app, admin.accessToken, { scopes: ['users:read'] });
    const res = await app.inject({
      method: 'PATCH',
      url: `/v1/clients/${client.id}`,
      headers: bearer(admin.accessToken),
      payload: {
        name: 'renamed',
        description: 'now with audit',
        scopes: ['users:read', 'audit:read'],
        audiences: ['https://a.test', 'https://b.test'],
        access_token_ttl: 120,
      },
    });
    expect(res.statusCode, res.body).toBe(200);
    expect(res.json()).toMatchObject({
      name: 'renamed',
      description: 'now with audit',
      scopes: ['audit:read', 'users:read'],
      audiences: ['https://a.test', 'https://b.test'],
      access_token_ttl: 120,
    });
    const token = await clientToken(app, client);
    expect(token).toMatchObject({ expires_in: 120, scope: 'audit:read users:read' });
    expect(decodeJwt(token.access_token).aud).toEqual(['https://a.test', 'https://b.test']);

    const reset = await app.inject({
      method: 'PATCH',
      url: `/v1/clients/${client.id}`,
      headers: bearer(admin.accessToken),
      payload: { access_token_ttl: null },
    });
    expect(reset.json().access_token_ttl).toBeNull();
    expect(await auditOf(client.id)).toEqual(expect.arrayContaining(['client.created', 'client.updated']));
  });

  it('caps the access-token lifetime at the service maximum', async () => {
    const max = app.services.config.tokens.maxAccessTtl;
    const over = await app.inject({
      method: 'POST',
      url: '/v1/clients',
      headers: bearer(admin.accessToken),
      payload: { name: 'greedy', scopes: [], access_token_ttl: max + 1 },
    });
    expect(over.statusCode).toBe(400);
    expect(over.json().errors).toEqual([expect.objectContaining({ field: 'body.access_token_ttl' })]);
    const atMax = await createClient(app, admin.accessToken, { scopes: [], access_token_ttl: max });
    expect((await clientToken(app, atMax)).expires_in).toBe(max);
  });

  it('refuses malformed permissions, malformed audiences and unknown fields with 400', async () => {
    for (const payload of [
      { name: 'x', scopes: ['not a permission'] },
      { name: 'x', scopes: ['Orders:Read'] },
      { name: 'x', scopes: ['nothing:'] },
      { name: 'x', scopes: [], audiences: ['has space'] },
      { name: 'x', scopes: [], audiences: [''] },
      { name: 'x', scopes: [], audiences: ['*'] },
      { name: 'x', scopes: [], audiences: ['https://*.example.com'] },
      { name: 'x', scopes: [], audiences: ['https://a.example.com/#frag'] },
      { name: '', scopes: [] },
      { name: 'x' },
      { name: 'x', scopes: [], client_id: 'pci_chosenbyme1' },
      { name: 'x', scopes: [], status: 'disabled' },
      { name: 'x', scopes: [], access_token_ttl: 5 },
      { name: 'x', scopes: 'users:read' },
    ]) {
      const res = await app.inject({
        method: 'POST',
        url: '/v1/clients',
        headers: bearer(admin.accessToken),
        payload,
      });
      expect(res.statusCode, JSON.stringify(payload)).toBe(400);
      expect(res.json().code).toBe('validation_failed');
    }
    // An unknown field is named, as every other one is (not the whole body).
    const unknownFields = await app.inject({
      method: 'POST',
      url: '/v1/clients',
      headers: bearer(admin.accessToken),
      payload: { name: 'x', scopes: [], status: 'disabled', owner: 'me' },
    });
    expect(unknownFields.json().errors).toEqual([
      { field: 'body.status', message: 'is not accepted' },
      { field: 'body.owner', message: 'is not accepted' },
    ]);
    const listed = await app.inject({
      method: 'GET',
      url: '/v1/clients?sort=name',
      headers: bearer(admin.accessToken),
    });
    expect(listed.statusCode).toBe(400);
    expect(listed.json().errors).toEqual([{ field: 'query.sort', message: 'is not accepted' }]);
    // Another service's permission is a well-formed scope: an admin (`*`) may give it to a client.
    const foreign = await app.inject({
      method: 'POST',
      url: '/v1/clients',
      headers: bearer(admin.accessToken),
      payload: { name: 'orders-reader', scopes: ['orders:read'] },
    });
    expect(foreign.statusCode).toBe(201);
    const badId = await app.inject({
      method: 'GET',
      url: '/v1/clients/not-an-id',
      headers: bearer(admin.accessToken),
    });
    expect(badId.statusCode).toBe(400);
    const unknown = await app.inject({
      method: 'GET',
      url: '/v1/clients/00000000-0000-4000-8000-000000000000',
      headers: bearer(admin.accessToken),
    });
    expect(unknown.statusCode).toBe(404);
  });

  it('rotates the secret: the old one works for the grace, then fails with invalid_client', async () => {
    const client = await createClient(app, admin.accessToken, { scopes: ['users:read'] });
    const res = await app.inject({
      method: 'POST',
      url: `/v1/clients/${client.id}/secrets`,
      headers: bearer(admin.accessToken),
      payload: { grace_seconds: 300 },
    });
    expect(res.statusCode, res.body).toBe(201);
    const rotated = res.json();
    expect(rotated.client_secret).not.toBe(client.client_secret);
    expect(rotated.client_id).toBe(client.client_id);
    expect(Date.parse(rotated.previous_secret_expires_at) - Date.now()).toBeGreaterThan(250_000);
    await clientToken(app, { client_id: client.client_id, client_secret: rotated.client_secret });
    await clientToken(app, client);

    clock.advance(301);
    try {
      const old = await form(
        app,
        '/oauth/token',
        { grant_type: 'client_credentials' },
        basic(client.client_id, client.client_secret),
      );
      expect(old.statusCode).toBe(401);
      expect(old.json().error).toBe('invalid_client');
      await clientToken(app, { client_id: client.client_id, client_secret: rotated.client_secret });
    } finally {
      clock.advance(-301);
    }
    expect(await auditOf(client.id)).toContain('client.secret_rotated');
  });

  it('audits a rotation with its grace, and a forced one with the grace it ended', async () => {
    const client = await createClient(app, admin.accessToken, { scopes: [] });
    const rotate = (payload: object) =>
      app.inject({
        method: 'POST',
        url: `/v1/clients/${client.id}/secrets`,
        headers: bearer(admin.accessToken),
        payload,
      });
    const first = await rotate({ grace_seconds: 600 });
    expect(first.statusCode, first.body).toBe(201);
    const forced = await rotate({ grace_seconds: 60, force: true });
    expect(forced.statusCode, forced.body).toBe(201);
    const events = await app.services.audit.list({
      type: 'client.secret_rotated',
      subjectId: client.id,
      limit: 10,
    });
    // Newest first.
    expect(events.map((e) => e.data)).toEqual([
      {
        client_id: client.client_id,
        grace_seconds: 60,
        previous_secret_expires_at: forced.json().previous_secret_expires_at,
        force: true,
        ended_grace_until: first.json().previous_secret_expires_at,
      },
      {
        client_id: client.client_id,
        grace_seconds: 600,
        previous_secret_expires_at: first.json().previous_secret_expires_at,
      },
    ]);
  });

  it('rotates without a grace: the old secret stops at once, the tokens it got do not', async () => {
    const client = await createClient(app, admin.accessToken, { scopes: [] });
    // Used first, so this instance remembers it (its header included) until the rotation.
    const before = await clientToken(app, client);
    const res = await app.inject({
      method: 'POST',
      url: `/v1/clients/${client.id}/secrets`,
      headers: bearer(admin.accessToken),
    });
    expect(res.statusCode, res.body).toBe(201);
    expect(res.json().previous_secret_expires_at).toBeNull();
    const old = await form(
      app,
      '/oauth/token',
      { grant_type: 'client_credentials' },
      basic(client.client_id, client.client_secret),
    );
    expect(old.statusCode).toBe(401);
    await clientToken(app, { client_id: client.client_id, client_secret: res.json().client_secret });
    // A rotation revokes nothing already issued (README): disabling the client does.
    const watcher = await createClient(app, admin.accessToken, { scopes: ['tokens:introspect'] });
    const asWatcher = basic(watcher.client_id, watcher.client_secret);
    expect((await introspect(app, before.access_token, asWatcher)).active).toBe(true);
    const disabled = await app.inject({
      method: 'PATCH',
      url: `/v1/clients/${client.id}`,
      headers: bearer(admin.accessToken),
      payload: { status: 'disabled' },
    });
    expect(disabled.statusCode, disabled.body).toBe(200);
    expect((await introspect(app, before.access_token, asWatcher)).active).toBe(false);
  });

  it('even without an event, a rotation reaches a remembered secret once the client’s row is read again', async () => {
    // The row is cached below only once the creation is applied here both at its commit and from its
    // notification (which would otherwise drop the row the failed attempt cached).
    const changes = appliedChanges(app, (e) => (e.type === 'client_changed' ? e.clientId : undefined));
    const client = await createClient(app, admin.accessToken, { scopes: ['tokens:introspect'] });
    await changes.bothHeard(client.client_id);
    const asBasic = basic(client.client_id, client.client_secret);
    const asPost = { client_id: client.client_id, client_secret: client.client_secret };
    const introspectAs = (params: Record<string, string>, headers: Record<string, string> = {}) =>
      form(app, '/oauth/introspect', { token: 'not-a-token', ...params }, headers);
    try {
      // The row is cached first (a failed attempt reads it), the secret remembered 30 s later: the
      // remembered match outlives the row's cache entry by 30 s.
      const failed = await form(
        app,
        '/oauth/token',
        { grant_type: 'client_credentials' },
        basic(client.client_id, 'nope'),
      );
      expect(failed.statusCode).toBe(401);
      clock.advance(30);
      await clientToken(app, client);
      expect((await introspectAs(asPost)).statusCode).toBe(200);
      expect((await introspectAs({}, asBasic)).statusCode).toBe(200);
      // Another instance rotates it with no grace, and its notification never arrives here.
      const row = (await app.services.repos.clients.findById(client.id))!;
      await app.services.repos.clients.update(
        client.id,
        {
          secretHash: 'rotated-elsewhere',
          previousSecretHash: row.secretHash,
          previousSecretExpiresAt: clock.now(),
        },
        clock.now(),
      );
      // Past the row's 60 s backstop, within the remembered match's minute.
      clock.advance(31);
      const old = await form(app, '/oauth/token', { grant_type: 'client_credentials' }, asBasic);
      expect(old.statusCode).toBe(401);
      expect(old.json().error).toBe('invalid_client');
      const oldPost = await form(app, '/oauth/token', { grant_type: 'client_credentials', ...asPost });
      expect(oldPost.statusCode).toBe(401);
      expect((await introspectAs({}, asBasic)).statusCode).toBe(401);
      expect((await introspectAs(asPost)).statusCode).toBe(401);
    } finally {
      clock.advance(-61);
    }
  });

  it('disables a client: its secret is refused and the tokens it holds stop working', async () => {
    const client = await createClient(app, admin.accessToken, { scopes: ['users:read'] });
    const token = await clientToken(app, client);
    const watcher = await createClient(app, admin.accessToken, { scopes: ['tokens:introspect'] });
    const asWatcher = basic(watcher.client_id, watcher.client_secret);
    expect((await introspect(app, token.access_token, asWatcher)).active).toBe(true);

    const res = await app.inject({
      method: 'PATCH',
      url: `/v1/clients/${client.id}`,
      headers: bearer(admin.accessToken),
      payload: { status: 'disabled' },
    });
    expect(res.statusCode).toBe(200);
    expect(res.json().status).toBe('disabled');
    const refused = await form(
      app,
      '/oauth/token',
      { grant_type: 'client_credentials' },
      basic(client.client_id, client.client_secret),
    );
    expect(refused.statusCode).toBe(401);
    expect(refused.json().error).toBe('invalid_client');
    expect(await introspect(app, token.access_token, asWatcher)).toEqual({ active: false });

    const enabled = await app.inject({
      method: 'PATCH',
      url: `/v1/clients/${client.id}`,
      headers: bearer(admin.accessToken),
      payload: { status: 'active' },
    });
    expect(enabled.json().status).toBe('active');
    await clientToken(app, client);
  });

  it('deletes a client: 204, then 404, its secret refused and its tokens revoked', async () => {
    const client = await createClient(app, admin.accessToken, { scopes: ['users:read'] });
    const token = await clientToken(app, client);
    const del = await app.inject({
      method: 'DELETE',
      url: `/v1/clients/${client.id}`,
      headers: bearer(admin.accessToken),
    });
    expect(del.statusCode).toBe(204);
    const get = await app.inject({
      method: 'GET',
      url: `/v1/clients/${client.id}`,
      headers: bearer(admin.accessToken),
    });
    expect(get.statusCode).toBe(404);
    const again = await app.inject({
      method: 'DELETE',
      url: `/v1/clients/${client.id}`,
      headers: bearer(admin.accessToken),
    });
    expect(again.statusCode).toBe(404);
    const refused = await form(
      app,
      '/oauth/token',
      { grant_type: 'client_credentials' },
      basic(client.client_id, client.client_secret),
    );
    expect(refused.statusCode).toBe(401);
    expect(app.services.revocations.isRevoked(decodeJwt(token.access_token))).toBe(true);
    expect(await auditOf(client.id)).toContain('client.deleted');
  });
});
