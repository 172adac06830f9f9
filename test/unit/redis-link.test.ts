import { setTimeout as sleep } from 'node:timers/promises';
import type { Redis } from 'ioredis';
import pino from 'pino';
import { describe, expect, it, vi } from 'vitest';
import { createRedisLink } from '../../src/lib/redis-link.js';
import { createRedisFailureCounter, createSharedFailureCounter } from '../../src/lib/throttle.js';
import { createTestClock } from '../support/clock.js';

/**
 * Whether Redis answers, shared by every counter kept there: after one failure nothing asks Redis
 * until a probe (a write) is answered, so a Redis that hangs costs one command timeout, not one per
 * command for as long as it hangs (test/faults/redis-hang.test.ts shows it on the real service).
 */

const PROBE_MS = 10;

function logLines() {
  const lines: string[] = [];
  const logger = pino({ level: 'warn' }, { write: (line: string) => lines.push(JSON.parse(line).msg) });
  return { logger, lines };
}

/**
 * The probe and every counter command: recorded, and failing while `down`. `readOnly`: a Redis that
 * answers but refuses writes (a replica after a failover): PING answers, every write is refused.
 */
function fakeRedis() {
  const state = { down: true, readOnly: false, calls: [] as string[] };
  const answer = async <T>(name: string, value: T) => {
    state.calls.push(name);
    if (state.down) throw new Error('Command timed out');
    return value;
  };
  const write = async <T>(name: string, value: T) => {
    if (state.readOnly) {
      state.calls.push(name);
      throw new Error("READONLY You can't write against a read only replica.");
    }
    return answer(name, value);
  };
  const redis = {
    ping: () => answer('ping', 'PONG'),
    set: () => write('set', 'OK'),
    multi() {
      const chain = {
        incr: () => chain,
        expire: () => chain,
        pexpire: () => chain,
        pttl: () => chain,
        exec: () =>
          answer('multi', [
            [null, 1],
            [null, 1],
            [null, 60_000],
          ]),
      };
      return chain;
    },
    get: () => answer('get', null),
    ttl: () => answer('ttl', -2),
    del: () => answer('del', 1),
    eval: () => answer('eval', 0),
  };
  return { redis: redis as unknown as Redis, state };
}

describe('Redis link', () => {
  it('is unavailable from a failure on, logs it once, probes, and is available again (logged) when a probe is answered', async () => {
    const { redis, state } = fakeRedis();
    const { logger, lines } = logLines();
    const link = createRedisLink(redis, logger, PROBE_MS);
    expect(link.answering()).toBe(true);
    const failedAt = performance.now();
    link.failed(new Error('Command timed out'));
    link.failed(new Error('Command timed out'));
    expect(link.answering()).toBe(false);
    // Probes go on, one at a time (none oftener than every PROBE_MS), while nothing answers; nothing
    // more is logged.
    const probes = () => state.calls.filter((c) => c === 'set').length;
    await vi.waitFor(() => expect(probes()).toBeGreaterThan(1));
    expect(probes()).toBeLessThanOrEqual(Math.floor((performance.now() - failedAt) / PROBE_MS) + 1);
    expect(link.answering()).toBe(false);
    state.down = false;
    await vi.waitFor(() => expect(link.answering()).toBe(true));
    expect(lines).toEqual([
      'Redis unavailable: rate limits fall back to in-process counters of this instance until it answers',
      'Redis answers again: rate limits are shared across instances',
    ]);
    // Answering: no more probes.
    const after = state.calls.length;
    await sleep(PROBE_MS * 3);
    expect(state.calls.length).toBe(after);
    link.close();
  });

  it('a Redis that answers but refuses writes (READONLY) stays unavailable, logged once, until it takes writes again', async () => {
    const { redis, state } = fakeRedis();
    state.down = false;
    state.readOnly = true;
    const { logger, lines } = logLines();
    const link = createRedisLink(redis, logger, PROBE_MS);
    link.failed(new Error("READONLY You can't write against a read only replica."));
    // Several probe intervals, each probe refused as the counters' writes are: the link is not given
    // back (a PING would answer, and the next counter fail again, every second).
    await sleep(PROBE_MS * 5);
    expect(link.answering()).toBe(false);
    expect(state.calls.length).toBeGreaterThan(1);
    state.readOnly = false;
    await vi.waitFor(() => expect(link.answering()).toBe(true));
    expect(lines).toEqual([
      'Redis unavailable: rate limits fall back to in-process counters of this instance until it answers',
      'Redis answers again: rate limits are shared across instances',
    ]);
    link.close();
  });

  it('tells its listeners each time Redis answers again after it did not, and only then', async () => {
    const { redis, state } = fakeRedis();
    const link = createRedisLink(redis, pino({ level: 'silent' }), PROBE_MS);
    let told = 0;
    link.onAnswered(() => told++);
    link.answered();
    expect(told).toBe(0);
    for (const round of [1, 2]) {
      state.down = true;
      link.failed(new Error('Command timed out'));
      await sleep(PROBE_MS * 2);
      expect(told).toBe(round - 1);
      state.down = false;
      await vi.waitFor(() => expect(told).toBe(round));
    }
    link.answered();
    expect(told).toBe(2);
    link.close();
  });

  it('once closed, is never available again and probes no more', async () => {
    const { redis, state } = fakeRedis();
    const link = createRedisLink(redis, pino({ level: 'silent' }), PROBE_MS);
    link.failed(new Error('x'));
    link.close();
    state.down = false;
    link.answered();
    await sleep(PROBE_MS * 3);
    expect(link.answering()).toBe(false);
    expect(state.calls).toEqual([]);
  });

  it('the counters ask Redis nothing while it is known unavailable, and still count and block here', async () => {
    const { redis, state } = fakeRedis();
    const link = createRedisLink(redis, pino({ level: 'silent' }), 60_000);
    const options = { redis, link, clock: createTestClock(), logger: pino({ level: 'silent' }) };
    const logins = createRedisFailureCounter({
      ...options,
      max: 2,
      windowSeconds: 3600,
      redisKey: (k) => `login:${k}`,
      fallbackMessage: 'Redis unavailable: counting here',
    });
    const clients = createSharedFailureCounter({
      ...options,
      max: 2,
      windowSeconds: 60,
      prefix: 'client:',
      fallbackMessage: 'Redis unavailable: counting here',
    });
    // The first call meets the failure and tells the link.
    expect((await logins.reserve('a')).retryAfter).toBe(0);
    expect(state.calls).toEqual(['multi']);
    expect(link.answering()).toBe(false);
    const guess = await logins.reserve('a');
    expect(guess.retryAfter).toBe(0);
    await guess.release();
    await logins.reserve('a');
    expect((await logins.reserve('a')).retryAfter).toBeGreaterThan(0);
    await logins.recordFailure('b');
    await logins.retryAfter('b');
    await logins.reset('b');
    await clients.recordFailure('s');
    await clients.recordFailure('s');
    expect(await clients.retryAfter('s')).toBeGreaterThan(0);
    await clients.reset('s');
    expect(state.calls).toEqual(['multi']);
    link.close();
  });
});
