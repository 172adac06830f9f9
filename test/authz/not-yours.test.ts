import { randomUUID } from 'node:crypto';
import type { FastifyInstance } from 'fastify';
import type { InjectOptions, Response } from 'light-my-request';
import { beforeAll, describe, expect, it } from 'vitest';
import { createKey } from '../api-keys/helpers.js';
import { createClient, userWith } from '../clients/helpers.js';
import { buildTestApp } from '../support/app.js';
import { login, registerUser, type TestUser } from '../support/factories.js';
import { bearer } from '../support/http.js';

/**
 * A 404 that hides something of another user's (ASVS V8: answered as a missing id, so existence is
 * not revealed) is still an access-control failure (ASVS V7): one `authorization.denied` event, the
 * answer the missing id's to the byte.
 */
let app: FastifyInstance;
beforeAll(async () => {
  app = await buildTestApp();
});

const denialsBy = (actorId: string) =>
  app.services.audit.list({ type: 'authorization.denied', actorId, limit: 50 });

/**
 * The answer as a client sees it, with what differs between any two requests written as a name: the
 * id it named (the problem's `instance`) and the request's id (its header and `request_id`).
 */
function seen(res: Response, id: string) {
  const { 'x-request-id': requestId, date: _date, ...headers } = res.headers;
  expect(typeof requestId).toBe('string');
  const body = res.body
    .split(id)
    .join('{id}')
    .split(requestId as string)
    .join('{request_id}');
  return { status: res.statusCode, headers, body };
}

/**
 * Sends `request(anothers)` and `request(missing)` as `caller`: both 404, the same answer, and only
 * the first leaves an `authorization.denied` event. Returns that event.
 */
async function hiddenAsMissing(
  caller: TestUser,
  anothers: string,
  request: (id: string) => InjectOptions,
  missing: string = randomUUID(),
) {
  const before = (await denialsBy(caller.id)).length;
  const theirs = await app.inject(request(anothers));
  const afterTheirs = await denialsBy(caller.id);
  const none = await app.inject(request(missing));
  const afterMissing = await denialsBy(caller.id);
  expect(theirs.statusCode, theirs.body).toBe(404);
  expect(seen(theirs, anothers)).toEqual(seen(none, missing));
  expect(afterTheirs).toHaveLength(before + 1);
  // A truly missing id is no one's: nothing recorded.
  expect(afterMissing).toHaveLength(before + 1);
  return afterTheirs[0]!;
}

describe('API keys: another user’s key', () => {
  let owner: TestUser;
  let other: TestUser;
  let key: { id: string };
  beforeAll(async () => {
    owner = await registerUser(app, 'key-owner');
    other = await registerUser(app, 'key-prober');
    key = await createKey(app, owner.accessToken, { scopes: ['account:read'] });
  });

  const cases: Array<[string, (id: string) => InjectOptions]> = [
    ['api_key.read', (id) => ({ method: 'GET', url: `/v1/api-keys/${id}` })],
    [
      'api_key.update',
      (id) => ({ method: 'PATCH', url: `/v1/api-keys/${id}`, payload: { name: 'mine now' } }),
    ],
    ['api_key.rotate', (id) => ({ method: 'POST', url: `/v1/api-keys/${id}/rotate`, payload: {} })],
    ['api_key.revoke', (id) => ({ method: 'DELETE', url: `/v1/api-keys/${id}` })],
  ];
  for (const [action, request] of cases) {
    it(`${action}: 404 as for a missing id, one authorization.denied event`, async () => {
      const event = await hiddenAsMissing(other, key.id, (id) => ({
        ...request(id),
        headers: bearer(other.accessToken),
      }));
      expect(event).toMatchObject({
        type: 'authorization.denied',
        outcome: 'failure',
        actorType: 'user',
        actorId: other.id,
        subjectId: key.id,
        data: { action, reason: 'not_owner', owner_id: owner.id, params: { id: key.id } },
      });
    });
  }

  it('leaves the key as it was, and its owner’s own requests record no denial', async () => {
    const mine = await app.inject({
      method: 'GET',
      url: `/v1/api-keys/${key.id}`,
      headers: bearer(owner.accessToken),
    });
    expect(mine.statusCode, mine.body).toBe(200);
    expect(mine.json().id).toBe(key.id);
    expect(mine.json().name).not.toBe('mine now');
    expect(await denialsBy(owner.id)).toHaveLength(0);
  });

  it('a revoked key of another’s is still another’s: 404 as for a missing id, audited', async () => {
    const gone = await createKey(app, owner.accessToken, { scopes: ['account:read'] });
    const revoked = await app.inject({
      method: 'DELETE',
      url: `/v1/api-keys/${gone.id}`,
      headers: bearer(owner.accessToken),
    });
    expect(revoked.statusCode).toBe(204);
    const event = await hiddenAsMissing(other, gone.id, (id) => ({
      method: 'GET',
      url: `/v1/api-keys/${id}`,
      headers: bearer(other.accessToken),
    }));
    expect(event).toMatchObject({
      subjectId: gone.id,
      data: { action: 'api_key.read', reason: 'not_owner' },
    });
    // Its owner gets the missing answer for it too, and no denial.
    const own = await app.inject({
      method: 'GET',
      url: `/v1/api-keys/${gone.id}`,
      headers: bearer(owner.accessToken),
    });
    expect(own.statusCode).toBe(404);
    expect(await denialsBy(owner.id)).toHaveLength(0);
  });
});

describe('sessions: ending another user’s', () => {
  it('404 as for a missing id, one authorization.denied event; one’s own ends with none', async () => {
    const owner = await registerUser(app, 'session-owner');
    const other = await registerUser(app, 'session-prober');
    const sessions = await app.inject({
      method: 'GET',
      url: '/v1/auth/sessions',
      headers: bearer(owner.accessToken),
    });
    const sessionId = (sessions.json().data as Array<{ id: string }>)[0]!.id;
    const event = await hiddenAsMissing(other, sessionId, (id) => ({
      method: 'DELETE',
      url: `/v1/auth/sessions/${id}`,
      headers: bearer(other.accessToken),
    }));
    expect(event).toMatchObject({
      actorId: other.id,
      subjectId: owner.id,
      data: { action: 'session.end', reason: 'not_owner', session_id: sessionId },
    });
    // The owner's session goes on.
    const me = await app.inject({ method: 'GET', url: '/v1/auth/me', headers: bearer(owner.accessToken) });
    expect(me.statusCode).toBe(200);

    const second = await login(app, owner.email);
    const listed = await app.inject({
      method: 'GET',
      url: '/v1/auth/sessions',
      headers: bearer(second.session.access_token),
    });
    const older = (listed.json().data as Array<{ id: string; current: boolean }>).find((s) => !s.current)!;
    const own = await app.inject({
      method: 'DELETE',
      url: `/v1/auth/sessions/${older.id}`,
      headers: bearer(second.session.access_token),
    });
    expect(own.statusCode, own.body).toBe(204);
    expect(await denialsBy(owner.id)).toHaveLength(0);
  });
});

describe('profiles: another user’s, without profiles:read', () => {
  it('404 as for a missing id, audited for either (nothing is looked up); one’s own records none', async () => {
    const owner = await registerUser(app, 'profile-owner');
    const other = await registerUser(app, 'profile-prober');
    const request = (id: string): InjectOptions => ({
      method: 'GET',
      url: `/v1/profiles/${id}`,
      headers: bearer(other.accessToken),
    });
    const missing = randomUUID();
    const theirs = await app.inject(request(owner.id));
    const none = await app.inject(request(missing));
    expect(theirs.statusCode).toBe(404);
    expect(seen(theirs, owner.id)).toEqual(seen(none, missing));
    const events = await denialsBy(other.id);
    // Newest first: the missing id's, then the owner's; one each.
    expect(events.map((e) => e.subjectId)).toEqual([missing, owner.id]);
    expect(events[1]).toMatchObject({
      actorId: other.id,
      outcome: 'failure',
      data: {
        action: 'profile.read',
        reason: 'not_owner',
        route: '/v1/profiles/:user_id',
        method: 'GET',
        params: { user_id: owner.id },
      },
    });

    const own = await app.inject({
      method: 'GET',
      url: `/v1/profiles/${owner.id}`,
      headers: bearer(owner.accessToken),
    });
    expect(own.statusCode, own.body).toBe(200);
    expect(await denialsBy(owner.id)).toHaveLength(0);
  });
});

describe('clients: another user’s, without administration', () => {
  let creator: TestUser;
  let other: TestUser;
  let client: { id: string; client_id: string };
  beforeAll(async () => {
    creator = await userWith(app, ['clients:read', 'clients:write', 'account:read'], 'client-creator');
    other = await userWith(app, ['clients:read', 'clients:write', 'account:read'], 'client-prober');
    client = await createClient(app, creator.accessToken, { scopes: ['account:read'] });
  });

  const cases: Array<[string, (id: string) => InjectOptions]> = [
    ['client.read', (id) => ({ method: 'GET', url: `/v1/clients/${id}` })],
    ['client.update', (id) => ({ method: 'PATCH', url: `/v1/clients/${id}`, payload: { name: 'mine now' } })],
    ['client.rotate_secret', (id) => ({ method: 'POST', url: `/v1/clients/${id}/secrets`, payload: {} })],
    ['client.delete', (id) => ({ method: 'DELETE', url: `/v1/clients/${id}` })],
  ];
  for (const [action, request] of cases) {
    it(`${action}: 404 as for a missing id, one authorization.denied event`, async () => {
      const event = await hiddenAsMissing(other, client.id, (id) => ({
        ...request(id),
        headers: bearer(other.accessToken),
      }));
      expect(event).toMatchObject({
        actorId: other.id,
        subjectId: client.id,
        data: { action, reason: 'not_owner', client_id: client.client_id, owner_id: creator.id },
      });
    });
  }

  it('by its client_id too, as for a missing one', async () => {
    const event = await hiddenAsMissing(
      other,
      client.client_id,
      (id) => ({ method: 'GET', url: `/v1/clients/${id}`, headers: bearer(other.accessToken) }),
      `${client.client_id.slice(0, -4)}zzzz`,
    );
    expect(event).toMatchObject({ subjectId: client.id, data: { action: 'client.read' } });
  });

  it('leaves the client as it was, and its creator’s own requests record no denial', async () => {
    const mine = await app.inject({
      method: 'GET',
      url: `/v1/clients/${client.id}`,
      headers: bearer(creator.accessToken),
    });
    expect(mine.statusCode, mine.body).toBe(200);
    expect(mine.json().name).not.toBe('mine now');
    expect(await denialsBy(creator.id)).toHaveLength(0);
  });
});
