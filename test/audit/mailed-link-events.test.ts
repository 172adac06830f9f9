import type { FastifyInstance } from 'fastify';
import { beforeAll, describe, expect, it } from 'vitest';
import type { NewAuditEvent } from '../../src/modules/audit/audit.repository.js';
import { buildTestApp } from '../support/app.js';
import { createTestClock } from '../support/clock.js';
import { createAdmin, registerUser, type TestUser } from '../support/factories.js';
import { bearer } from '../support/http.js';
import { capturingMailer } from '../support/mail.js';

/**
 * A link mailed to an account (a password reset, a sign-in link) and its audit event commit in one
 * transaction, or neither does (SECURITY.md): when the event cannot be written, no link is made and
 * no mail goes, and asking again at once is not "too soon" behind a link nobody recorded.
 */
describe('mailed links are made with their audit event, or not at all', () => {
  let app: FastifyInstance;
  let admin: TestUser;
  const mailer = capturingMailer();
  const clock = createTestClock();

  beforeAll(async () => {
    app = await buildTestApp({ deps: { mailer, clock } });
    admin = await createAdmin(app);
  });

  /** Makes every write of an event of `type` fail until the returned function is called. */
  function failEventsOf(type: string) {
    const repo = app.services.repos.audit;
    const insert = repo.insert;
    repo.insert = async (events: NewAuditEvent | NewAuditEvent[], tx) => {
      if ([events].flat().some((e) => e.type === type)) throw new Error('the audit write failed (test)');
      return insert.call(repo, events, tx);
    };
    return () => {
      repo.insert = insert;
    };
  }

  const mailsTo = (email: string, subject: string) =>
    mailer.sent.filter((m) => m.to === email && m.subject === subject).length;
  const eventsOf = async (user: TestUser, type: string) =>
    (await app.services.audit.list({ subjectId: user.id, type, outcome: 'success', limit: 10 })).length;

  const cases = [
    {
      name: 'a password reset asked for by the user',
      type: 'auth.password_reset_requested',
      subject: 'Reset your password',
      ask: (user: TestUser) =>
        app.inject({ method: 'POST', url: '/v1/auth/password/forgot', payload: { email: user.email } }),
    },
    {
      name: 'a password reset an administrator has mailed',
      type: 'auth.password_reset_requested',
      subject: 'Reset your password',
      ask: (user: TestUser) =>
        app.inject({
          method: 'POST',
          url: `/v1/users/${user.id}/password-reset`,
          headers: bearer(admin.accessToken),
        }),
    },
    {
      name: 'an email confirmation link asked for again',
      type: 'auth.email_confirmation_sent',
      subject: 'Confirm your email address',
      ask: (user: TestUser) =>
        app.inject({ method: 'POST', url: '/v1/auth/email/resend', payload: { email: user.email } }),
    },
    {
      name: 'a sign-in link',
      type: 'auth.magic_link_requested',
      confirmed: true,
      subject: 'Your sign-in link',
      ask: (user: TestUser) =>
        app.inject({ method: 'POST', url: '/v1/auth/magic-link', payload: { email: user.email } }),
    },
  ];

  for (const c of cases) {
    it(c.name, async () => {
      const user = await registerUser(app, 'mailed-link-event');
      // A sign-in link goes only to a confirmed address.
      if ('confirmed' in c) await app.services.repos.users.update(user.id, { emailConfirmedAt: clock.now() });
      // Past the minute of the confirmation link mailed at registration.
      clock.advance(61);
      const mails = mailsTo(user.email, c.subject);
      const events = await eventsOf(user, c.type);
      const restore = failEventsOf(c.type);
      let failed: Awaited<ReturnType<typeof c.ask>>;
      try {
        failed = await c.ask(user);
      } finally {
        restore();
      }
      expect(failed.statusCode).toBeGreaterThanOrEqual(500);
      await app.services.outbox?.deliverDue();
      expect(mailsTo(user.email, c.subject)).toBe(mails);
      expect(await eventsOf(user, c.type)).toBe(events);

      // Nothing was made: asking again at once mails the link, with its event.
      const again = await c.ask(user);
      expect(again.statusCode, again.body).toBe(204);
      expect(mailsTo(user.email, c.subject)).toBe(mails + 1);
      expect(await eventsOf(user, c.type)).toBe(events + 1);
    });
  }
});
