import { Redis } from 'ioredis';

/** Every Redis key a test run writes starts with this (its queues' and rate limits' alike). */
export function redisRunPrefix(runPrefix: string): string {
  return `keel-test:${runPrefix}:`;
}

/** Deletes the run's keys (BullMQ keeps completed jobs and its metadata without expiry). */
export function deleteRunKeys(url: string, runPrefix: string): Promise<number> {
  return deleteKeysUnder(url, redisRunPrefix(runPrefix));
}

/** Deletes every key under `prefix`: one deployment's FLUSHDB (or a Redis restarted without persistence), leaving the other tests' keys alone. */
export async function deleteKeysUnder(url: string, prefix: string): Promise<number> {
  const client = new Redis(url, { maxRetriesPerRequest: 1 });
  let deleted = 0;
  try {
    const stream = client.scanStream({ match: `${prefix}*`, count: 500 });
    for await (const keys of stream as AsyncIterable<string[]>) {
      if (keys.length) deleted += await client.unlink(...keys);
    }
  } finally {
    client.disconnect();
  }
  return deleted;
}
