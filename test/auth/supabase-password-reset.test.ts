import type { FastifyInstance, LightMyRequestResponse } from 'fastify';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { buildTestApp, uniqueEmail } from '../support/app.js';
import { createAdmin, login, PASSWORD, registerUser, setUserStatus } from '../support/factories.js';
import { type FakeGoTrue, projectClient, startFakeGoTrue, supabaseEnv } from '../support/fake-gotrue.js';
import { bearer } from '../support/http.js';
import { capturingMailer } from '../support/mail.js';

const NEW_PASSWORD = 'a fresh and long passphrase';
const RESET_URL = 'https://app.example.test/reset-password';
const RESET_TTL = 1800;

/** A 503 problem+json naming the provider, as for any other Supabase outage (never a 500). */
function expectProviderUnavailable(res: LightMyRequestResponse) {
  expect(res.statusCode, res.body).toBe(503);
  expect(res.headers['content-type']).toContain('application/problem+json');
  expect(res.json()).toMatchObject({ status: 503, code: 'provider_unavailable' });
  expect(res.headers['retry-after']).toBeDefined();
}

function expectInvalidResetToken(res: LightMyRequestResponse) {
  expect(res.statusCode, res.body).toBe(400);
  expect(res.headers['content-type']).toContain('application/problem+json');
  expect(res.json()).toMatchObject({
    code: 'invalid_reset_token',
    errors: [{ field: 'body.token', message: 'is invalid, expired or used' }],
  });
}

const resetEnv = (gotrue: FakeGoTrue) => ({
  ...supabaseEnv(gotrue),
  SUPABASE_TIMEOUT_MS: '1000',
  PASSWORD_RESET_URL: RESET_URL,
  PASSWORD_RESET_TTL: String(RESET_TTL),
});

describe('password reset through Supabase (AUTH_PROVIDER=supabase against the fake GoTrue)', () => {
  let gotrue: FakeGoTrue;
  let app: FastifyInstance;
  /** What the service mails itself (the notices; Supabase mails its links). */
  const mailer = capturingMailer();
  const noticesTo = (email: string) => mailer.sent.filter((m) => m.to === email).map((m) => m.subject);

  /** Some other client of the same Supabase project, e.g. the frontend. */
  const outsideClient = (flowType: 'implicit' | 'pkce' = 'implicit') => projectClient(gotrue, flowType);

  beforeAll(async () => {
    gotrue = await startFakeGoTrue();
    app = await buildTestApp({ env: resetEnv(gotrue), deps: { mailer } });
  });

  afterEach(() => {
    gotrue.setDown(false);
    gotrue.setFailWith(undefined);
    gotrue.setAnswerDelayMs(0);
  });

  afterAll(async () => {
    await gotrue?.close();
  });

  const forgot = (email: string) =>
    app.inject({ method: 'POST', url: '/v1/auth/password/forgot', payload: { email } });
  const reset = (token: string, newPassword = NEW_PASSWORD) =>
    app.inject({
      method: 'POST',
      url: '/v1/auth/password/reset',
      payload: { token, new_password: newPassword },
    });
  const loginAs = (email: string, password: string) =>
    app.inject({ method: 'POST', url: '/v1/auth/login', payload: { email, password } });
  const refresh = (refreshToken: string) =>
    app.inject({ method: 'POST', url: '/v1/auth/refresh', payload: { refresh_token: refreshToken } });
  const recoveriesOf = (email: string) => gotrue.recoveries.filter((r) => r.email === email);
  const recoverCalls = () => gotrue.requests.filter((r) => r.path === '/auth/v1/recover').length;
  const since = () => new Date(Date.now() - 1000);
  /** The user's `auth.password_reset` events since `from`. */
  const resetEvents = (userId: string, from: Date) =>
    app.services.audit.list({ subjectId: userId, type: 'auth.password_reset', since: from, limit: 10 });

  /** What the user does: asks for a link here, then opens the one Supabase mailed. */
  async function recoveryToken(
    email: string,
    options?: { openedSecondsAgo?: number; secondFactor?: boolean },
  ) {
    const res = await forgot(email);
    expect(res.statusCode, res.body).toBe(204);
    return gotrue.completeRecovery(email, options);
  }

  it('asks Supabase to mail its recovery link, leading to PASSWORD_RESET_URL; a second request within a minute is 204 too and sends nothing', async () => {
    const from = since();
    const user = await registerUser(app, 'sbr-forgot');
    const res = await forgot(`  ${user.email.toUpperCase()} `);
    expect(res.statusCode, res.body).toBe(204);
    expect(recoveriesOf(user.email)).toEqual([
      expect.objectContaining({
        userId: user.id,
        redirectTo: RESET_URL,
        // The link must carry the session in the fragment, for the page: no code to exchange.
        flow: 'implicit',
        state: 'sent',
      }),
    ]);

    // GoTrue answers a second request within its SMTP_MAX_FREQUENCY 429: a link is on its way already.
    const again = await forgot(user.email);
    expect(again.statusCode, again.body).toBe(204);
    expect(recoveriesOf(user.email)).toHaveLength(1);

    const events = await app.services.audit.list({
      subjectId: user.id,
      type: 'auth.password_reset_requested',
      since: from,
      limit: 10,
    });
    expect(events.map((e) => [e.outcome, e.data])).toEqual([
      ['failure', expect.objectContaining({ reason: 'too_soon' })],
      ['success', expect.objectContaining({ delivery: 'supabase', email_domain: 'example.test' })],
    ]);
  });

  it('answers an unknown address 204 like a known one, and Supabase mails nothing', async () => {
    const email = uniqueEmail('sbr-nobody');
    const before = gotrue.recoveries.length;
    const res = await forgot(email);
    expect(res.statusCode, res.body).toBe(204);
    expect(gotrue.recoveries.length).toBe(before);
  });

  it('sends nothing to Supabase for a disabled account; a link it mailed before does not reset', async () => {
    const admin = await createAdmin(app);
    const user = await registerUser(app, 'sbr-disabled');
    const token = await recoveryToken(user.email);
    expect((await setUserStatus(app, admin.accessToken, user.id, 'disabled')).statusCode).toBe(200);

    const calls = recoverCalls();
    const res = await forgot(user.email);
    expect(res.statusCode, res.body).toBe(204);
    expect(recoverCalls()).toBe(calls);
    expect(recoveriesOf(user.email)).toHaveLength(1);

    const from = since();
    expectInvalidResetToken(await reset(token));
    const events = await resetEvents(user.id, from);
    expect(events).toEqual([expect.objectContaining({ outcome: 'failure', data: { reason: 'disabled' } })]);
    // The password at Supabase is what it was.
    expect((await setUserStatus(app, admin.accessToken, user.id, 'active')).statusCode).toBe(200);
    await login(app, user.email, PASSWORD);
  });

  it('an administrator’s reset link for a disabled user is 409 whether Supabase is up or down: decided here, nothing asked of Supabase', async () => {
    const admin = await createAdmin(app);
    const user = await registerUser(app, 'sbr-admin-disabled');
    expect((await setUserStatus(app, admin.accessToken, user.id, 'disabled')).statusCode).toBe(200);
    const ask = () =>
      app.inject({
        method: 'POST',
        url: `/v1/users/${user.id}/password-reset`,
        headers: bearer(admin.accessToken),
      });
    const from = since();
    const calls = gotrue.requests.length;
    const up = await ask();
    expect(up.statusCode, up.body).toBe(409);
    expect(up.json()).toMatchObject({ code: 'conflict', detail: 'The user is disabled: enable them first' });
    gotrue.setDown(true);
    const down = await ask();
    expect(down.statusCode, down.body).toBe(409);
    expect(down.json()).toMatchObject({
      code: 'conflict',
      detail: 'The user is disabled: enable them first',
    });
    gotrue.setDown(false);
    expect(gotrue.requests.slice(calls)).toEqual([]);
    const events = await app.services.audit.list({
      subjectId: user.id,
      type: 'auth.password_reset_requested',
      since: from,
      limit: 10,
    });
    const refusal = { outcome: 'failure', data: expect.objectContaining({ reason: 'disabled' }) };
    expect(events).toEqual([expect.objectContaining(refusal), expect.objectContaining(refusal)]);
    expect(recoveriesOf(user.email)).toEqual([]);
  });

  it('resets with the recovery session’s access token: the new password signs in, the old does not, every session ended, audited; the token works once', async () => {
    const from = since();
    const user = await registerUser(app, 'sbr-reset');
    const other = await login(app, user.email);
    const token = await recoveryToken(user.email);
    expect(JSON.parse(Buffer.from(token.split('.')[1]!, 'base64url').toString()).amr).toEqual([
      { method: 'otp', timestamp: expect.any(Number) },
    ]);

    const done = await reset(token);
    expect(done.statusCode, done.body).toBe(204);
    // Supabase ended every session of the user, the recovery session among them.
    expect(gotrue.activeSessions(user.id)).toBe(0);
    expect((await loginAs(user.email, PASSWORD)).statusCode).toBe(401);
    await login(app, user.email, NEW_PASSWORD);
    // Every session here ended too.
    await expectSignedOutHere(user, other);

    const events = await resetEvents(user.id, from);
    expect(events).toEqual([
      expect.objectContaining({
        outcome: 'success',
        actorId: user.id,
        data: expect.objectContaining({ provider: 'supabase' }),
      }),
    ]);

    // Once only: the recovery session was signed out.
    expectInvalidResetToken(await reset(token, 'yet another long passphrase'));
    await login(app, user.email, NEW_PASSWORD);
  });

  it('ends the recovery session even when it read the token and then refused the account', async () => {
    // The token is read, then refused for what the new password is (the email itself): signed out.
    const user = await registerUser(app, 'sbr-signout');
    const token = await recoveryToken(user.email);
    const res = await reset(token, user.email);
    expect(res.statusCode).toBe(422);
    expect(res.json().errors).toEqual([
      { field: 'body.new_password', message: 'is a commonly used password' },
    ]);
    // GoTrue's 403 session_not_found, which auth-js turns into an AuthSessionMissingError.
    const who = await outsideClient().auth.getUser(token);
    expect(who.error?.name).toBe('AuthSessionMissingError');
    expectInvalidResetToken(await reset(token));
    await login(app, user.email, PASSWORD);
  });

  it('refuses a password-login access token: a session opened with the password is no licence to skip it', async () => {
    const user = await registerUser(app, 'sbr-pwtoken');
    const signIn = await outsideClient().auth.signInWithPassword({ email: user.email, password: PASSWORD });
    expect(signIn.error).toBeNull();
    const token = signIn.data.session!.access_token;
    expectInvalidResetToken(await reset(token));
    // Nothing changed, and the session was not touched.
    await login(app, user.email, PASSWORD);
    expect((await outsideClient().auth.getUser(token)).error).toBeNull();
  });

  it('refuses a recovery session opened longer than PASSWORD_RESET_TTL ago', async () => {
    const user = await registerUser(app, 'sbr-late');
    const token = await recoveryToken(user.email, { openedSecondsAgo: RESET_TTL + 60 });
    // Still a valid Supabase session (the access token lives an hour), but too old for a reset.
    expect((await outsideClient().auth.getUser(token)).error).toBeNull();
    expectInvalidResetToken(await reset(token));
    await login(app, user.email, PASSWORD);
  });

  it('takes a recovery session of the PKCE flow (amr recovery) too', async () => {
    const user = await registerUser(app, 'sbr-pkce');
    const { error } = await outsideClient('pkce').auth.resetPasswordForEmail(user.email, {
      redirectTo: RESET_URL,
    });
    expect(error).toBeNull();
    expect(recoveriesOf(user.email)).toEqual([expect.objectContaining({ flow: 'pkce' })]);
    const token = await gotrue.completeRecovery(user.email);
    expect(JSON.parse(Buffer.from(token.split('.')[1]!, 'base64url').toString()).amr[0].method).toBe(
      'recovery',
    );
    expect((await reset(token)).statusCode).toBe(204);
    await login(app, user.email, NEW_PASSWORD);
  });

  it('holds a user with a second factor in Supabase to it, as GoTrue does: the mailbox alone resets nothing', async () => {
    const from = since();
    const user = await registerUser(app, 'sbr-mfa');
    const other = await login(app, user.email);
    gotrue.users.get(user.id)!.mfaVerified = true;
    // Their own Supabase refuses the new password from this (aal1) recovery session.
    const token = await recoveryToken(user.email);
    const refused = await reset(token);
    expect(refused.statusCode, refused.body).toBe(403);
    expect(refused.headers['content-type']).toContain('application/problem+json');
    expect(refused.json()).toMatchObject({ code: 'provider_mfa_required' });
    // Nothing changed: the password (at Supabase: a login here asks for the factor), the sessions here,
    // and the recovery session (to give the factor on).
    const signIn = (email: string, password: string) =>
      outsideClient().auth.signInWithPassword({ email, password });
    expect((await signIn(user.email, PASSWORD)).error).toBeNull();
    expect((await refresh(other.session.refresh_token)).statusCode).toBe(200);
    expect((await outsideClient().auth.getUser(token)).error).toBeNull();
    expect(await resetEvents(user.id, from)).toEqual([
      expect.objectContaining({ outcome: 'failure', data: { reason: 'provider_mfa_required' } }),
    ]);
    // A recovery session the factor was given on (aal2) resets, as Supabase would let it.
    const stepping = await registerUser(app, 'sbr-mfa-aal2');
    gotrue.users.get(stepping.id)!.mfaVerified = true;
    const done = await reset(await recoveryToken(stepping.email, { secondFactor: true }));
    expect(done.statusCode, done.body).toBe(204);
    expect((await signIn(stepping.email, NEW_PASSWORD)).error).toBeNull();
  });

  it('refuses garbage and foreign tokens with 400', async () => {
    for (const token of ['', 'not-a-jwt', 'a.b.c', 'prs_abc'])
      expect((await reset(token)).statusCode).toBe(400);
  });

  it('refuses a weak new password with 422 naming body.new_password, and keeps the link for a better one', async () => {
    const user = await registerUser(app, 'sbr-weak');
    const token = await recoveryToken(user.email);
    const common = await reset(token, 'password');
    expect(common.statusCode).toBe(422);
    expect(common.headers['content-type']).toContain('application/problem+json');
    expect(common.json()).toMatchObject({
      code: 'weak_password',
      errors: [{ field: 'body.new_password', message: 'is a commonly used password' }],
    });
    const short = await reset(token, 'short');
    expect(short.statusCode).toBe(422);
    expect(short.json().errors).toEqual([
      { field: 'body.new_password', message: 'must be 8 to 128 characters' },
    ]);
    // Neither used the link up: the recovery session stands, and resets.
    expect((await outsideClient().auth.getUser(token)).error).toBeNull();
    expect((await reset(token)).statusCode).toBe(204);
    await login(app, user.email, NEW_PASSWORD);
  });

  it('resets a user Supabase knows and this database does not yet; their first sign-in creates the row', async () => {
    const email = uniqueEmail('sbr-remote');
    const signUp = await outsideClient().auth.signUp({ email, password: PASSWORD });
    expect(signUp.error).toBeNull();
    const token = await recoveryToken(email);
    expect((await reset(token)).statusCode).toBe(204);
    expect((await loginAs(email, PASSWORD)).statusCode).toBe(401);
    const session = await login(app, email, NEW_PASSWORD);
    expect(session.user.id).toBe(signUp.data.user!.id);
  });

  it('answers 503 with Retry-After on both endpoints while Supabase is down, never a 500; the link survives the outage', async () => {
    const user = await registerUser(app, 'sbr-down');
    const token = await recoveryToken(user.email);
    const other = await registerUser(app, 'sbr-down-other');

    gotrue.setDown(true);
    expectProviderUnavailable(await forgot(other.email));
    expectProviderUnavailable(await reset(token));
    gotrue.setDown(false);

    gotrue.setFailWith({ status: 500 });
    expectProviderUnavailable(await forgot(other.email));
    expectProviderUnavailable(await reset(token));
    gotrue.setFailWith({
      status: 429,
      code: 'over_request_rate_limit',
      message: 'Request rate limit reached',
    });
    expectProviderUnavailable(await forgot(other.email));
    gotrue.setFailWith(undefined);

    expect(recoveriesOf(other.email)).toHaveLength(0);
    expect((await reset(token)).statusCode).toBe(204);
    await login(app, user.email, NEW_PASSWORD);
  });

  const setPasswordCall = (method: string, path: string) =>
    method === 'PUT' && path.startsWith('/auth/v1/admin/users/');

  /** The user's sessions here have ended: neither refresh token refreshes, the access token is refused. */
  async function expectSignedOutHere(
    user: { refreshToken: string; accessToken: string },
    other: { session: { refresh_token: string } },
  ) {
    for (const refreshToken of [user.refreshToken, other.session.refresh_token])
      expect((await refresh(refreshToken)).statusCode).toBe(401);
    const me = await app.inject({
      method: 'GET',
      url: '/v1/auth/me',
      headers: { authorization: `Bearer ${user.accessToken}` },
    });
    expect(me.statusCode).toBe(401);
  }

  /**
   * A reset Supabase did not answer: 503, every session here ended, audited as a failed reset, and the
   * owner told the password may have been reset.
   */
  async function expectUnansweredReset(
    res: LightMyRequestResponse,
    user: { id: string; email: string; refreshToken: string; accessToken: string },
    other: { session: { refresh_token: string } },
    from: Date,
  ) {
    expectProviderUnavailable(res);
    expect(res.json().detail).toMatch(/may be in effect already/);
    await expectSignedOutHere(user, other);
    const events = await resetEvents(user.id, from);
    expect(events).toEqual([
      expect.objectContaining({
        outcome: 'failure',
        data: expect.objectContaining({ reason: 'provider_unavailable', sessions_ended: true }),
      }),
    ]);
    // The reset's notice, through the same outbox, saying it may have happened.
    expect(noticesTo(user.email)).toEqual(['Your password may have been reset']);
    const notice = mailer.sent.find((m) => m.to === user.email)!;
    expect(notice.text).toContain('may be in effect already, and every session was signed out');
    expect(notice.text).toContain('If it was not you, someone can read your mail');
  }

  it('ends every session when Supabase answers the new password too late (it set it), audited as a failed reset, and tells the owner', async () => {
    const from = since();
    const user = await registerUser(app, 'sbr-late-answer');
    const other = await login(app, user.email);
    const token = await recoveryToken(user.email);
    gotrue.setAnswerDelayMs(1500, setPasswordCall);
    await expectUnansweredReset(await reset(token), user, other, from);
    gotrue.setAnswerDelayMs(0);
    // Supabase did set it: the new password is the one that signs in.
    expect(gotrue.users.get(user.id)!.password).toBe(NEW_PASSWORD);
    await login(app, user.email, NEW_PASSWORD);
  });

  it('ends every session when Supabase answers the new password 500, tells the owner it may be reset, and keeps the link for another try', async () => {
    const from = since();
    const user = await registerUser(app, 'sbr-500-answer');
    const other = await login(app, user.email);
    const token = await recoveryToken(user.email);
    gotrue.setFailWith({ status: 500 }, setPasswordCall);
    await expectUnansweredReset(await reset(token), user, other, from);
    gotrue.setFailWith(undefined);
    // Nothing was set, and the link was not used up: it resets once Supabase answers.
    expect((await reset(token)).statusCode).toBe(204);
    expect(noticesTo(user.email)).toEqual(['Your password may have been reset', 'Your password was reset']);
    expect((await loginAs(user.email, PASSWORD)).statusCode).toBe(401);
    await login(app, user.email, NEW_PASSWORD);
  });
});

describe('password reset through Supabase with a stricter password policy there', () => {
  it('answers Supabase refusing the new password 422 naming body.new_password, and changes nothing', async () => {
    const gotrue = await startFakeGoTrue({ minPasswordLength: 12 });
    try {
      const app = await buildTestApp({ env: resetEnv(gotrue) });
      const email = uniqueEmail('sbr-policy');
      const signUp = await app.inject({
        method: 'POST',
        url: '/v1/auth/register',
        payload: { email, password: PASSWORD },
      });
      expect(signUp.statusCode, signUp.body).toBe(201);
      const user = signUp.json().user as { id: string };
      const forgot = await app.inject({
        method: 'POST',
        url: '/v1/auth/password/forgot',
        payload: { email },
      });
      expect(forgot.statusCode).toBe(204);
      const token = await gotrue.completeRecovery(email);
      // Long enough here (8), too short for this Supabase project (12).
      const res = await app.inject({
        method: 'POST',
        url: '/v1/auth/password/reset',
        payload: { token, new_password: 'tangerine9' },
      });
      expect(res.statusCode, res.body).toBe(422);
      expect(res.json()).toMatchObject({ code: 'weak_password', errors: [{ field: 'body.new_password' }] });
      expect(gotrue.users.get(user.id)?.password).toBe(PASSWORD);
      await login(app, email, PASSWORD);
    } finally {
      await gotrue.close();
    }
  });
});
