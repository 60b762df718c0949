/**
 * The OpenAI-compatible gateway: translates OpenAI's request shapes into the model manager's one
 * call path (`chat`, `stream`, `embed`) and its results back into OpenAI's answers and stream
 * chunks. Nothing here calls a provider: resolution, retries, fallbacks, timeouts and metering all
 * happen in the manager; this module only reshapes.
 */
import { randomUUID } from 'node:crypto';
import { Readable } from 'node:stream';
import { setImmediate as setImmediatePromise } from 'node:timers/promises';

import { jsonSchema, type JSONSchema7, type ModelMessage, type ToolChoice, type ToolSet } from 'ai';

import { HttpError, MethodNotAllowedError, RouteNotFoundError, UpstreamLoopError } from '../core/errors.js';
import { UPSTREAM_LOOP_CODE } from '../core/hop.js';
import type { Logger } from '../core/logger.js';

import { nestsWithin } from '../schemas/common.js';
import { AGENT_MODEL_PREFIX, type ChatCompletionRequest, type ChatMessage, type EmbeddingRequest, MAX_JSON_DEPTH } from '../schemas/openai.js';

import {
  type CallContext,
  type CallerSignal,
  type ChatRequest,
  type ChatResult,
  CLIENT_FAULT_UPSTREAM,
  type EmbedRequest,
  type EmbedResult,
  type JsonResponseFormat,
  ModelAnswerError,
  ModelAnswerLimitError,
  ModelCallAbortedError,
  ModelCapabilityError,
  ModelDownloadError,
  ModelNotFoundError,
  ModelOptionError,
  type ModelStream,
  ModelTimeoutError,
  ModelValueError,
  ProviderUnavailableError,
  type StreamEvent,
  type TokenUsage,
  type ToolCall,
  UpstreamError,
} from '../modules/ai-models/index.js';
import type { Principal } from '../utils/authentication.js';

// ==================== Errors ====================

/** A request OpenAI's API would refuse with 400; `param` names the field as OpenAI does (`messages[2].tool_call_id`). */
export class InvalidRequestError extends HttpError {
  constructor(
    detail: string,
    readonly param: string | null = null,
  ) {
    super(400, detail);
  }
}

/** An error that names its own OpenAI `code` (an agent run that failed, for one). */
export class CodedOpenAIError extends HttpError {
  constructor(
    statusCode: number,
    detail: string,
    readonly code: string,
    headers: Record<string, string> = {},
  ) {
    super(statusCode, detail, headers);
  }
}

// Where agent-completions.ts has always found it; it lives beside the schema, which bounds agents' messages apart.
export { AGENT_MODEL_PREFIX };

function refuseAgentModel(model: string): void {
  if (model.startsWith(AGENT_MODEL_PREFIX)) throw new ModelNotFoundError(model);
}

// ==================== Requests ====================

export function callContext(principal: Principal): CallContext {
  return { user_id: principal.user.id, api_key_id: principal.apiKeyId, api_key_limits: principal.apiKeyLimits, project_id: principal.scopeProjectId };
}

/**
 * A system, developer or tool message's text: the SDK's messages of those roles hold one text, so
 * its parts are joined, a line apart. OpenAI does not document how it joins them; with nothing
 * between, `["You are helpful.", "Answer briefly."]` read "helpful.Answer", one word to the model.
 * A line break is what vLLM's OpenAI-compatible server puts between a message's text parts when its
 * model takes text (chat_utils: `"\n".join(texts)`).
 */
const textOf = (content: string | { text: string }[]): string => (typeof content === 'string' ? content : content.map((p) => p.text).join('\n'));

/**
 * A tool call's arguments as the call's input: parsed when they are JSON (at most MAX_JSON_DEPTH
 * levels deep: `param` says where, if not); none at all are `{}`, as a call without arguments is
 * read. Text that is no JSON is sent on as text: OpenAI takes any string here, and a client replays
 * a model's own broken arguments (a call cut off by `max_tokens`) with the tool's error — refused,
 * that conversation could not go on. No provider's model sends such text exactly as it came (the
 * openai SDK model sends `{}`, openai-compatible ones a JSON string): docs/decisions.md.
 */
function parseArguments(text: string, param: string): unknown {
  if (!text.trim()) return {};
  let parsed: unknown;
  try {
    parsed = JSON.parse(text) as unknown;
  } catch {
    return text;
  }
  if (!nestsWithin(parsed, MAX_JSON_DEPTH)) throw new InvalidRequestError(`Invalid value for ${param}: nested deeper than ${MAX_JSON_DEPTH} levels`, param);
  return parsed;
}

/**
 * An image part; its `detail` as the openai provider's SDK model takes it (dropped, `low` cost the
 * client the tokens of `auto`). Anthropic and Google have no such setting; openai-compatible
 * servers may, but the SDK's model for them has no slot for it, so it is not sent to them.
 */
const imagePart = ({ url, detail }: { url: string; detail?: 'auto' | 'low' | 'high' | null }) => ({
  type: 'image' as const,
  image: url,
  ...(detail ? { providerOptions: { openai: { imageDetail: detail } } } : {}),
});

/**
 * A message's participant name (OpenAI's `name`), where the SDK's openai-compatible model reads a
 * message's own fields (`providerOptions.openaiCompatible`, spread into the message it sends) and
 * the wire reads it too (wireMessages). The SDK's openai model has no such slot, nor do Anthropic's
 * and Google's APIs: for them it is dropped (docs/decisions.md).
 */
const participant = (name: string) => ({ openaiCompatible: { name } });

/** A user message with its name: a single text is read from its part (the SDK's converter), parts from the message. */
function namedUser(content: UserContent, name: string): ModelMessage {
  const providerOptions = participant(name);
  if (content.length === 1 && content[0]!.type === 'text') return { role: 'user', content: [{ ...content[0]!, providerOptions }], providerOptions };
  return { role: 'user', content, providerOptions };
}

type UserContent = Exclude<Extract<ModelMessage, { role: 'user' }>['content'], string>;

/** OpenAI's messages as the AI SDK's; a tool result names its tool through the assistant's earlier call. */
function toModelMessages(messages: readonly ChatMessage[]): ModelMessage[] {
  // Made by the first tool call: most requests have none, and an empty Map is ~200 bytes a call.
  let toolNames: Map<string, string> | undefined;
  return messages.map((message, index): ModelMessage => {
    switch (message.role) {
      case 'system':
      case 'developer':
        if (message.name) return { role: 'system', content: textOf(message.content), providerOptions: participant(message.name) };
        return { role: 'system', content: textOf(message.content) };
      case 'user': {
        const { content, name } = message;
        if (typeof content === 'string') return name ? namedUser([{ type: 'text', text: content }], name) : { role: 'user', content };
        const parts: UserContent = content.map((part) => (part.type === 'text' ? { type: 'text' as const, text: part.text } : imagePart(part.image_url)));
        return name ? namedUser(parts, name) : { role: 'user', content: parts };
      }
      case 'assistant': {
        const named = message.name ? { providerOptions: participant(message.name) } : undefined;
        // A refusal echoed back as it was answered (content null, `refusal`) is what the assistant
        // said: the SDK's messages have no part for it, and dropped, the model would not know it refused.
        const text = !message.content ? (message.refusal ?? '') : typeof message.content === 'string' ? message.content : message.content.map((p) => (p.type === 'text' ? p.text : p.refusal)).join('');
        const calls = message.tool_calls ?? [];
        if (!calls.length) return { role: 'assistant', content: text, ...named };
        toolNames ??= new Map();
        for (const call of calls) toolNames.set(call.id, call.function.name);
        return {
          role: 'assistant',
          ...named,
          content: [
            ...(text ? [{ type: 'text' as const, text }] : []),
            ...calls.map((call, i) => ({
              type: 'tool-call' as const,
              toolCallId: call.id,
              toolName: call.function.name,
              input: parseArguments(call.function.arguments, `messages[${index}].tool_calls[${i}].function.arguments`),
            })),
          ],
        };
      }
      case 'tool': {
        const toolName = toolNames?.get(message.tool_call_id);
        if (toolName === undefined) {
          throw new InvalidRequestError(`No assistant tool call with id ${message.tool_call_id} precedes this tool message`, `messages[${index}].tool_call_id`);
        }
        return {
          role: 'tool',
          content: [{ type: 'tool-result', toolCallId: message.tool_call_id, toolName, output: { type: 'text', value: textOf(message.content) } }],
        };
      }
    }
  });
}

const EMPTY_PARAMETERS: JSONSchema7 = { type: 'object', properties: {} };

/**
 * The tools by name, in an object without a prototype: a function may be called `__proto__` or
 * `constructor` and must stay an entry of its own. Two functions of one name are refused, as
 * OpenAI refuses invalid tools: one would silently replace the other.
 */
function toTools(tools: ChatCompletionRequest['tools']): ToolSet | undefined {
  if (!tools?.length) return undefined;
  const set = Object.create(null) as ToolSet;
  tools.forEach(({ function: fn }, index) => {
    if (Object.hasOwn(set, fn.name)) throw new InvalidRequestError(`tools has two functions named ${fn.name}; each needs a name of its own`, `tools[${index}].function.name`);
    set[fn.name] = {
      description: fn.description ?? undefined,
      inputSchema: jsonSchema((fn.parameters as JSONSchema7 | null | undefined) ?? EMPTY_PARAMETERS),
      // Structured outputs for the call's arguments (the openai SDK's zodFunction sets it): dropped, the provider would not hold the model to the schema.
      strict: fn.strict ?? undefined,
    };
  });
  return set;
}

/** The schema has checked that a function named here is one of `tools`. */
function toToolChoice(choice: ChatCompletionRequest['tool_choice']): ToolChoice<ToolSet> | undefined {
  if (choice === null || choice === undefined) return undefined;
  if (typeof choice === 'string') return choice;
  return { type: 'tool', toolName: choice.function.name };
}

function toResponseFormat(format: ChatCompletionRequest['response_format']): JsonResponseFormat | undefined {
  if (!format || format.type === 'text') return undefined;
  if (format.type === 'json_object') return { type: 'json' };
  const { name, description, schema, strict } = format.json_schema;
  // OpenAI's default: a schema is strict only when the request says so.
  return { type: 'json', name, description, schema: schema as JSONSchema7 | undefined, strict: strict ?? false };
}

const orUndefined = <T>(value: T | null | undefined): T | undefined => value ?? undefined;

export function toChatRequest(body: ChatCompletionRequest, context: CallContext, signal: CallerSignal, hops?: readonly string[]): ChatRequest {
  refuseAgentModel(body.model);
  const tools = toTools(body.tools);
  const stop = body.stop;
  return {
    model: body.model,
    messages: toModelMessages(body.messages),
    tools,
    toolChoice: toToolChoice(body.tool_choice),
    maxOutputTokens: orUndefined(body.max_completion_tokens ?? body.max_tokens),
    temperature: orUndefined(body.temperature),
    topP: orUndefined(body.top_p),
    frequencyPenalty: orUndefined(body.frequency_penalty),
    presencePenalty: orUndefined(body.presence_penalty),
    seed: orUndefined(body.seed),
    reasoningEffort: orUndefined(body.reasoning_effort),
    parallelToolCalls: orUndefined(body.parallel_tool_calls),
    user: orUndefined(body.user),
    promptCacheKey: orUndefined(body.prompt_cache_key),
    promptCacheRetention: orUndefined(body.prompt_cache_retention),
    safetyIdentifier: orUndefined(body.safety_identifier),
    logprobs: body.logprobs === true ? true : undefined,
    topLogprobs: orUndefined(body.top_logprobs),
    // An empty bias is none (as the agent path reads it): nothing to refuse for a provider without it.
    logitBias: body.logit_bias && Object.keys(body.logit_bias).length ? body.logit_bias : undefined,
    verbosity: orUndefined(body.verbosity),
    prediction: orUndefined(body.prediction),
    stopSequences: !stop ? undefined : typeof stop === 'string' ? [stop] : stop,
    responseFormat: toResponseFormat(body.response_format),
    // A streamed answer goes to the client as its events; the result is read only for the usage and finish reason.
    keepAnswer: body.stream !== true,
    // OpenAI's clients wait as a Retry-After says: a provider's long one is theirs to wait out.
    interactive: true,
    signal,
    context,
    hops,
  };
}

export function toEmbedRequest(body: EmbeddingRequest, context: CallContext, signal: CallerSignal, hops?: readonly string[]): EmbedRequest {
  refuseAgentModel(body.model);
  return {
    model: body.model,
    values: typeof body.input === 'string' ? [body.input] : body.input,
    dimensions: orUndefined(body.dimensions),
    user: orUndefined(body.user),
    interactive: true,
    signal,
    context,
    hops,
  };
}

// ==================== Answers ====================

const FINISH_REASONS: Record<string, string> = { stop: 'stop', length: 'length', 'tool-calls': 'tool_calls', 'content-filter': 'content_filter' };

/**
 * `tool_calls` whenever the answer holds tool calls (some providers say `stop` with them), except
 * when it was cut off (`length`) or filtered: as OpenAI answers then, so that a client does not run
 * a call whose arguments were cut short (the openai SDK's parse() raises LengthFinishReasonError).
 * Never without one: a server that could not parse the model's call says `tool_calls` over plain
 * text, and a client that reads the calls then finds no `tool_calls` to read.
 */
function finishReason(result: ChatResult): string {
  const reason = FINISH_REASONS[result.finishReason];
  if (result.toolCalls.length && reason !== 'length' && reason !== 'content_filter') return 'tool_calls';
  return reason && reason !== 'tool_calls' ? reason : 'stop';
}

/** OpenAI's `usage` object from token counts (a model call's, or a whole agent run's). */
export function openAIUsage(input: number, output: number, cached: number, reasoning: number) {
  return {
    prompt_tokens: input,
    completion_tokens: output,
    total_tokens: input + output,
    prompt_tokens_details: { cached_tokens: cached },
    completion_tokens_details: { reasoning_tokens: reasoning },
  };
}

const toolCallOut = (call: ToolCall) => ({
  id: call.toolCallId,
  type: 'function' as const,
  // The model's own text where the provider gave it (OpenAI hands it on as it came): a parse's re-serialization changes integers past 2^53.
  function: { name: call.toolName, arguments: call.text ?? (typeof call.input === 'string' ? call.input : JSON.stringify(call.input ?? {})) },
});

/** `chatcmpl-` and a random UUID's 32 hex digits (cut around its dashes: half the cost of replaceAll on every answer). */
export function completionId(): string {
  const uuid = randomUUID();
  return `chatcmpl-${uuid.slice(0, 8)}${uuid.slice(9, 13)}${uuid.slice(14, 18)}${uuid.slice(19, 23)}${uuid.slice(24)}`;
}
const now = () => Math.floor(Date.now() / 1000);

/** A number as JSON writes it (non-finite ones as null). */
const jsonNumber = (n: number): string => (Number.isFinite(n) ? String(n) : 'null');

/** `openAIUsage(...)` of a call's tokens, serialized: the same keys in the same order. */
function usageJson(usage: TokenUsage): string {
  return (
    `{"prompt_tokens":${jsonNumber(usage.input)},"completion_tokens":${jsonNumber(usage.output)},"total_tokens":${jsonNumber(usage.input + usage.output)},` +
    `"prompt_tokens_details":{"cached_tokens":${jsonNumber(usage.cached_input)}},"completion_tokens_details":{"reasoning_tokens":${jsonNumber(usage.reasoning)}}}`
  );
}

/**
 * The `chat.completion` object, serialized (the hot path skips the response schema's serializer):
 * a template with OpenAI's key order, JSON.stringify only for the strings and tool calls that come
 * from the model — what JSON.stringify of the whole object writes (test/unit/openai-completion-json.test.ts),
 * without building that object and walking it on every call.
 */
export function completionJson(result: ChatResult): string {
  const calls = result.toolCalls;
  const { refusal } = result;
  // A refusal is in `refusal`, its content null, as OpenAI answers it: the openai SDK's parse() then
  // hands it back rather than parsing it as the JSON asked for.
  const content = result.text ? JSON.stringify(result.text) : calls.length || refusal ? 'null' : '""';
  const toolCalls = calls.length ? `,"tool_calls":${JSON.stringify(calls.map(toolCallOut))}` : '';
  // As a stream's `reasoning_content` deltas carry it (and the servers that reason write it): left out, only streams had it.
  const reasoning = result.reasoningText ? `,"reasoning_content":${JSON.stringify(result.reasoningText)}` : '';
  return (
    `{"id":"${completionId()}","object":"chat.completion","created":${now()},"model":${JSON.stringify(result.model)},` +
    `"choices":[{"index":0,"message":{"role":"assistant","content":${content}${reasoning},"refusal":${refusal ? JSON.stringify(refusal) : 'null'}${toolCalls}},"finish_reason":"${finishReason(result)}","logprobs":${result.logprobs ? JSON.stringify(result.logprobs) : 'null'}}],` +
    `"usage":${usageJson(result.usage)}}`
  );
}

/**
 * OpenAI's chunk framing of one streamed completion: a first chunk with the role, content
 * (or refusal) deltas, one chunk per tool call, a chunk with the finish reason, the usage chunk when asked for
 * (`choices: []`; every earlier chunk then says `usage: null`), then `data: [DONE]`. Every chunk
 * names `model`, the one that answered (see openStream). An error after the first chunk is an
 * `error` event, which OpenAI's SDKs raise.
 */
export class CompletionFrames {
  private readonly id = completionId();
  private readonly created = now();
  private readonly usageField: string;
  /**
   * What every chunk of this completion begins with (`data: {"id":…,"model":…`), made once per
   * model: rebuilt by every chunk, its ~7 joins were ~200 bytes of intermediate strings a chunk.
   */
  private chunkStart: string;
  private toolIndex = 0;
  /** The role's chunk, until it goes out before the first event's. */
  private head: string;

  constructor(
    private answering: string,
    private readonly includeUsage: boolean,
  ) {
    this.usageField = includeUsage ? ',"usage":null' : '';
    this.chunkStart = this.startOfChunks(answering);
    this.head = this.frame({ role: 'assistant', content: '', refusal: null });
  }

  get model(): string {
    return this.answering;
  }

  /** The model the first event named, when the answer began before it (a late first event: see openStream). */
  answeredBy(model: string): void {
    if (model === this.answering || !this.head) return;
    this.answering = model;
    this.chunkStart = this.startOfChunks(model);
    this.head = this.frame({ role: 'assistant', content: '', refusal: null });
  }

  /** The frames of one event; `finish` ends the body (its finish reason, the usage, `[DONE]`). */
  render(event: StreamEvent): string {
    let out = this.takeHead();
    if (event.type === 'text-delta') return out + this.frame({ content: event.text }, null, event.logprobs && { content: event.logprobs, refusal: null });
    if (event.type === 'reasoning-delta') return out + this.frame({ reasoning_content: event.text });
    if (event.type === 'refusal-delta') return out + this.frame({ refusal: event.text }, null, event.logprobs && { content: null, refusal: event.logprobs });
    if (event.type === 'tool-call') return out + this.frame({ tool_calls: [{ index: this.toolIndex++, ...toolCallOut(event.toolCall) }] });
    const { result } = event;
    out += this.frame({}, finishReason(result));
    if (this.includeUsage) out += `${this.chunkStart},"choices":[],"usage":${usageJson(result.usage)}}\n\n`;
    return `${out}data: [DONE]\n\n`;
  }

  /**
   * The `error` event that ends a body after a failure; alone when no chunk went out (a first
   * event that failed after a keep-alive): the role chunk opens an answer, and sent before the
   * error the openai package yielded it (its ChatCompletionStream an empty assistant message)
   * before raising, where a failure before any chunk raises on the first read, as an HTTP error does.
   */
  error(body: OpenAIErrorBody): string {
    return `data: ${JSON.stringify(body)}\n\n`;
  }

  private startOfChunks(model: string): string {
    return `data: {"id":"${this.id}","object":"chat.completion.chunk","created":${this.created},"model":${JSON.stringify(model)}`;
  }

  private takeHead(): string {
    const head = this.head;
    this.head = '';
    return head;
  }

  /** A chunk; `logprobs`: its text's token log probabilities, when asked for. */
  private frame(delta: unknown, finish: string | null = null, logprobs?: unknown): string {
    return `${this.chunkStart},"choices":[{"index":0,"delta":${JSON.stringify(delta)},"logprobs":${logprobs ? JSON.stringify(logprobs) : 'null'},"finish_reason":${finish === null ? 'null' : `"${finish}"`}}]${this.usageField}}\n\n`;
  }
}

/** What a stream's failure is logged with besides the error: the model, the status it answers, and an agent stream's run and thread. */
export interface StreamFailure {
  model: string;
  status: number;
  runId?: string;
  threadId?: string;
}

/**
 * A stream's failure after its first chunk, once: `error` for ours or the provider's (an upstream
 * that failed or cut the answer off, a timeout, a bug), `warn` for the client's doing (a request the
 * provider refused as malformed, a client that went away), so an operator's error alerts do not
 * fire on disconnects. The error and `failure` only: never the messages. `alert: false` is a
 * caller's word that a failure of ours must not alert from this line (it has alerted elsewhere, or
 * is no fault: the agent streams, services/agent-completions.ts): then it too is a warning.
 */
export function logStreamFailure(log: Logger, error: unknown, failure: StreamFailure, alert = true): void {
  const fields = { err: error, ...failure };
  if (isClientsDoing(error, failure.status)) log.warn(fields, 'chat completion stream ended early by the client or its request');
  else if (alert) log.error(fields, 'chat completion stream failed after its first chunk');
  else log.warn(fields, 'chat completion stream failed after its first chunk');
}

function isClientsDoing(error: unknown, status: number): boolean {
  return (
    error instanceof ModelCallAbortedError ||
    (error instanceof UpstreamError ? error.upstreamStatus !== undefined && CLIENT_FAULT_UPSTREAM.has(error.upstreamStatus) : status < 500)
  );
}

/**
 * The SSE body of a streamed completion: `first` (which the caller has already taken, so that
 * errors before any output were answered as plain HTTP errors) and the rest of `events`, framed.
 * The frames are rendered as the events are read, no async layer between: a streamed call's every
 * event passes here. The first frame goes out at once (time to first chunk); frames produced after
 * it in the same turn of the event loop (an upstream read usually carries several) go out together
 * in one write, since every write on a socket is a system call — on loopback the costliest part of
 * a streamed answer; with `response`, the last frames and the end of the body go out together too.
 * A silence of the model's gets a keep-alive comment from the heartbeat, if any (late first event:
 * the body starts with one); its timer is stopped however the body ends.
 * An error after the first chunk ends the body with an `error` event and is logged on `log` (the
 * request's): the 200 has been sent by then, so the app's error handler never sees it. Honours
 * backpressure; destroying the body (the client went away) returns the events' iterator, which
 * aborts the upstream request.
 */
export function completionBody(
  opened: OpenedStream,
  frames: CompletionFrames,
  log: Logger,
  response?: { cork(): void; uncork(): void },
): Readable {
  const { events, first, heartbeat } = opened;
  let pending = '';
  let scheduled = false;
  let started = false;
  let wanted: (() => void) | undefined;
  const body = new Readable({
    read() {
      wanted?.();
      wanted = undefined;
      if (!started) {
        started = true;
        // Anything that escapes the pump (a bug) ends the body rather than the process.
        pump().catch((error: unknown) => body.destroy(error as Error));
      }
    },
    destroy(error, callback) {
      heartbeat?.stop();
      // Stops the call; a pump waiting for room goes on, to see that the body is gone.
      void events.return?.()?.catch(() => undefined);
      wanted?.();
      callback(error);
    },
  });
  const flush = () => {
    scheduled = false;
    if (pending && !body.destroyed) body.push(pending);
    pending = '';
  };
  const send = (text: string) => {
    pending += text;
    if (!scheduled) {
      scheduled = true;
      setImmediate(flush);
    }
  };
  const write = (frame: string) => {
    if (heartbeat) heartbeat.busy = true;
    send(frame);
    // A batch is pushed once it fills the body: the check below for room sees it, so a reader that
    // takes nothing does not have every event its queues hold (hundreds of parts, up to megabytes)
    // rendered and sent to its socket in one turn.
    if (pending.length >= body.readableHighWaterMark) flush();
  };
  // Late, the answer begins with the comment its lateness is owed.
  if (first instanceof Promise) body.push(KEEP_ALIVE);
  heartbeat?.onSilence(() => send(KEEP_ALIVE));
  async function pump(): Promise<void> {
    try {
      let next = first instanceof Promise ? await first : first;
      if (first instanceof Promise && !next.done) frames.answeredBy(answeringModel(opened.stream, next, frames.model));
      for (const head = next; !next.done; next = await events.next()) {
        if (body.destroyed) break;
        const frame = frames.render(next.value);
        if (next === head && !scheduled) body.push(frame);
        else write(frame);
        if (next.value.type === 'finish') break;
        // A slow reader: wait until it has taken what is buffered.
        if (body.readableLength >= body.readableHighWaterMark) await new Promise<void>((resolve) => (wanted = resolve));
      }
    } catch (error) {
      const { status, body: errorBody } = openAIErrorOf(error);
      logStreamFailure(log, error, { model: frames.model, status });
      write(frames.error(errorBody));
    } finally {
      heartbeat?.stop();
      await events.return?.();
    }
    if (body.destroyed) return;
    // The last frames and the end of the chunked body in one write: the response's own end()
    // would otherwise send its terminator in a write of its own, a tick later.
    response?.cork();
    flush();
    body.push(null);
    if (response) setImmediate(() => response.uncork());
  }
  return body;
}

/**
 * Starts a stream and waits for its first event: failures before any output throw here, and are
 * answered with their own status (a 429, a 502). `model` is the one that answered (a fallback,
 * maybe; an alias resolved), which every chunk names, as the non-streamed answer does: retries and
 * fallbacks end with the first event. With a heartbeat (GATEWAY_STREAM_HEARTBEAT_MS), it waits that
 * long at most: a first event later than that is the body's to await, after a keep-alive has
 * committed the answer to 200 (a proxy's idle timeout would cut a model that thinks long), and
 * a failure then is the stream's error event. The heartbeat's one timer goes on to the body.
 */
export async function openStream(stream: ModelStream, requestedModel: string, heartbeatMs = 0): Promise<OpenedStream> {
  const events = stream[Symbol.asyncIterator]();
  const { first, heartbeat } = await firstEvent(events.next(), heartbeatMs);
  const model = first instanceof Promise ? (stream.model ?? requestedModel) : answeringModel(stream, first, requestedModel);
  return { stream, events, first, model, heartbeat };
}

/**
 * A stream's first event (`next`, its iterator's first next()) as a stream's answer waits for it,
 * for the catalog's streams (openStream) and the agents' (routers/openai-agents.ts: the run's
 * start and its first piece, one wait, so that a slow start is bridged as well) alike. Without
 * a heartbeat (`heartbeatMs` 0): the event, or its failure thrown, before any byte. With one: the
 * same within the interval (a fast 402, 429 or 502 keeps its own status, and the timer is stopped);
 * later than that, `first` is the promise of it, the body's to await after the keep-alive that
 * commits the answer to 200 (a failure then is the stream's error event), and the heartbeat's one
 * timer goes on to the body, which stops it however it ends (keptAlive, completionBody).
 */
export function firstEvent<T>(next: Promise<T>, heartbeatMs: number): Promise<{ first: T | Promise<T>; heartbeat: Heartbeat | undefined }> {
  if (!heartbeatMs) return next.then((first) => ({ first, heartbeat: undefined }));
  return new Promise((resolve, reject) => {
    let settled = false;
    // Late: the answer begins with a keep-alive, and the first event (or failure) is the body's to await.
    const heartbeat = new Heartbeat(heartbeatMs, () => {
      if (settled) return;
      settled = true;
      resolve({ first: next, heartbeat });
    });
    next.then(
      (first) => {
        if (settled) return;
        settled = true;
        resolve({ first, heartbeat });
      },
      (error: Error) => {
        if (settled) return; // the body's now: an error event
        settled = true;
        heartbeat.stop();
        reject(error);
      },
    );
  });
}

/**
 * An SSE body of `chunks` (each a whole number of events, pushed as it comes, honouring
 * backpressure) kept busy by `heartbeat`: a `: keep-alive` comment on each silence (and first,
 * when the first event was late: `late`). The heartbeat is stopped however the body ends (the
 * chunks end, or the body is destroyed: the client went away, which returns `chunks`). The
 * agents' streams' body; the catalog's has its own (completionBody), which renders and batches
 * the model manager's events as it reads them.
 */
export function keptAlive(chunks: AsyncGenerator<string>, heartbeat: Heartbeat | undefined, late: boolean): Readable {
  let reading = false;
  const body = new Readable({
    read() {
      if (!reading) void pull();
    },
    destroy(error, callback) {
      heartbeat?.stop();
      void chunks.return(undefined).catch(() => undefined);
      callback(error);
    },
  });
  if (late) body.push(KEEP_ALIVE);
  heartbeat?.onSilence(() => {
    if (!body.destroyed) body.push(KEEP_ALIVE);
  });
  async function pull(): Promise<void> {
    reading = true;
    try {
      for (;;) {
        const next = await chunks.next();
        if (body.destroyed) return;
        if (next.done) {
          heartbeat?.stop();
          body.push(null);
          return;
        }
        if (heartbeat) heartbeat.busy = true;
        if (!body.push(next.value)) return;
      }
    } catch (error) {
      body.destroy(error as Error);
    } finally {
      reading = false;
    }
  }
  return body;
}

/** The model a stream's events name: its first event's (a finish: the result's), else the one asked for. */
function answeringModel(stream: ModelStream, first: IteratorResult<StreamEvent>, requestedModel: string): string {
  return !first.done && first.value.type === 'finish' ? first.value.result.model : (stream.model ?? requestedModel);
}

/** A streamed completion as openStream hands it to completionBody. */
export interface OpenedStream {
  stream: ModelStream;
  events: AsyncIterator<StreamEvent>;
  /**
   * The first event; or, when it was later than the heartbeat's interval, the promise of it: the
   * answer (200) then begins with a keep-alive, and a failure is its error event.
   */
  first: IteratorResult<StreamEvent> | Promise<IteratorResult<StreamEvent>>;
  /** The model the first event names (see answeringModel); for a late one, the one asked for until it comes. */
  model: string;
  heartbeat: Heartbeat | undefined;
}

/** The SSE comment a silent stream sends (GATEWAY_STREAM_HEARTBEAT_MS); the openai package's parser skips comments. */
export const KEEP_ALIVE = ': keep-alive\n\n';

/**
 * A streamed answer's one timer: it fires `ms` after the call began (the first event is late) and
 * then every `ms`, calling its listener unless something went out since the last beat (`busy`,
 * set per write: no timer work per event). A silence is so bridged within two intervals. Re-armed
 * with refresh(), never recreated; stop() clears it, on every end of the stream.
 */
export class Heartbeat {
  /** Something went out since the last beat: the next one is skipped. */
  busy = false;
  private readonly timer: NodeJS.Timeout;

  constructor(
    ms: number,
    private listener: () => void,
  ) {
    this.timer = setTimeout(() => this.beat(), ms);
  }

  /** From now on, `listener` on each silent interval (the body's keep-alive), counted from now. */
  onSilence(listener: () => void): void {
    this.listener = listener;
    this.busy = false;
    this.timer.refresh();
  }

  stop(): void {
    clearTimeout(this.timer);
  }

  private beat(): void {
    this.timer.refresh();
    if (this.busy) this.busy = false;
    else this.listener();
  }
}

/**
 * An embeddings answer written whole in one piece up to this many values (~1 MB of JSON numbers);
 * past it, in pieces of about this size with the event loop free between them (`embeddingsAnswer`).
 */
const EMBEDDINGS_PIECE_VALUES = 64 * 1024;

/**
 * Embeddings as float arrays, or base64 of little-endian float32 values as OpenAI sends them: one
 * string, or for a large answer a stream of pieces made as the client reads them. 2,048 vectors of
 * 3,072 dimensions are ~130 MB of JSON numbers (~2 s to write) or 34 MB of base64: written in one
 * go they held the event loop (every other request) that long, and the whole text in memory.
 */
export function embeddingsAnswer(result: EmbedResult, format: 'float' | 'base64' | null | undefined): string | Readable {
  const values = result.embeddings.reduce((n, vector) => n + vector.length, 0);
  if (values <= EMBEDDINGS_PIECE_VALUES) return [...embeddingsJson(result, format, Infinity)].join('');
  // Readable.from asks for the next piece only once the socket has taken the last: a slow client holds nothing more.
  return Readable.from(
    (async function* pieces() {
      for (const piece of embeddingsJson(result, format, EMBEDDINGS_PIECE_VALUES)) {
        yield piece;
        await setImmediatePromise(); // the other requests' turn
      }
    })(),
    { objectMode: false },
  );
}

/** The answer's JSON in pieces of about `pieceValues` values each. */
function* embeddingsJson(result: EmbedResult, format: 'float' | 'base64' | null | undefined, pieceValues: number): Generator<string> {
  let piece = '{"object":"list","data":[';
  let inPiece = 0;
  for (const [index, vector] of result.embeddings.entries()) {
    const embedding = format === 'base64' ? Buffer.from(vector.buffer, vector.byteOffset, vector.byteLength).toString('base64') : shortestFloats(vector);
    piece += `${index ? ',' : ''}${JSON.stringify({ object: 'embedding', index, embedding })}`;
    inPiece += vector.length;
    if (inPiece >= pieceValues) {
      yield piece;
      piece = '';
      inPiece = 0;
    }
  }
  const usage = { prompt_tokens: result.usage.input, total_tokens: result.usage.input };
  yield `${piece}],"model":${JSON.stringify(result.model)},"usage":${JSON.stringify(usage)}}`;
}

/** Powers of ten that are exact doubles (10^22 is the last). */
const EXACT_POWERS_OF_TEN = Array.from({ length: 23 }, (_, i) => 10 ** i);

/**
 * A vector's values as the doubles of the shortest decimals that read back to the same float32
 * values, for JSON.stringify to write: what OpenAI's API writes (0.008608307), where the doubles
 * of the float32 values were written with the 17 digits a double needs (0.008608306758105755),
 * ~1.7 times the JSON. JSON.stringify of the whole array writes each double's own shortest form,
 * which is then that decimal. Found with toPrecision value by value it cost ~10 times the array's
 * JSON.stringify; rounded at a power of ten as here, 1.2 to 2.4 times (measured: the commit that
 * made it), for JSON ~40 % shorter to send and for the client to parse.
 */
export function shortestFloats(vector: Float32Array): number[] {
  const out = new Array<number>(vector.length);
  for (let i = 0; i < vector.length; i++) out[i] = shortestFloat(vector[i]!);
  return out;
}

/**
 * The decimal of the fewest significant digits (1 to 9) that is nearest to `value` (a float32) and
 * reads back to it, as a double. A model's values (|value| < 1) need 6 to 9 digits: 8 is tried
 * first, then fewer while they still read back (more digits are nearer, so what 8 misses only 9
 * can hit). Rounding at 10^s is exact for 0 ≤ s ≤ 22: the integer and the power are exact doubles,
 * and one division rounds correctly; other magnitudes (below 1e-15, from 1e8 up) take toPrecision.
 */
function shortestFloat(value: number): number {
  if (value === 0 || !Number.isFinite(value)) return value; // JSON.stringify writes 0 and null
  const exponent = Math.floor(Math.log10(value < 0 ? -value : value));
  let scale = 7 - exponent; // 8 significant digits
  if (scale < 0 || scale > 21) return shortestByPrecision(value);
  let best = Math.round(value * EXACT_POWERS_OF_TEN[scale]!) / EXACT_POWERS_OF_TEN[scale]!;
  if (Math.fround(best) !== value) {
    const nine = Math.round(value * EXACT_POWERS_OF_TEN[scale + 1]!) / EXACT_POWERS_OF_TEN[scale + 1]!;
    return Math.fround(nine) === value ? nine : shortestByPrecision(value);
  }
  for (scale--; scale >= 0; scale--) {
    const fewer = Math.round(value * EXACT_POWERS_OF_TEN[scale]!) / EXACT_POWERS_OF_TEN[scale]!;
    if (Math.fround(fewer) !== value) return best;
    best = fewer;
  }
  return best;
}

function shortestByPrecision(value: number): number {
  for (let digits = 1; digits < 9; digits++) {
    const decimal = Number(value.toPrecision(digits));
    if (Math.fround(decimal) === value) return decimal;
  }
  return Number(value.toPrecision(9));
}

export function modelObject(id: string, provider: string) {
  return { id, object: 'model' as const, created: CATALOG_CREATED, owned_by: provider };
}

/** The catalog has no creation times: every model says when this process loaded it. */
const CATALOG_CREATED = now();

// ==================== Error objects ====================

export interface OpenAIErrorBody {
  error: { message: string; type: string; param: string | null; code: string | null };
}

interface Described {
  status: number;
  body: OpenAIErrorBody;
  /** Headers the answer needs beyond the app handler's (an upstream's retry-after). */
  headers?: Record<string, string>;
}

const TYPES: Record<number, [type: string, code: string | null]> = {
  400: ['invalid_request_error', null],
  401: ['invalid_request_error', 'invalid_api_key'],
  402: ['insufficient_quota', 'insufficient_quota'],
  403: ['invalid_request_error', 'permission_denied'],
  404: ['invalid_request_error', 'not_found'],
  405: ['invalid_request_error', 'method_not_allowed'],
  409: ['invalid_request_error', 'conflict'],
  413: ['invalid_request_error', 'request_too_large'],
  429: ['requests', 'rate_limit_exceeded'],
  502: ['server_error', 'upstream_error'],
  503: ['server_error', 'service_unavailable'],
  504: ['server_error', 'timeout'],
};

const error = (status: number, message: string, param: string | null = null, code?: string | null): Described => {
  const [type, defaultCode] = TYPES[status] ?? (status >= 500 ? ['server_error', null] : ['invalid_request_error', null]);
  return { status, body: { error: { message, type, param, code: code === undefined ? defaultCode : code } } };
};

/**
 * A /v1 URL the router could not read (it never reaches a route's handlers): a model id longer
 * than any model's is a model that does not exist, as OpenAI answers it; the rest, 400 or 414.
 */
export function openAIUnreadableUrl(url: string, status: 400 | 414): Described {
  const model = /^\/v1\/models\/([^?]*)/.exec(url)?.[1];
  if (status === 414 && model !== undefined) return error(404, `The model \`${model.slice(0, 60)}…\` does not exist or you do not have access to it.`, null, 'model_not_found');
  return error(status, status === 414 ? 'URI too long' : 'Invalid URL');
}

/** A validation issue's location as OpenAI writes a param: `messages[0].content`. */
export function paramOf(loc: readonly (string | number)[]): string | null {
  const path = loc.slice(1);
  if (!path.length) return null;
  return path.map((part, i) => (typeof part === 'number' || /^\d+$/.test(part) ? `[${part}]` : i === 0 ? part : `.${part}`)).join('');
}

/**
 * Turns what the app's one error handler answered (`{detail}` and a status) into OpenAI's error
 * object, using the thrown error (when known) for the type and code: the handler's mapping of
 * database, body-size and framework errors stays in one place.
 */
export function openAIErrorFrom(status: number, detail: unknown, thrown: unknown): Described {
  const described = describeError(status, detail, thrown);
  if (described.status === 409 || (described.status >= 502 && isModelCallFailure(thrown) && !(thrown instanceof UpstreamError && thrown.waitPassedOn))) {
    described.headers = { ...described.headers, 'x-should-retry': 'false' };
  }
  return described;
}

/**
 * A model call that failed after the gateway's own retries and fallbacks, or that another try
 * would not mend (an answer that broke the tool choice or a limit, a provider without credentials):
 * the openai client, which retries every 5xx (twice by default) unless an answer says
 * `x-should-retry: false`, would make each of its tries a whole round of the gateway's, and have
 * each charged. An upstream rate limit (429) stays the client's to back off from.
 */
function isModelCallFailure(thrown: unknown): boolean {
  return thrown instanceof UpstreamError || thrown instanceof ModelTimeoutError || thrown instanceof ModelAnswerError || thrown instanceof ModelAnswerLimitError || thrown instanceof ProviderUnavailableError;
}

function describeError(status: number, detail: unknown, thrown: unknown): Described {
  // OpenAI's words for its two causes, whoever answered the 401 (the authentication hook, a meter's
  // hold that found the key gone, a completion whose credential stopped working mid-answer): a
  // client that tells a missing key from a bad one reads the same thing on every path.
  if (status === 401) return error(401, detail === 'Not authenticated' ? "You didn't provide an API key. Send it as `Authorization: Bearer <key>`." : 'Incorrect API key provided.');
  if (thrown instanceof InvalidRequestError) return error(400, thrown.detail, thrown.param);
  if (thrown instanceof CodedOpenAIError) return error(thrown.statusCode, thrown.detail, null, thrown.code);
  if (thrown instanceof UpstreamLoopError) return error(400, thrown.detail, null, UPSTREAM_LOOP_CODE);
  if (thrown instanceof RouteNotFoundError) return error(404, `Unknown request URL: ${thrown.method} ${thrown.path}`, null, 'unknown_url');
  if (thrown instanceof MethodNotAllowedError) return error(405, `Invalid method for URL: ${thrown.method} ${thrown.path} (it takes ${thrown.allow.join(', ')})`);
  if (thrown instanceof ModelNotFoundError) return error(404, `The model \`${thrown.model}\` does not exist or you do not have access to it.`, null, 'model_not_found');
  if (thrown instanceof UpstreamError) {
    const upstream = thrown.upstreamStatus;
    // The request's fault (too long, a bad tool schema): the client's 400, not a 502 it would retry.
    // The provider's code and param when it gave them (`context_length_exceeded`: a client trims its history on it).
    if (upstream !== undefined && CLIENT_FAULT_UPSTREAM.has(upstream)) return error(400, thrown.detail, thrown.upstreamError?.param ?? null, thrown.upstreamError?.code ?? 'upstream_rejected');
    // Still rate limited after the retries, or asking for a wait longer than the gateway's between
    // tries (a 503 too, then): OpenAI's clients back off on a 429 or 503, as long as its Retry-After says.
    if (upstream === 429 || thrown.waitPassedOn) {
      const limited = error(upstream === 429 ? 429 : 503, thrown.detail);
      if (thrown.retryAfterMs !== undefined) limited.headers = { 'retry-after': String(Math.ceil(thrown.retryAfterMs / 1000)) };
      return limited;
    }
  }
  if (thrown instanceof ModelDownloadError) return error(400, thrown.detail, null, 'invalid_image_url');
  if (thrown instanceof ModelOptionError) return error(400, thrown.detail, thrown.option, 'unsupported_parameter');
  // OpenAI's code for a value a model does not take (a `temperature` a reasoning model refuses).
  if (thrown instanceof ModelValueError) return error(400, thrown.detail, thrown.param, 'unsupported_value');
  if (thrown instanceof ModelCapabilityError) return error(400, thrown.detail, 'model', 'model_not_supported');
  if (thrown instanceof ProviderUnavailableError) return error(503, thrown.detail, 'model', 'provider_unavailable');
  if (status === 422 && Array.isArray(detail)) {
    const [issue] = detail as { loc: (string | number)[]; msg: string; type: string }[];
    if (issue?.type === 'json_invalid') return error(400, 'We could not parse the JSON body of your request.');
    // The body itself missing or not an object: "Invalid value for body: Field required" said neither.
    // Other issues of the whole body (a value the database refused) keep their own words below.
    if (issue?.loc.length === 1 && (issue.type === 'missing' || issue.type === 'object_type')) {
      if (issue.type === 'missing') return error(400, 'The request has no body: send a JSON object with the request\'s fields (`model`, ...).', null, 'missing_required_parameter');
      const received = /received (\w+)$/.exec(issue.msg)?.[1];
      return error(400, `The request body must be a JSON object with the request's fields${received ? `, not ${received === 'array' ? 'an array' : `a ${received}`}` : ''}.`);
    }
    const param = issue ? paramOf(issue.loc) : null;
    const message = issue ? `Invalid value for ${param ?? issue.loc.join('.')}: ${issue.msg}` : 'Invalid request';
    return error(400, message, param, issue?.type === 'missing' ? 'missing_required_parameter' : null);
  }
  const message = typeof detail === 'string' ? detail : 'Invalid request';
  if (status === 404) return error(404, message, null, 'not_found');
  return error(status, message);
}

/** An error raised mid-stream, as the `error` event the stream ends with. */
export function openAIErrorOf(thrown: unknown): Described {
  if (thrown instanceof HttpError) return openAIErrorFrom(thrown.statusCode, thrown.detail, thrown);
  return error(500, 'Internal server error');
}
