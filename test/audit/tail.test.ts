import type { FastifyInstance } from 'fastify';
import { beforeAll, describe, expect, inject, it } from 'vitest';
import type { NewAuditEvent } from '../../src/modules/audit/audit.repository.js';
import { buildTestApp } from '../support/app.js';
import { createTestClock } from '../support/clock.js';
import { createAdmin, registerUser, setUserStatus, type TestUser } from '../support/factories.js';
import { bearer } from '../support/http.js';

/** Makes `repo.insert` hold the transaction of the events about `subjectId` open once it has written them. */
function holdAuditOf(app: FastifyInstance, subjectId: string) {
  const repo = app.services.repos.audit;
  const insert = repo.insert;
  let release = () => {};
  const released = new Promise<void>((resolve) => {
    release = resolve;
  });
  let holding = () => {};
  const held = new Promise<void>((resolve) => {
    holding = resolve;
  });
  repo.insert = async (events: NewAuditEvent | NewAuditEvent[], tx) => {
    await insert.call(repo, events, tx);
    if ([events].flat().some((e) => e.subjectId === subjectId)) {
      holding();
      await released;
    }
  };
  return {
    /** Resolves once the transaction has written the events and waits. */
    held,
    release() {
      repo.insert = insert;
      release();
    },
  };
}

interface AuditEvent {
  id: string;
  type: string;
  subject_id: string | null;
  created_at: string;
}

describe('following the audit log with since=: no event is missed for committing late', () => {
  const clock = createTestClock();
  let app: FastifyInstance;
  let admin: TestUser;

  beforeAll(async () => {
    app = await buildTestApp({ deps: { clock } });
    admin = await createAdmin(app);
  });

  /**
   * One read of a tail, as a SIEM export does it: every page of `query` from `since`, then where the
   * next read starts: the answer's `complete_until` (the later of it and `since`) when it gives one,
   * else the newest `created_at` read.
   */
  async function tailRead(query: string, since: string) {
    const events: AuditEvent[] = [];
    let cursor: string | null = null;
    let completeUntil: string | undefined;
    do {
      const res = await app.inject({
        method: 'GET',
        url: `/v1/audit-events?${query}&settled=true&since=${encodeURIComponent(since)}&limit=1${cursor ? `&cursor=${encodeURIComponent(cursor)}` : ''}`,
        headers: bearer(admin.accessToken),
      });
      expect(res.statusCode, res.body).toBe(200);
      const body = res.json() as { data: AuditEvent[]; next_cursor: string | null; complete_until?: string };
      events.push(...body.data);
      completeUntil ??= body.complete_until;
      cursor = body.next_cursor;
    } while (cursor);
    const newest = events
      .map((e) => e.created_at)
      .sort()
      .at(-1);
    const next = completeUntil ? [since, completeUntil].sort().at(-1)! : (newest ?? since);
    return { events, next };
  }

  // On PostgreSQL: PGlite has one connection, and a second change waits for the first to commit.
  it.skipIf(!inject('databaseUrl'))(
    'an event stamped first and committed last is read by the tail that had read the one stamped after it',
    async () => {
      const [early, late] = [await registerUser(app, 'tail-a'), await registerUser(app, 'tail-b')];
      const query = `actor_id=${admin.id}&type=role.granted`;
      let since = clock.now().toISOString();
      const seen: AuditEvent[] = [];

      // A: the grant to `early` writes its event, then its transaction stays open.
      const hold = holdAuditOf(app, early.id);
      let first: Promise<{ statusCode: number; body: string }> | undefined;
      try {
        first = app.inject({
          method: 'PUT',
          url: `/v1/users/${early.id}/roles/admin`,
          headers: bearer(admin.accessToken),
        });
        await hold.held;
        // B: the grant to `late`, stamped a second after A, commits first.
        clock.advance(1);
        const second = await app.inject({
          method: 'PUT',
          url: `/v1/users/${late.id}/roles/admin`,
          headers: bearer(admin.accessToken),
        });
        expect(second.statusCode, second.body).toBe(200);
        // The consumer reads while A is still open.
        const read = await tailRead(query, since);
        seen.push(...read.events);
        since = read.next;
      } finally {
        hold.release();
      }
      const done = await first!;
      expect(done.statusCode, done.body).toBe(200);

      // Later reads of the tail, once what was open has long committed.
      clock.advance(120);
      const read = await tailRead(query, since);
      seen.push(...read.events);
      // Read twice (since= is at or after) is read once: a tail keeps the ids it has.
      const granted = (user: TestUser) =>
        new Set(seen.filter((e) => e.subject_id === user.id).map((e) => e.id));
      expect(granted(late).size).toBe(1);
      expect(granted(early).size).toBe(1);
    },
  );

  const read = (query: string) =>
    app.inject({ method: 'GET', url: `/v1/audit-events?${query}`, headers: bearer(admin.accessToken) });

  it('complete_until stays behind the clock by as long as an event can take to commit; settled=true stops there, the default reads up to now', async () => {
    const user = await registerUser(app, 'tail-fresh');
    const since = new Date(clock.nowMs() - 1000).toISOString();
    const before = clock.nowMs();
    const settled = await read(`subject_id=${user.id}&settled=true&since=${encodeURIComponent(since)}`);
    const after = clock.nowMs();
    expect(settled.statusCode, settled.body).toBe(200);
    const completeUntil = Date.parse(settled.json().complete_until);
    const settleMs = app.services.audit.settleMs;
    expect(completeUntil).toBeGreaterThanOrEqual(before - settleMs);
    expect(completeUntil).toBeLessThanOrEqual(after - settleMs);
    // On PostgreSQL: at least a transaction's time (15 s) and its COMMIT's (5 s), the test database's defaults.
    if (inject('databaseUrl')) expect(settleMs).toBeGreaterThanOrEqual(20_000);
    else expect(settleMs).toBe(0);
    const types = (res: { json(): { data: AuditEvent[] } }) => res.json().data.map((e) => e.type);
    // Just written: within the window on PostgreSQL, so not in the settled answer yet.
    expect(types(settled)).toEqual(inject('databaseUrl') ? [] : ['user.registered']);
    // Up to now on asking, and by default, with since= or without, as before.
    const now = await read(`subject_id=${user.id}&since=${encodeURIComponent(since)}&settled=false`);
    expect(types(now)).toEqual(['user.registered']);
    const byDefault = await read(`subject_id=${user.id}&since=${encodeURIComponent(since)}`);
    expect(types(byDefault)).toEqual(['user.registered']);
    const all = await read(`subject_id=${user.id}`);
    expect(types(all)).toEqual(['user.registered']);
    expect(all.json().complete_until).toEqual(expect.any(String));
    // settled=true without since= stops at complete_until too.
    const upTo = await read(`subject_id=${user.id}&settled=true`);
    expect(types(upTo)).toEqual(inject('databaseUrl') ? [] : ['user.registered']);
    // Once the window has passed, the settled read has it.
    clock.advance(settleMs / 1000 + 1);
    expect(
      types(await read(`subject_id=${user.id}&settled=true&since=${encodeURIComponent(since)}`)),
    ).toEqual(['user.registered']);
    const bad = await read('settled=yes');
    expect(bad.statusCode).toBe(400);
    expect(bad.json().errors).toEqual([expect.objectContaining({ field: 'query.settled' })]);
  });

  it('every page of a read answers the complete_until of its first: a tail resuming from its last page misses nothing', async () => {
    const user = await registerUser(app, 'tail-pages');
    for (const status of ['disabled', 'active'] as const) {
      clock.advance(1);
      expect((await setUserStatus(app, admin.accessToken, user.id, status)).statusCode).toBe(200);
    }
    const since = new Date(clock.nowMs() - 60_000).toISOString();
    clock.advance(120);
    const query = `subject_id=${user.id}&settled=true&since=${encodeURIComponent(since)}&limit=1`;
    const pages: Array<{ data: AuditEvent[]; next_cursor: string | null; complete_until: string }> = [];
    let cursor: string | null = null;
    do {
      const res = await read(`${query}${cursor ? `&cursor=${encodeURIComponent(cursor)}` : ''}`);
      expect(res.statusCode, res.body).toBe(200);
      pages.push(res.json());
      cursor = pages.at(-1)!.next_cursor;
      if (pages.length === 1) {
        // Written while the read goes on, and settled before its next page is asked for.
        expect((await setUserStatus(app, admin.accessToken, user.id, 'disabled')).statusCode).toBe(200);
        clock.advance(120);
      }
    } while (cursor);
    expect(pages.flatMap((p) => p.data.map((e) => e.type))).toEqual([
      'user.enabled',
      'user.disabled',
      'user.registered',
    ]);
    expect(new Set(pages.map((p) => p.complete_until)).size).toBe(1);
    const next = await read(
      `subject_id=${user.id}&settled=true&since=${encodeURIComponent(pages.at(-1)!.complete_until)}`,
    );
    expect(next.json().data.map((e: AuditEvent) => e.type)).toEqual(['user.disabled']);
  });
});
