import type { FastifyInstance } from 'fastify';
import { decodeJwt } from 'jose';
import { Secret, TOTP } from 'otpauth';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import { buildTestApp, testConfig } from '../support/app.js';
import { createTestClock } from '../support/clock.js';
import { createAdmin, PASSWORD, registerUser, setUserStatus, type TestUser } from '../support/factories.js';
import { bearer } from '../support/http.js';
import { capturingMailer } from '../support/mail.js';
import { startMfaSetUp, totpAt, turnOnMfa } from '../support/mfa.js';
import { expectSessionEnded, expectSessionLive, tokensOf } from '../support/sessions.js';
import { captureLogs } from '../support/logs.js';
import { ownDatabase, waitForLockWaiters } from '../support/database.js';
import { selectRows } from '../../src/db/client.js';
import { decrypt, keyedHash } from '../../src/lib/crypto.js';
import { recoveryCodeHash } from '../../src/modules/auth/mfa.service.js';
import { sql } from 'drizzle-orm';
import { clientToken, createClient, userWith } from '../clients/helpers.js';

/*
 * On a database of its own: the clock here runs a day ahead (the lock's decay), past the publication
 * window of a key another file retires on the shared database (24 h + 10 min from the wall clock's
 * now). A forced rotation there would unpublish, for this app, the key its tokens were just signed
 * with (401 `invalid_token` mid-test), and this app's minute housekeeping would retire other files'
 * retiring keys.
 */
describe('two-step verification (TOTP)', () => {
  let own: Awaited<ReturnType<typeof ownDatabase>>;
  let app: FastifyInstance;
  let admin: TestUser;
  const clock = createTestClock();

  beforeAll(async () => {
    own = await ownDatabase('auth_mfa');
    app = await buildTestApp({
      env: { MFA_ISSUER: 'Paservices Test' },
      deps: { database: own.database, clock },
    });
    admin = await createAdmin(app);
  });

  afterAll(async () => {
    await app?.close();
    await own?.dispose();
  });

  /** The code the user's app shows now (or `steps` periods from now), from the enrolment's secret. */
  const codeOf = (secret: string, steps = 0) =>
    new TOTP({ secret: Secret.fromBase32(secret), algorithm: 'SHA1', digits: 6, period: 30 }).generate({
      timestamp: clock.nowMs() + steps * 30_000,
    });
  /** A code that is none of the window's (now and one step either side). */
  const wrongCodeOf = (secret: string) => {
    const good = new Set([-1, 0, 1].map((s) => codeOf(secret, s)));
    let code = 0;
    while (good.has(String(code).padStart(6, '0'))) code++;
    return String(code).padStart(6, '0');
  };

  const post = (url: string, token: string | null, payload?: unknown) =>
    app.inject({
      method: 'POST',
      url,
      ...(token ? { headers: bearer(token) } : {}),
      payload: payload as object,
    });
  const loginRes = (user: TestUser) =>
    app.inject({
      method: 'POST',
      url: '/v1/auth/login',
      payload: { email: user.email, password: user.password },
    });
  const status = async (user: TestUser) =>
    (await app.inject({ method: 'GET', url: '/v1/auth/mfa', headers: bearer(user.accessToken) })).json();
  const verify = (mfaToken: string, code: string) =>
    post('/v1/auth/mfa/verify', null, { mfa_token: mfaToken, code });
  /** The `mfa_token` of a sign-in that asks for a second factor. */
  async function challenge(user: TestUser): Promise<string> {
    const res = await loginRes(user);
    expect(res.statusCode, res.body).toBe(403);
    expect(res.headers['content-type']).toContain('application/problem+json');
    const body = res.json();
    expect(body).toMatchObject({ code: 'mfa_required', mfa_methods: ['totp', 'recovery_code'] });
    expect(body.mfa_token).toMatch(/^pmf_/);
    return body.mfa_token;
  }

  /** A user with two-step verification on: their secret and recovery codes. */
  async function enrolled(tag: string) {
    const user = await registerUser(app, tag);
    const { secret, recoveryCodes } = await turnOnMfa(app, user.accessToken, clock.nowMs);
    // Codes are good once: the next sign-in's code is from the next step.
    clock.advance(30);
    return { user, secret, recoveryCodes };
  }

  it('setting up an app takes the current password: a stolen access token alone puts no factor on the account', async () => {
    const user = await registerUser(app, 'mfa-enrol-password');
    expect((await post('/v1/auth/mfa/totp', user.accessToken)).statusCode).toBe(400);
    const none = await post('/v1/auth/mfa/totp', user.accessToken, {});
    expect(none.statusCode).toBe(400);
    expect(none.json().errors).toEqual([{ field: 'body.password', message: expect.any(String) }]);
    const wrong = await post('/v1/auth/mfa/totp', user.accessToken, { password: 'not the password at all' });
    expect(wrong.statusCode).toBe(400);
    expect(wrong.json()).toMatchObject({
      code: 'incorrect_password',
      errors: [{ field: 'body.password', message: 'is incorrect' }],
    });
    expect(wrong.body).not.toContain('otpauth');
    expect(await status(user)).toMatchObject({ enabled: false, pending: false });
    // The set-up's own event failed: nothing was being turned on.
    const events = await app.services.audit.list({ subjectId: user.id, type: 'mfa.setup_started', limit: 5 });
    expect(events).toEqual([
      expect.objectContaining({ outcome: 'failure', data: { reason: 'wrong_password' } }),
    ]);
    expect(await app.services.audit.list({ subjectId: user.id, type: 'mfa.enabled', limit: 5 })).toEqual([]);
    const right = await post('/v1/auth/mfa/totp', user.accessToken, { password: PASSWORD });
    expect(right.statusCode, right.body).toBe(201);
    expect(await status(user)).toMatchObject({ enabled: false, pending: true });
  });

  it('starting a set-up is audited (mfa.setup_started), by the session that started it, without the secret', async () => {
    const user = await registerUser(app, 'mfa-setup-audit');
    const secret = await startMfaSetUp(app, user.accessToken);
    const events = await app.services.audit.list({ subjectId: user.id, type: 'mfa.setup_started', limit: 5 });
    const { factor } = await status(user);
    expect(events).toEqual([
      expect.objectContaining({
        outcome: 'success',
        actorId: user.id,
        credentialId: expect.any(String),
        data: { factor_id: factor.id, type: 'totp' },
      }),
    ]);
    expect(JSON.stringify(events)).not.toContain(secret);
    // The user sees it in their account's activity.
    const activity = await app.inject({
      method: 'GET',
      url: '/v1/auth/activity',
      headers: bearer(user.accessToken),
    });
    expect(activity.json().data).toContainEqual(
      expect.objectContaining({ type: 'mfa.setup_started', outcome: 'success', by: 'you' }),
    );
  });

  it('sets up an app in two steps; sign-ins then ask for a code and open the session with it', async () => {
    const user = await registerUser(app, 'mfa');
    expect(await status(user)).toMatchObject({ enabled: false, pending: false, factor: null });

    const enrol = await post('/v1/auth/mfa/totp', user.accessToken, { password: PASSWORD });
    expect(enrol.statusCode, enrol.body).toBe(201);
    expect(enrol.headers['cache-control']).toContain('no-store');
    const body = enrol.json();
    expect(body).toMatchObject({ type: 'totp', algorithm: 'SHA1', digits: 6, period: 30 });
    expect(body.secret).toMatch(/^[A-Z2-7]{32}$/);
    const uri = new URL(body.otpauth_uri);
    expect(uri.protocol).toBe('otpauth:');
    expect(uri.host).toBe('totp');
    expect(decodeURIComponent(uri.pathname)).toBe(`/Paservices Test:${user.email}`);
    expect(uri.searchParams.get('secret')).toBe(body.secret);
    expect(uri.searchParams.get('issuer')).toBe('Paservices Test');

    // Begun, not confirmed: sign-ins are as before.
    expect(await status(user)).toMatchObject({ enabled: false, pending: true });
    expect((await loginRes(user)).statusCode).toBe(200);

    const wrong = await post('/v1/auth/mfa/totp/activate', user.accessToken, {
      code: wrongCodeOf(body.secret),
    });
    expect(wrong.statusCode).toBe(400);
    expect(wrong.json()).toMatchObject({ code: 'invalid_mfa_code', errors: [{ field: 'body.code' }] });
    expect(await status(user)).toMatchObject({ enabled: false, pending: true });

    const activationCode = codeOf(body.secret);
    const activated = await post('/v1/auth/mfa/totp/activate', user.accessToken, { code: activationCode });
    expect(activated.statusCode, activated.body).toBe(200);
    const codes: string[] = activated.json().recovery_codes;
    expect(codes).toHaveLength(10);
    expect(new Set(codes).size).toBe(10);
    for (const c of codes) expect(c).toMatch(/^[0-9a-z]{5}-[0-9a-z]{5}$/);
    expect(await status(user)).toMatchObject({ enabled: true, pending: false, recovery_codes_remaining: 10 });
    // On already: a second app is not set up beside it.
    expect((await post('/v1/auth/mfa/totp', user.accessToken, { password: PASSWORD })).statusCode).toBe(409);

    // The sign-in stops at the password: no session yet.
    const sessionsBefore = (
      await app.inject({ method: 'GET', url: '/v1/auth/sessions', headers: bearer(user.accessToken) })
    ).json().data.length;
    const mfaToken = await challenge(user);
    const sessionsAfter = (
      await app.inject({ method: 'GET', url: '/v1/auth/sessions', headers: bearer(user.accessToken) })
    ).json().data.length;
    expect(sessionsAfter).toBe(sessionsBefore);

    // The activation's code was used: it does not open a session (RFC 6238 §5.2).
    const replay = await verify(mfaToken, activationCode);
    expect(replay.statusCode).toBe(400);
    expect(replay.json().code).toBe('invalid_mfa_code');

    clock.advance(30);
    const done = await verify(mfaToken, codeOf(body.secret));
    expect(done.statusCode, done.body).toBe(200);
    expect(done.json().user.id).toBe(user.id);
    const claims = decodeJwt(done.json().session.access_token);
    expect(claims.amr).toEqual(['pwd', 'otp', 'mfa']);
    const me = await app.inject({
      method: 'GET',
      url: '/v1/auth/me',
      headers: bearer(done.json().session.access_token),
    });
    expect(me.statusCode).toBe(200);

    // Introspection tells the same, of the access token and of the refresh token.
    for (const token of [done.json().session.access_token, done.json().session.refresh_token]) {
      const introspected = await app.inject({
        method: 'POST',
        url: '/oauth/introspect',
        headers: bearer(admin.accessToken),
        payload: { token },
      });
      expect(introspected.json()).toMatchObject({ active: true, amr: ['pwd', 'otp', 'mfa'] });
    }

    // The refreshed tokens of the session say the same.
    const refreshed = await post('/v1/auth/refresh', null, {
      refresh_token: done.json().session.refresh_token,
    });
    expect(refreshed.statusCode).toBe(200);
    expect(decodeJwt(refreshed.json().session.access_token).amr).toEqual(['pwd', 'otp', 'mfa']);

    // The challenge is used up.
    clock.advance(30);
    const again = await verify(mfaToken, codeOf(body.secret));
    expect(again.statusCode).toBe(401);
    expect(again.json().code).toBe('invalid_mfa_token');

    const events = await app.services.audit.list({ subjectId: user.id, limit: 50 });
    expect(events.map((e) => `${e.type}:${e.outcome}`)).toEqual(
      expect.arrayContaining([
        'mfa.enabled:failure',
        'mfa.enabled:success',
        'auth.mfa_challenge:success',
        'auth.login:failure',
        'auth.login:success',
      ]),
    );
    const opened = events.find((e) => e.type === 'auth.login' && e.data?.mfa === 'totp');
    expect(opened?.outcome).toBe('success');
  });

  it('a password sign-in carries amr ["pwd"]; a TOTP code in a wrong format is refused like a wrong one', async () => {
    const user = await registerUser(app, 'mfa-pwd');
    const res = await loginRes(user);
    expect(decodeJwt(res.json().session.access_token).amr).toEqual(['pwd']);
    const { user: withMfa } = await enrolled('mfa-format');
    const token = await challenge(withMfa);
    for (const code of ['12345', 'abcdef', '1234567']) {
      const r = await verify(token, code);
      expect(r.statusCode, code).toBe(400);
    }
    const bad = await verify(token, 'x'.repeat(33));
    expect(bad.statusCode).toBe(400);
    expect(bad.json().code).toBe('validation_failed');
    expect((await verify('pmf_not-a-token', '123456')).statusCode).toBe(401);
  });

  it('a recovery code opens one session, once, typed in any case with or without its dash', async () => {
    const { user, recoveryCodes } = await enrolled('mfa-recovery');
    const code = recoveryCodes[3]!;
    const res = await verify(await challenge(user), code.replace('-', '').toUpperCase());
    expect(res.statusCode, res.body).toBe(200);
    expect(decodeJwt(res.json().session.access_token).amr).toEqual(['pwd', 'mfa']);
    const again = await verify(await challenge(user), code);
    expect(again.statusCode).toBe(400);
    const signedIn = { ...user, accessToken: res.json().session.access_token };
    expect(await status(signedIn)).toMatchObject({ enabled: true, recovery_codes_remaining: 9 });
  });

  /** The user's stored recovery codes. */
  const storedCodes = (userId: string) =>
    selectRows<{ id: string; code_hash: string; salt: string | null; used_at: Date | null }>(
      app.services.db,
      sql`select id, code_hash, salt, used_at from mfa_recovery_codes where user_id = ${userId}`,
    );

  it('each recovery code is stored with a random salt of its own, hashed with it (ASVS 2.6.2), and works once', async () => {
    const { user, recoveryCodes } = await enrolled('mfa-recovery-salt');
    const { secretPepper } = testConfig();
    const rows = await storedCodes(user.id);
    expect(rows).toHaveLength(10);
    const salts = rows.map((r) => r.salt);
    // 50-bit codes are under the 112 bits that need no salt: 128 random bits each, none shared.
    for (const salt of salts) expect(Buffer.from(salt ?? '', 'base64url')).toHaveLength(16);
    expect(new Set(salts).size).toBe(10);
    // Each code is the hash of exactly one row's salt and the code, and no row is the code's unsalted hash.
    for (const code of recoveryCodes) {
      const matching = rows.filter((r) => r.code_hash === recoveryCodeHash(secretPepper, code, r.salt));
      expect(matching, code).toHaveLength(1);
      expect(rows.map((r) => r.code_hash)).not.toContain(recoveryCodeHash(secretPepper, code, null));
    }
    const code = recoveryCodes[7]!;
    const res = await verify(await challenge(user), code);
    expect(res.statusCode, res.body).toBe(200);
    expect(decodeJwt(res.json().session.access_token).amr).toEqual(['pwd', 'mfa']);
    const again = await verify(await challenge(user), code);
    expect(again.statusCode).toBe(400);
    expect(again.json().detail).toContain('recovery code was used already');
    expect((await storedCodes(user.id)).filter((r) => r.used_at !== null)).toHaveLength(1);
  });

  it('a recovery code stored before salts (salt null, the HMAC of the code alone) still signs in, once', async () => {
    const { user, recoveryCodes } = await enrolled('mfa-recovery-unsalted');
    const { secretPepper } = testConfig();
    const [old, salted] = [recoveryCodes[2]!, recoveryCodes[4]!];
    // As the release before migration 0022 stored it (and still does, running side by side).
    const row = (await storedCodes(user.id)).find(
      (r) => r.code_hash === recoveryCodeHash(secretPepper, old, r.salt),
    )!;
    await app.services.db.execute(
      sql`update mfa_recovery_codes set salt = null, code_hash = ${keyedHash(secretPepper, `mfa-recovery:${old.replace('-', '')}`)} where id = ${row.id}`,
    );
    const res = await verify(await challenge(user), old.toUpperCase());
    expect(res.statusCode, res.body).toBe(200);
    expect(decodeJwt(res.json().session.access_token).amr).toEqual(['pwd', 'mfa']);
    const again = await verify(await challenge(user), old);
    expect(again.statusCode).toBe(400);
    expect(again.json().detail).toContain('recovery code was used already');
    // The salted codes beside it work as before.
    expect((await verify(await challenge(user), salted)).statusCode).toBe(200);
    const signedIn = { ...user, accessToken: res.json().session.access_token };
    expect(await status(signedIn)).toMatchObject({ recovery_codes_remaining: 8 });
  });

  it('the same recovery code sent from several sign-ins opens one, and locks nothing: it was used, not guessed', async () => {
    const { user, secret, recoveryCodes } = await enrolled('mfa-recovery-burst');
    const code = recoveryCodes[5]!;
    const tokens = await Promise.all(Array.from({ length: 8 }, () => challenge(user)));
    const answers = await Promise.all(tokens.map((t) => verify(t, code)));
    const statuses = answers.map((a) => a.statusCode).sort();
    expect(statuses).toEqual([200, 400, 400, 400, 400, 400, 400, 400]);
    for (const a of answers.filter((r) => r.statusCode === 400))
      expect(a.json().detail).toContain('recovery code was used already');
    // Not locked: the app's code opens the next sign-in at once.
    const next = await verify(await challenge(user), codeOf(secret));
    expect(next.statusCode, next.body).toBe(200);
  });

  it('wrong codes in a row lock the factor for longer each time, whatever the challenge; a right code resets it', async () => {
    const { user, secret } = await enrolled('mfa-lock');
    let token = await challenge(user);
    for (let i = 1; i <= 5; i++) {
      const r = await verify(token, wrongCodeOf(secret));
      expect(r.statusCode, `wrong code ${i}`).toBe(400);
      // A fresh sign-in is no fresh allowance.
      if (i === 3) token = await challenge(user);
    }
    // The sixth wrong code locks for a minute (and says so): even the right one waits.
    const locking = await verify(token, wrongCodeOf(secret));
    expect(locking.statusCode).toBe(429);
    expect(Number(locking.headers['retry-after'])).toBe(60);
    const locked = await verify(token, codeOf(secret));
    expect(locked.statusCode).toBe(429);
    expect(locked.json().code).toBe('rate_limited');
    const retryAfter = Number(locked.headers['retry-after']);
    expect(retryAfter).toBeGreaterThan(50);
    expect(retryAfter).toBeLessThanOrEqual(60);

    clock.advance(61);
    // The next wrong code locks for two minutes.
    const again = await verify(token, wrongCodeOf(secret));
    expect(again.statusCode).toBe(429);
    expect(Number(again.headers['retry-after'])).toBe(120);
    const longer = await verify(token, codeOf(secret));
    expect(longer.statusCode).toBe(429);
    expect(Number(longer.headers['retry-after'])).toBeGreaterThan(110);

    clock.advance(121);
    const ok = await verify(token, codeOf(secret));
    expect(ok.statusCode, ok.body).toBe(200);
    // The count starts again: five wrong codes lock nothing.
    clock.advance(30);
    const next = await challenge(user);
    for (let i = 0; i < 5; i++) expect((await verify(next, wrongCodeOf(secret))).statusCode).toBe(400);
    expect((await verify(next, codeOf(secret))).statusCode).toBe(200);
    const failures = await app.services.audit.list({ subjectId: user.id, type: 'auth.login', limit: 50 });
    expect(failures.filter((e) => e.data?.reason === 'mfa_locked')).toHaveLength(2);
    expect(failures.filter((e) => e.data?.locked_for_seconds).map((e) => e.data?.locked_for_seconds)).toEqual(
      [120, 60],
    );
  });

  it('wrong codes a day old count no more toward the lock', async () => {
    const { user, secret } = await enrolled('mfa-decay');
    const first = await challenge(user);
    for (let i = 0; i < 5; i++) expect((await verify(first, wrongCodeOf(secret))).statusCode).toBe(400);
    clock.advance(24 * 3600 + 1);
    const next = await challenge(user);
    // A sixth in a row would lock; a day on, it is the first.
    expect((await verify(next, wrongCodeOf(secret))).statusCode).toBe(400);
    expect((await verify(next, codeOf(secret))).statusCode).toBe(200);
  });

  it.skipIf(!inject('databaseUrl'))(
    'a sign-in whose password passed while the factor was being activated asks for a code',
    async () => {
      const user = await registerUser(app, 'mfa-activation-race');
      const enrol = await post('/v1/auth/mfa/totp', user.accessToken, { password: PASSWORD });
      expect(enrol.statusCode).toBe(201);
      // Another connection holds the user's row as an activation does, and activates meanwhile.
      const other = new pg.Client({ connectionString: own.url });
      await other.connect();
      try {
        await other.query('begin');
        await other.query('select 1 from users where id = $1 for no key update', [user.id]);
        const login = loginRes(user);
        await new Promise((resolve) => setTimeout(resolve, 500));
        await other.query('update mfa_factors set verified_at = now() where user_id = $1', [user.id]);
        await other.query('commit');
        const res = await login;
        expect(res.statusCode, res.body).toBe(403);
        expect(res.json().code).toBe('mfa_required');
      } finally {
        await other.end();
      }
    },
  );

  it.skipIf(!inject('databaseUrl'))(
    'a change whose session ends while it waits for the account changes nothing: 401, the factor as it was',
    async () => {
      /**
       * Sends `request` while another connection holds the user's row, and ends every session of the
       * user there (as signing out everywhere, a password change or a disable does: the row, then the
       * sessions) before letting it go: the request was authenticated before its session ended.
       */
      async function endedWhileWaiting(
        userId: string,
        request: () => Promise<{ statusCode: number; json(): { code?: string } }>,
      ) {
        const other = new pg.Client({ connectionString: own.url });
        await other.connect();
        try {
          await other.query('begin');
          await other.query('select 1 from users where id = $1 for no key update', [userId]);
          const answer = request();
          await waitForLockWaiters(other, 1);
          await other.query(
            "update sessions set revoked_at = now(), revoked_reason = 'logout_all' where user_id = $1",
            [userId],
          );
          await other.query('commit');
          const res = await answer;
          expect(res.statusCode).toBe(401);
          expect(res.json().code).toBe('invalid_token');
        } finally {
          await other.end();
        }
      }
      const codes = (userId: string) =>
        selectRows<{ code_hash: string }>(
          app.services.db,
          sql`select code_hash from mfa_recovery_codes where user_id = ${userId} order by code_hash`,
        );

      // A set-up: no secret is handed out, nothing is pending.
      const fresh = await registerUser(app, 'mfa-ended-enrol');
      await endedWhileWaiting(fresh.id, () =>
        post('/v1/auth/mfa/totp', fresh.accessToken, { password: PASSWORD }),
      );
      expect(await app.services.mfa.status(fresh.id)).toMatchObject({ enabled: false, pending: false });

      // An activation: the factor stays pending, and no recovery codes are handed out.
      const pending = await registerUser(app, 'mfa-ended-activation');
      const enrol = await post('/v1/auth/mfa/totp', pending.accessToken, { password: PASSWORD });
      expect(enrol.statusCode).toBe(201);
      await endedWhileWaiting(pending.id, () =>
        post('/v1/auth/mfa/totp/activate', pending.accessToken, { code: codeOf(enrol.json().secret) }),
      );
      expect(await app.services.mfa.status(pending.id)).toMatchObject({ enabled: false, pending: true });
      expect(await codes(pending.id)).toEqual([]);

      // New recovery codes: the old ones stay; turning it off: it stays on.
      for (const [tag, url] of [
        ['mfa-ended-codes', '/v1/auth/mfa/recovery-codes'],
        ['mfa-ended-off', '/v1/auth/mfa/totp/deactivate'],
      ] as const) {
        const { user, secret } = await enrolled(tag);
        const before = await codes(user.id);
        await endedWhileWaiting(user.id, () => post(url, user.accessToken, { code: codeOf(secret) }));
        expect(await app.services.mfa.status(user.id)).toMatchObject({
          enabled: true,
          recovery_codes_remaining: 10,
        });
        expect(await codes(user.id)).toEqual(before);
      }
    },
  );

  it('a right code sent again (a double submit) is refused without counting toward the lock', async () => {
    const { user, secret } = await enrolled('mfa-double');
    const code = codeOf(secret);
    const first = await verify(await challenge(user), code);
    expect(first.statusCode).toBe(200);
    const token = await challenge(user);
    for (let i = 0; i < 8; i++) {
      const r = await verify(token, code);
      expect(r.statusCode).toBe(400);
      expect(r.json().detail).toContain('used already');
    }
    clock.advance(30);
    expect((await verify(token, codeOf(secret))).statusCode).toBe(200);
  });

  it('a sign-in waiting for its code stops waiting when the user logs out everywhere', async () => {
    const { user, secret } = await enrolled('mfa-logout-all');
    const session = await verify(await challenge(user), codeOf(secret));
    const waiting = await challenge(user);
    const out = await post('/v1/auth/logout', session.json().session.access_token, { scope: 'all' });
    expect(out.statusCode).toBe(204);
    clock.advance(30);
    expect((await verify(waiting, codeOf(secret))).statusCode).toBe(401);
  });

  it('turning it on ends the other sessions; the one that gave the code carries mfa from its next refresh', async () => {
    const user = await registerUser(app, 'mfa-others');
    const other = await loginRes(user);
    expect(other.statusCode).toBe(200);
    const enrol = await post('/v1/auth/mfa/totp', user.accessToken, { password: PASSWORD });
    const on = await post('/v1/auth/mfa/totp/activate', user.accessToken, {
      code: codeOf(enrol.json().secret),
    });
    expect(on.statusCode).toBe(200);
    const otherRefresh = await post('/v1/auth/refresh', null, {
      refresh_token: other.json().session.refresh_token,
    });
    expect(otherRefresh.statusCode).toBe(401);
    const otherMe = await app.inject({
      method: 'GET',
      url: '/v1/auth/me',
      headers: bearer(other.json().session.access_token),
    });
    expect(otherMe.statusCode).toBe(401);
    const mine = await post('/v1/auth/refresh', null, { refresh_token: user.refreshToken });
    expect(mine.statusCode, mine.body).toBe(200);
    expect(decodeJwt(mine.json().session.access_token).amr).toEqual(['pwd', 'otp', 'mfa']);
    // The user sees which of their sessions gave the second factor.
    const list = await app.inject({
      method: 'GET',
      url: '/v1/auth/sessions',
      headers: bearer(mine.json().session.access_token),
    });
    expect(list.json().data).toEqual([
      expect.objectContaining({ current: true, amr: ['pwd', 'otp', 'mfa'] }),
    ]);
    const events = await app.services.audit.list({ subjectId: user.id, type: 'mfa.enabled', limit: 5 });
    expect(events[0]?.data).toMatchObject({ other_sessions_ended: true });
  });

  it('a challenge expires after MFA_CHALLENGE_TTL (300 s)', async () => {
    const { user, secret } = await enrolled('mfa-expiry');
    const res = await loginRes(user);
    expect(res.json().mfa_token_expires_in).toBe(300);
    clock.advance(301);
    const late = await verify(res.json().mfa_token, codeOf(secret));
    expect(late.statusCode).toBe(401);
    expect(late.json().code).toBe('invalid_mfa_token');
  });

  it('concurrent verifications of one challenge open one session', async () => {
    const { user, secret } = await enrolled('mfa-race');
    const token = await challenge(user);
    const code = codeOf(secret);
    const answers = await Promise.all(Array.from({ length: 5 }, () => verify(token, code)));
    expect(answers.filter((a) => a.statusCode === 200)).toHaveLength(1);
    for (const a of answers.filter((x) => x.statusCode !== 200)) expect([400, 401]).toContain(a.statusCode);
  });

  it('a user disabled while a challenge waits gets no session', async () => {
    const { user, secret } = await enrolled('mfa-disabled');
    admin = { ...admin, accessToken: (await loginRes(admin)).json().session.access_token };
    const token = await challenge(user);
    expect((await setUserStatus(app, admin.accessToken, user.id, 'disabled')).statusCode).toBe(200);
    expect((await verify(token, codeOf(secret))).statusCode).toBe(401);
  });

  it('is managed with a signed-in session only: an API key gets 403', async () => {
    const user = await registerUser(app, 'mfa-key');
    const key = await post('/v1/api-keys', user.accessToken, {
      name: 'k',
      scopes: ['account:read', 'account:write'],
    });
    expect(key.statusCode, key.body).toBe(201);
    const headers = { 'x-api-key': key.json().key };
    const enrol = await app.inject({
      method: 'POST',
      url: '/v1/auth/mfa/totp',
      headers,
      payload: { password: PASSWORD },
    });
    expect(enrol.statusCode).toBe(403);
    expect((await app.inject({ method: 'GET', url: '/v1/auth/mfa', headers })).statusCode).toBe(403);
    expect((await app.inject({ method: 'GET', url: '/v1/auth/mfa' })).statusCode).toBe(401);
  });

  it('turns off with a current code or a recovery code, not a wrong one; sign-ins are password-only again', async () => {
    const { user, secret, recoveryCodes } = await enrolled('mfa-off');
    const session = await verify(await challenge(user), codeOf(secret));
    const token = session.json().session.access_token;
    clock.advance(30);
    const wrong = await post('/v1/auth/mfa/totp/deactivate', token, { code: wrongCodeOf(secret) });
    expect(wrong.statusCode).toBe(400);
    expect(await status({ ...user, accessToken: token })).toMatchObject({ enabled: true });
    const off = await post('/v1/auth/mfa/totp/deactivate', token, { code: recoveryCodes[0] });
    expect(off.statusCode, off.body).toBe(204);
    expect(await status({ ...user, accessToken: token })).toMatchObject({ enabled: false, factor: null });
    expect((await loginRes(user)).statusCode).toBe(200);
    expect((await post('/v1/auth/mfa/totp/deactivate', token, { code: codeOf(secret) })).statusCode).toBe(
      409,
    );
    const events = await app.services.audit.list({ subjectId: user.id, type: 'mfa.disabled', limit: 10 });
    expect(events.map((e) => e.outcome).sort()).toEqual(['failure', 'success']);
  });

  it('turning it off ends every other session; the one that turned it off stays', async () => {
    // The session that turned it on, and two that signed in with a code since.
    const { user, secret } = await enrolled('mfa-off-others');
    const enrolling = tokensOf({ access_token: user.accessToken, refresh_token: user.refreshToken });
    const acting = tokensOf((await verify(await challenge(user), codeOf(secret))).json().session);
    clock.advance(30);
    const elsewhere = tokensOf((await verify(await challenge(user), codeOf(secret))).json().session);
    clock.advance(30);
    const off = await post('/v1/auth/mfa/totp/deactivate', acting.accessToken, { code: codeOf(secret) });
    expect(off.statusCode, off.body).toBe(204);
    // An administrator's token of now (this file's clock runs ahead of the one made at the start).
    const introspector = (await loginRes(admin)).json().session.access_token as string;
    await expectSessionEnded(app, enrolling, introspector);
    await expectSessionEnded(app, elsewhere, introspector);
    await expectSessionLive(app, acting, introspector);
    const [event] = await app.services.audit.list({ subjectId: user.id, type: 'mfa.disabled', limit: 5 });
    expect(event).toMatchObject({
      outcome: 'success',
      credentialId: decodeJwt(acting.accessToken).sid,
      data: { with: 'totp', other_sessions_ended: true },
    });
  });

  it('new recovery codes take a code from the app, and the old ones stop working', async () => {
    const { user, secret, recoveryCodes } = await enrolled('mfa-regen');
    const session = await verify(await challenge(user), codeOf(secret));
    const token = session.json().session.access_token;
    clock.advance(30);
    const byRecovery = await post('/v1/auth/mfa/recovery-codes', token, { code: recoveryCodes[0] });
    expect(byRecovery.statusCode).toBe(400);
    const fresh = await post('/v1/auth/mfa/recovery-codes', token, { code: codeOf(secret) });
    expect(fresh.statusCode, fresh.body).toBe(200);
    const codes: string[] = fresh.json().recovery_codes;
    expect(codes).toHaveLength(10);
    expect((await verify(await challenge(user), recoveryCodes[1]!)).statusCode).toBe(400);
    expect((await verify(await challenge(user), codes[0]!)).statusCode).toBe(200);
  });

  it('an administrator turns it off for a user who lost their app (users:write), audited', async () => {
    const { user } = await enrolled('mfa-admin');
    // A fresh token: the clock has moved on past the one of beforeAll.
    admin = { ...admin, accessToken: (await loginRes(admin)).json().session.access_token };
    const other = await registerUser(app, 'mfa-nobody');
    const denied = await app.inject({
      method: 'DELETE',
      url: `/v1/users/${user.id}/mfa`,
      headers: bearer(other.accessToken),
    });
    expect(denied.statusCode).toBe(403);
    expect((await loginRes(user)).statusCode).toBe(403);
    // The answer's body goes with every status check, so a failure says what came back instead.
    const read = async () => {
      const got = await app.inject({
        method: 'GET',
        url: `/v1/users/${user.id}`,
        headers: bearer(admin.accessToken),
      });
      expect(got.statusCode, got.body).toBe(200);
      return got;
    };
    expect((await read()).json()).toMatchObject({ id: user.id, mfa_enabled: true });
    const res = await app.inject({
      method: 'DELETE',
      url: `/v1/users/${user.id.toUpperCase()}/mfa`,
      headers: bearer(admin.accessToken),
    });
    expect(res.statusCode, res.body).toBe(204);
    expect((await read()).json().mfa_enabled).toBe(false);
    const signedIn = await loginRes(user);
    expect(signedIn.statusCode).toBe(200);
    expect(decodeJwt(signedIn.json().session.access_token).amr).toEqual(['pwd']);
    const missing = await app.inject({
      method: 'DELETE',
      url: '/v1/users/00000000-0000-4000-8000-000000000000/mfa',
      headers: bearer(admin.accessToken),
    });
    expect(missing.statusCode).toBe(404);
    // Never one's own, whatever the credential holds: that is what the code is for.
    const own = await app.inject({
      method: 'DELETE',
      url: `/v1/users/${admin.id}/mfa`,
      headers: bearer(admin.accessToken),
    });
    expect(own.statusCode).toBe(403);
    const key = await post('/v1/api-keys', admin.accessToken, { name: 'support', scopes: ['users:write'] });
    const byKey = await app.inject({
      method: 'DELETE',
      url: `/v1/users/${admin.id}/mfa`,
      headers: { 'x-api-key': key.json().key },
    });
    expect(byKey.statusCode).toBe(403);
    // Nor an app client the caller registered, acting for them or on its own scopes.
    for (const actsForCreator of [false, true]) {
      const client = await createClient(app, admin.accessToken, {
        name: 'support tool',
        scopes: ['users:write'],
      });
      if (actsForCreator) {
        const bound = await app.inject({
          method: 'PATCH',
          url: `/v1/clients/${client.id}`,
          headers: bearer(admin.accessToken),
          payload: { acts_for_creator: true },
        });
        expect(bound.statusCode, bound.body).toBe(200);
      }
      const issued = await clientToken(app, client);
      const byClient = await app.inject({
        method: 'DELETE',
        url: `/v1/users/${admin.id}/mfa`,
        headers: bearer(issued.access_token),
      });
      expect(byClient.statusCode).toBe(403);
    }
    // Nor a client registered by such a client: it is the administrator's as well.
    const registrar = await createClient(app, admin.accessToken, { name: 'registrar', scopes: ['*'] });
    const second = await createClient(app, (await clientToken(app, registrar)).access_token, {
      name: 'made by a client',
      scopes: ['users:write'],
    });
    expect(second.created_by).toBe(admin.id);
    const bySecond = await app.inject({
      method: 'DELETE',
      url: `/v1/users/${admin.id}/mfa`,
      headers: bearer((await clientToken(app, second)).access_token),
    });
    expect(bySecond.statusCode).toBe(403);
    const events = await app.services.audit.list({ subjectId: user.id, type: 'mfa.disabled', limit: 10 });
    expect(events[0]).toMatchObject({
      outcome: 'success',
      actorId: admin.id,
      data: { by_administrator: true },
    });
  });

  it('the wrong password still answers 401 for a user with a second factor, and reveals nothing of it', async () => {
    const { user } = await enrolled('mfa-wrong-password');
    const res = await app.inject({
      method: 'POST',
      url: '/v1/auth/login',
      payload: { email: user.email, password: `${PASSWORD}x` },
    });
    expect(res.statusCode).toBe(401);
    expect(res.json().mfa_token).toBeUndefined();
  });
});

describe('MFA_REQUIRED_ROLES: roles that count only in a session that gave a second factor', () => {
  let app: FastifyInstance;
  const clock = createTestClock();
  beforeAll(async () => {
    app = await buildTestApp({ env: { MFA_REQUIRED_ROLES: 'admin' }, deps: { clock } });
  });

  const users = (token: string) => app.inject({ method: 'GET', url: '/v1/users', headers: bearer(token) });

  it('a password-only session of an admin holds only their other roles, until it gives a code', async () => {
    const user = await registerUser(app, 'mfa-required');
    await app.services.repos.users.assignRole(user.id, 'admin', null);
    const pwd = await app.inject({
      method: 'POST',
      url: '/v1/auth/login',
      payload: { email: user.email, password: user.password },
    });
    expect(pwd.statusCode).toBe(200);
    const claims = decodeJwt(pwd.json().session.access_token);
    expect(claims.roles).toEqual(['user']);
    expect(String(claims.scope).split(' ')).not.toContain('*');
    expect((await users(pwd.json().session.access_token)).statusCode).toBe(403);

    // The user role is enough to set up the second factor; the session that gives it gets the role.
    const { recoveryCodes } = await turnOnMfa(app, pwd.json().session.access_token, clock.nowMs);
    const refreshed = await app.inject({
      method: 'POST',
      url: '/v1/auth/refresh',
      payload: { refresh_token: pwd.json().session.refresh_token },
    });
    expect(refreshed.statusCode).toBe(200);
    expect(decodeJwt(refreshed.json().session.access_token).roles).toEqual(['admin', 'user']);
    expect((await users(refreshed.json().session.access_token)).statusCode).toBe(200);

    // A later sign-in gets the role with its code, and a recovery code counts as one.
    clock.advance(30);
    const login = await app.inject({
      method: 'POST',
      url: '/v1/auth/login',
      payload: { email: user.email, password: user.password },
    });
    const verified = await app.inject({
      method: 'POST',
      url: '/v1/auth/mfa/verify',
      payload: { mfa_token: login.json().mfa_token, code: recoveryCodes[0] },
    });
    expect(verified.statusCode).toBe(200);
    expect(decodeJwt(verified.json().session.access_token).roles).toEqual(['admin', 'user']);

    // The role goes only to users who have a second factor: else whoever has their password would
    // set one up and hold it.
    const asAdmin = bearer(verified.json().session.access_token);
    const other = await registerUser(app, 'mfa-required-grantee');
    const grant = () =>
      app.inject({ method: 'PUT', url: `/v1/users/${other.id}/roles/admin`, headers: asAdmin });
    const refused = await grant();
    expect(refused.statusCode).toBe(409);
    expect(refused.json().detail).toContain('two-step verification');
    await turnOnMfa(app, other.accessToken, clock.nowMs);
    expect((await grant()).statusCode).toBe(200);
  });

  it('a holder of such a role does not turn their own factor off (409, no code spent); once the role is taken they do', async () => {
    const holder = await registerUser(app, 'mfa-required-off');
    const { recoveryCodes } = await turnOnMfa(app, holder.accessToken, clock.nowMs);
    await app.services.repos.users.assignRole(holder.id, 'admin', null);
    clock.advance(30);
    const off = (value: string) =>
      app.inject({
        method: 'POST',
        url: '/v1/auth/mfa/totp/deactivate',
        headers: bearer(holder.accessToken),
        payload: { code: value },
      });
    const refused = await off(recoveryCodes[0]!);
    expect(refused.statusCode, refused.body).toBe(409);
    expect(refused.json().detail).toContain('admin');
    expect(await app.services.mfa.isEnabled(holder.id)).toBe(true);
    // The code was not spent by the refusal, and a wrong one is still a wrong code.
    expect((await off('000000')).statusCode).toBe(400);
    await app.services.repos.users.removeRole(holder.id, 'admin');
    const done = await off(recoveryCodes[0]!);
    expect(done.statusCode, done.body).toBe(204);
    expect(await app.services.mfa.isEnabled(holder.id)).toBe(false);
  });

  it('authz/check counts those roles only for a session that gave a second factor, and names the step-up', async () => {
    const admin = await registerUser(app, 'mfa-check');
    await app.services.repos.users.assignRole(admin.id, 'admin', null);
    const { code } = await turnOnMfa(app, admin.accessToken, clock.nowMs);
    // An administrator from before MFA_REQUIRED_ROLES, with no second factor: a password-only session.
    const legacy = await registerUser(app, 'mfa-check-legacy');
    await app.services.repos.users.assignRole(legacy.id, 'admin', null);
    const pwdSession = decodeJwt(legacy.accessToken).sid as string;
    clock.advance(30);
    const login = await app.inject({
      method: 'POST',
      url: '/v1/auth/login',
      payload: { email: admin.email, password: admin.password },
    });
    const verified = await app.inject({
      method: 'POST',
      url: '/v1/auth/mfa/verify',
      payload: { mfa_token: login.json().mfa_token, code: code() },
    });
    expect(verified.statusCode, verified.body).toBe(200);
    const mfaSession = decodeJwt(verified.json().session.access_token).sid as string;

    // A service's credential: the session of a user holding authz:check by a role of its own.
    const checker = await userWith(app, ['authz:check'], 'mfa-checker');
    const check = (body: Record<string, unknown>) =>
      app.inject({
        method: 'POST',
        url: '/v1/authz/check',
        headers: bearer(checker.accessToken),
        payload: { subject_id: admin.id, permissions: ['users:read', 'account:read'], ...body },
      });

    // Without a session: as a session that gave no second factor, with what one would add.
    const bare = await check({});
    expect(bare.statusCode, bare.body).toBe(200);
    expect(bare.json()).toEqual({ allowed: false, missing: ['users:read'], mfa_required: ['users:read'] });
    expect((await check({ subject_id: legacy.id, session_id: pwdSession })).json()).toEqual(bare.json());
    expect((await check({ subject_id: legacy.id })).json()).toEqual(bare.json());
    expect((await check({ session_id: mfaSession })).json()).toEqual({ allowed: true, missing: [] });
    // What no role of the user gives is missing, with no step-up for it.
    expect((await check({ subject_id: checker.id })).json()).toEqual({
      allowed: false,
      missing: ['users:read'],
    });

    // A session that ended holds nothing; one that is not the user's is 404.
    const out = await app.inject({
      method: 'POST',
      url: '/v1/auth/logout',
      headers: bearer(verified.json().session.access_token),
      payload: {},
    });
    expect(out.statusCode).toBe(204);
    expect((await check({ session_id: mfaSession })).json()).toEqual({
      allowed: false,
      missing: ['users:read', 'account:read'],
    });
    const foreign = await check({ session_id: decodeJwt(checker.accessToken).sid as string });
    expect(foreign.statusCode).toBe(404);
    expect(foreign.headers['content-type']).toContain('application/problem+json');
    expect((await check({ session_id: 'not-a-uuid' })).statusCode).toBe(400);
  });

  it('granting such a role to a holder without a second factor is idempotent: held already (200), not 409', async () => {
    // An administrator from before MFA_REQUIRED_ROLES, with no second factor.
    const legacy = await registerUser(app, 'mfa-required-regrant');
    await app.services.repos.users.assignRole(legacy.id, 'admin', null);
    const granter = await userWith(app, ['*'], 'mfa-required-granter');
    const grant = () =>
      app.inject({
        method: 'PUT',
        url: `/v1/users/${legacy.id}/roles/admin`,
        headers: bearer(granter.accessToken),
      });
    const again = await grant();
    expect(again.statusCode, again.body).toBe(200);
    expect(again.json().roles).toEqual(['admin', 'user']);
    expect(await app.services.audit.list({ subjectId: legacy.id, type: 'role.granted', limit: 5 })).toEqual(
      [],
    );
    // A new grant to a user without a second factor is still refused, and leaves no assignment.
    const fresh = await registerUser(app, 'mfa-required-fresh');
    const refused = await app.inject({
      method: 'PUT',
      url: `/v1/users/${fresh.id}/roles/admin`,
      headers: bearer(granter.accessToken),
    });
    expect(refused.statusCode).toBe(409);
    expect((await app.services.repos.users.rolesAndPermissions(fresh.id)).roles).toEqual(['user']);
  });

  it('refuses a role name that is not one, and the user role', () => {
    for (const value of ['Admin!', 'user', 'admin,user']) {
      expect(() => testConfig({ MFA_REQUIRED_ROLES: value }), value).toThrow(/MFA_REQUIRED_ROLES/);
    }
    expect(testConfig({ MFA_REQUIRED_ROLES: 'admin, support' }).mfa.requiredRoles).toEqual([
      'admin',
      'support',
    ]);
  });
});

describe('two-step verification notices (when the service sends mail)', () => {
  /** An app that sends mail (to `mailer`) on its own clock, and a user of it with two-step verification on. */
  async function turnedOnWithMail(tag: string) {
    const mailer = capturingMailer();
    const clock = createTestClock();
    const app = await buildTestApp({ deps: { mailer, clock } });
    const user = await registerUser(app, tag);
    // Where the service sends mail, a second factor takes a confirmed address.
    await app.services.repos.users.update(user.id, { emailConfirmedAt: new Date(clock.nowMs()) });
    /** A sign-in's password step: the mfa_token it answers with. */
    const challenge = async () =>
      (
        await app.inject({
          method: 'POST',
          url: '/v1/auth/login',
          payload: { email: user.email, password: user.password },
        })
      ).json().mfa_token as string;
    const verify = (mfaToken: string, c: string) =>
      app.inject({ method: 'POST', url: '/v1/auth/mfa/verify', payload: { mfa_token: mfaToken, code: c } });
    return {
      mailer,
      clock,
      app,
      user,
      challenge,
      verify,
      ...(await turnOnMfa(app, user.accessToken, clock.nowMs)),
    };
  }

  it('tells the user of new recovery codes, as of the factor turned on: codes made by someone else would pass the app', async () => {
    const { mailer, clock, app, user, secret } = await turnedOnWithMail('mfa-regen-notice');
    const subjects = () => mailer.sent.filter((m) => m.to === user.email).map((m) => m.subject);
    expect(subjects()).toContain('Two-step verification is on');
    clock.advance(30);
    // Whoever holds this session and one code from the app (a phished one) makes codes of their own.
    const fresh = await app.inject({
      method: 'POST',
      url: '/v1/auth/mfa/recovery-codes',
      headers: bearer(user.accessToken),
      payload: { code: totpAt(secret, clock.nowMs()) },
    });
    expect(fresh.statusCode, fresh.body).toBe(200);
    const notice = mailer.sent.find(
      (m) => m.to === user.email && m.subject === 'New recovery codes for two-step verification',
    );
    expect(notice, JSON.stringify(subjects())).toBeDefined();
    expect(notice!.text).toContain('the earlier ones no longer work');
    // The notice names no code.
    for (const code of fresh.json().recovery_codes as string[]) expect(notice!.text).not.toContain(code);
  });

  it('tells of two-step verification turned off, and that every other session was signed out', async () => {
    const { mailer, clock, app, user, secret, challenge, verify } = await turnedOnWithMail('mfa-off-notice');
    const signIn = async () => {
      clock.advance(30);
      const verified = await verify(await challenge(), totpAt(secret, clock.nowMs()));
      expect(verified.statusCode, verified.body).toBe(200);
      return verified.json().session.access_token as string;
    };
    const acting = await signIn();
    await signIn();
    clock.advance(30);
    const off = await app.inject({
      method: 'POST',
      url: '/v1/auth/mfa/totp/deactivate',
      headers: bearer(acting),
      payload: { code: totpAt(secret, clock.nowMs()) },
    });
    expect(off.statusCode, off.body).toBe(204);
    const notice = mailer.sent.find(
      (m) => m.to === user.email && m.subject === 'Two-step verification is off',
    );
    expect(notice?.text).toContain(
      'signing in asks for your password only, and every other session was signed out.',
    );
  });

  it('tells the holder of an app code sent again (ASVS 2.8.5), at most once in 15 minutes however many replays, and audits it', async () => {
    const { mailer, clock, app, user, code, challenge, verify } = await turnedOnWithMail('mfa-reuse-notice');
    const notices = () =>
      mailer.sent.filter(
        (m) => m.to === user.email && m.subject === 'A used two-step verification code was entered again',
      );
    const reuses = async () =>
      (await app.services.audit.list({ subjectId: user.id, type: 'auth.login', limit: 20 }))
        .filter((e) => e.outcome === 'failure')
        .map((e) => e.data);

    clock.advance(30);
    const used = code();
    expect((await verify(await challenge(), used)).statusCode).toBe(200);
    const token = await challenge();
    expect((await verify(token, used)).statusCode).toBe(400);
    expect(notices()).toHaveLength(1);
    expect(notices()[0]!.text).not.toContain(used);
    // Replayed again within the window: refused and audited, no second mail.
    expect((await verify(token, used)).statusCode).toBe(400);
    expect(notices()).toHaveLength(1);
    expect(await reuses()).toEqual(
      expect.arrayContaining([
        { reason: 'mfa_code_reused', user_notified: true },
        { reason: 'mfa_code_reused' },
      ]),
    );
    expect(await reuses()).toHaveLength(2);

    // Past the window, a code sent again is told of again.
    clock.advance(15 * 60);
    const later = code();
    expect((await verify(await challenge(), later)).statusCode).toBe(200);
    expect((await verify(await challenge(), later)).statusCode).toBe(400);
    expect(notices()).toHaveLength(2);
  });
});

describe('a set-up never confirmed, removed', () => {
  /**
   * A user with a set-up begun and never confirmed (MFA_SETUP_TTL 60 s), `after` seconds later reset by
   * an administrator (204): the reset's `mfa.disabled` data, and the subjects mailed to the user.
   */
  async function resetAfter(after: number) {
    const mailer = capturingMailer();
    const clock = createTestClock();
    const app = await buildTestApp({ env: { MFA_SETUP_TTL: '60' }, deps: { mailer, clock } });
    const admin = await createAdmin(app);
    const user = await registerUser(app, 'mfa-pending-reset');
    await app.services.repos.users.update(user.id, { emailConfirmedAt: new Date(clock.nowMs()) });
    await startMfaSetUp(app, user.accessToken);
    clock.advance(after);
    const reset = await app.inject({
      method: 'DELETE',
      url: `/v1/users/${user.id}/mfa`,
      headers: bearer(admin.accessToken),
    });
    expect(reset.statusCode, reset.body).toBe(204);
    expect(await app.services.mfa.status(user.id)).toMatchObject({ enabled: false, pending: false });
    const events = await app.services.audit.list({ subjectId: user.id, type: 'mfa.disabled', limit: 5 });
    const subjects = mailer.sent.filter((m) => m.to === user.email).map((m) => m.subject);
    return { data: events.map((e) => e.data), subjects };
  }

  it('by an administrator tells nobody of two-step verification turned off, and is audited as what it was', async () => {
    const { data, subjects } = await resetAfter(59);
    expect(data).toEqual([{ by_administrator: true, had_factor: false, pending_set_up_removed: true }]);
    expect(subjects).not.toContain('Two-step verification is off');
  });

  it('by an administrator once expired (MFA_SETUP_TTL) is no set-up removed: it was as if never begun', async () => {
    const { data, subjects } = await resetAfter(60);
    expect(data).toEqual([{ by_administrator: true, had_factor: false }]);
    expect(subjects).not.toContain('Two-step verification is off');
  });
});

describe('a set-up never confirmed, expired', () => {
  it('after MFA_SETUP_TTL (900 s): activating it is 409 and it shows as none; a new one begins and is confirmed within it', async () => {
    const clock = createTestClock();
    const app = await buildTestApp({ deps: { clock } });
    const user = await registerUser(app, 'mfa-setup-expiry');
    const post = (url: string, token: string | null, payload: object) =>
      app.inject({ method: 'POST', url, ...(token ? { headers: bearer(token) } : {}), payload });
    const status = async (token: string) =>
      (await app.inject({ method: 'GET', url: '/v1/auth/mfa', headers: bearer(token) })).json();
    const stale = await startMfaSetUp(app, user.accessToken);
    clock.advance(901);
    // The access token (900 s) expired too; the session goes on.
    const refreshed = await post('/v1/auth/refresh', null, { refresh_token: user.refreshToken });
    expect(refreshed.statusCode, refreshed.body).toBe(200);
    const token: string = refreshed.json().session.access_token;
    const late = await post('/v1/auth/mfa/totp/activate', token, { code: totpAt(stale, clock.nowMs()) });
    expect(late.statusCode, late.body).toBe(409);
    expect(late.headers['content-type']).toContain('application/problem+json');
    expect(late.json()).toMatchObject({
      code: 'conflict',
      detail: expect.stringMatching(/expired.*15 minutes.*POST \/v1\/auth\/mfa\/totp/),
    });
    expect(await status(token)).toMatchObject({ enabled: false, pending: false, factor: null });
    // Begun again, and confirmed within its lifetime.
    const fresh = await startMfaSetUp(app, token);
    expect(await status(token)).toMatchObject({ enabled: false, pending: true });
    clock.advance(899);
    const on = await post('/v1/auth/mfa/totp/activate', token, { code: totpAt(fresh, clock.nowMs()) });
    expect(on.statusCode, on.body).toBe(200);
    expect(await status(token)).toMatchObject({ enabled: true, pending: false });
  });
});

describe('two-step verification secrets at rest and in the logs (SECURITY.md)', () => {
  it('keeps the TOTP secret encrypted, the recovery codes and mfa_token as HMACs, and none of them in the log', async () => {
    const { lines, logger } = captureLogs('debug');
    const clock = createTestClock();
    const app = await buildTestApp({ deps: { clock, logger } });
    const user = await registerUser(app, 'mfa-at-rest');
    const { secret, recoveryCodes, code } = await turnOnMfa(app, user.accessToken, clock.nowMs);
    clock.advance(30);
    const login = await app.inject({
      method: 'POST',
      url: '/v1/auth/login',
      payload: { email: user.email, password: user.password },
    });
    const mfaToken: string = login.json().mfa_token;
    // At least 128 random bits, as every secret the service hands out.
    expect(mfaToken).toMatch(/^pmf_[0-9A-Za-z]{12}_[0-9A-Za-z]{43}[0-9A-Za-z]{6}$/);
    const verified = await app.inject({
      method: 'POST',
      url: '/v1/auth/mfa/verify',
      payload: { mfa_token: mfaToken, code: code() },
    });
    expect(verified.statusCode).toBe(200);

    const { secretPepper, keyEncryptionKey } = testConfig();
    const [factor] = await selectRows<{ secret_encrypted: string }>(
      app.services.db,
      sql`select secret_encrypted from mfa_factors where user_id = ${user.id}`,
    );
    expect(factor!.secret_encrypted).not.toContain(secret);
    expect(decrypt(keyEncryptionKey, factor!.secret_encrypted)).toBe(secret);
    const [challenge] = await selectRows<{ token_hash: string }>(
      app.services.db,
      sql`select token_hash from mfa_challenges where user_id = ${user.id}`,
    );
    expect(challenge!.token_hash).toBe(keyedHash(secretPepper, `mfa-challenge:${mfaToken}`));
    const stored = await selectRows<{ code_hash: string; salt: string }>(
      app.services.db,
      sql`select code_hash, salt from mfa_recovery_codes where user_id = ${user.id}`,
    );
    expect(stored.map((r) => r.code_hash).sort()).toEqual(
      recoveryCodes
        .map((c) => stored.find((r) => r.code_hash === recoveryCodeHash(secretPepper, c, r.salt))?.code_hash)
        .sort(),
    );

    const log = lines.join('');
    expect(log.length).toBeGreaterThan(0);
    for (const value of [secret, mfaToken, ...recoveryCodes, verified.json().session.refresh_token])
      expect(log).not.toContain(value);
  });

  it('a recovery code hashes differently under two salts, and alike however it is typed', () => {
    const { secretPepper } = testConfig();
    const [a, b] = ['c2VsZi1zYWx0LW9uZQ', 'c2VsZi1zYWx0LXR3bw'];
    const hashes = [a, b, null].map((salt) => recoveryCodeHash(secretPepper, 'abcde-12345', salt));
    expect(new Set(hashes).size).toBe(3);
    expect(recoveryCodeHash(secretPepper, 'ABCDE 12345', a)).toBe(hashes[0]);
    expect(recoveryCodeHash(secretPepper, 'abcde12345', null)).toBe(
      keyedHash(secretPepper, 'mfa-recovery:abcde12345'),
    );
  });
});
