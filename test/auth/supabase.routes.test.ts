import { sql } from 'drizzle-orm';
import type { FastifyInstance, LightMyRequestResponse } from 'fastify';
import { decodeJwt } from 'jose';
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from 'vitest';
import { AppError } from '../../src/lib/errors.js';
import { atTime } from '../support/clock.js';
import { BootstrapAdminError } from '../../src/services.js';
import { buildTestApp, uniqueEmail } from '../support/app.js';
import { ownDatabase } from '../support/database.js';
import { createAdmin, login, PASSWORD, registerUser } from '../support/factories.js';
import { type FakeGoTrue, projectClient, startFakeGoTrue, supabaseEnv } from '../support/fake-gotrue.js';
import { bearer } from '../support/http.js';
import { turnOnMfa } from '../support/mfa.js';
import { captureLogs } from '../support/logs.js';
import { capturingMailer } from '../support/mail.js';

const SUPABASE_TIMEOUT_MS = 1000;

/** A 503 problem+json naming the provider, as API.md promises for a Supabase outage (never a 500). */
function expectProviderUnavailable(res: LightMyRequestResponse) {
  expect(res.statusCode, res.body).toBe(503);
  expect(res.headers['content-type']).toContain('application/problem+json');
  expect(res.json()).toMatchObject({ status: 503, code: 'provider_unavailable' });
  expect(res.headers['retry-after']).toBeDefined();
}

describe('auth through Supabase (AUTH_PROVIDER=supabase against the fake GoTrue)', () => {
  let gotrue: FakeGoTrue;
  let app: FastifyInstance;
  /** What the service mails (security notices: with Supabase, Supabase mails its own links). */
  const mailer = capturingMailer();
  const mailsTo = (email: string) => mailer.sent.filter((m) => m.to === email).map((m) => m.subject);

  /** Some other client of the same Supabase project, e.g. a frontend after a social login. */
  const outsideClient = () => projectClient(gotrue);

  const me = (accessToken: string) =>
    app.inject({ method: 'GET', url: '/v1/auth/me', headers: bearer(accessToken) });

  beforeAll(async () => {
    gotrue = await startFakeGoTrue();
    app = await buildTestApp({
      env: {
        ...supabaseEnv(gotrue),
        SUPABASE_TIMEOUT_MS: String(SUPABASE_TIMEOUT_MS),
      },
      deps: { mailer },
    });
  });

  afterEach(() => {
    gotrue.setConfirmEmail(false);
    gotrue.setDown(false);
    gotrue.setDelayMs(0);
    gotrue.setAnswerDelayMs(0);
    gotrue.setFailWith(undefined);
  });

  afterAll(async () => {
    await gotrue?.close();
  });

  it('runs on the Supabase provider', () => {
    expect(app.services.provider.name).toBe('supabase');
  });

  it('registers (201) with the local row taking the Supabase user id, then logs in and answers /me', async () => {
    const email = uniqueEmail('sb-flow');
    const reg = await app.inject({
      method: 'POST',
      url: '/v1/auth/register',
      payload: { email, password: PASSWORD, display_name: 'Grace' },
    });
    expect(reg.statusCode, reg.body).toBe(201);
    const body = reg.json();
    const supabaseUser = [...gotrue.users.values()].find((u) => u.email === email);
    expect(supabaseUser).toBeDefined();
    expect(body.user).toMatchObject({ id: supabaseUser!.id, email, status: 'active' });
    expect(body.user.email_confirmed_at).not.toBeNull();
    expect(body.session).toMatchObject({ token_type: 'Bearer', expires_in: 900 });
    expect(body.session.refresh_token).toMatch(/^prt_/);

    const row = await app.services.repos.users.findById(supabaseUser!.id);
    expect(row).toMatchObject({ email, provider: 'supabase', passwordHash: null });

    const loggedIn = await login(app, email);
    expect(loggedIn.user.id).toBe(supabaseUser!.id);
    const res = await me(loggedIn.session.access_token);
    expect(res.statusCode).toBe(200);
    expect(res.json()).toMatchObject({
      user: { id: supabaseUser!.id, email },
      roles: ['user'],
      profile: { display_name: 'Grace', user_id: supabaseUser!.id },
    });
  });

  /** Registers `email` while the local account's insert fails (503): after Supabase has answered. */
  const registerWhileInsertFails = async (email: string) => {
    const users = app.services.repos.users;
    const insert = users.insert;
    users.insert = async () => {
      throw new AppError('service_unavailable', { detail: 'injected' });
    };
    try {
      const failed = await app.inject({
        method: 'POST',
        url: '/v1/auth/register',
        payload: { email, password: PASSWORD },
      });
      expect(failed.statusCode, failed.body).toBe(503);
    } finally {
      users.insert = insert;
    }
  };

  it('a sign-up whose local account does not commit leaves no Supabase user behind, so it can be retried', async () => {
    const email = uniqueEmail('sb-orphan');
    // The database fails at the worst moment: after Supabase created the user, before ours commits.
    await registerWhileInsertFails(email);
    expect([...gotrue.users.values()].some((u) => u.email === email)).toBe(false);

    const again = await app.inject({
      method: 'POST',
      url: '/v1/auth/register',
      payload: { email, password: PASSWORD },
    });
    expect(again.statusCode, again.body).toBe(201);
    const id = again.json().user.id;
    expect(gotrue.users.get(id)?.email).toBe(email);
    expect((await login(app, email)).user.id).toBe(id);
  });

  it('a sign-up that fails here does not undo a Supabase user it did not make (an unconfirmed one of before)', async () => {
    gotrue.setConfirmEmail(true);
    const email = uniqueEmail('sb-not-ours');
    // Another app of the project signed this address up a while ago; it was never confirmed.
    const before = await outsideClient().auth.signUp({ email, password: 'another app’s password' });
    const theirs = before.data.user!.id;
    gotrue.users.get(theirs)!.createdAt = new Date(Date.now() - 10 * 60_000).toISOString();
    await registerWhileInsertFails(email);
    // Supabase answered with the user it had: still there, with its pending confirmation.
    expect(gotrue.users.get(theirs)?.email).toBe(email);
    expect(gotrue.requests.some((r) => r.method === 'DELETE' && r.path.endsWith(theirs))).toBe(false);
  });

  it('keeps the Supabase user when this database has that user after all (never deletes a live account)', async () => {
    const email = uniqueEmail('sb-known');
    const provider = app.services.provider;
    const signUp = provider.signUp;
    // The local row appears between the two steps (as after a commit whose answer was lost): the
    // registration's own insert then finds it taken, and the rollback path must leave Supabase alone.
    provider.signUp = async (...args) => {
      const result = await signUp.apply(provider, args);
      await app.services.repos.users.insert({ id: result.user.id, email, provider: 'supabase' });
      return result;
    };
    try {
      const failed = await app.inject({
        method: 'POST',
        url: '/v1/auth/register',
        payload: { email, password: PASSWORD },
      });
      expect(failed.statusCode, failed.body).toBe(409);
    } finally {
      provider.signUp = signUp;
    }
    const remote = [...gotrue.users.values()].find((u) => u.email === email);
    expect(remote).toBeDefined();
    expect((await login(app, email)).user.id).toBe(remote?.id);
  });

  it('with email confirmation on: 202 with session null, login refused until confirmed, then allowed', async () => {
    gotrue.setConfirmEmail(true);
    const email = uniqueEmail('sb-confirm');
    const reg = await app.inject({
      method: 'POST',
      url: '/v1/auth/register',
      payload: { email, password: PASSWORD },
    });
    expect(reg.statusCode, reg.body).toBe(202);
    const body = reg.json();
    expect(body.session).toBeNull();
    expect(body.user).toMatchObject({ email, email_confirmed_at: null });
    const supabaseUser = [...gotrue.users.values()].find((u) => u.email === email);
    expect(body.user.id).toBe(supabaseUser!.id);

    // The right password: said as it is, audited, and not counted toward the lockout (more tries than
    // LOGIN_MAX_FAILURES_PER_HOUR, 20, and the confirmed sign-in below still goes through).
    for (let i = 0; i < 21; i++) {
      const early = await app.inject({
        method: 'POST',
        url: '/v1/auth/login',
        payload: { email, password: PASSWORD },
      });
      expect(early.statusCode).toBe(403);
      expect(early.json().code).toBe('email_not_confirmed');
    }
    const wrong = await app.inject({
      method: 'POST',
      url: '/v1/auth/login',
      payload: { email, password: `${PASSWORD}x` },
    });
    expect(wrong.statusCode).toBe(401);
    const failures = await app.services.audit.list({
      subjectId: body.user.id,
      type: 'auth.login',
      limit: 10,
    });
    const reasons = failures.map((e) => (e.data as { reason: string }).reason);
    expect(reasons.filter((r) => r === 'wrong_password')).toHaveLength(1);
    expect(reasons.filter((r) => r === 'email_not_confirmed').length).toBeGreaterThanOrEqual(9);

    gotrue.confirm(email);
    const confirmed = await app.inject({
      method: 'POST',
      url: '/v1/auth/login',
      payload: { email, password: PASSWORD },
    });
    expect(confirmed.statusCode, confirmed.body).toBe(200);
    expect(confirmed.json().user.id).toBe(body.user.id);
    expect(confirmed.json().user.email_confirmed_at).not.toBeNull();
    expect((await me(confirmed.json().session.access_token)).statusCode).toBe(200);
  });

  it('refuses a duplicate email (409, any case), also when confirmation hides it; weak passwords never reach Supabase', async () => {
    const user = await registerUser(app, 'sb-dup');
    const dup = await app.inject({
      method: 'POST',
      url: '/v1/auth/register',
      payload: { email: user.email.toUpperCase(), password: PASSWORD },
    });
    expect(dup.statusCode).toBe(409);
    expect(dup.json().code).toBe('email_taken');

    // With confirmation on, GoTrue answers a made-up user for a confirmed address instead of an error.
    gotrue.setConfirmEmail(true);
    const hidden = await app.inject({
      method: 'POST',
      url: '/v1/auth/register',
      payload: { email: user.email, password: 'another fine passphrase' },
    });
    expect(hidden.statusCode).toBe(409);
    expect(hidden.json().code).toBe('email_taken');

    const before = gotrue.requests.length;
    const weak = await app.inject({
      method: 'POST',
      url: '/v1/auth/register',
      payload: { email: uniqueEmail('sb-weak'), password: 'password1234' },
    });
    expect(weak.statusCode).toBe(422);
    expect(weak.json().code).toBe('weak_password');
    expect(gotrue.requests.length).toBe(before);
  });

  it('answers unknown email and wrong password identically', async () => {
    const user = await registerUser(app, 'sb-creds');
    const wrong = await app.inject({
      method: 'POST',
      url: '/v1/auth/login',
      payload: { email: user.email, password: 'not the password at all' },
    });
    const unknown = await app.inject({
      method: 'POST',
      url: '/v1/auth/login',
      payload: { email: uniqueEmail('sb-ghost'), password: 'not the password at all' },
    });
    expect(wrong.statusCode).toBe(401);
    expect(unknown.statusCode).toBe(401);
    const strip = (b: Record<string, unknown>) => ({ ...b, request_id: undefined });
    expect(strip(wrong.json())).toEqual(strip(unknown.json()));
    expect(wrong.json().code).toBe('invalid_credentials');
  });

  it('sets passwords in Supabase in their NFKC form; one set as typed before still signs in, tried so only when NFKC changes it', async () => {
    const composed = 'caf\u00e9 cr\u00e8me br\u00fbl\u00e9e 42';
    const decomposed = composed.normalize('NFD');
    const signIns = () =>
      gotrue.requests.filter((r) => r.method === 'POST' && r.path === '/auth/v1/token').length;
    const attempt = (email: string, password: string) =>
      app.inject({ method: 'POST', url: '/v1/auth/login', payload: { email, password } });

    // Registered with "é" as two code points, signs in with it as one: Supabase has the NFKC form.
    const user = await registerUser(app, 'sb-nfkc', decomposed);
    expect(gotrue.users.get(user.id)?.password).toBe(composed);
    await login(app, user.email, composed);
    await login(app, user.email, decomposed);

    // A password Supabase has as it was typed, before passwords were normalised.
    const legacy = await registerUser(app, 'sb-nfkc-legacy');
    gotrue.users.get(legacy.id)!.password = decomposed;
    let before = signIns();
    await login(app, legacy.email, decomposed);
    // The NFKC form first, refused as invalid credentials, then the password as typed.
    expect(signIns() - before).toBe(2);
    // Not set again in Supabase (that would end the user's other Supabase sessions).
    expect(gotrue.users.get(legacy.id)?.password).toBe(decomposed);

    // A wrong password NFKC changes is tried in both forms; one NFKC leaves alone, once.
    before = signIns();
    expect((await attempt(legacy.email, 'wr\u00f4ng passphrase'.normalize('NFD'))).statusCode).toBe(401);
    expect(signIns() - before).toBe(2);
    before = signIns();
    expect((await attempt(legacy.email, 'a wrong passphrase')).statusCode).toBe(401);
    expect((await attempt(legacy.email, composed)).statusCode).toBe(401);
    expect(signIns() - before).toBe(2);
    // One failure each.
    const failures = (await app.services.audit.list({ subjectId: legacy.id, type: 'auth.login', limit: 50 }))
      .filter((e) => e.outcome === 'failure')
      .map((e) => (e.data as { reason?: string }).reason);
    expect(failures).toEqual(['wrong_password', 'wrong_password', 'wrong_password']);

    // The password as typed is the current one of a change, which sets the new one's NFKC form.
    const changed = await app.inject({
      method: 'POST',
      url: '/v1/auth/password',
      headers: bearer(legacy.accessToken),
      payload: { current_password: decomposed, new_password: `${decomposed} encore` },
    });
    expect(changed.statusCode, changed.body).toBe(204);
    expect(gotrue.users.get(legacy.id)?.password).toBe(`${composed} encore`);
    await login(app, legacy.email, `${composed} encore`);
  });

  it('login → me → refresh rotates; replaying the old refresh token after the grace kills the family', async () => {
    const user = await registerUser(app, 'sb-refresh');
    const session = (await login(app, user.email)).session;
    expect((await me(session.access_token)).statusCode).toBe(200);

    const first = await app.inject({
      method: 'POST',
      url: '/v1/auth/refresh',
      payload: { refresh_token: session.refresh_token },
    });
    expect(first.statusCode).toBe(200);
    const rotated = first.json().session;
    expect(rotated.refresh_token).not.toBe(session.refresh_token);
    expect((await me(rotated.access_token)).statusCode).toBe(200);

    const grace = app.services.config.tokens.reuseGraceSeconds;
    await atTime(app, new Date(Date.now() + (grace + 1) * 1000), async () => {
      const replay = await app.inject({
        method: 'POST',
        url: '/v1/auth/refresh',
        payload: { refresh_token: session.refresh_token },
      });
      expect(replay.statusCode).toBe(401);
      expect(replay.json().code).toBe('invalid_refresh_token');
    });
    const after = await app.inject({
      method: 'POST',
      url: '/v1/auth/refresh',
      payload: { refresh_token: rotated.refresh_token },
    });
    expect(after.statusCode).toBe(401);
    expect((await me(rotated.access_token)).statusCode).toBe(401);
    // The registration's own session is another family and lives on.
    expect((await me(user.accessToken)).statusCode).toBe(200);
  });

  it('logout ends the session; logout all ends every session', async () => {
    const user = await registerUser(app, 'sb-logout');
    const second = await login(app, user.email);
    const third = await login(app, user.email);
    const out = await app.inject({
      method: 'POST',
      url: '/v1/auth/logout',
      headers: bearer(user.accessToken),
    });
    expect(out.statusCode).toBe(204);
    expect((await me(user.accessToken)).statusCode).toBe(401);
    expect((await me(second.session.access_token)).statusCode).toBe(200);

    const all = await app.inject({
      method: 'POST',
      url: '/v1/auth/logout',
      headers: bearer(second.session.access_token),
      payload: { scope: 'all' },
    });
    expect(all.statusCode).toBe(204);
    for (const s of [second.session, third.session]) {
      expect((await me(s.access_token)).statusCode).toBe(401);
      const r = await app.inject({
        method: 'POST',
        url: '/v1/auth/refresh',
        payload: { refresh_token: s.refresh_token },
      });
      expect(r.statusCode).toBe(401);
    }
  });

  it('exchanges a Supabase access token of a user who never registered here for a session', async () => {
    const email = uniqueEmail('sb-social');
    const outside = outsideClient();
    const signUp = await outside.auth.signUp({ email, password: PASSWORD });
    expect(signUp.error).toBeNull();
    const supabaseId = signUp.data.user!.id;
    const signIn = await outside.auth.signInWithPassword({ email, password: PASSWORD });
    expect(signIn.error).toBeNull();
    const supabaseToken = signIn.data.session!.access_token;
    expect(await app.services.repos.users.findById(supabaseId)).toBeUndefined();

    const res = await app.inject({
      method: 'POST',
      url: '/v1/auth/exchange',
      payload: { access_token: supabaseToken },
    });
    expect(res.statusCode, res.body).toBe(200);
    // A session: never stored by a browser or a proxy (RFC 6749 §5.1).
    expect(res.headers['cache-control']).toBe('no-store');
    expect(res.headers.pragma).toBe('no-cache');
    const body = res.json();
    expect(body.user).toMatchObject({ id: supabaseId, email, status: 'active' });
    expect(body.session).toMatchObject({ token_type: 'Bearer', expires_in: 900 });
    expect(body.session.refresh_token).toMatch(/^prt_/);

    const row = await app.services.repos.users.findById(supabaseId);
    expect(row).toMatchObject({ email, provider: 'supabase' });
    expect((await app.services.repos.users.rolesAndPermissions(supabaseId)).roles).toEqual(['user']);
    const who = await me(body.session.access_token);
    expect(who.statusCode).toBe(200);
    expect(who.json()).toMatchObject({ user: { id: supabaseId }, roles: ['user'] });

    // A second exchange finds the same account; the refresh token works like any other.
    const again = await app.inject({
      method: 'POST',
      url: '/v1/auth/exchange',
      payload: { access_token: supabaseToken },
    });
    expect(again.statusCode).toBe(200);
    expect(again.json().user.id).toBe(supabaseId);
    const refreshed = await app.inject({
      method: 'POST',
      url: '/v1/auth/refresh',
      payload: { refresh_token: again.json().session.refresh_token },
    });
    expect(refreshed.statusCode).toBe(200);
  });

  it('asks for the second factor set up here at both login and exchange (two-step verification is the service’s)', async () => {
    const user = await registerUser(app, 'sb-mfa');
    // Set up with the code of the step before now: the ones after are for the sign-ins below.
    const { code } = await turnOnMfa(app, user.accessToken, () => Date.now() - 30_000);
    const next = (steps: number) => code(steps + 1);

    const password = await app.inject({
      method: 'POST',
      url: '/v1/auth/login',
      payload: { email: user.email, password: PASSWORD },
    });
    expect(password.statusCode).toBe(403);
    expect(password.json().code).toBe('mfa_required');
    const signIn = await outsideClient().auth.signInWithPassword({ email: user.email, password: PASSWORD });
    const exchanged = await app.inject({
      method: 'POST',
      url: '/v1/auth/exchange',
      payload: { access_token: signIn.data.session!.access_token },
    });
    expect(exchanged.statusCode, exchanged.body).toBe(403);
    expect(exchanged.json().code).toBe('mfa_required');
    const done = await app.inject({
      method: 'POST',
      url: '/v1/auth/mfa/verify',
      payload: { mfa_token: exchanged.json().mfa_token, code: next(0) },
    });
    expect(done.statusCode, done.body).toBe(200);
    expect(decodeJwt(done.json().session.access_token).amr).toEqual(['otp', 'mfa']);
    const viaPassword = await app.inject({
      method: 'POST',
      url: '/v1/auth/mfa/verify',
      payload: { mfa_token: password.json().mfa_token, code: next(1) },
    });
    expect(viaPassword.statusCode, viaPassword.body).toBe(200);
    expect(decodeJwt(viaPassword.json().session.access_token).amr).toEqual(['pwd', 'otp', 'mfa']);
  });

  it('holds a user with a second factor in Supabase to it at login and exchange, as Supabase does: an aal1 session opens none here', async () => {
    const user = await registerUser(app, 'sb-provider-mfa');
    gotrue.users.get(user.id)!.mfaVerified = true;
    const sessions = async () =>
      (
        await app.inject({ method: 'GET', url: '/v1/auth/sessions', headers: bearer(user.accessToken) })
      ).json().data as unknown[];
    const events = async (type: 'auth.login' | 'auth.exchange') =>
      (await app.services.audit.list({ subjectId: user.id, type, limit: 10 })).filter(
        (e) => e.outcome === 'failure',
      );
    const refused = (res: LightMyRequestResponse) => {
      expect(res.statusCode, res.body).toBe(403);
      expect(res.headers['content-type']).toContain('application/problem+json');
      expect(res.json()).toMatchObject({ code: 'provider_mfa_required' });
      expect(res.json().detail).toContain('/v1/auth/exchange');
      expect(res.json().mfa_token).toBeUndefined();
    };

    // The password alone: Supabase's own sign-in is aal1, and that is all it gives.
    const before = gotrue.requests.length;
    const password = await app.inject({
      method: 'POST',
      url: '/v1/auth/login',
      payload: { email: user.email, password: PASSWORD },
    });
    refused(password);
    // One call to GoTrue (the factors come with the user it answers); its session is signed out.
    expect(gotrue.requests.slice(before).filter((r) => r.path !== '/auth/v1/logout')).toEqual([
      { method: 'POST', path: '/auth/v1/token' },
    ]);
    expect(await events('auth.login')).toEqual([
      expect.objectContaining({ data: expect.objectContaining({ reason: 'provider_mfa_required' }) }),
    ]);

    // A token of the same aal1 sign-in, at the exchange.
    const signIn = await outsideClient().auth.signInWithPassword({ email: user.email, password: PASSWORD });
    const aal1 = signIn.data.session!.access_token;
    const exchange = (accessToken: string) =>
      app.inject({ method: 'POST', url: '/v1/auth/exchange', payload: { access_token: accessToken } });
    refused(await exchange(aal1));
    expect(await events('auth.exchange')).toEqual([
      expect.objectContaining({ data: expect.objectContaining({ reason: 'provider_mfa_required' }) }),
    ]);
    expect(await sessions()).toHaveLength(1);

    // The factor given with Supabase (aal2): the exchange opens the session.
    const exchanged = await exchange(await gotrue.giveSecondFactor(aal1));
    expect(exchanged.statusCode, exchanged.body).toBe(200);
    expect(exchanged.json().user.id).toBe(user.id);
    expect(await sessions()).toHaveLength(2);
    // Without a verified factor in Supabase (removed there), the password signs in again.
    gotrue.users.get(user.id)!.mfaVerified = false;
    await login(app, user.email);
  });

  it('an account without a password (a social login) sets up an app from a sign-in of the last 5 minutes', async () => {
    const email = uniqueEmail('sb-social-mfa');
    const client = outsideClient();
    await client.auth.signUp({ email, password: 'set before the social login took over' });
    const signIn = await client.auth.signInWithPassword({
      email,
      password: 'set before the social login took over',
    });
    // From now on the account signs in through a social provider only: Supabase keeps no password.
    gotrue.users.get(signIn.data.user!.id)!.password = null;
    const exchanged = await app.inject({
      method: 'POST',
      url: '/v1/auth/exchange',
      payload: { access_token: signIn.data.session!.access_token },
    });
    expect(exchanged.statusCode, exchanged.body).toBe(200);
    const token = exchanged.json().session.access_token;
    const enrol = (payload: Record<string, unknown>) =>
      app.inject({ method: 'POST', url: '/v1/auth/mfa/totp', headers: bearer(token), payload });
    // The session that sign-in opened stands in for the password, while it is recent.
    const sid = decodeJwt(token).sid as string;
    await app.services.db.execute(
      sql`update sessions set created_at = now() - interval '6 minutes' where id = ${sid}`,
    );
    const stale = await enrol({});
    expect(stale.statusCode).toBe(400);
    expect(stale.json().errors).toEqual([
      { field: 'body.password', message: expect.stringContaining('5 minutes') },
    ]);
    await app.services.db.execute(sql`update sessions set created_at = now() where id = ${sid}`);
    const fresh = await enrol({});
    expect(fresh.statusCode, fresh.body).toBe(201);
    // A password sign-in's session does not: its password is asked for.
    const user = await registerUser(app, 'sb-pwd-mfa');
    const withPassword = await app.inject({
      method: 'POST',
      url: '/v1/auth/mfa/totp',
      headers: bearer(user.accessToken),
      payload: {},
    });
    expect(withPassword.statusCode).toBe(400);
  });

  it('disabling a user bans them in Supabase (no sign-in there either); enabling lifts it', async () => {
    const admin = await createAdmin(app);
    const user = await registerUser(app, 'sb-ban');
    const status = (value: 'active' | 'disabled') =>
      app.inject({
        method: 'PATCH',
        url: `/v1/users/${user.id}`,
        headers: bearer(admin.accessToken),
        payload: { status: value },
      });
    expect((await status('disabled')).statusCode).toBe(200);
    expect(Date.parse(gotrue.users.get(user.id)!.bannedUntil!)).toBeGreaterThan(Date.now() + 365 * 86400_000);
    const direct = await outsideClient().auth.signInWithPassword({ email: user.email, password: PASSWORD });
    expect(direct.error?.code).toBe('user_banned');
    expect((await status('active')).statusCode).toBe(200);
    expect(gotrue.users.get(user.id)!.bannedUntil).toBeNull();
    expect((await login(app, user.email)).session.access_token).toBeTruthy();

    // Supabase down: the disable is refused (503) and nothing changed here.
    gotrue.setDown(true);
    expectProviderUnavailable(await status('disabled'));
    gotrue.setDown(false);
    expect((await app.services.repos.users.findById(user.id))?.status).toBe('active');
  });

  it('a user banned at Supabase is refused as the built-in provider refuses a disabled account: same 401, same lockout, audited `disabled`', async () => {
    const limits = { RATE_LIMIT_ENABLED: 'true', LOGIN_MAX_FAILURES_PER_HOUR: '3' };
    const builtIn = await buildTestApp({ env: limits });
    const limited = await buildTestApp({ env: { ...supabaseEnv(gotrue), ...limits } });
    try {
      /** Four sign-ins, right, wrong, right, right, each from its own address: answers and statuses. */
      const attempts = async (target: FastifyInstance, email: string) => {
        const answers: LightMyRequestResponse[] = [];
        for (const [i, password] of [PASSWORD, 'not the password at all', PASSWORD, PASSWORD].entries())
          answers.push(
            await target.inject({
              method: 'POST',
              url: '/v1/auth/login',
              remoteAddress: `10.8.${answers.length}.${i + 1}`,
              payload: { email, password },
            }),
          );
        const strip = (b: Record<string, unknown>) => ({ ...b, request_id: undefined });
        return { statuses: answers.map((a) => a.statusCode), first: strip(answers[0]!.json()) };
      };

      const local = await registerUser(builtIn, 'local-disabled');
      await builtIn.services.repos.users.update(local.id, { status: 'disabled' });
      const expected = await attempts(builtIn, local.email);
      // The built-in provider's disabled account: a wrong password's 401, counted toward the lockout.
      expect(expected.statuses).toEqual([401, 401, 401, 429]);
      expect(expected.first).toMatchObject({ code: 'invalid_credentials' });

      // Disabled here (so banned there), and banned in Supabase alone (its dashboard, say).
      const admin = await createAdmin(limited);
      const disabled = await registerUser(limited, 'sb-disabled-login');
      const patched = await limited.inject({
        method: 'PATCH',
        url: `/v1/users/${disabled.id}`,
        headers: bearer(admin.accessToken),
        payload: { status: 'disabled' },
      });
      expect(patched.statusCode, patched.body).toBe(200);
      const banned = await registerUser(limited, 'sb-banned-login');
      gotrue.users.get(banned.id)!.bannedUntil = new Date(Date.now() + 86400_000).toISOString();

      for (const user of [disabled, banned]) {
        expect(await attempts(limited, user.email)).toEqual(expected);
        const events = await limited.services.audit.list({
          subjectId: user.id,
          type: 'auth.login',
          limit: 20,
        });
        // GoTrue checks no password of a banned user: every refusal is the account's, none a guess's.
        expect(
          events.filter((e) => e.outcome === 'failure').map((e) => (e.data as { reason: string }).reason),
        ).toEqual(['locked', 'disabled', 'disabled', 'disabled']);
      }
    } finally {
      await builtIn.close();
      await limited.close();
    }
  });

  it('a disable Supabase applied but answered too late (503) leaves no ban behind; enabling an active user lifts one', async () => {
    const admin = await createAdmin(app);
    const user = await registerUser(app, 'sb-late-ban');
    const status = (value: 'active' | 'disabled') =>
      app.inject({
        method: 'PATCH',
        url: `/v1/users/${user.id}`,
        headers: bearer(admin.accessToken),
        payload: { status: value },
      });
    gotrue.setAnswerDelayMs(SUPABASE_TIMEOUT_MS + 300);
    expectProviderUnavailable(await status('disabled'));
    gotrue.setAnswerDelayMs(0);
    expect((await app.services.repos.users.findById(user.id))?.status).toBe('active');
    // The ban it applied was lifted again (that call too was applied and answered late).
    await vi.waitFor(() => expect(gotrue.users.get(user.id)!.bannedUntil ?? null).toBeNull(), {
      timeout: 3000,
    });
    expect((await login(app, user.email)).session.access_token).toBeTruthy();

    // A ban left in Supabase however it came there: enabling the (active) user lifts it.
    gotrue.users.get(user.id)!.bannedUntil = new Date(Date.now() + 86400_000).toISOString();
    const enabled = await status('active');
    expect(enabled.statusCode, enabled.body).toBe(200);
    expect(gotrue.users.get(user.id)!.bannedUntil ?? null).toBeNull();
  });

  it('two administrators deleting each other at once: one goes, the other stays, in Supabase too', async () => {
    const own = await ownDatabase('auth_sb_admins');
    const solo = await buildTestApp({
      env: {
        ...supabaseEnv(gotrue),
        SUPABASE_TIMEOUT_MS: String(SUPABASE_TIMEOUT_MS),
      },
      deps: { database: own.database },
    });
    try {
      const first = await createAdmin(solo);
      const second = await createAdmin(solo);
      // Supabase is slow to delete: both deletions are under way at once.
      gotrue.setDelayMs(300);
      const results = await Promise.all([
        solo.inject({ method: 'DELETE', url: `/v1/users/${second.id}`, headers: bearer(first.accessToken) }),
        solo.inject({ method: 'DELETE', url: `/v1/users/${first.id}`, headers: bearer(second.accessToken) }),
      ]);
      gotrue.setDelayMs(0);
      const statuses = results.map((r) => r.statusCode);
      expect(
        statuses.filter((s) => s === 204),
        statuses.join(),
      ).toHaveLength(1);
      const survivor = statuses[0] === 204 ? first : second;
      const gone = survivor === first ? second : first;
      // The refused one is the last admin, or was cut off by the other's deletion a moment before.
      expect([401, 409]).toContain(statuses[survivor === first ? 1 : 0]);
      expect(gotrue.users.has(gone.id)).toBe(false);
      expect(await solo.services.repos.users.findById(gone.id)).toBeUndefined();
      // The last administrator is whole on both sides, and signs in.
      expect(gotrue.users.has(survivor.id)).toBe(true);
      expect((await solo.services.repos.users.findById(survivor.id))?.status).toBe('active');
      expect((await solo.services.repos.users.rolesAndPermissions(survivor.id)).roles).toContain('admin');
      expect((await login(solo, survivor.email)).session.access_token).toBeTruthy();
    } finally {
      await solo.close();
      await own.dispose();
    }
  });

  it('a deletion Supabase fails leaves the account usable: enabled again, nothing deleted', async () => {
    const admin = await createAdmin(app);
    const user = await registerUser(app, 'sb-delete-fails');
    gotrue.setFailWith({ status: 500 });
    expectProviderUnavailable(
      await app.inject({ method: 'DELETE', url: `/v1/users/${user.id}`, headers: bearer(admin.accessToken) }),
    );
    gotrue.setFailWith(undefined);
    expect((await app.services.repos.users.findById(user.id))?.status).toBe('active');
    expect(gotrue.users.has(user.id)).toBe(true);
    expect((await login(app, user.email)).session.access_token).toBeTruthy();
  });

  it('a deletion Supabase refuses leaves a user disabled meanwhile (or before) disabled, never enabled again', async () => {
    const admin = await createAdmin(app);
    const status = (id: string, value: 'active' | 'disabled') =>
      app.inject({
        method: 'PATCH',
        url: `/v1/users/${id}`,
        headers: bearer(admin.accessToken),
        payload: { status: value },
      });
    const deletionOf = (id: string) => (method: string, path: string) =>
      method === 'DELETE' && path === `/auth/v1/admin/users/${id}`;
    /** The deletion `start` asks for reaches Supabase; an administrator disables the user then; it refuses. */
    const disabledWhileDeleting = async (id: string, start: () => Promise<LightMyRequestResponse>) => {
      gotrue.setFailWith({ status: 500 }, deletionOf(id));
      const held = gotrue.hold(deletionOf(id));
      const deletion = start();
      await held.arrived;
      const disabled = await status(id, 'disabled');
      expect(disabled.statusCode, disabled.body).toBe(200);
      expect(disabled.json().status).toBe('disabled');
      held.release();
      expectProviderUnavailable(await deletion);
      gotrue.setFailWith(undefined);
      expect(gotrue.users.has(id)).toBe(true);
      expect((await app.services.repos.users.findById(id))?.status).toBe('disabled');
      // Disabled as by any disable: banned in Supabase, refused here, audited as the administrator's.
      expect(Date.parse(gotrue.users.get(id)!.bannedUntil ?? '')).toBeGreaterThan(Date.now());
      expect((await loginAs(gotrue.users.get(id)!.email)).statusCode).toBe(401);
      const events = await app.services.audit.list({ subjectId: id, type: 'user.disabled', limit: 5 });
      expect(events).toHaveLength(1);
      expect(events[0]).toMatchObject({ outcome: 'success', actorId: admin.id });
    };

    // By an administrator.
    const user = await registerUser(app, 'sb-delete-disabled');
    await disabledWhileDeleting(user.id, () =>
      app.inject({ method: 'DELETE', url: `/v1/users/${user.id}`, headers: bearer(admin.accessToken) }),
    );
    // Enabling brings them back whole.
    expect((await status(user.id, 'active')).statusCode).toBe(200);
    expect(gotrue.users.get(user.id)!.bannedUntil ?? null).toBeNull();
    expect((await login(app, user.email)).session.access_token).toBeTruthy();

    // By the user themselves.
    const self = await registerUser(app, 'sb-delete-self-disabled');
    await disabledWhileDeleting(self.id, () =>
      app.inject({
        method: 'DELETE',
        url: '/v1/auth/me',
        headers: bearer(self.accessToken),
        payload: { password: PASSWORD },
      }),
    );

    // Disabled before: the refused deletion leaves them so.
    const before = await registerUser(app, 'sb-delete-was-disabled');
    expect((await status(before.id, 'disabled')).statusCode).toBe(200);
    gotrue.setFailWith({ status: 500 }, deletionOf(before.id));
    expectProviderUnavailable(
      await app.inject({
        method: 'DELETE',
        url: `/v1/users/${before.id}`,
        headers: bearer(admin.accessToken),
      }),
    );
    gotrue.setFailWith(undefined);
    expect((await app.services.repos.users.findById(before.id))?.status).toBe('disabled');
  });

  it('refuses a garbage or revoked Supabase token on /exchange (401) and a malformed body (400)', async () => {
    const garbage = await app.inject({
      method: 'POST',
      url: '/v1/auth/exchange',
      payload: { access_token: 'not.a.token' },
    });
    expect(garbage.statusCode).toBe(401);
    expect(garbage.headers['content-type']).toContain('application/problem+json');
    expect(garbage.json().code).toBe('invalid_token');

    const outside = outsideClient();
    const email = uniqueEmail('sb-revoked');
    await outside.auth.signUp({ email, password: PASSWORD });
    const signIn = await outside.auth.signInWithPassword({ email, password: PASSWORD });
    const token = signIn.data.session!.access_token;
    await outside.auth.signOut({ scope: 'global' });
    const revoked = await app.inject({
      method: 'POST',
      url: '/v1/auth/exchange',
      payload: { access_token: token },
    });
    expect(revoked.statusCode).toBe(401);

    for (const payload of [{}, { access_token: '' }, { access_token: 42 }, { access_token: 'x', extra: 1 }]) {
      const res = await app.inject({ method: 'POST', url: '/v1/auth/exchange', payload });
      expect(res.statusCode, JSON.stringify(payload)).toBe(400);
    }
  });

  it('answers 503 provider_unavailable at once when Supabase is unreachable, never a 500', async () => {
    const user = await registerUser(app, 'sb-down');
    gotrue.setDown(true);
    const started = Date.now();
    expectProviderUnavailable(
      await app.inject({
        method: 'POST',
        url: '/v1/auth/register',
        payload: { email: uniqueEmail('sb-down'), password: PASSWORD },
      }),
    );
    expectProviderUnavailable(
      await app.inject({
        method: 'POST',
        url: '/v1/auth/login',
        payload: { email: user.email, password: PASSWORD },
      }),
    );
    expectProviderUnavailable(
      await app.inject({
        method: 'POST',
        url: '/v1/auth/exchange',
        payload: { access_token: 'some.token.value' },
      }),
    );
    expectProviderUnavailable(
      await app.inject({
        method: 'POST',
        url: '/v1/auth/password',
        headers: bearer(user.accessToken),
        payload: { current_password: PASSWORD, new_password: 'a brand new passphrase' },
      }),
    );
    expect(Date.now() - started).toBeLessThan(SUPABASE_TIMEOUT_MS);

    // Sessions are ours: an outage of Supabase does not sign anybody out.
    expect((await me(user.accessToken)).statusCode).toBe(200);
    const refreshed = await app.inject({
      method: 'POST',
      url: '/v1/auth/refresh',
      payload: { refresh_token: user.refreshToken },
    });
    expect(refreshed.statusCode).toBe(200);

    gotrue.setDown(false);
    await login(app, user.email);
  });

  it('answers 503 within SUPABASE_TIMEOUT_MS when Supabase hangs', async () => {
    const user = await registerUser(app, 'sb-slow');
    gotrue.setDelayMs(SUPABASE_TIMEOUT_MS * 3);
    for (const [url, payload] of [
      ['/v1/auth/register', { email: uniqueEmail('sb-slow'), password: PASSWORD }],
      ['/v1/auth/login', { email: user.email, password: PASSWORD }],
    ] as const) {
      const started = Date.now();
      const res = await app.inject({ method: 'POST', url, payload });
      const elapsed = Date.now() - started;
      expectProviderUnavailable(res);
      expect(elapsed, url).toBeGreaterThanOrEqual(SUPABASE_TIMEOUT_MS - 50);
      expect(elapsed, url).toBeLessThan(SUPABASE_TIMEOUT_MS + 1000);
    }
  });

  /** A user who signed up at Supabase (e.g. another app of the project) and has no account here yet. */
  async function supabaseOnlyUser(tag: string) {
    const email = uniqueEmail(tag);
    const signUp = await outsideClient().auth.signUp({ email, password: PASSWORD });
    expect(signUp.error).toBeNull();
    return { email, id: signUp.data.user!.id };
  }

  const loginAs = (email: string, password = PASSWORD) =>
    app.inject({ method: 'POST', url: '/v1/auth/login', payload: { email, password } });

  it('a refusal Supabase gives its reasons for is answered in the service’s words and logged in Supabase’s', async () => {
    const { lines, logger } = captureLogs();
    const logged = await buildTestApp({
      env: {
        ...supabaseEnv(gotrue),
      },
      deps: { logger },
    });
    try {
      gotrue.setFailWith({
        status: 400,
        code: 'captcha_failed',
        message: 'captcha protection: request disallowed',
      });
      const res = await logged.inject({
        method: 'POST',
        url: '/v1/auth/register',
        payload: { email: uniqueEmail('sb-captcha'), password: PASSWORD },
      });
      expect(res.statusCode).toBe(422);
      expect(res.body).not.toContain('captcha');
      const entry = lines
        .map((l) => JSON.parse(l) as { msg: string; reqId?: string; err?: { message?: string } })
        .find((l) => l.msg === 'request refused by a dependency');
      expect(entry?.err?.message).toContain('captcha protection');
      expect(entry?.reqId).toBeTruthy();
    } finally {
      await logged.close();
    }
  });

  it('Supabase refusing the service’s own key is an outage (503, logged), never a wrong password: nothing locks', async () => {
    const user = await registerUser(app, 'sb-badkey');
    const { lines, logger } = captureLogs();
    const misconfigured = await buildTestApp({
      env: {
        AUTH_PROVIDER: 'supabase',
        SUPABASE_URL: gotrue.url,
        SUPABASE_ANON_KEY: 'a-rotated-anon-key',
        SUPABASE_SERVICE_ROLE_KEY: gotrue.serviceRoleKey,
        RATE_LIMIT_ENABLED: 'true',
        LOGIN_MAX_FAILURES_PER_HOUR: '2',
      },
      deps: { logger },
    });
    for (let i = 0; i < 4; i++) {
      expectProviderUnavailable(
        await misconfigured.inject({
          method: 'POST',
          url: '/v1/auth/login',
          remoteAddress: `10.9.0.${i + 1}`,
          payload: { email: user.email, password: PASSWORD },
        }),
      );
    }
    const logins = await misconfigured.services.audit.list({
      subjectId: user.id,
      type: 'auth.login',
      limit: 200,
    });
    expect(logins.filter((e) => e.outcome === 'failure')).toEqual([]);
    const logged = lines.map(
      (l) => JSON.parse(l) as { msg: string; level: number; reqId?: string; err?: { message?: string } },
    );
    const warned = logged.filter((l) => l.msg === 'dependency failed');
    expect(warned.length).toBeGreaterThanOrEqual(4);
    expect(warned[0]!.err?.message).toMatch(/refused the service's key.*SUPABASE_ANON_KEY/);
    // SECURITY.md: a 5xx's cause is in the log with the request id.
    expect(warned.every((l) => typeof l.reqId === 'string' && l.reqId.length > 0)).toBe(true);
    // With the right key the same account signs in: it was never locked.
    expect((await loginAs(user.email)).statusCode).toBe(200);
  });

  it('concurrent first sign-ins of a Supabase-only user all succeed, onto one local account', async () => {
    const { email, id } = await supabaseOnlyUser('sb-race');
    const answers = await Promise.all(Array.from({ length: 6 }, () => loginAs(email)));
    expect(answers.map((a) => a.statusCode)).toEqual([200, 200, 200, 200, 200, 200]);
    expect(new Set(answers.map((a) => a.json().user.id))).toEqual(new Set([id]));
    const registered = await app.services.audit.list({ subjectId: id, type: 'user.registered', limit: 200 });
    expect(registered).toHaveLength(1);
  });

  it('an account recreated in Supabase under an email an older account here holds: 409 account_conflict, audited, nothing merged', async () => {
    const old = await registerUser(app, 'sb-recreated');
    // Deleted and made again in Supabase's dashboard: a new Supabase id for the same email.
    gotrue.users.delete(old.id);
    const again = await outsideClient().auth.signUp({ email: old.email, password: 'another passphrase 9' });
    expect(again.error).toBeNull();
    const res = await loginAs(old.email, 'another passphrase 9');
    expect(res.statusCode, res.body).toBe(409);
    expect(res.json()).toMatchObject({ code: 'account_conflict' });
    expect(await app.services.repos.users.findById(again.data.user!.id)).toBeUndefined();
    expect((await app.services.repos.users.findById(old.id))?.email).toBe(old.email);
    const events = await app.services.audit.list({ type: 'auth.login', outcome: 'failure', limit: 200 });
    expect(
      events.some(
        (e) =>
          e.outcome === 'failure' &&
          (e.data as { reason?: string; provider_user_id?: string }).reason === 'account_conflict' &&
          (e.data as { provider_user_id?: string }).provider_user_id === again.data.user!.id,
      ),
    ).toBe(true);
  });

  it('a Supabase email changed to one another account here holds: 409 account_conflict, not a 500, logged with the request id', async () => {
    const { lines, logger } = captureLogs('warn');
    const logged = await buildTestApp({
      env: {
        ...supabaseEnv(gotrue),
      },
      deps: { logger },
    });
    const stale = await registerUser(logged, 'sb-stale');
    const mover = await registerUser(logged, 'sb-mover');
    gotrue.users.delete(stale.id);
    gotrue.users.get(mover.id)!.email = stale.email;
    const res = await logged.inject({
      method: 'POST',
      url: '/v1/auth/login',
      payload: { email: stale.email, password: PASSWORD },
    });
    expect(res.statusCode, res.body).toBe(409);
    expect(res.json()).toMatchObject({ code: 'account_conflict' });
    expect((await logged.services.repos.users.findById(mover.id))?.email).toBe(mover.email);
    const warning = lines
      .map((l) => JSON.parse(l) as { msg: string; reqId?: string; providerUserId?: string })
      .find((l) => l.msg.startsWith('the identity provider and this service disagree about an account'));
    expect(warning).toMatchObject({ reqId: res.headers['x-request-id'], providerUserId: mover.id });
  });

  it('changes addresses in Supabase, not here (404 naming updateUser); the next sign-in brings the new one', async () => {
    const user = await registerUser(app, 'sb-moving');
    const asked = await app.inject({
      method: 'POST',
      url: '/v1/auth/email/change',
      headers: bearer(user.accessToken),
      payload: { new_email: uniqueEmail('sb-moved'), password: PASSWORD },
    });
    expect(asked.statusCode).toBe(404);
    expect(asked.json().detail).toContain('auth.updateUser');
    // Invitations go through Supabase too.
    const admin = await createAdmin(app);
    const invited = await app.inject({
      method: 'POST',
      url: '/v1/users',
      headers: bearer(admin.accessToken),
      payload: { email: uniqueEmail('sb-invited') },
    });
    expect(invited.statusCode).toBe(404);
    expect(invited.json().detail).toContain('inviteUserByEmail');
    // Sign-in links too (supabase-js signInWithOtp, then /v1/auth/exchange).
    for (const url of ['/v1/auth/magic-link', '/v1/auth/magic-link/verify']) {
      const link = await app.inject({
        method: 'POST',
        url,
        payload: url.endsWith('verify') ? { token: 'pml_x' } : { email: user.email },
      });
      expect(link.statusCode, url).toBe(404);
      expect(link.json().detail, url).toContain('signInWithOtp');
    }
    // The frontend changed it through supabase-js, and Supabase confirmed it.
    const moved = uniqueEmail('sb-moved');
    gotrue.users.get(user.id)!.email = moved;
    const res = await loginAs(moved);
    expect(res.statusCode, res.body).toBe(200);
    expect(res.json().user).toMatchObject({ id: user.id, email: moved });
    expect((await me(user.accessToken)).json().user.email).toBe(moved);
    // The user's activity shows the change, as theirs.
    const activity = await app.inject({
      method: 'GET',
      url: '/v1/auth/activity?limit=5',
      headers: bearer(user.accessToken),
    });
    expect(activity.statusCode, activity.body).toBe(200);
    expect(activity.json().data).toContainEqual(
      expect.objectContaining({ type: 'user.email_changed', outcome: 'success', by: 'you' }),
    );
    const events = await app.services.audit.list({
      subjectId: user.id,
      type: 'user.email_changed',
      limit: 5,
    });
    expect(events.map((e) => e.data)).toEqual([
      { via: 'provider', old_email_domain: 'example.test', new_email_domain: 'example.test' },
    ]);
  });

  it('checks a password against the address the user changed to in Supabase since signing in here, not a wrong password', async () => {
    const admin = await createAdmin(app);
    /** A signed-in user who then changed their address through supabase-js (confirmed there). */
    const movedUser = async (tag: string) => {
      const user = await registerUser(app, tag);
      const moved = uniqueEmail(`${tag}-new`);
      gotrue.users.get(user.id)!.email = moved;
      return { ...user, moved };
    };
    const wrongPasswordEvents = async (userId: string) =>
      (await app.services.audit.list({ subjectId: userId, outcome: 'failure', limit: 10 })).filter(
        (e) => e.data.reason === 'wrong_password',
      );

    const changing = await movedUser('sb-moved-pw');
    const changed = await app.inject({
      method: 'POST',
      url: '/v1/auth/password',
      headers: bearer(changing.accessToken),
      payload: { current_password: PASSWORD, new_password: 'a brand new passphrase 77' },
    });
    expect(changed.statusCode, changed.body).toBe(204);
    expect((await me(changing.accessToken)).json().user.email).toBe(changing.moved);
    expect(gotrue.users.get(changing.id)!.password).toBe('a brand new passphrase 77');
    expect(await wrongPasswordEvents(changing.id)).toEqual([]);

    const enrolling = await movedUser('sb-moved-mfa');
    const enrol = await app.inject({
      method: 'POST',
      url: '/v1/auth/mfa/totp',
      headers: bearer(enrolling.accessToken),
      payload: { password: PASSWORD },
    });
    expect(enrol.statusCode, enrol.body).toBe(201);
    expect(await wrongPasswordEvents(enrolling.id)).toEqual([]);

    const leaving = await movedUser('sb-moved-delete');
    const deleted = await app.inject({
      method: 'DELETE',
      url: '/v1/auth/me',
      headers: bearer(leaving.accessToken),
      payload: { password: PASSWORD },
    });
    expect(deleted.statusCode, deleted.body).toBe(204);
    expect(gotrue.users.has(leaving.id)).toBe(false);

    // An administrator's reset link goes to the address the user has now.
    const locked = await movedUser('sb-moved-reset');
    const asked = await app.inject({
      method: 'POST',
      url: `/v1/users/${locked.id}/password-reset`,
      headers: bearer(admin.accessToken),
    });
    expect(asked.statusCode, asked.body).toBe(204);
    expect(gotrue.recoveries.filter((r) => r.userId === locked.id).map((r) => r.email)).toEqual([
      locked.moved,
    ]);
  });

  it('a sign-up the project does not allow is 403 registration_closed, in the service’s own words', async () => {
    const started = new Date();
    gotrue.setFailWith({
      status: 422,
      code: 'signup_disabled',
      message: 'Signups not allowed for this instance',
    });
    const res = await app.inject({
      method: 'POST',
      url: '/v1/auth/register',
      payload: { email: uniqueEmail('sb-closed'), password: PASSWORD },
    });
    expect(res.statusCode, res.body).toBe(403);
    expect(res.json()).toMatchObject({ code: 'registration_closed', detail: 'Sign-up is closed' });
    // A policy of the provider's, not an authorization decision: no authorization.denied event.
    const denied = await app.services.audit.list({
      type: 'authorization.denied',
      since: started,
      limit: 200,
    });
    expect(denied.filter((e) => (e.data as { route?: string }).route === '/v1/auth/register')).toEqual([]);
    gotrue.setFailWith({ status: 400, code: 'something_new', message: 'Internal detail: SECRET' });
    const odd = await app.inject({
      method: 'POST',
      url: '/v1/auth/register',
      payload: { email: uniqueEmail('sb-odd'), password: PASSWORD },
    });
    expect(odd.statusCode).toBe(422);
    expect(odd.body).not.toContain('SECRET');
  });

  describe('the bootstrap admin', () => {
    const bootstrapEnv = (email: string) => ({
      ...supabaseEnv(gotrue),
      BOOTSTRAP_ADMIN_EMAIL: email,
      BOOTSTRAP_ADMIN_PASSWORD: 'bootstrap passphrase 42',
    });
    // The bootstrap runs only on a database without an admin: each test has a database of its own.
    const disposals: Array<() => Promise<void>> = [];
    afterEach(async () => {
      for (const dispose of disposals.splice(0)) await dispose();
    });
    const boot = async (env: Record<string, string>) => {
      const own = await ownDatabase('auth_bootstrap');
      const booted = await buildTestApp({ env, deps: { database: own.database, bootstrapRetryMs: 50 } });
      disposals.push(async () => {
        await booted.close();
        await own.dispose();
      });
      return booted;
    };
    const rolesOf = async (on: FastifyInstance, email: string) => {
      const row = await on.services.repos.users.findByEmail(email);
      return row ? (await on.services.repos.users.rolesAndPermissions(row.id)).roles : undefined;
    };

    it('is created confirmed, so they sign in at once even while the project asks sign-ups to confirm', async () => {
      gotrue.setConfirmEmail(true);
      const email = uniqueEmail('sb-boot');
      const booted = await boot(bootstrapEnv(email));
      expect(await rolesOf(booted, email)).toEqual(expect.arrayContaining(['admin']));
      const res = await booted.inject({
        method: 'POST',
        url: '/v1/auth/login',
        payload: { email, password: 'bootstrap passphrase 42' },
      });
      expect(res.statusCode, res.body).toBe(200);
    });

    it('already in Supabase (a new database on an existing project): its local account is made, and made admin', async () => {
      const email = uniqueEmail('sb-boot-existing');
      const signUp = await outsideClient().auth.signUp({ email, password: 'bootstrap passphrase 42' });
      expect(signUp.error).toBeNull();
      const booted = await boot(bootstrapEnv(email));
      const row = await booted.services.repos.users.findByEmail(email);
      expect(row?.id).toBe(signUp.data.user!.id);
      expect(await rolesOf(booted, email)).toEqual(expect.arrayContaining(['admin', 'user']));
    });

    it('already in Supabase with an unconfirmed address: the start stops with one message naming BOOTSTRAP_ADMIN_EMAIL', async () => {
      gotrue.setConfirmEmail(true);
      const email = uniqueEmail('sb-boot-unconfirmed');
      const signUp = await outsideClient().auth.signUp({ email, password: 'bootstrap passphrase 42' });
      expect(signUp.error).toBeNull();
      const own = await ownDatabase('auth_bootstrap');
      try {
        const failure = await buildTestApp({
          env: bootstrapEnv(email),
          deps: { database: own.database, bootstrapRetryMs: 50 },
        }).then(
          () => undefined,
          (err: unknown) => err,
        );
        expect(failure).toBeInstanceOf(BootstrapAdminError);
        expect((failure as Error).message).toBe(
          `the bootstrap admin (BOOTSTRAP_ADMIN_EMAIL ${email}) cannot be made: Confirm your email address first: follow the link mailed to it when you registered`,
        );
      } finally {
        await own.dispose();
      }
    });

    it('named alone (a social-login account, no password): made admin when Supabase confirmed its address; otherwise the start stops, naming what would prove it', async () => {
      const { BOOTSTRAP_ADMIN_PASSWORD: _, ...emailOnly } = bootstrapEnv('');
      const withAccount = async (tag: string) => {
        const email = uniqueEmail(tag);
        const signUp = await outsideClient().auth.signUp({ email, password: 'bootstrap passphrase 42' });
        expect(signUp.error).toBeNull();
        const own = await ownDatabase('auth_bootstrap');
        disposals.push(() => own.dispose());
        // Its local account, made by its first sign-in here.
        const before = await buildTestApp({
          env: { ...emailOnly, BOOTSTRAP_ADMIN_EMAIL: '' },
          deps: { database: own.database },
        });
        await login(before, email, 'bootstrap passphrase 42');
        await before.close();
        return { email, own };
      };
      const confirmed = await withAccount('sb-boot-alone');
      const booted = await buildTestApp({
        env: { ...emailOnly, BOOTSTRAP_ADMIN_EMAIL: confirmed.email },
        deps: { database: confirmed.own.database },
      });
      disposals.unshift(() => booted.close());
      expect(await rolesOf(booted, confirmed.email)).toEqual(expect.arrayContaining(['admin', 'user']));

      const unconfirmed = await withAccount('sb-boot-alone-unconfirmed');
      await unconfirmed.own.database.db.execute(
        sql`update users set email_confirmed_at = null where email = ${unconfirmed.email}`,
      );
      const failure = await buildTestApp({
        env: { ...emailOnly, BOOTSTRAP_ADMIN_EMAIL: unconfirmed.email },
        deps: { database: unconfirmed.own.database },
      }).then(
        () => undefined,
        (err: unknown) => err,
      );
      expect(failure).toBeInstanceOf(BootstrapAdminError);
      expect((failure as Error).message).toContain('address is not confirmed');
      expect((failure as Error).message).not.toContain('is not its password');
    });

    it('Supabase down at start does not keep the service down: the admin is made once it answers', async () => {
      const email = uniqueEmail('sb-boot-down');
      gotrue.setDown(true);
      const booted = await boot(bootstrapEnv(email));
      expect((await booted.inject({ method: 'GET', url: '/health/ready' })).statusCode).toBe(200);
      expect(await rolesOf(booted, email)).toBeUndefined();
      gotrue.setDown(false);
      await expect
        .poll(() => rolesOf(booted, email), { timeout: 5000, interval: 50 })
        .toEqual(expect.arrayContaining(['admin']));
    });
  });

  it('changes the password through Supabase, ending the other sessions but not this one', async () => {
    const user = await registerUser(app, 'sb-password');
    const other = await login(app, user.email);
    const wrong = await app.inject({
      method: 'POST',
      url: '/v1/auth/password',
      headers: bearer(user.accessToken),
      payload: { current_password: 'wrong wrong wrong', new_password: 'a brand new passphrase' },
    });
    expect(wrong.statusCode).toBe(400);
    expect(wrong.json().code).toBe('incorrect_password');

    const res = await app.inject({
      method: 'POST',
      url: '/v1/auth/password',
      headers: bearer(user.accessToken),
      payload: { current_password: PASSWORD, new_password: 'a brand new passphrase' },
    });
    expect(res.statusCode, res.body).toBe(204);
    expect(gotrue.users.get(user.id)?.password).toBe('a brand new passphrase');
    expect((await me(user.accessToken)).statusCode).toBe(200);
    expect((await me(other.session.access_token)).statusCode).toBe(401);

    const old = await app.inject({
      method: 'POST',
      url: '/v1/auth/login',
      payload: { email: user.email, password: PASSWORD },
    });
    expect(old.statusCode).toBe(401);
    await login(app, user.email, 'a brand new passphrase');
  });

  it('a new password too short or too common is 422 with Supabase down too: checked before Supabase is asked', async () => {
    const user = await registerUser(app, 'sb-password-weak');
    gotrue.setDown(true);
    const calls = gotrue.requests.length;
    for (const weak of ['short', 'password123']) {
      const res = await app.inject({
        method: 'POST',
        url: '/v1/auth/password',
        headers: bearer(user.accessToken),
        payload: { current_password: PASSWORD, new_password: weak },
      });
      expect(res.statusCode, res.body).toBe(422);
      expect(res.json()).toMatchObject({ code: 'weak_password', errors: [{ field: 'body.new_password' }] });
    }
    // The address itself is no password either: checked against the one Supabase has, once it answers.
    gotrue.setDown(false);
    const own = await app.inject({
      method: 'POST',
      url: '/v1/auth/password',
      headers: bearer(user.accessToken),
      payload: { current_password: PASSWORD, new_password: user.email },
    });
    expect(own.statusCode, own.body).toBe(422);
    expect(gotrue.requests.slice(calls).some((r) => r.path === '/auth/v1/token')).toBe(false);
  });

  it('a change Supabase applied but answered too late is a 503 that still ends the other sessions, and tells the owner', async () => {
    const user = await registerUser(app, 'sb-password-late');
    const other = await login(app, user.email);
    // The sign-in with the current password answers; the update is applied, and answered too late.
    gotrue.setAnswerDelayMs(
      SUPABASE_TIMEOUT_MS + 300,
      (method, path) => method === 'PUT' && path.endsWith('/user'),
    );
    const res = await app.inject({
      method: 'POST',
      url: '/v1/auth/password',
      headers: bearer(user.accessToken),
      payload: { current_password: PASSWORD, new_password: 'a late new passphrase' },
    });
    expectProviderUnavailable(res);
    await vi.waitFor(() => expect(gotrue.users.get(user.id)?.password).toBe('a late new passphrase'));
    // Whoever held the other session does not keep it through a change the owner asked for.
    expect((await me(other.session.access_token)).statusCode).toBe(401);
    expect((await me(user.accessToken)).statusCode).toBe(200);
    const [event] = await app.services.audit.list({
      subjectId: user.id,
      type: 'auth.password_changed',
      limit: 1,
    });
    expect(event).toMatchObject({
      outcome: 'failure',
      data: { reason: 'provider_unavailable', other_sessions_ended: true },
    });
    // The notice a change sends, saying the password may have changed (it did).
    expect(mailsTo(user.email)).toEqual(['Your password may have been changed']);
    const notice = mailer.sent.find((m) => m.to === user.email)!;
    expect(notice.text).toContain('may be in effect already, and every other session was signed out');
    expect(notice.text).toContain('If it was not you, reset your password');
  });

  it('a change Supabase refused without applying it (a 429) is a 503 that leaves the other sessions', async () => {
    const user = await registerUser(app, 'sb-password-429');
    const other = await login(app, user.email);
    gotrue.setFailWith(
      { status: 429, code: 'over_request_rate_limit', message: 'Request rate limit reached' },
      (method, path) => method === 'PUT' && path.endsWith('/user'),
    );
    const res = await app.inject({
      method: 'POST',
      url: '/v1/auth/password',
      headers: bearer(user.accessToken),
      payload: { current_password: PASSWORD, new_password: 'a throttled new passphrase' },
    });
    expectProviderUnavailable(res);
    expect(gotrue.users.get(user.id)?.password).toBe(PASSWORD);
    expect((await me(other.session.access_token)).statusCode).toBe(200);
    // Nothing changed: nothing to tell.
    expect(mailsTo(user.email)).toEqual([]);
  });

  it('a change Supabase keeps for a second factor enrolled there (insufficient_aal) is a 403 saying so, logged as such; nothing changed, ended or mailed', async () => {
    const { lines, logger } = captureLogs();
    const logged = await buildTestApp({ env: supabaseEnv(gotrue), deps: { logger, mailer } });
    try {
      const user = await registerUser(logged, 'sb-password-aal');
      const other = await login(logged, user.email);
      // An MFA factor the user verified in Supabase (through supabase-js, in another app of the project).
      gotrue.users.get(user.id)!.mfaVerified = true;
      const change = () =>
        logged.inject({
          method: 'POST',
          url: '/v1/auth/password',
          headers: bearer(user.accessToken),
          payload: { current_password: PASSWORD, new_password: 'a second-factor passphrase' },
        });
      const expectSecondFactorThere = (res: LightMyRequestResponse) => {
        expect(res.statusCode, res.body).toBe(403);
        expect(res.headers['content-type']).toContain('application/problem+json');
        expect(res.json()).toMatchObject({ status: 403, code: 'provider_mfa_required' });
        expect(res.json().detail).toMatch(/second factor.*Nothing was changed/);
        expect(res.headers['retry-after']).toBeUndefined();
      };
      const calls = gotrue.requests.length;
      expectSecondFactorThere(await change());
      // Supabase was asked (and refused, 401 insufficient_aal, as GoTrue's UserUpdate does).
      expect(gotrue.requests.slice(calls).some((r) => r.method === 'PUT' && r.path === '/auth/v1/user')).toBe(
        true,
      );
      // The status some versions and gateways answer it with: the code says what it is.
      gotrue.setFailWith(
        {
          status: 403,
          code: 'insufficient_aal',
          message: 'AAL2 session is required to update email or password when MFA is enabled.',
        },
        (method, path) => method === 'PUT' && path === '/auth/v1/user',
      );
      expectSecondFactorThere(await change());
      gotrue.setFailWith(undefined);

      // Nothing changed: the password, the other session, no notice.
      expect(gotrue.users.get(user.id)!.password).toBe(PASSWORD);
      const otherMe = await logged.inject({
        method: 'GET',
        url: '/v1/auth/me',
        headers: bearer(other.session.access_token),
      });
      expect(otherMe.statusCode).toBe(200);
      expect(mailsTo(user.email)).toEqual([]);
      const events = await logged.services.audit.list({
        subjectId: user.id,
        type: 'auth.password_changed',
        limit: 10,
      });
      expect(events.map((e) => [e.outcome, e.data])).toEqual([
        ['failure', { reason: 'provider_mfa_required' }],
        ['failure', { reason: 'provider_mfa_required' }],
      ]);
      // Logged for what it is, with the request id: no outage, no refused key.
      const entries = lines.map(
        (l) => JSON.parse(l) as { msg: string; reqId?: string; err?: { message?: string } },
      );
      expect(entries.filter((l) => l.msg === 'dependency failed')).toEqual([]);
      const refused = entries.filter((l) => l.msg === 'request refused by a dependency');
      expect(refused).toHaveLength(2);
      for (const entry of refused) {
        expect(entry.err?.message).toMatch(/insufficient_aal.*verified MFA factor in Supabase/);
        expect(entry.reqId).toBeTruthy();
      }
      // The password was right: the refusals locked nothing; the change goes through once the factor is gone.
      gotrue.users.get(user.id)!.mfaVerified = false;
      expect((await change()).statusCode).toBe(204);
    } finally {
      await logged.close();
    }
  });

  it('a user banned at Supabase who gives their password again (deleting the account, a new password, an app) is answered as a disabled account: 401, audited `disabled`, counted toward the lockout', async () => {
    const limited = await buildTestApp({
      env: { ...supabaseEnv(gotrue), RATE_LIMIT_ENABLED: 'true', LOGIN_MAX_FAILURES_PER_HOUR: '3' },
    });
    try {
      const user = await registerUser(limited, 'sb-banned-reauth');
      // Banned in Supabase alone (its dashboard, say): the session here stands, the password is right.
      gotrue.users.get(user.id)!.bannedUntil = new Date(Date.now() + 86400_000).toISOString();
      const asks = [
        { method: 'DELETE', url: '/v1/auth/me', payload: { password: PASSWORD }, action: 'user.deleted' },
        {
          method: 'POST',
          url: '/v1/auth/password',
          payload: { current_password: PASSWORD, new_password: 'a banned new passphrase' },
          action: 'auth.password_changed',
        },
        {
          method: 'POST',
          url: '/v1/auth/mfa/totp',
          payload: { password: PASSWORD },
          action: 'mfa.setup_started',
        },
      ] as const;
      const ask = (i: number, { method, url, payload }: (typeof asks)[number]) =>
        limited.inject({
          method,
          url,
          remoteAddress: `10.7.${i}.1`,
          headers: bearer(user.accessToken),
          payload,
        });
      for (const [i, a] of asks.entries()) {
        const res = await ask(i, a);
        // As an exchange of a banned user's token is answered, not as a wrong password.
        expect(res.statusCode, `${a.method} ${a.url}: ${res.body}`).toBe(401);
        expect(res.json()).toMatchObject({ code: 'invalid_token', detail: 'The account is disabled' });
      }
      // Each counted, as a login of the account is: the fourth is refused for the lockout.
      expect((await ask(3, asks[1])).statusCode).toBe(429);
      for (const a of asks) {
        const events = await limited.services.audit.list({ subjectId: user.id, type: a.action, limit: 10 });
        expect(
          events.filter((e) => e.outcome === 'failure').map((e) => (e.data as { reason: string }).reason),
          a.action,
        ).toEqual(a.action === 'auth.password_changed' ? ['locked', 'disabled'] : ['disabled']);
      }
      // Nothing done: the account is here, its password at Supabase as it was.
      expect(await limited.services.repos.users.findById(user.id)).toBeDefined();
      expect(gotrue.users.get(user.id)!.password).toBe(PASSWORD);
    } finally {
      await limited.close();
    }
  });
});

describe('exchange on the local provider', () => {
  let app: FastifyInstance;
  beforeAll(async () => {
    app = await buildTestApp();
  });

  it('answers 404: /v1/auth/exchange exists only with AUTH_PROVIDER=supabase', async () => {
    expect(app.services.provider.name).toBe('local');
    const res = await app.inject({
      method: 'POST',
      url: '/v1/auth/exchange',
      payload: { access_token: 'some.token.value' },
    });
    expect(res.statusCode).toBe(404);
    expect(res.headers['content-type']).toContain('application/problem+json');
    expect(res.json().code).toBe('not_found');
  });
});
