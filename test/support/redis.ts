import { setTimeout as sleep } from 'node:timers/promises';
import { Redis } from 'ioredis';

/** The Redis the tests that need one use: TEST_REDIS_URL, else the local default. */
export const TEST_REDIS_URL = process.env.TEST_REDIS_URL ?? 'redis://127.0.0.1:6379';

/** A client for one quick question: no retries, no queue, 500 ms to connect, errors kept quiet. */
function probe(url: string): Redis {
  const client = new Redis(url, {
    lazyConnect: true,
    connectTimeout: 500,
    enableOfflineQueue: false,
    maxRetriesPerRequest: 0,
    retryStrategy: () => null,
  });
  client.on('error', () => undefined);
  return client;
}

/** True when Redis answers a PING within 500 ms. */
export async function redisAnswers(url: string = TEST_REDIS_URL): Promise<boolean> {
  const client = probe(url);
  try {
    return await Promise.race([
      client.connect().then(async () => (await client.ping()) === 'PONG'),
      sleep(500).then(() => false),
    ]);
  } catch {
    return false;
  } finally {
    client.disconnect();
  }
}

/**
 * The two ways an hourly mail cap is counted, for `describe.each`: in memory, and through Redis
 * (skipped, with a warning naming `suite`, where Redis does not answer).
 */
export async function capCountings(suite: string) {
  const available = await redisAnswers();
  if (!available)
    console.warn(
      `${suite}: Redis does not answer at ${TEST_REDIS_URL}; its cap tests through Redis are not run`,
    );
  return [
    { counts: 'in memory', env: {} as Record<string, string>, skip: false },
    {
      counts: 'through Redis',
      env: { REDIS_URL: TEST_REDIS_URL } as Record<string, string>,
      skip: !available,
    },
  ];
}

/** A client address of its own per test, so the per-IP counters other runs left in Redis do not apply. */
export const randomAddress = () => `10.${[0, 0, 0].map(() => Math.floor(Math.random() * 250) + 1).join('.')}`;

/** How many databases the Redis server has (its `databases` setting), or undefined when it does not answer. */
export async function redisDatabaseCount(url: string = TEST_REDIS_URL): Promise<number | undefined> {
  const client = probe(url);
  return client
    .connect()
    .then(() => client.config('GET', 'databases'))
    .then((reply) => Number((reply as string[])[1]))
    .catch(() => undefined)
    .finally(() => client.disconnect());
}
