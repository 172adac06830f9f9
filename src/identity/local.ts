import { randomUUID } from 'node:crypto';
import { AppError } from '../lib/errors.js';
import type { UsersRepository } from '../modules/users/users.repository.js';
import type { PasswordHasher } from './passwords.js';
import type { IdentityProvider, ProviderUser } from './provider.js';

/** Built-in credentials: argon2id hashes in the service's own `users` table. */
export function createLocalProvider(deps: {
  users: UsersRepository;
  hasher: PasswordHasher;
  /** REQUIRE_EMAIL_CONFIRMATION: a sign-up opens no session until the address is confirmed. */
  requireEmailConfirmation?: boolean;
}): IdentityProvider {
  const signUp: IdentityProvider['signUp'] = async (email, password) => {
    // The uniqueness check that matters is the insert's; this one spares an argon2 run.
    if (await deps.users.findByEmail(email)) throw new AppError('email_taken');
    const passwordHash = await deps.hasher.hash(password);
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
        // Same work as a real check, so the answer time does not reveal whether the account exists.
        await deps.hasher.verifyDummy(password);
        return undefined;
      }
      if (!(await deps.hasher.verify(user.passwordHash, password))) return undefined;
      return {
        id: user.id,
        email: user.email,
        emailConfirmedAt: user.emailConfirmedAt,
        checkedHash: user.passwordHash,
      } satisfies ProviderUser;
    },
    async exchange() {
      throw new AppError('not_found', {
        detail: 'Token exchange needs AUTH_PROVIDER=supabase',
      });
    },
    async changePassword(user, currentPassword, newPassword) {
      const row = await deps.users.findById(user.id);
      if (!row?.passwordHash || !(await deps.hasher.verify(row.passwordHash, currentPassword)))
        return undefined;
      return { passwordHash: await deps.hasher.hash(newPassword), replaces: row.passwordHash };
    },
    async setPassword(_user, newPassword) {
      return { passwordHash: await deps.hasher.hash(newPassword) };
    },
    async deleteUser() {},
  };
}
