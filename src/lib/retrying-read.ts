import type { Logger } from 'pino';

/** The first wait after a failed read, doubled after each failure in a row up to RETRY_MAX_MS. */
const RETRY_FIRST_MS = 250;
const RETRY_MAX_MS = 2000;

export interface RetryingRead {
  /**
   * Asks for a read begun after this call, tried again (250 ms, doubling up to 2 s) until one succeeds.
   * Calls made meanwhile share it: one more read follows a read that was under way when they came.
   */
  request(): void;
  /** No read starts any more, nor waits to (the service is stopping). */
  stop(): void;
}

/**
 * A read of what the notifications may have missed (the revocations, the signing keys), asked for by
 * a resync: after a LISTEN reconnect, the pool's connections may be just as dead as the listener's
 * was, and a read that fails then would otherwise leave what was missed unread until the minute's
 * reload, tokens revoked meanwhile still verifying. It is tried again until the database answers.
 */
export function createRetryingRead(options: {
  read: () => Promise<void>;
  logger: Logger;
  /** What is read and why, for the log: `the revocations after a resync`. */
  what: string;
}) {
  let asked = 0;
  let running = false;
  let stopped = false;
  let wake: (() => void) | undefined;
  let timer: NodeJS.Timeout | undefined;

  const pause = (ms: number) =>
    new Promise<void>((resolve) => {
      wake = resolve;
      timer = setTimeout(resolve, ms);
      timer.unref();
    });

  async function loop(): Promise<void> {
    let delay = RETRY_FIRST_MS;
    let failures = 0;
    for (;;) {
      const covered = asked;
      try {
        await options.read();
        if (failures > 0)
          options.logger.info({ failures }, `read ${options.what} once the database answered`);
        failures = 0;
        delay = RETRY_FIRST_MS;
        // Decided and cleared in one turn: a request coming after this starts a loop of its own.
        if (asked === covered || stopped) {
          running = false;
          return;
        }
      } catch (err) {
        if (stopped) {
          running = false;
          return;
        }
        if (failures++ === 0)
          options.logger.warn(
            { err, retryInMs: delay },
            `could not read ${options.what}; trying again until the database answers`,
          );
        await pause(delay);
        delay = Math.min(delay * 2, RETRY_MAX_MS);
        if (stopped) {
          running = false;
          return;
        }
      }
    }
  }

  return {
    request() {
      asked++;
      if (running || stopped) return;
      running = true;
      loop().catch(() => {
        running = false;
      });
    },
    stop() {
      stopped = true;
      if (timer) clearTimeout(timer);
      wake?.();
    },
  } satisfies RetryingRead;
}
