import type { Logger } from 'pino';

/** The first wait after a failed read, doubled after each failure in a row up to RETRY_MAX_MS. */
const RETRY_FIRST_MS = 250;
const RETRY_MAX_MS = 2000;
/** The longest wait after a lasting failure (`lasting`): one an operator must mend, not the database. */
export const RETRY_LASTING_MAX_MS = 60_000;

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
  /**
   * A failure the database coming back does not mend (a signing key's row altered): tried again with
   * waits doubling up to RETRY_LASTING_MAX_MS instead of every 2 s, and logged as such.
   */
  lasting?: (err: unknown) => boolean;
}) {
  let asked = 0;
  let running = false;
  let stopped = false;
  let wake: (() => void) | undefined;
  let timer: NodeJS.Timeout | undefined;
  /** Waiting after a lasting failure: a request (something changed, perhaps the mend) reads at once. */
  let waitingOnLasting = false;

  const pause = (ms: number) =>
    new Promise<void>((resolve) => {
      wake = resolve;
      timer = setTimeout(resolve, ms);
      timer.unref();
    });

  async function loop(): Promise<void> {
    let delay = RETRY_FIRST_MS;
    let failures = 0;
    /** The kind of the last failure logged: one line when a run of failures starts or changes kind. */
    let logged: 'transient' | 'lasting' | undefined;
    for (;;) {
      const covered = asked;
      try {
        await options.read();
        if (failures > 0)
          options.logger.info({ failures }, `read ${options.what} once the database answered`);
        failures = 0;
        logged = undefined;
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
        failures++;
        const kind = options.lasting?.(err) ? 'lasting' : 'transient';
        if (kind !== logged) {
          logged = kind;
          if (kind === 'lasting')
            options.logger.error(
              { err, retryInMs: delay, failures },
              `could not read ${options.what}, and reading again will not mend it; trying again now ` +
                `and then (up to every ${RETRY_LASTING_MAX_MS / 1000} s) until it is mended`,
            );
          else
            options.logger.warn(
              { err, retryInMs: delay, failures },
              `could not read ${options.what}; trying again until the database answers`,
            );
        }
        waitingOnLasting = kind === 'lasting';
        await pause(delay);
        waitingOnLasting = false;
        delay = Math.min(delay * 2, kind === 'lasting' ? RETRY_LASTING_MAX_MS : RETRY_MAX_MS);
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
      if (waitingOnLasting && !stopped) {
        waitingOnLasting = false;
        if (timer) clearTimeout(timer);
        wake?.();
      }
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
