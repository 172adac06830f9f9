import { randomUUID } from 'node:crypto';
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from 'vitest';
import { AccountDisabled, type IdentityProvider, type ProviderUser } from '../../src/identity/provider.js';
import { createSupabaseProvider } from '../../src/identity/supabase.js';
import { AppError } from '../../src/lib/errors.js';
import { type FakeGoTrue, projectClient, startFakeGoTrue } from '../support/fake-gotrue.js';

let fake: FakeGoTrue;
let provider: IdentityProvider;
let seq = 0;
const email = () => `user${++seq}-${Date.now()}@example.test`;

async function rejection(promise: Promise<unknown>): Promise<AppError> {
  try {
    await promise;
  } catch (err) {
    expect(err).toBeInstanceOf(AppError);
    return err as AppError;
  }
  throw new Error('expected a rejection');
}

/** A client of the kind some other app (a social login, a mobile app) would hold the token from. */
function outsideClient() {
  return projectClient(fake);
}

async function signedUp(address = email(), password = 'correct horse'): Promise<ProviderUser> {
  const { user } = await provider.signUp(address, password);
  return user;
}

beforeAll(async () => {
  fake = await startFakeGoTrue();
  provider = createSupabaseProvider({
    url: fake.url,
    anonKey: fake.anonKey,
    serviceRoleKey: fake.serviceRoleKey,
    timeoutMs: 2000,
  });
});

afterEach(() => {
  fake.setConfirmEmail(false);
  fake.setDown(false);
  fake.setDelayMs(0);
  fake.setFailWith(undefined);
});

afterAll(async () => {
  await fake.close();
});

describe('signUp', () => {
  it('creates a confirmed user when Supabase does not ask for email confirmation', async () => {
    const address = email();
    const result = await provider.signUp(address, 'correct horse');
    expect(result.confirmed).toBe(true);
    expect(result.passwordHash).toBeNull();
    expect(result.user.email).toBe(address);
    expect(result.user.emailConfirmedAt).toBeInstanceOf(Date);
    expect(fake.users.get(result.user.id)?.email).toBe(address);
  });

  it('reports confirmed: false when Supabase asks for email confirmation', async () => {
    fake.setConfirmEmail(true);
    const address = email();
    const result = await provider.signUp(address, 'correct horse');
    expect(result.confirmed).toBe(false);
    expect(result.user.emailConfirmedAt).toBeNull();
    expect(fake.users.has(result.user.id)).toBe(true);
  });

  it('answers email_taken for a registered email (autoconfirm: 422 user_already_exists)', async () => {
    const address = email();
    await signedUp(address);
    const err = await rejection(provider.signUp(address, 'another password'));
    expect(err.code).toBe('email_taken');
  });

  it('answers email_taken for a confirmed email when confirmation hides it behind a made-up user', async () => {
    const address = email();
    await signedUp(address);
    fake.setConfirmEmail(true);
    const err = await rejection(provider.signUp(address, 'another password'));
    expect(err.code).toBe('email_taken');
  });

  it('answers weak_password for a password Supabase rejects', async () => {
    const err = await rejection(provider.signUp(email(), 'abc'));
    expect(err.code).toBe('weak_password');
    expect(err.detail).toMatch(/at least 6 characters/);
    expect(err.errors).toEqual([{ field: 'body.password', message: err.detail }]);
  });

  it('answers validation_failed for an email Supabase cannot validate, naming the field', async () => {
    const err = await rejection(provider.signUp('not-an-email', 'correct horse'));
    expect(err.code).toBe('validation_failed');
    expect(err.errors).toEqual([
      { field: 'body.email', message: 'is not accepted by the identity provider' },
    ]);
  });

  it('answers registration_closed (403) when the project allows no sign-ups', async () => {
    fake.setFailWith({
      status: 422,
      code: 'signup_disabled',
      message: 'Signups not allowed for this instance',
    });
    const err = await rejection(provider.signUp(email(), 'correct horse'));
    expect(err.code).toBe('registration_closed');
    expect(err.status).toBe(403);
  });

  it('says what went wrong in its own words: GoTrue’s message goes to the log, not the client', async () => {
    fake.setFailWith({ status: 400, code: 'something_new', message: 'Internal detail: SECRET' });
    const err = await rejection(provider.signUp(email(), 'correct horse'));
    expect(err.code).toBe('unprocessable');
    expect(err.detail).toBe('The identity provider refused the sign-up');
    expect((err.cause as Error).message).toContain('SECRET');
  });
});

describe('signIn', () => {
  it('returns the user for the right password and undefined otherwise', async () => {
    const address = email();
    const user = await signedUp(address);
    await expect(provider.signIn(address, 'correct horse')).resolves.toMatchObject({
      id: user.id,
      email: address,
    });
    await expect(provider.signIn(address, 'wrong horse')).resolves.toBeUndefined();
    await expect(provider.signIn(email(), 'correct horse')).resolves.toBeUndefined();
  });

  it('says email_not_confirmed for the right password until the email is confirmed, and no to a wrong one', async () => {
    fake.setConfirmEmail(true);
    const address = email();
    const { user } = await provider.signUp(address, 'correct horse');
    const early = await rejection(provider.signIn(address, 'correct horse'));
    expect(early.code).toBe('email_not_confirmed');
    expect(early.status).toBe(403);
    await expect(provider.signIn(address, 'wrong horse')).resolves.toBeUndefined();
    fake.confirm(address);
    const signedIn = await provider.signIn(address, 'correct horse');
    expect(signedIn?.id).toBe(user.id);
    expect(signedIn?.emailConfirmedAt).toBeInstanceOf(Date);
  });

  it('revokes the Supabase sessions it opens', async () => {
    const address = email();
    const user = await signedUp(address);
    await vi.waitFor(() => expect(fake.activeSessions(user.id)).toBe(0));
    await provider.signIn(address, 'correct horse');
    await vi.waitFor(() => expect(fake.activeSessions(user.id)).toBe(0));
    await provider.changePassword(user, 'correct horse', 'battery staple');
    await vi.waitFor(() => expect(fake.activeSessions(user.id)).toBe(0));
  });
});

describe('exchange', () => {
  it('returns the user of a token Supabase issued elsewhere', async () => {
    const address = email();
    const user = await signedUp(address);
    const { data, error } = await outsideClient().auth.signInWithPassword({
      email: address,
      password: 'correct horse',
    });
    expect(error).toBeNull();
    const token = data.session?.access_token ?? '';
    await expect(provider.exchange(token)).resolves.toMatchObject({ id: user.id, email: address });
  });

  it('returns undefined for a garbage, empty, foreign-key or revoked token', async () => {
    await expect(provider.exchange('garbage')).resolves.toBeUndefined();
    await expect(provider.exchange('')).resolves.toBeUndefined();
    // A project key is a valid JWT of the project, but names no user.
    await expect(provider.exchange(fake.anonKey)).resolves.toBeUndefined();

    const address = email();
    await signedUp(address);
    const client = outsideClient();
    const { data } = await client.auth.signInWithPassword({ email: address, password: 'correct horse' });
    const token = data.session?.access_token ?? '';
    await client.auth.signOut();
    await expect(provider.exchange(token)).resolves.toBeUndefined();
  });

  it('says when the user signed in at Supabase: the newest amr timestamp, kept through refreshes, never later than now', async () => {
    const address = email();
    const user = await signedUp(address);
    const client = outsideClient();
    const { data } = await client.auth.signInWithPassword({ email: address, password: 'correct horse' });
    const signedIn = (await provider.exchange(data.session?.access_token ?? ''))?.signedInAt;
    expect(Math.abs(signedIn!.getTime() - Date.now())).toBeLessThan(5_000);
    fake.backdateSignIns(user.id, 3600);
    const refreshed = await client.auth.refreshSession({ refresh_token: data.session?.refresh_token ?? '' });
    const later = (await provider.exchange(refreshed.data.session?.access_token ?? ''))?.signedInAt;
    expect(Math.abs(later!.getTime() - (Date.now() - 3600_000))).toBeLessThan(5_000);

    // What GoTrue vouches for is the token; what it says of its sign-in is read from it. A token that
    // says nothing (no amr, no timestamp), or names another user than GoTrue's answer, says null.
    const claims = (payload: Record<string, unknown>) =>
      `e30.${Buffer.from(JSON.stringify(payload)).toString('base64url')}.c2ln`;
    const userJson = await (
      await fetch(`${fake.url}/auth/v1/admin/users/${user.id}`, {
        headers: { apikey: fake.serviceRoleKey, authorization: `Bearer ${fake.serviceRoleKey}` },
      })
    ).json();
    const vouching = createSupabaseProvider({
      url: fake.url,
      anonKey: fake.anonKey,
      serviceRoleKey: fake.serviceRoleKey,
      timeoutMs: 2000,
      fetch: async (input, init) =>
        String(input).endsWith('/auth/v1/user')
          ? new Response(JSON.stringify(userJson), { headers: { 'content-type': 'application/json' } })
          : fetch(input, init),
    });
    const now = Math.floor(Date.now() / 1000);
    const signedInWith = async (payload: Record<string, unknown>) =>
      (await vouching.exchange(claims(payload)))?.signedInAt;
    expect(await signedInWith({ sub: user.id })).toBeNull();
    expect(await signedInWith({ sub: user.id, amr: [{ method: 'oauth' }] })).toBeNull();
    expect(await signedInWith({ sub: randomUUID(), amr: [{ method: 'oauth', timestamp: now }] })).toBeNull();
    expect(
      await signedInWith({
        sub: user.id,
        amr: [
          { method: 'password', timestamp: now - 3600 },
          { method: 'totp', timestamp: now - 60 },
        ],
      }),
    ).toEqual(new Date((now - 60) * 1000));
    const future = await signedInWith({ sub: user.id, amr: [{ method: 'oauth', timestamp: now + 86_400 }] });
    expect(future!.getTime()).toBeLessThanOrEqual(Date.now());
  });

  it('returns undefined for the token of a deleted user', async () => {
    const address = email();
    const user = await signedUp(address);
    const { data } = await outsideClient().auth.signInWithPassword({
      email: address,
      password: 'correct horse',
    });
    await provider.deleteUser(user.id);
    await expect(provider.exchange(data.session?.access_token ?? '')).resolves.toBeUndefined();
  });
});

describe('changePassword', () => {
  it('changes the password after checking the current one', async () => {
    const address = email();
    const user = await signedUp(address);
    await expect(provider.changePassword(user, 'wrong horse', 'battery staple')).resolves.toBeUndefined();
    await expect(provider.changePassword(user, 'correct horse', 'battery staple')).resolves.toEqual({
      passwordHash: null,
      replaces: null,
    });
    await expect(provider.signIn(address, 'correct horse')).resolves.toBeUndefined();
    await expect(provider.signIn(address, 'battery staple')).resolves.toMatchObject({ id: user.id });
  });

  it('accepts the current password as the new one, and refuses a weak one', async () => {
    const user = await signedUp();
    await expect(provider.changePassword(user, 'correct horse', 'correct horse')).resolves.toEqual({
      passwordHash: null,
      replaces: null,
    });
    const err = await rejection(provider.changePassword(user, 'correct horse', 'abc'));
    expect(err.code).toBe('weak_password');
    expect(err.errors).toEqual([{ field: 'body.new_password', message: err.detail }]);
  });

  it('says AccountDisabled for a user banned at Supabase, whatever the current password', async () => {
    const user = await signedUp();
    fake.users.get(user.id)!.bannedUntil = new Date(Date.now() + 3600_000).toISOString();
    for (const current of ['correct horse', 'wrong horse'])
      await expect(provider.changePassword(user, current, 'battery staple')).rejects.toBeInstanceOf(
        AccountDisabled,
      );
    expect(fake.users.get(user.id)!.password).toBe('correct horse');
  });

  it('says provider_mfa_required (403, not an outage) for a user with a second factor at Supabase', async () => {
    const user = await signedUp();
    fake.users.get(user.id)!.mfaVerified = true;
    const err = await rejection(provider.changePassword(user, 'correct horse', 'battery staple'));
    expect([err.code, err.status]).toEqual(['provider_mfa_required', 403]);
    expect((err.cause as Error).message).toMatch(/insufficient_aal/);
    // The current password is still checked first: a wrong one is a wrong one.
    await expect(provider.changePassword(user, 'wrong horse', 'battery staple')).resolves.toBeUndefined();
    expect(fake.users.get(user.id)!.password).toBe('correct horse');
  });
});

describe('password recovery', () => {
  it('asks Supabase to mail a link to redirectTo; within its minute a second request sends nothing', async () => {
    const user = await signedUp();
    await expect(provider.requestPasswordRecovery!(user.email, 'https://app.test/reset')).resolves.toBe(
      'sent',
    );
    await expect(provider.requestPasswordRecovery!(user.email, 'https://app.test/reset')).resolves.toBe(
      'too_soon',
    );
    expect(fake.recoveries.filter((r) => r.email === user.email)).toEqual([
      expect.objectContaining({ redirectTo: 'https://app.test/reset', flow: 'implicit' }),
    ]);
    await expect(provider.requestPasswordRecovery!(email(), undefined)).resolves.toBe('sent');
  });

  it('reads a recent recovery session until endRecovery ends it, and no password-login session', async () => {
    const user = await signedUp();
    await provider.requestPasswordRecovery!(user.email, undefined);
    const token = await fake.completeRecovery(user.email);
    for (let read = 0; read < 2; read++)
      await expect(provider.recoveryIdentity!(token)).resolves.toMatchObject({
        id: user.id,
        email: user.email,
      });
    await provider.endRecovery!(token);
    await expect(provider.recoveryIdentity!(token)).resolves.toBeUndefined();

    const signIn = await outsideClient().auth.signInWithPassword({
      email: user.email,
      password: 'correct horse',
    });
    await expect(provider.recoveryIdentity!(signIn.data.session!.access_token)).resolves.toBeUndefined();
  });

  it('refuses a recovery session older than recoveryMaxAgeSeconds', async () => {
    const strict = createSupabaseProvider({
      url: fake.url,
      anonKey: fake.anonKey,
      serviceRoleKey: fake.serviceRoleKey,
      timeoutMs: 2000,
      recoveryMaxAgeSeconds: 300,
    });
    const user = await signedUp();
    await strict.requestPasswordRecovery!(user.email, undefined);
    const token = await fake.completeRecovery(user.email, { openedSecondsAgo: 301 });
    await expect(strict.recoveryIdentity!(token)).resolves.toBeUndefined();
  });

  it('sets a password with the service role key, ending every Supabase session; refuses a weak one', async () => {
    const address = email();
    const user = await signedUp(address);
    await expect(provider.setPassword(user, 'battery staple')).resolves.toEqual({ passwordHash: null });
    expect(fake.activeSessions(user.id)).toBe(0);
    await expect(provider.signIn(address, 'battery staple')).resolves.toMatchObject({ id: user.id });
    const err = await rejection(provider.setPassword(user, 'abc'));
    expect(err.code).toBe('weak_password');
    expect(err.errors).toEqual([{ field: 'body.new_password', message: err.detail }]);
  });
});

describe('deleteUser', () => {
  it('deletes the user with the service role key, and ignores one already gone', async () => {
    const user = await signedUp();
    await provider.deleteUser(user.id);
    expect(fake.users.has(user.id)).toBe(false);
    await expect(provider.deleteUser(user.id)).resolves.toBeUndefined();
    await expect(provider.deleteUser('not-a-uuid')).resolves.toBeUndefined();
  });
});

describe('standing', () => {
  it('says active, banned (banned_until later than now) or gone, by id with the service role key', async () => {
    const user = await signedUp();
    expect(await provider.standing!(user.id)).toBe('active');
    fake.users.get(user.id)!.bannedUntil = new Date(Date.now() - 1000).toISOString();
    expect(await provider.standing!(user.id)).toBe('active');
    fake.users.get(user.id)!.bannedUntil = new Date(Date.now() + 3600_000).toISOString();
    expect(await provider.standing!(user.id)).toBe('banned');
    fake.users.delete(user.id);
    expect(await provider.standing!(user.id)).toBe('gone');
    expect(await provider.standing!('not-a-uuid')).toBe('gone');
  });

  it('takes only GoTrue’s own user_not_found for gone: any other failure is provider_unavailable', async () => {
    const user = await signedUp();
    for (const failure of [
      // SUPABASE_URL with a path the gateway does not know: a 404 that says nothing about the user.
      { status: 404, message: 'no Route matched with those values' },
      { status: 500 },
      { status: 403, code: 'not_admin', message: 'User not allowed' },
    ]) {
      fake.setFailWith(failure);
      const err = await rejection(provider.standing!(user.id));
      expect(err.code).toBe('provider_unavailable');
    }
    fake.setFailWith(undefined);
    fake.setDown(true);
    expect((await rejection(provider.standing!(user.id))).code).toBe('provider_unavailable');
  });
});

describe('createConfirmedUser', () => {
  it('creates a user who signs in at once, even while Supabase asks sign-ups to confirm their email', async () => {
    fake.setConfirmEmail(true);
    const address = email();
    const created = await provider.createConfirmedUser(address, 'correct horse');
    expect(created.confirmed).toBe(true);
    expect(created.user.emailConfirmedAt).toBeInstanceOf(Date);
    expect((await provider.signIn(address, 'correct horse'))?.id).toBe(created.user.id);
    expect((await rejection(provider.createConfirmedUser(address, 'correct horse'))).code).toBe(
      'email_taken',
    );
  });
});

describe('when Supabase is unavailable', () => {
  const expectUnavailable = (err: AppError) => {
    expect(err.code).toBe('provider_unavailable');
    expect(err.status).toBe(503);
    expect(err.headers['retry-after']).toBe('5');
  };

  it('answers provider_unavailable at once when the server resets connections', async () => {
    const user = await signedUp();
    const consoleError = vi.spyOn(console, 'error');
    try {
      fake.setDown(true);
      const started = Date.now();
      expectUnavailable(await rejection(provider.signUp(email(), 'correct horse')));
      expectUnavailable(await rejection(provider.signIn(user.email, 'correct horse')));
      expectUnavailable(await rejection(provider.exchange('some.token.value')));
      expectUnavailable(await rejection(provider.changePassword(user, 'correct horse', 'battery staple')));
      expectUnavailable(await rejection(provider.deleteUser(user.id)));
      expect(Date.now() - started).toBeLessThan(1000);
      // auth-js console.errors a rejected fetch; the provider answers those itself.
      expect(consoleError).not.toHaveBeenCalled();
    } finally {
      consoleError.mockRestore();
    }
  });

  it('answers provider_unavailable when nothing listens at the URL', async () => {
    const closed = await startFakeGoTrue();
    await closed.close();
    const unreachable = createSupabaseProvider({
      url: closed.url,
      anonKey: closed.anonKey,
      serviceRoleKey: closed.serviceRoleKey,
      timeoutMs: 2000,
    });
    expectUnavailable(await rejection(unreachable.signIn('a@example.test', 'correct horse')));
  });

  it('answers provider_unavailable within about timeoutMs when the server is slow', async () => {
    const timeoutMs = 300;
    const slow = createSupabaseProvider({
      url: fake.url,
      anonKey: fake.anonKey,
      serviceRoleKey: fake.serviceRoleKey,
      timeoutMs,
    });
    const user = await signedUp();
    fake.setDelayMs(3000);
    for (const call of [
      () => slow.signIn(user.email, 'correct horse'),
      () => slow.signUp(email(), 'correct horse'),
      () => slow.exchange('some.token.value'),
      () => slow.deleteUser(user.id),
    ]) {
      const started = Date.now();
      expectUnavailable(await rejection(call()));
      const elapsed = Date.now() - started;
      expect(elapsed).toBeGreaterThanOrEqual(timeoutMs - 50);
      expect(elapsed).toBeLessThan(timeoutMs + 500);
    }
  });

  it('answers provider_unavailable when Supabase refuses the service’s own keys, never a wrong password', async () => {
    const user = await signedUp();
    const wrongKeys = createSupabaseProvider({
      url: fake.url,
      anonKey: 'not-the-anon-key',
      serviceRoleKey: 'not-the-service-role-key',
      timeoutMs: 2000,
    });
    for (const attempt of [
      () => wrongKeys.signIn(user.email, 'correct horse'),
      () => wrongKeys.signUp(email(), 'correct horse'),
      () => wrongKeys.exchange('some.token.value'),
      () => wrongKeys.changePassword(user, 'correct horse', 'battery staple'),
      () => wrongKeys.deleteUser(user.id),
      () => wrongKeys.createConfirmedUser(email(), 'correct horse'),
    ]) {
      const err = await rejection(attempt());
      expectUnavailable(err);
      expect((err.cause as Error).message).toMatch(/refused the service's key \(401 Invalid API key\)/);
    }
    expect(fake.users.has(user.id)).toBe(true);
    // GoTrue's not_admin: a service-role key that is a user's token.
    fake.setFailWith({ status: 403, code: 'not_admin', message: 'User not allowed' });
    expectUnavailable(await rejection(provider.deleteUser(user.id)));
    // A user's own token refused (bad_jwt, 403) stays a plain "no".
    fake.setFailWith({ status: 403, code: 'bad_jwt', message: 'invalid JWT' });
    expect(await provider.exchange('some.token.value')).toBeUndefined();
  });

  it('answers provider_unavailable for what says nothing about the user: a wrong URL, a CAPTCHA, email sign-ins off', async () => {
    const user = await signedUp();
    for (const failure of [
      // SUPABASE_URL with a path the gateway does not know, or a proxy's 404.
      { status: 404, message: 'no Route matched with those values' },
      { status: 408, message: 'Request Timeout' },
      { status: 400, code: 'captcha_failed', message: 'captcha protection: request disallowed' },
      { status: 400, code: 'email_provider_disabled', message: 'Email logins are disabled' },
      { status: 422, code: 'something_new', message: 'Internal detail: SECRET' },
    ]) {
      fake.setFailWith(failure);
      const err = await rejection(provider.signIn(user.email, 'correct horse'));
      expectUnavailable(err);
      // The log says what Supabase said; the client does not.
      expect((err.cause as Error).message).toContain(failure.message);
      expect(err.detail).not.toContain('SECRET');
      expectUnavailable(await rejection(provider.exchange('some.token.value')));
    }
    // GoTrue's own refusals stay a plain "no", in their current and their older, code-less wording.
    for (const failure of [
      { status: 400, code: 'invalid_credentials', message: 'Invalid login credentials' },
      { status: 400, code: '', message: 'Invalid login credentials' },
    ]) {
      fake.setFailWith(failure);
      await expect(provider.signIn(user.email, 'correct horse')).resolves.toBeUndefined();
    }
    // A ban refuses the account whatever the password: a disabled account, not a wrong password.
    fake.setFailWith({ status: 400, code: 'user_banned', message: 'User is banned' });
    await expect(provider.signIn(user.email, 'correct horse')).rejects.toBeInstanceOf(AccountDisabled);
    fake.setFailWith({ status: 400, code: '', message: 'Email not confirmed' });
    expect((await rejection(provider.signIn(user.email, 'correct horse'))).code).toBe('email_not_confirmed');
  });

  it('answers provider_unavailable for a 5xx or a 429 from Supabase, not a sign-in failure', async () => {
    const user = await signedUp();
    fake.setFailWith({ status: 500 });
    expectUnavailable(await rejection(provider.signIn(user.email, 'correct horse')));
    fake.setFailWith({ status: 503, message: 'upstream down' });
    const down = await rejection(provider.exchange('some.token.value'));
    expectUnavailable(down);
    // supabase-js names a 502/503/504 `{}`: the log says what Supabase answered instead.
    expect((down.cause as Error).message).toBe('Supabase answered 503');
    fake.setFailWith({ status: 429, code: 'over_request_rate_limit', message: 'Request rate limit reached' });
    expectUnavailable(await rejection(provider.signIn(user.email, 'correct horse')));
    expectUnavailable(await rejection(provider.signUp(email(), 'correct horse')));
  });
});
