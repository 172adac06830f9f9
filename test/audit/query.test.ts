import type { FastifyInstance } from 'fastify';
import { beforeAll, describe, expect, it } from 'vitest';
import { randomUUID } from 'node:crypto';
import {
  AUDIT_EVENT_TYPES,
  type AuditEventType,
  CLOCK_SKEW_MS,
} from '../../src/modules/audit/audit.service.js';
import { buildTestApp } from '../support/app.js';
import { createAdmin, registerUser, type TestUser } from '../support/factories.js';
import { bearer } from '../support/http.js';

/** A cursor as the audit log's pages write it: base64url JSON of [created_at, id, complete_until]. */
const cursorOf = (key: unknown) => Buffer.from(JSON.stringify(key)).toString('base64url');
const NOBODY = '00000000-0000-0000-0000-000000000000';

describe('GET /v1/audit-events: what the query may say', () => {
  let app: FastifyInstance;
  let admin: TestUser;

  beforeAll(async () => {
    app = await buildTestApp();
    admin = await createAdmin(app);
  });

  const read = (url: string, token = admin.accessToken) =>
    app.inject({ method: 'GET', url, headers: bearer(token) });

  it('refuses a type the service never writes (a typo) with a 400 naming the known types', async () => {
    for (const type of ['auth.logins', 'Auth.Login', 'login', 'profile.update']) {
      const res = await read(`/v1/audit-events?type=${encodeURIComponent(type)}`);
      expect(res.statusCode, type).toBe(400);
      expect(res.headers['content-type']).toMatch(/^application\/problem\+json/);
      expect(res.json()).toMatchObject({ code: 'validation_failed' });
      const errors = res.json().errors as Array<{ field: string; message: string }>;
      expect(errors.map((e) => e.field)).toEqual(['query.type']);
      expect(errors[0]!.message).toContain('auth.login, auth.logout');
      expect(errors[0]!.message).toContain('profile.updated');
    }
    // Every known type is still taken, an event of it or none yet.
    const user = await registerUser(app, 'audit-query-type');
    const registered = await read(`/v1/audit-events?type=user.registered&subject_id=${user.id}`);
    expect(registered.statusCode, registered.body).toBe(200);
    expect(registered.json().data.map((e: { type: string }) => e.type)).toEqual(['user.registered']);
    for (const type of AUDIT_EVENT_TYPES) {
      const res = await read(`/v1/audit-events?type=${type}&subject_id=${NOBODY}`);
      expect(res.statusCode, `${type}: ${res.body}`).toBe(200);
    }
  });

  it('lists the known types in the OpenAPI document', async () => {
    const document = (await app.inject({ method: 'GET', url: '/openapi.json' })).json();
    const parameter = document.paths['/v1/audit-events'].get.parameters.find(
      (p: { name: string }) => p.name === 'type',
    );
    expect(parameter.schema.enum).toEqual([...AUDIT_EVENT_TYPES]);
  });

  it('refuses a cursor carrying a complete_until later than any instance can have answered: it would read past settled=true’s bound', async () => {
    const user = await registerUser(app, 'audit-query-cursor');
    // Just written: on PostgreSQL after complete_until, so not in a settled read.
    const settled = await read(`/v1/audit-events?subject_id=${user.id}&settled=true`);
    expect(settled.statusCode, settled.body).toBe(200);
    const completeUntil = Date.parse(settled.json().complete_until);
    const top = ['9999-12-31T23:59:59.999Z', NOBODY];
    for (const within of [
      new Date(Date.now() + 60_000).toISOString(),
      '9999-12-31T23:59:59.999Z',
      new Date(app.services.audit.completeUntil().getTime() + CLOCK_SKEW_MS + 1000).toISOString(),
    ]) {
      for (const url of [
        `/v1/audit-events?subject_id=${user.id}&settled=true&cursor=${cursorOf([...top, within])}`,
        `/v1/audit-events?subject_id=${user.id}&cursor=${cursorOf([...top, within])}`,
      ]) {
        const res = await read(url);
        expect(res.statusCode, `${within}: ${res.body}`).toBe(400);
        expect(res.json().errors).toEqual([{ field: 'query.cursor', message: 'invalid cursor' }]);
      }
      const activity = await read(
        `/v1/auth/activity?settled=true&cursor=${cursorOf([...top, within])}`,
        user.accessToken,
      );
      expect(activity.statusCode, activity.body).toBe(400);
      expect(activity.json().errors).toEqual([{ field: 'query.cursor', message: 'invalid cursor' }]);
    }
    // What an instance whose clock runs ahead of this one's (within the skew allowed) answered is taken,
    // and is what the page answers; one from the past reads up to it.
    for (const within of [
      new Date(app.services.audit.completeUntil().getTime() + CLOCK_SKEW_MS / 2).toISOString(),
      new Date(completeUntil).toISOString(),
      '0001-01-01T00:00:00.000Z',
    ]) {
      const res = await read(
        `/v1/audit-events?subject_id=${user.id}&settled=true&cursor=${cursorOf([...top, within])}`,
      );
      expect(res.statusCode, `${within}: ${res.body}`).toBe(200);
      expect(res.json().complete_until).toBe(within);
      for (const e of res.json().data as Array<{ created_at: string }>)
        expect(Date.parse(e.created_at)).toBeLessThan(Date.parse(within));
    }
  });

  it('refuses a since= whose last fraction of a millisecond rounds past year 9999 (was a 500)', async () => {
    const user = await registerUser(app, 'audit-query-since');
    for (const since of [
      '9999-12-31T23:59:59.9999Z',
      '9999-12-31T23:59:59.999000001+00:00',
      '9999-12-31T23:59:59-23:59',
    ]) {
      for (const [url, token] of [
        [`/v1/audit-events?since=${encodeURIComponent(since)}`, admin.accessToken],
        [`/v1/auth/activity?since=${encodeURIComponent(since)}`, user.accessToken],
      ] as const) {
        const res = await read(url, token);
        expect(res.statusCode, `${url}: ${res.body}`).toBe(400);
        expect(res.json().errors).toEqual([{ field: 'query.since', message: expect.any(String) }]);
      }
    }
    // The last millisecond itself, and any fraction within the range, are read as before.
    for (const since of [
      '9999-12-31T23:59:59.999Z',
      '9999-12-31T23:59:59.9989Z',
      '0001-01-01T00:00:00.0001Z',
    ]) {
      const res = await read(`/v1/audit-events?subject_id=${user.id}&since=${encodeURIComponent(since)}`);
      expect(res.statusCode, `${since}: ${res.body}`).toBe(200);
    }
  });

  it('pages through events that share one millisecond each once, newest first and then by id', async () => {
    // One change reaching many users writes its events with one stamp (a role deleted from its holders).
    const user = await registerUser(app, 'audit-query-ties');
    const actorId = randomUUID();
    const types = [
      'role.removed',
      'auth.session_ended',
      'user.sessions_ended',
      'role.granted',
      'auth.logout',
    ];
    await app.services.audit.record(
      app.services.db,
      { actorType: 'user', actorId, ip: null, userAgent: null, requestId: null },
      types.map((type) => ({ type: type as AuditEventType, subjectId: user.id })),
    );
    const pages = async (url: string, token: string) => {
      const seen: Array<{ id: string; created_at: string }> = [];
      let cursor: string | null = null;
      do {
        const res = await read(`${url}&limit=2${cursor ? `&cursor=${cursor}` : ''}`, token);
        expect(res.statusCode, res.body).toBe(200);
        seen.push(...res.json().data);
        cursor = res.json().next_cursor;
      } while (cursor !== null);
      return seen;
    };
    for (const seen of [
      await pages(`/v1/audit-events?actor_id=${actorId}`, admin.accessToken),
      await pages('/v1/auth/activity?', user.accessToken),
    ]) {
      // The newest events are the five, once each, in descending id order: the keyset the cursor continues.
      const ids = seen.filter((e) => e.created_at === seen[0]!.created_at).map((e) => e.id);
      expect(new Set(ids).size).toBe(types.length);
      expect(ids).toEqual([...ids].sort().reverse());
    }
  });

  it('answers any other forged cursor with a 400 or a page, never a 500', async () => {
    const forged: unknown[] = [
      ['0001-01-01T00:00:00Z', NOBODY, '0001-01-01T00:00:00Z'],
      ['9999-12-31T23:59:59.999+00:00', NOBODY.replaceAll('0', 'F')],
      ['9999-12-31T23:59:59-23:59', NOBODY],
      ['2026-01-01t00:00:00.123456789z', NOBODY, '2026-01-01T00:00:00.1234567Z'],
      ['0000-12-31T23:59:59Z', NOBODY],
      ['2026-02-30T00:00:00Z', NOBODY],
      ['2026-01-01T00:00:00Z', 'not-a-uuid'],
      ['2026-01-01T00:00:00Z', NOBODY, '2026-01-01T00:00:00Z', 'extra'],
      ['2026-01-01T00:00:00Z', NOBODY, 1e308],
      [1_700_000_000_000, NOBODY],
      ['2026-01-01T00:00:00Z'],
      { at: '2026-01-01T00:00:00Z', id: NOBODY },
      '2026-01-01T00:00:00Z',
      null,
    ];
    for (const key of forged) {
      for (const route of ['/v1/audit-events?settled=true&', '/v1/auth/activity?']) {
        const res = await read(`${route}cursor=${cursorOf(key)}`);
        expect([200, 400], `${route} ${JSON.stringify(key)}: ${res.body}`).toContain(res.statusCode);
        if (res.statusCode === 400)
          expect(res.json().errors).toEqual([{ field: 'query.cursor', message: 'invalid cursor' }]);
      }
    }
  });
});
