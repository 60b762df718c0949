/**
 * Agent runs for the API (SPEC §5): start (on a thread, or with a new one), read, cancel, retry,
 * delete. One active run per thread is the database's rule (ux_runs_thread_id_active); the thread's
 * row lock orders starts, ends and hand-overs, and every status change is conditional.
 */
import { randomUUID } from 'node:crypto';
import { setTimeout as delay } from 'node:timers/promises';

import { commitWithNextStatement, type Db, transaction } from '../core/db.js';
import { ConflictError, GoneError, HttpError, NotFoundError, PaymentRequiredError, TooManyRequestsError, UnprocessableError } from '../core/errors.js';

import { type Agent, type Run, runs, type Thread } from '../models/index.js';

import type { RunCreate, RunCreateWithThread, RunListQuery } from '../schemas/run.js';

import { agentCrud, agentPolicy, getDefault, versionCrud } from '../crud/agent.js';
import * as billingCrud from '../crud/billing.js';
import { matching } from '../crud/owned.js';
import * as runCrud from '../crud/run.js';
import { appendMessages, hasModelMessages, historySize, isLastTurn, threadCrud, threadPolicy } from '../crud/thread.js';
import { closePending, finishRun, queueRun, type RunDeps, runEvent, runView } from '../modules/agents/run-lifecycle.js';
import { addCosts, estimateTextTokens, estimateTokensOfSize } from '../modules/ai-models/index.js';
import { catalogModel } from './agent-service.js';
import type { ServiceContext } from './context.js';
import { availableCredits, formatMoney, overBudgetMessage } from './money.js';
import * as threadService from './thread-service.js';

/** A run as the API answers it (and as its events carry it). */
export const publicRun = runView;

// ==================== Starting ====================

/** What a start settles before it touches the thread: the agent, its version, the model. */
interface RunPlan {
  agent: Agent;
  model: string;
}

/**
 * Earlier turns a new thread starts with, written before the run's input (the OpenAI gateway's
 * request history for `agent:<id>`; its content is checked by the caller).
 */
export interface HistoryMessage {
  role: 'user' | 'assistant';
  content: string;
}

/**
 * Reads a start needs besides the thread's own, begun at once so they go out together with the
 * thread's read (one round trip instead of several): the agent, and with billing on the caller's
 * balance (the owner of a thread the caller may write is nearly always the caller; another owner's
 * is read when it is known) and an existing thread's history size. They are only awaited after the
 * thread's read has answered 404 for a thread the caller may not see. Awaiting one rethrows its
 * error; until then a failure is not unhandled.
 */
interface EarlyReads {
  agent: Promise<Agent | undefined>;
  balance: { userId: string; read: Promise<billingCrud.Balance> } | null;
  historySize?: Promise<{ chars: number; bytes: number }>;
}

function readEarly(ctx: ServiceContext, agentId: string | undefined, threadId?: string): EarlyReads {
  const quiet = <T>(promise: Promise<T>): Promise<T> => {
    promise.catch(() => undefined);
    return promise;
  };
  const userId = ctx.principal.user.id;
  const agent = quiet(agentId ? agentCrud.getVisible(ctx.db, ctx.principal, agentId) : getDefault(ctx.db, userId));
  // The start's checks (checkCredits) estimate the prompt when billing is on or the key has a budget.
  const checked = ctx.settings.BILLING_ENABLED || keyBudgetOf(ctx) !== null;
  const history = checked && threadId !== undefined ? quiet(historySize(ctx.db, threadId)) : undefined;
  const balance = ctx.settings.BILLING_ENABLED ? { userId, read: quiet(billingCrud.getBalance(ctx.db, userId)) } : null;
  return { agent, balance, historySize: history };
}

/** The caller's API key's `max_budget` (null: no key, or no budget). */
const keyBudgetOf = (ctx: ServiceContext): string | null => (ctx.principal.apiKeyId !== null ? (ctx.principal.apiKeyLimits?.max_budget ?? null) : null);

/** The run's agent, model and first-step credit check; `ownerId` is whose thread it runs on (who pays). */
async function plan(ctx: ServiceContext, ownerId: string, agentId: string | undefined, model: string | undefined, input: string | undefined, history: readonly HistoryMessage[] = [], early: EarlyReads = readEarly(ctx, agentId)): Promise<RunPlan> {
  threadService.checkContent(ctx, input, ['body', 'input']);
  // A key past its rpm: refused before anything is written (its run's first call would be).
  const rpm = ctx.principal.apiKeyId !== null ? ctx.principal.apiKeyLimits?.rpm : null;
  if (rpm && ctx.runs.refuseSpentKeyRpm) await ctx.runs.refuseSpentKeyRpm(ctx.principal.apiKeyId!, rpm);
  // Without agent_id, the thread's owner's default agent: read early as the caller's, which it nearly always is (a superuser's start on a user's thread is not).
  const found = agentId || ownerId === ctx.principal.user.id ? await early.agent : await getDefault(ctx.db, ownerId);
  const agent = agentId ? found! : usableDefault(ctx, found);
  const runModel = model === undefined ? agent.model : catalogModel(ctx.models, model);
  await checkCredits(ctx, ownerId, agent, runModel, input, history, early);
  return { agent, model: runModel };
}

/**
 * The caller's default agent, if the caller may use it (a project-scoped key: its project's or an
 * unassigned one); 422 naming agent_id otherwise. One in another project is no agent the client
 * named: a 404 said that the thread it named was not found.
 */
function usableDefault(ctx: ServiceContext, found: Agent | undefined): Agent {
  const missing = (msg: string) => new UnprocessableError({ loc: ['body', 'agent_id'], msg, type: 'missing' });
  if (!found) throw missing('No agent_id given and you have no default agent; name an agent or make one the default (is_default: true)');
  try {
    return agentPolicy.check(ctx.principal, found, 'read');
  } catch (error) {
    if (!(error instanceof NotFoundError)) throw error;
    throw missing("No agent_id given and your default agent is in another project than this API key's; name an agent of this project");
  }
}

/**
 * With billing on, 402 at once when the balance cannot cover the first step's worst case (the
 * prompt estimate and the output tokens the model manager will reserve for it, at catalog prices);
 * so, billing on or off, when what is left of the caller's key's `max_budget` cannot.
 * The prompt is the agent's instructions, the thread's messages (`history` for a new thread; an
 * existing thread's, summed by the database: `early.historySize`) and the input; counted by their
 * text only, so the estimate stays below the call's own (which counts the messages' framing too) and
 * never refuses a run its first call would take. Every step still reserves through the model
 * manager; a later step the credits cannot cover fails the run. `early`: the reads already asked for.
 */
async function checkCredits(ctx: ServiceContext, ownerId: string, agent: Agent, model: string, input: string | undefined, history: readonly HistoryMessage[], early: EarlyReads): Promise<void> {
  // The caller's key's spend cap holds its calls too, billing on or off.
  const budget = keyBudgetOf(ctx);
  if (!ctx.settings.BILLING_ENABLED && budget === null) return;
  const asked = ctx.models.modelAsCalled(model);
  if (!asked) return; // the run fails with "unknown model", in words
  // A model whose provider cannot be called is answered by its first fallback that can chat, which its calls reserve for
  // (the rule the call's chain follows; what the step's request may be refused for is not known yet).
  const answering = asked.available ? undefined : ctx.models.answersFor(asked, { capability: 'chat' });
  const info = (answering && ctx.models.modelAsCalled(answering)) || asked;
  // As the model manager estimates the call's prompt (estimateTextTokens).
  let promptTokens = history.reduce((sum, message) => sum + estimateTextTokens(message.content), estimateTextTokens(agent.system_prompt) + estimateTextTokens(input ?? ''));
  if (early.historySize) {
    const { chars, bytes } = await early.historySize;
    promptTokens += estimateTokensOfSize(chars, bytes);
  }
  const inputTokens = Math.ceil(promptTokens);
  // The manager's own worst case (the model's output limit caps the default): what the first call will reserve.
  const { cost: needed } = ctx.models.worstCase(info, inputTokens, agent.max_output_tokens ?? undefined);
  const firstStep = `its first step with ${info.id} needs up to ${formatMoney(needed)}`;
  // A free first step is not held against the key (the meter holds nothing for it).
  if (budget !== null && needed !== '0') {
    const spend = await billingCrud.keySpend(ctx.db, ctx.principal.apiKeyId!);
    if (addCosts(budget, `-${spend.spent}`, `-${spend.reserved}`, `-${needed}`).startsWith('-')) throw new PaymentRequiredError(`${overBudgetMessage(budget, spend)}; ${firstStep}`);
  }
  if (!ctx.settings.BILLING_ENABLED) return;
  const balanceRead = early.balance?.userId === ownerId ? early.balance.read : undefined;
  const short = (credits: string) => addCosts(credits, `-${needed}`).startsWith('-');
  let available = availableCredits(await (balanceRead ?? billingCrud.getBalance(ctx.db, ownerId)));
  if (short(available) && ctx.runs.charged) {
    // Part of what looks held may be this process's own: the credit window's block its last calls
    // for the user took (up to half of what was free), idle now. Given back, the account is read
    // again, as a call's own hold does (usage-meter.ts): a run was refused right after a call.
    await ctx.runs.charged(ownerId);
    available = availableCredits(await billingCrud.getBalance(ctx.db, ownerId));
  }
  if (short(available)) {
    throw new PaymentRequiredError(`Not enough credits to start this run: available ${formatMoney(available)}; ${firstStep}`);
  }
}

interface StartOptions {
  strategy: RunCreate['multitask_strategy'];
  input: string | undefined;
  /** A retry's: the user message its input already is, not appended again while it is the thread's last turn. */
  retried?: { inputMessageId: string | null };
  /** Written before the input (a new thread only). */
  history?: readonly HistoryMessage[];
  /** The run's id, when the caller told it before the start (an `agent:` completion's stream); otherwise a new one. */
  runId?: string;
}

/** The run that holds the thread, ended by an `interrupt` (its worker is told after the commit). */
type Interrupted = Run | undefined;

/**
 * Where the log is in this database (embedded): run.queued, stored with the run by its start's
 * transaction as the last statement (COMMIT goes with it). Where it is elsewhere, nothing here.
 */
async function storeQueued(deps: RunDeps, tx: Db, run: Run): Promise<void> {
  if (!deps.bus.events.appendFirst) return;
  commitWithNextStatement(tx);
  await deps.bus.events.appendFirst(tx, run.id, [runEvent(run)]);
}

/**
 * The refusal of a run without input on a thread with nothing for the model to read. A start is
 * told at its `input` field; a retry has no such field (it reruns a run that had no input, on a
 * thread whose messages were deleted since), so it is told plainly, 409 as its other refusals.
 */
function nothingToAnswer(retry: boolean): HttpError {
  if (retry) return new ConflictError('The thread has no messages for the model to answer: the run had no input and the thread\'s messages were deleted since; post a message to the thread, then retry');
  return new UnprocessableError({ loc: ['body', 'input'], msg: 'The thread has no messages for the model to answer: give input, or post a message to the thread first', type: 'missing' });
}

/** Queues a run on the thread (`owner_id`: the thread's owner, whose run it is). */
async function start(ctx: ServiceContext, deps: RunDeps, { id: threadId, owner_id: ownerId }: Pick<Thread, 'id' | 'owner_id'>, { agent, model }: RunPlan, options: StartOptions): Promise<Run> {
  const { principal, settings } = ctx;
  const { run, interrupted } = await transaction(ctx.db, async (tx) => {
    // Lock order: the user (the active-run limit), then the thread, in one statement; the thread
    // marked busy with it (a refused start rolls it back). Then its runs, read under those locks.
    const thread = threadPolicy.check(principal, await runCrud.holdThreadBusy(tx, ownerId, threadId), 'write');
    // Nothing for the model to answer: refused here, under the thread's lock (which a message's
    // delete waits for), before anything is queued or charged; the provider's 400 failed the run.
    if (options.input === undefined && !(await hasModelMessages(tx, thread.id))) throw nothingToAnswer(options.retried !== undefined);
    // A retry's input message, unless a client deleted it (an idle thread's messages can be) or
    // another run answered after it (the retry would answer the thread as it is, not its input):
    // read under the thread's lock, which a message's delete and a run's start wait for. Otherwise
    // the input is appended again.
    const { retried } = options;
    const inputMessageId = retried?.inputMessageId && (await isLastTurn(tx, thread.id, retried.inputMessageId)) ? retried.inputMessageId : null;
    const limit = settings.MAX_ACTIVE_RUNS_PER_USER;
    // An `interrupt` ends the thread's active run as it starts its own: that run is not counted.
    const checkLimit = (owned: runCrud.OwnerActive, replaced = 0) => {
      if (owned.count - replaced < limit) return;
      throw new TooManyRequestsError(5, `Too many active runs: at most ${limit} may be queued or running per user (MAX_ACTIVE_RUNS_PER_USER); wait for one to end or cancel one`);
    };
    const busy = (active: Pick<Run, 'id' | 'status'> | undefined) =>
      new ConflictError(active ? `Thread is busy: run ${active.id} is ${active.status} on it; wait for it, cancel it, or start with multitask_strategy enqueue or interrupt` : 'Thread is busy: another run is active on it');
    const values = {
      id: options.runId ?? randomUUID(),
      owner_id: thread.owner_id,
      thread_id: thread.id,
      project_id: thread.project_id,
      api_key_id: principal.apiKeyId,
      scope_project_id: principal.scopeProjectId,
      agent_id: agent.id,
      agent_version: agent.version,
      model,
      multitask_strategy: options.strategy,
    };
    if (options.strategy === 'reject' && options.input !== undefined && !inputMessageId && !options.history?.length) {
      // The usual start (a refused busy thread, a new input): the owner's active runs are read by
      // the insert itself, one round trip fewer; a refusal rolls the insert back.
      const { run: inserted, owned, held } = await runCrud.insertRunWithInputIfFree(tx, { ...values, input: options.input }, limit, settings.MAX_MESSAGES_PER_THREAD);
      checkLimit(owned);
      if (!inserted) throw busy(owned.onThread);
      await threadService.checkThreadRoom(ctx, tx, thread.id, 1, held);
      await storeQueued(deps, tx, inserted);
      return { run: inserted, interrupted: undefined };
    }
    // One more read for an `interrupt` (the run it ends among them), so the others are counted up to the limit.
    const interrupting = options.strategy === 'interrupt';
    const owned = await runCrud.ownerActive(tx, ownerId, thread.id, interrupting ? limit + 1 : limit);
    const active = owned.onThread;
    checkLimit(owned, interrupting && active ? 1 : 0);
    let waiting = false;
    let interrupted: Interrupted;
    if (active) {
      if (options.strategy === 'reject') throw busy(active);
      if (options.strategy === 'enqueue') waiting = true;
      else interrupted = await runCrud.endRun(tx, active.id, { status: 'cancelled', error: null }, null);
    }
    // The client's messages this start writes: its input (now, or when it takes the thread) and a new thread's history.
    await threadService.checkThreadRoom(ctx, tx, thread.id, options.input !== undefined && !inputMessageId ? 1 + (options.history?.length ?? 0) : 0);
    const appendInput = !waiting && options.input !== undefined && !inputMessageId;
    if (appendInput && options.history?.length) await appendMessages(tx, thread.id, options.history.map((message) => ({ ...message, metadata: {} })));
    // The input becomes the thread's next user message in the run's own insert.
    const inserted = appendInput
      ? await runCrud.insertRunWithInput(tx, { ...values, waiting, input: options.input! })
      : await runCrud.insertRun(tx, { ...values, waiting, input: options.input ?? null, input_message_id: inputMessageId });
    await storeQueued(deps, tx, inserted);
    return { run: inserted, interrupted };
  });
  if (interrupted) await stopEnded(deps, interrupted);
  // Where the log is elsewhere (Redis), run.queued and the job go out without waiting in between:
  // one round trip, and in that order on the connection they share (QueueOptions.laneProducer), so
  // a worker finds run.queued in the log when it takes the job. The run is committed by now: a
  // failed append is logged, not the request's failure (a 503 would have a client retry, and an
  // `enqueue` retry start a second run). The log is then opened by the run's next writer: its
  // worker (whose first append continues from the log's real top: RunEventLog.expect), or the
  // cancel of a run no worker took (its run.cancelled, or the sweep's: FINAL_EVENT_PENDING); a
  // reader waits for those as for any queued run's events.
  const announced = deps.bus.events.appendFirst
    ? undefined
    : deps.bus.events.append(run.id, [runEvent(run)]).catch((error: unknown) => ctx.log.error({ err: error, runId: run.id }, 'run.queued not appended; the run is queued, and its log starts with its next event'));
  if (!run.waiting) await queueRun(deps, run.id);
  await announced;
  ctx.log.info({ runId: run.id, threadId, agentId: agent.id, model, waiting: run.waiting, interrupted: interrupted?.id }, 'run queued');
  return run;
}

/**
 * After a cancel: a run no worker held gets its final event here (the sweep writes it if this
 * fails: see FINAL_EVENT_PENDING); a held one is told to stop (its worker writes it).
 */
async function stopEnded(deps: RunDeps, run: Run): Promise<void> {
  if (run.lease_owner === runCrud.FINAL_EVENT_PENDING) {
    await closePending(deps, run);
    return;
  }
  // The end is committed: a signal that cannot be sent (Redis down) is not the request's failure
  // (an interrupt's new run would not even be queued), and the worker sees the status at its next lease renewal.
  await deps.bus.signals.cancel(run.id, 'cancelled').catch((error: unknown) => deps.log.warn({ err: error, runId: run.id }, 'cancel signal not sent; the worker stops at its next lease renewal'));
}

/** A run on the thread (`runId`: its id, when the caller chose it; see StartOptions). */
export async function startOnThread(ctx: ServiceContext, deps: RunDeps, threadId: string, input: RunCreate, runId?: string): Promise<Run> {
  const early = readEarly(ctx, input.agent_id, threadId);
  // 404 for another user's thread before anything else is told (the other reads are only awaited after it).
  const thread = await threadCrud.getVisible(ctx.db, ctx.principal, threadId, 'write');
  const planned = await plan(ctx, thread.owner_id, input.agent_id, input.model, input.input, [], early);
  return start(ctx, deps, thread, planned, { strategy: input.multitask_strategy, input: input.input, runId });
}

/** A new thread with `history` (if any) then `input` as its messages, and a run on it (`ids`: theirs, when the caller chose them; see StartOptions). */
export async function startWithThread(ctx: ServiceContext, deps: RunDeps, input: RunCreateWithThread, history: readonly HistoryMessage[] = [], ids: { runId?: string; threadId?: string } = {}): Promise<Run> {
  const planned = await plan(ctx, ctx.principal.user.id, input.agent_id, input.model, input.input, history);
  const thread = await threadService.createWithId(ctx, { title: input.thread?.title ?? '', project_id: input.thread?.project_id, metadata: {} }, ids.threadId);
  try {
    return await start(ctx, deps, thread, planned, { strategy: 'reject', input: input.input, history, runId: ids.runId });
  } catch (error) {
    // Only a refusal (an HttpError: the active-run limit, credits) is surely no run; a database error may be a COMMIT that took.
    if (!(error instanceof HttpError)) throw error;
    // Refused (the active-run limit, credits): the thread made for it goes too, not left empty and
    // counted against MAX_THREADS_PER_USER. (Not one transaction around both: start() hands the run
    // to its worker once its own commits, which must then be the last.)
    await threadCrud.remove(ctx.db, ctx.principal, thread.id).catch((e: unknown) => ctx.log.warn({ err: e, threadId: thread.id }, 'thread of a refused run not deleted'));
    throw error;
  }
}

// ==================== Reading ====================

export function get(ctx: ServiceContext, id: string): Promise<Run> {
  return runCrud.runCrud.getVisible(ctx.db, ctx.principal, id);
}

export async function listForThread(ctx: ServiceContext, threadId: string, query: RunListQuery) {
  const thread = await threadCrud.getVisible(ctx.db, ctx.principal, threadId);
  return runCrud.runCrud.list(ctx.db, ctx.principal, query, matching({ thread_id: runs.thread_id, status: runs.status }, { thread_id: thread.id, status: query.status }));
}

/** The caller's own queued and running runs: a superuser's own too, as the route says ("your"). */
export function listActive(ctx: ServiceContext, query: RunListQuery) {
  return runCrud.listOwnActive(ctx.db, ctx.principal, query);
}

// ==================== Changing ====================

const FINAL = new Set(['completed', 'failed', 'cancelled']);

/** Cancels a queued or running run (409 once it has ended); a running run's model call is aborted at once. */
export async function cancel(ctx: ServiceContext, deps: RunDeps, id: string): Promise<Run> {
  const run = await runCrud.runCrud.getVisible(ctx.db, ctx.principal, id, 'write');
  if (FINAL.has(run.status)) throw new ConflictError(`Run already ${run.status}: only a queued or running run can be cancelled`);
  const ended = await cancelOne(deps, run, null);
  if (!ended) {
    const now = await runCrud.runCrud.getVisible(ctx.db, ctx.principal, id);
    throw new ConflictError(`Run already ${now.status}: only a queued or running run can be cancelled`);
  }
  ctx.log.info({ runId: id }, 'run cancelled');
  return ended;
}

/** Ends an active run as cancelled and stops its worker; undefined when it had ended meanwhile. */
async function cancelOne(deps: RunDeps, run: Pick<Run, 'id' | 'thread_id'>, error: string | null): Promise<Run | undefined> {
  const ended = await finishRun(deps, run, { status: 'cancelled', error }, null);
  if (ended) await stopEnded(deps, ended.run);
  return ended?.run;
}

/**
 * Cancels the queued and running runs started through an API key, or owned by a user, each as
 * POST /runs/{id}/cancel does (a running run's model call is aborted at once), with `reason` as the
 * run's error: what a revoked key or a deactivated user started stops with them. Returns how many it ended.
 */
export async function cancelActiveOf(deps: RunDeps, of: Parameters<typeof runCrud.activeOf>[1], reason: string): Promise<number> {
  let cancelled = 0;
  for (const run of await runCrud.activeOf(deps.db, of)) if (await cancelOne(deps, run, reason)) cancelled += 1;
  if (cancelled) deps.log.info({ ...of, runs: cancelled, reason }, 'runs cancelled');
  return cancelled;
}

/**
 * A new run with the same agent, model and input, for a failed or cancelled run; the input is not
 * appended twice. `strategy` meets the run active on the thread now (the request's, `reject` by
 * default), not the retried run's: an old `interrupt` run's retry cancelled a run the user never named.
 */
export async function retry(ctx: ServiceContext, deps: RunDeps, id: string, strategy: RunCreate['multitask_strategy'] = 'reject'): Promise<Run> {
  const run = await runCrud.runCrud.getVisible(ctx.db, ctx.principal, id, 'write');
  if (run.status !== 'failed' && run.status !== 'cancelled') throw new ConflictError(`Run is ${run.status}: only a failed or cancelled run can be retried`);
  if (!run.agent_id) throw new ConflictError('The agent of this run was deleted; start a new run with another agent');
  const pinned = await versionCrud.getIn(ctx.db, run.agent_id, run.agent_version).catch(() => null);
  // The model is kept when the run named one of its own; otherwise the agent's (maybe changed) model runs.
  const ownModel = pinned && pinned.model !== run.model ? run.model : undefined;
  // The thread's history is the prompt, the input in it unless that message was deleted since (or
  // never written: an enqueued run cancelled while it waited), or is no longer the thread's last
  // turn: then it is appended again (start() decides under the thread's lock), and counted apart in the credit check.
  const inputKept = run.input_message_id !== null && (await isLastTurn(ctx.db, run.thread_id, run.input_message_id));
  const unstoredInput = inputKept ? undefined : (run.input ?? undefined);
  const planned = await plan(ctx, run.owner_id, run.agent_id, ownModel, unstoredInput, [], readEarly(ctx, run.agent_id, run.thread_id));
  return start(ctx, deps, { id: run.thread_id, owner_id: run.owner_id }, planned, { strategy, input: run.input ?? undefined, retried: { inputMessageId: run.input_message_id } });
}

/** Deletes an ended run and its events; its messages stay in the thread. */
export async function remove(ctx: ServiceContext, id: string): Promise<void> {
  const run = await runCrud.runCrud.getVisible(ctx.db, ctx.principal, id, 'write');
  if (!FINAL.has(run.status)) throw new ConflictError(`Run is ${run.status}: cancel it or wait for it to end before deleting it`);
  // Not while its final event is still to be written (its readers wait for it, and would wait for
  // ever): a moment after its end is committed (a cancel, or a scaled run's end before its event
  // reaches Redis), which a client that polled the status and deletes at once meets. Waited for a
  // while; a worker that has not written it by then (its cancel signal lost, say) is answered 409.
  for (const deadline = Date.now() + DELETE_WAIT_MS; ; await delay(DELETE_POLL_MS)) {
    if (await runCrud.removeEnded(ctx.db, run.id)) return;
    if (Date.now() >= deadline) throw new ConflictError(`Run ${run.id} is still ending (its final event is not written yet); try again in a moment`);
  }
}

/** How long a delete waits for an ended run's final event to be written, and how often it looks. */
const DELETE_WAIT_MS = 2_000;
const DELETE_POLL_MS = 100;

/**
 * Whether run `id` is still stored, for its event stream's check while no event comes (its reader's
 * access was checked when the stream opened): a run deleted before its final event was written
 * (with its thread, project or owner) gets none, and its stream ends.
 */
export async function stillStored(db: Db, id: string): Promise<boolean> {
  return (await runCrud.runCrud.getById(db, id)) !== undefined;
}

/**
 * Where a reader of the run's events starts, and whether there is anything left to read; asked
 * before the stream's headers are sent, so an event store that cannot be reached answers 503
 * (RunBusUnavailableError) rather than a stream that ends at once.
 */
export async function eventsFrom(ctx: ServiceContext, deps: RunDeps, id: string, after: number): Promise<{ run: Run; done: boolean }> {
  // Both reads at once; the run's 404 (not the caller's) comes first, before anything of its log is told.
  const lastSeq = deps.bus.events.lastSeq(id);
  lastSeq.catch(() => undefined);
  const run = await get(ctx, id);
  let last = await lastSeq;
  if (!FINAL.has(run.status)) return { run, done: false };
  // An ended run whose final event is still to be written — its lease is held until then (by its
  // worker, or FINAL_EVENT_PENDING for the sweep), whatever the log holds so far (nothing at all
  // when its run.queued could not be appended: a scaled start logs that and goes on): the reader
  // waits for that event, which ends its stream (a reader that had every event so far was answered
  // an empty stream that ended without it).
  if (run.lease_owner !== null) return { run, done: false };
  // The log's top was read alongside the run: it may predate the final event written (and the
  // lease let go) just before the run was read. Nothing new to send is checked against the top now.
  if (after >= last) last = await deps.bus.events.lastSeq(id);
  // Otherwise every run's log has events: an ended run without them had them expire
  // (RUN_EVENTS_TTL_SECONDS). Inventing its final event would need a seq the client may have
  // seen with another event; 410 says plainly that the stream is gone and where the run's state is.
  if (last === 0) throw new GoneError(`The events of run ${run.id} have expired (kept RUN_EVENTS_TTL_SECONDS after a run ends); GET /runs/${run.id} has its final state`);
  // An ended run whose log was read to its end has nothing more to send.
  return { run, done: after >= last };
}

