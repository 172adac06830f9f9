import type { FastifyInstance } from 'fastify';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createRevocationList, REVOCATION_SETTLE_MS } from '../../src/modules/tokens/revocations.service.js';
import { uuidV7 } from '../../src/lib/crypto.js';
import { buildTestApp } from '../support/app.js';
import { createTestClock } from '../support/clock.js';
import { ownDatabase } from '../support/database.js';
import { createAdmin, type TestUser } from '../support/factories.js';
import { bearer } from '../support/http.js';
import { clientToken, createClient } from './helpers.js';

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
  const clock = createTestClock();
  const list = createRevocationList({
    repo: { upsert: async () => undefined, listLive: async () => [] } as never,
    clock,
    logger: { warn: () => undefined } as never,
    maxAccessTtl: 900,
  });
  const revokedAt = clock.nowMs();
  const tokenAt = (ms: number, sub_revoked_at?: number) => ({
    sub: 'pci_x',
    jti: uuidV7(ms),
    iat: Math.floor(ms / 1000),
    ...(sub_revoked_at === undefined ? {} : { sub_revoked_at }),
  });

  it('revokes what was issued up to it, and, unless the issuer knew of it, what came within the settling time', () => {
    const seenBefore = list.seen();
    list.handle({
      type: 'revocation',
      kind: 'subject',
      value: 'pci_x',
      revokedAt,
      expiresAt: revokedAt + 3_600_000,
    });
    const seenAfter = list.seen();
    expect(list.knownRevocation('pci_x', seenBefore)).toBeUndefined();
    expect(list.knownRevocation('pci_x', seenAfter)).toBe(revokedAt);
    expect(list.knownRevocation('pci_other', seenAfter)).toBeUndefined();

    expect(list.isRevoked(tokenAt(revokedAt - 1))).toBe(true);
    expect(list.isRevoked(tokenAt(revokedAt + 50))).toBe(true);
    expect(list.isRevoked(tokenAt(revokedAt + REVOCATION_SETTLE_MS))).toBe(true);
    expect(list.isRevoked(tokenAt(revokedAt + REVOCATION_SETTLE_MS + 1))).toBe(false);
    // Issued by an instance that had applied the revocation before the request began.
    expect(list.isRevoked(tokenAt(revokedAt + 50, revokedAt))).toBe(false);
    expect(list.isRevoked(tokenAt(revokedAt, revokedAt))).toBe(true);
    // Knowing of an earlier revocation is not knowing of this one.
    expect(list.isRevoked(tokenAt(revokedAt + 50, revokedAt - 10_000))).toBe(true);
    expect(list.isRevoked({ ...tokenAt(revokedAt + 50), sub_revoked_at: String(revokedAt) })).toBe(true);
  });
});
