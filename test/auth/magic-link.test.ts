import { createHmac } from 'node:crypto';
import { sql } from 'drizzle-orm';
import type { FastifyInstance } from 'fastify';
import { decodeJwt } from 'jose';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, inject, it, vi } from 'vitest';
import { selectRows } from '../../src/db/client.js';
import type { MailMessage } from '../../src/lib/mailer.js';
import { mailsPerHourKey } from '../../src/lib/throttle.js';
import { MAILS_PER_ACCOUNT_HOUR, mailCapKey } from '../../src/modules/auth/mailed-tokens.js';
import { buildTestApp, testConfig, uniqueEmail } from '../support/app.js';
import { createTestClock } from '../support/clock.js';
import { waitForLockWaiters } from '../support/database.js';
import {
  createAdmin,
  login,
  PASSWORD,
  registerUser,
  setUserStatus,
  type TestUser,
} from '../support/factories.js';
import { bearer } from '../support/http.js';
import { capCountings, randomAddress } from '../support/redis.js';
import { capturingMailer } from '../support/mail.js';
import { turnOnMfa } from '../support/mfa.js';

const LINK_URL = 'https://app.example.test/sign-in';
const SUBJECT = 'Your sign-in link';

describe('sign-in links (built-in provider)', () => {
  let app: FastifyInstance;
  const mailer = capturingMailer();
  const clock = createTestClock();

  beforeAll(async () => {
    app = await buildTestApp({
      env: { MAGIC_LINK_URL: LINK_URL, MAGIC_LINK_TTL: '600' },
      deps: { mailer, clock },
    });
  });

  const ask = (email: string) =>
    app.inject({ method: 'POST', url: '/v1/auth/magic-link', payload: { email } });
  const open = (token: string) =>
    app.inject({ method: 'POST', url: '/v1/auth/magic-link/verify', payload: { token } });
  const linksTo = (email: string) =>
    mailer.sent.filter((m: MailMessage) => m.to === email && m.subject === SUBJECT);
  const tokenMailedTo = (email: string) => {
    const mail = linksTo(email).at(-1);
    expect(mail, `a sign-in link to ${email}`).toBeDefined();
    const found = /https:\/\/app\.example\.test\/sign-in#token=(pml_[0-9A-Za-z_]+)/.exec(mail!.text);
    expect(found, mail!.text).not.toBeNull();
    return found![1]!;
  };
  /** A registered user whose address is confirmed. */
  const confirmed = async (tag: string): Promise<TestUser> => {
    const user = await registerUser(app, tag);
    await app.services.repos.users.update(user.id, { emailConfirmedAt: clock.now() });
    return user;
  };
  const since = () => new Date(clock.nowMs() - 1000);

  it('mails a link that opens a session once, with amr email; stored only as an HMAC; audited', async () => {
    const from = since();
    const user = await confirmed('link');
    const asked = await ask(`  ${user.email.toUpperCase()} `);
    expect(asked.statusCode, asked.body).toBe(204);
    expect(asked.body).toBe('');
    const mail = linksTo(user.email).at(-1)!;
    expect(mail.text).toContain('within 10 minutes');
    const token = tokenMailedTo(user.email);
    expect(token).toMatch(/^pml_[0-9A-Za-z]{12}_[0-9A-Za-z]{43}[0-9A-Za-z]{6}$/);
    const [stored] = await selectRows<{ token_hash: string }>(
      app.services.db,
      sql`select token_hash from email_tokens where user_id = ${user.id} and purpose = 'magic_link'`,
    );
    expect(stored?.token_hash).toBe(
      createHmac('sha256', testConfig().secretPepper).update(token).digest('base64url'),
    );

    const res = await open(token);
    expect(res.statusCode, res.body).toBe(200);
    expect(res.headers['cache-control']).toContain('no-store');
    expect(res.json().user).toMatchObject({ id: user.id, email: user.email });
    const claims = decodeJwt(res.json().session.access_token);
    expect(claims.amr).toEqual(['email']);
    expect(claims.sub).toBe(user.id);
    const me = await app.inject({
      method: 'GET',
      url: '/v1/auth/me',
      headers: bearer(res.json().session.access_token),
    });
    expect(me.statusCode).toBe(200);
    // The session refreshes as any other, keeping its amr.
    const refreshed = await app.inject({
      method: 'POST',
      url: '/v1/auth/refresh',
      payload: { refresh_token: res.json().session.refresh_token },
    });
    expect(refreshed.statusCode).toBe(200);
    expect(decodeJwt(refreshed.json().session.access_token).amr).toEqual(['email']);

    // Once.
    const again = await open(token);
    expect(again.statusCode).toBe(400);
    expect(again.headers['content-type']).toContain('application/problem+json');
    expect(again.json()).toMatchObject({ code: 'invalid_magic_link', errors: [{ field: 'body.token' }] });

    const events = await app.services.audit.list({ subjectId: user.id, since: from, limit: 50 });
    const types = events.map((e) => `${e.type}:${e.outcome}`);
    expect(types).toEqual(
      expect.arrayContaining(['auth.magic_link_requested:success', 'auth.magic_link:success']),
    );
    expect(events.find((e) => e.type === 'auth.magic_link' && e.outcome === 'success')?.data).toMatchObject({
      session_id: claims.sid,
    });
    // The second opening is audited as such, on the user: the link was used, not unknown.
    expect(events.find((e) => e.type === 'auth.magic_link' && e.outcome === 'failure')?.data).toMatchObject({
      reason: 'used_token',
    });
  });

  it('answers every other address alike and mails nothing: unknown, disabled, never confirmed', async () => {
    const admin = await createAdmin(app);
    const disabled = await confirmed('link-disabled');
    expect((await setUserStatus(app, admin.accessToken, disabled.id, 'disabled')).statusCode).toBe(200);
    const unconfirmed = await registerUser(app, 'link-unconfirmed');
    const unknown = uniqueEmail('link-nobody');
    for (const email of [unknown, disabled.email, unconfirmed.email]) {
      const res = await ask(email);
      expect(res.statusCode, email).toBe(204);
      expect(res.body).toBe('');
      expect(linksTo(email), email).toHaveLength(0);
    }
    const reasons = await app.services.audit.list({
      type: 'auth.magic_link_requested',
      subjectId: unconfirmed.id,
      limit: 5,
    });
    expect(reasons[0]).toMatchObject({ outcome: 'failure', data: { reason: 'email_not_confirmed' } });
  });

  it('sends one mail a minute; a newer link replaces the older, and a link expires', async () => {
    const user = await confirmed('link-replaced');
    await ask(user.email);
    const first = tokenMailedTo(user.email);
    expect((await ask(user.email)).statusCode).toBe(204);
    expect(linksTo(user.email)).toHaveLength(1);
    clock.advance(61);
    await ask(user.email);
    const second = tokenMailedTo(user.email);
    expect(second).not.toBe(first);
    expect((await open(first)).statusCode).toBe(400);
    // MAGIC_LINK_TTL is 10 minutes.
    clock.advance(601);
    expect((await open(second)).statusCode).toBe(400);
    const [expired] = await app.services.audit.list({
      type: 'auth.magic_link',
      subjectId: user.id,
      limit: 1,
    });
    expect(expired).toMatchObject({ outcome: 'failure', data: { reason: 'expired_token' } });
  });

  it('asks for the second factor after the link, and the session says both', async () => {
    const user = await confirmed('link-mfa');
    const { code } = await turnOnMfa(app, user.accessToken, clock.nowMs);
    clock.advance(61);
    await ask(user.email);
    const res = await open(tokenMailedTo(user.email));
    expect(res.statusCode, res.body).toBe(403);
    expect(res.json()).toMatchObject({ code: 'mfa_required' });
    expect(res.json().session).toBeUndefined();
    clock.advance(30);
    const verified = await app.inject({
      method: 'POST',
      url: '/v1/auth/mfa/verify',
      payload: { mfa_token: res.json().mfa_token, code: code() },
    });
    expect(verified.statusCode, verified.body).toBe(200);
    expect(decodeJwt(verified.json().session.access_token).amr).toEqual(['email', 'otp', 'mfa']);
  });

  // On PostgreSQL: signing out everywhere is sent while the link's transaction holds the account's row,
  // and commits before anything else that opening the link does; PGlite has one connection.
  it.skipIf(!inject('databaseUrl'))(
    'a second factor’s challenge ends with a logout everywhere committed while the link was being opened',
    async () => {
      const user = await confirmed('link-mfa-logout');
      const { code } = await turnOnMfa(app, user.accessToken, clock.nowMs);
      clock.advance(61);
      await ask(user.email);
      const token = tokenMailedTo(user.email);
      const tokens = app.services.repos.emailTokens;
      const consume = tokens.consume;
      const watcher = new pg.Client({ connectionString: inject('databaseUrl') });
      await watcher.connect();
      let loggedOut: Promise<{ statusCode: number }> | undefined;
      tokens.consume = async (...args) => {
        const used = await consume.apply(tokens, args);
        // The link is taken, its transaction holds the account's row: everywhere is signed out now,
        // waiting for that row, and committing as soon as the link's transaction has.
        const [holder] = await selectRows<{ pid: number }>(args[2], sql`select pg_backend_pid() as pid`);
        loggedOut ??= app.inject({
          method: 'POST',
          url: '/v1/auth/logout',
          headers: bearer(user.accessToken),
          payload: { scope: 'all' },
        });
        await waitForLockWaiters(watcher, 1, holder!.pid);
        return used;
      };
      let res: Awaited<ReturnType<typeof open>>;
      try {
        res = await open(token);
      } finally {
        tokens.consume = consume;
        await watcher.end();
      }
      expect((await loggedOut)?.statusCode).toBe(204);
      expect(res.statusCode, res.body).toBe(403);
      expect(res.json()).toMatchObject({ code: 'mfa_required' });
      clock.advance(30);
      const verified = await app.inject({
        method: 'POST',
        url: '/v1/auth/mfa/verify',
        payload: { mfa_token: res.json().mfa_token, code: code() },
      });
      expect(verified.statusCode, verified.body).toBe(401);
      expect(verified.json()).toMatchObject({ code: 'invalid_mfa_token' });
    },
  );

  it('voids links not yet opened on a password change, on signing out everywhere and on a disable', async () => {
    const admin = await createAdmin(app);
    const cases: Array<[string, (user: TestUser) => Promise<number>]> = [
      [
        'password',
        async (user) =>
          (
            await app.inject({
              method: 'POST',
              url: '/v1/auth/password',
              headers: bearer(user.accessToken),
              payload: { current_password: PASSWORD, new_password: 'a different long passphrase' },
            })
          ).statusCode,
      ],
      [
        'logout-all',
        async (user) =>
          (
            await app.inject({
              method: 'POST',
              url: '/v1/auth/logout',
              headers: bearer(user.accessToken),
              payload: { scope: 'all' },
            })
          ).statusCode,
      ],
      [
        'disable',
        async (user) => (await setUserStatus(app, admin.accessToken, user.id, 'disabled')).statusCode,
      ],
    ];
    for (const [what, act] of cases) {
      const user = await confirmed(`link-void-${what}`);
      await ask(user.email);
      const token = tokenMailedTo(user.email);
      expect([200, 204], what).toContain(await act(user));
      const res = await open(token);
      expect(res.statusCode, what).toBe(400);
    }
  });

  describe('a disable that comes while a link is being made', () => {
    const liveLinks = async (userId: string) => {
      const [row] = await selectRows<{ n: number }>(
        app.services.db,
        sql`select count(*)::int as n from email_tokens where user_id = ${userId}
              and purpose = 'magic_link' and used_at is null and expires_at > ${clock.now().toISOString()}::timestamptz`,
      );
      return row!.n;
    };
    /** After the account is enabled again, no link made around its disable opens it. */
    const expectNoLinkOutlivedTheDisable = async (admin: TestUser, user: TestUser) => {
      expect((await setUserStatus(app, admin.accessToken, user.id, 'active')).statusCode).toBe(200);
      expect(await liveLinks(user.id)).toBe(0);
      for (const mail of linksTo(user.email)) {
        const token = /#token=(pml_[0-9A-Za-z_]+)/.exec(mail.text)![1]!;
        expect((await open(token)).statusCode).toBe(400);
      }
    };

    it('makes none when the disable commits after the address was looked up', async () => {
      const admin = await createAdmin(app);
      const user = await confirmed('link-disable-read');
      const users = app.services.repos.users;
      const findByEmail = users.findByEmail;
      users.findByEmail = async (...args) => {
        const found = await findByEmail.apply(users, args);
        // Read as active; disabled (its links voided) before the link's transaction begins.
        if (found?.id === user.id)
          expect((await setUserStatus(app, admin.accessToken, user.id, 'disabled')).statusCode).toBe(200);
        return found;
      };
      try {
        expect((await ask(user.email)).statusCode).toBe(204);
      } finally {
        users.findByEmail = findByEmail;
      }
      const [event] = await app.services.audit.list({
        type: 'auth.magic_link_requested',
        subjectId: user.id,
        limit: 1,
      });
      expect(event).toMatchObject({ outcome: 'failure', data: { reason: 'disabled' } });
      await expectNoLinkOutlivedTheDisable(admin, user);
    });

    // On PostgreSQL: the disable is sent while the link's transaction holds the account's row.
    it.skipIf(!inject('databaseUrl'))(
      'voids one whose transaction held the account as the disable came',
      async () => {
        const admin = await createAdmin(app);
        const user = await confirmed('link-disable-tx');
        const tokens = app.services.repos.emailTokens;
        const latestFor = tokens.latestFor;
        const watcher = new pg.Client({ connectionString: inject('databaseUrl') });
        await watcher.connect();
        let disabled: Promise<{ statusCode: number }> | undefined;
        tokens.latestFor = async (...args) => {
          const latest = await latestFor.apply(tokens, args);
          if (args[0] === user.id && args[2] && !disabled) {
            const [holder] = await selectRows<{ pid: number }>(args[2], sql`select pg_backend_pid() as pid`);
            disabled = setUserStatus(app, admin.accessToken, user.id, 'disabled');
            // It waits for the link's transaction, or (were the row not held) is done first.
            await Promise.race([waitForLockWaiters(watcher, 1, holder!.pid), disabled]);
          }
          return latest;
        };
        try {
          expect((await ask(user.email)).statusCode).toBe(204);
        } finally {
          tokens.latestFor = latestFor;
          await watcher.end();
        }
        expect((await disabled)?.statusCode).toBe(200);
        await expectNoLinkOutlivedTheDisable(admin, user);
      },
    );
  });

  it('refuses a link whose account changed its address since it was mailed', async () => {
    const user = await confirmed('link-moved');
    await ask(user.email);
    const token = tokenMailedTo(user.email);
    await app.services.repos.users.update(user.id, { email: uniqueEmail('link-moved-to') });
    expect((await open(token)).statusCode).toBe(400);
  });

  it('lets one of concurrent openings of a link through', async () => {
    const user = await confirmed('link-race');
    await ask(user.email);
    const token = tokenMailedTo(user.email);
    const codes = (await Promise.all(Array.from({ length: 5 }, () => open(token))))
      .map((r) => r.statusCode)
      .sort();
    expect(codes).toEqual([200, 400, 400, 400, 400]);
    const [sessions] = await selectRows<{ n: number }>(
      app.services.db,
      sql`select count(*)::int as n from sessions where user_id = ${user.id} and 'email' = any(amr)`,
    );
    expect(sessions!.n).toBe(1);
  });

  it('refuses malformed tokens and bodies with 400 naming the field', async () => {
    for (const payload of [
      { token: 'pml_nope' },
      { token: '' },
      { token: 42 },
      {},
      { token: 'x', extra: 1 },
    ]) {
      const res = await app.inject({ method: 'POST', url: '/v1/auth/magic-link/verify', payload });
      expect(res.statusCode, JSON.stringify(payload)).toBe(400);
      expect(res.headers['content-type']).toContain('application/problem+json');
    }
    const bad = await app.inject({
      method: 'POST',
      url: '/v1/auth/magic-link',
      payload: { email: 'not an address' },
    });
    expect(bad.statusCode).toBe(400);
    expect(bad.json().errors).toEqual([expect.objectContaining({ field: 'body.email' })]);
  });

  it('keeps the link when the mail server refuses it, answering as for an unknown address', async () => {
    const user = await confirmed('link-mailfail');
    mailer.failing = true;
    let res: Awaited<ReturnType<typeof ask>>;
    try {
      res = await ask(user.email);
    } finally {
      mailer.failing = false;
    }
    expect(res.statusCode, res.body).toBe(204);
    const waiting = (await app.services.outbox!.pending(user.id)).filter((m) => m.kind === 'magic_link');
    expect(waiting).toHaveLength(1);
    expect(linksTo(user.email)).toHaveLength(0);
  });
});

describe('sign-in links lift a lockout someone else caused', () => {
  it('lets the mailbox owner in, and their password works again', async () => {
    const mailer = capturingMailer();
    const app = await buildTestApp({
      env: { MAGIC_LINK_URL: LINK_URL, RATE_LIMIT_ENABLED: 'true', LOGIN_MAX_FAILURES_PER_HOUR: '2' },
      deps: { mailer },
    });
    const user = await registerUser(app, 'link-locked');
    await app.services.repos.users.update(user.id, { emailConfirmedAt: new Date() });
    for (let i = 0; i < 3; i++)
      await app.inject({
        method: 'POST',
        url: '/v1/auth/login',
        payload: { email: user.email, password: 'a wrong guess here' },
      });
    const locked = await app.inject({
      method: 'POST',
      url: '/v1/auth/login',
      payload: { email: user.email, password: PASSWORD },
    });
    expect(locked.statusCode).toBe(429);
    expect(
      (await app.inject({ method: 'POST', url: '/v1/auth/magic-link', payload: { email: user.email } }))
        .statusCode,
    ).toBe(204);
    const mail = mailer.sent.filter((m) => m.to === user.email && m.subject === SUBJECT).at(-1)!;
    const token = /#token=(pml_[0-9A-Za-z_]+)/.exec(mail.text)![1]!;
    const res = await app.inject({ method: 'POST', url: '/v1/auth/magic-link/verify', payload: { token } });
    expect(res.statusCode, res.body).toBe(200);
    await login(app, user.email);
  });

  it('mails an account at most five links an hour, however many are asked for (rate limiting on)', async () => {
    const mailer = capturingMailer();
    const clock = createTestClock();
    const app = await buildTestApp({
      env: { MAGIC_LINK_URL: LINK_URL, RATE_LIMIT_ENABLED: 'true' },
      deps: { mailer, clock },
    });
    const user = await registerUser(app, 'link-flood');
    await app.services.repos.users.update(user.id, { emailConfirmedAt: new Date() });
    const ask = () =>
      app.inject({ method: 'POST', url: '/v1/auth/magic-link', payload: { email: user.email } });
    const links = () => mailer.sent.filter((m) => m.to === user.email && m.subject === SUBJECT).length;
    for (let i = 0; i < 7; i++) {
      expect((await ask()).statusCode).toBe(204);
      clock.advance(61);
    }
    expect(links()).toBe(5);
    const [refused] = await app.services.audit.list({
      type: 'auth.magic_link_requested',
      subjectId: user.id,
      limit: 1,
    });
    expect(refused).toMatchObject({ outcome: 'failure', data: { reason: 'too_many' } });
    // The last link mailed still works: the refused requests did not replace it.
    const last = mailer.sent.filter((m) => m.subject === SUBJECT && m.to === user.email).at(-1)!;
    const token = /#token=(pml_[0-9A-Za-z_]+)/.exec(last.text)![1]!;
    const opened = await app.inject({
      method: 'POST',
      url: '/v1/auth/magic-link/verify',
      payload: { token },
    });
    expect(opened.statusCode, opened.body).toBe(200);
    // An hour on, links go again.
    clock.advance(3600);
    expect((await ask()).statusCode).toBe(204);
    expect(links()).toBe(6);
  });

  it('is off in production without SMTP_URL: 404', async () => {
    const app = await buildTestApp({ env: { NODE_ENV: 'production' } });
    const res = await app.inject({
      method: 'POST',
      url: '/v1/auth/magic-link',
      payload: { email: uniqueEmail() },
    });
    expect(res.statusCode).toBe(404);
    expect(res.json().detail).toContain('SMTP_URL');
  });
});

/**
 * A link's place under the address's hourly cap is taken before anything is made, and given back when
 * nothing is mailed: requests at once see each other's, in memory and through Redis.
 */
describe.each(await capCountings('magic links'))(
  'the hourly cap of sign-in links, counted $counts',
  ({ env, skip }) => {
    let app: FastifyInstance;
    const mailer = capturingMailer();
    const clock = createTestClock();
    const keys: string[] = [];

    beforeAll(async () => {
      if (skip) return;
      app = await buildTestApp({
        env: { MAGIC_LINK_URL: LINK_URL, RATE_LIMIT_ENABLED: 'true', ...env },
        deps: { mailer, clock },
      });
    });
    afterAll(async () => {
      // Counts in Redis end with their hour; these are taken out now.
      for (const key of keys) await app?.services.redis?.del(mailsPerHourKey(key));
    });

    /** A user with a confirmed address; how to ask for their link, and how many were mailed. */
    async function linkUser() {
      const user = await registerUser(app, 'link-cap');
      await app.services.repos.users.update(user.id, { emailConfirmedAt: new Date() });
      keys.push(mailCapKey(app.services.config.secretPepper, 'magic_link', user.email));
      return {
        user,
        // Addresses of their own: the per-IP limits may be counted in Redis, by other runs too.
        ask: () =>
          app.inject({
            method: 'POST',
            url: '/v1/auth/magic-link',
            remoteAddress: randomAddress(),
            payload: { email: user.email },
          }),
        links: () => mailer.sent.filter((m) => m.to === user.email && m.subject === SUBJECT).length,
      };
    }

    it.skipIf(skip)(
      'links asked for at once past the hour’s cap get its answer (too_many) before any is made',
      async () => {
        const { user, ask, links } = await linkUser();
        for (let i = 0; i < MAILS_PER_ACCOUNT_HOUR - 1; i++) {
          expect((await ask()).statusCode).toBe(204);
          clock.advance(61);
        }
        const at = new Date(clock.nowMs() - 1000);
        const answers = await Promise.all(Array.from({ length: 6 }, ask));
        expect(answers.map((a) => a.statusCode)).toEqual(Array(6).fill(204));
        expect(links()).toBe(MAILS_PER_ACCOUNT_HOUR);
        // The one that took the last place mailed; the others met the cap before anything was made.
        const events = await app.services.audit.list({
          type: 'auth.magic_link_requested',
          subjectId: user.id,
          since: at,
          limit: 10,
        });
        expect(events.map((e) => e.data.reason ?? 'mailed').sort()).toEqual([
          'mailed',
          ...Array(5).fill('too_many'),
        ]);
      },
    );

    it.skipIf(skip || !env.REDIS_URL)(
      'counts in Redis under the service’s prefix, with no address in clear',
      async () => {
        // A Redis command that timed out on a loaded machine (the start's, say) has counts kept in
        // memory until Redis's next answer: the count looked at here is one written to Redis, so the
        // link must answer throughout the request (else another account tries again).
        const answering = () => app.services.redisLink?.answering() === true;
        let user: TestUser | undefined;
        for (let attempt = 0; attempt < 3 && !user; attempt++) {
          const asked = await linkUser();
          await vi.waitFor(() => expect(answering()).toBe(true), { timeout: 15_000 });
          expect((await asked.ask()).statusCode).toBe(204);
          expect(asked.links()).toBe(1);
          if (answering()) user = asked.user;
        }
        if (!user) throw new Error('Redis kept timing out');
        const redis = app.services.redis!;
        const capKey = mailCapKey(app.services.config.secretPepper, 'magic_link', user.email);
        expect(await redis.get(`paservices:auth:mails-per-hour:${capKey}`)).toBe('1');
        expect(await redis.exists(`mails-per-hour:${capKey}`)).toBe(0);
        // The address (its local part, unique to this test) is in no key, nor in any key's value.
        const local = user.email.split('@')[0]!;
        expect(await redis.keys(`*${local}*`)).toEqual([]);
        // Its count, and the times of its resets beside it when it has some, all under the prefix.
        const named = (await redis.keys(`*${capKey}*`)).sort();
        expect(named[0]).toBe(`paservices:auth:mails-per-hour:${capKey}`);
        for (const key of named) {
          expect([capKey, `${capKey}:times`].map((k) => `paservices:auth:mails-per-hour:${k}`)).toContain(
            key,
          );
          const value = (await redis.type(key)) === 'hash' ? await redis.hgetall(key) : await redis.get(key);
          expect(JSON.stringify(value)).not.toContain(local);
        }
      },
    );

    it.skipIf(skip)('a request that mails nothing (too soon) gives its place back', async () => {
      const { ask, links } = await linkUser();
      expect((await ask()).statusCode).toBe(204);
      // Within the minute: nothing mailed, and nothing spent of the cap.
      for (let i = 0; i < MAILS_PER_ACCOUNT_HOUR; i++) expect((await ask()).statusCode).toBe(204);
      expect(links()).toBe(1);
      for (let i = 1; i < MAILS_PER_ACCOUNT_HOUR; i++) {
        clock.advance(61);
        expect((await ask()).statusCode).toBe(204);
      }
      expect(links()).toBe(MAILS_PER_ACCOUNT_HOUR);
    });
  },
);
