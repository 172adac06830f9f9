import type { FastifyInstance } from 'fastify';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createRevocationList, REVOCATION_SETTLE_MS } from '../../src/modules/tokens/revocations.service.js';
import { uuidV7 } from '../../src/lib/crypto.js';
import { buildTestApp } from '../support/app.js';
import type { DatabaseHandle } from '../../src/db/client.js';
import { openTestDatabase, ownDatabase, scratchDatabase } from '../support/database.js';
import { createAdmin, type TestUser } from '../support/factories.js';
import { bearer } from '../support/http.js';
import { basic, clientToken, createClient, form } from './helpers.js';

/**
 * A client disabled or deleted while it asks for tokens: between the revocation's moment (inside the
 * change's transaction) and the commit that tells every instance, client authentication still finds
 * the client in its caches. Those tokens are issued after the revocation, and used to outlive it.
 */
describe('tokens issued while a client is being disabled or deleted', async () => {
  const own = await ownDatabase('auth_revocation_race');
  let app: FastifyInstance;
  let admin: TestUser;

  beforeAll(async () => {
    app = await buildTestApp({ deps: { database: own.database } });
    admin = await createAdmin(app);
  });
  afterAll(async () => {
    await app.close();
    await own.dispose();
  });

  const works = async (token: string) =>
    (await app.inject({ method: 'GET', url: '/v1/users?limit=1', headers: bearer(token) })).statusCode;
  const active = async (token: string) =>
    (
      await app.inject({
        method: 'POST',
        url: '/oauth/introspect',
        headers: { ...bearer(admin.accessToken), 'content-type': 'application/x-www-form-urlencoded' },
        payload: `token=${token}`,
      })
    ).json().active;

  // On PostgreSQL: the test holds the audit table, which the change writes to after its revocation,
  // so the change waits inside its transaction while the client keeps asking for tokens.
  for (const change of ['disable', 'delete'] as const) {
    it.skipIf(own.url === undefined)(
      `${change}: every token issued meanwhile is revoked with the rest`,
      async () => {
        const client = await createClient(app, admin.accessToken, { scopes: ['users:read'] });
        const before = (await clientToken(app, client)).access_token;
        const holder = new pg.Client({ connectionString: own.url });
        await holder.connect();
        const meanwhile: string[] = [];
        try {
          await holder.query('BEGIN');
          await holder.query('LOCK TABLE audit_events IN SHARE MODE');
          const changing = app.inject(
            change === 'disable'
              ? {
                  method: 'PATCH',
                  url: `/v1/clients/${client.id}`,
                  headers: bearer(admin.accessToken),
                  payload: { status: 'disabled' },
                }
              : { method: 'DELETE', url: `/v1/clients/${client.id}`, headers: bearer(admin.accessToken) },
          );
          await waitForLockWaiter(holder);
          for (let i = 0; i < 3; i++) meanwhile.push((await clientToken(app, client)).access_token);
          await holder.query('COMMIT');
          expect((await changing).statusCode).toBe(change === 'disable' ? 200 : 204);
        } finally {
          await holder.end();
        }
        for (const token of [before, ...meanwhile]) {
          expect(await works(token)).toBe(401);
          expect(await active(token)).toBe(false);
        }
      },
    );
  }

  it('a client enabled again gets tokens that work at once, the revocation notwithstanding', async () => {
    const client = await createClient(app, admin.accessToken, { scopes: ['users:read'] });
    const patch = (status: string) =>
      app.inject({
        method: 'PATCH',
        url: `/v1/clients/${client.id}`,
        headers: bearer(admin.accessToken),
        payload: { status },
      });
    const before = (await clientToken(app, client)).access_token;
    expect((await patch('disabled')).statusCode).toBe(200);
    expect((await patch('active')).statusCode).toBe(200);
    const after = (await clientToken(app, client)).access_token;
    expect(await works(before)).toBe(401);
    expect(await works(after)).toBe(200);
    expect(await active(after)).toBe(true);
  });
});

/** Waits until a statement of the database waits for a lock the holder's transaction holds. */
async function waitForLockWaiter(holder: pg.Client): Promise<void> {
  for (let waited = 0; waited < 15_000; waited += 20) {
    const { rows } = await holder.query<{ n: number }>(
      `SELECT count(*)::int AS n FROM pg_stat_activity
        WHERE datname = current_database() AND pg_backend_pid() = ANY(pg_blocking_pids(pid))`,
    );
    if (rows[0]!.n > 0) return;
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  throw new Error('the change never came to wait for the lock');
}

describe('a subject’s revocation, and the tokens issued right after it', () => {
  /** A list on a clock the test sets, reading `rows` from its database. */
  function listAt(start: number, rows: () => Promise<unknown[]> = async () => []) {
    let now = start;
    let missed = 0;
    const list = createRevocationList({
      repo: { upsert: async () => undefined, listLive: rows } as never,
      clock: { now: () => new Date(now), nowMs: () => now },
      logger: { warn: () => undefined } as never,
      maxAccessTtl: 900,
      onMissed: () => {
        missed++;
      },
    });
    return {
      list,
      set: (ms: number) => {
        now = ms;
      },
      missed: () => missed,
    };
  }
  const revokedAt = Date.parse('2026-12-06T10:00:00Z');
  const tokenAt = (ms: number, sub_revoked_at?: unknown) => ({
    sub: 'pci_x',
    jti: uuidV7(ms),
    iat: Math.floor(ms / 1000),
    ...(sub_revoked_at === undefined ? {} : { sub_revoked_at }),
  });
  const event = (at: number) =>
    ({
      type: 'revocation',
      kind: 'subject',
      value: 'pci_x',
      revokedAt: at,
      expiresAt: at + 3_600_000,
    }) as const;
  const row = (at: number) => ({
    kind: 'subject',
    value: 'pci_x',
    revokedAt: new Date(at),
    expiresAt: new Date(at + 3_600_000),
  });

  it('revokes what was issued up to it, and, unless the issuer knew of it, what came within the settling time', () => {
    const { list, set } = listAt(revokedAt);
    // Heard of 2 s after its moment (its transaction went on): the settling time runs from then.
    set(revokedAt + 2_000);
    const seenBefore = list.seen();
    list.handle(event(revokedAt));
    const seenAfter = list.seen();
    expect(list.knownRevocation('pci_x', seenBefore)).toBeUndefined();
    expect(list.knownRevocation('pci_x', seenAfter)).toBe(revokedAt);
    expect(list.knownRevocation('pci_other', seenAfter)).toBeUndefined();

    const settled = revokedAt + 2_000 + REVOCATION_SETTLE_MS;
    expect(list.isRevoked(tokenAt(revokedAt - 1))).toBe(true);
    expect(list.isRevoked(tokenAt(revokedAt + 50))).toBe(true);
    expect(list.isRevoked(tokenAt(settled))).toBe(true);
    expect(list.isRevoked(tokenAt(settled + 1))).toBe(false);
    // Issued by an instance that had applied the revocation before the request began.
    expect(list.isRevoked(tokenAt(revokedAt + 50, revokedAt))).toBe(false);
    expect(list.isRevoked(tokenAt(revokedAt, revokedAt))).toBe(true);
    // Knowing of an earlier revocation is not knowing of this one.
    expect(list.isRevoked(tokenAt(revokedAt + 50, revokedAt - 10_000))).toBe(true);
    expect(list.isRevoked(tokenAt(revokedAt + 50, String(revokedAt)))).toBe(true);
  });

  it('a revocation first read from the database drops the caches, and counts as known only after', async () => {
    let rows: unknown[] = [];
    const { list, set, missed } = listAt(revokedAt, async () => rows);
    await list.reload(); // at start: nothing cached yet
    rows = [row(revokedAt)];
    set(revokedAt + 40_000); // the notification never came
    const seenBefore = list.seen();
    await list.reload();
    expect(missed()).toBe(1);
    expect(list.knownRevocation('pci_x', seenBefore)).toBeUndefined();
    expect(list.knownRevocation('pci_x', list.seen())).toBe(revokedAt);
    // Tokens issued from the stale caches until now, and for the settling time after, are revoked.
    expect(list.isRevoked(tokenAt(revokedAt + 39_000))).toBe(true);
    expect(list.isRevoked(tokenAt(revokedAt + 40_000 + REVOCATION_SETTLE_MS))).toBe(true);
    // Read again, and then heard of: nothing new, nothing dropped again.
    await list.reload();
    list.handle(event(revokedAt));
    expect(missed()).toBe(1);
  });

  it('the first read, at start, is known at once: nothing was cached before it', async () => {
    const { list, missed } = listAt(revokedAt + 1_000, async () => [row(revokedAt)]);
    await list.reload();
    expect(missed()).toBe(0);
    expect(list.knownRevocation('pci_x', list.seen())).toBe(revokedAt);
  });

  it('a reload keeps what an event applied while its read was under way', async () => {
    let release!: () => void;
    const { list } = listAt(revokedAt, () => new Promise((resolve) => (release = () => resolve([]))));
    const reading = list.reload();
    list.handle({ type: 'revocation', kind: 'jti', value: 'j-1', revokedAt, expiresAt: revokedAt + 60_000 });
    list.handle(event(revokedAt));
    release();
    await reading;
    expect(list.isRevoked({ jti: 'j-1' })).toBe(true);
    expect(list.isRevoked(tokenAt(revokedAt - 1))).toBe(true);
    expect(list.knownRevocation('pci_x', list.seen())).toBe(revokedAt);
  });
});

/**
 * Another instance that missed the notification (a silent LISTEN connection, found by its heartbeat
 * only within 10 s) still holds the client in its caches. Its minute's reload reads the revocation:
 * that tells it the caches are stale, and it drops them, instead of counting the revocation as known
 * while still authenticating the client from them (tokens it issued then said they knew, and lived).
 */
describe('an instance that reads a client’s revocation before it hears of it', async () => {
  const scratch = await scratchDatabase('auth_revocation_missed');
  const handles: DatabaseHandle[] = [];
  let a: FastifyInstance;
  let b: FastifyInstance;
  let admin: TestUser;
  beforeAll(async () => {
    if (!scratch) return;
    for (let i = 0; i < 2; i++) handles.push(await openTestDatabase(scratch.url));
    a = await buildTestApp({ deps: { database: handles[0]! } });
    b = await buildTestApp({ deps: { database: handles[1]! } });
    admin = await createAdmin(a);
  });
  afterAll(async () => {
    if (!scratch) return;
    await a.close();
    await b.close();
    for (const h of handles) await h.close();
    await scratch.drop();
  });

  it.skipIf(!scratch)('drops its caches: the disabled client gets nothing more from it', async () => {
    const client = await createClient(a, admin.accessToken, { scopes: ['users:read'] });
    await clientToken(b, client); // in b's memory now
    await b.services.events.stop(); // deaf
    try {
      const disabled = await a.inject({
        method: 'PATCH',
        url: `/v1/clients/${client.id}`,
        headers: bearer(admin.accessToken),
        payload: { status: 'disabled' },
      });
      expect(disabled.statusCode).toBe(200);
      await b.services.housekeeping();
      const late = await form(
        b,
        '/oauth/token',
        { grant_type: 'client_credentials' },
        basic(client.client_id, client.client_secret),
      );
      expect(late.statusCode, late.body).toBe(401);
    } finally {
      await b.services.events.start();
    }
  });
});
