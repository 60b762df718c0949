import { Redis } from 'ioredis';

/** Every Redis key a test run writes starts with this (its queues' and rate limits' alike). */
export function redisRunPrefix(runPrefix: string): string {
  return `keel-test:${runPrefix}:`;
}

/** Deletes the run's keys (BullMQ keeps completed jobs and its metadata without expiry). */
export async function deleteRunKeys(url: string, runPrefix: string): Promise<number> {
  const client = new Redis(url, { maxRetriesPerRequest: 1 });
  let deleted = 0;
  try {
    const stream = client.scanStream({ match: `${redisRunPrefix(runPrefix)}*`, count: 500 });
    for await (const keys of stream as AsyncIterable<string[]>) {
      if (keys.length) deleted += await client.unlink(...keys);
    }
  } finally {
    client.disconnect();
  }
  return deleted;
}
