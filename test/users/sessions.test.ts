import { randomUUID } from 'node:crypto';
import { eq } from 'drizzle-orm';
import type { FastifyInstance } from 'fastify';
import { decodeJwt } from 'jose';
import { beforeAll, describe, expect, it } from 'vitest';
import { sessions } from '../../src/db/schema/index.js';
import { buildTestApp } from '../support/app.js';
import { userWith } from '../clients/helpers.js';
import { createAdmin, expiredSessions, login, registerUser, type TestUser } from '../support/factories.js';
import { bearer } from '../support/http.js';
import { capturingMailer } from '../support/mail.js';

describe("an administrator's view of a user's sessions", () => {
  let app: FastifyInstance;
  let admin: TestUser;
  const mailer = capturingMailer();

  beforeAll(async () => {
    app = await buildTestApp({
      env: { MAGIC_LINK_URL: 'https://app.example.test/sign-in' },
      deps: { mailer },
    });
    admin = await createAdmin(app);
  });

  const list = (userId: string, token = admin.accessToken) =>
    app.inject({ method: 'GET', url: `/v1/users/${userId}/sessions`, headers: bearer(token) });
  const end = (path: string, token = admin.accessToken) =>
    app.inject({ method: 'DELETE', url: `/v1/users/${path}`, headers: bearer(token) });
  const me = (accessToken: string) =>
    app.inject({ method: 'GET', url: '/v1/auth/me', headers: bearer(accessToken) });
  const refresh = (refreshToken: string) =>
    app.inject({ method: 'POST', url: '/v1/auth/refresh', payload: { refresh_token: refreshToken } });

  it('lists them, newest first, as the user sees them', async () => {
    const user = await registerUser(app, 'sessions-listed');
    const second = await login(app, user.email);
    const res = await list(user.id);
    expect(res.statusCode, res.body).toBe(200);
    const sessions = res.json().data;
    expect(sessions.map((s: { id: string }) => s.id).sort()).toEqual(
      [decodeJwt(user.accessToken).sid, decodeJwt(second.session.access_token).sid].sort(),
    );
    expect(sessions[0]).toMatchObject({ amr: ['pwd'], current: false });
    expect(res.json().next_cursor).toBeNull();
    expect((await list(randomUUID())).statusCode).toBe(404);
    expect((await list('not-a-uuid')).statusCode).toBe(400);
    // users:read is needed.
    expect((await list(admin.id, user.accessToken)).statusCode).toBe(403);
  });

  it('a walk through the pages sees every session once, however they are used meanwhile', async () => {
    const user = await registerUser(app, 'sessions-walk');
    const logins = [await login(app, user.email), await login(app, user.email), await login(app, user.email)];
    const first = await app.inject({
      method: 'GET',
      url: '/v1/auth/sessions?limit=2',
      headers: bearer(user.accessToken),
    });
    expect(first.statusCode, first.body).toBe(200);
    const seen: string[] = first.json().data.map((s: { id: string }) => s.id);
    // Every session not on the first page is used now, before the second page is asked for.
    for (const l of logins)
      if (!seen.includes(decodeJwt(l.session.access_token).sid as string))
        expect((await refresh(l.session.refresh_token)).statusCode).toBe(200);
    const second = await app.inject({
      method: 'GET',
      url: `/v1/auth/sessions?limit=2&cursor=${encodeURIComponent(first.json().next_cursor)}`,
      headers: bearer(user.accessToken),
    });
    seen.push(...second.json().data.map((s: { id: string }) => s.id));
    expect(second.json().next_cursor).toBeNull();
    const all = [user.accessToken, ...logins.map((l) => l.session.access_token)].map((t) => decodeJwt(t).sid);
    expect([...seen].sort()).toEqual([...all].sort());
  });

  it('a session past its idle or absolute end is 404, as a revoked one: nothing is changed or audited', async () => {
    const user = await registerUser(app, 'sessions-expired');
    for (const sid of await expiredSessions(app, user.email)) {
      const res = await end(`${user.id}/sessions/${sid}`);
      expect(res.statusCode, res.body).toBe(404);
      expect(res.json().code).toBe('not_found');
      const [row] = await app.services.db.select().from(sessions).where(eq(sessions.id, sid));
      expect(row!.revokedAt).toBeNull();
    }
    const events = await app.services.audit.list({
      type: 'user.sessions_ended',
      subjectId: user.id,
      limit: 10,
    });
    expect(events).toHaveLength(0);
  });

  it('ends one session: its tokens stop at once, the others go on', async () => {
    const user = await registerUser(app, 'sessions-one');
    const other = await login(app, user.email);
    const sid = decodeJwt(user.accessToken).sid as string;
    const res = await end(`${user.id}/sessions/${sid}`);
    expect(res.statusCode, res.body).toBe(204);
    expect((await me(user.accessToken)).statusCode).toBe(401);
    expect((await refresh(user.refreshToken)).statusCode).toBe(401);
    expect((await me(other.session.access_token)).statusCode).toBe(200);
    // Ended already, another user's, or none at all: 404.
    expect((await end(`${user.id}/sessions/${sid}`)).statusCode).toBe(404);
    expect((await end(`${admin.id}/sessions/${decodeJwt(other.session.access_token).sid}`)).statusCode).toBe(
      404,
    );
    expect((await end(`${user.id}/sessions/${randomUUID()}`)).statusCode).toBe(404);
    const events = await app.services.audit.list({
      type: 'user.sessions_ended',
      subjectId: user.id,
      limit: 5,
    });
    expect(events).toHaveLength(1);
    expect(events[0]).toMatchObject({ actorId: admin.id, data: { scope: 'session', sessions: [sid] } });
  });

  it('ends one session once when asked several times at once: one 204, the others 404, one event', async () => {
    const user = await registerUser(app, 'sessions-race');
    const sid = decodeJwt(user.accessToken).sid as string;
    const statuses = (await Promise.all([1, 2, 3, 4, 5].map(() => end(`${user.id}/sessions/${sid}`)))).map(
      (r) => r.statusCode,
    );
    expect(statuses.sort()).toEqual([204, 404, 404, 404, 404]);
    const events = await app.services.audit.list({
      type: 'user.sessions_ended',
      subjectId: user.id,
      limit: 10,
    });
    expect(events).toHaveLength(1);
  });

  it('signs a user out everywhere, voiding links not yet opened, and leaves the account usable', async () => {
    const user = await registerUser(app, 'sessions-all');
    await app.services.repos.users.update(user.id, { emailConfirmedAt: new Date() });
    const other = await login(app, user.email);
    await app.inject({ method: 'POST', url: '/v1/auth/magic-link', payload: { email: user.email } });
    const link = mailer.sent.filter((m) => m.to === user.email && m.subject === 'Your sign-in link').at(-1)!;
    const token = /#token=(pml_[0-9A-Za-z_]+)/.exec(link.text)![1]!;

    const res = await end(`${user.id}/sessions`);
    expect(res.statusCode, res.body).toBe(204);
    for (const session of [
      user,
      { accessToken: other.session.access_token, refreshToken: other.session.refresh_token },
    ]) {
      expect((await me(session.accessToken)).statusCode).toBe(401);
      expect((await refresh(session.refreshToken)).statusCode).toBe(401);
    }
    expect((await list(user.id)).json().data).toEqual([]);
    const opened = await app.inject({
      method: 'POST',
      url: '/v1/auth/magic-link/verify',
      payload: { token },
    });
    expect(opened.statusCode).toBe(400);
    // Not disabled: the password signs in again.
    await login(app, user.email);
    const [event] = await app.services.audit.list({
      type: 'user.sessions_ended',
      subjectId: user.id,
      limit: 5,
    });
    expect(event).toMatchObject({ actorId: admin.id, data: { scope: 'all' } });
    expect((event!.data as { sessions: string[] }).sessions).toHaveLength(2);
  });

  it('needs every permission the user holds, as the other changes of a user do', async () => {
    const support = await userWith(app, ['users:read', 'users:write'], 'sessions-support');
    expect((await end(`${admin.id}/sessions`, support.accessToken)).statusCode).toBe(403);
    expect((await me(admin.accessToken)).statusCode).toBe(200);
    const plain = await registerUser(app, 'sessions-plain');
    expect((await end(`${plain.id}/sessions`, support.accessToken)).statusCode).toBe(204);
    expect((await me(plain.accessToken)).statusCode).toBe(401);
  });
});
