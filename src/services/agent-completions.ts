/**
 * `agent:<agent_id>` as a model on the OpenAI-compatible surface (SPEC §9): a chat completion runs
 * the agent on a thread — a new one, or the one named in `metadata.thread_id` — and answers from
 * the run's events, as OpenAI's `chat.completion` or its `chat.completion.chunk` stream. The run is
 * an ordinary run (run-service): one active run per thread, billing, cancellation, events.
 *
 * The request's conversation:
 * - the last message must be a `user` message: it is the run's input;
 * - with `metadata.thread_id` the thread holds the history, so earlier messages are not written;
 * - without it, earlier `user` and `assistant` messages start the new thread, in order;
 * - `system`/`developer` messages are refused (400): the agent's owner sets its system prompt, and
 *   a caller's would sit beside it with the same authority (as for messages posted to a thread);
 * - `tool` messages, assistant `tool_calls`, `tools`, `tool_choice` and a JSON `response_format`
 *   are refused (400): the agent calls its own tools and answers in text;
 * - sampling fields (`temperature`, `top_p`, `max_tokens`, `stop`) are ignored: the agent's own
 *   settings apply;
 * - a message's text is held to the thread's rules: at most MAX_MESSAGE_CHARS characters, and no
 *   half of a surrogate pair (400 at `messages[i].content`), which the thread would keep as U+FFFD.
 */
import { randomUUID } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';

import { eq } from 'drizzle-orm';

import { ConflictError, HttpError, NotFoundError, UnauthorizedError, UnprocessableError } from '../core/errors.js';
import type { Logger } from '../core/logger.js';
import { REDIS_COMMAND_TIMEOUT_MS } from '../core/redis.js';

import { type Agent, agents, type Run, type RunUsage } from '../models/index.js';

import { Id } from '../schemas/common.js';
import type { ChatCompletionRequest, ChatMessage } from '../schemas/openai.js';

import { agentCrud } from '../crud/agent.js';
import type { RunEvent } from '../modules/agents/run-bus.js';
import { RunBusUnavailableError } from '../modules/agents/run-bus-errors.js';
import type { RunDeps, RunView } from '../modules/agents/run-lifecycle.js';
import { credentialsWentAway, CREDITS_REFUSED, INTERNAL_RUN_ERROR } from '../modules/agents/runner.js';
import { ModelNotFoundError } from '../modules/ai-models/index.js';
import { hasUnpairedSurrogate, isHighSurrogate, UNPAIRED_SURROGATE_MESSAGE } from '../utils/text.js';
import type { ServiceContext } from './context.js';
import { AGENT_MODEL_PREFIX, CodedOpenAIError, InvalidRequestError, logStreamFailure, openAIErrorOf, openAIUsage } from './openai-gateway.js';
import * as runService from './run-service.js';
import { checkContent } from './thread-service.js';
import { KEY_RATE_LIMITED } from './usage-meter.js';

export const isAgentModel = (model: string): boolean => model.startsWith(AGENT_MODEL_PREFIX);

/** What the OpenAI SDKs are told about a run's outcome: retrying would start another run. */
const NO_RETRY = { 'x-should-retry': 'false' };

/** Between the texts of two steps of one run (text before a tool call, then the answer). */
const STEP_SEPARATOR = '\n\n';

const TITLE_CHARS = 80;

// ==================== Models ====================

/** The caller's agent named by `agent:<id>`; 404 `model_not_found` for anything else (another user's too). */
export async function resolveAgentModel(ctx: ServiceContext, model: string): Promise<Agent> {
  // Parsed as a path's id is (lower case): the lookup by id matches its rows by the database's spelling.
  const id = Id.safeParse(model.slice(AGENT_MODEL_PREFIX.length));
  if (!isAgentModel(model) || !id.success) throw new ModelNotFoundError(model);
  try {
    return await agentCrud.getVisible(ctx.db, ctx.principal, id.data);
  } catch (error) {
    if (error instanceof NotFoundError) throw new ModelNotFoundError(model);
    throw error;
  }
}

export function agentModelObject(agent: Pick<Agent, 'id' | 'created_at'>) {
  return { id: `${AGENT_MODEL_PREFIX}${agent.id}`, object: 'model' as const, created: Math.floor(agent.created_at.getTime() / 1000), owned_by: 'keel-agent' };
}

/** The caller's own agents as models (a project-scoped key: its project's and the unassigned ones), newest first. */
export async function listAgentModels(ctx: ServiceContext) {
  const { principal, settings } = ctx;
  const page = await agentCrud.list(ctx.db, principal, { limit: settings.MAX_AGENTS_PER_USER, offset: 0 }, eq(agents.owner_id, principal.user.id));
  return page.data.map(agentModelObject);
}

// ==================== Starting ====================

type UserContent = Extract<ChatMessage, { role: 'user' }>['content'];
type AssistantContent = Extract<ChatMessage, { role: 'assistant' }>['content'];

function userText(content: UserContent, at: string): string {
  if (typeof content === 'string') return content;
  return content
    .map((part, index) => {
      if (part.type === 'text') return part.text;
      throw new InvalidRequestError('An agent model takes text only: send the image to the agent as a link in the text', `${at}.content[${index}]`);
    })
    .join('');
}

function assistantText(content: AssistantContent): string {
  if (!content) return '';
  return typeof content === 'string' ? content : content.map((part) => (part.type === 'text' ? part.text : part.refusal)).join('');
}

/** One message of the request as a turn of the thread, or 400 naming what an agent model does not take. */
function turnOf(ctx: ServiceContext, message: ChatMessage, index: number): runService.HistoryMessage {
  const at = `messages[${index}]`;
  let turn: runService.HistoryMessage;
  switch (message.role) {
    case 'system':
    case 'developer':
      throw new InvalidRequestError(`An agent model answers with the agent's own system prompt: remove the ${message.role} message, or change the agent's system_prompt`, `${at}.role`);
    case 'tool':
      throw new InvalidRequestError('An agent calls its own tools: send only user and assistant messages to an agent model', `${at}.role`);
    case 'assistant':
      if (message.tool_calls?.length) throw new InvalidRequestError('An agent calls its own tools: send assistant messages without tool_calls to an agent model', `${at}.tool_calls`);
      turn = { role: 'assistant', content: assistantText(message.content) };
      break;
    case 'user':
      turn = { role: 'user', content: userText(message.content, at) };
  }
  const loc = ['body', 'messages', index, 'content'];
  checkContent(ctx, turn.content, loc, { blank: turn.role === 'assistant' });
  // The Text rule of the thread's own routes (schemas/common.ts), which the OpenAI-shaped schema
  // does not apply: half of a surrogate pair was stored as U+FFFD, in the thread and the run's input.
  if (hasUnpairedSurrogate(turn.content)) throw new UnprocessableError({ loc, msg: UNPAIRED_SURROGATE_MESSAGE, type: 'value_error' });
  return turn;
}

/** The run's input (the last message, the user's) and the turns before it. */
function conversationOf(ctx: ServiceContext, messages: readonly ChatMessage[]): { input: string; history: runService.HistoryMessage[] } {
  const turns = messages.map((message, index) => turnOf(ctx, message, index));
  const last = turns.length - 1;
  const input = turns[last]!;
  if (input.role !== 'user') throw new InvalidRequestError('The last message must be a user message: it is what the agent answers', `messages[${last}].role`);
  return { input: input.content, history: turns.slice(0, last) };
}

/** Request fields an agent has its own answer to. */
function refuseAgentOverrides(body: ChatCompletionRequest): void {
  if (body.tools?.length) throw new InvalidRequestError('An agent model calls the agent\'s own tools: remove tools (or change the agent\'s tools)', 'tools');
  if (body.tool_choice !== undefined && body.tool_choice !== null) throw new InvalidRequestError('An agent model calls the agent\'s own tools: remove tool_choice', 'tool_choice');
  if (body.response_format && body.response_format.type !== 'text') throw new InvalidRequestError('An agent model answers in text: remove response_format', 'response_format');
  // The answer is the run's, of steps that may each call another model: no one answer's tokens to give or bias.
  if (body.logprobs) throw new InvalidRequestError('An agent model gives no log probabilities: the answer is its run\'s, over steps of its own. Remove logprobs', 'logprobs');
  if (body.logit_bias && Object.keys(body.logit_bias).length) throw new InvalidRequestError('An agent model takes no logit_bias: the answer is its run\'s, over steps of its own. Remove logit_bias', 'logit_bias');
}

/** The ids of a completion's run and its thread, chosen before the start (completionIds). */
export interface CompletionIds {
  runId: string;
  threadId: string;
  /** Whether the run was made: set as its start returns (the router's openRun), before its first piece is read. */
  started: boolean;
}

/**
 * The ids the completion's run will have, and its thread's (`metadata.thread_id`, or the new
 * thread's): chosen before the start, so that a stream whose head goes out first (a start slower
 * than the heartbeat's interval) still tells them in its headers. 400 for a thread_id that is no
 * UUID, before anything is read.
 */
export function completionIds(body: ChatCompletionRequest): CompletionIds {
  const named = body.metadata?.thread_id;
  if (named === undefined) return { runId: randomUUID(), threadId: randomUUID(), started: false };
  const thread = Id.safeParse(named);
  if (!thread.success) throw new InvalidRequestError('metadata.thread_id must be the id of one of your threads (a UUID)', 'metadata.thread_id');
  return { runId: randomUUID(), threadId: thread.data, started: false };
}

/**
 * Starts the agent's run for a chat completion, with `ids` (completionIds): on the thread
 * `metadata.thread_id` names (404 when the caller may not use it, 409 while another run works on
 * it), or on a new thread the request's earlier messages start. 402 (billing on) when the credits
 * cannot cover the first step.
 */
export async function startAgentCompletion(ctx: ServiceContext, deps: RunDeps, body: ChatCompletionRequest, ids: CompletionIds): Promise<Run> {
  const agent = await resolveAgentModel(ctx, body.model);
  refuseAgentOverrides(body);
  const { input, history } = conversationOf(ctx, body.messages);
  // The answer comes from the run's events: where they cannot be read now (Redis down), a run
  // started would run (and be charged) unseen, behind a 503 the SDKs retry with a run each. 503
  // before anything is written instead; answerOfRun cancels a run whose events fail after this.
  await deps.bus.events.reachable?.();
  if (body.metadata?.thread_id !== undefined) return runService.startOnThread(ctx, deps, ids.threadId, { agent_id: agent.id, input, multitask_strategy: 'reject' }, ids.runId);
  const title = titleOf(history.find((turn) => turn.role === 'user')?.content ?? input);
  return runService.startWithThread(ctx, deps, { agent_id: agent.id, input, thread: { title } }, history, ids);
}

/** A new thread's title: the text on one line, its first TITLE_CHARS characters (a character of two UTF-16 units, an emoji, kept whole). */
function titleOf(text: string): string {
  const line = text.replace(/\s+/g, ' ').trim();
  // Cut inside a surrogate pair, its first half would be stored as U+FFFD.
  const end = isHighSurrogate(line.charCodeAt(TITLE_CHARS - 1)) ? TITLE_CHARS + 1 : TITLE_CHARS;
  return line.slice(0, end);
}

// ==================== Answering ====================

/**
 * What a run's events mean to a chat completion: text as it streams, then the answer and its usage;
 * `diverged` when text already streamed is not what the run goes on to write (answerOf).
 */
export type AnswerPiece = { type: 'text'; text: string } | { type: 'done'; content: string; usage: RunUsage } | { type: 'diverged' };

/** Why a reader of a run's events stopped before the run ended. */
export const CLIENT_LEFT = 'client left';
export const SERVER_CLOSING = 'server closing';
/** The stream's credential no longer authenticates its caller (its key revoked, deleted or expired, its token outdated, its user deactivated). */
export const CREDENTIAL_LOST = 'credential lost';

/**
 * What a completion whose caller's credential went away ends with: the 401 a call made with that
 * credential now gets (the same error, so the same words and headers under /v1: openAIErrorFrom).
 * Not to retry: the run was written.
 */
const unauthenticated = () => new UnauthorizedError(undefined, NO_RETRY);

/**
 * What a stream ends with when its run's answer diverged from the text it streamed: a client of
 * OpenAI's chunks can only append, and what it holds is not what the thread will. Not to retry:
 * the run goes on (a retry would start another); its answer is read where the run is.
 */
const answerDiverged = () =>
  new CodedOpenAIError(
    500,
    'The agent run was interrupted mid-answer and resumed, and its answer no longer continues the text streamed so far; the run goes on: read its answer with GET /api/v1/runs/{run_id} (x-keel-run-id) or its thread',
    'agent_run_resumed',
    NO_RETRY,
  );

/**
 * The text a stream showed of the message being answered, and, once that step's message ended
 * incomplete (its worker stopped; the run resumed elsewhere and redoes the step), how much of it the
 * redo has repeated so far: that text is not sent twice.
 */
class StepText {
  private message: unknown = null;
  private shown = '';
  /** While the redo has not yet repeated all the text shown: what it has repeated. */
  private repeated: string | null = null;

  /** The part of `delta` (of message `id`) that is new to the client, or null when the redo says something else than it was shown. */
  next(id: unknown, delta: string): string | null {
    if (this.repeated === null) {
      const separator = this.message !== null && this.message !== id ? STEP_SEPARATOR : '';
      if (this.message !== id) this.shown = '';
      this.message = id;
      this.shown += delta;
      return separator + delta;
    }
    // The redo goes on from the text shown: no separator, and it is the message whose text is shown now.
    this.message = id;
    const redone = this.repeated + delta;
    if (this.shown.startsWith(redone)) {
      this.repeated = redone.length === this.shown.length ? null : redone;
      return '';
    }
    if (!redone.startsWith(this.shown)) return null;
    const fresh = redone.slice(this.shown.length);
    this.shown = redone;
    this.repeated = null;
    return fresh;
  }

  /**
   * Message `id` ended, `incomplete` or written; false when a written one ends a redo that did not
   * repeat all the text shown (the client holds text the thread does not).
   */
  completed(id: unknown, incomplete: boolean): boolean {
    // Its text was shown (or, for a redo that had not caught up, the earlier attempt's): the next attempt owes all of it.
    if (incomplete && id === this.message && this.shown) this.repeated = '';
    return incomplete || this.repeated === null;
  }
}

/**
 * Reads a run's events (`read` of the run bus, from the start) as answer pieces. Every step's
 * `message.delta` text streams (a step after one that wrote text starts with a blank line); the
 * answer is the run's assistant messages as written (`message.completed`), joined the same way:
 * the streamed text, but for a message that ends incomplete (a run resumed after its worker stopped
 * mid-message: its deltas streamed, its step was never written), which is left out — the answer is
 * what the thread holds. The resumed step's text then streams only past what was shown already
 * (StepText); a redo that says something else ends the text with `diverged` (a stream cannot take
 * text back), and the answer still follows. A failed or cancelled run throws its error; so does a
 * read that `signal` (reason CLIENT_LEFT, CREDENTIAL_LOST or SERVER_CLOSING) ended first.
 */
export async function* answerOf(events: AsyncIterable<RunEvent>, signal: AbortSignal): AsyncGenerator<AnswerPiece> {
  const step = new StepText();
  let diverged = false;
  const written: string[] = [];
  for await (const { event, data } of events) {
    switch (event) {
      case 'message.delta': {
        const delta = typeof data.delta === 'string' ? data.delta : '';
        if (!delta || diverged) break;
        const text = step.next(data.message_id, delta);
        diverged = text === null;
        if (diverged) yield { type: 'diverged' };
        else if (text) yield { type: 'text', text };
        break;
      }
      case 'message.completed': {
        const message = data.message as { id: unknown; role: string; content: string };
        if (message.role !== 'assistant') break;
        const incomplete = data.status === 'incomplete';
        if (!diverged && !step.completed(message.id, incomplete)) {
          diverged = true;
          yield { type: 'diverged' };
        }
        // An incomplete message (its step stopped: the run was resumed) is not in the thread, nor in the answer.
        if (message.content && !incomplete) written.push(message.content);
        break;
      }
      case 'run.completed':
        yield { type: 'done', content: written.join(STEP_SEPARATOR), usage: (data.run as RunView).usage };
        return;
      case 'run.failed': {
        const error = (data.run as RunView).error ?? 'The agent run failed';
        throw refusalOf(error) ?? new CodedOpenAIError(500, error, 'agent_run_failed', NO_RETRY);
      }
      case 'run.cancelled': {
        // Cancelled because its key or user went away (api-key-service, user-service), or by this
        // stream for its credential (the event may come before the read sees the abort): the 401
        // of that credential, whichever came first, not a cancellation's 409.
        const error = (data.run as RunView).error;
        if (signal.reason === CREDENTIAL_LOST || (error !== null && credentialsWentAway(error))) throw unauthenticated();
        throw new CodedOpenAIError(409, 'The agent run was cancelled before it answered', 'agent_run_cancelled', NO_RETRY);
      }
      default:
    }
  }
  if (signal.reason === CREDENTIAL_LOST) throw unauthenticated();
  if (signal.reason === SERVER_CLOSING) {
    throw new CodedOpenAIError(503, 'The server is shutting down; the agent run goes on: read it with GET /api/v1/runs/{run_id} (x-keel-run-id)', 'service_unavailable', NO_RETRY);
  }
  // Nobody reads this answer: the client closed the request.
  throw new CodedOpenAIError(499, 'The client closed the request', 'client_closed_request', NO_RETRY);
}

/**
 * How long a completion's reader goes on trying to read its run's events through a run-bus outage
 * before giving up: a Redis failover or blip of a few seconds (each try waits up to
 * REDIS_COMMAND_TIMEOUT_MS) does not cost the client an answer it was being streamed. The runner
 * hands its run back meanwhile (an outage), and the sweep resumes it.
 */
export const READ_OUTAGE_GRACE_MS = 3 * REDIS_COMMAND_TIMEOUT_MS;
const READ_RETRY_MS = 500;

/** The run's events from the start, read again after the last one seen when the run bus fails, for up to READ_OUTAGE_GRACE_MS of failures in a row. */
async function* eventsThroughOutages(deps: RunDeps, runId: string, signal: AbortSignal): AsyncGenerator<RunEvent> {
  let after = 0;
  let failingSince: number | undefined;
  for (;;) {
    try {
      for await (const event of deps.bus.events.read(runId, after, signal)) {
        after = event.seq;
        failingSince = undefined;
        yield event;
      }
      return;
    } catch (error) {
      if (!(error instanceof RunBusUnavailableError) || signal.aborted) throw error;
      failingSince ??= Date.now();
      if (Date.now() - failingSince >= READ_OUTAGE_GRACE_MS) throw error;
      await sleep(READ_RETRY_MS, undefined, { signal }).catch(() => undefined);
    }
  }
}

/**
 * The answer of the completion's run `runId`, read from its events (answerOf), through a short
 * outage of the run bus (eventsThroughOutages). Events that cannot be read for longer
 * (RunBusUnavailableError, a 503 the OpenAI SDKs retry before a stream's first chunk) cancel the
 * run before the error is answered: nobody would get its answer, yet it would run on and be
 * charged, and each retry would start another one.
 */
export async function* answerOfRun(ctx: ServiceContext, deps: RunDeps, runId: string, signal: AbortSignal): AsyncGenerator<AnswerPiece> {
  try {
    yield* answerOf(eventsThroughOutages(deps, runId, signal), signal);
  } catch (error) {
    if (error instanceof RunBusUnavailableError) await cancelUnanswered(ctx, deps, runId, 'its events could not be read (run bus unreachable)');
    throw error;
  }
}

/**
 * A run whose model call a limit of its caller's refused, answered as the plain models answer the
 * same refusal (402 insufficient_quota; 429 with its retry-after; 401 for a key or user gone), not as a failed run's 500: the
 * run's error says which, in the meter's words. Neither is for the SDK to retry: the run was
 * written (its thread, the user's message, maybe paid steps), and a retry starts another one.
 */
function refusalOf(error: string): HttpError | undefined {
  if (error.startsWith(CREDITS_REFUSED)) return new CodedOpenAIError(402, error, 'insufficient_quota', NO_RETRY);
  // The key was revoked or deleted (or its user) after the request was authenticated: what a call made with it now is answered.
  if (credentialsWentAway(error)) return unauthenticated();
  const wait = KEY_RATE_LIMITED.exec(error)?.[1];
  return wait === undefined ? undefined : new CodedOpenAIError(429, error, 'rate_limit_exceeded', { 'retry-after': wait, ...NO_RETRY });
}

// ==================== OpenAI's shapes ====================

const usageOf = (usage: RunUsage) => openAIUsage(usage.input_tokens, usage.output_tokens, usage.cached_input_tokens, usage.reasoning_tokens);

/** The completion's id names its run: `chatcmpl-<run id>`. */
const completionIdOf = (run: Pick<Run, 'id'>) => `chatcmpl-${run.id}`;
const createdOf = (run: Pick<Run, 'created_at'>) => Math.floor(run.created_at.getTime() / 1000);

/** The `chat.completion` of a finished run, serialized; `metadata` names the thread and the run. */
export function agentCompletionJson(run: Run, model: string, answer: Extract<AnswerPiece, { type: 'done' }>): string {
  return JSON.stringify({
    id: completionIdOf(run),
    object: 'chat.completion',
    created: createdOf(run),
    model,
    choices: [{ index: 0, message: { role: 'assistant', content: answer.content, refusal: null }, finish_reason: 'stop', logprobs: null }],
    usage: usageOf(answer.usage),
    metadata: { thread_id: run.thread_id, run_id: run.id },
  });
}

/**
 * Whether a stream's failure of ours should alert from the stream's log line. Not when the runner
 * has alerted already: a run that failed on a bug is the one failure it logs at error, with the
 * stack (by runId, maybe in a worker process): a second error line for it would be a second alert.
 * Its other failures (the provider's, a timeout, the step limit) it logs at info, so the stream's
 * line is their only error. Nor when the server is closing: the run is handed back and resumes, a
 * planned restart that alerts nobody.
 */
function alertsFromStream(error: unknown): boolean {
  if (!(error instanceof CodedOpenAIError)) return true;
  if (error.code === 'agent_run_failed') return error.detail !== INTERNAL_RUN_ERROR;
  // A resumed run: its worker's end was logged where it happened, and the run goes on.
  return error.code !== 'service_unavailable' && error.code !== 'agent_run_resumed';
}

/** A completion's run once started, and its answer's first piece (the run's first text, or its end), read from `pieces`. */
export interface OpenedRun {
  run: Run;
  pieces: AsyncIterator<AnswerPiece>;
  first: IteratorResult<AnswerPiece>;
}

/**
 * The SSE body of a streamed agent completion, in OpenAI's framing: the role chunk, the text
 * deltas, the finish chunk, the usage chunk (`choices: []`) when `includeUsage`, `data: [DONE]`.
 * The caller awaited `opened` already (so a run that fails to start, or fails before any text,
 * answers a plain HTTP error), or, when the run's start and first piece together took longer than
 * the heartbeat's interval (firstEvent), the promise of it: the answer has begun then, a keep-alive
 * committed it to 200. A failure after that (the start's too) ends the stream with an `error`
 * event, which OpenAI's SDKs raise, and is logged once on `log` (the request's) with `ids` (the
 * run's; for a start refused late those the head told, of a run never made, `runMade: false`: the
 * client has only them to ask about), as the gateway's streams are (logStreamFailure;
 * alertsFromStream for the level).
 */
export async function* agentCompletionChunks(opened: OpenedRun | Promise<OpenedRun>, ids: CompletionIds, model: string, includeUsage: boolean, log: Logger): AsyncGenerator<string> {
  let pieces: AsyncIterator<AnswerPiece> | undefined;
  try {
    const started = await opened;
    const { run } = started;
    pieces = started.pieces;
    const base = { id: completionIdOf(run), object: 'chat.completion.chunk', created: createdOf(run), model };
    const usageField = includeUsage ? { usage: null } : {};
    const frame = (delta: Record<string, unknown>, finish: string | null = null) =>
      `data: ${JSON.stringify({ ...base, choices: [{ index: 0, delta, logprobs: null, finish_reason: finish }], ...usageField })}\n\n`;
    let head = frame({ role: 'assistant', content: '', refusal: null });
    for (let next = started.first; !next.done; next = await pieces.next()) {
      const piece = next.value;
      if (piece.type === 'diverged') throw answerDiverged();
      if (piece.type === 'text') {
        yield head + frame({ content: piece.text });
        head = '';
        continue;
      }
      let tail = head + frame({}, 'stop');
      if (includeUsage) tail += `data: ${JSON.stringify({ ...base, choices: [], usage: usageOf(piece.usage) })}\n\n`;
      yield `${tail}data: [DONE]\n\n`;
      return;
    }
  } catch (error) {
    const { status, body } = openAIErrorOf(error);
    const failure = { model, status, runId: ids.runId, threadId: ids.threadId };
    // A refusal of the start (an HttpError) is thrown before anything is written, or after what was
    // written is undone: its ids name nothing, and the line says so, for an operator who looks them
    // up. Any other failure of the start may have been a commit that took, and a run made (whose
    // answer failed, was cancelled, or left) is a run's failure: logged as the gateway's streams are.
    if (!ids.started && error instanceof HttpError) log.warn({ err: error, ...failure, runMade: false }, 'agent run refused after its stream had begun: the run and thread its headers named were never made');
    else logStreamFailure(log, error, failure, alertsFromStream(error));
    // Alone when no chunk went out (a late first piece that failed): no role chunk for an answer that never came (CompletionFrames.error).
    yield `data: ${JSON.stringify(body)}\n\n`;
  } finally {
    await pieces?.return?.();
  }
}

/**
 * Cancels the run of a completion whose answer nobody will get (its model call is aborted), saying
 * `why`; one that has ended stays as it is.
 */
async function cancelUnanswered(ctx: ServiceContext, deps: RunDeps, runId: string, why: string): Promise<void> {
  try {
    await runService.cancel(ctx, deps, runId);
    ctx.log.info({ runId, why }, 'agent completion not answered: run cancelled');
  } catch (error) {
    if (!(error instanceof ConflictError)) ctx.log.warn({ err: error, runId, why }, 'agent completion not answered: run not cancelled');
  }
}

/** Why a completion's run is left with nobody to answer when its reader stops for a reason: a server closing hands the run back instead. */
const UNREAD: ReadonlyMap<unknown, string> = new Map([
  [CLIENT_LEFT, 'abandoned by its client'],
  [CREDENTIAL_LOST, 'its credential no longer authenticates'],
]);

/**
 * Cancels the run of a completion whose reader stopped for `reason` (its signal's): its client
 * left, or its credential stopped working, so nothing runs (and is charged) for nobody. A server
 * closing cancels nothing: the run is handed back and resumes.
 */
export async function cancelUnread(ctx: ServiceContext, deps: RunDeps, runId: string, reason: unknown): Promise<void> {
  const why = UNREAD.get(reason);
  if (why !== undefined) await cancelUnanswered(ctx, deps, runId, why);
}
