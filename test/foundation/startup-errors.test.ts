import { randomBytes } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { KeyEncryptionKeyMismatchError } from '../../src/modules/signing-keys/signing-keys.service.js';
import { buildTestApp } from '../support/app.js';

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
});
