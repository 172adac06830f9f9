import { describe, expect, it, vi } from 'vitest';
import { createLocalProvider } from '../../src/identity/local.js';
import { createPasswordHasher } from '../../src/identity/passwords.js';
import type { UserRow, UsersRepository } from '../../src/modules/users/users.repository.js';

/**
 * "Unknown email and wrong password answer in about the same time": proved by the work done, not by a
 * stopwatch — an unknown email costs one argon2 verification, exactly like a wrong password.
 */
describe('local provider: the same work for unknown emails and wrong passwords', () => {
  async function setup() {
    const hasher = createPasswordHasher({ concurrency: 1, queue: 8 });
    const stored = await hasher.hash('the right passphrase');
    const row = {
      id: 'u1',
      email: 'known@example.test',
      passwordHash: stored,
      emailConfirmedAt: null,
    } as UserRow;
    const users = {
      findByEmail: async (email: string) => (email === row.email ? row : undefined),
      findById: async () => row,
    } as unknown as UsersRepository;
    const verify = vi.spyOn(hasher, 'verify');
    const verifyDummy = vi.spyOn(hasher, 'verifyDummy');
    return { provider: createLocalProvider({ users, hasher }), verify, verifyDummy };
  }

  it('verifies against a real argon2id hash when the email is unknown', async () => {
    const { provider, verify, verifyDummy } = await setup();
    expect(await provider.signIn('ghost@example.test', 'whatever it is')).toBeUndefined();
    expect(verifyDummy).toHaveBeenCalledTimes(1);
    expect(verify).not.toHaveBeenCalled();
  });

  it('verifies once for a wrong password and once for the right one', async () => {
    const { provider, verify, verifyDummy } = await setup();
    expect(await provider.signIn('known@example.test', 'a wrong passphrase')).toBeUndefined();
    expect(await provider.signIn('known@example.test', 'the right passphrase')).toMatchObject({ id: 'u1' });
    expect(verify).toHaveBeenCalledTimes(2);
    expect(verifyDummy).not.toHaveBeenCalled();
  });

  it('a password NFKC changes is checked in both forms, for an unknown email as for a wrong password', async () => {
    const { provider, verify, verifyDummy } = await setup();
    const typed = 'cr\u00e8me br\u00fbl\u00e9e'.normalize('NFD');
    expect(await provider.signIn('ghost@example.test', typed)).toBeUndefined();
    expect(verifyDummy).toHaveBeenCalledTimes(2);
    expect(await provider.signIn('known@example.test', typed)).toBeUndefined();
    expect(verify).toHaveBeenCalledTimes(2);
  });

  it('hashes with argon2id at the OWASP floor (m=19456 KiB, t=2, p=1)', async () => {
    const hasher = createPasswordHasher({ concurrency: 1, queue: 1 });
    expect(await hasher.hash('another passphrase')).toMatch(/^\$argon2id\$v=19\$m=19456,t=2,p=1\$/);
  });
});
