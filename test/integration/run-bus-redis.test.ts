import { randomUUID } from 'node:crypto';

import { Redis } from 'ioredis';
import pino from 'pino';
import { afterAll, describe, expect, it } from 'vitest';

import type { Logger } from '../../src/core/logger.js';
import { createRedis } from '../../src/core/redis.js';

import { createRedisRunBus } from '../../src/modules/agents/redis-run-bus.js';
import { LIVE_RUN_EVENTS_TTL_SECONDS } from '../../src/modules/agents/redis-run-events.js';
import type { RunEvent } from '../../src/modules/agents/run-bus.js';
import { RunBusUnavailableError, RunEventsRefusedError } from '../../src/modules/agents/run-bus-errors.js';
import { runEventLogContract, runSignalsContract, until, withinMs } from '../contract/run-bus.js';
import { testRedisPrefix, testSettings } from '../helpers/app.js';
import { type Child, freePort, launch } from '../helpers/process.js';

const silent = pino({ level: 'silent' });
const redisUrl = process.env.REDIS_URL;

describe.skipIf(!redisUrl)('run bus on Redis', () => {
  const keyPrefix = testRedisPrefix();
  const settings = testSettings({ REDIS_KEY_PREFIX: keyPrefix, RUN_EVENTS_TTL_SECONDS: '120' });
  const admin = new Redis(redisUrl!, { maxRetriesPerRequest: 1 });
  const opened: { client: Redis; bus: ReturnType<typeof createRedisRunBus> }[] = [];

  /** One "node": its own Redis client (as a process has) and the bus on it. */
  function node(overrides: Record<string, string> = {}, logger: Logger = silent) {
    const nodeSettings = Object.keys(overrides).length ? testSettings({ REDIS_KEY_PREFIX: keyPrefix, ...overrides }) : settings;
    const client = createRedis(nodeSettings)!;
    const bus = createRedisRunBus(client, nodeSettings, logger);
    opened.push({ client, bus });
    return bus;
  }

  afterAll(async () => {
    for (const { client, bus } of opened) {
      await bus.events.close();
      await bus.signals.close();
      client.disconnect();
    }
    admin.disconnect();
  });

  runEventLogContract('Redis', () => node().events);
  runSignalsContract('Redis', () => node().signals);

  /** Ids of this file's connections in subscriber mode (named `<prefix>run-bus`). */
  async function subscriberClients(): Promise<string[]> {
    const list = (await admin.client('LIST')) as string;
    return list
      .split('\n')
      .filter((line) => line.includes(` name=${keyPrefix}run-bus `))
      .map((line) => /\bid=(\d+)/.exec(line)![1]!);
  }

  it('stores a run as a stream of IDs 0-<seq>, so Redis itself refuses a duplicate or older seq', async () => {
    const { events } = node();
    const runId = randomUUID();
    await events.append(runId, [{ event: 'run.queued', data: {} }, { event: 'run.started', data: {} }]);
    const key = events.streamKey(runId);
    expect(key).toBe(`${keyPrefix}run:${runId}:events`);
    const entries = await admin.xrange(key, '-', '+');
    expect(entries.map(([id]) => id)).toEqual(['0-1', '0-2']);
    expect(entries[1]![1]).toEqual(['event', 'run.started', 'data', JSON.stringify({ run_id: runId, seq: 2 })]);
    await expect(admin.xadd(key, '0-2', 'event', 'message.delta', 'data', '{}')).rejects.toThrow(/equal or smaller/);
    await expect(admin.xadd(key, '0-1', 'event', 'message.delta', 'data', '{}')).rejects.toThrow(/equal or smaller/);
  });

  it('expires a stream RUN_EVENTS_TTL_SECONDS after its final event, and an abandoned one after a week', async () => {
    const { events } = node();
    const runId = randomUUID();
    await events.append(runId, [{ event: 'run.queued', data: {} }]);
    const liveTtl = await admin.ttl(events.streamKey(runId));
    expect(liveTtl).toBeGreaterThan(LIVE_RUN_EVENTS_TTL_SECONDS - 5);
    expect(liveTtl).toBeLessThanOrEqual(LIVE_RUN_EVENTS_TTL_SECONDS);
    await events.append(runId, [{ event: 'run.failed', data: { run: { error: 'deadline passed' } } }]);
    const endedTtl = await admin.ttl(events.streamKey(runId));
    expect(endedTtl).toBeGreaterThan(115);
    expect(endedTtl).toBeLessThanOrEqual(120);
  });

  it('sends the appends made while one is in flight together: one script call, one message', async () => {
    const [writer, reader] = [node(), node()];
    const runId = randomUUID();
    const listener = new Redis(redisUrl!, { maxRetriesPerRequest: 1 });
    const messages: string[] = [];
    listener.on('message', (_channel: string, message: string) => messages.push(message));
    await listener.subscribe(`${keyPrefix}run:${runId}:appended`);
    try {
      await writer.events.append(runId, [{ event: 'run.queued', data: {} }]);
      const reading = (async () => {
        const seen: RunEvent[] = [];
        for await (const event of reader.events.read(runId, 0, new AbortController().signal)) seen.push(event);
        return seen;
      })();
      // The first goes out at once; the 19 made while it is in flight, and the end, follow in one call.
      await Promise.all([...Array.from({ length: 20 }, (_, i) => writer.events.append(runId, [{ event: 'message.delta', data: { delta: `d${i}` } }])), writer.events.append(runId, [{ event: 'run.completed', data: {} }])]);
      const seen = await withinMs(reading, 2_000, 'the reader to end');
      expect(seen.map((event) => event.seq)).toEqual(Array.from({ length: 22 }, (_, i) => i + 1));
      await until(() => messages.length === 3, 1_000, 'the published messages');
      expect(messages.map((message) => (JSON.parse(message) as RunEvent[]).map((event) => event.seq))).toEqual([[1], [2], Array.from({ length: 20 }, (_, i) => i + 3)]);
      // What was published is what was stored.
      const stored = await admin.xrange(writer.events.streamKey(runId), '-', '+');
      expect((JSON.parse(messages[2]!) as RunEvent[]).map((event) => JSON.stringify(event.data))).toEqual(stored.slice(2).map(([, fields]) => fields[3]));
    } finally {
      listener.disconnect();
    }
  });

  it('writes a run\'s first event (run.queued) without reading the stream, and never as a second seq 1', async () => {
    const [api, other] = [node(), node()];
    const runId = randomUUID();
    await other.events.append(runId, [{ event: 'run.queued', data: { by: 'other' } }]);
    const error = await api.events.append(runId, [{ event: 'run.queued', data: { by: 'api' } }]).catch((thrown: unknown) => thrown);
    expect(error).toBeInstanceOf(RunEventsRefusedError);
    expect((error as RunEventsRefusedError).reason).toBe('stale');
    expect((await admin.xrange(api.events.streamKey(runId), '-', '+')).map(([id, fields]) => [id, fields[3]])).toEqual([['0-1', JSON.stringify({ by: 'other', run_id: runId, seq: 1 })]]);
  });

  it('a first start\'s writer appends after run.queued without reading the stream, past it when run.queued is missing (or lost), from the real top when another writer went on', async () => {
    const [api, worker] = [node(), node()];
    const reads: string[] = [];
    const redis = (worker.events as unknown as { redis: Redis }).redis;
    await redis.ping(); // connected: its handshake's commands are not the writer's
    const sendCommand = redis.sendCommand.bind(redis);
    redis.sendCommand = ((command: { name: string }, ...rest: unknown[]) => {
      reads.push(command.name);
      return (sendCommand as (...args: unknown[]) => unknown)(command, ...rest);
    });
    const runId = randomUUID();
    await api.events.append(runId, [{ event: 'run.queued', data: {} }]);
    worker.events.expect(runId, 1);
    const first = await worker.events.append(runId, [{ event: 'run.started', data: {} }]);
    expect(first.map((event) => event.seq)).toEqual([2]);
    expect(reads).toEqual(['evalsha']);

    // run.queued never written, or lost with the stream (Redis wiped while the run was queued): a
    // client may have seen it as seq 1, so run.started goes after it, never under its seq.
    const lost = randomUUID();
    await api.events.append(lost, [{ event: 'run.queued', data: {} }]);
    await admin.del(worker.events.streamKey(lost));
    worker.events.expect(lost, 1);
    expect((await worker.events.append(lost, [{ event: 'run.started', data: {} }])).map((event) => event.seq)).toEqual([2]);
    expect((await worker.events.append(lost, [{ event: 'message.created', data: {} }])).map((event) => event.seq)).toEqual([3]);
    // Only the append right after expect is lenient: a writer behind another one is refused again.
    await api.events.lastSeq(lost);
    await api.events.append(lost, [{ event: 'message.delta', data: {} }]);
    const error = await worker.events.append(lost, [{ event: 'message.delta', data: {} }]).catch((thrown: unknown) => thrown);
    expect((error as RunEventsRefusedError).reason).toBe('stale');
    expect((await admin.xrange(worker.events.streamKey(lost), '-', '+')).map(([id]) => id)).toEqual(['0-2', '0-3', '0-4']);

    // Another writer went on past run.queued before the guess was used: the append follows it.
    const ahead = randomUUID();
    await api.events.append(ahead, [{ event: 'run.queued', data: {} }, { event: 'run.started', data: {} }]);
    worker.events.expect(ahead, 1);
    expect((await worker.events.append(ahead, [{ event: 'message.created', data: {} }])).map((event) => event.seq)).toEqual([3]);
  });

  it('a writer taking a run up numbers after the floor it is given (runs.event_seq_ceiling) and after the top: past what a lost stream held, contiguous where the top is above it', async () => {
    const [dead, taker] = [node(), node()];
    const runId = randomUUID();
    await dead.events.append(runId, [{ event: 'run.queued', data: {} }, { event: 'run.started', data: {} }, { event: 'message.delta', data: { delta: 'seen' } }]);
    // The dead writer's stream is lost before the taker reads it: its top is 0, below the floor.
    await admin.del(taker.events.streamKey(runId));
    taker.events.numberAfter(runId, 10);
    expect(await taker.events.lastSeq(runId)).toBe(0);
    expect((await taker.events.append(runId, [{ event: 'run.started', data: {} }])).map((event) => event.seq)).toEqual([11]);
    // The floor holds for one append; the next goes on after it.
    expect((await taker.events.append(runId, [{ event: 'message.delta', data: {} }])).map((event) => event.seq)).toEqual([12]);
    // A top above the floor (an old run's ceiling, from before it was kept): after the top.
    const older = randomUUID();
    await dead.events.append(older, [{ event: 'run.queued', data: {} }, { event: 'run.started', data: {} }]);
    taker.events.numberAfter(older, 1);
    await taker.events.lastSeq(older);
    expect((await taker.events.append(older, [{ event: 'message.created', data: {} }])).map((event) => event.seq)).toEqual([3]);
    // A writer that takes up a log without reading its top (the end of a run no worker held) also numbers past the floor.
    const cancelled = randomUUID();
    await dead.events.append(cancelled, [{ event: 'run.queued', data: {} }]);
    await admin.del(taker.events.streamKey(cancelled));
    taker.events.numberAfter(cancelled, 1);
    expect((await taker.events.append(cancelled, [{ event: 'run.cancelled', data: {} }])).map((event) => event.seq)).toEqual([2]);
  });

  it('serves 400 readers of 100 runs over one subscriber connection per node', async () => {
    const [writer, reader] = [node(), node()];
    const runIds = Array.from({ length: 100 }, () => randomUUID());
    const before = (await subscriberClients()).length;
    const received = new Map<string, RunEvent[]>();
    const readers = runIds.flatMap((runId) =>
      Array.from({ length: 4 }, async (_, i) => {
        for await (const event of reader.events.read(runId, 0, new AbortController().signal)) received.set(`${runId}/${i}`, [...(received.get(`${runId}/${i}`) ?? []), event]);
      }),
    );
    await Promise.all(runIds.map((runId) => writer.events.append(runId, [{ event: 'run.queued', data: {} }, { event: 'run.completed', data: {} }])));
    await Promise.all(readers);
    // The two nodes' subscriber connections (opened with their buses), and no connection per reader.
    expect((await subscriberClients()).length).toBeLessThanOrEqual(before + 2);
    expect([...received.values()].map((events) => events.map((event) => event.seq))).toEqual(Array.from({ length: 400 }, () => [1, 2]));
  });

  it('catches up what was published while its subscriber connection was gone', async () => {
    const [writer, reader] = [node(), node()];
    const runId = randomUUID();
    const cancelledRun = randomUUID();
    const received: RunEvent[] = [];
    const reasons: (string | undefined)[] = [];
    reader.signals.subscribe(cancelledRun, (reason) => reasons.push(reason));
    await writer.events.append(runId, [{ event: 'run.started', data: {} }]);
    const reading = (async () => {
      for await (const event of reader.events.read(runId, 0, new AbortController().signal)) received.push(event);
    })();
    await until(() => received.length === 1, 2_000, 'the first event');

    const subscribers = await subscriberClients();
    expect(subscribers.length).toBeGreaterThanOrEqual(2);
    for (const id of subscribers) await admin.client('KILL', 'ID', id);
    // Published while no subscriber of this prefix is connected: only the stream and the mark keep them.
    await writer.events.append(runId, [{ event: 'message.delta', data: { delta: 'while away' } }, { event: 'run.completed', data: {} }]);
    await writer.signals.cancel(cancelledRun, 'while away');

    await withinMs(reading, 5_000, 'the reader to catch up');
    expect(received.map((event) => event.seq)).toEqual([1, 2, 3]);
    await until(() => reasons.length === 1, 3_000, 'the cancel sent while away');
    expect(reasons).toEqual(['while away']);
  });

  it('a stream that lost its events (Redis flushed, or restarted without them): the writer goes on after its own seq, and readers from before the loss get what is left, to the end', async () => {
    const [writer, reader] = [node(), node()];
    const runId = randomUUID();
    const key = writer.events.streamKey(runId);
    await writer.events.append(runId, [{ event: 'run.queued', data: {} }, { event: 'run.started', data: {} }]);
    const live: RunEvent[] = [];
    const reading = (async () => {
      for await (const event of reader.events.read(runId, 0, new AbortController().signal)) live.push(event);
    })();
    await until(() => live.length === 2, 2_000, 'the first events');

    // Lost with the stream, and its message with the subscriber connection: the reader's catch-up finds a hole.
    for (const id of await subscriberClients()) await admin.client('KILL', 'ID', id);
    await writer.events.append(runId, [{ event: 'message.delta', data: { delta: 'lost' } }]);
    await admin.del(key);
    // Numbered on from the writer's seq, not from 1 again: a seq a reader saw never names another event.
    expect((await writer.events.append(runId, [{ event: 'message.delta', data: { delta: 'kept' } }])).map((event) => event.seq)).toEqual([4]);
    expect((await admin.xrange(key, '-', '+')).map(([id]) => id)).toEqual(['0-4']);
    const replay: RunEvent[] = [];
    const replaying = (async () => {
      for await (const event of reader.events.read(runId, 1, new AbortController().signal)) replay.push(event);
    })();
    await writer.events.append(runId, [{ event: 'run.completed', data: {} }]);

    await withinMs(reading, 5_000, 'the live reader to end');
    await withinMs(replaying, 5_000, 'the reader from before the loss to end');
    // (Event 3 reaches the live reader only were its subscriber back and caught up between that append and the loss.)
    expect(live.map((event) => [event.seq, event.data.delta]).filter(([seq]) => seq !== 3)).toEqual([[1, undefined], [2, undefined], [4, 'kept'], [5, undefined]]);
    expect(replay.map((event) => event.seq)).toEqual([4, 5]);
  });

  describe('with Redis down', () => {
    const down = () => node({ REDIS_URL: 'redis://127.0.0.1:1' });

    async function failsFast(operation: () => Promise<unknown>): Promise<void> {
      const started = Date.now();
      await expect(operation()).rejects.toBeInstanceOf(RunBusUnavailableError);
      expect(Date.now() - started).toBeLessThan(3_000);
    }

    it('rejects reachable, append, lastSeq, read and cancel quickly with RunBusUnavailableError (503)', async () => {
      const { events, signals } = down();
      const runId = randomUUID();
      // What an agent completion asks before it starts a run (services/agent-completions.ts).
      await failsFast(() => events.reachable());
      await failsFast(() => events.append(runId, [{ event: 'run.queued', data: {} }]));
      await failsFast(() => events.lastSeq(runId));
      await failsFast(async () => {
        for await (const event of events.read(runId, 0, new AbortController().signal)) void event;
      });
      await failsFast(() => signals.cancel(runId, 'stop'));
      expect(new RunBusUnavailableError().statusCode).toBe(503);
      // A run still subscribes (its runner re-reads the database status); the cancel arrives late, not never.
      expect(typeof signals.subscribe(runId, () => undefined)).toBe('function');
    });

    it('works once Redis is (back) up: runs subscribed during an outage get their cancels, readers read', async () => {
      const port = await freePort();
      const url = `redis://127.0.0.1:${port}`;
      const logged: string[] = [];
      const { events, signals } = node({ REDIS_URL: url }, pino({ level: 'error' }, { write: (line: string) => logged.push(line) }));
      const reasons = new Map<string, string | undefined>();
      const [early, during] = [randomUUID(), randomUUID()];
      const cancelChannel = `${keyPrefix}run:cancels`;
      const sender = new Redis(url, { maxRetriesPerRequest: 1, lazyConnect: true });
      sender.on('error', () => undefined);
      let server: Child | undefined;
      /** A redis-server of this test's own (empty at each start), once it takes connections. */
      const startRedis = async () => {
        server = launch('redis-server', ['--port', String(port), '--save', '', '--appendonly', 'no'], {});
        await until(() => server!.out().includes('Ready to accept connections'), 5_000, 'redis-server');
      };
      /** What a cancel from another node does (its mark died with the server), once this node listens again. */
      const cancelWhenListening = async (runId: string, reason: string) => {
        const deadline = Date.now() + 5_000;
        while (((await sender.pubsub('NUMSUB', cancelChannel)) as [string, number])[1] < 1) {
          if (Date.now() > deadline) throw new Error('the node did not listen again');
          await new Promise((resolve) => setTimeout(resolve, 20));
        }
        await sender.publish(cancelChannel, JSON.stringify({ run_id: runId, reason }));
        await until(() => reasons.has(runId), 1_000, `the cancel of ${reason}`);
        expect(reasons.get(runId)).toBe(reason);
      };
      try {
        // Redis is not there yet: the node starts anyway, and its first listen fails.
        signals.subscribe(early, (reason) => reasons.set(early, reason));
        await until(() => logged.some((line) => line.includes('run cancels cannot be received')), 5_000, 'the failed listen');
        await startRedis();
        await cancelWhenListening(early, 'after start-up');

        await events.append(during, [{ event: 'run.started', data: {} }]);
        server!.process.kill('SIGKILL');
        await server!.ended;
        await failsFast(() => events.append(during, [{ event: 'message.delta', data: { delta: 'lost' } }]));
        signals.subscribe(during, (reason) => reasons.set(during, reason));
        await startRedis();
        await cancelWhenListening(during, 'after the outage');

        expect(await events.lastSeq(during)).toBe(0); // the restarted server is empty
        await events.append(during, [{ event: 'run.queued', data: {} }, { event: 'run.completed', data: {} }]);
        const read: number[] = [];
        for await (const event of events.read(during, 0, new AbortController().signal)) read.push(event.seq);
        expect(read).toEqual([1, 2]);
      } finally {
        sender.disconnect();
        server?.process.kill('SIGKILL');
        await server?.ended;
      }
    });
  });
});
