import type { FastifyInstance } from 'fastify';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { ConfigError, loadConfig } from '../../src/config.js';
import type { MailMessage, Mailer } from '../../src/lib/mailer.js';
import { capturingMailer } from '../support/mail.js';
import { buildTestApp, testConfig, uniqueEmail } from '../support/app.js';
import { createTestClock } from '../support/clock.js';
import { ownDatabase } from '../support/database.js';
import { MAILS_PER_ACCOUNT_HOUR } from '../../src/modules/auth/mailed-tokens.js';
import { PASSWORD, registerUser } from '../support/factories.js';
import { bearer } from '../support/http.js';

const CONFIRM_URL = 'https://app.example.test/confirm';

const confirmationsTo = (mailer: { sent: MailMessage[] }, email: string) =>
  mailer.sent.filter((m) => m.to === email && m.subject === 'Confirm your email address');

/** The token of the newest confirmation mail to `email`, once it has been sent. */
async function confirmationToken(mailer: { sent: MailMessage[] }, email: string, count = 1): Promise<string> {
  await vi.waitFor(() => expect(confirmationsTo(mailer, email).length).toBe(count));
  const text = confirmationsTo(mailer, email).at(-1)!.text;
  const token = /https:\/\/app\.example\.test\/confirm#token=(pec_[0-9A-Za-z_]+)/.exec(text)?.[1];
  expect(token, text).toBeDefined();
  return token!;
}

/*
 * On a database of its own: the clock here runs a day ahead (a link's lifetime), past the publication
 * window of a key another file retires on the shared database (24 h + 10 min from the wall clock's
 * now), which this app's reload would unpublish (its tokens refused mid-test), and this app's
 * housekeeping would retire other files' retiring keys (as mfa.test.ts's TOTP describe found).
 */
describe('email confirmation (built-in provider)', () => {
  let own: Awaited<ReturnType<typeof ownDatabase>>;
  let app: FastifyInstance;
  const mailer = capturingMailer();
  const clock = createTestClock();

  beforeAll(async () => {
    own = await ownDatabase('auth_confirm');
    app = await buildTestApp({
      env: { EMAIL_CONFIRMATION_URL: CONFIRM_URL },
      deps: { database: own.database, mailer, clock },
    });
  });

  afterAll(async () => {
    await app?.close();
    await own?.dispose();
  });

  const confirm = (token: string) =>
    app.inject({ method: 'POST', url: '/v1/auth/email/confirm', payload: { token } });
  const resend = (email: string) =>
    app.inject({ method: 'POST', url: '/v1/auth/email/resend', payload: { email } });
  const me = (token: string) => app.inject({ method: 'GET', url: '/v1/auth/me', headers: bearer(token) });

  it('mails a link at registration whose token confirms the address once, seen at once in /me', async () => {
    const from = new Date(clock.nowMs() - 1000);
    const user = await registerUser(app, 'confirm');
    expect((await me(user.accessToken)).json().user.email_confirmed_at).toBeNull();
    const token = await confirmationToken(mailer, user.email);
    expect(confirmationsTo(mailer, user.email)[0]!.text).toContain('within 24 hours');
    // Someone else's account under the owner's address is not to be confirmed: a reset takes it over.
    expect(confirmationsTo(mailer, user.email)[0]!.text).toContain('do not confirm it');
    expect(confirmationsTo(mailer, user.email)[0]!.text).toContain('reset its password instead');

    const res = await confirm(token);
    expect(res.statusCode, res.body).toBe(200);
    expect(res.json().user).toMatchObject({ id: user.id, email: user.email });
    expect(Date.parse(res.json().user.email_confirmed_at)).toBeGreaterThan(0);
    expect((await me(user.accessToken)).json().user.email_confirmed_at).toBe(
      res.json().user.email_confirmed_at,
    );

    const again = await confirm(token);
    expect(again.statusCode).toBe(400);
    expect(again.json()).toMatchObject({
      code: 'invalid_confirmation_token',
      errors: [{ field: 'body.token', message: 'is invalid, expired or used' }],
    });
    const events = await app.services.audit.list({ subjectId: user.id, since: from, limit: 50 });
    expect(events.find((e) => e.type === 'auth.email_confirmation_sent')).toMatchObject({
      outcome: 'success',
    });
    expect(events.find((e) => e.type === 'user.email_confirmed' && e.outcome === 'success')).toBeDefined();
    // Confirmed: a resend sends nothing.
    clock.advance(61);
    expect((await resend(user.email)).statusCode).toBe(204);
    expect(confirmationsTo(mailer, user.email).length).toBe(1);
  });

  it('resends at most once a minute; the newer link replaces the older; unknown addresses alike', async () => {
    const user = await registerUser(app, 'confirm-resend');
    const first = await confirmationToken(mailer, user.email);
    expect((await resend(user.email)).statusCode).toBe(204);
    expect(confirmationsTo(mailer, user.email).length).toBe(1);
    clock.advance(61);
    expect((await resend(user.email.toUpperCase())).statusCode).toBe(204);
    const second = await confirmationToken(mailer, user.email, 2);
    expect((await confirm(first)).statusCode).toBe(400);
    expect((await confirm(second)).statusCode).toBe(200);

    const nobody = uniqueEmail('confirm-nobody');
    expect((await resend(nobody)).statusCode).toBe(204);
    expect(mailer.sent.some((m) => m.to === nobody)).toBe(false);
  });

  it('mails one address at most its hourly cap, however many accounts are made and deleted for it', async () => {
    // The cap is a rate limit: on here (the file's app runs without).
    // On the file's database, with its clock: closed before that database is.
    const limited = await buildTestApp({
      env: { EMAIL_CONFIRMATION_URL: CONFIRM_URL, RATE_LIMIT_ENABLED: 'true' },
      deps: { database: own.database, mailer, clock },
    });
    try {
      const email = uniqueEmail('confirm-bomb');
      for (let i = 0; i < MAILS_PER_ACCOUNT_HOUR + 2; i++) {
        // Each from an address of its own, under the per-address limits.
        const remoteAddress = `192.0.2.${i + 1}`;
        const made = await limited.inject({
          method: 'POST',
          url: '/v1/auth/register',
          remoteAddress,
          payload: { email, password: PASSWORD },
        });
        expect(made.statusCode, made.body).toBe(201);
        await limited.services.outbox?.idle();
        const gone = await limited.inject({
          method: 'DELETE',
          url: '/v1/auth/me',
          remoteAddress,
          headers: bearer(made.json().session.access_token),
          payload: { password: PASSWORD },
        });
        expect(gone.statusCode, gone.body).toBe(204);
        clock.advance(61);
      }
      expect(confirmationsTo(mailer, email)).toHaveLength(MAILS_PER_ACCOUNT_HOUR);
    } finally {
      await limited.close();
    }
  });

  it('confirms once for concurrent uses of one link (a scanner and a click): the others 400, quickly', async () => {
    const user = await registerUser(app, 'confirm-race');
    const token = await confirmationToken(mailer, user.email);
    const started = Date.now();
    const answers = await Promise.all(Array.from({ length: 8 }, () => confirm(token)));
    expect(answers.map((a) => a.statusCode).sort()).toEqual([200, 400, 400, 400, 400, 400, 400, 400]);
    expect(Date.now() - started).toBeLessThan(3000);
  });

  it('refuses a token past its lifetime, and malformed ones', async () => {
    const user = await registerUser(app, 'confirm-late');
    const token = await confirmationToken(mailer, user.email);
    clock.advance(86_401);
    expect((await confirm(token)).statusCode).toBe(400);
    for (const bad of ['', 'pec_short', `pec_${'a'.repeat(12)}_${'b'.repeat(43)}zzzzzz`, 'x'.repeat(600)]) {
      const res = await confirm(bad);
      expect(res.statusCode, bad.slice(0, 12)).toBe(400);
      expect(res.headers['content-type']).toContain('application/problem+json');
    }
  });

  it('a password reset confirms the address too: it proves the same mailbox', async () => {
    const user = await registerUser(app, 'confirm-by-reset');
    await confirmationToken(mailer, user.email);
    clock.advance(61);
    await app.inject({ method: 'POST', url: '/v1/auth/password/forgot', payload: { email: user.email } });
    const reset = mailer.sent
      .filter((m) => m.to === user.email && m.subject === 'Reset your password')
      .at(-1)!;
    const token = /(prs_[0-9A-Za-z_]+)/.exec(reset.text)![1]!;
    const res = await app.inject({
      method: 'POST',
      url: '/v1/auth/password/reset',
      payload: { token, new_password: 'confirmed through a reset' },
    });
    expect(res.statusCode).toBe(204);
    const login = await app.inject({
      method: 'POST',
      url: '/v1/auth/login',
      payload: { email: user.email, password: 'confirmed through a reset' },
    });
    expect(login.json().user.email_confirmed_at).not.toBeNull();
  });
});

describe('REQUIRE_EMAIL_CONFIRMATION', () => {
  let app: FastifyInstance;
  const mailer = capturingMailer();

  beforeAll(async () => {
    app = await buildTestApp({
      env: { EMAIL_CONFIRMATION_URL: CONFIRM_URL, REQUIRE_EMAIL_CONFIRMATION: 'true' },
      deps: { mailer },
    });
  });

  const login = (email: string, password: string) =>
    app.inject({ method: 'POST', url: '/v1/auth/login', payload: { email, password } });

  it('registers without a session, and signs in only once the address is confirmed', async () => {
    const email = uniqueEmail('must-confirm');
    const registered = await app.inject({
      method: 'POST',
      url: '/v1/auth/register',
      payload: { email, password: PASSWORD },
    });
    expect(registered.statusCode, registered.body).toBe(202);
    expect(registered.json().session).toBeNull();

    // The right password is told apart; a wrong one is the usual 401.
    const early = await login(email, PASSWORD);
    expect(early.statusCode).toBe(403);
    expect(early.json()).toMatchObject({ code: 'email_not_confirmed' });
    expect(early.json().detail).toContain('/v1/auth/email/resend');
    expect((await login(email, 'not the password at all')).statusCode).toBe(401);

    const token = await confirmationToken(mailer, email);
    expect(
      (await app.inject({ method: 'POST', url: '/v1/auth/email/confirm', payload: { token } })).statusCode,
    ).toBe(200);
    const later = await login(email, PASSWORD);
    expect(later.statusCode, later.body).toBe(200);
  });
});

describe('email confirmation configuration', () => {
  it('refuses REQUIRE_EMAIL_CONFIRMATION with Supabase, and in production without SMTP_URL', () => {
    const base = {
      NODE_ENV: 'test',
      REQUIRE_EMAIL_CONFIRMATION: 'true',
      SUPABASE_URL: 'http://supabase.test',
      SUPABASE_ANON_KEY: 'anon',
      SUPABASE_SERVICE_ROLE_KEY: 'service',
    };
    expect(() => loadConfig(base, { generateDevSecrets: false })).toThrow(ConfigError);
    expect(() => loadConfig(base, { generateDevSecrets: false })).toThrow(
      /REQUIRE_EMAIL_CONFIRMATION: applies/,
    );
    expect(() => testConfig({ NODE_ENV: 'production', REQUIRE_EMAIL_CONFIRMATION: 'true' })).toThrow(
      /REQUIRE_EMAIL_CONFIRMATION: needs SMTP_URL/,
    );
    expect(
      testConfig({
        NODE_ENV: 'production',
        REQUIRE_EMAIL_CONFIRMATION: 'true',
        SMTP_URL: 'smtp://mail.test',
        MAIL_FROM: 'no-reply@example.test',
      }).emailConfirmation.required,
    ).toBe(true);
  });

  it('registration works when the mail server fails, and says so in the log only', async () => {
    const failing: Mailer = {
      kind: 'smtp',
      async send() {
        throw new Error('mail server down');
      },
      close() {},
    };
    const app = await buildTestApp({ deps: { mailer: failing } });
    const user = await registerUser(app, 'confirm-mailfail');
    expect(user.accessToken).toBeTruthy();
  });
});
