import { eq } from 'drizzle-orm';
import type { FastifyInstance } from 'fastify';
import { decodeJwt } from 'jose';
import { beforeAll, describe, expect, it } from 'vitest';
import { sessions } from '../../src/db/schema/index.js';
import { buildTestApp } from '../support/app.js';
import { login, registerUser } from '../support/factories.js';
import { bearer } from '../support/http.js';

/** Where a session ends, and which client it was issued to. */
describe('a session’s end and its client', () => {
  let app: FastifyInstance;
  beforeAll(async () => {
    app = await buildTestApp();
  });

  const sidOf = (accessToken: string) => decodeJwt(accessToken).sid as string;
  const setSession = (id: string, values: Partial<typeof sessions.$inferInsert>) =>
    app.services.db.update(sessions).set(values).where(eq(sessions.id, id));

  it('DELETE of a session past its absolute or idle expiry is 404, as of an ended one: nothing changes, nothing is audited', async () => {
    const user = await registerUser(app, 'end-expired');
    const absolute = await login(app, user.email);
    const idle = await login(app, user.email);
    const past = new Date(Date.now() - 1000);
    await setSession(sidOf(absolute.session.access_token), { expiresAt: past, idleExpiresAt: past });
    await setSession(sidOf(idle.session.access_token), { idleExpiresAt: past });
    // Neither is listed: the list is of live sessions.
    const listed = await app.inject({
      method: 'GET',
      url: '/v1/auth/sessions',
      headers: bearer(user.accessToken),
    });
    expect(listed.json().data.map((s: { id: string }) => s.id)).toEqual([sidOf(user.accessToken)]);
    for (const ended of [absolute, idle]) {
      const sid = sidOf(ended.session.access_token);
      const res = await app.inject({
        method: 'DELETE',
        url: `/v1/auth/sessions/${sid}`,
        headers: bearer(user.accessToken),
      });
      expect(res.statusCode, res.body).toBe(404);
      expect(res.json().code).toBe('not_found');
      const [row] = await app.services.db.select().from(sessions).where(eq(sessions.id, sid));
      expect(row!.revokedAt).toBeNull();
    }
    const events = await app.services.audit.list({
      type: 'auth.session_ended',
      subjectId: user.id,
      limit: 10,
    });
    expect(events).toHaveLength(0);
  });
});
