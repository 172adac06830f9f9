import { expect } from 'vitest';
import type { PostgresCluster } from './cluster.js';
import type { Outcome } from './http.js';
import type { LoadResult } from './load.js';

export const describeOutcome = (o: Outcome) =>
  `${o.op} → ${o.status || o.error} in ${Math.round(o.ms)} ms ${JSON.stringify(o.body)?.slice(0, 200)}`;

/** Every 201 registration is a users row with its audit event; every 200 login a session with its. */
export async function expectAcknowledgedWritesKept(
  cluster: PostgresCluster,
  database: string,
  load: Pick<LoadResult, 'users' | 'logins'>,
) {
  expect(load.users.length).toBeGreaterThan(0);
  const ids = load.users.map((u) => u.id);
  const users = await cluster.query<{ n: number }>(
    'SELECT count(*)::int AS n FROM users WHERE id = ANY($1::uuid[])',
    [ids],
    database,
  );
  expect(users.rows[0]?.n).toBe(ids.length);
  const registered = await cluster.query<{ n: number }>(
    `SELECT count(DISTINCT subject_id)::int AS n FROM audit_events
      WHERE type = 'user.registered' AND subject_id = ANY($1::text[])`,
    [ids],
    database,
  );
  expect(registered.rows[0]?.n).toBe(ids.length);

  const sessionIds = load.logins.map((l) => l.sessionId);
  const sessions = await cluster.query<{ n: number }>(
    'SELECT count(*)::int AS n FROM sessions WHERE id = ANY($1::uuid[])',
    [sessionIds],
    database,
  );
  expect(sessions.rows[0]?.n).toBe(sessionIds.length);
  const loggedIn = await cluster.query<{ n: number }>(
    `SELECT count(DISTINCT data->>'session_id')::int AS n FROM audit_events
      WHERE type = 'auth.login' AND outcome = 'success' AND data->>'session_id' = ANY($1::text[])`,
    [sessionIds],
    database,
  );
  expect(loggedIn.rows[0]?.n).toBe(sessionIds.length);
}

/** One line of figures per scenario, for the run's log. */
export function summarize(name: string, outcomes: Outcome[], extra: Record<string, unknown> = {}) {
  const byStatus: Record<string, number> = {};
  for (const o of outcomes) {
    const key = String(o.status || o.error);
    byStatus[key] = (byStatus[key] ?? 0) + 1;
  }
  const failed = outcomes.filter((o) => o.status === 503);
  const slowest503 = failed.length ? Math.round(Math.max(...failed.map((o) => o.ms))) : null;
  console.log(
    `[faults] ${name}: ${outcomes.length} requests ${JSON.stringify(byStatus)}, slowest 503 ${slowest503} ms, ${Object.entries(
      extra,
    )
      .map(([k, v]) => `${k} ${typeof v === 'number' ? Math.round(v) : v}`)
      .join(', ')}`,
  );
}
