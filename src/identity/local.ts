import { randomUUID } from 'node:crypto';
import { AppError } from '../lib/errors.js';
import type { UsersRepository } from '../modules/users/users.repository.js';
import { normalizePassword, type PasswordHasher } from './passwords.js';
import type { IdentityProvider, ProviderUser } from './provider.js';

/** Built-in credentials: argon2id hashes in the service's own `users` table. */
export function createLocalProvider(deps: {
  users: UsersRepository;
  hasher: PasswordHasher;
  /** REQUIRE_EMAIL_CONFIRMATION: a sign-up opens no session until the address is confirmed. */
  requireEmailConfirmation?: boolean;
}): IdentityProvider {
  /**
   * Which form of `password` the hash was made from: the NFKC form (every hash made since passwords
   * are normalised), else, for a password NFKC changes, the string as typed (a hash made before).
   * Either way one guess: the caller counts the call, not the verifications.
   */
  async function verify(hash: string, password: string): Promise<'normalized' | 'raw' | undefined> {
    const normalized = normalizePassword(password);
    if (await deps.hasher.verify(hash, normalized)) return 'normalized';
    if (normalized !== password && (await deps.hasher.verify(hash, password))) return 'raw';
    return undefined;
  }

  /**
   * A hash made from the password as typed, before passwords were normalised, is made again from its
   * NFKC form, so that the same password typed in other code points signs in from now on. Compare and
   * swap, as a change: a change or a reset committed meanwhile wins. Returns the account's hash the
   * sign-in stands on (the session opens only while it is still the account's); best effort, a
   * failure (a full hashing queue, the database) leaves the old hash, to be upgraded next time.
   */
  async function upgrade(userId: string, current: string, password: string): Promise<string> {
    try {
      const next = await deps.hasher.hash(normalizePassword(password));
      if (await deps.users.replacePasswordHash(userId, current, next)) return next;
      // Replaced meanwhile: by a concurrent sign-in's upgrade (its hash takes this password too, and
      // this sign-in stands on it), or by a change or a reset (it does not, and opens no session).
      const now = await deps.users.findById(userId);
      if (now?.passwordHash && (await verify(now.passwordHash, password)) === 'normalized')
        return now.passwordHash;
    } catch {
      // The password was right: the sign-in goes on with the hash it was checked against.
    }
    return current;
  }

  const signUp: IdentityProvider['signUp'] = async (email, password) => {
    // The uniqueness check that matters is the insert's; this one spares an argon2 run.
    if (await deps.users.findByEmail(email)) throw new AppError('email_taken');
    const passwordHash = await deps.hasher.hash(normalizePassword(password));
    return {
      user: { id: randomUUID(), email, emailConfirmedAt: null },
      passwordHash,
      confirmed: !deps.requireEmailConfirmation,
    };
  };
  return {
    name: 'local',
    signUp,
    // Made by an administrator (the bootstrap admin): signs in at once, no confirmation mail.
    createConfirmedUser: async (email, password) => ({ ...(await signUp(email, password)), confirmed: true }),
    async signIn(email, password) {
      const user = await deps.users.findByEmail(email);
      if (!user?.passwordHash) {
        // Same work as a real check, so the answer time does not reveal whether the account exists:
        // a wrong password NFKC changes is verified in both forms.
        await deps.hasher.verifyDummy(password);
        if (normalizePassword(password) !== password) await deps.hasher.verifyDummy(password);
        return undefined;
      }
      const matched = await verify(user.passwordHash, password);
      if (!matched) return undefined;
      return {
        id: user.id,
        email: user.email,
        emailConfirmedAt: user.emailConfirmedAt,
        checkedHash:
          matched === 'raw' ? await upgrade(user.id, user.passwordHash, password) : user.passwordHash,
      } satisfies ProviderUser;
    },
    async exchange() {
      throw new AppError('not_found', {
        detail: 'Token exchange needs AUTH_PROVIDER=supabase',
      });
    },
    async changePassword(user, currentPassword, newPassword) {
      const row = await deps.users.findById(user.id);
      if (!row?.passwordHash || !(await verify(row.passwordHash, currentPassword))) return undefined;
      return {
        passwordHash: await deps.hasher.hash(normalizePassword(newPassword)),
        replaces: row.passwordHash,
      };
    },
    async setPassword(_user, newPassword) {
      return { passwordHash: await deps.hasher.hash(normalizePassword(newPassword)) };
    },
    async deleteUser() {},
  };
}
