import type { FastifyInstance } from 'fastify';
import pino from 'pino';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import { buildApp } from '../../src/app.js';
import { type DatabaseHandle, openDatabase } from '../../src/db/client.js';
import type { NewAuditEvent } from '../../src/modules/audit/audit.repository.js';
import { testConfig } from '../support/app.js';
import { createAdmin, registerUser, type TestUser } from '../support/factories.js';
import { bearer } from '../support/http.js';

// On PostgreSQL: PGlite runs one transaction at a time, and has no transaction timeout.
describe.skipIf(!inject('databaseUrl'))(
  'DB_TRANSACTION_TIMEOUT_MS: a transaction commits within it of its BEGIN, or not at all',
  () => {
    let app: FastifyInstance;
    let database: DatabaseHandle;
    let admin: TestUser;

    beforeAll(async () => {
      database = await openDatabase({
        url: inject('databaseUrl'),
        dataDir: '.data/test',
        logger: pino({ level: 'silent' }),
        migrate: true,
        // Long enough that the set-up's and the last grant's transactions finish within it on a busy
        // machine, short enough for a test.
        transactionTimeoutMs: 3000,
      });
      app = await buildApp({ config: testConfig(), database, logger: pino({ level: 'silent' }) });
      await app.ready();
      admin = await createAdmin(app);
    });
    afterAll(async () => {
      await app?.close();
      await database?.close();
    });

    it('a transaction still running past it is rolled back, its audit event with it: 503', async () => {
      // What a row it writes can take to become visible: the longer of this timeout and the connect
      // timeout (2 s, a statement outside a transaction waiting for a connection), then a statement (5 s).
      expect(database.visibleWithinMs).toBe(3000 + 5000);
      const user = await registerUser(app, 'slow-grant');
      // The grant writes its audit event, then its transaction waits past the timeout.
      const repo = app.services.repos.audit;
      const insert = repo.insert;
      let held = () => {};
      const holding = new Promise<void>((resolve) => {
        held = resolve;
      });
      repo.insert = async (events: NewAuditEvent | NewAuditEvent[], tx) => {
        await insert.call(repo, events, tx);
        if ([events].flat().some((e) => e.subjectId === user.id)) {
          held();
          await new Promise((resolve) => setTimeout(resolve, 3300));
        }
      };
      const grant = app.inject({
        method: 'PUT',
        url: `/v1/users/${user.id}/roles/admin`,
        headers: bearer(admin.accessToken),
      });
      await holding;
      repo.insert = insert;
      const res = await grant;
      expect(res.statusCode, res.body).toBe(503);
      expect(res.json().code).toBe('service_unavailable');
      const roles = await app.inject({
        method: 'GET',
        url: `/v1/users/${user.id}/roles`,
        headers: bearer(admin.accessToken),
      });
      expect(roles.statusCode, roles.body).toBe(200);
      expect(roles.json().roles).toEqual(['user']);
      const events = await app.inject({
        method: 'GET',
        url: `/v1/audit-events?subject_id=${user.id}&type=role.granted`,
        headers: bearer(admin.accessToken),
      });
      expect(events.json().data).toEqual([]);
      // A quick one commits.
      const again = await app.inject({
        method: 'PUT',
        url: `/v1/users/${user.id}/roles/admin`,
        headers: bearer(admin.accessToken),
      });
      expect(again.statusCode, again.body).toBe(200);
    });
  },
);
