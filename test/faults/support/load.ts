import { randomUUID } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import { decodeJwt } from 'jose';
import { type Outcome, send } from './http.js';

export const LOAD_PASSWORD = 'correct horse battery staple';

/** A write the service acknowledged with a 2xx: it must exist afterwards, with its audit event. */
export interface AcknowledgedUser {
  id: string;
  email: string;
}

export interface AcknowledgedLogin {
  userId: string;
  sessionId: string;
}

export interface LoadOptions {
  /** Concurrent clients; each loops register → /me → refresh → login. */
  workers?: number;
  /** Bounds: the loop stops at whichever comes first (or at stop()). */
  maxRequests?: number;
  maxMs?: number;
  /** Pause between a client's rounds, so two cores are left for PostgreSQL and the service. */
  pauseMs?: number;
}

/**
 * A bounded load of the calls frontends make, recording every outcome, every acknowledged
 * registration and every acknowledged login.
 */
export function startLoad(baseUrl: string, options: LoadOptions = {}) {
  const { workers = 3, maxRequests = 20_000, maxMs = 60_000, pauseMs = 20 } = options;
  const outcomes: Outcome[] = [];
  const users: AcknowledgedUser[] = [];
  const logins: AcknowledgedLogin[] = [];
  const run = randomUUID().slice(0, 8);
  const deadline = performance.now() + maxMs;
  let stopped = false;
  const going = () => !stopped && performance.now() < deadline && outcomes.length < maxRequests;

  async function call(op: string, method: string, path: string, body?: unknown, token?: string) {
    const outcome = await send(baseUrl, method, path, { op, body, token });
    outcomes.push(outcome);
    return outcome;
  }

  async function client(worker: number) {
    let session: { access: string; refresh: string } | undefined;
    for (let round = 1; going(); round++) {
      const email = `fault-${run}-${worker}-${round}@example.test`;
      const reg = await call('register', 'POST', '/v1/auth/register', { email, password: LOAD_PASSWORD });
      if (reg.status === 201) {
        const body = reg.body as {
          user: { id: string };
          session: { access_token: string; refresh_token: string };
        };
        users.push({ id: body.user.id, email });
        session = { access: body.session.access_token, refresh: body.session.refresh_token };
      }
      if (session && going()) {
        await call('me', 'GET', '/v1/auth/me', undefined, session.access);
        const refreshed = await call('refresh', 'POST', '/v1/auth/refresh', {
          refresh_token: session.refresh,
        });
        if (refreshed.status === 200) {
          const s = (refreshed.body as { session: { access_token: string; refresh_token: string } }).session;
          session = { access: s.access_token, refresh: s.refresh_token };
        } else if (refreshed.status === 401) {
          // A rotation whose answer was lost in a fault: the family is gone, start another.
          session = undefined;
        }
      }
      const known = users[Math.floor(Math.random() * users.length)];
      if (known && going()) {
        const res = await call('login', 'POST', '/v1/auth/login', {
          email: known.email,
          password: LOAD_PASSWORD,
        });
        if (res.status === 200) {
          const token = (res.body as { session: { access_token: string } }).session.access_token;
          logins.push({ userId: known.id, sessionId: String(decodeJwt(token).sid) });
        }
      }
      await sleep(pauseMs);
    }
  }

  const running = Promise.all(Array.from({ length: workers }, (_, i) => client(i)));
  return {
    outcomes,
    users,
    logins,
    /** Stops the loop and waits for the requests in flight. */
    async stop() {
      stopped = true;
      await running;
      return { outcomes, users, logins };
    },
  };
}

export type Load = ReturnType<typeof startLoad>;
export type LoadResult = Awaited<ReturnType<Load['stop']>>;

/** Liveness and readiness, probed side by side every `intervalMs`. */
export function startProbes(baseUrl: string, intervalMs = 50) {
  const live: Outcome[] = [];
  const ready: Outcome[] = [];
  let stopped = false;
  const loop = async (path: string, into: Outcome[]) => {
    while (!stopped) {
      into.push(await send(baseUrl, 'GET', path, { timeoutMs: 5000 }));
      await sleep(intervalMs);
    }
  };
  const running = Promise.all([loop('/health/live', live), loop('/health/ready', ready)]);
  return {
    live,
    ready,
    async stop() {
      stopped = true;
      await running;
      return { live, ready };
    },
  };
}
