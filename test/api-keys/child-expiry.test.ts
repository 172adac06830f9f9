import { sql } from 'drizzle-orm';
import type { FastifyInstance } from 'fastify';
import pg from 'pg';
import { beforeAll, describe, expect, inject, it, vi } from 'vitest';
import { selectRows } from '../../src/db/client.js';
import { appliedChanges, buildTestApp } from '../support/app.js';
import { waitForLockWaiters } from '../support/database.js';
import { createAdmin, registerUser, type TestUser } from '../support/factories.js';
import { bearer } from '../support/http.js';
import { createKey, createTestClock, verifyKey, withKey } from './helpers.js';

/**
 * A key minted by a key (api_keys:own, `parent_id`) expires no later than its parent: not only when
 * it is made, but when the parent's expiry is shortened later, or at the same moment, and nobody can
 * give it a later one, nor a scope the parent lacks. Narrowing the parent's scopes narrows it (and
 * revokes it when nothing is left), at once or while it is being minted. And it is revoked with any
 * of its ancestors, even when minted while that revocation runs.
 */
describe('api keys: a key expires no later than the key that minted it', () => {
  const clock = createTestClock();
  let app: FastifyInstance;
  let admin: TestUser;

  beforeAll(async () => {
    app = await buildTestApp({ deps: { clock } });
    admin = await createAdmin(app);
  });

  const inHours = (hours: number) => new Date(clock.nowMs() + hours * 3_600_000).toISOString();
  const mint = (key: string, body: Record<string, unknown> = {}) =>
    app.inject({
      method: 'POST',
      url: '/v1/api-keys',
      headers: withKey(key),
      payload: { name: 'minted', scopes: ['api_keys:own', 'account:read'], ...body },
    });
  const minted = async (key: string, body: Record<string, unknown> = {}) => {
    const res = await mint(key, body);
    expect(res.statusCode, res.body).toBe(201);
    return res.json() as {
      id: string;
      key: string;
      prefix: string;
      expires_at: string | null;
      parent_id: string;
    };
  };
  const revoke = (user: TestUser, id: string) =>
    app.inject({ method: 'DELETE', url: `/v1/api-keys/${id}`, headers: bearer(user.accessToken) });
  const patchExpiry = (user: TestUser, id: string, expiresAt: string | null) =>
    app.inject({
      method: 'PATCH',
      url: `/v1/api-keys/${id}`,
      headers: bearer(user.accessToken),
      payload: { expires_at: expiresAt },
    });
  const expiryOf = async (user: TestUser, id: string) => {
    const res = await app.inject({
      method: 'GET',
      url: `/v1/api-keys/${id}`,
      headers: bearer(user.accessToken),
    });
    expect(res.statusCode, res.body).toBe(200);
    return res.json().expires_at as string | null;
  };
  const parentOf = (user: TestUser, body: Record<string, unknown> = {}) =>
    createKey(app, user.accessToken, { scopes: ['api_keys:own', 'account:read'], ...body });
  const patchScopes = (user: TestUser, id: string, scopes: string[]) =>
    app.inject({
      method: 'PATCH',
      url: `/v1/api-keys/${id}`,
      headers: bearer(user.accessToken),
      payload: { scopes },
    });
  const scopesOf = async (id: string) => {
    const [row] = await selectRows<{ scopes: string[] }>(
      app.services.db,
      sql`select scopes from api_keys where id = ${id}`,
    );
    return row!.scopes;
  };

  it('shortening a key’s expiry, or giving it one, brings every live key it minted (and theirs) to it', async () => {
    const user = await registerUser(app, 'ake-cascade');
    const parent = await parentOf(user);
    const child = await minted(parent.key);
    const grandchild = await minted(child.key);
    const early = await minted(parent.key, { expires_at: inHours(1) });
    const revoked = await minted(parent.key);
    expect((await revoke(user, revoked.id)).statusCode).toBe(204);
    const sibling = await parentOf(user);
    // Verified once, so that every instance's caches hold them as they are.
    for (const k of [child.key, grandchild.key])
      expect(await verifyKey(app, admin.accessToken, k)).toMatchObject({ valid: true, expires_at: null });

    // Given an expiry where it had none: the child and grandchild go no later.
    const inADay = inHours(24);
    expect((await patchExpiry(user, parent.id, inADay)).statusCode).toBe(200);
    for (const k of [child, grandchild]) {
      expect(await expiryOf(user, k.id)).toBe(inADay);
      expect(await verifyKey(app, admin.accessToken, k.key)).toMatchObject({
        valid: true,
        expires_at: inADay,
      });
    }
    // One that already expired sooner keeps its own; a revoked one and a key made otherwise are untouched.
    expect(await expiryOf(user, early.id)).toBe(early.expires_at);
    expect(await expiryOf(user, sibling.id)).toBeNull();
    const [revokedRow] = await selectRows<{ expires_at: Date | null }>(
      app.services.db,
      sql`select expires_at from api_keys where id = ${revoked.id}`,
    );
    expect(revokedRow!.expires_at).toBeNull();

    // Each key brought to it is audited, naming the key whose change reached it.
    const events = await app.services.audit.list({ type: 'api_key.updated', limit: 100 });
    const about = (id: string) => events.filter((e) => e.subjectId === id);
    for (const k of [child, grandchild]) {
      expect(about(k.id)).toHaveLength(1);
      expect(about(k.id)[0]!.data).toEqual({
        owner_id: user.id,
        prefix: expect.stringMatching(/^pak_/),
        changed: ['expires_at'],
        expires_at: inADay,
        with_ancestor: parent.id,
      });
      expect(about(k.id)[0]!.actorId).toBe(user.id);
    }
    for (const k of [early, revoked, sibling]) expect(about(k.id)).toHaveLength(0);

    // Shortened again: again; lengthened, or made to never expire: the keys it minted stay as they are.
    const inTwoHours = inHours(2);
    expect((await patchExpiry(user, parent.id, inTwoHours)).statusCode).toBe(200);
    for (const k of [child, grandchild]) expect(await expiryOf(user, k.id)).toBe(inTwoHours);
    expect(await expiryOf(user, early.id)).toBe(early.expires_at);
    for (const later of [inHours(72), null]) {
      expect((await patchExpiry(user, parent.id, later)).statusCode).toBe(200);
      for (const k of [child, grandchild]) expect(await expiryOf(user, k.id)).toBe(inTwoHours);
    }
    // Past it they stop; the parent, which no longer expires, does not.
    const me = (key: string) => app.inject({ method: 'GET', url: '/v1/auth/me', headers: withKey(key) });
    clock.advance(2 * 3600 + 1);
    try {
      for (const k of [child, grandchild]) expect((await me(k.key)).statusCode).toBe(401);
      expect((await me(parent.key)).statusCode).toBe(200);
    } finally {
      clock.advance(-(2 * 3600 + 1));
    }
  });

  it('a key minted by a key cannot be given a later expiry than it, nor none, by its owner either', async () => {
    const user = await registerUser(app, 'ake-lengthen');
    const inADay = inHours(24);
    const parent = await parentOf(user, { expires_at: inADay });
    const child = await minted(parent.key, { expires_at: inHours(1) });
    const grandchild = await minted(child.key);
    // Another key of the owner's that never expires, holding what the child gives: it may lengthen
    // the owner's keys, but not past what minted them either.
    const sibling = await parentOf(user);
    // Counted for these keys alone: the other files' workers write such events meanwhile.
    const updatesOf = async () =>
      (
        await Promise.all(
          [child.id, grandchild.id].map((subjectId) =>
            app.services.audit.list({ type: 'api_key.updated', subjectId, limit: 100 }),
          ),
        )
      ).flat().length;
    const before = await updatesOf();
    const patchWith = (headers: Record<string, string>, id: string, expires_at: string | null) =>
      app.inject({ method: 'PATCH', url: `/v1/api-keys/${id}`, headers, payload: { expires_at } });
    for (const headers of [bearer(user.accessToken), withKey(sibling.key)]) {
      for (const [id, later, bound] of [
        [child.id, inHours(48), inADay],
        [child.id, null, inADay],
        [grandchild.id, inHours(2), child.expires_at],
        [grandchild.id, null, child.expires_at],
      ] as const) {
        const res = await patchWith(headers, id, later);
        expect(res.statusCode, res.body).toBe(400);
        expect(res.headers['content-type']).toMatch(/^application\/problem\+json/);
        expect(res.json()).toMatchObject({
          code: 'validation_failed',
          errors: [
            {
              field: 'body.expires_at',
              message: `must be no later than the expiry of the key that minted this one (parent_id), ${bound}`,
            },
          ],
        });
      }
    }
    // Nothing changed, nothing audited.
    expect(await expiryOf(user, child.id)).toBe(child.expires_at);
    expect(await expiryOf(user, grandchild.id)).toBe(child.expires_at);
    expect(await updatesOf()).toBe(before);
    // Up to the parent's expiry it may go; and further once the parent itself goes further.
    expect((await patchExpiry(user, child.id, inADay)).statusCode).toBe(200);
    expect((await patchExpiry(user, grandchild.id, inADay)).statusCode).toBe(200);
    expect((await patchExpiry(user, parent.id, null)).statusCode).toBe(200);
    const inTwoDays = inHours(48);
    expect((await patchExpiry(user, child.id, inTwoDays)).statusCode).toBe(200);
    expect(await verifyKey(app, admin.accessToken, child.key)).toMatchObject({
      valid: true,
      expires_at: inTwoDays,
    });
    expect((await patchExpiry(user, child.id, null)).statusCode).toBe(200);
  });

  it('a key minted by a key cannot be given a scope it lacks, by its owner either', async () => {
    const user = await registerUser(app, 'ake-widen');
    const parent = await parentOf(user, { expires_at: inHours(24) });
    const child = await minted(parent.key, { scopes: ['api_keys:own'] });
    const sibling = await parentOf(user, { scopes: ['api_keys:own', 'account:read', 'account:write'] });
    const patchScopes = (headers: Record<string, string>, scopes: string[]) =>
      app.inject({ method: 'PATCH', url: `/v1/api-keys/${child.id}`, headers, payload: { scopes } });
    for (const headers of [bearer(user.accessToken), withKey(sibling.key)]) {
      const res = await patchScopes(headers, ['account:read', 'account:write', 'api_keys:own']);
      expect(res.statusCode, res.body).toBe(400);
      expect(res.headers['content-type']).toMatch(/^application\/problem\+json/);
      expect(res.json()).toMatchObject({
        code: 'validation_failed',
        errors: [
          {
            field: 'body.scopes',
            message: 'go beyond the scopes of the key that minted this one (parent_id): account:write',
          },
        ],
      });
    }
    // A later expiry too: both are named.
    const both = await app.inject({
      method: 'PATCH',
      url: `/v1/api-keys/${child.id}`,
      headers: bearer(user.accessToken),
      payload: { scopes: ['account:write', 'api_keys:own'], expires_at: null },
    });
    expect(both.statusCode, both.body).toBe(400);
    expect(both.json().errors.map((e: { field: string }) => e.field)).toEqual([
      'body.expires_at',
      'body.scopes',
    ]);
    expect(await verifyKey(app, admin.accessToken, child.key)).toMatchObject({ scopes: ['api_keys:own'] });
    // Within the parent's it may widen; and further once the parent itself holds more.
    expect((await patchScopes(bearer(user.accessToken), ['account:read', 'api_keys:own'])).statusCode).toBe(
      200,
    );
    const parentWidened = await app.inject({
      method: 'PATCH',
      url: `/v1/api-keys/${parent.id}`,
      headers: bearer(user.accessToken),
      payload: { scopes: ['account:read', 'account:write', 'api_keys:own'] },
    });
    expect(parentWidened.statusCode, parentWidened.body).toBe(200);
    const widened = await patchScopes(bearer(user.accessToken), [
      'account:read',
      'account:write',
      'api_keys:own',
    ]);
    expect(widened.statusCode, widened.body).toBe(200);
  });

  it('narrowing a key’s scopes narrows every live key it minted (and theirs) at once; one left with nothing is revoked', async () => {
    const user = await registerUser(app, 'aks-narrow');
    const all = ['account:read', 'account:write', 'api_keys:own'];
    const parent = await parentOf(user, { scopes: all });
    const child = await minted(parent.key, { scopes: all });
    const grandchild = await minted(child.key, { scopes: ['account:read', 'account:write'] });
    // Left with nothing by the narrowing: revoked, with the key it minted.
    const writer = await minted(parent.key, { scopes: ['account:write', 'api_keys:own'] });
    const writersChild = await minted(writer.key, { scopes: ['api_keys:own'] });
    // Given a scope its parent lacks, as its owner could before 4d920f0: what is left of it under
    // the narrowed key (account:read) goes with its parent all the same.
    await app.services.db.execute(
      sql`update api_keys set scopes = '{account:read,api_keys:own}' where id = ${writersChild.id}`,
    );
    // Made with no scopes: nothing to narrow, left as it is. Expired, revoked, or not minted by it: untouched.
    const empty = await minted(parent.key, { scopes: [] });
    const expired = await minted(parent.key, {
      scopes: ['account:write'],
      expires_at: new Date(clock.nowMs() + 2_000).toISOString(),
    });
    const revoked = await minted(parent.key, { scopes: ['account:write'] });
    expect((await revoke(user, revoked.id)).statusCode).toBe(204);
    const sibling = await parentOf(user, { scopes: all });
    // Verified once, so that every instance's caches hold them as they are.
    for (const k of [child, writer, writersChild])
      expect(await verifyKey(app, admin.accessToken, k.key)).toMatchObject({ valid: true });
    expect(await verifyKey(app, admin.accessToken, grandchild.key)).toMatchObject({
      valid: true,
      scopes: ['account:read', 'account:write'],
    });
    const me = (key: string) => app.inject({ method: 'GET', url: '/v1/auth/me', headers: withKey(key) });
    expect((await me(grandchild.key)).json().permissions).toEqual(['account:read', 'account:write']);

    const heard = appliedChanges(app, (e) => (e.type === 'api_key_changed' ? e.lookupId : undefined));
    const inserts = vi.spyOn(app.services.repos.audit, 'insert');
    clock.advance(3);
    try {
      const narrowed = await patchScopes(user, parent.id, ['account:read']);
      expect(narrowed.statusCode, narrowed.body).toBe(200);
      expect(narrowed.json().scopes).toEqual(['account:read']);
      // Every event of the change, the parent's and those of the keys it reached, in one insert.
      expect(inserts).toHaveBeenCalledTimes(1);
      expect(inserts.mock.calls[0]![0]).toHaveLength(5);
    } finally {
      inserts.mockRestore();
      clock.advance(-3);
    }

    // At once, on this instance: verification, /v1/auth/me and introspection answer the narrowed scopes.
    for (const k of [child, grandchild]) {
      expect(await verifyKey(app, admin.accessToken, k.key)).toMatchObject({
        valid: true,
        scopes: ['account:read'],
      });
      expect(await scopesOf(k.id)).toEqual(['account:read']);
    }
    expect((await me(grandchild.key)).json().permissions).toEqual(['account:read']);
    const introspected = await app.inject({
      method: 'POST',
      url: '/oauth/introspect',
      headers: bearer(admin.accessToken),
      payload: { token: child.key },
    });
    expect(introspected.json()).toMatchObject({ active: true, scope: 'account:read' });
    // The child no longer holds api_keys:own: it mints nothing more.
    expect((await mint(child.key, { scopes: ['account:read'] })).statusCode).toBe(403);
    for (const k of [writer, writersChild]) {
      expect(await verifyKey(app, admin.accessToken, k.key)).toMatchObject({
        valid: false,
        reason: 'revoked',
      });
      expect((await me(k.key)).statusCode).toBe(401);
    }
    expect(await scopesOf(empty.id)).toEqual([]);
    expect(await verifyKey(app, admin.accessToken, empty.key)).toMatchObject({ valid: true, scopes: [] });
    for (const k of [expired, revoked]) expect(await scopesOf(k.id)).toEqual(['account:write']);
    expect(await scopesOf(sibling.id)).toEqual(all);

    // Audited, each naming the key whose change reached it, as the actor's.
    const updated = await app.services.audit.list({ type: 'api_key.updated', limit: 100 });
    const revocations = await app.services.audit.list({ type: 'api_key.revoked', limit: 100 });
    const about = (events: typeof updated, id: string) => events.filter((e) => e.subjectId === id);
    for (const [k, previous] of [
      [child, all],
      [grandchild, ['account:read', 'account:write']],
    ] as const) {
      expect(about(updated, k.id)).toHaveLength(1);
      expect(about(updated, k.id)[0]!.data).toEqual({
        owner_id: user.id,
        prefix: k.prefix,
        changed: ['scopes'],
        scopes: ['account:read'],
        previous_scopes: previous,
        with_ancestor: parent.id,
      });
      expect(about(updated, k.id)[0]!.actorId).toBe(user.id);
    }
    for (const k of [writer, writersChild]) {
      expect(about(revocations, k.id)).toHaveLength(1);
      expect(about(revocations, k.id)[0]!.data).toEqual({
        owner_id: user.id,
        prefix: k.prefix,
        with_ancestor: parent.id,
        reason: 'scopes_narrowed',
      });
      expect(about(revocations, k.id)[0]!.actorId).toBe(user.id);
    }
    for (const k of [empty, expired, revoked, sibling]) expect(about(updated, k.id)).toHaveLength(0);
    expect(about(revocations, revoked.id)).toHaveLength(1); // its own DELETE's
    for (const k of [empty, expired, sibling]) expect(about(revocations, k.id)).toHaveLength(0);
    // Sent to every instance: each change's notification came back to this one, as it reaches all.
    await Promise.all(
      [child, grandchild, writer, writersChild].map((k) => heard.bothHeard(k.prefix.slice('pak_'.length))),
    );

    // Widened again: the keys it minted are not (their owner widens them, within it).
    expect((await patchScopes(user, parent.id, all)).statusCode).toBe(200);
    for (const k of [child, grandchild]) expect(await scopesOf(k.id)).toEqual(['account:read']);
    expect(await verifyKey(app, admin.accessToken, writer.key)).toMatchObject({ valid: false });
  });

  it('one PATCH of a key’s expiry and its scopes writes one event naming both, as does each key it reaches', async () => {
    const user = await registerUser(app, 'ake-both');
    const all = ['account:read', 'account:write', 'api_keys:own'];
    const parent = await parentOf(user, { scopes: all });
    const child = await minted(parent.key, { scopes: all });
    const patch = (body: Record<string, unknown>) =>
      app.inject({
        method: 'PATCH',
        url: `/v1/api-keys/${parent.id}`,
        headers: bearer(user.accessToken),
        payload: body,
      });
    const updatedEvents = async (id: string) =>
      (await app.services.audit.list({ subjectId: id, type: 'api_key.updated', limit: 10 })).map((e) => ({
        actorId: e.actorId,
        data: e.data,
      }));

    /** An api_key.updated event of the user's about `key`: its owner, its prefix and `data`. */
    const event = (key: { prefix: string }, data: Record<string, unknown>) => ({
      actorId: user.id,
      data: { owner_id: user.id, prefix: key.prefix, ...data },
    });

    // Shortened (given one where it had none) and narrowed at once: the child is brought to both.
    const soon = inHours(1);
    const both = await patch({ expires_at: soon, scopes: ['api_keys:own', 'account:read'] });
    expect(both.statusCode, both.body).toBe(200);
    const shortenedAndNarrowed = {
      changed: ['expires_at', 'scopes'],
      scopes: ['account:read', 'api_keys:own'],
      previous_scopes: all,
      expires_at: soon,
    };
    expect(await updatedEvents(parent.id)).toEqual([event(parent, shortenedAndNarrowed)]);
    expect(await updatedEvents(child.id)).toEqual([
      event(child, { ...shortenedAndNarrowed, with_ancestor: parent.id }),
    ]);

    // Prolonged and narrowed at once: one event naming both; the child is narrowed, never prolonged.
    const later = inHours(48);
    const prolonged = await patch({ expires_at: later, scopes: ['account:read'] });
    expect(prolonged.statusCode, prolonged.body).toBe(200);
    const narrowed = { scopes: ['account:read'], previous_scopes: ['account:read', 'api_keys:own'] };
    expect((await updatedEvents(parent.id))[0]).toEqual(
      event(parent, { changed: ['expires_at', 'scopes'], ...narrowed, expires_at: later }),
    );
    expect((await updatedEvents(child.id))[0]).toEqual(
      event(child, { changed: ['scopes'], ...narrowed, with_ancestor: parent.id }),
    );
    expect(await expiryOf(user, child.id)).toBe(soon);
  });

  it('rotating a key leaves the keys it minted as they are: a new secret, not a new authority', async () => {
    const user = await registerUser(app, 'ake-rotate');
    const expiresAt = inHours(24);
    const parent = await parentOf(user, { expires_at: expiresAt });
    const child = await minted(parent.key);
    const rotated = await app.inject({
      method: 'POST',
      url: `/v1/api-keys/${parent.id}/rotate`,
      headers: bearer(user.accessToken),
      payload: { grace_seconds: 0 },
    });
    expect(rotated.statusCode, rotated.body).toBe(200);
    expect(await verifyKey(app, admin.accessToken, child.key)).toMatchObject({
      valid: true,
      expires_at: expiresAt,
    });
    expect(await verifyKey(app, admin.accessToken, parent.key)).toMatchObject({
      valid: false,
      reason: 'expired',
    });
    // Still the parent's: revoking it ends the child.
    expect((await revoke(user, parent.id)).statusCode).toBe(204);
    expect(await verifyKey(app, admin.accessToken, child.key)).toMatchObject({
      valid: false,
      reason: 'revoked',
    });
  });

  // On PostgreSQL, with a deterministic order: one side holds its transaction open at a chosen step
  // until the other waits on its lock. PGlite has one connection and runs them one after the other.
  describe.skipIf(!inject('databaseUrl'))(
    'a key minted while its parent’s expiry is shortened, an ancestor revoked or its parent rotated',
    () => {
      /**
       * Runs `first`; when it calls `method` of the key repository with `when` true, it holds its
       * transaction there until `second` (started then) waits on a lock it holds.
       */
      async function ordered<M extends 'insert' | 'update' | 'revokeDescendants'>(
        method: M,
        when: (args: unknown[]) => boolean,
        first: () => ReturnType<typeof mint>,
        second: () => ReturnType<typeof mint>,
        secondStatus: (status: number) => boolean = (status) => status < 300,
      ) {
        const repo = app.services.repos.apiKeys as unknown as Record<
          M,
          (...args: unknown[]) => Promise<unknown>
        >;
        const original = repo[method];
        const watcher = new pg.Client({ connectionString: inject('databaseUrl') });
        await watcher.connect();
        let started: ReturnType<typeof second> | undefined;
        repo[method] = async (...args: unknown[]) => {
          const result = await original.apply(repo, args);
          if (!started && when(args)) {
            const tx = args.find((a) => a !== null && typeof a === 'object' && 'execute' in a) as never;
            const [holder] = await selectRows<{ pid: number }>(tx, sql`select pg_backend_pid() as pid`);
            started = second();
            await Promise.race([waitForLockWaiters(watcher, 1, holder!.pid), started]);
          }
          return result;
        };
        try {
          const firstDone = await first();
          expect(firstDone.statusCode, firstDone.body).toBeLessThan(300);
        } finally {
          repo[method] = original;
          await watcher.end();
        }
        expect(started, 'the second request never started').toBeDefined();
        const secondDone = await started!;
        expect(secondStatus(secondDone.statusCode), secondDone.body).toBe(true);
        return secondDone;
      }

      /** A key minted with `key` (and `body`), holding its insert until `change` waits on it; the key made. */
      async function mintedBefore(
        key: string,
        change: () => ReturnType<typeof mint>,
        body: Record<string, unknown> = {},
      ) {
        let made: { id: string; key: string } | undefined;
        await ordered(
          'insert',
          () => true,
          async () => {
            const res = await mint(key, body);
            made = res.json();
            return res;
          },
          change,
        );
        return made!;
      }

      it('the shortening first: the key made waits for it and takes the new expiry', async () => {
        const user = await registerUser(app, 'ake-race-patch');
        const parent = await parentOf(user);
        const soon = inHours(1);
        const made = await ordered(
          'update',
          (args) => args[0] === parent.id,
          () => patchExpiry(user, parent.id, soon),
          () => mint(parent.key),
        );
        expect(made.json()).toMatchObject({ parent_id: parent.id, expires_at: soon });
        expect(await expiryOf(user, made.json().id)).toBe(soon);
      });

      it('the key made first: the shortening waits for it and brings it to the new expiry', async () => {
        const user = await registerUser(app, 'ake-race-mint');
        const parent = await parentOf(user);
        const soon = inHours(1);
        const made = await mintedBefore(parent.key, () => patchExpiry(user, parent.id, soon));
        expect(await expiryOf(user, made.id)).toBe(soon);
      });

      it('a grandchild made first: the shortening waits for it and brings it to the new expiry too', async () => {
        const user = await registerUser(app, 'ake-race-grand');
        const parent = await parentOf(user);
        const child = await minted(parent.key);
        const soon = inHours(1);
        const made = await mintedBefore(child.key, () => patchExpiry(user, parent.id, soon));
        expect(await expiryOf(user, child.id)).toBe(soon);
        expect(await expiryOf(user, made.id)).toBe(soon);
      });

      it('a key given a later expiry within its parent’s while the parent is shortened: brought to the new one', async () => {
        const user = await registerUser(app, 'ake-race-lengthen');
        const parent = await parentOf(user, { expires_at: inHours(24) });
        const child = await minted(parent.key, { expires_at: inHours(1) });
        const soon = inHours(2);
        // The child's change holds its parent's row (shared), then its own; the parent's shortening waits.
        await ordered(
          'update',
          (args) => args[0] === child.id,
          () => patchExpiry(user, child.id, inHours(12)),
          () => patchExpiry(user, parent.id, soon),
        );
        expect(await expiryOf(user, parent.id)).toBe(soon);
        expect(await expiryOf(user, child.id)).toBe(soon);
      });

      it('the parent shortened first: a later expiry for the key it minted waits for it and is refused', async () => {
        const user = await registerUser(app, 'ake-race-shorten');
        const parent = await parentOf(user, { expires_at: inHours(24) });
        const child = await minted(parent.key, { expires_at: inHours(1) });
        const soon = inHours(2);
        const refused = await ordered(
          'update',
          (args) => args[0] === parent.id,
          () => patchExpiry(user, parent.id, soon),
          () => patchExpiry(user, child.id, inHours(12)),
          (status) => status === 400,
        );
        expect(refused.json().errors).toEqual([
          {
            field: 'body.expires_at',
            message: `must be no later than the expiry of the key that minted this one (parent_id), ${soon}`,
          },
        ]);
        expect(await expiryOf(user, child.id)).toBe(child.expires_at);
      });

      it('the narrowing first: a key minted with a scope it took waits for it and is refused', async () => {
        const user = await registerUser(app, 'aks-race-narrow');
        const parent = await parentOf(user);
        const refused = await ordered(
          'update',
          (args) => args[0] === parent.id,
          () => patchScopes(user, parent.id, ['api_keys:own']),
          () => mint(parent.key, { scopes: ['account:read', 'api_keys:own'] }),
          (status) => status === 403,
        );
        expect(refused.headers['content-type']).toMatch(/^application\/problem\+json/);
        expect(refused.json().detail).toMatch(/account:read/);
        const [row] = await selectRows<{ n: number }>(
          app.services.db,
          sql`select count(*)::int as n from api_keys where parent_id = ${parent.id}`,
        );
        expect(row!.n).toBe(0);
      });

      it('the key made first: the narrowing waits for it and narrows it', async () => {
        const user = await registerUser(app, 'aks-race-mint');
        const parent = await parentOf(user);
        const made = await mintedBefore(parent.key, () => patchScopes(user, parent.id, ['api_keys:own']));
        expect(await scopesOf(made.id)).toEqual(['api_keys:own']);
        expect(await verifyKey(app, admin.accessToken, made.key)).toMatchObject({
          valid: true,
          scopes: ['api_keys:own'],
        });
      });

      it('a grandchild made first: the narrowing waits for it and narrows it too', async () => {
        const user = await registerUser(app, 'aks-race-grand');
        const parent = await parentOf(user);
        const child = await minted(parent.key);
        const made = await mintedBefore(child.key, () => patchScopes(user, parent.id, ['api_keys:own']));
        for (const k of [child, made]) {
          expect(await scopesOf(k.id)).toEqual(['api_keys:own']);
          expect(await verifyKey(app, admin.accessToken, k.key)).toMatchObject({
            valid: true,
            scopes: ['api_keys:own'],
          });
        }
        const events = await app.services.audit.list({ type: 'api_key.updated', limit: 100 });
        const about = events.filter((e) => e.subjectId === made.id);
        expect(about).toHaveLength(1);
        expect(about[0]!.data).toMatchObject({ changed: ['scopes'], with_ancestor: parent.id });
      });

      it('a grandchild made first under a key the narrowing leaves with nothing: revoked with it', async () => {
        const user = await registerUser(app, 'aks-race-empty');
        const parent = await parentOf(user);
        const child = await minted(parent.key, { scopes: ['api_keys:own'] });
        const made = await mintedBefore(child.key, () => patchScopes(user, parent.id, ['account:read']), {
          scopes: ['api_keys:own'],
        });
        for (const k of [child, made])
          expect(await verifyKey(app, admin.accessToken, k.key)).toMatchObject({
            valid: false,
            reason: 'revoked',
          });
        expect(await verifyKey(app, admin.accessToken, parent.key)).toMatchObject({
          valid: true,
          scopes: ['account:read'],
        });
      });

      const me = (key: string) => app.inject({ method: 'GET', url: '/v1/auth/me', headers: withKey(key) });

      it('a key made first: the revocation waits for it and revokes it with its parent', async () => {
        const user = await registerUser(app, 'akr-race-mint');
        const parent = await parentOf(user);
        const made = await mintedBefore(parent.key, () => revoke(user, parent.id));
        expect(await verifyKey(app, admin.accessToken, made.key)).toMatchObject({
          valid: false,
          reason: 'revoked',
        });
      });

      it('a grandchild made first: revoking its grandparent waits for it and revokes it too', async () => {
        const user = await registerUser(app, 'akr-race-grand');
        const parent = await parentOf(user);
        const child = await minted(parent.key);
        const made = await mintedBefore(child.key, () => revoke(user, parent.id));
        for (const k of [child.key, made.key]) {
          expect(await verifyKey(app, admin.accessToken, k)).toMatchObject({
            valid: false,
            reason: 'revoked',
          });
          expect((await me(k)).statusCode).toBe(401);
        }
        // Audited once, as revoked with the key whose revocation reached it.
        const events = await app.services.audit.list({ type: 'api_key.revoked', limit: 100 });
        const about = events.filter((e) => e.subjectId === made.id);
        expect(about).toHaveLength(1);
        expect(about[0]!.data).toMatchObject({ owner_id: user.id, with_ancestor: parent.id });
      });

      /** Key `id` renamed 'taken' with `key`. */
      const rename = (key: string, id: string) =>
        app.inject({
          method: 'PATCH',
          url: `/v1/api-keys/${id}`,
          headers: withKey(key),
          payload: { name: 'taken' },
        });

      /** Key `id` rotated by its owner, with a grace of ten minutes. */
      const rotatedByOwner = (user: TestUser, id: string) =>
        app.inject({
          method: 'POST',
          url: `/v1/api-keys/${id}/rotate`,
          headers: bearer(user.accessToken),
          payload: { grace_seconds: 600 },
        });

      it('a rotation first: a key minted with the secret it replaces waits for it and is refused', async () => {
        const user = await registerUser(app, 'akr-race-rotate');
        const parent = await parentOf(user);
        // Verified once, so the mint authenticates from memory while the rotation holds the row.
        expect(await verifyKey(app, admin.accessToken, parent.key)).toMatchObject({ valid: true });
        const refused = await ordered(
          'update',
          (args) => args[0] === parent.id,
          () => rotatedByOwner(user, parent.id),
          () => mint(parent.key),
          (status) => status === 401,
        );
        expect(refused.headers['content-type']).toMatch(/^application\/problem\+json/);
        expect(refused.json().code).toBe('invalid_token');
        const [row] = await selectRows<{ n: number }>(
          app.services.db,
          sql`select count(*)::int as n from api_keys where parent_id = ${parent.id}`,
        );
        expect(row!.n).toBe(0);
      });

      // A leaked secret that rotates its key while the owner's rotation holds the row (forced, so the
      // owner's grace does not stop it) would take the secret the owner's rotation just made.
      it('a rotation first: a key rotating itself with the secret it replaces waits for it and is refused', async () => {
        const user = await registerUser(app, 'akr-race-self-rotate');
        const key = await parentOf(user);
        // Verified once, so the second rotation authenticates from memory while the first holds the row.
        expect(await verifyKey(app, admin.accessToken, key.key)).toMatchObject({ valid: true });
        let owners = '';
        const rotate = (headers: Record<string, string>, payload: object) => async () => {
          const res = await app.inject({
            method: 'POST',
            url: `/v1/api-keys/${key.id}/rotate`,
            headers,
            payload,
          });
          if (res.statusCode === 200 && !owners) owners = res.json().key;
          return res;
        };
        const refused = await ordered(
          'update',
          (args) => args[0] === key.id,
          rotate(bearer(user.accessToken), { grace_seconds: 600 }),
          rotate(withKey(key.key), { grace_seconds: 0, force: true }),
          (status) => status === 401,
        );
        expect(refused.json().code).toBe('invalid_token');
        expect(refused.headers['www-authenticate']).toBe('Bearer realm="paservices", error="invalid_token"');
        // The owner's new secret is the key's, and theirs was the only rotation.
        expect(await verifyKey(app, admin.accessToken, owners)).toMatchObject({
          valid: true,
          key_id: key.id,
        });
        const rotations = await app.services.audit.list({
          type: 'api_key.rotated',
          subjectId: key.id,
          limit: 10,
        });
        expect(rotations).toHaveLength(1);
      });

      // A key changing one it minted holds its own row (shared, as a creation does) before that key's:
      // while the owner's rotation holds it, the change waits, then finds its secret replaced.
      it('a rotation first: a key renaming the key it minted with the secret it replaces waits for it and is refused', async () => {
        const user = await registerUser(app, 'akr-race-rename-child');
        const parent = await parentOf(user);
        const child = await minted(parent.key);
        // Verified once, so the rename authenticates from memory while the rotation holds the row.
        expect(await verifyKey(app, admin.accessToken, parent.key)).toMatchObject({ valid: true });
        const refused = await ordered(
          'update',
          (args) => args[0] === parent.id,
          () => rotatedByOwner(user, parent.id),
          () => rename(parent.key, child.id),
          (status) => status === 401,
        );
        expect(refused.json()).toMatchObject({
          code: 'invalid_token',
          detail: expect.stringContaining('rotation'),
        });
        expect(refused.headers['www-authenticate']).toBe('Bearer realm="paservices", error="invalid_token"');
        const [row] = await selectRows<{ name: string }>(
          app.services.db,
          sql`select name from api_keys where id = ${child.id}`,
        );
        expect(row!.name).toBe('minted');
      });

      // A key changing one it descends from holds that key first, then its own row: the revocation of
      // the ancestor (that key, then the keys under it) takes them in the same order, so neither waits
      // for the other in a circle; the change then finds the key it came with revoked.
      it('the revocation first: a key renaming the key that minted it waits for it and is refused', async () => {
        const user = await registerUser(app, 'akr-race-rename-parent');
        const parent = await parentOf(user);
        const child = await minted(parent.key);
        expect(await verifyKey(app, admin.accessToken, child.key)).toMatchObject({ valid: true });
        const locks = vi.spyOn(app.services.repos.apiKeys, 'findByIdForUpdate');
        try {
          const refused = await ordered(
            'update',
            (args) => args[0] === parent.id,
            () => revoke(user, parent.id),
            () => rename(child.key, parent.id),
            (status) => status === 401,
          );
          expect(refused.json()).toMatchObject({
            code: 'invalid_token',
            detail: expect.stringContaining('revoked'),
          });
          expect(refused.headers['www-authenticate']).toBe(
            'Bearer realm="paservices", error="invalid_token"',
          );
          // Each transaction ran once: had the change held its own key first, the revocation (waiting
          // on it to revoke that key) and the change (waiting on the parent) would have deadlocked, and
          // PostgreSQL would have ended one of them to run again.
          expect(locks.mock.calls.filter(([id]) => id === parent.id)).toHaveLength(2);
        } finally {
          locks.mockRestore();
        }
      });

      it('the revocation first: a grandchild’s creation waits for it and is refused', async () => {
        const user = await registerUser(app, 'akr-race-revoke');
        const parent = await parentOf(user);
        const child = await minted(parent.key);
        const refused = await ordered(
          'revokeDescendants',
          (args) => args[0] === parent.id,
          () => revoke(user, parent.id),
          () => mint(child.key),
          (status) => status === 401,
        );
        expect(refused.headers['content-type']).toMatch(/^application\/problem\+json/);
        // The challenge of a credential that no longer stands, as once every instance has heard.
        expect(refused.headers['www-authenticate']).toBe('Bearer realm="paservices", error="invalid_token"');
        const [row] = await selectRows<{ n: number }>(
          app.services.db,
          sql`select count(*)::int as n from api_keys where owner_id = ${user.id} and revoked_at is null`,
        );
        expect(row!.n).toBe(0);
      });
    },
  );
});
