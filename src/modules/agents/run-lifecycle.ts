/**
 * The transitions of a run that the API, the runner and the sweeper share: ending a run (its final
 * status is set once, by a conditional update) and handing its thread to the next waiting run or
 * back to idle, in the same transaction; then the side effects after the commit.
 */
import { eq } from 'drizzle-orm';

import type { Settings } from '../../core/config.js';
import { type Db, transaction } from '../../core/db.js';
import type { Logger } from '../../core/logger.js';
import type { JobQueue } from '../../core/queue.js';

import { type Message, type Run, runs, threads } from '../../models/index.js';

import * as runCrud from '../../crud/run.js';
import { appendMessage } from '../../crud/thread.js';
import { addCosts, type ModelManager } from '../ai-models/index.js';
import type { NewRunEvent, RunBus, RunEventName, RunWriter } from './run-bus.js';
import { RunEventsRefusedError } from './run-bus-errors.js';
import type { ToolImplementations } from './tools.js';

/** Everything runs need from the app, passed as one object. */
export interface RunDeps {
  db: Db;
  settings: Settings;
  log: Logger;
  bus: RunBus;
  queue: JobQueue;
  models: ModelManager;
  tools: ToolImplementations;
  /**
   * Writes the model calls this process has charged so far (UsageMeterService.written): a run ends
   * after its calls' charges. With `userId`, that user's credit-window block no call is using goes back too.
   */
  charged?: (userId?: string) => Promise<void>;
  /** Refuses (429) a run's start through a key that has made its `rpm` calls this minute (UsageMeterService.refuseSpentKeyRpm). */
  refuseSpentKeyRpm?: (keyId: string, rpm: number) => Promise<void>;
}

/** When a run's deadline passes (RUN_TIMEOUT_SECONDS from its first start, kept across resumes). */
export const deadlineOf = (run: Pick<Run, 'started_at'>, timeoutSeconds: number): Date => new Date(run.started_at!.getTime() + timeoutSeconds * 1000);

/** A run as clients see it (GET /runs/{id} and the `run` of run.* events): no lease internals. */
export function runView(run: Run) {
  const { lease_owner: _owner, lease_expires_at: _expires, waiting: _waiting, input_message_id: _input, api_key_id: _key, scope_project_id: _scope, event_seq_ceiling: _ceiling, ...view } = run;
  // Money as every answer shows it: the stored numeric's `"11.000000000000"` is `"11"` (events and GET /runs/{id} alike).
  return { ...view, cost: addCosts(view.cost) };
}
export type RunView = ReturnType<typeof runView>;

export const FINAL_EVENT_OF: Record<'completed' | 'failed' | 'cancelled', RunEventName> = {
  completed: 'run.completed',
  failed: 'run.failed',
  cancelled: 'run.cancelled',
};

/** The `run.*` event of a run's current status. */
export function runEvent(run: Run) {
  const event: RunEventName = run.status === 'queued' ? 'run.queued' : run.status === 'running' ? 'run.started' : FINAL_EVENT_OF[run.status];
  return { event, data: { run: runView(run) } };
}

/**
 * Inside a transaction that holds the thread's row lock: gives the thread to its oldest waiting
 * run (its input becomes the thread's next user message now), or marks the thread idle.
 */
export async function handOnThread(tx: Db, threadId: string): Promise<Run | undefined> {
  const next = await runCrud.nextWaitingOrIdle(tx, threadId);
  return next && promote(tx, threadId, next);
}

/** The waiting run `next` (locked) takes the thread. */
async function promote(tx: Db, threadId: string, next: Run): Promise<Run> {
  const message = next.input && !next.input_message_id ? await appendMessage(tx, { thread_id: threadId, role: 'user', content: next.input, metadata: {} }) : null;
  return runCrud.updateRun(tx, next.id, { waiting: false, ...(message ? { input_message_id: message.id } : {}) });
}

/** Locks a thread's row (runs start, end and hand on under it, in this order: thread, then run). */
export async function lockThread(tx: Db, threadId: string): Promise<void> {
  await tx.select({ id: threads.id }).from(threads).where(eq(threads.id, threadId)).for('update');
}

export interface EndedRun {
  run: Run;
  /** The waiting run that now holds the thread (its job is queued). */
  promoted: Run | undefined;
}

/** How a run ends: its final status, the error in words, and (from its worker) its last step's totals. */
export type RunOutcome = { status: 'completed' | 'failed' | 'cancelled'; error?: string | null; /** Its worker lets go of it in the same update (its final event is stored in the same transaction). */ releaseLease?: boolean } & Partial<Pick<runCrud.EndValues, 'steps' | 'usage' | 'cost' | 'paid'>>;

/**
 * Inside a transaction: ends a run if it is active and `guard` holds, and hands its thread on.
 * Undefined when the run had already ended (or the guard failed). The caller queues the promoted
 * run's job after the commit (`queuePromoted`).
 */
export async function endInTransaction(tx: Db, run: Pick<Run, 'id' | 'thread_id'>, outcome: RunOutcome, guard: runCrud.EndGuard, locked?: Pick<Run, 'waiting'>): Promise<EndedRun | undefined> {
  // `locked`: the run as read under the thread's lock, already held by the caller.
  const { releaseLease = false, ...values } = outcome;
  if (locked && !locked.waiting && guard && 'leaseOwner' in guard && values.steps !== undefined && values.usage !== undefined && values.cost !== undefined && !values.paid) {
    // Its worker's end of the run that holds the thread: the end and the hand-over in one statement.
    const ended = await runCrud.endByWorkerAndHandOn(tx, run, { ...values, steps: values.steps, usage: values.usage, cost: values.cost }, guard.leaseOwner, releaseLease);
    return ended && { run: ended.run, promoted: ended.next ? await promote(tx, run.thread_id, ended.next) : undefined };
  }
  if (!locked) await lockThread(tx, run.thread_id);
  // Under the thread's lock a run's `waiting` cannot change: read it before the end clears it.
  const [before] = locked ? [locked] : await tx.select({ waiting: runs.waiting }).from(runs).where(eq(runs.id, run.id));
  const row = await runCrud.endRun(tx, run.id, { ...values, error: values.error ?? null }, guard, releaseLease);
  if (!row) return undefined;
  const promoted = before?.waiting ? undefined : await handOnThread(tx, run.thread_id);
  return { run: row, promoted };
}

/**
 * Inside a step's transaction that holds the thread's lock and the run, a run that holds its thread
 * (not waiting): its worker's end of the run with its answer, the answer appended to the thread as
 * an assistant message and the run ended and its thread handed on, in one statement. Undefined when
 * the run is no longer the worker's (the caller rolls back, which takes the answer too).
 */
export async function endWithAnswer(tx: Db, run: Pick<Run, 'id' | 'thread_id'>, answer: runCrud.RunAnswer, outcome: RunOutcome & Pick<Run, 'steps' | 'usage' | 'cost'>, workerId: string): Promise<(EndedRun & { message: Message }) | undefined> {
  const { releaseLease = false, ...values } = outcome;
  const done = await runCrud.endWithAnswerAndHandOn(tx, run, answer, values, workerId, releaseLease);
  return done && { message: done.message, run: done.run, promoted: done.next ? await promote(tx, run.thread_id, done.next) : undefined };
}

/** After the commit that ended a run: the waiting run that now holds its thread gets its job. */
export async function queuePromoted(deps: RunDeps, ended: EndedRun | undefined): Promise<void> {
  if (ended?.promoted) await queueRun(deps, ended.promoted.id);
}

/**
 * Ends a run if it is active and `guard` holds, hands its thread on, and queues the promoted run's
 * job after the commit. Undefined when the run had already ended (or the guard failed).
 */
export async function finishRun(deps: RunDeps, run: Pick<Run, 'id' | 'thread_id'>, outcome: RunOutcome, guard: runCrud.EndGuard): Promise<EndedRun | undefined> {
  const ended = await transaction(deps.db, (tx) => endInTransaction(tx, run, outcome, guard));
  await queuePromoted(deps, ended);
  return ended;
}

/** Queues a run's job; a failure is logged, not thrown: the sweeper finds the queued run again. */
export async function queueRun(deps: RunDeps, runId: string): Promise<void> {
  try {
    await deps.queue.add('run-agent', { run_id: runId });
  } catch (error) {
    deps.log.error({ err: error, runId }, 'run not queued; the sweep will queue it');
  }
}

/** A message as the API shows it (MessagePublic): an event's `message` is the one `GET /threads/{id}/messages` lists (its position in the thread, `seq`, is no field of it). */
export function messageView({ seq: _seq, ...message }: Message): Omit<Message, 'seq'> {
  return message;
}

/** The events of a step's written messages: the assistant's (opened when the step began) completed, each tool result created and completed. */
export function completedEvents(stepMessages: readonly Message[], step: number): NewRunEvent[] {
  return stepMessages.flatMap((row, i): NewRunEvent[] => {
    const message = messageView(row);
    return i === 0 ? [{ event: 'message.completed', data: { message, step } }] : [{ event: 'message.created', data: { message, step } }, { event: 'message.completed', data: { message, step } }];
  });
}

/**
 * Why a message a run opened ends incomplete: the run ended (cancelled, failed — its deadline
 * among the reasons) before the step that opened it was written, or its worker stopped (died, or
 * handed it back at shutdown) and the run goes on with a new step.
 */
export type IncompleteReason = 'cancelled' | 'failed' | 'interrupted';

/** The content of the `tool.result` of a call whose tool had not answered when its run stopped, as a failed tool's reads. */
const UNANSWERED_CALL: Record<IncompleteReason, string> = {
  cancelled: 'Error: the tool call did not complete: the run was cancelled',
  failed: 'Error: the tool call did not complete: the run failed',
  interrupted: "Error: the tool call did not complete: the run's worker stopped",
};

/**
 * The `message.completed` of every message the run's log opened (`message.created`) and never
 * completed, but those in `except` (their completion is on its way). Without its end, a client
 * building messages from the events was left with one open for good.
 *
 * A message whose step was never written is not in the thread: it ends with the text its deltas
 * streamed and the tool calls it asked for, and `status: 'incomplete'` with `reason`; before it,
 * each of those calls whose `tool.result` the log lacks (its tool was still running) gets one, an
 * error result as a failed tool's reads (`is_error: true`), `status: 'incomplete'` with `reason`
 * too, so a client pairing calls with results is not left with one open for good. A message
 * whose step was written (committed) but whose events were not (its worker's append failed, or it
 * died between the commit and the append) is in the thread: it ends as its step would have ended it
 * (completedEvents: the message as written, its step's tool messages created and completed), so
 * the events say what the thread holds and an agent completion's answer (answerOf) includes it.
 */
export async function openMessagesClosed(deps: Pick<RunDeps, 'db' | 'bus'>, runId: string, reason: IncompleteReason, except: ReadonlySet<unknown> = new Set()): Promise<NewRunEvent[]> {
  const open = new Map<unknown, { message: Record<string, unknown>; step: unknown; content: string; toolCalls: Record<string, unknown>[]; unanswered: { id: unknown; name: unknown }[] }>();
  // Every message the log created (open or not): a written step's tool message it created already is not created again.
  const created = new Set<unknown>();
  for (const { event, data } of await deps.bus.events.stored(runId)) {
    if (event === 'message.created' || event === 'message.completed') {
      if (typeof data.message !== 'object' || data.message === null) continue;
      const message = data.message as Record<string, unknown>;
      if (event === 'message.completed') open.delete(message.id);
      else {
        created.add(message.id);
        if (!except.has(message.id)) open.set(message.id, { message, step: data.step, content: typeof message.content === 'string' ? message.content : '', toolCalls: [], unanswered: [] });
      }
    } else if (event === 'message.delta') {
      const opened = open.get(data.message_id);
      if (opened && typeof data.delta === 'string') opened.content += data.delta;
    } else if (event === 'tool.call') {
      const opened = open.get(data.message_id);
      opened?.toolCalls.push({ id: data.tool_call_id, name: data.name, arguments: data.arguments });
      opened?.unanswered.push({ id: data.tool_call_id, name: data.name });
    } else if (event === 'tool.result') {
      // A result names its call, not its message: it answers the latest open message's first
      // unanswered call with that id (some models number their calls call_0, call_1… every step).
      for (const { unanswered } of [...open.values()].reverse()) {
        const at = unanswered.findIndex((call) => call.id === data.tool_call_id);
        if (at < 0) continue;
        unanswered.splice(at, 1);
        break;
      }
    }
  }
  if (!open.size) return [];
  const written = await runCrud.messagesOfRun(deps.db, runId);
  const now = new Date();
  const closed: NewRunEvent[] = [];
  for (const [id, { message, step, content, toolCalls, unanswered }] of open) {
    const at = written.findIndex((row) => row.id === id);
    if (at < 0) {
      for (const call of unanswered) {
        closed.push({ event: 'tool.result', data: { tool_call_id: call.id, name: call.name, content: UNANSWERED_CALL[reason], is_error: true, step, status: 'incomplete', reason } });
      }
      closed.push({ event: 'message.completed', data: { message: { ...message, content, tool_calls: toolCalls.length ? toolCalls : null, updated_at: now }, step, status: 'incomplete', reason } });
      continue;
    }
    const row = written[at]!;
    // Its step's tool messages follow it in the thread (the step's one transaction wrote them).
    const toolMessages: Message[] = [];
    for (const next of written.slice(at + 1)) {
      if (next.role !== 'tool') break;
      if (!created.has(next.id)) toolMessages.push(next);
      created.add(next.id);
    }
    closed.push(...completedEvents([row, ...toolMessages], typeof step === 'number' ? step : Number(row.metadata.step)));
  }
  return closed;
}

/**
 * Before a writer that did not write the run's log appends its final batch to it (a cancel of a run
 * no worker held, the sweep): its events are numbered past whatever the run's writers may have
 * numbered (runs.event_seq_ceiling), should the log have lost its latest events
 * (RunEventLog.numberAfter). Returns, where the log keeps the ceiling, what raises the ceiling over
 * that batch before it goes out (appendFinalEvent's `writer`), as a worker's RunWriter.reserve does:
 * left where it was, an append whose answer was lost (it landed, or not) is written again by the
 * sweep after the same ceiling, and should the stream have been lost meanwhile, its seqs, which
 * clients saw (the log publishes what it stores), name other events (what closed the open
 * messages, which a lost stream no longer shows open), and a client resuming after one of them
 * never gets the final event.
 */
export function takeUpLog(deps: Pick<RunDeps, 'bus' | 'db'>, run: Pick<Run, 'id' | 'event_seq_ceiling' | 'lease_owner'>): Pick<RunWriter, 'reserve'> | undefined {
  const { events } = deps.bus;
  if (!events.numberAfter) return undefined;
  events.numberAfter(run.id, run.event_seq_ceiling);
  return {
    reserve: async (count, top = 0) => {
      // Fenced by the hold this writer settles (a dead worker's lease, FINAL_EVENT_PENDING): an ended
      // run's hold is only let go once its final event is stored, so gone, the final event is there.
      const raised = run.lease_owner !== null && (await runCrud.raiseEventSeqCeiling(deps.db, run.id, run.lease_owner, Math.max(run.event_seq_ceiling, top) + count));
      if (!raised) throw new RunEventsRefusedError(run.id, 'ended', top);
    },
  };
}

/** Writes the final event of a run ended with FINAL_EVENT_PENDING, then clears the mark; left for the sweep when the write fails. */
export async function closePending(deps: RunDeps, run: Run): Promise<boolean> {
  if (!(await appendFinalEvent(deps, run, [], takeUpLog(deps, run)))) return false;
  await runCrud.clearEndedLease(deps.db, run.id, runCrud.FINAL_EVENT_PENDING);
  return true;
}

/** Events of a run not yet appended that go out before its final event, or how to make them from the log as it is when they go out (they are made again after a catch-up). */
export type FinalEventsBefore = readonly NewRunEvent[] | (() => Promise<readonly NewRunEvent[]>);

/**
 * Appends a run's final event (after `before`, events of the run not yet appended) unless its log
 * already ended (another writer got there first); a run that did not complete first ends the
 * messages its log left open (openMessagesClosed: a cancel, a failure, its deadline). The database decided the run's end, so a writer
 * that is behind the log (another node appended since: `stale`) catches up with `lastSeq` and
 * appends them after what is there. True when the log now ends with a final event; false when the
 * event store failed (the run's lease then stays for the sweep to try again: see endRun). `writer`:
 * the run's worker's (RunWriter), which raises the run's seq ceiling first where the batch would pass
 * it, or takeUpLog's for a writer that took the log up (it raises the ceiling over every batch).
 */
export async function appendFinalEvent(deps: RunDeps, run: Run, before: FinalEventsBefore = [], writer?: Pick<RunWriter, 'reserve'>): Promise<boolean> {
  const { events } = deps.bus;
  const final = async (top?: number) => {
    const first = typeof before === 'function' ? await before() : before;
    // A run that did not complete ends the messages it left open first (a completed run's step completed its own).
    const completing = new Set(first.filter((e) => e.event === 'message.completed').map((e) => (e.data.message as { id?: unknown } | undefined)?.id));
    const batch = [...(run.status === 'completed' ? [] : await openMessagesClosed(deps, run.id, run.status as 'cancelled' | 'failed', completing)), ...first, runEvent(run)];
    // The run's worker counts its last batch against the run's seq ceiling like every other it appends.
    await writer?.reserve(batch.length, top);
    return batch;
  };
  try {
    await events.append(run.id, await final()).catch(async (error: unknown) => {
      if (!(error instanceof RunEventsRefusedError) || error.reason !== 'stale') throw error;
      await events.append(run.id, await final(await events.lastSeq(run.id)));
    });
    return true;
  } catch (error) {
    const ended = error instanceof RunEventsRefusedError && error.reason === 'ended';
    deps.log[ended ? 'debug' : 'error']({ err: error, runId: run.id }, ended ? 'final run event not appended (the log had ended)' : 'final run event not appended');
    return ended;
  }
}
