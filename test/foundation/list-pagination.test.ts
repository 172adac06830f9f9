import type { FastifyInstance } from 'fastify';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { PERMISSIONS } from '../../src/lib/permissions.js';
import { buildTestApp } from '../support/app.js';
import { ownDatabase } from '../support/database.js';
import { createAdmin, login, registerUser, type TestUser } from '../support/factories.js';
import { bearer } from '../support/http.js';

type Item = Record<string, unknown>;
interface Page {
  data: Item[];
  next_cursor: string | null;
}

/*
 * GET /v1/roles, /v1/permissions, /v1/signing-keys and /v1/auth/sessions follow API.md's list
 * convention like the other lists: ?limit= (default 50, 1–200), an opaque ?cursor=, {data, next_cursor}.
 * On a database of its own, so each list holds exactly what this file put there.
 */
describe('paginated lists: roles, permissions, signing keys, sessions', () => {
  let own: Awaited<ReturnType<typeof ownDatabase>>;
  let app: FastifyInstance;
  let admin: TestUser;
  let sessionsUser: TestUser;
  const ROLES_ADDED = 51;
  const EXTRA_SESSIONS = 50;

  beforeAll(async () => {
    own = await ownDatabase('auth_pages');
    app = await buildTestApp({ deps: { database: own.database } });
    admin = await createAdmin(app);
    for (let i = 0; i < ROLES_ADDED; i++) {
      const res = await app.inject({
        method: 'POST',
        url: '/v1/roles',
        headers: bearer(admin.accessToken),
        // Not in name order of creation, so the list's order is its own.
        payload: {
          name: `r-${String((i * 37) % ROLES_ADDED).padStart(2, '0')}`,
          permissions: ['users:read'],
        },
      });
      expect(res.statusCode, res.body).toBe(201);
    }
    for (let i = 0; i < 3; i++) {
      const res = await app.inject({
        method: 'POST',
        url: '/v1/signing-keys/rotate',
        headers: bearer(admin.accessToken),
        payload: { force: true }, // back to back: each next key is seconds old
      });
      expect(res.statusCode, res.body).toBe(200);
    }
    sessionsUser = await registerUser(app, 'pages');
    await login(app, sessionsUser.email);
    // More sessions than a default page, several begun in the same millisecond (the id breaks the tie).
    const hourAgo = new Date(Date.now() - 3_600_000);
    const later = new Date(Date.now() + 86_400_000);
    for (let i = 0; i < EXTRA_SESSIONS; i++) {
      const begun = i % 2 ? hourAgo : new Date(hourAgo.getTime() - i * 1000);
      await app.services.repos.sessions.insertSession({
        userId: sessionsUser.id,
        createdAt: begun,
        lastUsedAt: begun,
        idleExpiresAt: later,
        expiresAt: later,
      });
    }
  });

  afterAll(async () => {
    await app.close();
    await own.dispose();
  });

  const get = (url: string, headers: Record<string, string>) => app.inject({ method: 'GET', url, headers });

  /** Follows next_cursor with the given page size; checks every page's size. */
  async function walk(url: string, headers: Record<string, string>, limit?: number) {
    const items: Item[] = [];
    const pages: Page[] = [];
    let cursor: string | null = null;
    do {
      const query = [limit ? `limit=${limit}` : '', cursor ? `cursor=${encodeURIComponent(cursor)}` : '']
        .filter(Boolean)
        .join('&');
      const res = await get(query ? `${url}?${query}` : url, headers);
      expect(res.statusCode, res.body).toBe(200);
      const page = res.json() as Page;
      expect(Object.keys(page).sort()).toEqual(['data', 'next_cursor']);
      pages.push(page);
      items.push(...page.data);
      cursor = page.next_cursor;
      // A page is full unless it is the last; the last is never empty (but for an empty list).
      if (cursor) expect(page.data).toHaveLength(limit ?? 50);
      else expect(page.data.length).toBeGreaterThan(0);
    } while (cursor);
    return { items, pages };
  }

  const lists = [
    {
      url: '/v1/permissions',
      key: 'name',
      headers: () => bearer(admin.accessToken),
      expectedCount: Object.keys(PERMISSIONS).length,
      /** The catalogue's own order (grouped by resource). */
      checkOrder: (items: Item[]) => expect(items.map((p) => p.name)).toEqual(Object.keys(PERMISSIONS)),
    },
    {
      url: '/v1/roles',
      key: 'name',
      headers: () => bearer(admin.accessToken),
      expectedCount: ROLES_ADDED + 2, // and admin, user
      checkOrder: (items: Item[]) => {
        const names = items.map((r) => r.name as string);
        expect(names).toEqual([...names].sort());
        expect(names).toEqual(expect.arrayContaining(['admin', 'user', 'r-00', 'r-50']));
      },
    },
    {
      url: '/v1/signing-keys',
      key: 'kid',
      headers: () => bearer(admin.accessToken),
      expectedCount: 2 + 3, // the first active and next keys, and one per rotation
      checkOrder: (items: Item[]) => {
        const created = items.map((k) => Date.parse(k.created_at as string));
        expect(created).toEqual([...created].sort((a, b) => a - b));
        expect(items.at(-1)!.state).toBe('next');
      },
    },
    {
      url: '/v1/auth/sessions',
      key: 'id',
      headers: () => bearer(sessionsUser.accessToken),
      expectedCount: 2 + EXTRA_SESSIONS,
      checkOrder: (items: Item[]) => {
        const begun = items.map((s) => Date.parse(s.created_at as string));
        expect(begun).toEqual([...begun].sort((a, b) => b - a));
        // Which one is current survives paging: the caller's registration session, on one page only.
        expect(items.filter((s) => s.current)).toHaveLength(1);
      },
    },
  ];

  describe.each(lists)('GET $url', ({ url, key, headers, expectedCount, checkOrder }) => {
    it('serves a default page of 50 (or all, when fewer), then the rest, ending in next_cursor null', async () => {
      const { items, pages } = await walk(url, headers());
      expect(pages).toHaveLength(Math.ceil(expectedCount / 50));
      expect(items).toHaveLength(expectedCount);
      expect(pages.at(-1)!.next_cursor).toBeNull();
      checkOrder(items);
    });

    it('pages one item at a time through all of them: no duplicates, no gaps, the same items and order', async () => {
      const whole = (await walk(url, headers(), 200)).items;
      expect(whole).toHaveLength(expectedCount);
      const { items, pages } = await walk(url, headers(), 1);
      expect(pages).toHaveLength(expectedCount);
      expect(new Set(items.map((i) => i[key])).size).toBe(expectedCount);
      expect(items).toEqual(whole);
    });

    it('refuses a limit outside 1–200 or not an integer: 400 naming query.limit', async () => {
      // Decimal digits only: what Number() would also read (hex, exponents, spaces) is refused.
      for (const limit of ['abc', '0', '201', '1000', '-1', '1.5', '', '0x10', '1e1', '%201', '10%20']) {
        const res = await get(`${url}?limit=${limit}`, headers());
        expect(res.statusCode, `limit=${limit}`).toBe(400);
        expect(res.headers['content-type']).toMatch(/^application\/problem\+json/);
        expect(res.json().code).toBe('validation_failed');
        // One message whatever was wrong (not "expected number, received NaN" for 1000).
        expect(res.json().errors, `limit=${limit}`).toEqual([
          { field: 'query.limit', message: 'must be a whole number from 1 to 200, in decimal digits' },
        ]);
      }
    });

    it('refuses a malformed cursor: 400 naming query.cursor', async () => {
      const first = (await get(`${url}?limit=1`, headers())).json() as Page;
      expect(first.next_cursor).toEqual(expect.any(String));
      const issued = JSON.parse(Buffer.from(first.next_cursor!, 'base64url').toString('utf8')) as unknown[];
      const encode = (v: unknown) => Buffer.from(JSON.stringify(v)).toString('base64url');
      const tampered = [
        'garbage!!',
        first.next_cursor!.slice(0, -3),
        encode([...issued, 'extra']),
        encode(issued.map(() => 42)),
        encode({ after: issued[0] }),
        encode(issued.length === 1 ? [''] : ['2026-01-01T00:00:00Z', '']),
        // A NUL, which PostgreSQL text cannot hold: refused before any query, not by the database.
        encode(issued.map((part) => `${String(part)}\u0000`)),
      ];
      for (const cursor of tampered) {
        const res = await get(`${url}?cursor=${encodeURIComponent(cursor)}`, headers());
        expect(res.statusCode, cursor).toBe(400);
        expect(res.json().code).toBe('validation_failed');
        expect(res.json().errors.map((e: { field: string }) => e.field)).toEqual(['query.cursor']);
      }
    });
  });

  it('refuses a permissions cursor naming no permission of the catalogue (a name cursor of a role list is not one)', async () => {
    const res = await get(
      `/v1/permissions?cursor=${Buffer.from(JSON.stringify(['orders:read'])).toString('base64url')}`,
      bearer(admin.accessToken),
    );
    expect(res.statusCode).toBe(400);
    expect(res.json().errors.map((e: { field: string }) => e.field)).toEqual(['query.cursor']);
  });

  it('shows the query parameters and next_cursor in the OpenAPI document', async () => {
    const doc = (await app.inject({ method: 'GET', url: '/openapi.json' })).json();
    for (const { url } of lists) {
      const operation = doc.paths[url].get;
      expect(
        operation.parameters.map((p: { name: string; in: string }) => `${p.in}.${p.name}`).sort(),
      ).toEqual(['query.cursor', 'query.limit']);
      const schema = JSON.stringify(operation.responses['200'].content['application/json'].schema);
      expect(schema, url).toContain('next_cursor');
    }
  });
});
