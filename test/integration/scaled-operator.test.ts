/**
 * Scaled mode as an operator meets it, beyond runs-scaled.test.ts: the deployment's Redis keys
 * wiped mid-run and mid-stream (what FLUSHDB or a Redis restart without persistence does; its keys
 * alone: other tests share the Redis database), every Redis connection dropped (a restart), the
 * only worker killed and replaced, a worker killed and the keys wiped before its run is taken up, a worker paused past its lease (SIGSTOP) and woken, a worker
 * and an API node stopped with SIGTERM mid-run, and nodes whose PostgreSQL has no connection left. Real processes on this file's own PostgreSQL
 * database and Redis key prefix.
 */
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { Redis } from 'ioredis';
import { afterAll, afterEach, beforeAll, describe, expect, inject, it } from 'vitest';

import type { FakeModelServer } from '../helpers/fake-model-server.js';
import { eventually } from '../helpers/http.js';
import { adminQuery } from '../helpers/postgres.js';
import { type Child, freePort, keel, killLeftovers } from '../helpers/process.js';
import { deleteKeysUnder } from '../helpers/redis.js';
import { expectContiguous, expectIncreasing, FINAL_EVENTS, json, messagesOf, readEvents, type RunBody, type SseEvent, startRunWithThread, userWithAgent } from '../helpers/runs.js';
import { type ApiNode, type ScaledDeployment, scaledDeployment, stopNode } from '../helpers/scaled.js';

const adminUrl = process.env.DATABASE_URL;
const redisUrl = process.env.REDIS_URL;
const PASSWORD = 'scaled-operator-password';
const MODEL = 'gpt-4.1';

describe.runIf(Boolean(adminUrl && redisUrl))('scaled mode, operated: Redis wiped, nodes stopped with SIGTERM', () => {
  let deployment: ScaledDeployment;
  let fake: FakeModelServer;
  let keyPrefix: string;
  let apis: ApiNode[] = [];
  let workers: Child[] = [];
  let headers: Record<string, string>;
  let runs = 0;
  const runRow = (runId: string) => deployment.runRow(runId);
  const startApi = () => deployment.startApi();
  const startWorker = () => deployment.startWorker();
  const stop = stopNode;

  /** Closes, from the server's side, every Redis connection these processes hold; how many. */
  async function dropRedisConnections(pids: number[]): Promise<number> {
    const port = new URL(redisUrl!).port || '6379';
    const sockets = execFileSync('ss', ['-tnpH', 'state', 'established', `( dport = :${port} )`], { encoding: 'utf8' });
    const addresses = sockets
      .split('\n')
      .filter((line) => pids.some((pid) => line.includes(`pid=${pid},`)))
      .map((line) => line.trim().split(/\s+/)[2]!);
    const admin = new Redis(redisUrl!, { maxRetriesPerRequest: 1 });
    try {
      for (const address of addresses) await admin.client('KILL', 'ADDR', address).catch(() => undefined);
    } finally {
      admin.disconnect();
    }
    return addresses.length;
  }

  const getRun = async (base: string, runId: string) => (await json<RunBody>(base, 'GET', `/runs/${runId}`, headers)).body;
  const finals = (events: SseEvent[]) => events.filter((e) => FINAL_EVENTS.has(e.event)).map((e) => e.event);

  beforeAll(async () => {
    deployment = await scaledDeployment(adminUrl!, redisUrl!, 'operator', { FIRST_SUPERUSER: 'admin@operator.test', FIRST_SUPERUSER_PASSWORD: PASSWORD, RUN_EVENTS_KEEPALIVE_SECONDS: '1' });
    ({ fake, keyPrefix } = deployment);
    apis.push(await startApi());
    const [b, ...started] = await Promise.all([startApi(), startWorker(), startWorker()]);
    apis.push(b);
    workers = started;
    headers = await userWithAgent(apis[0]!.base, 'user@operator.test', PASSWORD, MODEL);
  }, 120_000);

  // Each test starts with two API nodes and two workers, whatever the one before left (a failed one too).
  afterEach(async () => {
    apis = await Promise.all(apis.map(async (api) => (api.child.done() ? startApi() : api)));
    workers = workers.filter((worker) => !worker.done());
    while (workers.length < 2) workers.push(await startWorker());
  }, 120_000);

  afterAll(() => deployment?.close([...apis.map((api) => api.child), ...workers]), 60_000);

  it("the deployment's Redis keys wiped mid-run under an open stream: the stream goes on without a gap, and a seq seen before never names another event", async () => {
    fake.reset();
    const pieces = Array.from({ length: 100 }, (_, i) => `f${i} `);
    fake.script(MODEL, { chunks: pieces, chunkDelayMs: 40 });
    const [a, b] = apis as [(typeof apis)[0], (typeof apis)[0]];
    const run = await startRunWithThread(a.base, headers, `wiped ${++runs}`);
    let seen = 0;
    const reading = readEvents(b.base, headers, run.id, { timeoutMs: 25_000, onEvent: () => seen++ });
    await eventually(async () => seen >= 20, 15_000);
    const seenBeforeWipe = seen;
    await deleteKeysUnder(redisUrl!, keyPrefix);
    // The open stream: every event once, in order, to the final one; no text lost.
    const { events, ended } = await reading;
    expect(ended).toBe(true);
    expectContiguous(events);
    expect(finals(events)).toEqual(['run.completed']);
    expect(events.filter((e) => e.event === 'message.delta').map((e) => e.data.delta).join('')).toBe(pieces.join(''));
    expect((await getRun(a.base, run.id)).status).toBe('completed');
    // Readers after the wipe get what Redis still holds (what came before the wipe is gone): the
    // same events under the same seqs, in order, ending with the final one — never another event
    // under a seq a client saw, nor a stream that ends without the final event.
    const sameAsSeen = (later: SseEvent[]) => {
      expect(later.length).toBeGreaterThan(0);
      expect(later.map((e) => e.id)).toEqual([...later.map((e) => e.id)].sort((x, y) => x - y));
      for (const event of later) expect(event).toEqual(events[event.id - 1]);
      expect(later.at(-1)).toEqual(events.at(-1));
    };
    const resumed = await readEvents(a.base, headers, run.id, { lastEventId: seenBeforeWipe, timeoutMs: 10_000 });
    expect(resumed.ended).toBe(true);
    expect(resumed.events[0]!.id).toBeGreaterThan(seenBeforeWipe);
    sameAsSeen(resumed.events);
    const replay = await readEvents(a.base, headers, run.id, { timeoutMs: 10_000 });
    expect(replay.ended).toBe(true);
    sameAsSeen(replay.events);
    // The workers that ran through the wipe take new runs (BullMQ's keys made anew).
    const next = await startRunWithThread(b.base, headers, `after the wipe ${++runs}`);
    await eventually(async () => (await getRun(a.base, next.id)).status === 'completed', 20_000);
    // Each run called the model once: the wipe left no job to run again.
    expect(fake.log).toHaveLength(2);
  }, 60_000);

  it('every Redis connection of every node dropped mid-run (a Redis restart): the run completes, the open stream ends with it, the queue takes new runs', async () => {
    fake.reset();
    const pieces = Array.from({ length: 60 }, (_, i) => `r${i} `);
    fake.script(MODEL, { chunks: pieces, chunkDelayMs: 30 }, { text: 'after the restart' });
    const [a, b] = apis as [(typeof apis)[0], (typeof apis)[0]];
    const run = await startRunWithThread(a.base, headers, `restart ${++runs}`);
    let seen = 0;
    const reading = readEvents(b.base, headers, run.id, { timeoutMs: 25_000, onEvent: () => seen++ });
    await eventually(async () => seen >= 10, 15_000);
    const dropped = await dropRedisConnections([...apis.map((api) => api.child.pid), ...workers.map((worker) => worker.pid)]);
    expect(dropped).toBeGreaterThan(0);
    const { events, ended } = await reading;
    expect(ended).toBe(true);
    expectContiguous(events);
    expect(finals(events)).toEqual(['run.completed']);
    expect(events.filter((e) => e.event === 'message.delta').map((e) => e.data.delta).join('')).toBe(pieces.join(''));
    const next = await startRunWithThread(b.base, headers, `after restart ${++runs}`);
    await eventually(async () => (await getRun(a.base, next.id)).status === 'completed', 20_000);
  }, 60_000);

  it('queued runs whose job and run.queued the wipe took: one is still picked up, one is cancelled, and a client that saw run.queued (seq 1) gets what follows under later seqs', async () => {
    fake.reset();
    await Promise.all(workers.map((worker) => stop(worker, 'SIGTERM')));
    workers = [];
    const [a, b] = apis as [(typeof apis)[0], (typeof apis)[0]];
    const run = await startRunWithThread(a.base, headers, `lost job ${++runs}`);
    const cancelled = await startRunWithThread(a.base, headers, `lost job, cancelled ${++runs}`);
    const queuedSeen = { [run.id]: false, [cancelled.id]: false };
    const readers = [run, cancelled].map((queued) => readEvents(a.base, headers, queued.id, { timeoutMs: 30_000, onEvent: (e) => (queuedSeen[queued.id] ||= e.event === 'run.queued' && e.id === 1) }));
    await eventually(async () => Object.values(queuedSeen).every(Boolean), 10_000);
    await deleteKeysUnder(redisUrl!, keyPrefix);
    // Cancelled through the node that neither started it nor reads it (it has no cursor of the run's
    // log, and reads the emptied stream's top): its run.cancelled is not seq 1 again.
    expect((await json<RunBody>(b.base, 'POST', `/runs/${cancelled.id}/cancel`, headers)).status).toBe(200);
    const cancelledEvents = await readers[1]!;
    expect(cancelledEvents.ended).toBe(true);
    expect(cancelledEvents.events.map((e) => [e.id, e.event])).toEqual([
      [1, 'run.queued'],
      [2, 'run.cancelled'],
    ]);
    workers = [await startWorker(), await startWorker()];
    await eventually(async () => (await getRun(b.base, run.id)).status === 'completed', 20_000);
    const { events, ended } = await readers[0]!;
    expect(ended).toBe(true);
    expectContiguous(events);
    expect(events.slice(0, 2).map((e) => e.event)).toEqual(['run.queued', 'run.started']);
    expect(finals(events)).toEqual(['run.completed']);
    expect(fake.log).toHaveLength(1);
  }, 60_000);

  it('SIGTERM of a worker mid-run: the run is handed back and finished by the other worker', async () => {
    fake.reset();
    fake.script(MODEL, { chunks: Array.from({ length: 200 }, (_, i) => `s${i} `), chunkDelayMs: 50 }, { text: 'finished elsewhere' });
    const run = await startRunWithThread(apis[0]!.base, headers, `sigterm ${++runs}`);
    await fake.waitFor((log) => log.some((r) => r.chunksSent >= 3), 15_000);
    const holder = (await runRow(run.id)).lease_owner!;
    const victim = workers.find((worker) => holder.includes(`:${worker.pid}:`))!;
    expect(victim, `no worker holds ${holder}`).toBeDefined();
    const { code } = await stop(victim, 'SIGTERM');
    expect(code, victim.out()).toBe(0);
    workers = workers.filter((worker) => worker !== victim);
    // Handed back, not left for its lease to run out: the other worker takes it up at its next sweep.
    await eventually(async () => (await getRun(apis[1]!.base, run.id)).status === 'completed', 20_000);
    // The lease goes once the final event is out, just after the run's row says completed.
    await eventually(async () => (await runRow(run.id)).lease_owner === null);
    expect((await messagesOf(apis[0]!.base, headers, run.thread_id)).filter((m) => m.role === 'assistant').map((m) => m.content)).toEqual(['finished elsewhere']);
    const { events } = await readEvents(apis[1]!.base, headers, run.id);
    expectContiguous(events);
    expect(fake.log).toHaveLength(2);
    expect(fake.log[0]!.aborted).toBe(true);
    expect(finals(events)).toEqual(['run.completed']);
  }, 60_000);

  it('the only worker killed with SIGKILL mid-run, then a new one: the run is resumed after its lease, and a client resuming on the other node misses nothing and sees nothing twice', async () => {
    fake.reset();
    fake.script(MODEL, { chunks: Array.from({ length: 200 }, (_, i) => `k${i} `), chunkDelayMs: 50 }, { text: 'the second attempt' });
    const [spare, ...rest] = workers;
    await stop(spare!, 'SIGTERM');
    workers = rest;
    const [a, b] = apis as [(typeof apis)[0], (typeof apis)[0]];
    const run = await startRunWithThread(a.base, headers, `kill ${++runs}`);
    const before = await readEvents(a.base, headers, run.id, { limit: 6 });
    await stop(workers[0]!, 'SIGKILL');
    workers = [await startWorker()];
    const after = await readEvents(b.base, headers, run.id, { lastEventId: before.events.at(-1)!.id, timeoutMs: 25_000 });
    expect(after.ended).toBe(true);
    // The new worker goes on past the run's seq ceiling (a gap: the dead one may have numbered up to it).
    expectIncreasing([...before.events, ...after.events]);
    expect(finals(after.events)).toEqual(['run.completed']);
    expect(await getRun(b.base, run.id)).toMatchObject({ status: 'completed', attempts: 2 });
    expect((await messagesOf(a.base, headers, run.thread_id)).filter((m) => m.role === 'assistant').map((m) => m.content)).toEqual(['the second attempt']);
  }, 60_000);

  // Past 1,200 events the worker has numbered beyond the room its claim gave it (RUN_EVENT_SEQ_ROOM):
  // only the ceiling it raised in PostgreSQL on the way says how far it went.
  it.each([
    { seen: 10, chunks: 200, chunkDelayMs: 50 },
    { seen: 1_200, chunks: 1_600, chunkDelayMs: 3 },
  ])("a worker killed with SIGKILL mid-run, after $seen events, and the deployment's Redis keys wiped before another takes the run up: an open stream and a resume from where it was get the rest, numbered past it, to the end", async ({ seen, chunks, chunkDelayMs }) => {
    fake.reset();
    fake.script(MODEL, { chunks: Array.from({ length: chunks }, (_, i) => `d${i} `), chunkDelayMs }, { text: 'after the wipe' });
    const [a, b] = apis as [(typeof apis)[0], (typeof apis)[0]];
    const run = await startRunWithThread(a.base, headers, `kill and wipe ${++runs}`);
    let lastSeen = 0;
    const reading = readEvents(b.base, headers, run.id, { timeoutMs: 30_000, onEvent: (event) => (lastSeen = event.id) });
    await eventually(async () => lastSeen >= seen, 15_000);
    const holder = (await runRow(run.id)).lease_owner!;
    const victim = workers.find((worker) => holder.includes(`:${worker.pid}:`))!;
    expect(victim, `no worker holds ${holder}`).toBeDefined();
    await stop(victim, 'SIGKILL');
    workers = workers.filter((worker) => worker !== victim);
    // Lost before the other worker takes the run up (its lease has 2 s to run): nothing in Redis says how far the log went.
    await deleteKeysUnder(redisUrl!, keyPrefix);
    const seenBeforeWipe = lastSeen;
    // The open stream: the second attempt's events, numbered past what it saw, to the final one.
    const { events, ended } = await reading;
    expect(ended).toBe(true);
    expectIncreasing(events);
    expect(finals(events)).toEqual(['run.completed']);
    const continuation = (seen: SseEvent[]) => {
      const created = seen.find((e) => e.event === 'message.created' && e.id > seenBeforeWipe);
      expect(created, JSON.stringify(seen.map((e) => [e.id, e.event]))).toBeDefined();
      const messageId = (created!.data.message as { id: string }).id;
      expect(seen.filter((e) => e.event === 'message.delta' && e.data.message_id === messageId).map((e) => e.data.delta).join('')).toBe('after the wipe');
      expect(seen.at(-1)!.event).toBe('run.completed');
    };
    continuation(events);
    // A client resuming where it was (Last-Event-ID) on the other node: the same, every event past it.
    const resumed = await readEvents(a.base, headers, run.id, { lastEventId: seenBeforeWipe, timeoutMs: 10_000 });
    expect(resumed.ended).toBe(true);
    expect(resumed.events[0]!.id).toBeGreaterThan(seenBeforeWipe);
    expectIncreasing(resumed.events);
    continuation(resumed.events);
    expect(await getRun(a.base, run.id)).toMatchObject({ status: 'completed', attempts: 2 });
    expect((await messagesOf(a.base, headers, run.thread_id)).filter((m) => m.role === 'assistant').map((m) => m.content)).toEqual(['after the wipe']);
  }, 60_000);

  it('a worker paused mid-run (SIGSTOP: a frozen VM) loses its run to the other after the lease; woken, it stops: one answer, each event once', async () => {
    fake.reset();
    fake.script(MODEL, { chunks: Array.from({ length: 200 }, (_, i) => `z${i} `), chunkDelayMs: 50 }, { text: 'taken over' });
    const [a, b] = apis as [(typeof apis)[0], (typeof apis)[0]];
    const run = await startRunWithThread(a.base, headers, `paused ${++runs}`);
    await fake.waitFor((log) => log.some((r) => r.chunksSent >= 3), 15_000);
    const holder = (await runRow(run.id)).lease_owner!;
    const paused = workers.find((worker) => holder.includes(`:${worker.pid}:`))!;
    paused.process.kill('SIGSTOP');
    try {
      await eventually(async () => (await getRun(b.base, run.id)).status === 'completed', 25_000);
    } finally {
      paused.process.kill('SIGCONT');
    }
    // Woken, the paused worker finds its lease gone and stops its run: nothing of it lands after the run's end.
    const stopped = () => paused.out().split('\n').find((line) => line.includes(run.id) && line.includes('"stop"'));
    await eventually(async () => stopped() !== undefined, 15_000);
    expect(JSON.parse(stopped()!)).toMatchObject({ stop: 'lease' });
    await eventually(async () => fake.log[0]!.aborted, 5_000);
    const { events } = await readEvents(b.base, headers, run.id);
    expectIncreasing(events);
    expect(finals(events)).toEqual(['run.completed']);
    expect(await getRun(a.base, run.id)).toMatchObject({ status: 'completed', attempts: 2 });
    expect((await messagesOf(a.base, headers, run.thread_id)).filter((m) => m.role === 'assistant').map((m) => m.content)).toEqual(['taken over']);
    expect(paused.done()).toBe(false);
  }, 60_000);

  it('SIGTERM of an API node under an open stream: the stream ends cleanly and resumes on the other node', async () => {
    fake.reset();
    fake.script(MODEL, { chunks: Array.from({ length: 80 }, (_, i) => `n${i} `), chunkDelayMs: 50 });
    const [a, b] = apis as [(typeof apis)[0], (typeof apis)[0]];
    const run = await startRunWithThread(a.base, headers, `api stop ${++runs}`);
    let seen = 0;
    const reading = readEvents(b.base, headers, run.id, { timeoutMs: 25_000, onEvent: () => seen++ });
    await eventually(async () => seen >= 5, 15_000);
    const exited = stop(b.child, 'SIGTERM');
    // A clean end of the response (not a reset connection), well before the run's end.
    const first = await reading;
    expect(first.ended).toBe(true);
    expect(finals(first.events)).toEqual([]);
    expect((await exited).code, b.child.out()).toBe(0);
    const rest = await readEvents(a.base, headers, run.id, { lastEventId: first.events.at(-1)!.id, timeoutMs: 25_000 });
    expectContiguous([...first.events, ...rest.events]);
    expect(finals(rest.events)).toEqual(['run.completed']);
  }, 60_000);
});

describe.runIf(Boolean(adminUrl))('a node whose PostgreSQL has no connection to give it', () => {
  // A role allowed no connection: what a server at max_connections (or a role, or database, at its
  // CONNECTION LIMIT) answers, 53300. Roles belong to the whole server: this file drops its own.
  const role = `${inject('runPrefix')}_full_${randomBytes(4).toString('hex')}`;
  const scratch = mkdtempSync(join(tmpdir(), 'keel-operator-full-'));

  beforeAll(() => adminQuery(adminUrl!, `create role "${role}" login connection limit 0`));
  afterAll(async () => {
    killLeftovers();
    await adminQuery(adminUrl!, `drop role if exists "${role}"`);
    rmSync(scratch, { recursive: true, force: true });
  });

  it.each([['api'], ['worker'], ['migrate']])('`keel %s` stops with one line naming DATABASE_URL and what to do, exit 1', async (command) => {
    const url = new URL(adminUrl!);
    url.username = role;
    const child = keel([command], { ENVIRONMENT: 'local', DATA_DIR: scratch, DATABASE_URL: url.toString(), REDIS_URL: redisUrl ?? '', LOG_FORMAT: 'json', PORT: String(await freePort()) });
    const { code } = await child.ended;
    expect(code, child.out()).toBe(1);
    const lines = child.err().trim().split('\n');
    expect(lines, child.err()).toHaveLength(1);
    expect(lines[0]).toMatch(/^keel: DATABASE_URL: .*too many connections/);
    // What to do about it: the server's or role's limit, or this deployment's share of it.
    expect(lines[0]).toContain('max_connections');
    expect(lines[0]).toContain('DATABASE_POOL_SIZE');
  }, 60_000);
});
