import { sql } from 'drizzle-orm';
import { decodeProtectedHeader } from 'jose';
import pino from 'pino';
import { afterAll, describe, expect, it } from 'vitest';
import { selectRows } from '../../src/db/client.js';
import { systemContext } from '../../src/modules/audit/audit.service.js';
import { SigningKeyMismatchError } from '../../src/modules/signing-keys/signing-keys.service.js';
import { buildTestApp, closeTestApps } from '../support/app.js';
import { ownDatabase } from '../support/database.js';
import { login, registerUser } from '../support/factories.js';
import { bearer } from '../support/http.js';

/**
 * A private key is stored encrypted under KEY_ENCRYPTION_KEY, and the ciphertext says nothing of its
 * row: one copied from another key's row decrypts. The service compares the key it decrypts with the
 * row's public key before signing with it.
 */
describe('a signing key whose stored private key is another key’s', () => {
  // Its own database: the keys altered here would break other files' tokens.
  const own = ownDatabase('key_integrity');
  afterAll(async () => {
    await closeTestApps();
    await (await own).dispose();
  });

  it('is not signed with: a reload keeps the keys it had, a start is refused, a rotation does not promote it', async () => {
    const { database } = await own;
    const lines: Array<{ level: number; msg: string }> = [];
    const logger = pino({ level: 'info' }, { write: (line: string) => lines.push(JSON.parse(line)) });
    const app = await buildTestApp({ deps: { database, logger } });
    const user = await registerUser(app, 'key-integrity');
    const rows = () =>
      selectRows<{ kid: string; state: string; private_key_encrypted: string }>(
        database.db,
        sql`SELECT kid, state, private_key_encrypted FROM signing_keys ORDER BY state`,
      );
    const before = await rows();
    const active = before.find((r) => r.state === 'active')!;
    const next = before.find((r) => r.state === 'next')!;

    // The active key's row now holds the next key's ciphertext, and the next key's row the active's.
    await database.db.execute(
      sql`UPDATE signing_keys SET private_key_encrypted = CASE kid
            WHEN ${active.kid} THEN ${next.private_key_encrypted}
            ELSE ${active.private_key_encrypted} END
          WHERE kid IN (${active.kid}, ${next.kid})`,
    );
    const refused = await app.services.keys.reload().then(
      () => undefined,
      (err: unknown) => err,
    );
    expect(refused).toBeInstanceOf(SigningKeyMismatchError);
    expect((refused as Error).message).toMatch(
      new RegExp(`^the private key stored for the signing key ${active.kid} is not the one its public key`),
    );
    expect((refused as Error).message).toContain('npm run rotate-signing-key -- --revoke-previous');

    // The minute's housekeeping logs it and goes on (the revocations' reload, the purge): once, not
    // every minute while it lasts.
    await app.services.housekeeping();
    await app.services.housekeeping();
    await app.services.housekeeping();
    expect(lines.filter((l) => l.msg.startsWith('the signing keys were not reloaded'))).toHaveLength(1);

    // The instance goes on signing with the key it had, whose tokens verify.
    const fresh = (await login(app, user.email)).session.access_token;
    expect(decodeProtectedHeader(fresh).kid).toBe(active.kid);
    const me = await app.inject({ method: 'GET', url: '/v1/auth/me', headers: bearer(fresh) });
    expect(me.statusCode, me.body).toBe(200);

    // A start on the altered database says so, rather than hand out tokens that verify nowhere.
    const start = await buildTestApp({ deps: { database } }).then(
      () => undefined,
      (err: unknown) => err,
    );
    expect(start).toBeInstanceOf(SigningKeyMismatchError);

    // Nor is the altered next key made active by a rotation, forced or not: nothing changes.
    await expect(app.services.keys.rotate(systemContext, { force: true })).rejects.toBeInstanceOf(
      SigningKeyMismatchError,
    );
    expect((await rows()).map((r) => [r.kid, r.state])).toEqual(before.map((r) => [r.kid, r.state]));

    // The remedy the message names: every published key revoked, and a key made then signs.
    const revoked = await app.services.keys.rotate(systemContext, { revokePrevious: true });
    expect(revoked.previous).toBe(active.kid);
    const after = (await login(app, user.email)).session.access_token;
    expect(decodeProtectedHeader(after).kid).toBe(revoked.kid);
    expect((await app.inject({ method: 'GET', url: '/v1/auth/me', headers: bearer(after) })).statusCode).toBe(
      200,
    );
    // Two starts and a dozen requests: over the default 30 s on a loaded machine.
  }, 60_000);
});
