import { describe, expect, it } from 'vitest';
import { defaultHashConcurrency, loadConfig } from '../../src/config.js';

const secrets = {
  KEY_ENCRYPTION_KEY: Buffer.alloc(32, 1).toString('base64'),
  SECRET_PEPPER: Buffer.alloc(32, 2).toString('base64'),
};

describe('argon2 concurrency', () => {
  it('leaves a core to the event loop and a libuv pool thread to everything else, by default', () => {
    expect(defaultHashConcurrency(2, 4)).toBe(1);
    expect(defaultHashConcurrency(4, 4)).toBe(3);
    expect(defaultHashConcurrency(8, 4)).toBe(3);
    expect(defaultHashConcurrency(8, 16)).toBe(7);
    expect(defaultHashConcurrency(1, 4)).toBe(1);
    expect(defaultHashConcurrency(4, 1)).toBe(1);
  });

  it('takes PASSWORD_HASH_CONCURRENCY as given, and an empty value as unset', () => {
    const config = (env: Record<string, string>) =>
      loadConfig({ ...secrets, ...env }, { generateDevSecrets: false }).passwordHashing.concurrency;
    expect(config({ PASSWORD_HASH_CONCURRENCY: '6' })).toBe(6);
    expect(config({ PASSWORD_HASH_CONCURRENCY: '' })).toBe(config({}));
    expect(() => config({ PASSWORD_HASH_CONCURRENCY: '0' })).toThrow(/PASSWORD_HASH_CONCURRENCY/);
  });
});
