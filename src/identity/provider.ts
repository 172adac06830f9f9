import { AppError } from '../lib/errors.js';

/**
 * Where credentials live. `local` keeps argon2id hashes in the service's own `users` table;
 * `supabase` delegates sign-up and password checks to Supabase Auth over its HTTP API. Either way
 * the service mints its own sessions and tokens; the provider only answers "who is this?".
 */
export interface ProviderUser {
  /** The user's id: for Supabase, the Supabase user id (the local row takes the same id). */
  id: string;
  email: string;
  emailConfirmedAt: Date | null;
  /**
   * Built-in provider, at sign-in: the hash the password was checked against. The session opens only
   * while it is still the account's: a sign-in with the old password that was being checked when a
   * reset or a change committed gets no session the change did not end.
   */
  checkedHash?: string;
  /**
   * exchange: when the user signed in to the provider for the token exchanged (Supabase: the newest
   * `amr` timestamp, which a refresh of its session does not move), never later than now; null when
   * the token does not say. A token is no proof of a recent sign-in by being valid: supabase-js keeps
   * a session alive for days by refreshing it.
   */
  signedInAt?: Date | null;
  /**
   * The user has a verified second factor at the provider, and the session that vouched for them has
   * not given it (Supabase: aal1): signIn's (a password sign-in there is never more), exchange's (the
   * token's), recoveryIdentity's (the recovery session's). The provider itself would grant such a
   * session neither what the factor guards nor a new password; the service opens no session and sets
   * no password from it (403 `provider_mfa_required`).
   */
  secondFactorMissing?: boolean;
}

/**
 * The right password for an account whose address is not confirmed yet, said by a provider that
 * checks both (Supabase with "Confirm email"): a 403 `email_not_confirmed`, as the built-in provider
 * answers, not a wrong password that counts toward the lockout.
 */
export class EmailNotConfirmed extends AppError {
  constructor() {
    super('email_not_confirmed', {
      detail: 'Confirm your email address first: follow the link mailed to it when you registered',
    });
  }
}

/**
 * The provider refuses the account itself, whatever the password (Supabase: a user banned there,
 * which GoTrue answers 400 `user_banned` before it checks the password), or holds it banned though
 * its token still verifies (exchange: `user`, the account the token is for). The service answers it
 * as the built-in provider answers a disabled account (401, audited `disabled`); left unhandled, it
 * is a wrong password's 401.
 */
export class AccountDisabled extends AppError {
  constructor(readonly user?: Pick<ProviderUser, 'id' | 'email'>) {
    super('invalid_credentials', { detail: 'The email or password is incorrect' });
  }
}

/**
 * The provider was asked to change (or, for a reset, set) a password and gave no answer (a timeout,
 * a 5xx): it may have changed it. A 503 to the client; the service ends the other sessions (a reset:
 * all of them) all the same, as a change would, since the old password may no longer be the account's.
 */
export class PasswordMayHaveChanged extends AppError {
  constructor(
    unavailable: AppError,
    detail = 'The identity provider did not answer: the new password may be in effect already, and your other sessions have ended',
  ) {
    super('provider_unavailable', {
      detail,
      headers: unavailable.headers,
      cause: unavailable.cause,
    });
  }
}

/** What a provider says of a user it is asked about by id (IdentityProvider.standing). */
export type ProviderStanding = 'active' | 'banned' | 'gone';

export interface SignUpResult {
  user: ProviderUser;
  /** Local argon2id hash to store, or null when the provider keeps the credentials. */
  passwordHash: string | null;
  /** False when the provider asks the user to confirm their email before they can sign in. */
  confirmed: boolean;
  /**
   * False when the provider answered with a user it had before this sign-up (Supabase, for an
   * unconfirmed address signed up earlier, perhaps by another app of the project): a sign-up that
   * fails here must not delete it. Absent: made by this sign-up.
   */
  created?: boolean;
}

export interface IdentityProvider {
  readonly name: 'local' | 'supabase';
  /** Throws AppError `email_taken`, `weak_password` or `provider_unavailable`. */
  signUp(email: string, password: string): Promise<SignUpResult>;
  /**
   * The user, or undefined for any failure a client may not tell apart (unknown email, wrong password);
   * `secondFactorMissing` for the right password of a user with a second factor at the provider.
   * Throws EmailNotConfirmed for the right password of an unconfirmed address, AccountDisabled for an
   * account the provider refuses whatever the password, `provider_unavailable` for anything that is
   * not an answer about the user.
   */
  signIn(email: string, password: string): Promise<ProviderUser | undefined>;
  /**
   * Verifies a token the provider issued elsewhere (e.g. a social login); undefined when invalid;
   * `secondFactorMissing` when the user has a second factor at the provider and its session has not
   * given it.
   * Throws AccountDisabled (with the user) for a valid token of a user the provider holds banned.
   */
  exchange(accessToken: string): Promise<ProviderUser | undefined>;
  /**
   * Changes the password after checking the current one. Returns the new local hash and the hash it
   * checked the current password against (local), or nulls (supabase); undefined when the current
   * password is wrong. Throws AccountDisabled for an account the provider refuses whatever the
   * password (its current one cannot be checked), `provider_mfa_required` when the provider keeps
   * the change for a session that gave a second factor there (Supabase, a user with MFA enrolled:
   * nothing changed), PasswordMayHaveChanged when it gave no answer.
   */
  changePassword(
    user: ProviderUser,
    currentPassword: string,
    newPassword: string,
  ): Promise<{ passwordHash: string | null; replaces: string | null } | undefined>;
  /**
   * Creates a user whose email counts as confirmed, as an administrator does (the bootstrap admin):
   * no confirmation mail, and sign-in works at once. Throws like signUp.
   */
  createConfirmedUser(email: string, password: string): Promise<SignUpResult>;
  /**
   * Sets a new password without the current one, once the user has proved they hold the email (a
   * password reset). Returns the new local hash (local) or null (the provider keeps it). Throws
   * AppError `weak_password` or `provider_unavailable`.
   */
  setPassword(user: ProviderUser, newPassword: string): Promise<{ passwordHash: string | null }>;
  /**
   * Providers that mail reset links themselves (Supabase): asks for one to be sent to `email`, the
   * link leading to `redirectTo`. Without it, the service mails its own (modules/auth/password-reset).
   * `too_soon`: the provider sent this address a link moments ago and sends no other yet.
   */
  requestPasswordRecovery?(email: string, redirectTo: string | undefined): Promise<'sent' | 'too_soon'>;
  /**
   * With requestPasswordRecovery: the user a recovery link's token was issued to, or undefined when it
   * is not a valid recovery token; `secondFactorMissing` when the provider keeps the user's password
   * for a session that gave their second factor and this one has not. The token still works:
   * endRecovery ends it.
   */
  recoveryIdentity?(token: string): Promise<ProviderUser | undefined>;
  /** With recoveryIdentity: the recovery token stops working (best effort, never throws). */
  endRecovery?(token: string): Promise<void>;
  /**
   * Providers whose users change their address there (Supabase): the user as the provider has them
   * now, by id; undefined when it has no such user. Throws `provider_unavailable`.
   */
  currentUser?(userId: string): Promise<ProviderUser | undefined>;
  /**
   * Providers where a user can be banned or deleted directly (Supabase: its dashboard, its admin API),
   * not through this service: whether the provider still holds the user, by id — `banned` (banned
   * until later than now), `gone` (no such user), `active` otherwise. Throws `provider_unavailable`
   * for anything that is not an answer about the user.
   */
  standing?(userId: string): Promise<ProviderStanding>;
  /** Removes the user from the provider (no-op for local: the row is deleted by the service). */
  deleteUser(userId: string): Promise<void>;
  /**
   * Providers that others sign in to directly (Supabase): a disabled user is banned there too, so
   * their provider sessions stop refreshing and apps that take the provider's tokens refuse them.
   */
  setBanned?(userId: string, banned: boolean): Promise<void>;
}
