import type { FastifyInstance, LightMyRequestResponse } from 'fastify';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import { buildTestApp, uniqueEmail } from '../support/app.js';
import { secondWhileFirstCalls } from '../support/database.js';
import { createAdmin, registerUser } from '../support/factories.js';
import { bearer } from '../support/http.js';
import { capturingMailer } from '../support/mail.js';
import { turnOnMfa } from '../support/mfa.js';

/**
 * An administrator's reset of a user's second factor tells the user at the address the account has
 * when the reset commits: read under the user's row lock, which an email change applying holds until
 * it commits. PostgreSQL only: the change holds its transaction open while the reset starts.
 */
let app: FastifyInstance;
const mailer = capturingMailer();
beforeAll(async () => {
  app = await buildTestApp({ deps: { mailer } });
});
afterAll(async () => {
  await app.close();
});

describe.skipIf(!inject('databaseUrl'))(
  'an administrator resets a second factor as the address changes',
  () => {
    it('waits for the change and mails the notice to the new address, not the old one', async () => {
      const admin = await createAdmin(app);
      const user = await registerUser(app, 'mfa-reset-race');
      // Where the service sends mail, a second factor takes a confirmed address.
      await app.services.repos.users.update(user.id, { emailConfirmedAt: new Date() });
      await turnOnMfa(app, user.accessToken);
      const next = uniqueEmail('mfa-reset-race-new');
      const asked = await app.inject({
        method: 'POST',
        url: `/v1/users/${user.id}/email-change`,
        headers: bearer(admin.accessToken),
        payload: { new_email: next },
      });
      expect(asked.statusCode, asked.body).toBe(202);
      const link = mailer.sent.filter((m) => m.to === next).at(-1);
      const token = /(pce_[0-9A-Za-z_]+)/.exec(link?.text ?? '')?.[1];
      expect(token, link?.text).toBeDefined();
      const { first: changed, second: reset } = await secondWhileFirstCalls<'update', LightMyRequestResponse>(
        inject('databaseUrl')!,
        app.services.repos.users,
        'update',
        () => app.inject({ method: 'POST', url: '/v1/auth/email/change/confirm', payload: { token } }),
        () =>
          app.inject({
            method: 'DELETE',
            url: `/v1/users/${user.id}/mfa`,
            headers: bearer(admin.accessToken),
          }),
      );
      expect(changed.statusCode, changed.body).toBe(200);
      expect(changed.json()).toMatchObject({ changed: true, user: { email: next } });
      expect(reset.statusCode, reset.body).toBe(204);
      const noticesTo = (to: string) =>
        mailer.sent.filter((m) => m.to === to && m.subject === 'Two-step verification is off');
      expect(noticesTo(user.email)).toEqual([]);
      expect(noticesTo(next)).toHaveLength(1);
    });
  },
);
