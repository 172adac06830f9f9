import argon2 from 'argon2';
import type { FastifyInstance } from 'fastify';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ARGON2_OPTIONS } from '../../src/identity/passwords.js';
import { buildTestApp, uniqueEmail } from '../support/app.js';
import { ownDatabase } from '../support/database.js';
import { login, registerUser } from '../support/factories.js';
import { bearer } from '../support/http.js';
import { capturingMailer } from '../support/mail.js';

/** One password, as two keyboards type it: "é", "è", "û" as one code point each (NFC) or two (NFD). */
const COMPOSED = 'caf\u00e9 cr\u00e8me br\u00fbl\u00e9e 42';
const DECOMPOSED = COMPOSED.normalize('NFD');

/** The stored hash of `email`'s account. */
async function storedHash(app: FastifyInstance, email: string): Promise<string> {
  const row = await app.services.repos.users.findByEmail(email);
  expect(row?.passwordHash).toBeTruthy();
  return row!.passwordHash!;
}

/** An account whose hash was made from `raw` as typed, as it was before passwords were normalised. */
async function legacyAccount(app: FastifyInstance, tag: string, raw = DECOMPOSED) {
  const user = await registerUser(app, tag, 'an ascii passphrase 42');
  await app.services.repos.users.update(user.id, { passwordHash: await argon2.hash(raw, ARGON2_OPTIONS) });
  return user;
}

const signIn = (app: FastifyInstance, email: string, password: string, remoteAddress?: string) =>
  app.inject({
    method: 'POST',
    url: '/v1/auth/login',
    ...(remoteAddress ? { remoteAddress } : {}),
    payload: { email, password },
  });

describe('passwords are Unicode-normalised (NFKC) before they are hashed or checked (built-in provider)', () => {
  let app: FastifyInstance;
  const mailer = capturingMailer();

  beforeAll(async () => {
    app = await buildTestApp({
      env: { PASSWORD_RESET_URL: 'https://app.example.test/reset-password' },
      deps: { mailer },
    });
  });

  it('a password registered with "é" as two code points signs in with it as one, and the other way round', async () => {
    const decomposed = await registerUser(app, 'nfkc-nfd', DECOMPOSED);
    await login(app, decomposed.email, COMPOSED);
    await login(app, decomposed.email, DECOMPOSED);
    // What is stored is the hash of the normalised form.
    expect(await argon2.verify(await storedHash(app, decomposed.email), COMPOSED)).toBe(true);

    const composed = await registerUser(app, 'nfkc-nfc', COMPOSED);
    await login(app, composed.email, DECOMPOSED);
    await login(app, composed.email, COMPOSED);
  });

  it('measures a new password and compares it with the common ones in its normalised form', async () => {
    const register = (password: string) =>
      app.inject({
        method: 'POST',
        url: '/v1/auth/register',
        payload: { email: uniqueEmail('nfkc-weak'), password },
      });
    // Eight code points as sent, seven once "e" + U+0301 is one "é".
    const short = await register('abcdefe\u0301');
    expect(short.statusCode, short.body).toBe(422);
    expect(short.json()).toMatchObject({ code: 'weak_password' });
    // "password" in full-width letters is "password".
    const common = await register('\uff50\uff41\uff53\uff53\uff57\uff4f\uff52\uff44');
    expect(common.statusCode, common.body).toBe(422);
    expect(common.json().errors).toEqual([
      { field: 'body.password', message: 'is a commonly used password' },
    ]);
  });

  it('a change, a reset and the current password asked again take either form', async () => {
    const user = await registerUser(app, 'nfkc-change', DECOMPOSED);
    const change = (current: string, next: string) =>
      app.inject({
        method: 'POST',
        url: '/v1/auth/password',
        headers: bearer(user.accessToken),
        payload: { current_password: current, new_password: next },
      });
    // The same password in other code points is no change.
    const same = await change(DECOMPOSED, COMPOSED);
    expect(same.statusCode, same.body).toBe(400);
    expect(same.json().errors).toEqual([
      { field: 'body.new_password', message: 'must differ from the current password' },
    ]);
    const next = `${COMPOSED} encore`;
    const changed = await change(COMPOSED, next.normalize('NFD'));
    expect(changed.statusCode, changed.body).toBe(204);
    await login(app, user.email, next);

    // A reset (an invitation's first password goes the same way).
    const forgot = await app.inject({
      method: 'POST',
      url: '/v1/auth/password/forgot',
      payload: { email: user.email },
    });
    expect(forgot.statusCode).toBe(204);
    const mail = mailer.sent.filter((m) => m.to === user.email && m.subject === 'Reset your password').at(-1);
    const token = /#token=(prs_[0-9A-Za-z_]+)/.exec(mail?.text ?? '')?.[1];
    expect(token, mail?.text).toBeDefined();
    const reset = await app.inject({
      method: 'POST',
      url: '/v1/auth/password/reset',
      payload: { token, new_password: DECOMPOSED },
    });
    expect(reset.statusCode, reset.body).toBe(204);
    const afterReset = await login(app, user.email, COMPOSED);

    // Setting up a second factor (the reset confirmed the address) asks for the password again.
    const enrol = await app.inject({
      method: 'POST',
      url: '/v1/auth/mfa/totp',
      headers: bearer(afterReset.session.access_token),
      payload: { password: DECOMPOSED },
    });
    expect(enrol.statusCode, enrol.body).toBe(201);

    // Deleting the account asks for it too.
    const deleted = await app.inject({
      method: 'DELETE',
      url: '/v1/auth/me',
      headers: bearer(afterReset.session.access_token),
      payload: { password: DECOMPOSED },
    });
    expect(deleted.statusCode, deleted.body).toBe(204);
  });

  it('a hash made from the password as typed before signs in with it, and is made again from the normalised form', async () => {
    const user = await legacyAccount(app, 'nfkc-legacy');
    const before = await storedHash(app, user.email);
    // The old hash knows only the code points typed then.
    expect((await signIn(app, user.email, COMPOSED)).statusCode).toBe(401);
    expect(await storedHash(app, user.email)).toBe(before);

    const session = await login(app, user.email, DECOMPOSED);
    // The session stands on the new hash (it opens only while the hash it was checked against is the
    // account's): it works.
    const me = await app.inject({
      method: 'GET',
      url: '/v1/auth/me',
      headers: bearer(session.session.access_token),
    });
    expect(me.statusCode).toBe(200);
    const after = await storedHash(app, user.email);
    expect(after).not.toBe(before);
    expect(await argon2.verify(after, COMPOSED)).toBe(true);
    expect(await argon2.verify(after, DECOMPOSED)).toBe(false);
    // From now on either form signs in, and the hash stays.
    await login(app, user.email, COMPOSED);
    await login(app, user.email, DECOMPOSED);
    expect(await storedHash(app, user.email)).toBe(after);
  });

  it('concurrent first sign-ins with an old hash all open a session, on the one hash that wins', async () => {
    const user = await legacyAccount(app, 'nfkc-legacy-race');
    const all = await Promise.all([1, 2, 3].map(() => signIn(app, user.email, DECOMPOSED)));
    expect(all.map((r) => r.statusCode)).toEqual([200, 200, 200]);
    expect(await argon2.verify(await storedHash(app, user.email), COMPOSED)).toBe(true);
  });

  it('a hash made from the password as typed before is the current password of a change', async () => {
    const user = await legacyAccount(app, 'nfkc-legacy-change');
    const res = await app.inject({
      method: 'POST',
      url: '/v1/auth/password',
      headers: bearer(user.accessToken),
      payload: {
        current_password: DECOMPOSED,
        new_password: 'a fresh passphrase \u00e9t\u00e9'.normalize('NFD'),
      },
    });
    expect(res.statusCode, res.body).toBe(204);
    await login(app, user.email, 'a fresh passphrase \u00e9t\u00e9');
  });
});

describe('a password tried in two forms is one guess', () => {
  let app: FastifyInstance;
  beforeAll(async () => {
    app = await buildTestApp({ env: { RATE_LIMIT_ENABLED: 'true', LOGIN_MAX_FAILURES_PER_HOUR: '3' } });
  });

  it('wrong passwords NFKC changes count one failure each toward the lock, for an old hash too', async () => {
    const user = await legacyAccount(app, 'nfkc-lock');
    // Each is checked in its normalised form and as typed (the hash may be of either).
    const wrong = (i: number) =>
      signIn(app, user.email, `wr\u00f4ng ${i}`.normalize('NFD'), `10.9.0.${i + 1}`);
    expect((await wrong(0)).statusCode).toBe(401);
    expect((await wrong(1)).statusCode).toBe(401);
    // Two failures of three: the right password still signs in (and forgets them).
    expect((await signIn(app, user.email, DECOMPOSED, '10.9.0.50')).statusCode).toBe(200);
    const events = await app.services.audit.list({ subjectId: user.id, type: 'auth.login', limit: 50 });
    expect(
      events.filter((e) => e.outcome === 'failure').map((e) => (e.data as { reason?: string }).reason),
    ).toEqual(['wrong_password', 'wrong_password']);

    for (let i = 2; i < 5; i++) expect((await wrong(i)).statusCode).toBe(401);
    const locked = await signIn(app, user.email, COMPOSED, '10.9.0.51');
    expect(locked.statusCode, locked.body).toBe(429);
  });
});

describe('the bootstrap admin', () => {
  let own: Awaited<ReturnType<typeof ownDatabase>>;
  let app: FastifyInstance;
  const email = uniqueEmail('nfkc-boot');
  beforeAll(async () => {
    own = await ownDatabase('auth_nfkc_boot');
    app = await buildTestApp({
      env: { BOOTSTRAP_ADMIN_EMAIL: email, BOOTSTRAP_ADMIN_PASSWORD: DECOMPOSED },
      deps: { database: own.database },
    });
  });
  afterAll(async () => {
    await app?.close();
    await own?.dispose();
  });

  it('signs in with BOOTSTRAP_ADMIN_PASSWORD in either form', async () => {
    await login(app, email, COMPOSED);
    await login(app, email, DECOMPOSED);
  });
});
