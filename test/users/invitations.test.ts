import { sql } from 'drizzle-orm';
import { selectRows } from '../../src/db/client.js';
import type { FastifyInstance } from 'fastify';
import { afterAll, beforeAll, beforeEach, describe, expect, it, vi } from 'vitest';
import { ownDatabase } from '../support/database.js';
import { buildTestApp, uniqueEmail } from '../support/app.js';
import { createTestClock } from '../support/clock.js';
import { createAdmin, login, registerUser, type TestUser } from '../support/factories.js';
import { bearer } from '../support/http.js';
import { capturingMailer, signInByLinks } from '../support/mail.js';
import { createKey, withKey } from '../api-keys/helpers.js';
import { userWith } from '../clients/helpers.js';

const RESET_URL = 'https://app.example.test/reset';
const CHOSEN = 'my own chosen passphrase';

/*
 * On a database of its own: the clock here runs days ahead, past the publication window of a key
 * another file retires on the shared database (24 h + 10 min from the wall clock's now), which this
 * app's reload would unpublish (its tokens refused mid-test), and this app's housekeeping would retire
 * other files' retiring keys (as mfa.test.ts's TOTP describe found).
 */
describe('invitations: accounts an administrator makes', () => {
  let own: Awaited<ReturnType<typeof ownDatabase>>;
  let app: FastifyInstance;
  let admin: TestUser;
  const mailer = capturingMailer();
  const clock = createTestClock();
  beforeAll(async () => {
    own = await ownDatabase('invitations');
    app = await buildTestApp({
      env: { PASSWORD_RESET_URL: RESET_URL },
      deps: { database: own.database, mailer, clock },
    });
    admin = await createAdmin(app);
  });
  afterAll(async () => {
    await app?.close();
    await own?.dispose();
  });
  // The tests move the clock by days: a fresh administrator's token for each.
  beforeEach(async () => {
    admin = { ...admin, accessToken: (await login(app, admin.email, admin.password)).session.access_token };
  });

  const invite = (payload: Record<string, unknown>, headers?: Record<string, string>) =>
    app.inject({ method: 'POST', url: '/v1/users', headers: headers ?? bearer(admin.accessToken), payload });
  const invitationTo = (email: string) => {
    const mail = mailer.sent.filter((m) => m.to === email && m.subject === 'You are invited').at(-1);
    expect(mail, `an invitation to ${email}`).toBeDefined();
    return /reset#token=(prs_[0-9A-Za-z_]+)/.exec(mail!.text)![1]!;
  };
  const choose = (token: string, password = CHOSEN) =>
    app.inject({
      method: 'POST',
      url: '/v1/auth/password/reset',
      payload: { token, new_password: password },
    });
  const loginStatus = async (email: string, password = CHOSEN) =>
    (await app.inject({ method: 'POST', url: '/v1/auth/login', payload: { email, password } })).statusCode;

  it('makes an active account without a password; the invitation’s link sets one and confirms the address', async () => {
    const email = uniqueEmail('invited');
    const res = await invite({ email: email.toUpperCase(), display_name: 'Ada Lovelace' });
    expect(res.statusCode, res.body).toBe(201);
    const user = res.json();
    expect(user).toMatchObject({ email, status: 'active', email_confirmed_at: null });
    expect(res.headers.location).toBe(`/v1/users/${user.id}`);
    const mail = mailer.sent.find((m) => m.to === email && m.subject === 'You are invited')!;
    expect(mail.text).toContain('within 7 days');

    // No password yet: sign-in answers as for a wrong one.
    expect(await loginStatus(email)).toBe(401);
    const roles = await app.inject({
      method: 'GET',
      url: `/v1/users/${user.id}/roles`,
      headers: bearer(admin.accessToken),
    });
    expect(roles.json().roles).toEqual(['user']);
    const profile = await app.inject({
      method: 'GET',
      url: `/v1/profiles/${user.id}`,
      headers: bearer(admin.accessToken),
    });
    expect(profile.json().display_name).toBe('Ada Lovelace');

    // A day later (past a reset link's 30 minutes), the invitation still works, once.
    clock.advance(86_400);
    const token = invitationTo(email);
    expect((await choose(token)).statusCode).toBe(204);
    expect((await choose(token, 'another passphrase 2')).statusCode).toBe(400);
    const session = await login(app, email, CHOSEN);
    const me = await app.inject({
      method: 'GET',
      url: '/v1/auth/me',
      headers: bearer(session.session.access_token),
    });
    expect(me.json().user.email_confirmed_at).not.toBeNull();
    // A first password replaces none: no notice of a reset (the capturing mailer keeps a mail as it is sent).
    expect(mailer.sent.filter((m) => m.to === email).map((m) => m.subject)).toEqual(['You are invited']);

    const events = await app.services.audit.list({ subjectId: user.id, type: 'user.invited', limit: 5 });
    expect(events[0]).toMatchObject({ actorId: admin.id, outcome: 'success' });
  });

  it('an invitation runs out after INVITATION_TTL (7 days); forgot-password mails a new link', async () => {
    const email = uniqueEmail('invited-late');
    expect((await invite({ email })).statusCode).toBe(201);
    const token = invitationTo(email);
    clock.advance(7 * 86_400 + 1);
    expect((await choose(token)).statusCode).toBe(400);
    expect(
      (await app.inject({ method: 'POST', url: '/v1/auth/password/forgot', payload: { email } })).statusCode,
    ).toBe(204);
    const reset = mailer.sent.filter((m) => m.to === email && m.subject === 'Reset your password').at(-1)!;
    const fresh = /reset#token=(prs_[0-9A-Za-z_]+)/.exec(reset.text)![1]!;
    expect((await choose(fresh)).statusCode).toBe(204);
    expect(await loginStatus(email)).toBe(200);
  });

  it('refuses a taken or bad address, and a caller who does not hold what the user role gives', async () => {
    // Someone's own account (with a password), in any case.
    const owner = await registerUser(app, 'invited-owner');
    const again = await invite({ email: owner.email.toUpperCase() });
    expect(again.statusCode).toBe(409);
    expect(again.json()).toMatchObject({ code: 'email_taken' });
    for (const payload of [{ email: 'nope' }, { email: uniqueEmail('x'), roles: ['admin'] }, {}]) {
      const res = await invite(payload);
      expect(res.statusCode, JSON.stringify(payload)).toBe(400);
    }
    // An API key with users:write alone would hand out account:* it does not hold.
    const key = await createKey(app, admin.accessToken, { scopes: ['users:write'] });
    const nobody = uniqueEmail('invited-by-key');
    const byKey = await invite({ email: nobody }, withKey(key.key));
    expect(byKey.statusCode).toBe(403);
    expect(byKey.json().detail).toBe(
      'You cannot invite a user: every account holds the user role, which gives permissions you do not hold ' +
        'yourself: account:read, account:write, api_keys:own',
    );
    expect(await app.services.repos.users.findByEmail(nobody)).toBeUndefined();
  });

  it('sends an invitation not yet taken again (200), at most once a minute; a taken one is an account like any other', async () => {
    const email = uniqueEmail('invited-again');
    const first = await invite({ email });
    expect(first.statusCode).toBe(201);
    const firstToken = invitationTo(email);
    const soon = await invite({ email });
    expect(soon.statusCode).toBe(409);
    expect(soon.json().detail).toContain('less than a minute ago');
    clock.advance(61);
    const again = await invite({ email, display_name: 'Grace Hopper' });
    expect(again.statusCode, again.body).toBe(200);
    expect(again.json().id).toBe(first.json().id);
    // The name given again is the invitation's now.
    const profile = await app.inject({
      method: 'GET',
      url: `/v1/profiles/${first.json().id}`,
      headers: bearer(admin.accessToken),
    });
    expect(profile.json().display_name).toBe('Grace Hopper');
    // The history says it: the name changed with this invitation, and not with one giving it again.
    const invited = async () =>
      (await app.services.audit.list({ subjectId: first.json().id, type: 'user.invited', limit: 10 })).map(
        (e) => e.data,
      );
    expect((await invited())[0]).toMatchObject({ again: true, display_name_changed: true });
    clock.advance(61);
    expect((await invite({ email, display_name: 'Grace Hopper' })).statusCode).toBe(200);
    expect((await invited())[0]).toEqual(expect.not.objectContaining({ display_name_changed: true }));
    const secondToken = invitationTo(email);
    expect(secondToken).not.toBe(firstToken);
    expect((await choose(firstToken)).statusCode).toBe(400);
    expect((await choose(secondToken)).statusCode).toBe(204);
    clock.advance(61);
    const taken = await invite({ email });
    expect(taken.statusCode).toBe(409);
    expect(taken.json()).toMatchObject({ code: 'email_taken' });
  });

  it('an invited user who proved the address and signed in by a link holds the account: invited again, 409 email_taken', async () => {
    const email = uniqueEmail('invited-by-link');
    const first = await invite({ email, display_name: 'Ada Lovelace' });
    expect(first.statusCode).toBe(201);
    // No password chosen: the address confirmed (a confirmation link asked for again), then a sign-in link.
    const accessToken = await signInByLinks(app, mailer, email);
    const renamed = await app.inject({
      method: 'PATCH',
      url: '/v1/profiles/me',
      headers: bearer(accessToken),
      payload: { display_name: 'Countess of Lovelace' },
    });
    expect(renamed.statusCode, renamed.body).toBe(200);
    clock.advance(61);
    const invitations = mailer.sent.filter((m) => m.to === email && m.subject === 'You are invited').length;
    const again = await invite({ email, display_name: 'Someone Else' });
    expect(again.statusCode, again.body).toBe(409);
    expect(again.json()).toMatchObject({ code: 'email_taken' });
    expect(mailer.sent.filter((m) => m.to === email && m.subject === 'You are invited')).toHaveLength(
      invitations,
    );
    const profile = await app.inject({
      method: 'GET',
      url: `/v1/profiles/${first.json().id}`,
      headers: bearer(admin.accessToken),
    });
    expect(profile.json().display_name).toBe('Countess of Lovelace');
  });

  it('of one address invited several times at once, makes one account; the others are told it was just mailed (409 conflict)', async () => {
    const email = uniqueEmail('invited-at-once');
    const answers = await Promise.all([1, 2, 3, 4, 5].map(() => invite({ email })));
    expect(answers.filter((r) => r.statusCode === 201)).toHaveLength(1);
    for (const r of answers.filter((a) => a.statusCode !== 201)) {
      expect(r.statusCode).toBe(409);
      expect(r.json().code).toBe('conflict');
    }
  });

  it('sends an invited administrator’s invitation again only for a caller who holds what they hold (403, the link mailed stays good)', async () => {
    const email = uniqueEmail('invited-boss');
    const first = await invite({ email });
    expect(first.statusCode).toBe(201);
    const granted = await app.inject({
      method: 'PUT',
      url: `/v1/users/${first.json().id}/roles/admin`,
      headers: bearer(admin.accessToken),
    });
    expect(granted.statusCode, granted.body).toBeLessThan(300);
    const firstToken = invitationTo(email);
    const manager = await userWith(app, ['users:read', 'users:write'], 'invite-manager');
    clock.advance(61);
    const mailed = mailer.sent.length;
    const again = await invite({ email }, bearer(manager.accessToken));
    expect(again.statusCode, again.body).toBe(403);
    expect(mailer.sent.length).toBe(mailed);
    expect((await choose(firstToken)).statusCode).toBe(204);
  });

  it('sends the invitation once the account, its link and its mail have committed: nothing is held while the mail server answers', async () => {
    const email = uniqueEmail('invited-after');
    const send = mailer.send;
    let seenWhileSending: unknown = 'not sent';
    mailer.send = async function (message) {
      // The mail server's turn: the account is committed and its row free (another connection reads
      // and locks it at once); a send inside the transaction saw neither.
      seenWhileSending = await app.services.db.transaction(async (tx) => {
        const [row] = await selectRows<{ id: string }>(
          tx,
          sql`select id from users where email = ${email} for update nowait`,
        );
        return row?.id;
      });
      return send.call(this, message);
    };
    try {
      const res = await invite({ email });
      expect(res.statusCode, res.body).toBe(201);
      expect(seenWhileSending).toBe(res.json().id);
      invitationTo(email);
    } finally {
      mailer.send = send;
    }
  });

  it('keeps the invitation when the mail server refuses it, and mails it once the server is back', async () => {
    const email = uniqueEmail('invited-nomail');
    mailer.failing = true;
    let created: { id: string };
    try {
      const res = await invite({ email });
      expect(res.statusCode, res.body).toBe(201);
      created = res.json();
      await expect.poll(async () => (await app.services.outbox!.pending(created.id)).length).toBe(1);
    } finally {
      mailer.failing = false;
    }
    clock.advance(3600);
    await app.services.outbox!.deliverDue();
    const token = invitationTo(email);
    expect((await choose(token)).statusCode).toBe(204);
    expect(await loginStatus(email)).toBe(200);
  });
});

describe('invitations without a mail server', () => {
  it('are off in production without SMTP_URL: 404, and no account is made', async () => {
    const app = await buildTestApp({ env: { NODE_ENV: 'production' } });
    const admin = await createAdmin(app);
    const email = uniqueEmail('invited-off');
    const res = await app.inject({
      method: 'POST',
      url: '/v1/users',
      headers: bearer(admin.accessToken),
      payload: { email },
    });
    expect(res.statusCode).toBe(404);
    expect(await app.services.repos.users.findByEmail(email)).toBeUndefined();
  });
});

/**
 * An invitation sent again mails the address a new link each minute: with rate limiting on, each one
 * takes the address's place under the hourly cap of its reset links (MAILS_PER_ACCOUNT_HOUR, 5), as
 * `forgot` and an administrator's reset link do, so nobody holding users:write floods a mailbox.
 */
describe('invitations sent again, with rate limiting on', () => {
  const mailer = capturingMailer();
  const clock = createTestClock();
  let app: FastifyInstance;
  let admin: TestUser;
  beforeAll(async () => {
    app = await buildTestApp({
      env: { PASSWORD_RESET_URL: RESET_URL, RATE_LIMIT_ENABLED: 'true' },
      deps: { mailer, clock },
    });
    admin = await createAdmin(app);
  });

  const invite = (email: string) =>
    app.inject({ method: 'POST', url: '/v1/users', headers: bearer(admin.accessToken), payload: { email } });
  const mailsTo = (email: string) => mailer.sent.filter((m) => m.to === email).length;

  it('at most five mails to the address an hour, counted with the reset links anyone may ask for', async () => {
    admin = { ...admin, accessToken: (await login(app, admin.email, admin.password)).session.access_token };
    const email = uniqueEmail('invited-often');
    expect((await invite(email)).statusCode).toBe(201);
    for (let i = 0; i < 4; i++) {
      clock.advance(61);
      const again = await invite(email);
      expect(again.statusCode, again.body).toBe(200);
    }
    expect(mailsTo(email)).toBe(5);
    const lastLink = mailer.sent.filter((m) => m.to === email).at(-1)!.text;
    clock.advance(61);
    const sixth = await invite(email);
    expect(sixth.statusCode, sixth.body).toBe(409);
    expect(sixth.json()).toMatchObject({ code: 'conflict' });
    expect(sixth.json().detail).toContain('in the last hour');
    // Nothing mailed, nothing replaced: the last link still sets the password.
    expect(mailsTo(email)).toBe(5);
    const forgot = await app.inject({ method: 'POST', url: '/v1/auth/password/forgot', payload: { email } });
    expect(forgot.statusCode).toBe(204);
    expect(mailsTo(email)).toBe(5);
    const token = /reset#token=(prs_[0-9A-Za-z_]+)/.exec(lastLink)![1]!;
    const chosen = await app.inject({
      method: 'POST',
      url: '/v1/auth/password/reset',
      payload: { token, new_password: CHOSEN },
    });
    expect(chosen.statusCode, chosen.body).toBe(204);
  });

  it('an hour later, sends it again; an invitation refused (a minute too soon) or failed takes no place', async () => {
    const email = uniqueEmail('invited-later');
    expect((await invite(email)).statusCode).toBe(201);
    // Asked again within the minute many times: 409 each time, and none of them counts.
    for (let i = 0; i < 6; i++) expect((await invite(email)).statusCode).toBe(409);
    for (let i = 0; i < 4; i++) {
      clock.advance(61);
      expect((await invite(email)).statusCode).toBe(200);
    }
    clock.advance(61);
    expect((await invite(email)).statusCode).toBe(409);
    clock.advance(3600);
    // One that fails after taking its place (the database, say) gives it back.
    admin = { ...admin, accessToken: (await login(app, admin.email, admin.password)).session.access_token };
    const failing = vi
      .spyOn(app.services.audit, 'record')
      .mockImplementation(async (_tx, _context, event) => {
        if (!Array.isArray(event) && event.type === 'user.invited') throw new Error('disk full');
      });
    try {
      for (let i = 0; i < 6; i++) {
        clock.advance(61);
        expect((await invite(email)).statusCode).toBe(500);
      }
    } finally {
      failing.mockRestore();
    }
    admin = { ...admin, accessToken: (await login(app, admin.email, admin.password)).session.access_token };
    expect((await invite(email)).statusCode).toBe(200);
  });
});
