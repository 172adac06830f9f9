import type { FastifyInstance } from 'fastify';
import { beforeAll, describe, expect, it } from 'vitest';
import { buildTestApp } from '../support/app.js';
import { createAdmin, registerUser, type TestUser } from '../support/factories.js';
import { bearer } from '../support/http.js';
import { capturingMailer } from '../support/mail.js';

interface Activity {
  type: string;
  outcome: string;
  by: string;
  ip: string | null;
  user_agent: string | null;
}

/**
 * What an administrator did to an account and was refused (a second reset link within the minute, an
 * address someone else has) is an administrator's in the user's activity, shown without where they
 * were: not "someone unknown" with the administrator's address and browser.
 */
describe('GET /v1/auth/activity: an administrator’s refused requests about the account', () => {
  let app: FastifyInstance;
  let admin: TestUser;
  const mailer = capturingMailer();
  const ADMIN_AGENT = 'admin-console/7.1 (support desk)';

  beforeAll(async () => {
    app = await buildTestApp({ deps: { mailer } });
    admin = await createAdmin(app);
  });

  const asAdmin = (url: string, payload?: object) =>
    app.inject({
      method: 'POST',
      url,
      headers: { ...bearer(admin.accessToken), 'user-agent': ADMIN_AGENT },
      ...(payload ? { payload } : {}),
    });

  const failures = async (user: TestUser, type: string) => {
    const res = await app.inject({
      method: 'GET',
      url: '/v1/auth/activity',
      headers: bearer(user.accessToken),
    });
    expect(res.statusCode, res.body).toBe(200);
    return (res.json().data as Activity[]).filter((e) => e.type === type && e.outcome === 'failure');
  };

  it('a reset link asked for again within the minute', async () => {
    const user = await registerUser(app, 'activity-admin-reset');
    expect((await asAdmin(`/v1/users/${user.id}/password-reset`)).statusCode).toBe(204);
    expect((await asAdmin(`/v1/users/${user.id}/password-reset`)).statusCode).toBe(409);
    const refused = await failures(user, 'auth.password_reset_requested');
    expect(refused).toHaveLength(1);
    expect(refused[0]).toMatchObject({ by: 'administrator', ip: null, user_agent: null });
  });

  it('an address change to an address another account has', async () => {
    const user = await registerUser(app, 'activity-admin-email');
    const other = await registerUser(app, 'activity-admin-email-other');
    const res = await asAdmin(`/v1/users/${user.id}/email-change`, { new_email: other.email });
    expect(res.statusCode, res.body).toBe(409);
    const refused = await failures(user, 'user.email_change_requested');
    expect(refused).toHaveLength(1);
    expect(refused[0]).toMatchObject({ by: 'administrator', ip: null, user_agent: null });
  });
});
