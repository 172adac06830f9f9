import { randomBytes } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { KeyEncryptionKeyMismatchError } from '../../src/lib/crypto.js';
import { signingKeys } from '../../src/db/schema/index.js';
import { buildTestApp, closeTestApps } from '../support/app.js';
import { ownDatabase } from '../support/database.js';
import { registerUser } from '../support/factories.js';
import { turnOnMfa } from '../support/mfa.js';

describe('a start that cannot work says why, in words an operator can act on', () => {
  it('a KEY_ENCRYPTION_KEY that is not the one the signing keys were encrypted with', async () => {
    // The worker's database holds signing keys encrypted with the test key.
    await buildTestApp();
    const other = randomBytes(32).toString('base64');
    const failure = await buildTestApp({ env: { KEY_ENCRYPTION_KEY: other } }).then(
      () => undefined,
      (err: unknown) => err,
    );
    expect(failure).toBeInstanceOf(KeyEncryptionKeyMismatchError);
    expect((failure as Error).message).toMatch(
      /^the signing key \S+ cannot be decrypted with KEY_ENCRYPTION_KEY: it is not the key the signing keys were encrypted with/,
    );
    expect((failure as Error).message).not.toContain(other);
  });

  it('a KEY_ENCRYPTION_KEY the secrets of two-step verification were not encrypted with, even once new signing keys are made', async () => {
    const own = await ownDatabase('kek_mfa');
    try {
      const first = await buildTestApp({ deps: { database: own.database } });
      const user = await registerUser(first, 'kek-mfa');
      await turnOnMfa(first, user.accessToken);
      const other = randomBytes(32).toString('base64');
      // The signing keys' refusal names everything the key encrypts.
      const signing = await buildTestApp({
        env: { KEY_ENCRYPTION_KEY: other },
        deps: { database: own.database },
      }).then(
        () => undefined,
        (err: unknown) => err,
      );
      expect(signing).toBeInstanceOf(KeyEncryptionKeyMismatchError);
      expect((signing as Error).message).toContain('two-step verification');
      // Starting over with new signing keys alone would leave every code of that user an error.
      await own.database.db.delete(signingKeys);
      const failure = await buildTestApp({
        env: { KEY_ENCRYPTION_KEY: other },
        deps: { database: own.database },
      }).then(
        () => undefined,
        (err: unknown) => err,
      );
      expect(failure).toBeInstanceOf(KeyEncryptionKeyMismatchError);
      expect((failure as Error).message).toMatch(
        /^the secrets of two-step verification cannot be decrypted with KEY_ENCRYPTION_KEY: it is not the key they were encrypted with/,
      );
      expect((failure as Error).message).not.toContain(other);
    } finally {
      await closeTestApps();
      await own.dispose();
    }
  });
});
