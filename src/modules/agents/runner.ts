/**
 * The runner: executes one run (the `run-agent` job). It takes the run with a lease, then loops —
 * call the model with the thread's messages and the agent's tools, stream its text as events, run
 * the tool calls it asks for (in parallel), write the step's messages — until the model answers or
 * MAX_RUN_STEPS. One AbortSignal reaches every model and tool call: a cancel, the run's deadline,
 * a lost lease or a shutdown abort it. Each step is written in one transaction fenced by the lease,
 * so a run resumed after a crash redoes an unfinished step and never duplicates a written message.
 */
import { randomBytes, randomUUID } from 'node:crypto';
import { hostname } from 'node:os';

import { jsonSchema, type ModelMessage, tool, type ToolSet } from 'ai';
import { asc, eq, sql } from 'drizzle-orm';

import { commitWithNextStatement, type Db, transaction } from '../../core/db.js';
import { type CredentialsGone, CredentialsGoneError, HttpError, InsufficientStorageError, isOutOfSpace, PaymentRequiredError, TooManyRequestsError } from '../../core/errors.js';

import { type AgentVersion, type Message, messages, type MessageToolCall, type Run, type RunUsage } from '../../models/index.js';

import { versionCrud } from '../../crud/agent.js';
import { preparedAnywhere } from '../../crud/prepared.js';
import * as runCrud from '../../crud/run.js';
import { appendMessage } from '../../crud/thread.js';
import { isBlank, storableModelPieces, storableModelText, storableModelValue, storableText } from '../../utils/text.js';
import { untilAborted } from '../../utils/time-limit.js';
import { addCosts, CLIENT_FAULT_UPSTREAM, ModelNotFoundError, ModelTimeoutError, ProviderUnavailableError, type TokenUsage, type ToolCall, UpstreamError } from '../ai-models/index.js';
import { builtinTools } from './knowledge-tool.js';
import { type NewRunEvent, RUN_EVENT_SEQ_ROOM, RunWriter } from './run-bus.js';
import { RunBusUnavailableError } from './run-bus-errors.js';
import { appendFinalEvent, completedEvents, deadlineOf, type EndedRun, endInTransaction, endWithAnswer, type FinalEventsBefore, finishRun, openMessagesClosed, queuePromoted, type RunDeps, runEvent } from './run-lifecycle.js';
import { isToolName, TOOL_DEFINITIONS, type ToolCallContext, type ToolImplementations, type ToolSource } from './tools.js';

// ==================== Why a run stops ====================

/**
 * The reason the run's signal aborted with. `outage`: its events could not be stored (the run bus
 * unreachable, maybe for a second), the infrastructure's fault, not the run's: it is handed back as
 * at a shutdown (its attempt not counted) and the sweep resumes it, as it resumes a run whose worker
 * died, instead of failing it for good with a 503's "try again later" its owner paid for.
 */
export class RunStop extends Error {
  constructor(readonly kind: 'cancel' | 'deadline' | 'lease' | 'shutdown' | 'outage') {
    super(`run stopped: ${kind}`);
  }
}

/** A failure whose message is already in words the user can act on. */
export class RunFailure extends Error {}

/**
 * The error of a run that failed on a bug: the one failure the runner logs at error (with the
 * stack), so a reader of the run's events knows it has been reported (services/agent-completions.ts).
 */
export const INTERNAL_RUN_ERROR = 'The run failed because of an internal error; try again, and report it if it persists';

/** How the error of a run whose model call its owner's credits or key budget refused begins. */
export const CREDITS_REFUSED = 'Not enough credits';

/**
 * A run whose model call was refused because its key or user went away after the call was
 * authenticated: the words of the cancellation the revocation, deletion or deactivation sends the
 * run (api-key-service, user-service), so the run reads the same whichever of the two came first.
 */
const RUN_CREDENTIALS_GONE: Record<CredentialsGone, string> = {
  api_key_deleted: 'API key deleted',
  api_key_revoked: 'API key revoked',
  user_deleted: 'User deleted',
  user_deactivated: 'User deactivated',
};

/** Whether a run's error says its model call was refused because its key or user went away (RUN_CREDENTIALS_GONE). */
export const credentialsWentAway = (error: string): boolean => Object.values(RUN_CREDENTIALS_GONE).includes(error);

/**
 * The longest error a run keeps, in UTF-16 units (a usage record's, too): a provider's refusal is
 * quoted in it, and a provider may say a lot.
 */
const RUN_ERROR_MAX_CHARS = 2_000;

/** A run's error as its owner reads it: what happened and what to do about it. */
export function describeRunError(error: unknown, run: Pick<Run, 'model'>): string {
  if (error instanceof RunFailure) return error.message;
  if (error instanceof ModelNotFoundError) return `Unknown model ${error.model}: it is not in the model catalog or is disabled; give the agent a model that GET /models lists`;
  if (error instanceof ProviderUnavailableError) return `The provider of model ${run.model} is not set up: ${error.reason}`;
  if (error instanceof PaymentRequiredError) return error.detail.startsWith(CREDITS_REFUSED) ? error.detail : `${CREDITS_REFUSED}: ${error.detail}`;
  if (error instanceof TooManyRequestsError) return error.detail;
  if (error instanceof CredentialsGoneError) return RUN_CREDENTIALS_GONE[error.reason];
  // Not "after retries": a call whose answer had begun is not retried (its text went out).
  if (error instanceof ModelTimeoutError) return `The provider of model ${run.model} could not be reached: no answer within ${error.timeoutMs} ms; try again later`;
  if (error instanceof UpstreamError) {
    const status = error.upstreamStatus;
    if (status === 401 || status === 403) return `The provider rejected the API key for model ${run.model} (${status}); check the provider's key`;
    if (status === 429) return `The provider of model ${run.model} is rate limiting requests (429) and retries did not get through; try again later`;
    if (status === undefined || status >= 500) return `The provider of model ${run.model} could not be reached or failed (${status ?? 'connection error'}); try again later`;
    // A 2xx whose answer was no answer (not JSON, not a completion's shape): nothing was refused.
    if (status < 300) return `The answer of the provider of model ${run.model} could not be read (${status}); try again later`;
    // The provider's own words only when the request was at fault (its detail says so); the rest is in the log.
    if (CLIENT_FAULT_UPSTREAM.has(status)) return `The provider refused the request for model ${run.model} (${status}): ${error.detail}`;
    return `The provider refused the request for model ${run.model} (${status})`;
  }
  if (error instanceof HttpError) return error.detail;
  // The run's messages or events could not be written (the disk full): not a fault to report.
  if (isOutOfSpace(error)) return new InsufficientStorageError().detail;
  return INTERNAL_RUN_ERROR;
}

// ==================== Conversation ====================

const TOKEN_KINDS: [keyof RunUsage, keyof TokenUsage][] = [
  ['input_tokens', 'input'],
  ['output_tokens', 'output'],
  ['cached_input_tokens', 'cached_input'],
  ['reasoning_tokens', 'reasoning'],
];

function addUsage(total: RunUsage, call: TokenUsage): RunUsage {
  return Object.fromEntries(TOKEN_KINDS.map(([run, tokens]) => [run, total[run] + call[tokens]])) as unknown as RunUsage;
}

/** What the model reads for a tool call of the thread whose tool message is not in it. */
export const MISSING_TOOL_RESULT = 'Error: the result of this tool call is not in the thread (its message was deleted)';

/**
 * The thread's messages as the model reads them: each assistant message's tool calls followed by
 * their results in the calls' order (tool results carry the name of the tool they answer; some
 * providers match parallel results by position). A run writes a step's messages together, but a
 * client may delete one of them (DELETE /threads/{id}/messages/{id}), and providers (and the SDK,
 * MissingToolResultsError) refuse a call without its result or a result without its call, which
 * failed every later run of the thread: a call whose result is gone reads MISSING_TOOL_RESULT, and
 * a result whose call is gone is left out. A message with neither text nor calls is left out too.
 */
export function toModelMessages(rows: readonly Message[]): ModelMessage[] {
  const out: ModelMessage[] = [];
  /** The latest assistant message's calls, and the results of them that followed it (the first for each). */
  let calls: readonly MessageToolCall[] = [];
  const results = new Map<string, string>();
  const answerCalls = () => {
    for (const call of calls) {
      const value = results.get(call.id) ?? MISSING_TOOL_RESULT;
      out.push({ role: 'tool', content: [{ type: 'tool-result', toolCallId: call.id, toolName: call.name, output: { type: 'text', value } }] });
    }
    calls = [];
    results.clear();
  };
  for (const row of rows) {
    if (row.role === 'tool') {
      const id = row.tool_call_id;
      if (id !== null && !results.has(id) && calls.some((call) => call.id === id)) results.set(id, row.content);
      continue;
    }
    answerCalls();
    // Blank text (a model that said nothing or only white space, an agent completion's blank
    // assistant turn, a user message stored before blank ones were refused) says nothing to the
    // model: it is left out for every provider, the message with it when it has nothing else (the
    // model manager leaves out what Anthropic and Google refuse besides: withoutBlanks).
    const said = isBlank(row.content) ? null : row.content;
    if (row.role === 'user' || row.role === 'system') {
      if (said !== null) out.push({ role: row.role, content: said });
    } else {
      calls = row.tool_calls ?? [];
      if (!calls.length) {
        if (said !== null) out.push({ role: 'assistant', content: said });
      } else {
        out.push({
          role: 'assistant',
          content: [...(said !== null ? [{ type: 'text' as const, text: said }] : []), ...calls.map((call) => ({ type: 'tool-call' as const, toolCallId: call.id, toolName: call.name, input: call.arguments }))],
        });
      }
    }
  }
  answerCalls();
  return out;
}

function toolSetOf(version: AgentVersion): ToolSet | undefined {
  const names = version.tools.filter(isToolName);
  if (!names.length) return undefined;
  return Object.fromEntries(names.map((name) => [name, tool({ description: TOOL_DEFINITIONS[name].description, inputSchema: jsonSchema(TOOL_DEFINITIONS[name].parameters) })]));
}

/**
 * A tool call of the model as the run keeps it (its id, tool name and input: storableModelText's
 * U+FFFD for a NUL or half of a surrogate pair, which jsonb refuses), for its events, its tool's
 * call and its messages alike.
 */
const storableCall = (call: ToolCall): ToolCall => ({ ...call, toolCallId: storableModelText(call.toolCallId), toolName: storableModelText(call.toolName), input: storableModelValue(call.input) });

/** A (storable) tool call's input as its message stores it: an object. */
const asArguments = (input: unknown): Record<string, unknown> => (typeof input === 'object' && input !== null && !Array.isArray(input) ? (input as Record<string, unknown>) : { input });

interface ToolOutcome {
  call: ToolCall;
  content: string;
  is_error: boolean;
  /** What the answer drew on (knowledge passages): kept in the tool message's metadata. */
  sources: ToolSource[];
}

/** The sources of the run's tool messages so far, each passage once (its best score): what its final message cites. */
export function sourcesOfRun(history: readonly Message[], runId: string): ToolSource[] {
  const byPassage = new Map<string, ToolSource>();
  for (const row of history) {
    if (row.run_id !== runId || row.role !== 'tool') continue;
    for (const source of (row.metadata.sources as ToolSource[] | undefined) ?? []) {
      const key = `${source.entry_id}:${source.chunk_index}`;
      const seen = byPassage.get(key);
      if (!seen || source.score > seen.score) byPassage.set(key, source);
    }
  }
  return [...byPassage.values()];
}

/** `{sources}` when there are any: a message without sources keeps its metadata as it was. */
const sourcesField = (sources: ToolSource[]) => (sources.length ? { sources } : {});

// ==================== The runner ====================

/** Agent versions a runner keeps (they never change). */
const VERSION_CACHE_SIZE = 1_000;

/** A thread's messages in order: every step reads them. */
const threadHistory = preparedAnywhere('messages_of_thread', (db, name) =>
  db
    .select()
    .from(messages)
    .where(eq(messages.thread_id, sql.placeholder('thread_id') as unknown as string))
    .orderBy(asc(messages.seq))
    .prepare(name),
);

interface Execution {
  controller: AbortController;
  done: Promise<void>;
}

export class AgentRunner {
  /** This process's name on the leases it holds. */
  readonly workerId = `${hostname()}:${process.pid}:${randomBytes(4).toString('hex')}`;
  private readonly executions = new Map<string, Execution>();
  /** Agent versions by `agent_id:version`, oldest first (see versionOf). */
  private readonly versions = new Map<string, AgentVersion>();
  private closing = false;
  /** The built-in tools, overridden by name by the server's own (tests give theirs; `undefined` switches one off). */
  private readonly tools: ToolImplementations;
  /** Runs created before this are ones an earlier process may have been running (see resumeSeq). */
  private readonly startedAt = new Date();

  constructor(private readonly deps: RunDeps) {
    this.tools = { ...builtinTools(deps), ...deps.tools };
  }

  /** The `run-agent` job: runs `runId` if it can be taken (queued, or its worker is gone); otherwise nothing. */
  async execute(runId: string): Promise<void> {
    if (this.closing || this.executions.has(runId)) return;
    const controller = new AbortController();
    // Listening before the claim: a cancel sent the moment the run starts is not missed.
    const unsubscribe = this.deps.bus.signals.subscribe(runId, () => controller.abort(new RunStop('cancel')));
    let finished!: () => void;
    const execution: Execution = { controller, done: new Promise<void>((resolve) => (finished = resolve)) };
    this.executions.set(runId, execution);
    try {
      // Where the log can lose events on its own (Redis), the claim gives the worker room to number them in.
      const seqRoom = this.deps.bus.events.numberAfter ? RUN_EVENT_SEQ_ROOM : 0;
      const claimed = await runCrud.claim(this.deps.db, runId, this.workerId, this.deps.settings.RUN_LEASE_SECONDS, seqRoom);
      if (!claimed) return;
      await this.drive(claimed, controller);
    } finally {
      unsubscribe();
      this.executions.delete(runId);
      finished();
    }
  }

  /** Runs being executed here. */
  get running(): number {
    return this.executions.size;
  }

  /** Hands every run executing here back (it resumes on the next start or another worker) and waits for them. */
  async close(): Promise<void> {
    this.closing = true;
    const executions = [...this.executions.values()];
    for (const execution of executions) execution.controller.abort(new RunStop('shutdown'));
    await Promise.allSettled(executions.map((execution) => execution.done));
  }

  private async drive(claimed: runCrud.Claimed, controller: AbortController): Promise<void> {
    const { run } = claimed;
    const { deps } = this;
    const { settings, log } = deps;
    const signal = controller.signal;
    const deadlineAt = deadlineOf(run, settings.RUN_TIMEOUT_SECONDS);
    const untilDeadline = deadlineAt.getTime() - Date.now();
    // A run taken up past its deadline (resumed after its worker was stuck) stops before its first step.
    if (untilDeadline <= 0) controller.abort(new RunStop('deadline'));
    const deadlineTimer = setTimeout(() => controller.abort(new RunStop('deadline')), Math.max(0, untilDeadline));
    const renewal = setInterval(() => {
      runCrud.renewLease(deps.db, run.id, this.workerId, settings.RUN_LEASE_SECONDS, deadlineAt).then(
        (held) => held || controller.abort(new RunStop('lease')),
        (error: unknown) => log.warn({ err: error, runId: run.id }, 'run lease not renewed'),
      );
    }, (settings.RUN_LEASE_SECONDS * 1000) / 3);
    // Every event of the run goes through one writer, which the log refusing it as `stale` sends to
    // the database: a run still held goes on after the other writer's events, one no longer held stops.
    // Where the log can lose events on its own (Redis), the writer stays under the run's seq ceiling,
    // raising it in the database first: a worker taking the run up after this one died, from a
    // stream Redis lost meanwhile, numbers past anything a client can have seen.
    const ceiling = deps.bus.events.numberAfter
      ? {
          after: claimed.seqFloor,
          at: run.event_seq_ceiling,
          room: RUN_EVENT_SEQ_ROOM,
          raise: async (to: number) => {
            if (await runCrud.raiseEventSeqCeiling(deps.db, run.id, this.workerId, to)) return;
            controller.abort(new RunStop('lease'));
            throw new RunStop('lease');
          },
        }
      : undefined;
    const appends = new RunWriter(
      deps.bus.events,
      run.id,
      async (refusal) => {
        const held = await runCrud.renewLease(deps.db, run.id, this.workerId, settings.RUN_LEASE_SECONDS, deadlineAt);
        if (!held) controller.abort(new RunStop('lease'));
        else if (refusal.reason === 'stale') log.warn({ runId: run.id }, 'run events appended by another writer (a worker whose lease expired); going on after them');
        return held;
      },
      ceiling,
    );
    log.info({ runId: run.id, attempt: run.attempts, model: run.model }, run.attempts === 1 ? 'run started' : 'run resumed');
    // A resumed run's log goes on from its last event; only the first start (after run.queued)
    // announces itself, with the first event of its work (one write, not two).
    const announcement = new Announcement();
    try {
      await this.loop(claimed, deadlineAt, signal, announcement, appends);
    } catch (error) {
      // The run stops here, whatever stopped it: a tool still running (the model call failed while
      // it ran) is stopped too, or its result could land after the end of its call read from the log.
      // A step whose events cannot be stored goes nowhere: the run is handed back (RunStop 'outage').
      controller.abort(error instanceof RunBusUnavailableError ? new RunStop('outage') : error);
      // The step's events sent without waiting land before whatever ends the run (the open message's end reads them).
      await appends.settle().catch(() => undefined);
      const stop = signal.aborted && signal.reason instanceof RunStop ? signal.reason : null;
      if (stop?.kind === 'shutdown' || stop?.kind === 'outage') {
        const handedBack = await runCrud.releaseLease(deps.db, run.id, this.workerId, stop.kind, appends.lastSeq()).catch((e: unknown) => {
          log.error({ err: e, runId: run.id }, 'run not handed back; its lease will expire');
          return undefined;
        });
        if (handedBack && stop.kind === 'outage') log.warn({ err: error, runId: run.id }, 'run handed back: its events could not be stored (run bus unreachable); the sweep resumes it');
        else if (handedBack) log.info({ runId: run.id }, 'run handed back at shutdown');
        // Cancelled while it stopped: the cancel left the final event to this worker, which still holds it.
        else if (handedBack === false) await this.afterLostRun(run.id, appends);
        return;
      }
      if (stop?.kind === 'cancel' || stop?.kind === 'lease') {
        // Which one says how the cancel arrived: its signal, or the status seen at a lease renewal.
        log.info({ runId: run.id, stop: stop.kind }, 'run stopped: cancelled, or no longer this worker\'s');
        // The final event (a cancel leaves it to this worker) comes after what the stopped calls cost
        // is written, with the run's totals (the stopped call's included: see withPaidTotals).
        await deps.charged?.();
        await this.afterLostRun(run.id, appends);
        return;
      }
      // Storable (storableText): a provider's refusal quoted in it with a NUL failed the run's end, which stayed running until its lease ran out.
      const message = stop?.kind === 'deadline' ? `The run passed its deadline of ${settings.RUN_TIMEOUT_SECONDS} s (RUN_TIMEOUT_SECONDS) and was stopped` : storableText(describeRunError(error, run), RUN_ERROR_MAX_CHARS);
      if (!(error instanceof HttpError) && !(error instanceof RunFailure) && !stop) log.error({ err: error, runId: run.id }, 'run failed');
      else log.info({ runId: run.id, reason: message, ...(error instanceof UpstreamError ? { upstream: error.message } : {}) }, 'run failed');
      await deps.charged?.();
      // Its totals as charged come with the failure, in one update: a reader never sees it failed without them.
      const ended = await finishRun(deps, run, { status: 'failed', error: message, paid: await this.paidTotals(run) }, { leaseOwner: this.workerId });
      if (ended) await this.closeEnded(ended.run, announcement.take().again, appends);
      else await this.afterLostRun(run.id, appends);
    } finally {
      clearTimeout(deadlineTimer);
      clearInterval(renewal);
    }
  }

  /** Writes the final event of a run this worker ended, then lets go of its lease (see endRun). */
  private async closeEnded(run: Run, before: FinalEventsBefore, appends: RunWriter): Promise<void> {
    if (await appendFinalEvent(this.deps, run, before, appends)) await runCrud.releaseLease(this.deps.db, run.id, this.workerId, false);
  }

  /**
   * The run is no longer this worker's to end: cancelled meanwhile (then this worker writes its
   * final event and lets go), or taken over by another worker (then it stops without a word).
   */
  private async afterLostRun(runId: string, appends: RunWriter): Promise<void> {
    const run = await runCrud.runCrud.getById(this.deps.db, runId);
    if (!run || run.lease_owner !== this.workerId) return;
    if (run.status === 'running') {
      // Our lease is still on it: a lost renewal (database trouble). Let it expire; the sweep resumes it.
      return;
    }
    // As closeEnded: a final event not appended keeps the lease, which tells the sweep one is owed
    // (let go, the run's readers would wait for an end that never comes).
    if (await appendFinalEvent(this.deps, await this.withPaidTotals(run), [], appends)) await runCrud.releaseLease(this.deps.db, runId, this.workerId, false);
  }

  /**
   * What a run this worker stopped (failed, cancelled) was charged, from its usage records once its
   * calls are charged: the stopped call never reaches a step's transaction, so its cost was missing
   * from the run. Best effort: a failure keeps the steps' totals (undefined), logged, and the run
   * ends all the same.
   */
  private async paidTotals(run: Run): Promise<runCrud.PaidTotals | undefined> {
    try {
      return await runCrud.paidTotals(this.deps.db, run);
    } catch (error) {
      this.deps.log.warn({ err: error, runId: run.id }, 'run totals not read from its usage records; its steps\' totals kept');
      return undefined;
    }
  }

  /** A run this worker stopped and still holds whose end came from elsewhere (a cancel), with its totals as charged (paidTotals). */
  private async withPaidTotals(run: Run): Promise<Run> {
    const paid = await this.paidTotals(run);
    const raised = paid && (await runCrud.raisePaidTotals(this.deps.db, run.id, paid, this.workerId).catch((error: unknown) => this.deps.log.warn({ err: error, runId: run.id }, "run totals not raised to its usage records; its steps' totals kept")));
    return raised ?? run;
  }

  /**
   * The steps, until the model answers: the step that answers writes its messages and ends the run
   * in one transaction, and appends its `message.completed` with `run.completed`. `announcement`
   * (run.started, on a run's first start) goes out with the first event. `deadlineAt`: when the
   * run's deadline passes (a tool step's lease renewal stops there).
   */
  private async loop({ run, firstStart, history: claimedHistory, seqFloor }: runCrud.Claimed, deadlineAt: Date, signal: AbortSignal, announcement: Announcement, appends: RunWriter): Promise<void> {
    const { deps } = this;
    const { settings, bus } = deps;
    if (!run.agent_id) throw new RunFailure('The agent of this run was deleted; start a new run with another agent');
    // The claim read the thread's messages. A first start's log holds only run.queued: where reading
    // the log's top is a round trip (Redis), it goes on from there without it (expect). Otherwise the
    // top is read with the pinned version (cached): a resumed run's log goes on from its last event.
    // Only a run whose log has nothing of a worker's yet announces its start.
    const expectFirst = firstStart && bus.events.expect !== undefined;
    if (expectFirst) bus.events.expect!(run.id, 1);
    // Taken up from another worker: numbered past what that one may have numbered too, not only past
    // the log's top (below it when Redis lost the stream with the worker).
    else bus.events.numberAfter?.(run.id, seqFloor);
    // A run from before this process started may have been running in one that died (its claim,
    // committed without waiting for the disk, lost with it: so even a first start here): its log
    // may have handed readers events it never stored, and goes on after them (resumeSeq).
    const earlier = run.created_at < this.startedAt && bus.events.resumeSeq !== undefined;
    const top = expectFirst ? 1 : earlier ? bus.events.resumeSeq!(run.id) : bus.events.lastSeq(run.id);
    const [version, lastSeq] = await Promise.all([this.versionOf(run.agent_id, run.agent_version), top]);
    appends.followsTop(lastSeq);
    // A resumed run: the message its last worker opened and never completed ends first: incomplete
    // when its step was not written, as written (with its tool messages) when only its events were not.
    await announcement.set(lastSeq <= 1 ? () => Promise.resolve([runEvent(run)]) : () => openMessagesClosed(deps, run.id, 'interrupted'));
    let firstHistory: Message[] | null = claimedHistory;
    const tools = toolSetOf(version);
    const toolContext: Omit<ToolCallContext, 'cite'> = {
      run_id: run.id,
      thread_id: run.thread_id,
      owner_id: run.owner_id,
      project_id: run.project_id,
      api_key_id: run.api_key_id,
      scope_project_id: run.scope_project_id,
      agent: { id: run.agent_id, version: version.version, knowledge: version.knowledge },
      signal,
    };
    const context = { user_id: run.owner_id, api_key_id: run.api_key_id, project_id: run.project_id, agent_id: run.agent_id, run_id: run.id };
    let { steps, usage, cost } = run;

    for (;;) {
      // Stopped already (a run resumed past its deadline, a cancel between steps): no step begins, no message opens.
      signal.throwIfAborted();
      if (steps >= settings.MAX_RUN_STEPS) {
        throw new RunFailure(`The agent used all ${settings.MAX_RUN_STEPS} steps (MAX_RUN_STEPS) without a final answer`);
      }
      const step = steps + 1;
      const history = firstHistory ?? (await threadHistory(deps.db).execute({ thread_id: run.thread_id }));
      firstHistory = null;
      const messageId = randomUUID();
      // The message as it will be listed (MessagePublic), empty until its text comes (its times: now, the thread's when written).
      const now = new Date();
      const draft = { id: messageId, thread_id: run.thread_id, role: 'assistant', content: '', tool_calls: null, tool_call_id: null, run_id: run.id, metadata: {}, created_at: now, updated_at: now };
      // The step's events are not waited for one by one (the model call starts while message.created
      // is written, deltas go out batched); a failed append stops the step at the model's next part.
      const created: NewRunEvent = { event: 'message.created', data: { message: draft, step } };
      const opening = announcement.take();
      appends.add([...opening.events, created], async () => [...(await opening.again()), created]);

      const stream = deps.models.stream({
        model: run.model,
        system: version.system_prompt || undefined,
        messages: toModelMessages(history),
        tools,
        maxOutputTokens: version.max_output_tokens ?? undefined,
        temperature: version.temperature ?? undefined,
        signal,
        context,
        // The step stores its answer from the deltas it streams (text and refusal in the order
        // they came): the result's own copy of the answer would be a second one, unread.
        keepAnswer: false,
      });
      const outcomes: Promise<ToolOutcome>[] = [];
      // The deltas as the thread will store the answer (storableModelText), a pair cut between two kept whole.
      const pieces = storableModelPieces();
      // The answer the step stores: its deltas joined as they went out, text and refusal in the
      // order they came, so the thread reads as the stream did (and an `agent:` completion answers
      // alike streamed or not). OpenAI's wire keeps the two in fields of their own with no order
      // between them, and a message has one `content`: the result's text + refusal put a refusal
      // that came between pieces of text after them, unlike the stream; holding a refusal's deltas
      // back would delay what a client sees. A model call streams one attempt's parts (none is
      // retried once one went out), so these are all of the result's.
      let text = '';
      for await (const part of stream) {
        appends.check();
        // A refusal is the assistant's answer here: a run's messages have no place of their own for it.
        if (part.type === 'text-delta' || part.type === 'refusal-delta') {
          const delta = pieces.next(part.text);
          text += delta;
          if (delta) appends.add([{ event: 'message.delta', data: { message_id: messageId, delta, step } }]);
        } else if (part.type === 'tool-call') {
          const call = storableCall(part.toolCall);
          appends.add([{ event: 'tool.call', data: { message_id: messageId, tool_call_id: call.toolCallId, name: call.toolName, arguments: asArguments(call.input), step } }]);
          // Started as soon as the model asks: several calls of one step run in parallel, up to MAX_TOOL_CALLS_PER_STEP.
          const outcome = this.callTool(call, version, toolContext, step, appends, outcomes.length);
          // Awaited below; until then a rejection (an abort) must not count as unhandled.
          outcome.catch(() => undefined);
          outcomes.push(outcome);
        }
      }
      const rest = pieces.end();
      text += rest;
      if (rest) appends.add([{ event: 'message.delta', data: { message_id: messageId, delta: rest, step } }]);
      await appends.settle();
      const result = await stream.result;
      const results = await Promise.all(outcomes);
      if (signal.aborted) throw signal.reason;
      steps = step;
      usage = addUsage(usage, result.usage);
      cost = addCosts(cost, result.cost);

      const toolCalls: MessageToolCall[] = result.toolCalls.map(storableCall).map((call) => ({ id: call.toolCallId, name: call.toolName, arguments: asArguments(call.input) }));
      // The final answer cites what the run's knowledge searches found (the tool messages of earlier steps, in `history`).
      const citations = toolCalls.length ? {} : sourcesField(sourcesOfRun(history, run.id));
      // Where the log is in the database (embedded), the answer's events are stored by the step's
      // own transaction, and the run lets go of its lease in it: the end and its final event are one commit.
      const within = !toolCalls.length && bus.events.appendWithin !== undefined;
      const writeStep = (store?: (tx: Db, events: readonly NewRunEvent[]) => Promise<unknown>) =>
        transaction(deps.db, async (tx) => {
          // The thread's lock, then the fence: only the worker holding the run, still running, writes its step.
          const held = await runCrud.lockHeld(tx, run, this.workerId);
          if (!held) return null;
          const metadata = { step, model: result.model, ...citations };
          const end = { status: 'completed', steps, usage, cost, releaseLease: store !== undefined } as const;
          let stepMessages: Message[];
          let ended: EndedRun | undefined;
          if (!toolCalls.length && !results.length && !held.waiting) {
            // The answer alone of a run that holds its thread (a running run never waits): written with
            // the run's end and the thread's hand-over in one statement (the lock above is the fence).
            const done = await endWithAnswer(tx, run, { id: messageId, content: text, metadata }, end, this.workerId);
            stepMessages = done ? [done.message] : [];
            ended = done;
          } else {
            const assistant = await appendMessage(tx, { id: messageId, thread_id: run.thread_id, role: 'assistant', content: text, tool_calls: toolCalls.length ? toolCalls : null, run_id: run.id, metadata });
            const toolMessages: Message[] = [];
            for (const outcome of results) {
              toolMessages.push(await appendMessage(tx, { thread_id: run.thread_id, role: 'tool', content: outcome.content, tool_call_id: outcome.call.toolCallId, run_id: run.id, metadata: { step, name: outcome.call.toolName, is_error: outcome.is_error, ...sourcesField(outcome.sources) } }));
            }
            stepMessages = [assistant, ...toolMessages];
            if (toolCalls.length) {
              await runCrud.updateRun(tx, run.id, { steps, usage, cost, lease_expires_at: runCrud.renewedLease(settings.RUN_LEASE_SECONDS, deadlineAt) });
              return { stepMessages, ended: undefined };
            }
            // The answer: the run ends with it (the lock above is the fence, so the end cannot miss).
            ended = await endInTransaction(tx, run, end, { leaseOwner: this.workerId }, held);
          }
          if (!ended) throw new RunStop('lease');
          // The answer's events are the transaction's last statement (embedded: COMMIT goes with it).
          if (store) commitWithNextStatement(tx);
          await store?.(tx, [...completedEvents(stepMessages, step), runEvent(ended.run)]);
          return { stepMessages, ended };
        });
      // SPEC §5: a run is seen ended with its calls charged (their ledger entries and usage rows written).
      if (!toolCalls.length) await deps.charged?.();
      const written = within ? await appends.within((store) => writeStep(store)) : await writeStep();
      if (!written) throw new RunStop('lease');
      const completed = completedEvents(written.stepMessages, step);
      if (!written.ended) {
        await appends.append(completed);
        continue;
      }
      await queuePromoted(deps, written.ended);
      if (within) return;
      await this.closeEnded(written.ended.run, completed, appends);
      return;
    }
  }

  /**
   * The agent version a run is pinned to. A version never changes once written (a change makes a
   * new one), so the versions runs use are kept here (the newest VERSION_CACHE_SIZE) rather than
   * read for every run; a deleted agent's runs have no agent_id and never get here.
   */
  private async versionOf(agentId: string, number: number): Promise<AgentVersion> {
    const key = `${agentId}:${number}`;
    const known = this.versions.get(key);
    if (known) return known;
    const version = await versionCrud.getIn(this.deps.db, agentId, number).catch(() => {
      throw new RunFailure(`Version ${number} of the agent was not found; start a new run`);
    });
    if (this.versions.size >= VERSION_CACHE_SIZE) this.versions.delete(this.versions.keys().next().value!);
    this.versions.set(key, version);
    return version;
  }

  /**
   * One tool call (the step's `index`th): its implementation's answer, or an error result the model
   * reads (never a crashed run) — also for a call past MAX_TOOL_CALLS_PER_STEP, which is not run.
   */
  private async callTool(call: ToolCall, version: AgentVersion, runContext: Omit<ToolCallContext, 'cite'>, step: number, appends: RunWriter, index: number): Promise<ToolOutcome> {
    const name = call.toolName;
    const implementation = isToolName(name) && version.tools.includes(name) ? this.tools[name] : undefined;
    const sources: ToolSource[] = [];
    const context: ToolCallContext = { ...runContext, cite: (cited) => sources.push(...cited) };
    const max = this.deps.settings.MAX_TOOL_CALLS_PER_STEP;
    let outcome: ToolOutcome;
    if (index >= max) {
      if (index === max) this.deps.log.warn({ runId: context.run_id, step, max }, 'tool calls past MAX_TOOL_CALLS_PER_STEP not run');
      outcome = { call, content: `Error: not run: this step asked for more than ${max} tool calls (MAX_TOOL_CALLS_PER_STEP); ask for the rest in the next step`, is_error: true, sources: [] };
    } else if (!isToolName(name) || !version.tools.includes(name)) {
      outcome = { call, content: `Error: there is no tool named ${name} for this agent`, is_error: true, sources: [] };
    } else if (!implementation) {
      outcome = { call, content: `Error: the tool ${name} is not available on this server`, is_error: true, sources: [] };
    } else {
      try {
        // Raced with the run's signal: a cancel or the deadline ends the run at once, whether or not the tool listens to it.
        const value = await untilAborted(implementation(call.input, context), context.signal);
        // A tool's text (a document's passage) as the thread can store it, alike in its event and its message.
        outcome = { call, content: storableModelText(typeof value === 'string' ? value : JSON.stringify(value)), is_error: false, sources };
      } catch (error) {
        if (context.signal.aborted) throw context.signal.reason;
        this.deps.log.warn({ err: error, runId: context.run_id, tool: name }, 'tool call failed');
        outcome = { call, content: `Error: the tool ${name} failed${toolFailureText(error)}`, is_error: true, sources: [] };
      }
    }
    await appends.append([{ event: 'tool.result', data: { tool_call_id: call.toolCallId, name, content: outcome.content, is_error: outcome.is_error, step } }]);
    return outcome;
  }
}

/**
 * What a run's first append opens with (see loop): run.started on its first start; on a resume,
 * the end of the messages its last worker left open, read from the log (openMessagesClosed). That
 * worker, stalled rather than dead, may append until this one's first append lands (RunWriter's
 * catch-up), so they are made again whenever they go out after it did (RunWriter.append's `again`).
 */
class Announcement {
  private events: NewRunEvent[] = [];
  private again: () => Promise<NewRunEvent[]> = () => Promise.resolve([]);

  /** Makes the events now, and keeps how to make them again. */
  async set(make: () => Promise<NewRunEvent[]>): Promise<void> {
    this.events = await make();
    this.again = make;
  }

  /** The events as made, and how to make them again; the appends after the first open with nothing. */
  take(): { events: NewRunEvent[]; again: () => Promise<NewRunEvent[]> } {
    const taken = { events: this.events, again: this.again };
    this.events = [];
    this.again = () => Promise.resolve([]);
    return taken;
  }
}

/**
 * What the model is told of a tool's failure: an HttpError's detail (written for the caller: bad
 * input, nothing found), nothing of any other error, whose text may be the database's or a
 * provider's (SQL, addresses); the log has it.
 */
function toolFailureText(error: unknown): string {
  return error instanceof HttpError ? `: ${error.detail}` : '';
}
