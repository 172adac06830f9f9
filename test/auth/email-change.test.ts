import type { FastifyInstance } from 'fastify';
import { decodeJwt } from 'jose';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import type { MailMessage } from '../../src/lib/mailer.js';
import { sql } from 'drizzle-orm';
import { selectRows } from '../../src/db/client.js';
import { keyedHash } from '../../src/lib/crypto.js';
import { mailsPerHourKey } from '../../src/lib/throttle.js';
import { MAILS_PER_ACCOUNT_HOUR, mailCapKey } from '../../src/modules/auth/mailed-tokens.js';
import { buildTestApp, testConfig, uniqueEmail } from '../support/app.js';
import { waitForLockWaiters } from '../support/database.js';
import { captureLogs } from '../support/logs.js';
import { createTestClock } from '../support/clock.js';
import {
  createAdmin,
  login,
  PASSWORD,
  registerUser,
  setUserStatus,
  type TestUser,
} from '../support/factories.js';
import { bearer } from '../support/http.js';
import { capturingMailer } from '../support/mail.js';
import { capCountings, randomAddress } from '../support/redis.js';
import { createKey, grantRole, withKey } from '../api-keys/helpers.js';
import { clientToken, createClient } from '../clients/helpers.js';
import { turnOnMfa } from '../support/mfa.js';
import { expectSessionEnded, expectSessionLive, tokensOf } from '../support/sessions.js';

const CHANGE_URL = 'https://app.example.test/email-change';
const TO_NEW = 'Confirm your new email address';
const TO_CURRENT = 'Confirm the change of your email address';
const NOTICE = 'Your email address was changed';

describe('changing the email address (built-in provider)', () => {
  let app: FastifyInstance;
  const mailer = capturingMailer();
  const clock = createTestClock();

  beforeAll(async () => {
    app = await buildTestApp({ env: { EMAIL_CHANGE_URL: CHANGE_URL }, deps: { mailer, clock } });
  });

  const mails = (to: string, subject: string) =>
    mailer.sent.filter((m) => m.to === to && m.subject === subject);
  /** The token of the newest mail to `to` with `subject`. */
  const tokenIn = (to: string, subject: string): string => {
    const mail: MailMessage | undefined = mails(to, subject).at(-1);
    expect(mail, `a mail "${subject}" to ${to}`).toBeDefined();
    const token = /https:\/\/app\.example\.test\/email-change#token=(pce_[0-9A-Za-z_]+)/.exec(
      mail!.text,
    )?.[1];
    expect(token, mail!.text).toBeDefined();
    return token!;
  };
  const ask = (user: Pick<TestUser, 'accessToken'>, payload: Record<string, unknown>) =>
    app.inject({ method: 'POST', url: '/v1/auth/email/change', headers: bearer(user.accessToken), payload });
  /** Opens a link: signed in with `accessToken` (the new address's link of a user's own request needs it), or not. */
  const open = (token: string, accessToken?: string) =>
    app.inject({
      method: 'POST',
      url: '/v1/auth/email/change/confirm',
      headers: accessToken ? bearer(accessToken) : {},
      payload: { token },
    });
  const me = (token: string) => app.inject({ method: 'GET', url: '/v1/auth/me', headers: bearer(token) });
  const loginStatus = async (email: string, password = PASSWORD) =>
    (await app.inject({ method: 'POST', url: '/v1/auth/login', payload: { email, password } })).statusCode;
  const events = async (userId: string, from: Date) =>
    app.services.audit.list({ subjectId: userId, since: from, limit: 100 });

  /** A user whose current address is confirmed (as after its confirmation link). */
  async function confirmedUser(tag: string): Promise<TestUser> {
    const user = await registerUser(app, tag);
    await app.services.repos.users.update(user.id, { emailConfirmedAt: new Date(clock.nowMs()) });
    return user;
  }

  it('an unconfirmed address moves with the new address’s link alone, which confirms it; sign-in follows', async () => {
    const from = new Date(clock.nowMs() - 1000);
    const user = await registerUser(app, 'chg-unconfirmed');
    const next = uniqueEmail('chg-unconfirmed-new');
    const res = await ask(user, { new_email: next.toUpperCase(), password: PASSWORD });
    expect(res.statusCode, res.body).toBe(202);
    expect(res.json()).toEqual({ new_email: next, expires_at: expect.any(String), confirm_current: false });
    // EMAIL_CHANGE_TTL's default: an hour from the request.
    expect(Date.parse(res.json().expires_at) - clock.nowMs()).toBeGreaterThan(3599_000);
    expect(Date.parse(res.json().expires_at) - clock.nowMs()).toBeLessThanOrEqual(3600_000);
    expect(mails(user.email, TO_CURRENT)).toHaveLength(0);
    expect(mails(next, TO_NEW)[0]!.text).toContain('within 60 minutes');
    // Nothing changes until the link is opened.
    expect((await me(user.accessToken)).json().user.email).toBe(user.email);

    // Opened without signing in (a stranger at a mistyped address, say): nothing, and it stays usable.
    const anonymous = await open(tokenIn(next, TO_NEW));
    expect(anonymous.statusCode).toBe(401);
    expect(anonymous.json()).toMatchObject({ code: 'authentication_required' });
    expect(anonymous.headers['www-authenticate']).toBe('Bearer realm="paservices"');
    const other = await registerUser(app, 'chg-other');
    expect((await open(tokenIn(next, TO_NEW), other.accessToken)).statusCode).toBe(401);
    expect((await me(user.accessToken)).json().user.email).toBe(user.email);

    const done = await open(tokenIn(next, TO_NEW), user.accessToken);
    expect(done.statusCode, done.body).toBe(200);
    expect(done.json()).toMatchObject({ changed: true, user: { id: user.id, email: next } });
    expect(Date.parse(done.json().user.email_confirmed_at)).toBeGreaterThan(0);
    expect((await me(user.accessToken)).json().user).toMatchObject({ email: next });
    // An address nobody had proven gets no notice.
    expect(mails(user.email, NOTICE)).toHaveLength(0);

    expect(await loginStatus(user.email)).toBe(401);
    const session = await login(app, next);
    expect(decodeJwt(session.session.access_token).email).toBe(next);
    // The session that asked gets the new address in its next token too.
    const refreshed = await app.inject({
      method: 'POST',
      url: '/v1/auth/refresh',
      payload: { refresh_token: user.refreshToken },
    });
    expect(decodeJwt(refreshed.json().session.access_token).email).toBe(next);

    const types = (await events(user.id, from)).map((e) => `${e.type}:${e.outcome}`);
    expect(types).toEqual(
      expect.arrayContaining([
        'user.email_change_requested:success',
        'user.email_change_confirmed:success',
        'user.email_changed:success',
      ]),
    );
    // Opened signed in: the events name the session it was opened with.
    const applied = (await events(user.id, from)).find((e) => e.type === 'user.email_changed');
    expect(applied).toMatchObject({ actorId: user.id, credentialId: decodeJwt(user.accessToken).sid });
    expect(await open(tokenIn(next, TO_NEW), user.accessToken).then((r) => r.statusCode)).toBe(400);
  });

  it('a confirmed address also has to approve: the change applies once both links are opened, in either order', async () => {
    for (const order of [
      [TO_NEW, TO_CURRENT],
      [TO_CURRENT, TO_NEW],
    ] as const) {
      const user = await confirmedUser('chg-both');
      const next = uniqueEmail('chg-both-new');
      const res = await ask(user, { new_email: next, password: PASSWORD });
      expect(res.statusCode, res.body).toBe(202);
      expect(res.json().confirm_current).toBe(true);
      expect(mails(user.email, TO_CURRENT)[0]!.text).toContain(next);
      const tokens = { [TO_NEW]: tokenIn(next, TO_NEW), [TO_CURRENT]: tokenIn(user.email, TO_CURRENT) };

      const first = await open(tokens[order[0]], user.accessToken);
      expect(first.statusCode, first.body).toBe(200);
      // Who opens a link learns nothing of the account until it moved.
      expect(first.json()).toEqual({ changed: false, user: null });
      expect((await me(user.accessToken)).json().user.email).toBe(user.email);
      expect(await loginStatus(user.email)).toBe(200);

      const second = await open(tokens[order[1]], user.accessToken);
      expect(second.statusCode, second.body).toBe(200);
      expect(second.json()).toMatchObject({ changed: true, user: { email: next } });
      expect((await me(user.accessToken)).json().user.email).toBe(next);
      expect(await loginStatus(user.email)).toBe(401);
      expect(await loginStatus(next)).toBe(200);
      expect(mails(user.email, NOTICE)[0]!.text).toContain(next);
    }
  });

  it('shows the change in waiting with the links still to open, and cancels it', async () => {
    const user = await confirmedUser('chg-pending');
    const pending = () =>
      app.inject({ method: 'GET', url: '/v1/auth/email/change', headers: bearer(user.accessToken) });
    const cancel = () =>
      app.inject({ method: 'DELETE', url: '/v1/auth/email/change', headers: bearer(user.accessToken) });
    expect((await pending()).statusCode).toBe(404);
    const next = uniqueEmail('chg-pending-new');
    const asked = await ask(user, { new_email: next, password: PASSWORD });
    expect((await pending()).json()).toEqual({
      new_email: next,
      expires_at: asked.json().expires_at,
      confirm_current: true,
      waiting_for: expect.arrayContaining(['new_address', 'current_address']),
    });
    expect((await open(tokenIn(user.email, TO_CURRENT))).json().changed).toBe(false);
    expect((await pending()).json().waiting_for).toEqual(['new_address']);

    // Not read with an API key, even one that may read the account (a delegated credential): the
    // address the account is moving to is the signed-in user's to see, as the change is theirs to ask.
    const reader = await createKey(app, user.accessToken, { scopes: ['account:read'] });
    for (const headers of [withKey(reader.key), bearer(reader.key)]) {
      const read = await app.inject({ method: 'GET', url: '/v1/auth/email/change', headers });
      expect(read.statusCode, read.body).toBe(403);
      expect(read.body).not.toContain(next);
    }
    // Nor cancelled with one, as the change is not asked with one.
    const key = await createKey(app, user.accessToken, { scopes: ['account:write', 'account:read'] });
    const byKey = await app.inject({
      method: 'DELETE',
      url: '/v1/auth/email/change',
      headers: withKey(key.key),
    });
    expect(byKey.statusCode).toBe(403);
    expect((await pending()).json().waiting_for).toEqual(['new_address']);

    expect((await cancel()).statusCode).toBe(204);
    expect((await pending()).statusCode).toBe(404);
    expect((await cancel()).statusCode).toBe(404);
    expect((await open(tokenIn(next, TO_NEW), user.accessToken)).statusCode).toBe(400);
    expect((await app.services.repos.users.findById(user.id))?.email).toBe(user.email);
    const cancelled = await app.services.audit.list({
      subjectId: user.id,
      type: 'user.email_change_cancelled',
      limit: 5,
    });
    expect(cancelled).toHaveLength(1);
    // Cancelling does not reset the once-a-minute limit: asking and cancelling in a loop would mail
    // any address without end.
    const rebound = await ask(user, { new_email: next, password: PASSWORD });
    expect(rebound.statusCode).toBe(429);

    // Applied: nothing waits any more. The last link opened signed in, so that this session stays
    // (opened without one, the change would end it with the others).
    clock.advance(61);
    const again = uniqueEmail('chg-pending-again');
    expect((await ask(user, { new_email: again, password: PASSWORD })).statusCode).toBe(202);
    await open(tokenIn(again, TO_NEW), user.accessToken);
    expect((await open(tokenIn(user.email, TO_CURRENT), user.accessToken)).json().changed).toBe(true);
    expect((await pending()).statusCode).toBe(404);
  });

  it('the new address’s link alone moves nothing when the current address was confirmed (a mistyped address)', async () => {
    const user = await confirmedUser('chg-stranger');
    const stranger = uniqueEmail('chg-stranger-new');
    expect((await ask(user, { new_email: stranger, password: PASSWORD })).statusCode).toBe(202);
    expect((await open(tokenIn(stranger, TO_NEW), user.accessToken)).json()).toEqual({
      changed: false,
      user: null,
    });
    // The stranger now holds a used link and nothing else: a reset of their address finds no account.
    expect(await app.services.repos.users.findByEmail(stranger)).toBeUndefined();
    expect((await app.services.repos.users.findById(user.id))?.email).toBe(user.email);
  });

  it('the change ends every other session of the user, keeping the one of theirs that opened the last link, if any', async () => {
    const admin = await createAdmin(app);
    // The current address's link last, opened signed in or not; the new address's link last.
    for (const last of ['current signed in', 'current without a session', 'new signed in'] as const) {
      const from = new Date(clock.nowMs() - 1000);
      const user = await confirmedUser('chg-sessions');
      const asking = tokensOf({ access_token: user.accessToken, refresh_token: user.refreshToken });
      const elsewhere = tokensOf((await login(app, user.email)).session);
      const next = uniqueEmail('chg-sessions-new');
      expect((await ask(user, { new_email: next, password: PASSWORD })).statusCode, last).toBe(202);
      const [first, second] =
        last === 'new signed in'
          ? [tokenIn(user.email, TO_CURRENT), tokenIn(next, TO_NEW)]
          : [tokenIn(next, TO_NEW), tokenIn(user.email, TO_CURRENT)];
      expect((await open(first, user.accessToken)).json().changed, last).toBe(false);
      // Nothing ends while the change waits for its other link.
      await expectSessionLive(app, elsewhere, admin.accessToken);
      const signedIn = last !== 'current without a session';
      const done = await open(second, signedIn ? user.accessToken : undefined);
      expect(done.json(), last).toMatchObject({ changed: true, user: { email: next } });

      await expectSessionEnded(app, elsewhere, admin.accessToken);
      // The old address hears of the sessions' end with the change.
      expect(mails(user.email, NOTICE)[0]?.text, last).toContain(
        'goes to the new address, and every other session was signed out.',
      );
      if (signedIn) await expectSessionLive(app, asking, admin.accessToken);
      else await expectSessionEnded(app, asking, admin.accessToken);
      // Whoever ended up signed out signs in with the new address.
      expect(await loginStatus(next)).toBe(200);
      // Audited as before: the change, by whoever opened the last link (the sessions' end is part of it).
      const changed = (await events(user.id, from)).find((e) => e.type === 'user.email_changed');
      expect(changed, last).toMatchObject({
        actorId: signedIn ? user.id : null,
        credentialId: signedIn ? decodeJwt(user.accessToken).sid : null,
      });
    }
  });

  it('both links opened at once apply the change once', async () => {
    for (let i = 0; i < 3; i++) {
      const user = await confirmedUser('chg-race');
      const next = uniqueEmail('chg-race-new');
      expect((await ask(user, { new_email: next, password: PASSWORD })).statusCode).toBe(202);
      const answers = await Promise.all([
        open(tokenIn(next, TO_NEW), user.accessToken),
        open(tokenIn(user.email, TO_CURRENT)),
      ]);
      expect(answers.map((a) => a.statusCode)).toEqual([200, 200]);
      expect(answers.map((a) => a.json().changed).sort()).toEqual([false, true]);
      expect((await app.services.repos.users.findById(user.id))?.email).toBe(next);
    }
  });

  it.skipIf(!inject('databaseUrl'))(
    'a cancel and the last link opened at once: the cancel answers 204 only when the change did not apply',
    async () => {
      // An unconfirmed address: the new address's link alone applies the change.
      const user = await registerUser(app, 'chg-cancel-race');
      const next = uniqueEmail('chg-cancel-race-new');
      expect((await ask(user, { new_email: next, password: PASSWORD })).statusCode).toBe(202);
      const holder = new pg.Client({ connectionString: inject('databaseUrl') });
      await holder.connect();
      let answers: [Awaited<ReturnType<typeof open>>, Awaited<ReturnType<typeof open>>];
      try {
        // The link's row held, so both the link's opening and the cancel come to wait for it, in
        // that order: the cancel has seen the change waiting by then.
        await holder.query('BEGIN');
        await holder.query(
          "SELECT 1 FROM email_tokens WHERE user_id = $1 AND purpose = 'email_change' FOR UPDATE",
          [user.id],
        );
        const opening = open(tokenIn(next, TO_NEW), user.accessToken);
        await waitForLockWaiters(holder, 1);
        const cancelling = app.inject({
          method: 'DELETE',
          url: '/v1/auth/email/change',
          headers: bearer(user.accessToken),
        });
        // The cancel waits behind the opening (on the user's row, or on the link's).
        await waitForLockWaiters(holder, 2);
        await holder.query('COMMIT');
        answers = await Promise.all([opening, cancelling]);
      } finally {
        await holder.end();
      }
      const [opened, cancelled] = answers;
      expect(opened.statusCode, opened.body).toBe(200);
      expect(opened.json()).toMatchObject({ changed: true, user: { email: next } });
      // The address did change: a 204 would tell the user they stopped it.
      expect((await app.services.repos.users.findById(user.id))?.email).toBe(next);
      expect(cancelled.statusCode, cancelled.body).toBe(404);
      expect(
        await app.services.audit.list({ subjectId: user.id, type: 'user.email_change_cancelled', limit: 5 }),
      ).toEqual([]);
    },
  );

  it('refuses without the password, from an API key, for the same or a taken address, and changes nothing', async () => {
    const from = new Date(clock.nowMs() - 1000);
    const user = await registerUser(app, 'chg-refused');
    const other = await registerUser(app, 'chg-holder');
    const changeMails = () =>
      mailer.sent.filter((m) => m.subject === TO_NEW || m.subject === TO_CURRENT).length;
    const sent = changeMails();

    const wrong = await ask(user, { new_email: uniqueEmail('chg-x'), password: 'not the password at all' });
    expect(wrong.statusCode).toBe(400);
    expect(wrong.json()).toMatchObject({ errors: [{ field: 'body.password' }] });

    const same = await ask(user, { new_email: user.email.toUpperCase(), password: PASSWORD });
    expect(same.statusCode).toBe(400);
    expect(same.json()).toMatchObject({
      errors: [{ field: 'body.new_email', message: 'is the account’s address already' }],
    });

    const taken = await ask(user, { new_email: other.email, password: PASSWORD });
    expect(taken.statusCode).toBe(409);
    expect(taken.json()).toMatchObject({ code: 'email_taken' });

    for (const payload of [
      { new_email: 'not-an-address', password: PASSWORD },
      { new_email: uniqueEmail('chg-x'), password: PASSWORD, email_confirmed_at: '2020-01-01T00:00:00Z' },
      { password: PASSWORD },
    ]) {
      const res = await ask(user, payload);
      expect(res.statusCode, JSON.stringify(payload)).toBe(400);
      expect(res.headers['content-type']).toContain('application/problem+json');
    }

    const key = await createKey(app, user.accessToken, { scopes: ['account:write', 'account:read'] });
    const byKey = await app.inject({
      method: 'POST',
      url: '/v1/auth/email/change',
      headers: withKey(key.key),
      payload: { new_email: uniqueEmail('chg-x'), password: PASSWORD },
    });
    expect(byKey.statusCode).toBe(403);
    const anonymous = await app.inject({
      method: 'POST',
      url: '/v1/auth/email/change',
      payload: { new_email: uniqueEmail('chg-x'), password: PASSWORD },
    });
    expect(anonymous.statusCode).toBe(401);

    expect(changeMails()).toBe(sent);
    expect((await app.services.repos.users.findById(user.id))?.email).toBe(user.email);
    const failures = (await events(user.id, from)).filter((e) => e.outcome === 'failure').map((e) => e.data);
    expect(failures).toEqual(
      expect.arrayContaining([
        expect.objectContaining({ reason: 'wrong_password' }),
        expect.objectContaining({ reason: 'same_address' }),
        expect.objectContaining({ reason: 'email_taken' }),
      ]),
    );
  });

  it('asks at most once a minute (429 with Retry-After); a newer request replaces the links of the older', async () => {
    const user = await confirmedUser('chg-again');
    const typo = uniqueEmail('chg-typo');
    const meant = uniqueEmail('chg-meant');
    expect((await ask(user, { new_email: typo, password: PASSWORD })).statusCode).toBe(202);
    clock.advance(20);
    const soon = await ask(user, { new_email: meant, password: PASSWORD });
    expect(soon.statusCode).toBe(429);
    expect(soon.headers['retry-after']).toBe('40');
    expect(mails(meant, TO_NEW)).toHaveLength(0);
    clock.advance(41);
    expect((await ask(user, { new_email: meant, password: PASSWORD })).statusCode).toBe(202);
    // The first request's links went with it.
    expect((await open(tokenIn(typo, TO_NEW), user.accessToken)).statusCode).toBe(400);
    expect((await open(tokens(user.email)[0]!)).statusCode).toBe(400);
    expect((await open(tokenIn(meant, TO_NEW), user.accessToken)).json().changed).toBe(false);
    expect((await open(tokenIn(user.email, TO_CURRENT))).json()).toMatchObject({
      changed: true,
      user: { email: meant },
    });

    function tokens(to: string) {
      return mails(to, TO_CURRENT).map((m) => /#token=(pce_[0-9A-Za-z_]+)/.exec(m.text)![1]!);
    }
  });

  it('a request refused for coming too soon spends no code of the second factor', async () => {
    const user = await confirmedUser('chg-mfa-soon');
    const mfa = await turnOnMfa(app, user.accessToken, () => clock.nowMs());
    clock.advance(30);
    const first = await ask(user, {
      new_email: uniqueEmail('chg-soon'),
      password: PASSWORD,
      code: mfa.recoveryCodes[0],
    });
    expect(first.statusCode, first.body).toBe(202);
    const soon = await ask(user, {
      new_email: uniqueEmail('chg-soon'),
      password: PASSWORD,
      code: mfa.recoveryCodes[1],
    });
    expect(soon.statusCode).toBe(429);
    const status = await app.inject({
      method: 'GET',
      url: '/v1/auth/mfa',
      headers: bearer(user.accessToken),
    });
    expect(status.json().recovery_codes_remaining).toBe(9);
  });

  // On PostgreSQL: the test holds the account's second factor until all three requests wait for it
  // (the first for the factor, the others for the account's row it holds), past their checks, so that
  // they race (PGlite has one connection and no second holder).
  it.skipIf(!inject('databaseUrl'))(
    'three requests at once spend one code: those refused behind the first spend none',
    async () => {
      const user = await confirmedUser('chg-mfa-race');
      const mfa = await turnOnMfa(app, user.accessToken, () => clock.nowMs());
      clock.advance(30);
      const holder = new pg.Client({ connectionString: inject('databaseUrl') });
      await holder.connect();
      try {
        await holder.query('BEGIN');
        await holder.query('SELECT 1 FROM mfa_factors WHERE user_id = $1 FOR UPDATE', [user.id]);
        const answers = Promise.all(
          [0, 1, 2].map((i) =>
            ask(user, {
              new_email: uniqueEmail(`chg-race-${i}`),
              password: PASSWORD,
              code: mfa.recoveryCodes[i],
            }),
          ),
        );
        await waitForLockWaiters(holder, 3);
        await holder.query('COMMIT');
        expect((await answers).map((a) => a.statusCode).sort()).toEqual([202, 429, 429]);
      } finally {
        await holder.end();
      }
      const status = await app.inject({
        method: 'GET',
        url: '/v1/auth/mfa',
        headers: bearer(user.accessToken),
      });
      expect(status.json().recovery_codes_remaining).toBe(9);
    },
  );

  it('a mail server failing keeps the earlier request’s links working', async () => {
    const user = await confirmedUser('chg-keep');
    const first = uniqueEmail('chg-keep-first');
    expect((await ask(user, { new_email: first, password: PASSWORD })).statusCode).toBe(202);
    clock.advance(61);
    mailer.failing = true;
    try {
      expect(
        (await ask(user, { new_email: uniqueEmail('chg-keep-second'), password: PASSWORD })).statusCode,
      ).toBe(503);
    } finally {
      mailer.failing = false;
    }
    expect((await open(tokenIn(first, TO_NEW), user.accessToken)).json().changed).toBe(false);
    expect((await open(tokenIn(user.email, TO_CURRENT))).json()).toMatchObject({
      changed: true,
      user: { email: first },
    });
  });

  it('a change in waiting ends with a password change, with signing out everywhere, and when the address is confirmed', async () => {
    // Each time, whoever knew the password asked; the owner's next step voids it.
    const endings: Array<[string, (user: TestUser) => Promise<unknown>]> = [
      [
        'password change',
        (user) =>
          app.inject({
            method: 'POST',
            url: '/v1/auth/password',
            headers: bearer(user.accessToken),
            payload: { current_password: PASSWORD, new_password: 'a different passphrase 9' },
          }),
      ],
      [
        'logout everywhere',
        (user) =>
          app.inject({
            method: 'POST',
            url: '/v1/auth/logout',
            headers: bearer(user.accessToken),
            payload: { scope: 'all' },
          }),
      ],
      [
        'address confirmed',
        async (user) => {
          const confirmation = mails(user.email, 'Confirm your email address').at(-1)!;
          const token = /(pec_[0-9A-Za-z_]+)/.exec(confirmation.text)![1]!;
          const res = await app.inject({ method: 'POST', url: '/v1/auth/email/confirm', payload: { token } });
          expect(res.statusCode, res.body).toBe(200);
        },
      ],
    ];
    for (const [name, end] of endings) {
      const user = await registerUser(app, 'chg-ended');
      const thief = uniqueEmail('chg-ended-thief');
      expect((await ask(user, { new_email: thief, password: PASSWORD })).statusCode, name).toBe(202);
      await end(user);
      // Gone, not merely waiting for a session (which would be a 401).
      expect((await open(tokenIn(thief, TO_NEW))).statusCode, name).toBe(400);
      expect(await app.services.repos.emailTokens.latestFor(user.id, 'email_change'), name).toBeUndefined();
      expect((await app.services.repos.users.findById(user.id))?.email, name).toBe(user.email);
    }
  });

  it('a request whose session ended meanwhile (a reset, signing out everywhere) asks nothing', async () => {
    // The password and the session were checked; then a reset or logout-all committed before the
    // request's transaction: the request sees the session ended under the user's lock.
    const user = await registerUser(app, 'chg-ended-session');
    const row = (await app.services.repos.users.findById(user.id))!;
    const sessionId = decodeJwt(user.accessToken).sid as string;
    await app.inject({
      method: 'POST',
      url: '/v1/auth/logout',
      headers: bearer(user.accessToken),
      payload: { scope: 'all' },
    });
    const next = uniqueEmail('chg-ended-session-new');
    const context = {
      actorType: 'user' as const,
      actorId: user.id,
      ip: null,
      userAgent: null,
      requestId: null,
    };
    await expect(app.services.emailChange.request(row, next, context, { sessionId })).rejects.toMatchObject({
      code: 'invalid_token',
    });
    expect(mails(next, TO_NEW)).toHaveLength(0);
    expect(await app.services.repos.emailTokens.latestFor(user.id, 'email_change')).toBeUndefined();
  });

  it('asks the address the account has when the request is made, not the one read before', async () => {
    // A request whose caller read the account before a change of its own applied (or before its
    // address was confirmed): the links follow the account as it is under the request's lock.
    const user = await registerUser(app, 'chg-stale');
    const stale = (await app.services.repos.users.findById(user.id))!;
    await app.services.repos.users.update(user.id, { emailConfirmedAt: new Date(clock.nowMs()) });
    const next = uniqueEmail('chg-stale-new');
    const requested = await app.services.emailChange.request(stale, next, {
      actorType: 'user',
      actorId: user.id,
      ip: null,
      userAgent: null,
      requestId: null,
    });
    expect(requested.confirmCurrent).toBe(true);
    expect(mails(user.email, TO_CURRENT)).toHaveLength(1);
  });

  it('with two-step verification on, needs a current code too', async () => {
    const user = await confirmedUser('chg-mfa');
    const mfa = await turnOnMfa(app, user.accessToken, () => clock.nowMs());
    const next = uniqueEmail('chg-mfa-new');
    const noCode = await ask(user, { new_email: next, password: PASSWORD });
    expect(noCode.statusCode).toBe(400);
    expect(noCode.json()).toMatchObject({ errors: [{ field: 'body.code' }] });
    const badCode = await ask(user, { new_email: next, password: PASSWORD, code: '000000' });
    expect(badCode.statusCode).toBe(400);
    expect(badCode.json()).toMatchObject({ code: 'invalid_mfa_code' });
    expect(mails(next, TO_NEW)).toHaveLength(0);
    const ok = await ask(user, { new_email: next, password: PASSWORD, code: mfa.code(1) });
    expect(ok.statusCode, ok.body).toBe(202);
  });

  it('links mailed to the old address stop working once it changes; a reset voids a change in waiting', async () => {
    const user = await registerUser(app, 'chg-reset');
    await app.inject({ method: 'POST', url: '/v1/auth/password/forgot', payload: { email: user.email } });
    const resetMail = mailer.sent
      .filter((m) => m.to === user.email && m.subject === 'Reset your password')
      .at(-1)!;
    const resetToken = /(prs_[0-9A-Za-z_]+)/.exec(resetMail.text)![1]!;
    const next = uniqueEmail('chg-reset-new');
    expect((await ask(user, { new_email: next, password: PASSWORD })).statusCode).toBe(202);
    expect((await open(tokenIn(next, TO_NEW), user.accessToken)).json().changed).toBe(true);
    const reset = await app.inject({
      method: 'POST',
      url: '/v1/auth/password/reset',
      payload: { token: resetToken, new_password: 'another good password 1' },
    });
    expect(reset.statusCode).toBe(400);

    // The other way round: a reset (the mailbox's owner) ends a change someone with the password asked for.
    const owner = await confirmedUser('chg-owner');
    const thief = uniqueEmail('chg-thief');
    expect((await ask(owner, { new_email: thief, password: PASSWORD })).statusCode).toBe(202);
    await app.inject({ method: 'POST', url: '/v1/auth/password/forgot', payload: { email: owner.email } });
    const ownerReset = mailer.sent
      .filter((m) => m.to === owner.email && m.subject === 'Reset your password')
      .at(-1)!;
    const ownerToken = /(prs_[0-9A-Za-z_]+)/.exec(ownerReset.text)![1]!;
    const done = await app.inject({
      method: 'POST',
      url: '/v1/auth/password/reset',
      payload: { token: ownerToken, new_password: 'the owner is back 42' },
    });
    expect(done.statusCode, done.body).toBe(204);
    expect((await open(tokenIn(thief, TO_NEW))).statusCode).toBe(400);
    expect((await open(tokenIn(owner.email, TO_CURRENT))).statusCode).toBe(400);
    expect((await app.services.repos.users.findById(owner.id))?.email).toBe(owner.email);
  });

  it('an address registered meanwhile: 409, and the account keeps its address', async () => {
    const user = await registerUser(app, 'chg-raced');
    const next = uniqueEmail('chg-raced-new');
    expect((await ask(user, { new_email: next, password: PASSWORD })).statusCode).toBe(202);
    const squatter = await app.inject({
      method: 'POST',
      url: '/v1/auth/register',
      payload: { email: next, password: PASSWORD },
    });
    expect(squatter.statusCode).toBe(201);
    const res = await open(tokenIn(next, TO_NEW), user.accessToken);
    expect(res.statusCode).toBe(409);
    expect(res.json()).toMatchObject({ code: 'email_taken' });
    expect((await app.services.repos.users.findById(user.id))?.email).toBe(user.email);
  });

  it('refuses expired, malformed and disabled-account links with 400', async () => {
    const late = await registerUser(app, 'chg-late');
    const lateNew = uniqueEmail('chg-late-new');
    expect((await ask(late, { new_email: lateNew, password: PASSWORD })).statusCode).toBe(202);
    clock.advance(3601);
    const expired = await open(tokenIn(lateNew, TO_NEW));
    expect(expired.statusCode).toBe(400);
    expect(expired.json()).toMatchObject({
      code: 'invalid_email_change_token',
      errors: [{ field: 'body.token', message: 'is invalid, expired or used' }],
    });

    const admin = await createAdmin(app);
    const gone = await registerUser(app, 'chg-disabled');
    const goneNew = uniqueEmail('chg-disabled-new');
    expect((await ask(gone, { new_email: goneNew, password: PASSWORD })).statusCode).toBe(202);
    expect((await setUserStatus(app, admin.accessToken, gone.id, 'disabled')).statusCode).toBe(200);
    // The disable voided the link; the user's own session ended with it (401 for the token itself).
    expect((await open(tokenIn(goneNew, TO_NEW))).statusCode).toBe(400);
    expect((await open(tokenIn(goneNew, TO_NEW), gone.accessToken)).statusCode).toBe(401);
    expect((await app.services.repos.users.findById(gone.id))?.email).toBe(gone.email);

    for (const bad of ['', 'pce_short', `pec_${'a'.repeat(12)}_${'b'.repeat(43)}`, 'x'.repeat(600)]) {
      const res = await open(bad);
      expect(res.statusCode, bad.slice(0, 12)).toBe(400);
      expect(res.headers['content-type']).toContain('application/problem+json');
    }
  });

  it('a used or expired link is audited against its account, as used_token or expired_token', async () => {
    const from = new Date(clock.nowMs() - 1000);
    const user = await registerUser(app, 'chg-replay');
    const next = uniqueEmail('chg-replay-new');
    expect((await ask(user, { new_email: next, password: PASSWORD })).statusCode).toBe(202);
    const token = tokenIn(next, TO_NEW);
    expect((await open(token, user.accessToken)).statusCode).toBe(200);
    const replayed = await open(token, user.accessToken);
    expect(replayed.statusCode).toBe(400);
    expect(replayed.json()).toMatchObject({ code: 'invalid_email_change_token' });

    const late = await registerUser(app, 'chg-replay-late');
    const lateNew = uniqueEmail('chg-replay-late-new');
    expect((await ask(late, { new_email: lateNew, password: PASSWORD })).statusCode).toBe(202);
    clock.advance(3601);
    expect((await open(tokenIn(lateNew, TO_NEW))).statusCode).toBe(400);

    const refusals = async (userId: string) =>
      (await events(userId, from))
        .filter((e) => e.type === 'user.email_changed' && e.outcome === 'failure')
        .map((e) => e.data.reason);
    expect(await refusals(user.id)).toEqual(['used_token']);
    expect(await refusals(late.id)).toEqual(['expired_token']);
  });

  it('a mail server failing is a 503 and keeps nothing: the retry mails at once', async () => {
    const user = await confirmedUser('chg-mailfail');
    const next = uniqueEmail('chg-mailfail-new');
    mailer.failing = true;
    try {
      expect((await ask(user, { new_email: next, password: PASSWORD })).statusCode).toBe(503);
    } finally {
      mailer.failing = false;
    }
    const retry = await ask(user, { new_email: next, password: PASSWORD });
    expect(retry.statusCode, retry.body).toBe(202);
  });
});

describe('changing a user’s email address for them (support)', () => {
  let app: FastifyInstance;
  const mailer = capturingMailer();
  const clock = createTestClock();
  beforeAll(async () => {
    app = await buildTestApp({ deps: { mailer, clock } });
  });
  const askFor = (
    token: string,
    userId: string,
    newEmail: string,
    headers: Record<string, string> = bearer(token),
  ) =>
    app.inject({
      method: 'POST',
      url: `/v1/users/${userId}/email-change`,
      headers,
      payload: { new_email: newEmail },
    });
  const tokenTo = (to: string) =>
    /#token=(pce_[0-9A-Za-z_]+)|\n\n(pce_[0-9A-Za-z_]+)\n/
      .exec(mailer.sent.filter((m) => m.to === to && m.subject === TO_NEW).at(-1)?.text ?? '')
      ?.slice(1)
      .find(Boolean);

  it('mails the new address alone, even when the current one was confirmed; the user’s link applies it', async () => {
    const admin = await createAdmin(app);
    const user = await registerUser(app, 'chg-support');
    await app.services.repos.users.update(user.id, { emailConfirmedAt: new Date(clock.nowMs()) });
    const next = uniqueEmail('chg-support-new');
    const res = await askFor(admin.accessToken, user.id, next);
    expect(res.statusCode, res.body).toBe(202);
    expect(res.json()).toMatchObject({ new_email: next, confirm_current: false });
    expect(mailer.sent.some((m) => m.to === user.email && m.subject === TO_CURRENT)).toBe(false);
    const token = tokenTo(next);
    expect(token).toBeDefined();
    const done = await app.inject({
      method: 'POST',
      url: '/v1/auth/email/change/confirm',
      payload: { token },
    });
    expect(done.json()).toMatchObject({ changed: true, user: { id: user.id, email: next } });
    expect(mailer.sent.some((m) => m.to === user.email && m.subject === NOTICE)).toBe(true);
    const asked = await app.services.audit.list({
      subjectId: user.id,
      type: 'user.email_change_requested',
      limit: 5,
    });
    expect(asked[0]).toMatchObject({
      actorId: admin.id,
      data: { by_administrator: true, confirm_current: false },
    });
  });

  it('a service holding users:write asks too, and its link needs no session', async () => {
    const admin = await createAdmin(app);
    const client = await createClient(app, admin.accessToken, {
      scopes: ['users:write', 'account:read', 'account:write', 'api_keys:own'],
    });
    const { access_token } = await clientToken(app, client);
    const user = await registerUser(app, 'chg-by-service');
    const next = uniqueEmail('chg-by-service-new');
    const res = await askFor(access_token, user.id, next);
    expect(res.statusCode, res.body).toBe(202);
    const token = tokenTo(next);
    const done = await app.inject({
      method: 'POST',
      url: '/v1/auth/email/change/confirm',
      payload: { token },
    });
    expect(done.json()).toMatchObject({ changed: true, user: { email: next } });
    const changed = await app.services.audit.list({
      subjectId: user.id,
      type: 'user.email_changed',
      limit: 5,
    });
    expect(changed[0]?.data).toMatchObject({ requested_by: client.client_id });
  });

  /** Opens the new address's link, as the user would (no session). */
  const openLink = (token: string | undefined) =>
    app.inject({ method: 'POST', url: '/v1/auth/email/change/confirm', payload: { token } });
  const emailOf = async (adminToken: string, userId: string) =>
    (await app.inject({ method: 'GET', url: `/v1/users/${userId}`, headers: bearer(adminToken) })).json()
      .email as string;

  it('a change an administrator asked for is void once they are deleted or disabled: its link is refused and audited', async () => {
    const admin = await createAdmin(app);
    for (const removal of ['deleted', 'disabled'] as const) {
      const requester = await createAdmin(app);
      const user = await registerUser(app, `chg-orphan-${removal}`);
      const next = uniqueEmail(`chg-orphan-${removal}-new`);
      expect((await askFor(requester.accessToken, user.id, next)).statusCode).toBe(202);
      const removed =
        removal === 'deleted'
          ? await app.inject({
              method: 'DELETE',
              url: `/v1/users/${requester.id}`,
              headers: bearer(admin.accessToken),
            })
          : await setUserStatus(app, admin.accessToken, requester.id, 'disabled');
      expect(removed.statusCode, removed.body).toBe(removal === 'deleted' ? 204 : 200);

      const opened = await openLink(tokenTo(next));
      expect(opened.statusCode, opened.body).toBe(400);
      expect(opened.json()).toMatchObject({ code: 'invalid_email_change_token' });
      expect(await emailOf(admin.accessToken, user.id)).toBe(user.email);
      const [refused] = await app.services.audit.list({
        subjectId: user.id,
        type: 'user.email_changed',
        limit: 5,
      });
      expect(refused).toMatchObject({ outcome: 'failure', data: { reason: 'expired_token' } });
      // Nothing waits any more in the user's view either.
      const pending = await app.inject({
        method: 'GET',
        url: '/v1/auth/email/change',
        headers: bearer(user.accessToken),
      });
      expect(pending.statusCode).toBe(404);
    }
  });

  it('an API key signing its owner out everywhere does not void a change in waiting: cancelling takes a session', async () => {
    const admin = await createAdmin(app);
    const user = await registerUser(app, 'chg-key-logout');
    const next = uniqueEmail('chg-key-logout-new');
    expect((await askFor(admin.accessToken, user.id, next)).statusCode).toBe(202);
    // A leaked key that may sign its owner out (account:write) is no way around DELETE
    // /v1/auth/email/change's refusal of keys: support's change stands.
    const key = await createKey(app, user.accessToken, { scopes: ['account:read', 'account:write'] });
    const out = await app.inject({
      method: 'POST',
      url: '/v1/auth/logout',
      headers: withKey(key.key),
      payload: { scope: 'all' },
    });
    expect(out.statusCode, out.body).toBe(204);
    // It did sign the owner out.
    expect(
      (await app.inject({ method: 'GET', url: '/v1/auth/me', headers: bearer(user.accessToken) })).statusCode,
    ).toBe(401);
    // Nor does the key read where the account is going (a session's business, 403).
    const pending = await app.inject({
      method: 'GET',
      url: '/v1/auth/email/change',
      headers: withKey(key.key),
    });
    expect(pending.statusCode, pending.body).toBe(403);
    expect(pending.body).not.toContain(next);
    expect(await app.services.emailChange.pending(user.id)).toMatchObject({
      newEmail: next,
      waitingFor: ['new_address'],
    });
    const opened = await openLink(tokenTo(next));
    expect(opened.statusCode, opened.body).toBe(200);
    expect(opened.json()).toMatchObject({ changed: true, user: { id: user.id, email: next } });
  });

  /** The user's last `user.email_changed` event. */
  const lastChange = async (userId: string) =>
    (await app.services.audit.list({ subjectId: userId, type: 'user.email_changed', limit: 5 }))[0];

  it('a change asked for by an administrator demoted since, or for a user who now holds more than them, is refused when opened and audited why', async () => {
    const admin = await createAdmin(app);
    // Demoted: the administrator loses admin, and with it users:write.
    const demoted = await createAdmin(app);
    const user = await registerUser(app, 'chg-demoted');
    const next = uniqueEmail('chg-demoted-new');
    expect((await askFor(demoted.accessToken, user.id, next)).statusCode).toBe(202);
    const removal = await app.inject({
      method: 'DELETE',
      url: `/v1/users/${demoted.id}/roles/admin`,
      headers: bearer(admin.accessToken),
    });
    expect(removal.statusCode, removal.body).toBe(204);
    const opened = await openLink(tokenTo(next));
    expect(opened.statusCode, opened.body).toBe(400);
    expect(opened.json()).toMatchObject({ code: 'invalid_email_change_token' });
    expect(await emailOf(admin.accessToken, user.id)).toBe(user.email);
    expect(await lastChange(user.id)).toMatchObject({
      outcome: 'failure',
      data: { reason: 'requester_lacks_permission', requested_by: demoted.id, missing: ['users:write'] },
    });
    // The link is spent: the administrator getting admin back moves nothing.
    await app.services.repos.users.assignRole(demoted.id, 'admin', null);
    expect((await openLink(tokenTo(next))).statusCode).toBe(400);

    // The grant ceiling: a user manager asks for a plain user, who is then made an auditor.
    const manager = await registerUser(app, 'chg-manager');
    await grantRole(app, manager.id, ['users:write', 'users:read']);
    const managerToken = (await login(app, manager.email)).session.access_token;
    const promoted = await registerUser(app, 'chg-promoted');
    const moved = uniqueEmail('chg-promoted-new');
    expect((await askFor(managerToken, promoted.id, moved)).statusCode).toBe(202);
    await grantRole(app, promoted.id, ['audit:read']);
    expect((await openLink(tokenTo(moved))).statusCode).toBe(400);
    expect(await emailOf(admin.accessToken, promoted.id)).toBe(promoted.email);
    expect(await lastChange(promoted.id)).toMatchObject({
      data: { reason: 'requester_lacks_permission', requested_by: manager.id, missing: ['audit:read'] },
    });
    // What the manager still reaches still moves.
    const plain = await registerUser(app, 'chg-plain');
    const plainNext = uniqueEmail('chg-plain-new');
    expect((await askFor(managerToken, plain.id, plainNext)).statusCode).toBe(202);
    expect((await openLink(tokenTo(plainNext))).json()).toMatchObject({ changed: true });
  });

  it('a change a service asked for is refused when opened once the service is disabled', async () => {
    const admin = await createAdmin(app);
    const client = await createClient(app, admin.accessToken, {
      scopes: ['users:write', 'account:read', 'account:write', 'api_keys:own'],
    });
    const { access_token } = await clientToken(app, client);
    const user = await registerUser(app, 'chg-service-off');
    const next = uniqueEmail('chg-service-off-new');
    expect((await askFor(access_token, user.id, next)).statusCode).toBe(202);
    const disabled = await app.inject({
      method: 'PATCH',
      url: `/v1/clients/${client.id}`,
      headers: bearer(admin.accessToken),
      payload: { status: 'disabled' },
    });
    expect(disabled.statusCode, disabled.body).toBe(200);
    expect((await openLink(tokenTo(next))).statusCode).toBe(400);
    expect(await emailOf(admin.accessToken, user.id)).toBe(user.email);
    expect(await lastChange(user.id)).toMatchObject({
      outcome: 'failure',
      data: { reason: 'requester_gone', requested_by: client.client_id },
    });
  });

  it('never one’s own (a session, or an API key), nor a disabled user; unknown users are 404', async () => {
    const admin = await createAdmin(app);
    const linksBefore = mailer.sent.filter((m) => m.subject === TO_NEW).length;
    const own = await askFor(admin.accessToken, admin.id, uniqueEmail('chg-self'));
    expect(own.statusCode).toBe(403);
    const key = await createKey(app, admin.accessToken, { scopes: ['users:write'] });
    const byKey = await askFor('', admin.id, uniqueEmail('chg-self'), withKey(key.key));
    expect(byKey.statusCode).toBe(403);

    const user = await registerUser(app, 'chg-support-off');
    expect((await setUserStatus(app, admin.accessToken, user.id, 'disabled')).statusCode).toBe(200);
    const disabled = await askFor(admin.accessToken, user.id, uniqueEmail('chg-off'));
    expect(disabled.statusCode).toBe(409);
    expect(
      await askFor(admin.accessToken, '00000000-0000-4000-8000-000000000000', uniqueEmail('x')),
    ).toMatchObject({
      statusCode: 404,
    });
    expect(mailer.sent.filter((m) => m.subject === TO_NEW)).toHaveLength(linksBefore);
  });
});

describe('changing the email address, throttled', () => {
  it('a wrong password counts toward the sign-in lockout, which then stops the change as it stops sign-in', async () => {
    const app = await buildTestApp({
      env: { RATE_LIMIT_ENABLED: 'true', LOGIN_MAX_FAILURES_PER_HOUR: '3' },
      deps: { mailer: capturingMailer() },
    });
    const user = await registerUser(app, 'chg-lockout');
    const ask = (password: string, address: string) =>
      app.inject({
        method: 'POST',
        url: '/v1/auth/email/change',
        remoteAddress: address,
        headers: bearer(user.accessToken),
        payload: { new_email: uniqueEmail('chg-lockout-new'), password },
      });
    for (let i = 0; i < 3; i++)
      expect((await ask(`wrong guess ${i}`, `10.2.0.${i + 1}`)).statusCode).toBe(400);
    const locked = await ask(PASSWORD, '10.2.0.99');
    expect(locked.statusCode, locked.body).toBe(429);
    expect(Number(locked.headers['retry-after'])).toBeGreaterThan(0);
    const signIn = await app.inject({
      method: 'POST',
      url: '/v1/auth/login',
      remoteAddress: '10.2.0.98',
      payload: { email: user.email, password: PASSWORD },
    });
    expect(signIn.statusCode).toBe(429);
  });

  it('mails one new address at most its hourly cap, however many accounts ask (429 after, nothing mailed)', async () => {
    const mailer = capturingMailer();
    const clock = createTestClock();
    const app = await buildTestApp({
      env: { EMAIL_CHANGE_URL: CHANGE_URL, RATE_LIMIT_ENABLED: 'true' },
      deps: { mailer, clock },
    });
    const target = uniqueEmail('chg-flood-target');
    const toTarget = () => mailer.sent.filter((m) => m.to === target && m.subject === TO_NEW);
    const ask = (user: TestUser, i: number) =>
      app.inject({
        method: 'POST',
        url: '/v1/auth/email/change',
        remoteAddress: `10.3.0.${i + 1}`,
        headers: bearer(user.accessToken),
        payload: { new_email: target, password: PASSWORD },
      });
    const statuses: number[] = [];
    let refused: Awaited<ReturnType<typeof ask>> | undefined;
    let last: TestUser | undefined;
    for (let i = 0; i < MAILS_PER_ACCOUNT_HOUR + 2; i++) {
      // Each from an account of its own, under the one-a-minute limit per account.
      last = await registerUser(app, 'chg-flood');
      const res = await ask(last, i);
      statuses.push(res.statusCode);
      if (res.statusCode === 429) refused = res;
    }
    expect(statuses).toEqual([...Array(MAILS_PER_ACCOUNT_HOUR).fill(202), 429, 429]);
    expect(toTarget()).toHaveLength(MAILS_PER_ACCOUNT_HOUR);
    expect(refused!.headers['content-type']).toContain('application/problem+json');
    expect(refused!.json()).toMatchObject({ code: 'rate_limited' });
    expect(Number(refused!.headers['retry-after'])).toBeGreaterThan(0);
    const [event] = await app.services.audit.list({
      type: 'user.email_change_requested',
      subjectId: last!.id,
      limit: 1,
    });
    expect(event).toMatchObject({ outcome: 'failure', data: { reason: 'too_many' } });
    // The refused request wrote nothing: no change waits.
    const pending = await app.inject({
      method: 'GET',
      url: '/v1/auth/email/change',
      headers: bearer(last!.accessToken),
    });
    expect(pending.statusCode).toBe(404);

    // An hour on, the address is mailed again.
    clock.advance(3601);
    const later = await registerUser(app, 'chg-flood-later');
    expect((await ask(later, 99)).statusCode).toBe(202);
    expect(toTarget()).toHaveLength(MAILS_PER_ACCOUNT_HOUR + 1);
  });
});

/**
 * The new address's place under its hourly cap is taken before anything else and given back when
 * nothing reaches it: requests sent at once, from as many accounts, all passed the cap's check before
 * any was counted (a third party's mailbox flooded past its cap). In memory, and through Redis.
 */
describe.each(await capCountings('email change'))(
  'changes to one address asked at once, counted $counts',
  ({ env, skip }) => {
    let app: FastifyInstance;
    const mailer = capturingMailer();
    const targets: string[] = [];

    beforeAll(async () => {
      if (skip) return;
      app = await buildTestApp({
        // Passwords checked side by side: the requests reach their mails together, not one at a time.
        env: {
          EMAIL_CHANGE_URL: CHANGE_URL,
          RATE_LIMIT_ENABLED: 'true',
          PASSWORD_HASH_CONCURRENCY: '16',
          ...env,
        },
        deps: { mailer },
      });
    });
    afterAll(async () => {
      // Counts in Redis end with their hour; these are taken out now.
      const redis = app?.services.redis;
      if (!redis) return;
      for (const target of targets) {
        const key = mailCapKey(app.services.config.secretPepper, 'email_change', target);
        await redis.del(mailsPerHourKey(key));
      }
    });

    /** An address no account has, whose mails are counted from nothing. */
    const newTarget = () => {
      const target = uniqueEmail('chg-burst-target');
      targets.push(target);
      return target;
    };
    const toTarget = (target: string) => mailer.sent.filter((m) => m.to === target && m.subject === TO_NEW);
    const ask = (user: TestUser, target: string, i: number) =>
      app.inject({
        method: 'POST',
        url: '/v1/auth/email/change',
        remoteAddress: `10.4.${i}.${Math.floor(Math.random() * 250) + 1}`,
        headers: bearer(user.accessToken),
        payload: { new_email: target, password: PASSWORD },
      });
    /** Accounts of their own, registered from addresses of their own (the per-IP limits may count in Redis). */
    const accounts = async (n: number) => {
      const users: TestUser[] = [];
      for (let i = 0; i < n; i++) {
        const email = uniqueEmail('chg-burst');
        const res = await app.inject({
          method: 'POST',
          url: '/v1/auth/register',
          remoteAddress: randomAddress(),
          payload: { email, password: PASSWORD },
        });
        expect(res.statusCode, res.body).toBe(201);
        const { user, session } = res.json();
        users.push({
          id: user.id,
          email,
          password: PASSWORD,
          accessToken: session.access_token,
          refreshToken: session.refresh_token,
        });
      }
      return users;
    };

    it.skipIf(skip)(
      'mails the address at most its cap, however many accounts ask at once: the others get the 429, nothing written',
      async () => {
        const target = newTarget();
        const users = await accounts(MAILS_PER_ACCOUNT_HOUR + 4);
        const answers = await Promise.all(users.map((user, i) => ask(user, target, i)));
        const statuses = answers.map((a) => a.statusCode);
        expect(statuses.filter((s) => s === 202)).toHaveLength(MAILS_PER_ACCOUNT_HOUR);
        expect(statuses.filter((s) => s === 429)).toHaveLength(4);
        expect(toTarget(target)).toHaveLength(MAILS_PER_ACCOUNT_HOUR);
        for (const [i, res] of answers.entries()) {
          const [event] = await app.services.audit.list({
            type: 'user.email_change_requested',
            subjectId: users[i]!.id,
            limit: 1,
          });
          if (res.statusCode === 202) {
            expect(event).toMatchObject({ outcome: 'success' });
            continue;
          }
          expect(res.json()).toMatchObject({ code: 'rate_limited' });
          expect(Number(res.headers['retry-after'])).toBeGreaterThan(0);
          expect(event).toMatchObject({ outcome: 'failure', data: { reason: 'too_many' } });
          const pending = await app.inject({
            method: 'GET',
            url: '/v1/auth/email/change',
            headers: bearer(users[i]!.accessToken),
          });
          expect(pending.statusCode).toBe(404);
        }
      },
    );

    it.skipIf(skip)('a request whose mail the server refused gives its place back', async () => {
      const target = newTarget();
      const users = await accounts(MAILS_PER_ACCOUNT_HOUR * 2 + 1);
      mailer.failing = true;
      try {
        for (const [i, user] of users.slice(0, MAILS_PER_ACCOUNT_HOUR).entries())
          expect((await ask(user, target, i)).statusCode).toBe(503);
      } finally {
        mailer.failing = false;
      }
      // Nothing reached the address: its cap is whole.
      for (const [i, user] of users.slice(MAILS_PER_ACCOUNT_HOUR).entries()) {
        const res = await ask(user, target, MAILS_PER_ACCOUNT_HOUR + i);
        expect(res.statusCode, `request ${i}`).toBe(i < MAILS_PER_ACCOUNT_HOUR ? 202 : 429);
      }
      expect(toTarget(target)).toHaveLength(MAILS_PER_ACCOUNT_HOUR);
    });
  },
);

describe('changing the email address without a mail server', () => {
  it('is off in production without SMTP_URL: 404, and nothing is kept', async () => {
    const app = await buildTestApp({ env: { NODE_ENV: 'production' } });
    const user = await registerUser(app, 'chg-nomail');
    const res = await app.inject({
      method: 'POST',
      url: '/v1/auth/email/change',
      headers: bearer(user.accessToken),
      payload: { new_email: uniqueEmail('chg-nomail-new'), password: PASSWORD },
    });
    expect(res.statusCode).toBe(404);
    expect(res.json().detail).toContain('SMTP_URL');
  });
});

describe('email change and invitation links at rest (SECURITY.md: secrets as HMACs, none in the log)', () => {
  it('stores only the HMAC of each link and writes none of them to the log', async () => {
    const { lines, logger } = captureLogs('debug');
    const mailer = capturingMailer();
    const app = await buildTestApp({ env: { EMAIL_CHANGE_URL: CHANGE_URL }, deps: { mailer, logger } });
    const admin = await createAdmin(app);
    const user = await registerUser(app, 'chg-at-rest');
    await app.services.repos.users.update(user.id, { emailConfirmedAt: new Date() });
    const next = uniqueEmail('chg-at-rest-new');
    const asked = await app.inject({
      method: 'POST',
      url: '/v1/auth/email/change',
      headers: bearer(user.accessToken),
      payload: { new_email: next, password: PASSWORD },
    });
    expect(asked.statusCode, asked.body).toBe(202);
    const invitee = uniqueEmail('invited-at-rest');
    const invited = await app.inject({
      method: 'POST',
      url: '/v1/users',
      headers: bearer(admin.accessToken),
      payload: { email: invitee },
    });
    expect(invited.statusCode, invited.body).toBe(201);

    const tokens = mailer.sent
      .filter((m) => [next, user.email, invitee].includes(m.to) && /token|code/i.test(m.text))
      .map((m) => /(pce_|prs_)[0-9A-Za-z_]+/.exec(m.text)?.[0])
      .filter((t): t is string => t !== undefined);
    expect(tokens).toHaveLength(3);
    for (const token of tokens) {
      // At least 128 random bits, in the service's secret format.
      expect(token).toMatch(/^(pce|prs)_[0-9A-Za-z]{12}_[0-9A-Za-z]{43}[0-9A-Za-z]{6}$/);
    }
    const { secretPepper } = testConfig();
    const stored = await selectRows<{ token_hash: string }>(
      app.services.db,
      sql`select token_hash from email_tokens
          where user_id in (${user.id}, ${invited.json().id}) and purpose <> 'email_confirmation'`,
    );
    expect(stored.map((r) => r.token_hash).sort()).toEqual(
      tokens.map((t) => keyedHash(secretPepper, t)).sort(),
    );
    const log = lines.join('');
    expect(log.length).toBeGreaterThan(0);
    for (const token of tokens) expect(log).not.toContain(token);
  });
});
