import { randomBytes } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { KeyEncryptionKeyMismatchError } from '../../src/lib/crypto.js';
import type { DatabaseHandle } from '../../src/db/client.js';
import { signingKeys } from '../../src/db/schema/index.js';
import { RedisDatabaseError } from '../../src/services.js';
import { buildTestApp, closeTestApps } from '../support/app.js';
import { ownDatabase } from '../support/database.js';
import { registerUser } from '../support/factories.js';
import { turnOnMfa } from '../support/mfa.js';
import { redisAnswers, redisDatabaseCount, TEST_REDIS_URL } from '../support/redis.js';

const redisAvailable = await redisAnswers();

/** What a start of the app on `database` with another KEY_ENCRYPTION_KEY throws (undefined: it started). */
const failedStart = (key: string, database: DatabaseHandle) =>
  buildTestApp({ env: { KEY_ENCRYPTION_KEY: key }, deps: { database } }).then(
    () => undefined,
    (err: unknown) => err,
  );

describe('a start that cannot work says why, in words an operator can act on', () => {
  it('a KEY_ENCRYPTION_KEY that is not the one the signing keys were encrypted with', async () => {
    // A database of its own: signing keys encrypted with the test key, and no second factor (whose
    // secret, checked first, would refuse the start in its own words).
    const own = await ownDatabase('kek_signing');
    try {
      await buildTestApp({ deps: { database: own.database } });
      const other = randomBytes(32).toString('base64');
      const failure = await failedStart(other, own.database);
      expect(failure).toBeInstanceOf(KeyEncryptionKeyMismatchError);
      expect((failure as Error).message).toMatch(
        /^the signing key \S+ cannot be decrypted with KEY_ENCRYPTION_KEY: it is not the key the signing keys were encrypted with/,
      );
      // It names everything the key encrypts, and what starting over costs.
      expect((failure as Error).message).toContain('the secrets of two-step verification and queued mail');
      expect((failure as Error).message).not.toContain(other);
    } finally {
      await closeTestApps();
      await own.dispose();
    }
  });

  it('a KEY_ENCRYPTION_KEY the secrets of two-step verification were not encrypted with, even once new signing keys are made', async () => {
    const own = await ownDatabase('kek_mfa');
    try {
      const first = await buildTestApp({ deps: { database: own.database } });
      const user = await registerUser(first, 'kek-mfa');
      await turnOnMfa(first, user.accessToken);
      const other = randomBytes(32).toString('base64');
      // Starting over with new signing keys alone would leave every code of that user an error.
      await own.database.db.delete(signingKeys);
      const failure = await failedStart(other, own.database);
      expect(failure).toBeInstanceOf(KeyEncryptionKeyMismatchError);
      expect((failure as Error).message).toMatch(
        /^the secrets of two-step verification cannot be decrypted with KEY_ENCRYPTION_KEY: it is not the key they were encrypted with/,
      );
      expect((failure as Error).message).not.toContain(other);
      // Refused before any signing key was made under the wrong key: the right one starts again.
      expect(await own.database.db.select().from(signingKeys)).toEqual([]);
      await buildTestApp({ deps: { database: own.database } });
    } finally {
      await closeTestApps();
      await own.dispose();
    }
  });

  it.skipIf(!redisAvailable)(
    'a REDIS_URL naming a database the Redis server does not have (it went on on database 0)',
    async () => {
      const redisUrl = new URL(TEST_REDIS_URL);
      // The first index past the server's own count (16 by default).
      const databases = await redisDatabaseCount();
      expect(databases, 'Redis answered a PING a moment ago').toBeGreaterThan(0);
      redisUrl.pathname = `/${databases}`;
      const failure = await buildTestApp({ env: { REDIS_URL: redisUrl.href } }).then(
        () => undefined,
        (err: unknown) => err,
      );
      expect(failure).toBeInstanceOf(RedisDatabaseError);
      expect((failure as Error).message).toBe(
        `REDIS_URL names database ${databases}, which the Redis server at ${redisUrl.host} refuses ` +
          '(ERR DB index is out of range): name one it has (0 to one below its `databases` setting, 16 by default)',
      );
      // One it has starts (the tests' own, 9).
      redisUrl.pathname = '/9';
      await buildTestApp({ env: { REDIS_URL: redisUrl.href } });
    },
  );
});
