import { createHmac } from 'node:crypto';
import { sql } from 'drizzle-orm';
import { selectRows } from '../../src/db/client.js';
import type { FastifyInstance } from 'fastify';
import { beforeAll, describe, expect, it, vi } from 'vitest';
import type { MailMessage } from '../../src/lib/mailer.js';
import { capturingMailer } from '../support/mail.js';
import { grantRole } from '../api-keys/helpers.js';
import { createClient } from '../clients/helpers.js';
import { startMfaSetUp, totpAt, turnOnMfa } from '../support/mfa.js';
import { buildTestApp, testConfig, uniqueEmail } from '../support/app.js';
import { createTestClock } from '../support/clock.js';
import { createAdmin, login, PASSWORD, registerUser, setUserStatus } from '../support/factories.js';

const NEW_PASSWORD = 'a fresh and long passphrase';
const RESET_URL = 'https://app.example.test/reset-password';

/** The reset mails sent to `email` (registration sends a confirmation mail too). */
const resetMailsTo = (mailer: { sent: MailMessage[] }, email: string) =>
  mailer.sent.filter((m) => m.to === email && m.subject === 'Reset your password');

/** The token of the newest reset mail to `email`, read out of its link. */
function tokenMailedTo(mailer: { sent: MailMessage[] }, email: string): string {
  const mail = resetMailsTo(mailer, email).at(-1);
  expect(mail, `a reset mail to ${email}`).toBeDefined();
  const link = /https:\/\/app\.example\.test\/reset-password#token=(prs_[0-9A-Za-z_]+)/.exec(mail!.text);
  expect(link, mail!.text).not.toBeNull();
  return link![1]!;
}

describe('password reset (built-in provider)', () => {
  let app: FastifyInstance;
  const mailer = capturingMailer();
  const clock = createTestClock();

  beforeAll(async () => {
    app = await buildTestApp({
      env: { PASSWORD_RESET_URL: RESET_URL, PASSWORD_RESET_TTL: '1800' },
      deps: { mailer, clock },
    });
  });

  const forgot = (email: string) =>
    app.inject({ method: 'POST', url: '/v1/auth/password/forgot', payload: { email } });
  const reset = (token: string, newPassword = NEW_PASSWORD) =>
    app.inject({
      method: 'POST',
      url: '/v1/auth/password/reset',
      payload: { token, new_password: newPassword },
    });
  const since = () => new Date(clock.nowMs() - 1000);
  /** The code an authenticator app with this secret shows now (the app's clock: `clock`). */
  const totpCode = (secret: string) => totpAt(secret, clock.nowMs());

  it('mails a link whose token sets a new password once, ends every session and is audited', async () => {
    const from = since();
    const user = await registerUser(app, 'reset');
    const other = await login(app, user.email);
    expect((await forgot(`  ${user.email.toUpperCase()} `)).statusCode).toBe(204);
    const mail = resetMailsTo(mailer, user.email).at(-1)!;
    expect(mail).toMatchObject({ to: user.email, subject: 'Reset your password' });
    expect(mail.text).toContain('within 30 minutes');
    const token = tokenMailedTo(mailer, user.email);
    // SECURITY.md: at least 128 random bits, stored only as HMAC-SHA-256 under the pepper.
    expect(token).toMatch(/^prs_[0-9A-Za-z]{12}_[0-9A-Za-z]{43}[0-9A-Za-z]{6}$/);
    const [stored] = await selectRows<{ token_hash: string }>(
      app.services.db,
      sql`select token_hash from email_tokens where user_id = ${user.id} and purpose = 'password_reset'`,
    );
    expect(stored?.token_hash).toBe(
      createHmac('sha256', testConfig().secretPepper).update(token).digest('base64url'),
    );

    const done = await reset(token);
    expect(done.statusCode, done.body).toBe(204);
    // The old password is gone, the new one signs in.
    const old = await app.inject({
      method: 'POST',
      url: '/v1/auth/login',
      payload: { email: user.email, password: PASSWORD },
    });
    expect(old.statusCode).toBe(401);
    await login(app, user.email, NEW_PASSWORD);
    // Every session ended: refresh tokens and access tokens of before stop working.
    for (const refresh of [user.refreshToken, other.session.refresh_token]) {
      const res = await app.inject({
        method: 'POST',
        url: '/v1/auth/refresh',
        payload: { refresh_token: refresh },
      });
      expect(res.statusCode).toBe(401);
    }
    const me = await app.inject({
      method: 'GET',
      url: '/v1/auth/me',
      headers: { authorization: `Bearer ${user.accessToken}` },
    });
    expect(me.statusCode).toBe(401);
    // The account's address is told, once the answer has gone.
    await vi.waitFor(() =>
      expect(
        mailer.sent.filter((m) => m.to === user.email && m.subject === 'Your password was reset'),
      ).toHaveLength(1),
    );
    // Once only.
    const again = await reset(token, 'yet another long passphrase');
    expect(again.statusCode).toBe(400);
    expect(again.headers['content-type']).toContain('application/problem+json');
    expect(again.json()).toMatchObject({
      code: 'invalid_reset_token',
      errors: [{ field: 'body.token', message: 'is invalid, expired or used' }],
    });

    const events = await app.services.audit.list({ subjectId: user.id, since: from, limit: 50 });
    expect(events.find((e) => e.type === 'auth.password_reset_requested')).toMatchObject({
      outcome: 'success',
      data: { delivery: 'smtp', email_domain: 'example.test' },
    });
    expect(events.find((e) => e.type === 'auth.password_reset' && e.outcome === 'success')).toMatchObject({
      actorId: user.id,
    });
  });

  it('answers an unknown address as a known one, sends nothing and audits the attempt', async () => {
    const email = uniqueEmail('nobody');
    const res = await forgot(email);
    expect(res.statusCode).toBe(204);
    expect(res.body).toBe('');
    expect(mailer.sent.filter((m) => m.to === email)).toEqual([]);
    // Found by the request's id: other files' events of the type may be newer (their clocks run ahead).
    const events = await selectRows<{ outcome: string; data: { reason?: string } }>(
      app.services.db,
      sql`select outcome, data from audit_events where type = 'auth.password_reset_requested'
          and request_id = ${String(res.headers['x-request-id'])}`,
    );
    expect(events).toEqual([
      { outcome: 'failure', data: expect.objectContaining({ reason: 'unknown_email' }) },
    ]);
  });

  it('sends one mail a minute per account, and a newer link replaces the older', async () => {
    const user = await registerUser(app, 'reset-twice');
    expect((await forgot(user.email)).statusCode).toBe(204);
    const first = tokenMailedTo(mailer, user.email);
    const count = () => resetMailsTo(mailer, user.email).length;
    expect((await forgot(user.email)).statusCode).toBe(204);
    expect(count()).toBe(1);
    clock.advance(61);
    expect((await forgot(user.email)).statusCode).toBe(204);
    expect(count()).toBe(2);
    const second = tokenMailedTo(mailer, user.email);
    expect(second).not.toBe(first);
    expect((await reset(first)).statusCode).toBe(400);
    expect((await reset(second)).statusCode).toBe(204);
  });

  it('refuses a link mailed to an address the account has left, even one written as the change committed', async () => {
    const user = await registerUser(app, 'reset-moved');
    expect((await forgot(user.email)).statusCode).toBe(204);
    const token = tokenMailedTo(mailer, user.email);
    // The change committed without seeing this link (it was written a moment after the change's
    // discard of the account's links): the address moves, the link stays.
    const moved = uniqueEmail('reset-moved-to');
    await app.services.db.execute(sql`UPDATE users SET email = ${moved} WHERE id = ${user.id}`);
    const res = await reset(token);
    expect(res.statusCode, res.body).toBe(400);
    expect(res.json().code).toBe('invalid_reset_token');
    // The password is the account's own still.
    await login(app, moved);
  });

  it('refuses a token past its lifetime', async () => {
    const user = await registerUser(app, 'reset-late');
    await forgot(user.email);
    const token = tokenMailedTo(mailer, user.email);
    clock.advance(1801);
    expect((await reset(token)).json()).toMatchObject({ code: 'invalid_reset_token' });
    await login(app, user.email, PASSWORD);
  });

  it('refuses a weak new password with 422 and keeps the token for a better one', async () => {
    const user = await registerUser(app, 'reset-weak');
    await forgot(user.email);
    const token = tokenMailedTo(mailer, user.email);
    const weak = await reset(token, 'password');
    expect(weak.statusCode).toBe(422);
    expect(weak.json().errors).toEqual([
      { field: 'body.new_password', message: 'is a commonly used password' },
    ]);
    const same = await reset(token, user.email);
    expect(same.statusCode).toBe(422);
    expect((await reset(token)).statusCode).toBe(204);
  });

  it('refuses malformed tokens and bodies with 400, naming the field', async () => {
    for (const token of [
      '',
      'prs_short',
      'x'.repeat(8193),
      `prs_${'a'.repeat(12)}_${'b'.repeat(43)}zzzzzz`,
    ]) {
      const res = await reset(token);
      expect(res.statusCode, token.slice(0, 20)).toBe(400);
      expect(res.headers['content-type']).toContain('application/problem+json');
    }
    const extra = await app.inject({
      method: 'POST',
      url: '/v1/auth/password/reset',
      payload: { token: 'prs_x', new_password: NEW_PASSWORD, email: 'a@b.c' },
    });
    expect(extra.statusCode).toBe(400);
    const noEmail = await app.inject({ method: 'POST', url: '/v1/auth/password/forgot', payload: {} });
    expect(noEmail.statusCode).toBe(400);
    expect(noEmail.json().errors[0].field).toBe('body.email');
    const badEmail = await forgot('not-an-address');
    expect(badEmail.statusCode).toBe(400);
  });

  it('lets exactly one of concurrent resets with one token through', async () => {
    const user = await registerUser(app, 'reset-race');
    await forgot(user.email);
    const token = tokenMailedTo(mailer, user.email);
    const answers = await Promise.all(
      Array.from({ length: 6 }, (_, i) => reset(token, `concurrent passphrase number ${i}`)),
    );
    const statuses = answers.map((a) => a.statusCode).sort();
    expect(statuses).toEqual([204, 400, 400, 400, 400, 400]);
    const winner = answers.findIndex((a) => a.statusCode === 204);
    await login(app, user.email, `concurrent passphrase number ${winner}`);
  });

  it('sends one mail and keeps one live link for concurrent requests', async () => {
    const user = await registerUser(app, 'reset-burst');
    clock.advance(61);
    const answers = await Promise.all(Array.from({ length: 10 }, () => forgot(user.email)));
    expect(answers.map((a) => a.statusCode)).toEqual(Array(10).fill(204));
    expect(resetMailsTo(mailer, user.email).length).toBe(1);
    const [live] = await selectRows<{ n: number }>(
      app.services.db,
      sql`select count(*)::int as n from email_tokens where user_id = ${user.id} and purpose = 'password_reset' and used_at is null`,
    );
    expect(live?.n).toBe(1);
  });

  it('the reset that first proves the mailbox ends the API keys and acting clients made before it', async () => {
    const admin = await createAdmin(app);
    // Someone registers the address before its owner does, and makes a key (pre-hijacking).
    const squatter = await registerUser(app, 'reset-squatted');
    const key = await app.inject({
      method: 'POST',
      url: '/v1/api-keys',
      headers: { authorization: `Bearer ${squatter.accessToken}` },
      payload: { name: 'backdoor', scopes: ['account:read', 'account:write'] },
    });
    expect(key.statusCode, key.body).toBe(201);
    const withKey = { 'x-api-key': key.json().key as string };
    expect((await app.inject({ method: 'GET', url: '/v1/auth/me', headers: withKey })).statusCode).toBe(200);
    // And a client acting for the account.
    await grantRole(app, squatter.id, ['clients:write', 'clients:read']);
    const client = await createClient(app, (await login(app, squatter.email)).session.access_token, {
      scopes: [],
    });
    // The owner resets the password through their mailbox: the key goes with the sessions.
    clock.advance(61);
    await forgot(squatter.email);
    expect((await reset(tokenMailedTo(mailer, squatter.email))).statusCode).toBe(204);
    expect((await app.inject({ method: 'GET', url: '/v1/auth/me', headers: withKey })).statusCode).toBe(401);
    const events = await app.services.audit.list({
      type: 'api_key.revoked',
      subjectId: key.json().id,
      limit: 5,
    });
    expect(events[0]?.data).toMatchObject({ reason: 'first_mailbox_proof' });
    // The client is disabled, audited under its UUID as every client event is.
    const disabled = await app.services.audit.list({
      type: 'client.updated',
      subjectId: client.id,
      limit: 5,
    });
    expect(disabled[0]?.data).toMatchObject({ status: 'disabled', reason: 'first_mailbox_proof' });

    // A later reset, of an address already proven, leaves the owner's keys alone.
    const own = await app.inject({
      method: 'POST',
      url: '/v1/api-keys',
      headers: {
        authorization: `Bearer ${(await login(app, squatter.email, NEW_PASSWORD)).session.access_token}`,
      },
      payload: { name: 'mine', scopes: ['account:read'] },
    });
    clock.advance(61);
    await forgot(squatter.email);
    expect((await reset(tokenMailedTo(mailer, squatter.email), 'a third long passphrase')).statusCode).toBe(
      204,
    );
    expect(
      (await app.inject({ method: 'GET', url: '/v1/auth/me', headers: { 'x-api-key': own.json().key } }))
        .statusCode,
    ).toBe(200);
    expect(admin.id).toBeTruthy();
  });

  it('a second factor needs a proven address; one set up before it is removed by the reset that proves it', async () => {
    const squatter = await registerUser(app, 'reset-squatted-mfa');
    const headers = { authorization: `Bearer ${squatter.accessToken}` };
    // Someone who registered an address they do not hold cannot lock its owner out with their app.
    const refused = await app.inject({
      method: 'POST',
      url: '/v1/auth/mfa/totp',
      headers,
      payload: { password: PASSWORD },
    });
    expect(refused.statusCode).toBe(403);
    expect(refused.json().code).toBe('email_not_confirmed');
    // One set up while the service could not confirm addresses (no SMTP_URL then) goes at the first proof.
    await app.services.repos.users.update(squatter.id, { emailConfirmedAt: new Date() });
    await turnOnMfa(app, squatter.accessToken, clock.nowMs);
    await app.services.repos.users.update(squatter.id, { emailConfirmedAt: null });
    const signIn = (password: string) =>
      app.inject({ method: 'POST', url: '/v1/auth/login', payload: { email: squatter.email, password } });
    expect((await signIn(PASSWORD)).json().code).toBe('mfa_required');
    clock.advance(61);
    await forgot(squatter.email);
    expect((await reset(tokenMailedTo(mailer, squatter.email))).statusCode).toBe(204);
    const owner = await signIn(NEW_PASSWORD);
    expect(owner.statusCode, owner.body).toBe(200);
    const events = await app.services.audit.list({ type: 'mfa.disabled', subjectId: squatter.id, limit: 5 });
    expect(events[0]?.data).toMatchObject({ reason: 'first_mailbox_proof' });
    await vi.waitFor(() =>
      expect(
        mailer.sent.some((m) => m.to === squatter.email && m.subject === 'Two-step verification is off'),
      ).toBe(true),
    );
  });

  it('a set-up never confirmed goes with the first proof too, and is told of as nothing turned off', async () => {
    const squatter = await registerUser(app, 'reset-squatted-pending');
    await app.services.repos.users.update(squatter.id, { emailConfirmedAt: new Date() });
    await startMfaSetUp(app, squatter.accessToken);
    await app.services.repos.users.update(squatter.id, { emailConfirmedAt: null });
    clock.advance(61);
    await forgot(squatter.email);
    expect((await reset(tokenMailedTo(mailer, squatter.email))).statusCode).toBe(204);
    expect(await app.services.mfa.status(squatter.id)).toMatchObject({ enabled: false, pending: false });
    expect(await app.services.audit.list({ type: 'mfa.disabled', subjectId: squatter.id, limit: 5 })).toEqual(
      [],
    );
    await app.services.outbox?.idle();
    const subjects = mailer.sent.filter((m) => m.to === squatter.email).map((m) => m.subject);
    expect(subjects).toContain('Your password was reset');
    expect(subjects).not.toContain('Two-step verification is off');
  });

  it('the owner’s own second factor survives a reset, which ends the guesser’s sign-ins; notices are mailed', async () => {
    const user = await registerUser(app, 'reset-mfa-owner');
    await app.services.repos.users.update(user.id, { emailConfirmedAt: new Date() });
    const { secret } = await turnOnMfa(app, user.accessToken, clock.nowMs);
    await vi.waitFor(() =>
      expect(
        mailer.sent.some((m) => m.to === user.email && m.subject === 'Two-step verification is on'),
      ).toBe(true),
    );
    clock.advance(30);
    // Someone with the password sends wrong codes until the factor locks.
    const challenge = async (password: string) =>
      (
        await app.inject({ method: 'POST', url: '/v1/auth/login', payload: { email: user.email, password } })
      ).json().mfa_token as string;
    const stolen = await challenge(PASSWORD);
    const wrong = () => String((Number(totpCode(secret)) + 500_000) % 1_000_000).padStart(6, '0');
    let last = 0;
    for (let i = 0; i < 6; i++) {
      last = (
        await app.inject({
          method: 'POST',
          url: '/v1/auth/mfa/verify',
          payload: { mfa_token: stolen, code: wrong() },
        })
      ).statusCode;
    }
    expect(last).toBe(429);
    // The owner resets through their mailbox: the guesser's waiting sign-in ends with the old
    // password, and the lock runs its course (a reset is no fresh allowance of guesses for whoever
    // holds the mailbox); the factor stays.
    await forgot(user.email);
    expect((await reset(tokenMailedTo(mailer, user.email))).statusCode).toBe(204);
    const mine = await challenge(NEW_PASSWORD);
    const verify = (token: string) =>
      app.inject({
        method: 'POST',
        url: '/v1/auth/mfa/verify',
        payload: { mfa_token: token, code: totpCode(secret) },
      });
    expect((await verify(mine)).statusCode).toBe(429);
    clock.advance(61);
    expect((await verify(stolen)).statusCode).toBe(401);
    const done = await verify(mine);
    expect(done.statusCode, done.body).toBe(200);
    // Turned off by an administrator: the user hears of it.
    const admin = await createAdmin(app);
    const off = await app.inject({
      method: 'DELETE',
      url: `/v1/users/${user.id}/mfa`,
      headers: { authorization: `Bearer ${admin.accessToken}` },
    });
    expect(off.statusCode).toBe(204);
    await vi.waitFor(() =>
      expect(
        mailer.sent.find((m) => m.to === user.email && m.subject === 'Two-step verification is off')?.text,
      ).toContain('by an administrator'),
    );
  });

  it('sends nothing to a disabled account, and a link mailed before the disable stops working', async () => {
    const admin = await createAdmin(app);
    const user = await registerUser(app, 'reset-disabled');
    await forgot(user.email);
    const token = tokenMailedTo(mailer, user.email);
    expect((await setUserStatus(app, admin.accessToken, user.id, 'disabled')).statusCode).toBe(200);
    clock.advance(61);
    const before = resetMailsTo(mailer, user.email).length;
    expect((await forgot(user.email)).statusCode).toBe(204);
    expect(resetMailsTo(mailer, user.email).length).toBe(before);
    expect((await reset(token)).statusCode).toBe(400);
    // Enabled again, the old link still does not reset: disabling voided it.
    expect((await setUserStatus(app, admin.accessToken, user.id, 'active')).statusCode).toBe(200);
    expect((await reset(token)).statusCode).toBe(400);
    expect((await forgot(user.email)).statusCode).toBe(204);
    expect((await reset(tokenMailedTo(mailer, user.email))).statusCode).toBe(204);
  });

  it('voids links already mailed when the password is changed with the current one', async () => {
    const user = await registerUser(app, 'reset-changed');
    await forgot(user.email);
    const token = tokenMailedTo(mailer, user.email);
    const changed = await app.inject({
      method: 'POST',
      url: '/v1/auth/password',
      headers: { authorization: `Bearer ${user.accessToken}` },
      payload: { current_password: PASSWORD, new_password: NEW_PASSWORD },
    });
    expect(changed.statusCode).toBe(204);
    expect((await reset(token, 'an attacker passphrase here')).statusCode).toBe(400);
    await login(app, user.email, NEW_PASSWORD);
    // The account's address is told (the notice goes after the answer).
    await vi.waitFor(() =>
      expect(
        mailer.sent.filter((m) => m.to === user.email && m.subject === 'Your password was changed'),
      ).toHaveLength(1),
    );
  });

  it('lets an administrator have a reset link mailed to a user, never seeing it; audited', async () => {
    const admin = await createAdmin(app);
    const user = await registerUser(app, 'reset-by-admin');
    const send = (id: string, token = admin.accessToken) =>
      app.inject({
        method: 'POST',
        url: `/v1/users/${id}/password-reset`,
        headers: { authorization: `Bearer ${token}` },
      });
    const res = await send(user.id);
    expect(res.statusCode, res.body).toBe(204);
    expect(res.body).toBe('');
    expect((await reset(tokenMailedTo(mailer, user.email))).statusCode).toBe(204);
    const events = await app.services.audit.list({
      type: 'auth.password_reset_requested',
      subjectId: user.id,
      limit: 5,
    });
    expect(events[0]).toMatchObject({ actorId: admin.id, data: { by_administrator: true } });

    // A second within the minute, a disabled user, an unknown one, a caller without users:write.
    const again = await send(user.id);
    expect(again.statusCode).toBe(409);
    expect(again.json().detail).toContain('less than a minute ago');
    expect((await setUserStatus(app, admin.accessToken, user.id, 'disabled')).statusCode).toBe(200);
    clock.advance(61);
    expect((await send(user.id)).json()).toMatchObject({
      status: 409,
      detail: 'The user is disabled: enable them first',
    });
    expect((await send('00000000-0000-4000-8000-000000000000')).statusCode).toBe(404);
    const other = await registerUser(app, 'reset-by-nobody');
    expect((await send(other.id, other.accessToken)).statusCode).toBe(403);
  });

  it('answers 204 when the mail server fails, as for an unknown address, and keeps the mail for a retry', async () => {
    const user = await registerUser(app, 'reset-mailfail');
    // The confirmation mail of the registration goes after the answer; let it go first.
    await vi.waitFor(() => expect(mailer.sent.some((m) => m.to === user.email)).toBe(true));
    mailer.failing = true;
    try {
      const res = await forgot(user.email);
      expect(res.statusCode, res.body).toBe(204);
    } finally {
      mailer.failing = false;
    }
    expect(resetMailsTo(mailer, user.email)).toHaveLength(0);
    // The link stands, its mail waiting in the outbox (test/auth/mail-outbox.test.ts sends such mail).
    const token = await app.services.repos.emailTokens.latestFor(user.id, 'password_reset');
    expect(token).toBeDefined();
    expect(await app.services.outbox!.pending(user.id)).toMatchObject([
      { kind: 'password_reset', emailTokenId: token!.id },
    ]);
    // A request after the minute mails a new link at once; the waiting mail lost its link (it is
    // dropped, not sent, by the next retry run).
    clock.advance(61);
    expect((await forgot(user.email)).statusCode).toBe(204);
    expect(await app.services.outbox!.pending(user.id)).toMatchObject([{ emailTokenId: null }]);
    expect((await reset(tokenMailedTo(mailer, user.email))).statusCode).toBe(204);
  });
});

describe('password reset lifts a sign-in lockout', () => {
  it('lets the mailbox owner back in after someone else locked the account', async () => {
    const mailer = capturingMailer();
    const app = await buildTestApp({
      env: { PASSWORD_RESET_URL: RESET_URL, RATE_LIMIT_ENABLED: 'true', LOGIN_MAX_FAILURES_PER_HOUR: '2' },
      deps: { mailer },
    });
    const user = await registerUser(app, 'reset-locked');
    for (let i = 0; i < 3; i++)
      await app.inject({
        method: 'POST',
        url: '/v1/auth/login',
        payload: { email: user.email, password: 'wrong guess number one' },
      });
    const locked = await app.inject({
      method: 'POST',
      url: '/v1/auth/login',
      payload: { email: user.email, password: PASSWORD },
    });
    expect(locked.statusCode).toBe(429);
    await app.inject({ method: 'POST', url: '/v1/auth/password/forgot', payload: { email: user.email } });
    const res = await app.inject({
      method: 'POST',
      url: '/v1/auth/password/reset',
      payload: { token: tokenMailedTo(mailer, user.email), new_password: NEW_PASSWORD },
    });
    expect(res.statusCode).toBe(204);
    await login(app, user.email, NEW_PASSWORD);
  });
});

describe('password reset without a mail server', () => {
  it('keeps the fragment of a hash-routed reset page, the token added to its query', async () => {
    const hashMailer = capturingMailer();
    const hashApp = await buildTestApp({
      env: { PASSWORD_RESET_URL: 'https://app.example.test/#/reset?lang=en' },
      deps: { mailer: hashMailer },
    });
    const user = await registerUser(hashApp, 'reset-hash');
    expect(
      (
        await hashApp.inject({
          method: 'POST',
          url: '/v1/auth/password/forgot',
          payload: { email: user.email },
        })
      ).statusCode,
    ).toBe(204);
    const mail = resetMailsTo(hashMailer, user.email).at(-1);
    const link = /https:\/\/app\.example\.test\/#\/reset\?lang=en&token=(prs_[0-9A-Za-z_]+)\n/.exec(
      mail?.text ?? '',
    );
    expect(link, mail?.text).not.toBeNull();
    const done = await hashApp.inject({
      method: 'POST',
      url: '/v1/auth/password/reset',
      payload: { token: link![1], new_password: NEW_PASSWORD },
    });
    expect(done.statusCode, done.body).toBe(204);
  });

  it('is off in production without SMTP_URL: 404, and nothing is kept', async () => {
    const app = await buildTestApp({ env: { NODE_ENV: 'production' } });
    const user = await registerUser(app, 'reset-nomail');
    const res = await app.inject({
      method: 'POST',
      url: '/v1/auth/password/forgot',
      payload: { email: user.email },
    });
    expect(res.statusCode).toBe(404);
    expect(res.json().detail).toContain('SMTP_URL');
    expect(await app.services.repos.emailTokens.latestFor(user.id, 'password_reset')).toBeUndefined();
  });
});
