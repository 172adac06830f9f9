import type { Redis } from 'ioredis';
import type { Logger } from 'pino';

/** How long after a failure Redis is asked again (a probe), and again after each unanswered one. */
export const REDIS_PROBE_INTERVAL_MS = 1000;

/**
 * What a probe writes (for a few seconds): a write, not a PING, because a Redis that answers but
 * refuses writes (READONLY after a failover, OOM under `noeviction`, MISCONF) answers a PING, and the
 * link would then be given back every second only for the next counter to fail again.
 */
const PROBE_KEY = 'paservices:auth:link-probe';
const PROBE_TTL_MS = 5000;

/**
 * Whether Redis answers, as this instance last saw it, for everything that counts there (the per-IP
 * limits, the login, mail and client-authentication counters). A command that fails (refused, its
 * connection gone, or unanswered within the client's command timeout: a Redis that accepts
 * connections and hangs, which ioredis still calls `ready`) makes Redis unavailable, and the counters
 * then count in this instance's memory without asking it: a hung Redis costs the requests in flight
 * one command timeout, not every request one per command for as long as it hangs. A probe (a write of
 * one short-lived key, as the counters write) asks again every REDIS_PROBE_INTERVAL_MS (its own
 * timeout added); its answer, or a connection made ready, shares the counts again. Each change is logged once (README "Failure behaviour").
 */
export interface RedisLink {
  readonly redis: Redis;
  /** False while Redis is known not to answer: ask it nothing, count in memory. */
  answering(): boolean;
  /** A command failed, or the connection did: nothing more is asked until Redis answers a probe. */
  failed(err: unknown): void;
  /** Redis answers (a probe did, or the connection is ready again). */
  answered(): void;
  /**
   * `listener` is called each time Redis answers again after it did not (after the line saying so):
   * the login and mail counters carry what they counted in memory meanwhile into it.
   */
  onAnswered(listener: () => void): void;
  /** No more probes or commands: at shutdown, or for a Redis never to be used (a database it refuses). */
  close(): void;
}

const messageOf = (err: unknown) => (err instanceof Error ? err.message : String(err));

export function createRedisLink(
  redis: Redis,
  logger: Logger,
  probeIntervalMs: number = REDIS_PROBE_INTERVAL_MS,
): RedisLink {
  let up = true;
  let closed = false;
  /** A probe is waiting or in flight: one at a time. */
  let probing = false;
  let timer: NodeJS.Timeout | undefined;
  const listeners: Array<() => void> = [];

  const probeLater = () => {
    timer = setTimeout(probe, probeIntervalMs);
    timer.unref();
  };
  function probe() {
    timer = undefined;
    if (closed || up) {
      probing = false;
      return;
    }
    redis.set(PROBE_KEY, '1', 'PX', PROBE_TTL_MS).then(
      () => {
        probing = false;
        link.answered();
      },
      () => {
        if (closed || up) probing = false;
        else probeLater();
      },
    );
  }

  const link: RedisLink = {
    redis,
    answering: () => up,
    failed(err) {
      if (closed) return;
      if (up) {
        up = false;
        logger.warn(
          { err: messageOf(err) },
          'Redis unavailable: rate limits fall back to in-process counters of this instance until it answers',
        );
      }
      if (!probing) {
        probing = true;
        probeLater();
      }
    },
    answered() {
      if (closed || up) return;
      up = true;
      logger.warn('Redis answers again: rate limits are shared across instances');
      for (const listener of listeners) {
        try {
          listener();
        } catch (err) {
          logger.error({ err }, 'a listener of Redis answering again failed');
        }
      }
    },
    onAnswered(listener) {
      listeners.push(listener);
    },
    close() {
      closed = true;
      up = false;
      if (timer) clearTimeout(timer);
      timer = undefined;
    },
  };
  return link;
}
