import type { FastifyInstance, LightMyRequestResponse } from 'fastify';
import { decodeJwt } from 'jose';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import { userWith } from '../clients/helpers.js';
import { buildTestApp, uniqueEmail } from '../support/app.js';
import { secondWhileFirstCalls } from '../support/database.js';
import { createAdmin, registerUser, type TestUser } from '../support/factories.js';
import { bearer } from '../support/http.js';
import { capturingMailer } from '../support/mail.js';
import { turnOnMfa } from '../support/mfa.js';

/**
 * Acting on a user as an administrator (disabling, deleting, ending their sessions, mailing them a
 * reset link, moving their address, turning their second factor off) is for a caller who holds all the
 * user holds, decided on the transaction of the change (users.service assertMayManageIn: after the
 * admins' lock, as removeRole, or after the user's row lock, assertMayManageLocked): an administrator
 * granting the user the admin role at that moment is waited for and seen, so a user manager does not
 * act on someone who has just become an administrator. PostgreSQL only: the grant holds its
 * transaction open while the change starts.
 */
let app: FastifyInstance;
const mailer = capturingMailer();
beforeAll(async () => {
  app = await buildTestApp({ deps: { mailer } });
});
afterAll(async () => {
  await app.close();
});

interface Action {
  /** What the target has before, for the action to take (a second factor to turn off). */
  prepare?: (target: TestUser) => Promise<void>;
  act: (caller: TestUser, target: TestUser) => Promise<LightMyRequestResponse>;
  /** Nothing of what the action would change has changed. */
  unchanged: (target: TestUser) => Promise<void>;
}

const statusUnchanged = async (target: TestUser) => {
  const user = await app.services.repos.users.findById(target.id);
  expect(user?.status).toBe('active');
};
const sessionLive = async (target: TestUser) => {
  const me = await app.inject({ method: 'GET', url: '/v1/auth/me', headers: bearer(target.accessToken) });
  expect(me.statusCode, me.body).toBe(200);
};
const mailedTo = (to: string) => mailer.sent.filter((m) => m.to === to);

const actions: Array<[string, Action]> = [
  [
    'disabling',
    {
      act: (caller, target) =>
        app.inject({
          method: 'PATCH',
          url: `/v1/users/${target.id}`,
          headers: bearer(caller.accessToken),
          payload: { status: 'disabled' },
        }),
      unchanged: statusUnchanged,
    },
  ],
  [
    'deleting',
    {
      act: (caller, target) =>
        app.inject({ method: 'DELETE', url: `/v1/users/${target.id}`, headers: bearer(caller.accessToken) }),
      unchanged: statusUnchanged,
    },
  ],
  [
    'ending the sessions of',
    {
      act: (caller, target) =>
        app.inject({
          method: 'DELETE',
          url: `/v1/users/${target.id}/sessions`,
          headers: bearer(caller.accessToken),
        }),
      unchanged: sessionLive,
    },
  ],
  [
    'ending a session of',
    {
      act: (caller, target) =>
        app.inject({
          method: 'DELETE',
          url: `/v1/users/${target.id}/sessions/${decodeJwt(target.accessToken).sid}`,
          headers: bearer(caller.accessToken),
        }),
      unchanged: sessionLive,
    },
  ],
  [
    'mailing a reset link to',
    {
      act: (caller, target) =>
        app.inject({
          method: 'POST',
          url: `/v1/users/${target.id}/password-reset`,
          headers: bearer(caller.accessToken),
        }),
      unchanged: async (target) => {
        expect(mailedTo(target.email)).toEqual([]);
        expect(await app.services.repos.emailTokens.latestFor(target.id, 'password_reset')).toBeUndefined();
      },
    },
  ],
  [
    'moving the address of',
    {
      act: (caller, target) =>
        app.inject({
          method: 'POST',
          url: `/v1/users/${target.id}/email-change`,
          headers: bearer(caller.accessToken),
          payload: { new_email: uniqueEmail('mgr-race-moved') },
        }),
      unchanged: async (target) => {
        expect(mailer.sent.filter((m) => m.subject === 'Confirm your new email address')).toEqual([]);
        expect(await app.services.repos.emailTokens.latestFor(target.id, 'email_change')).toBeUndefined();
      },
    },
  ],
  [
    'turning off the second factor of',
    {
      prepare: async (target) => {
        // Where the service sends mail, a second factor takes a confirmed address.
        await app.services.repos.users.update(target.id, { emailConfirmedAt: new Date() });
        await turnOnMfa(app, target.accessToken);
      },
      act: (caller, target) =>
        app.inject({
          method: 'DELETE',
          url: `/v1/users/${target.id}/mfa`,
          headers: bearer(caller.accessToken),
        }),
      unchanged: async (target) => {
        expect(await app.services.mfa.status(target.id)).toMatchObject({ enabled: true });
        const reset = await app.services.audit.list({ subjectId: target.id, type: 'mfa.disabled', limit: 5 });
        expect(reset).toEqual([]);
      },
    },
  ],
];

describe.skipIf(!inject('databaseUrl'))(
  'a user manager acting on a user as an admin makes them admin',
  () => {
    it.each(actions)(
      '%s them waits for the grant, sees it and is refused (403), changing nothing',
      async (_name, action) => {
        const admin = await createAdmin(app);
        const manager = await userWith(app, ['users:read', 'users:write'], 'mgr-race');
        const target = await registerUser(app, 'mgr-race-target');
        await action.prepare?.(target);
        mailer.sent.length = 0;
        const { first: granted, second: refused } = await secondWhileFirstCalls<
          'assignRole',
          LightMyRequestResponse
        >(
          inject('databaseUrl')!,
          app.services.repos.users,
          'assignRole',
          () =>
            app.inject({
              method: 'PUT',
              url: `/v1/users/${target.id}/roles/admin`,
              headers: bearer(admin.accessToken),
            }),
          () => action.act(manager, target),
        );
        expect(granted.statusCode, granted.body).toBe(200);
        expect(refused.statusCode, refused.body).toBe(403);
        expect(refused.json()).toMatchObject({ code: 'forbidden' });
        await action.unchanged(target);
        const roles = await app.services.repos.users.rolesAndPermissions(target.id);
        expect(roles.roles).toContain('admin');
      },
    );
  },
);

/**
 * An administrator's reset of a user's second factor tells the user at the address the account has
 * when the reset commits: read under the user's row lock (assertMayManageLocked's), which an email
 * change applying holds until it commits. PostgreSQL only: the change holds its transaction open while
 * the reset starts.
 */
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
