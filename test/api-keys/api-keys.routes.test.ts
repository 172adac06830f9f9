import { eq } from 'drizzle-orm';
import type { FastifyInstance } from 'fastify';
import { beforeAll, describe, expect, it } from 'vitest';
import { apiKeys, auditEvents } from '../../src/db/schema/index.js';
import { buildTestApp } from '../support/app.js';
import { createAdmin, registerUser, type TestUser } from '../support/factories.js';
import { bearer } from '../support/http.js';
import { createKey, createTestClock, verifyKey, withKey } from './helpers.js';

const KEY_PATTERN = /^pak_[0-9A-Za-z]{12}_[0-9A-Za-z]{49}$/;

describe('api keys: create, use, list, get, update, rotate, revoke, verify', () => {
  let app: FastifyInstance;
  let admin: TestUser;
  const clock = createTestClock();

  beforeAll(async () => {
    app = await buildTestApp({ deps: { clock } });
    admin = await createAdmin(app);
  });

  const me = (headers: Record<string, string>) => app.inject({ method: 'GET', url: '/v1/auth/me', headers });
  const keyRow = async (id: string) =>
    (await app.services.db.select().from(apiKeys).where(eq(apiKeys.id, id)))[0]!;

  it('creates a key shown once, in the documented format, that works on /v1/auth/me by both headers', async () => {
    const user = await registerUser(app, 'ak-create');
    const res = await app.inject({
      method: 'POST',
      url: '/v1/api-keys',
      headers: bearer(user.accessToken),
      payload: { name: ' CI deploy ', scopes: ['account:read', 'api_keys:own', 'account:read'] },
    });
    expect(res.statusCode, res.body).toBe(201);
    const created = res.json();
    expect(created.key).toMatch(KEY_PATTERN);
    expect(created).toMatchObject({
      owner_id: user.id,
      name: 'CI deploy',
      prefix: created.key.slice(0, 16),
      last_four: created.key.slice(-4),
      scopes: ['account:read', 'api_keys:own'],
      expires_at: null,
      last_used_at: null,
      parent_id: null,
    });
    expect(Object.keys(created).sort()).toEqual(
      [
        'created_at',
        'expires_at',
        'id',
        'key',
        'last_four',
        'last_used_at',
        'name',
        'owner_id',
        'parent_id',
        'prefix',
        'scopes',
        'updated_at',
      ].sort(),
    );

    for (const headers of [withKey(created.key), bearer(created.key)]) {
      const res2 = await me(headers);
      expect(res2.statusCode, res2.body).toBe(200);
      expect(res2.json()).toMatchObject({
        user: { id: user.id, email: user.email },
        roles: ['user'],
        permissions: ['account:read', 'api_keys:own'],
        principal: { kind: 'api_key', id: created.id, session_id: null },
      });
    }

    const audit = await app.services.db
      .select()
      .from(auditEvents)
      .where(eq(auditEvents.subjectId, created.id));
    expect(audit.map((e) => e.type)).toEqual(['api_key.created']);
    expect(audit[0]).toMatchObject({ actorType: 'user', actorId: user.id, outcome: 'success' });
  });

  it('a key acts within its scopes: a route outside them answers 403', async () => {
    const user = await registerUser(app, 'ak-scope');
    const { key } = await createKey(app, user.accessToken, { scopes: ['account:read'] });
    expect((await me(withKey(key))).statusCode).toBe(200);
    const res = await app.inject({ method: 'GET', url: '/v1/api-keys', headers: withKey(key) });
    expect(res.statusCode).toBe(403);
    expect(res.json().code).toBe('forbidden');
  });

  it('lists the caller’s live keys with pagination, and others’ only with api_keys:read', async () => {
    const user = await registerUser(app, 'ak-list');
    const other = await registerUser(app, 'ak-list-other');
    const made = [];
    for (let i = 0; i < 3; i++)
      made.push(await createKey(app, user.accessToken, { name: `k${i}`, scopes: [] }));
    await createKey(app, other.accessToken, { scopes: [] });

    const first = await app.inject({
      method: 'GET',
      url: '/v1/api-keys?limit=2',
      headers: bearer(user.accessToken),
    });
    expect(first.statusCode, first.body).toBe(200);
    // Creation order, ties broken by id: the keyset the cursor continues from.
    const order = [...made]
      .sort((x, y) =>
        x.created_at === y.created_at ? (x.id < y.id ? -1 : 1) : x.created_at < y.created_at ? -1 : 1,
      )
      .map((k) => k.id);
    expect(first.json().data.map((k: { id: string }) => k.id)).toEqual(order.slice(0, 2));
    expect(first.json().next_cursor).toEqual(expect.any(String));
    const second = await app.inject({
      method: 'GET',
      url: `/v1/api-keys?limit=2&cursor=${first.json().next_cursor}`,
      headers: bearer(user.accessToken),
    });
    expect(second.json()).toEqual({
      data: [expect.objectContaining({ id: order[2] })],
      next_cursor: null,
    });
    for (const k of [...first.json().data, ...second.json().data]) expect(k).not.toHaveProperty('key');

    const foreign = await app.inject({
      method: 'GET',
      url: `/v1/api-keys?owner_id=${user.id}`,
      headers: bearer(other.accessToken),
    });
    expect(foreign.statusCode).toBe(403);
    const byAdmin = await app.inject({
      method: 'GET',
      url: `/v1/api-keys?owner_id=${user.id}`,
      headers: bearer(admin.accessToken),
    });
    expect(byAdmin.statusCode).toBe(200);
    expect(byAdmin.json().data).toHaveLength(3);

    const badCursor = await app.inject({
      method: 'GET',
      url: '/v1/api-keys?cursor=nonsense',
      headers: bearer(user.accessToken),
    });
    expect(badCursor.statusCode).toBe(400);
  });

  it('leaves expired keys out of the list unless include_expired=true, and pages past them', async () => {
    const user = await registerUser(app, 'ak-list-expired');
    const inAMinute = () => new Date(clock.nowMs() + 60_000).toISOString();
    // Live, expiring, live, expiring: an expired key between two pages, and one after the last.
    const made = [];
    for (const expires of [false, true, false, true])
      made.push(
        await createKey(app, user.accessToken, {
          scopes: [],
          ...(expires ? { expires_at: inAMinute() } : {}),
        }),
      );
    const order = [...made]
      .sort((x, y) =>
        x.created_at === y.created_at ? (x.id < y.id ? -1 : 1) : x.created_at < y.created_at ? -1 : 1,
      )
      .map((k) => k.id);
    const expiring = new Set(made.filter((k) => k.expires_at !== null).map((k) => k.id));
    /** Every page of the list, one key a page, following next_cursor; the ids of each page. */
    const pages = async (query: string) => {
      const out: string[][] = [];
      let cursor: string | null = null;
      do {
        const res: Awaited<ReturnType<typeof app.inject>> = await app.inject({
          method: 'GET',
          url: `/v1/api-keys?limit=1${query}${cursor ? `&cursor=${cursor}` : ''}`,
          headers: bearer(user.accessToken),
        });
        expect(res.statusCode, res.body).toBe(200);
        const page = res.json() as { data: Array<{ id: string }>; next_cursor: string | null };
        out.push(page.data.map((k) => k.id));
        cursor = page.next_cursor;
      } while (cursor && out.length < 10);
      return out;
    };
    // Before they expire, every key is live.
    expect(await pages('')).toEqual(order.map((id) => [id]));
    clock.advance(61);
    try {
      // Each live key once, in order; no page for an expired one, none empty after the last.
      const live = order.filter((id) => !expiring.has(id));
      expect(await pages('')).toEqual(live.map((id) => [id]));
      expect(await pages('&include_expired=false')).toEqual(live.map((id) => [id]));
      expect(await pages('&include_expired=true')).toEqual(order.map((id) => [id]));
      const all = await app.inject({
        method: 'GET',
        url: '/v1/api-keys?include_expired=true',
        headers: bearer(user.accessToken),
      });
      expect(
        all
          .json()
          .data.filter((k: { id: string }) => expiring.has(k.id))
          .map((k: { expires_at: string }) => k.expires_at),
      ).toEqual(made.filter((k) => expiring.has(k.id)).map((k) => k.expires_at));
      // A revoked key stays out either way.
      const revoked = await app.inject({
        method: 'DELETE',
        url: `/v1/api-keys/${live[0]}`,
        headers: bearer(user.accessToken),
      });
      expect(revoked.statusCode).toBe(204);
      expect(await pages('&include_expired=true')).toEqual(
        order.filter((id) => id !== live[0]).map((id) => [id]),
      );
      const bad = await app.inject({
        method: 'GET',
        url: '/v1/api-keys?include_expired=yes',
        headers: bearer(user.accessToken),
      });
      expect(bad.statusCode).toBe(400);
      expect(bad.headers['content-type']).toMatch(/^application\/problem\+json/);
      expect(bad.json().errors.map((e: { field: string }) => e.field)).toEqual(['query.include_expired']);
    } finally {
      clock.advance(-61);
    }
  });

  it('gets and updates a key (name, scopes, expiry) and audits the change', async () => {
    const user = await registerUser(app, 'ak-update');
    const created = await createKey(app, user.accessToken, { scopes: ['account:read'] });
    const got = await app.inject({
      method: 'GET',
      url: `/v1/api-keys/${created.id}`,
      headers: bearer(user.accessToken),
    });
    expect(got.statusCode).toBe(200);
    expect(got.json()).toMatchObject({ id: created.id, prefix: created.prefix, scopes: ['account:read'] });
    expect(got.json()).not.toHaveProperty('key');

    const expiresAt = new Date(clock.now().getTime() + 3600_000).toISOString();
    const patched = await app.inject({
      method: 'PATCH',
      url: `/v1/api-keys/${created.id}`,
      headers: bearer(user.accessToken),
      payload: { name: 'renamed', scopes: ['account:write', 'account:read'], expires_at: expiresAt },
    });
    expect(patched.statusCode, patched.body).toBe(200);
    expect(patched.json()).toMatchObject({
      name: 'renamed',
      scopes: ['account:read', 'account:write'],
      expires_at: expiresAt,
    });
    // The new scopes apply at once.
    expect((await me(withKey(created.key))).json().permissions).toEqual(['account:read', 'account:write']);

    const cleared = await app.inject({
      method: 'PATCH',
      url: `/v1/api-keys/${created.id}`,
      headers: bearer(user.accessToken),
      payload: { expires_at: null },
    });
    expect(cleared.json().expires_at).toBeNull();

    const audit = await app.services.db
      .select()
      .from(auditEvents)
      .where(eq(auditEvents.subjectId, created.id));
    expect(audit.map((e) => e.type).sort()).toEqual([
      'api_key.created',
      'api_key.updated',
      'api_key.updated',
    ]);
    // Fields are named as in the API (snake_case), not as in the row.
    const changed = audit
      .filter((e) => e.type === 'api_key.updated')
      .map((e) => (e.data as { changed: string[] }).changed.sort());
    expect(changed).toEqual(expect.arrayContaining([['expires_at', 'name', 'scopes'], ['expires_at']]));
    expect(changed).toHaveLength(2);
  });

  it('rotates: a new secret under the same id; the old one works for the grace, then answers expired', async () => {
    const user = await registerUser(app, 'ak-rotate');
    const created = await createKey(app, user.accessToken, { scopes: ['account:read'] });
    expect((await me(withKey(created.key))).statusCode).toBe(200);

    const res = await app.inject({
      method: 'POST',
      url: `/v1/api-keys/${created.id}/rotate`,
      headers: bearer(user.accessToken),
      payload: { grace_seconds: 300 },
    });
    expect(res.statusCode, res.body).toBe(200);
    const rotated = res.json();
    expect(rotated).toMatchObject({ id: created.id, prefix: created.prefix, scopes: ['account:read'] });
    expect(rotated.key).toMatch(KEY_PATTERN);
    expect(rotated.key).not.toBe(created.key);
    expect(rotated.last_four).toBe(rotated.key.slice(-4));

    // Within the grace both secrets work.
    expect((await me(withKey(rotated.key))).statusCode).toBe(200);
    expect((await me(withKey(created.key))).statusCode).toBe(200);
    expect(await verifyKey(app, admin.accessToken, created.key)).toMatchObject({
      valid: true,
      key_id: created.id,
    });

    clock.advance(301);
    // The admin's token is still valid (15 min); the old secret is not.
    expect(await verifyKey(app, admin.accessToken, created.key)).toEqual({ valid: false, reason: 'expired' });
    expect((await me(withKey(created.key))).statusCode).toBe(401);
    expect((await me(withKey(rotated.key))).statusCode).toBe(200);

    // Without a grace the old secret stops at once.
    const again = await app.inject({
      method: 'POST',
      url: `/v1/api-keys/${created.id}/rotate`,
      headers: bearer(user.accessToken),
    });
    expect(again.statusCode, again.body).toBe(200);
    expect(await verifyKey(app, admin.accessToken, rotated.key)).toEqual({ valid: false, reason: 'expired' });
    expect((await me(withKey(again.json().key))).statusCode).toBe(200);

    const audit = await app.services.db
      .select()
      .from(auditEvents)
      .where(eq(auditEvents.subjectId, created.id));
    expect(audit.filter((e) => e.type === 'api_key.rotated')).toHaveLength(2);
  });

  it('verify gives a rotated-out secret the expires_at of its grace, or of the key when that comes first', async () => {
    const user = await registerUser(app, 'ak-rotated-expiry');
    const rotate = async (id: string, grace: number) => {
      const res = await app.inject({
        method: 'POST',
        url: `/v1/api-keys/${id}/rotate`,
        headers: bearer(user.accessToken),
        payload: { grace_seconds: grace },
      });
      expect(res.statusCode, res.body).toBe(200);
      const graceEnds = (await keyRow(id)).previousSecretExpiresAt!.toISOString();
      return { key: res.json().key as string, graceEnds };
    };
    const expiresAt = async (key: string) => {
      const answer = await verifyKey(app, admin.accessToken, key);
      expect(answer.valid, JSON.stringify(answer)).toBe(true);
      return answer.expires_at;
    };
    const inSeconds = (s: number) => new Date(clock.now().getTime() + s * 1000).toISOString();

    // A key that never expires: its replaced secret stops at the end of the grace, and says so, even
    // when that secret's verification was answered (and cached) before the rotation.
    const forever = await createKey(app, user.accessToken, { scopes: ['account:read'] });
    expect(await expiresAt(forever.key)).toBeNull();
    const renewed = await rotate(forever.id, 300);
    expect(await expiresAt(forever.key)).toBe(renewed.graceEnds);
    expect(await expiresAt(forever.key)).toBe(renewed.graceEnds);
    expect(await expiresAt(renewed.key)).toBeNull();

    // A key that expires before the grace would end: the key's expiry, the earlier of the two.
    const soon = inSeconds(120);
    const short = await createKey(app, user.accessToken, { scopes: ['account:read'], expires_at: soon });
    const shortRenewed = await rotate(short.id, 3600);
    expect(await expiresAt(short.key)).toBe(soon);
    expect(await expiresAt(shortRenewed.key)).toBe(soon);

    // A key that expires after the grace: the grace, for the replaced secret only.
    const month = inSeconds(30 * 86_400);
    const long = await createKey(app, user.accessToken, { scopes: ['account:read'], expires_at: month });
    const longRenewed = await rotate(long.id, 60);
    expect(await expiresAt(long.key)).toBe(longRenewed.graceEnds);
    expect(await expiresAt(longRenewed.key)).toBe(month);
  });

  it('revokes: 204, then the key fails with revoked and disappears from the owner’s view', async () => {
    const user = await registerUser(app, 'ak-revoke');
    const created = await createKey(app, user.accessToken, { scopes: ['account:read'] });
    expect((await me(withKey(created.key))).statusCode).toBe(200);
    const res = await app.inject({
      method: 'DELETE',
      url: `/v1/api-keys/${created.id}`,
      headers: bearer(user.accessToken),
    });
    expect(res.statusCode).toBe(204);
    expect(res.body).toBe('');

    expect(await verifyKey(app, admin.accessToken, created.key)).toEqual({ valid: false, reason: 'revoked' });
    const refused = await me(withKey(created.key));
    expect(refused.statusCode).toBe(401);
    expect(refused.json().code).toBe('invalid_token');
    expect(refused.headers['www-authenticate']).toContain('invalid_token');

    for (const method of ['GET', 'DELETE'] as const) {
      const again = await app.inject({
        method,
        url: `/v1/api-keys/${created.id}`,
        headers: bearer(user.accessToken),
      });
      expect(again.statusCode).toBe(404);
    }
    const list = await app.inject({ method: 'GET', url: '/v1/api-keys', headers: bearer(user.accessToken) });
    expect(list.json().data).toEqual([]);
    const audit = await app.services.db
      .select()
      .from(auditEvents)
      .where(eq(auditEvents.subjectId, created.id));
    expect(audit.map((e) => e.type).sort()).toEqual(['api_key.created', 'api_key.revoked']);
  });

  it('an expired key fails with expired on verify and 401 on routes', async () => {
    const user = await registerUser(app, 'ak-expire');
    const expiresAt = new Date(clock.now().getTime() + 60_000).toISOString();
    const created = await createKey(app, user.accessToken, {
      scopes: ['account:read'],
      expires_at: expiresAt,
    });
    expect(created.expires_at).toBe(expiresAt);
    expect(await verifyKey(app, admin.accessToken, created.key)).toEqual({
      valid: true,
      key_id: created.id,
      owner_id: user.id,
      scopes: ['account:read'],
      expires_at: expiresAt,
    });
    clock.advance(61);
    expect(await verifyKey(app, admin.accessToken, created.key)).toEqual({ valid: false, reason: 'expired' });
    expect((await me(withKey(created.key))).statusCode).toBe(401);
  });

  it('a disabled owner’s key stops: owner_disabled on verify, 401 on routes; back when re-enabled', async () => {
    const user = await registerUser(app, 'ak-disabled');
    const created = await createKey(app, user.accessToken, { scopes: ['account:read'] });
    expect((await me(withKey(created.key))).statusCode).toBe(200);

    await app.services.repos.users.update(user.id, { status: 'disabled' });
    app.services.events.applyLocally([{ type: 'user_changed', userId: user.id }]);
    expect(await verifyKey(app, admin.accessToken, created.key)).toEqual({
      valid: false,
      reason: 'owner_disabled',
    });
    expect((await me(withKey(created.key))).statusCode).toBe(401);

    await app.services.repos.users.update(user.id, { status: 'active' });
    app.services.events.applyLocally([{ type: 'user_changed', userId: user.id }]);
    expect((await me(withKey(created.key))).statusCode).toBe(200);
  });

  it('verify answers 200 not_found for anything that is not a key, 400 for a malformed request', async () => {
    const user = await registerUser(app, 'ak-verify');
    const created = await createKey(app, user.accessToken, { scopes: [] });
    const wrongSecret = `${created.key.slice(0, 17)}${'A'.repeat(43)}`;
    const long = 'x'.repeat(257);
    for (const key of [
      '',
      'nonsense',
      'pak_',
      created.key.slice(0, -1),
      `${created.key}x`,
      wrongSecret,
      long,
    ]) {
      expect(await verifyKey(app, admin.accessToken, key), key).toEqual({
        valid: false,
        reason: 'not_found',
      });
    }
    for (const payload of [{}, { key: 42 }, { key: 'x'.repeat(4097) }, { key: created.key, extra: 1 }]) {
      const res = await app.inject({
        method: 'POST',
        url: '/v1/api-keys/verify',
        headers: bearer(admin.accessToken),
        payload,
      });
      expect(res.statusCode, JSON.stringify(payload)).toBe(400);
      expect(res.json().code).toBe('validation_failed');
    }
  });

  it('takes an RFC 3339 expiry in any of its forms: lower-case t and z, an offset, a fraction', async () => {
    const user = await registerUser(app, 'ak-rfc3339');
    for (const [sent, stored] of [
      ['2099-06-01t12:00:00z', '2099-06-01T12:00:00.000Z'],
      ['2099-06-01T14:30:00.25+02:30', '2099-06-01T12:00:00.250Z'],
    ]) {
      const res = await app.inject({
        method: 'POST',
        url: '/v1/api-keys',
        headers: bearer(user.accessToken),
        payload: { name: 'rfc3339', scopes: [], expires_at: sent },
      });
      expect(res.statusCode, res.body).toBe(201);
      expect(res.json().expires_at, sent).toBe(stored);
    }
    for (const sent of ['2099-06-01 12:00:00Z', '2099-06-01T12:00:00', '2099-02-30T12:00:00Z']) {
      const res = await app.inject({
        method: 'POST',
        url: '/v1/api-keys',
        headers: bearer(user.accessToken),
        payload: { name: 'rfc3339', scopes: [], expires_at: sent },
      });
      expect(res.statusCode, sent).toBe(400);
      // One error: not also "must fall between 0001 and 9999" for what is no date-time at all.
      expect(res.json().errors, sent).toEqual([
        { field: 'body.expires_at', message: expect.stringContaining('RFC 3339') },
      ]);
    }
  });

  it('refuses bad input with 4xx problem+json', async () => {
    const user = await registerUser(app, 'ak-input');
    const created = await createKey(app, user.accessToken, { scopes: [] });
    const h = bearer(user.accessToken);
    const cases: Array<{ method: 'POST' | 'PATCH' | 'GET'; url: string; payload?: unknown; field?: string }> =
      [
        {
          method: 'POST',
          url: '/v1/api-keys',
          payload: { name: 'x', scopes: ['Not A Permission'] },
          field: 'scopes',
        },
        { method: 'POST', url: '/v1/api-keys', payload: { name: 'x', scopes: 'account:read' } },
        { method: 'POST', url: '/v1/api-keys', payload: { scopes: [] }, field: 'name' },
        { method: 'POST', url: '/v1/api-keys', payload: { name: '', scopes: [] } },
        { method: 'POST', url: '/v1/api-keys', payload: { name: 'x', scopes: [], owner_id: user.id } },
        { method: 'POST', url: '/v1/api-keys', payload: { name: 'x', scopes: [], expires_at: 'tomorrow' } },
        {
          method: 'POST',
          url: '/v1/api-keys',
          payload: { name: 'x', scopes: [], expires_at: '2001-01-01T00:00:00Z' },
          field: 'body.expires_at',
        },
        { method: 'PATCH', url: `/v1/api-keys/${created.id}`, payload: {} },
        { method: 'PATCH', url: `/v1/api-keys/${created.id}`, payload: { secret_hash: 'x' } },
        { method: 'PATCH', url: '/v1/api-keys/not-a-uuid', payload: { name: 'x' } },
        { method: 'GET', url: '/v1/api-keys/not-a-uuid' },
        { method: 'GET', url: '/v1/api-keys?limit=0' },
        { method: 'GET', url: '/v1/api-keys?owner_id=nope' },
        { method: 'POST', url: `/v1/api-keys/${created.id}/rotate`, payload: { grace_seconds: -1 } },
        { method: 'POST', url: `/v1/api-keys/${created.id}/rotate`, payload: { grace_seconds: 10_000_000 } },
      ];
    for (const c of cases) {
      const res = await app.inject({
        method: c.method,
        url: c.url,
        headers: h,
        payload: c.payload as object,
      });
      const label = `${c.method} ${c.url} ${JSON.stringify(c.payload)}`;
      expect(res.statusCode, label).toBe(400);
      expect(res.headers['content-type'], label).toContain('application/problem+json');
      if (c.field) expect(JSON.stringify(res.json().errors), label).toContain(c.field);
    }
    const text = await app.inject({
      method: 'POST',
      url: '/v1/api-keys',
      headers: { ...h, 'content-type': 'text/plain' },
      payload: 'name=x',
    });
    expect(text.statusCode).toBe(415);
    const json = await app.inject({
      method: 'POST',
      url: '/v1/api-keys',
      headers: { ...h, 'content-type': 'application/json' },
      payload: '{"name":',
    });
    expect(json.statusCode).toBe(400);
  });

  it('records last_used_at in memory per request and writes it in one batch', async () => {
    const user = await registerUser(app, 'ak-used');
    const created = await createKey(app, user.accessToken, { scopes: ['account:read'] });
    for (let i = 0; i < 5; i++) expect((await me(withKey(created.key))).statusCode).toBe(200);

    // Not written per request...
    expect((await keyRow(created.id)).lastUsedAt).toBeNull();
    // ...but the owner already sees it from this instance.
    const got = await app.inject({
      method: 'GET',
      url: `/v1/api-keys/${created.id}`,
      headers: bearer(user.accessToken),
    });
    expect(got.json().last_used_at).toEqual(expect.any(String));

    await app.services.apiKeys.flush();
    const row = await keyRow(created.id);
    expect(row.lastUsedAt?.toISOString()).toBe(got.json().last_used_at);
  });

  it('writes buffered last-use times when the app closes', async () => {
    const other = await buildTestApp();
    const user = await registerUser(other, 'ak-close');
    const created = await createKey(other, user.accessToken, { scopes: ['account:read'] });
    expect(
      (await other.inject({ method: 'GET', url: '/v1/auth/me', headers: withKey(created.key) })).statusCode,
    ).toBe(200);
    expect((await keyRow(created.id)).lastUsedAt).toBeNull();
    await other.close();
    expect((await keyRow(created.id)).lastUsedAt).toBeInstanceOf(Date);
  });

  it('a deleted user’s keys end with them: each audited as revoked (owner_deleted), and not_found at once', async () => {
    const user = await registerUser(app, 'ak-owner-deleted');
    const used = await createKey(app, user.accessToken, { scopes: ['account:read'] });
    const idle = await createKey(app, user.accessToken, { scopes: ['account:read'] });
    const revoked = await createKey(app, user.accessToken, { scopes: ['account:read'] });
    await app.inject({
      method: 'DELETE',
      url: `/v1/api-keys/${revoked.id}`,
      headers: bearer(user.accessToken),
    });
    expect(await verifyKey(app, admin.accessToken, used.key)).toMatchObject({ valid: true });
    const deleted = await app.inject({
      method: 'DELETE',
      url: `/v1/users/${user.id}`,
      headers: bearer(admin.accessToken),
    });
    expect(deleted.statusCode).toBe(204);
    for (const key of [used, idle]) {
      expect(await verifyKey(app, admin.accessToken, key.key)).toEqual({ valid: false, reason: 'not_found' });
      const events = await app.services.audit.list({ subjectId: key.id, type: 'api_key.revoked', limit: 5 });
      expect(events).toEqual([
        expect.objectContaining({
          actorId: admin.id,
          requestId: deleted.headers['x-request-id'],
          data: { owner_id: user.id, prefix: key.prefix, reason: 'owner_deleted' },
        }),
      ]);
    }
    // A key revoked before is not revoked twice.
    expect(
      await app.services.audit.list({ subjectId: revoked.id, type: 'api_key.revoked', limit: 5 }),
    ).toHaveLength(1);
  });

  it('signs its owner out everywhere only with account:write', async () => {
    const user = await registerUser(app, 'ak-logout');
    const sessions = async () =>
      (
        await app.inject({ method: 'GET', url: '/v1/auth/sessions', headers: bearer(user.accessToken) })
      ).json().data as unknown[];
    const logoutAllWith = async (scopes: string[]) => {
      const key = await createKey(app, user.accessToken, { scopes });
      const res = await app.inject({
        method: 'POST',
        url: '/v1/auth/logout',
        headers: withKey(key.key),
        payload: { scope: 'all' },
      });
      return res.statusCode;
    };
    expect(await logoutAllWith(['account:read'])).toBe(403);
    expect(await sessions()).toHaveLength(1);
    // Without `all`, a key has no session to end: 204, nothing ended, nothing written to the log.
    const readOnly = await createKey(app, user.accessToken, { scopes: ['account:read'] });
    for (let i = 0; i < 2; i++) {
      const res = await app.inject({
        method: 'POST',
        url: '/v1/auth/logout',
        headers: withKey(readOnly.key),
        payload: {},
      });
      expect(res.statusCode).toBe(204);
    }
    expect(await sessions()).toHaveLength(1);
    expect(await app.services.audit.list({ subjectId: user.id, type: 'auth.logout', limit: 5 })).toEqual([]);
    expect(await logoutAllWith(['account:read', 'account:write'])).toBe(204);
    expect(await app.services.audit.list({ subjectId: user.id, type: 'auth.logout', limit: 5 })).toEqual([
      expect.objectContaining({ data: { scope: 'all', sessions: [expect.any(String)] } }),
    ]);
    expect(
      (await app.inject({ method: 'GET', url: '/v1/auth/me', headers: bearer(user.accessToken) })).statusCode,
    ).toBe(401);
  });
});
