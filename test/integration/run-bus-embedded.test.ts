import { randomUUID } from 'node:crypto';

import { eq } from 'drizzle-orm';
import pino from 'pino';
import { beforeAll, describe, expect, it } from 'vitest';

import { runEvents, runs } from '../../src/models/index.js';

import { DatabaseRunEventLog, EmbeddedRunEvents, InProcessCancels, InProcessRunSignals } from '../../src/modules/agents/embedded-run-bus.js';
import { eventDataJson, type RunEventLog } from '../../src/modules/agents/run-bus.js';
import { appendFinalEvent, type RunDeps } from '../../src/modules/agents/run-lifecycle.js';
import { runEventLogContract, runSignalsContract } from '../contract/run-bus.js';
import { useTestApp } from '../helpers/app.js';
import { createUser } from '../helpers/factories.js';
import { createThread } from '../helpers/runs.js';

// The embedded run bus keeps the contract the Redis one keeps (test/contract/run-bus.ts). A "node"
// here is one more log or signals object on the same backend: the same database and the same
// in-process state (EmbeddedRunEvents, InProcessCancels), as every part of one embedded process
// shares them. Every case applies: none needs a second process (embedded mode has one).
const ctx = useTestApp();
const silent = pino({ level: 'silent' });
let events: EmbeddedRunEvents;
const cancels = new InProcessCancels();
let ownerId: string;
let threadId: string;

beforeAll(async () => {
  events = new EmbeddedRunEvents(ctx.app.db, silent, 20);
  const owner = await createUser(ctx.app);
  ownerId = owner.user.id;
  threadId = (await createThread(ctx.app, owner.headers)).id;
});

/**
 * A node of the log. The contract invents run ids; `run_events` references `runs`, so each id gets
 * its (ended) run row before its first append, as every run of the app has one.
 */
function node(): RunEventLog {
  const log = new DatabaseRunEventLog(events);
  // One insert per run, shared by every append: appends made together then reach the log in the
  // order they were made, as the log's callers assume (on a pool, separate inserts finish in any order).
  const known = new Map<string, Promise<unknown>>();
  const ensureRun = (runId: string) => {
    let inserted = known.get(runId);
    if (!inserted) {
      // A Drizzle query runs on every `then`: `execute` runs it once.
      inserted = ctx.app.db.insert(runs).values({ id: runId, owner_id: ownerId, thread_id: threadId, agent_version: 1, model: 'm', status: 'completed' }).onConflictDoNothing().execute();
      known.set(runId, inserted);
    }
    return inserted;
  };
  return {
    append: (runId, batch) => ensureRun(runId).then(() => log.append(runId, batch)),
    read: (runId, after, signal) => log.read(runId, after, signal),
    stored: (runId) => log.stored(runId),
    lastSeq: (runId) => log.lastSeq(runId),
    close: () => log.close(),
  };
}

describe('embedded run bus', () => {
  runEventLogContract('embedded', node);
  runSignalsContract('embedded', () => new InProcessRunSignals(cancels));

  it('a final event from a writer that is behind (another node appended since) goes after what is there, once', async () => {
    const [api, worker] = [node(), node()];
    const runId = randomUUID();
    await api.append(runId, [{ event: 'run.queued', data: {} }]);
    await worker.lastSeq(runId);
    await worker.append(runId, [{ event: 'run.started', data: {} }, { event: 'message.delta', data: { delta: 'x' } }]);
    const [run] = await ctx.app.db.select().from(runs).where(eq(runs.id, runId));
    const deps = { bus: { events: api, signals: new InProcessRunSignals(cancels) }, log: silent } as unknown as RunDeps;
    await appendFinalEvent(deps, run!);
    await appendFinalEvent(deps, run!); // the log has ended: not written twice
    const read: string[] = [];
    for await (const event of api.read(runId, 0, new AbortController().signal)) read.push(`${event.seq} ${event.event}`);
    expect(read).toEqual(['1 run.queued', '2 run.started', '3 message.delta', '4 run.completed']);
    await Promise.all([api.close(), worker.close()]);
  });

  it('stores a batch as JSON.stringify writes it, each event\'s data written once for the store and its readers', async () => {
    const log = node();
    const runId = randomUUID();
    const data = { text: 'a "quoted" line\nwith ünïcode ✓ and \\ a backslash', nested: { list: [1, null, true, 2.5] } };
    const [stamped] = await log.append(runId, [{ event: 'run.queued', data }]);
    const json = eventDataJson(stamped!);
    expect(json).toBe(JSON.stringify({ ...data, run_id: runId, seq: 1 }));
    expect(eventDataJson(stamped!)).toBe(json);
    const [row] = await ctx.app.db.select({ events: runEvents.events }).from(runEvents).where(eq(runEvents.run_id, runId));
    expect(row!.events).toEqual([{ seq: 1, event: 'run.queued', data: { ...data, run_id: runId, seq: 1 } }]);
    await log.close();
  });
});
