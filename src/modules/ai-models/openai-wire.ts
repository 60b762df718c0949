/**
 * OpenAI's API spoken directly over a pooled HTTP client, without the AI SDK.
 *
 * Chat Completions, for `openai-compatible` providers and calls the request body can express
 * without the SDK (function tools with JSON schemas; text, tool-call and text tool-result messages;
 * no provider options). It sends what the SDK's openai-compatible chat model would send and reads
 * the answer (JSON, or SSE chunks) into the manager's parts, without the SDK's per-call Zod
 * parsing, `fetch` and web streams: on a zero-latency upstream those were most of the CPU a call
 * cost (bench/RESULTS.md; with tools, stop 35).
 *
 * Embeddings, for `openai` and `openai-compatible` providers: asked for as base64 (float32), as
 * OpenAI's own SDKs ask, and read into Float32Arrays. The SDK asks for JSON numbers and checks each
 * with Zod: 2,048 vectors of 3,072 dimensions were ~120 MB of JSON that held the event loop for
 * seconds (bench/RESULTS.md, stop 42); as base64 they are 34 MB of strings. A server that answers
 * numbers anyway is read as well.
 *
 * Errors come out as the SDK's `APICallError` (status, headers, retryability), so the manager's
 * retries, fallbacks and error answers treat both paths alike.
 */
import { StringDecoder } from 'node:string_decoder';

import type { SharedV3ProviderOptions } from '@ai-sdk/provider';
import { generateId, secureJsonParse, StreamingToolCallTracker } from '@ai-sdk/provider-utils';
import { APICallError, type ModelMessage } from 'ai';
import { Agent, type Dispatcher } from 'undici';

import { UPSTREAM_LOOP_CODE } from '../../core/hop.js';

import { AsyncQueue } from '../../utils/async-queue.js';
import { logprobsTooLong, logprobsWeight } from './answer-limit.js';
import { ModelAnswerLimitError, StreamErrorEvent } from './errors.js';
import type { ToolCall } from './model-manager.js';
import type { TokenUsage } from './types.js';

/** An OpenAI chat message as the wire carries it. */
type WireMessage =
  | { role: 'system' | 'user'; content: string | { type: 'text'; text: string }[]; name?: string }
  | { role: 'assistant'; content: string | null; tool_calls?: WireToolCall[]; name?: string }
  | { role: 'tool'; tool_call_id: string; content: string };

interface WireToolCall {
  id: string;
  type: 'function';
  function: { name: string; arguments: string };
}

/** A function tool as the SDK's openai-compatible model declares it (`prepareTools`). */
export interface WireTool {
  type: 'function';
  function: { name: string; description?: string; parameters: unknown; strict?: boolean };
}

export type WireToolChoice = 'auto' | 'none' | 'required' | { type: 'function'; function: { name: string } };

export interface WireCall {
  model: string;
  max_tokens?: number;
  temperature?: number;
  top_p?: number;
  frequency_penalty?: number;
  presence_penalty?: number;
  seed?: number;
  user?: string;
  parallel_tool_calls?: boolean;
  reasoning_effort?: string;
  logprobs?: boolean;
  top_logprobs?: number;
  logit_bias?: Record<string, number>;
  verbosity?: string;
  prediction?: unknown;
  stop?: string[];
  response_format?: unknown;
  messages: WireMessage[];
  tools?: WireTool[];
  tool_choice?: WireToolChoice;
}

export interface WireAnswer {
  text: string;
  reasoning: string | undefined;
  /** The model's refusal (OpenAI's `message.refusal`), apart from `text`: undefined when it did not refuse. */
  refusal: string | undefined;
  toolCalls: ToolCall[];
  finishReason: string;
  /** Undefined when the answer carried no usage. */
  usage: TokenUsage | undefined;
  /** The answer's token log probabilities, when asked for and given. */
  logprobs: ChoiceLogprobs | undefined;
}

/**
 * A choice's `logprobs` as OpenAI writes them: a list of token entries for the content, and one for
 * the refusal (each `{token, logprob, bytes, top_logprobs}`), handed on as the provider sent them.
 */
export interface ChoiceLogprobs {
  content: unknown[] | null;
  refusal: unknown[] | null;
}

/** A choice's `logprobs` when it holds a list (content's or refusal's), else undefined. */
export function logprobsOf(value: unknown): ChoiceLogprobs | undefined {
  if (typeof value !== 'object' || value === null) return undefined;
  const { content, refusal } = value as { content?: unknown; refusal?: unknown };
  if (!Array.isArray(content) && !Array.isArray(refusal)) return undefined;
  return { content: Array.isArray(content) ? content : null, refusal: Array.isArray(refusal) ? refusal : null };
}

/** The logprobs of an OpenAI-style answer (an SDK model's raw response body) or raw stream chunk, as `rawRefusal` reads its refusal. */
export function rawLogprobs(value: unknown): ChoiceLogprobs | undefined {
  const choices = (value as Completion | null | undefined)?.choices;
  return Array.isArray(choices) ? logprobsOf((choices[0])?.logprobs) : undefined;
}

/**
 * A streamed answer's pieces, as the manager's stream loop reads them; `refusal-delta`: a piece of
 * the model's refusal (OpenAI's `delta.refusal`); `progress`: a chunk without content, or an SSE
 * comment (a keep-alive while the model thinks).
 */
export type WirePart =
  | { type: 'text-delta' | 'refusal-delta'; text: string; logprobs?: unknown[] }
  | { type: 'reasoning-delta'; text: string }
  | { type: 'tool-call'; toolCall: ToolCall }
  | { type: 'finish'; finishReason: string; usage: TokenUsage | undefined }
  | { type: 'progress' };

/** A part of what the model said (text or refusal), which may carry its token log probabilities. */
type TextPart = Extract<WirePart, { type: 'text-delta' | 'refusal-delta' }>;

const PROGRESS: WirePart = { type: 'progress' };

/**
 * A tool call the model made though the call declared no tools, as the SDK hands it back: its
 * input parsed when it is JSON (by the SDK's parser, which refuses `__proto__` and
 * `constructor.prototype` keys), else the text that came.
 */
function undeclaredToolCall(toolCallId: string, toolName: string, text: string): ToolCall {
  let input: unknown = text;
  try {
    input = secureJsonParse(text);
  } catch {
    // not JSON, or JSON that would set a prototype: kept as text
  }
  return { toolCallId, toolName, input };
}

/**
 * A tool call as the SDK's `generateText`/`streamText` hand it back when the call declared tools
 * (`parseToolCall`; a JSON schema of `jsonSchema()` validates nothing): no arguments are `{}`;
 * otherwise as an undeclared call's (what is not JSON comes as its text).
 */
export function toolCallOf(declared: boolean, toolCallId: string, toolName: string, text: string): ToolCall {
  return declared && text.trim() === '' ? { toolCallId, toolName, input: {} } : { ...undeclaredToolCall(toolCallId, toolName, text), text };
}

/** An id for a tool call the upstream sent without one, as the SDK makes one: the caller answers the call by it. */
const toolCallId = (id: string | null | undefined): string => (id?.trim() ? id : generateId());

/**
 * A stream's tool calls put together as the SDK's openai-compatible model puts them: pieces at an
 * index wait for their call's name (the model's `pendingToolCalls`), then go to the SDK's own
 * tracker, which decides what continues a call, what starts one, what is ambiguous (dropped) and
 * which ids repeat; a call without a name is an invalid answer (it throws). The calls come out at
 * the stream's end, in the tracker's order, as the SDK hands them on.
 */
class ToolCallAssembly {
  private readonly calls: ToolCall[] = [];
  private readonly pending = new Map<number, { id: string | null; text: string }>();
  /** Indexes whose call went to the tracker: their further pieces go there at once. */
  private readonly forwarded = new Set<number>();
  private readonly tracker: StreamingToolCallTracker;

  /**
   * `count` is told the characters a new call holds besides its input (which the reader counts):
   * its name and id, at least one, so pieces that start calls without input cannot pile up unbounded.
   */
  constructor(
    declared: boolean,
    private readonly count: (chars: number) => void,
  ) {
    this.tracker = new StreamingToolCallTracker(
      {
        enqueue: (part) => {
          if (part.type === 'tool-input-start') count(Math.max(part.id.length + part.toolName.length, 1));
          else if (part.type === 'tool-call') this.calls.push(toolCallOf(declared, part.toolCallId, part.toolName, part.input));
        },
      },
      { generateId },
    );
  }

  add(piece: ToolCallDelta): void {
    const { index } = piece;
    if (index === undefined || index === null || this.forwarded.has(index)) return this.tracker.processDelta(piece);
    let pending = this.pending.get(index);
    if (!pending) {
      pending = { id: piece.id ?? null, text: '' };
      this.pending.set(index, pending);
      this.count((pending.id?.length ?? 0) + 1);
    } else if (pending.id === null && piece.id) {
      pending.id = piece.id;
      this.count(piece.id.length);
    }
    pending.text += piece.function?.arguments ?? '';
    const name = piece.function?.name;
    if (name === undefined || name === null) return;
    this.tracker.processDelta({ index, id: pending.id, function: { name, arguments: pending.text } });
    this.pending.delete(index);
    this.forwarded.add(index);
  }

  /** The calls, once the answer is whole (throws for a call that never got a name). */
  finish(): ToolCall[] {
    for (const [index, { id, text }] of this.pending) this.tracker.processDelta({ index, id, function: { arguments: text } });
    this.pending.clear();
    this.tracker.flush();
    return this.calls;
  }
}

interface OpenAIUsage {
  prompt_tokens?: number;
  completion_tokens?: number;
  prompt_tokens_details?: { cached_tokens?: number | null } | null;
  completion_tokens_details?: { reasoning_tokens?: number | null } | null;
}

interface ToolCallDelta {
  index?: number | null;
  id?: string | null;
  function?: { name?: string | null; arguments?: string | null } | null;
}

/** A part of a message's content as some servers send it (Mistral: text and thinking parts). */
interface ContentPart {
  type: string;
  text?: unknown;
  thinking?: unknown;
}

interface ChoiceMessage {
  content?: string | ContentPart[] | null;
  /** Set instead of (or besides) `content` when the model refuses; some servers send other types, which are ignored. */
  refusal?: unknown;
  reasoning_content?: string | null;
  reasoning?: string | null;
  tool_calls?: ToolCallDelta[] | null;
}

interface Completion {
  choices?: { message?: ChoiceMessage; delta?: ChoiceMessage; finish_reason?: string | null; logprobs?: unknown }[];
  usage?: OpenAIUsage | null;
  error?: { message?: string };
}

/**
 * The SDK's mapping of OpenAI's finish reasons (`mapOpenAICompatibleFinishReason`), but for a
 * refusal: the SDK says `content-filter` for a refusal that stopped, having merged it into the text;
 * here it comes apart (`refusal`), and its `stop` stays `stop`, as OpenAI answers it.
 */
const FINISH_REASONS: Record<string, string> = { stop: 'stop', length: 'length', content_filter: 'content-filter', function_call: 'tool-calls', tool_calls: 'tool-calls' };
const finishReasonOf = (reason: string | null | undefined): string => (reason ? (FINISH_REASONS[reason] ?? 'other') : 'other');

type TextPiece = { type: 'text-delta' | 'reasoning-delta'; text: string };

/** A refusal as the SDK reads it: a text that is not empty, else none (some servers send `false`). */
export const refusalOf = (value: unknown): string | undefined => (typeof value === 'string' && value.length > 0 ? value : undefined);

/**
 * The refusal of an OpenAI-style answer as its provider sent it (the SDK models' raw response body:
 * `message`; a raw stream chunk: `delta`), for the SDK's paths, whose models merge it into the text.
 * Any other value (another provider's shape, a chunk that was no JSON) holds none.
 */
export function rawRefusal(value: unknown, key: 'message' | 'delta'): string | undefined {
  const choices = (value as Completion | null | undefined)?.choices;
  return Array.isArray(choices) ? refusalOf((choices[0] as Record<string, ChoiceMessage | undefined> | undefined)?.[key]?.refusal) : undefined;
}

/**
 * A message's (or delta's) content as the SDK reads it (`convertOpenAICompatibleContent`), in
 * order: a string is text; of parts, text parts are text and thinking parts' text parts reasoning;
 * empty pieces and other parts are dropped.
 */
function contentPieces(content: string | ContentPart[] | null | undefined): TextPiece[] {
  if (!content) return [];
  if (typeof content === 'string') return [{ type: 'text-delta', text: content }];
  const pieces: TextPiece[] = [];
  for (const part of content) {
    if (part.type === 'text' && typeof part.text === 'string') {
      if (part.text) pieces.push({ type: 'text-delta', text: part.text });
    } else if (part.type === 'thinking' && Array.isArray(part.thinking)) {
      const text = (part.thinking as unknown[]).map((c) => (isTextPart(c) ? c.text : '')).join('');
      if (text) pieces.push({ type: 'reasoning-delta', text });
    }
  }
  return pieces;
}

const isTextPart = (value: unknown): value is { text: string } =>
  typeof value === 'object' && value !== null && (value as { type?: unknown }).type === 'text' && typeof (value as { text?: unknown }).text === 'string';

/**
 * The answer's usage as it came: no usage at all is unknown (undefined), not zero; a count left
 * out or of another type is passed on as it is, for the model manager to tell (`chargeableUsage`).
 */
function usageOf(usage: OpenAIUsage | null | undefined): TokenUsage | undefined {
  if (!usage || typeof usage !== 'object') return undefined;
  return {
    input: usage.prompt_tokens as number,
    cached_input: usage.prompt_tokens_details?.cached_tokens ?? 0,
    cache_write: 0,
    output: usage.completion_tokens as number,
    reasoning: usage.completion_tokens_details?.reasoning_tokens ?? 0,
  };
}

/**
 * The messages as OpenAI's wire format, converted as the SDK's openai-compatible model converts
 * them (`convertToOpenAICompatibleChatMessages`: a single text part is sent as a string, an
 * assistant's tool calls with their arguments as JSON text, each tool result as a `tool` message);
 * undefined when one of them needs the SDK (images, files, reasoning parts, tool results other
 * than text).
 */
export function wireMessages(system: string | undefined, messages: readonly ModelMessage[]): WireMessage[] | undefined {
  const out: WireMessage[] = system ? [{ role: 'system', content: system }] : [];
  // Tool calls still without a result: the SDK refuses such a prompt (MissingToolResultsError), so
  // it is left to the SDK, to be refused the same way.
  let unanswered: Set<string> | undefined;
  for (const message of messages) {
    if (message.role === 'tool') {
      for (const part of message.content) {
        if (part.type === 'tool-approval-response') continue;
        if (part.output.type !== 'text' && part.output.type !== 'error-text') return undefined;
        unanswered?.delete(part.toolCallId);
        out.push({ role: 'tool', tool_call_id: part.toolCallId, content: part.output.value });
      }
      continue;
    }
    if (message.role !== 'assistant' && unanswered?.size) return undefined;
    const name = participantName(message.providerOptions);
    if (message.role === 'system') {
      out.push(name === undefined ? { role: 'system', content: message.content } : { role: 'system', content: message.content, name });
      continue;
    }
    const { content } = message;
    if (typeof content === 'string') {
      out.push(name === undefined ? { role: message.role, content } : { role: message.role, content, name });
      continue;
    }
    if (message.role === 'assistant') {
      let text = '';
      const calls: WireToolCall[] = [];
      for (const part of content) {
        if (part.type === 'text') text += part.text;
        else if (part.type === 'tool-call' && !part.providerExecuted) {
          calls.push({ id: part.toolCallId, type: 'function', function: { name: part.toolName, arguments: toolArguments(part.input) } });
          (unanswered ??= new Set()).add(part.toolCallId);
        } else return undefined;
      }
      const said: WireMessage = calls.length ? { role: 'assistant', content: text || null, tool_calls: calls } : { role: 'assistant', content: text };
      if (name !== undefined) said.name = name;
      out.push(said);
      continue;
    }
    const texts: { type: 'text'; text: string }[] = [];
    for (const part of content) {
      if (part.type !== 'text') return undefined;
      if (part.text !== '') texts.push({ type: 'text', text: part.text }); // the SDK drops empty text parts
    }
    const user: WireMessage = { role: 'user', content: texts.length === 1 ? texts[0]!.text : texts };
    if (name !== undefined) user.name = name;
    out.push(user);
  }
  return unanswered?.size ? undefined : out;
}

/**
 * A message's participant name, where the SDK's openai-compatible model reads a message's own
 * fields (`providerOptions.openaiCompatible`, spread into the message it sends): the gateway puts
 * OpenAI's `name` there (services/openai-gateway.ts).
 */
function participantName(options: SharedV3ProviderOptions | undefined): string | undefined {
  const name = options?.openaiCompatible?.name;
  return typeof name === 'string' ? name : undefined;
}

/**
 * A tool call's input as the SDK sends it back (`serializeToolCallArguments`): text that is JSON as
 * it is, anything else as JSON, JSON that would set a prototype too (its secure parser refuses it).
 */
function toolArguments(input: unknown): string {
  if (typeof input === 'string') {
    try {
      secureJsonParse(input);
      return input;
    } catch {
      // not JSON: sent as a JSON string, as the SDK does
    }
  }
  return JSON.stringify(input);
}

/** What aborts a non-streamed call: an attempt's timer or its caller (the manager's `Attempt`), without an AbortSignal of its own. */
export interface AbortLike {
  readonly aborted: boolean;
  readonly reason: Error | undefined;
  /** Calls `listener` once when aborted; returns what unsubscribes it. */
  onAbort(listener: () => void): () => void;
  /** Told when the provider's 2xx answer began (its status came): from then on it bills the call. */
  answering?(): void;
}

/** An endpoint of the provider's API: its URL, and that URL as undici's dispatch takes it. */
interface Endpoint {
  url: string;
  origin: string;
  path: string;
}

function endpoint(baseUrl: string, name: string): Endpoint {
  const url = `${baseUrl.replace(/\/+$/, '')}/${name}`;
  const parsed = new URL(url);
  return { url, origin: parsed.origin, path: `${parsed.pathname}${parsed.search}` };
}

/** An embeddings request as the wire sends it (OpenAI's body; `encoding_format` is the wire's). */
export interface WireEmbeddingsCall {
  model: string;
  input: string[];
  dimensions?: number;
  user?: string;
}

/** An embeddings answer: its vectors as listed, each one's `index` as given, the tokens it reports. */
export interface WireEmbeddings {
  vectors: Float32Array[];
  indexes: unknown[];
  tokens: number | undefined;
}

/** What a server that does not take `encoding_format: base64` answers it with. */
const REFUSED_REQUEST = new Set([400, 422]);

/** One provider's OpenAI API (Chat Completions, Embeddings): its URLs, headers and a keep-alive connection pool. */
export class OpenAIWire {
  private readonly chat: Endpoint;
  private readonly embeddings: Endpoint;
  private readonly headers: Record<string, string>;
  /** The server refused embeddings as base64: asked for JSON numbers since. */
  private floatsOnly = false;

  constructor(
    baseUrl: string,
    apiKey: string | null | undefined,
    extraHeaders: Record<string, string> | null | undefined,
    private readonly dispatcher: Agent,
  ) {
    this.chat = endpoint(baseUrl, 'chat/completions');
    this.embeddings = endpoint(baseUrl, 'embeddings');
    this.headers = {
      ...(apiKey ? { authorization: `Bearer ${apiKey}` } : {}),
      // Lower-cased: a record's `Authorization` replaces the key's, as in the SDK, rather than going beside it.
      ...Object.fromEntries(Object.entries(extraHeaders ?? {}).map(([name, value]) => [name.toLowerCase(), value])),
      'content-type': 'application/json',
    };
  }

  /** A non-streamed call; an answer longer than `maxBytes` is not read further (ModelAnswerLimitError). */
  async generate(call: WireCall, signal: AbortLike, maxBytes: number, callHeaders?: Record<string, string>): Promise<WireAnswer> {
    let answer: TextAnswer;
    try {
      answer = await dispatchText(this.dispatcher, { origin: this.chat.origin, path: this.chat.path, method: 'POST', headers: this.headersWith(callHeaders), body: JSON.stringify(call) }, signal, maxBytes);
    } catch (error) {
      if (signal.aborted || error instanceof ModelAnswerLimitError) throw error;
      throw connectionError(this.chat.url, call, error);
    }
    const { statusCode, text } = answer;
    if (statusCode < 200 || statusCode >= 300) throw this.refused(this.chat.url, call, statusCode, rawHeaderRecord(answer.rawHeaders), text);
    const completion = completionOf(text);
    const choice = completion?.choices?.[0];
    if (!completion || !choice) throw invalidAnswer(this.chat.url, call, statusCode, text, rawHeaderRecord(answer.rawHeaders));
    const message = choice.message ?? {};
    const declared = call.tools !== undefined;
    const toolCalls = (message.tool_calls ?? []).map((c) => toolCallOf(declared, toolCallId(c.id), c.function?.name ?? '', c.function?.arguments ?? ''));
    let said = '';
    let reasoning = message.reasoning_content ?? message.reasoning ?? '';
    for (const piece of contentPieces(message.content)) {
      if (piece.type === 'text-delta') said += piece.text;
      else reasoning += piece.text;
    }
    return {
      text: said,
      reasoning: reasoning || undefined,
      refusal: refusalOf(message.refusal),
      toolCalls,
      finishReason: finishReasonOf(choice.finish_reason),
      usage: usageOf(completion.usage),
      // Only when asked for: a server that sends them anyway (some send an empty list) is not passed on.
      logprobs: call.logprobs ? logprobsOf(choice.logprobs) : undefined,
    };
  }

  /**
   * A streamed call (with `include_usage`): the parts in order, ending with `finish`. Tool calls
   * arrive in pieces and are handed on whole when the answer ends. An upstream error chunk, a
   * dropped connection, a stream that ends with neither a finish reason nor `[DONE]` (cut off) or
   * the signal throws; so do an event (a line) or tool calls longer than `maxChars`, which the wire
   * would hold, and log probabilities past `logprobsChars` (what the call asked for: logprobsAllowance).
   * A refusal (non-2xx) throws here, with the start of its body. Stopping the iteration closes the
   * upstream request, unless its response is complete.
   */
  async stream(call: WireCall, signal: AbortLike, maxChars: number, logprobsChars: number, callHeaders?: Record<string, string>): Promise<AsyncIterable<WirePart>> {
    const streamCall = { ...call, stream: true as const, stream_options: { include_usage: true as const } };
    if (signal.aborted) throw signal.reason ?? new Error('aborted');
    const reader = new SseReader(this.chat.url, streamCall, signal, maxChars, logprobsChars);
    this.dispatcher.dispatch({ origin: this.chat.origin, path: this.chat.path, method: 'POST', headers: this.headersWith(callHeaders), body: JSON.stringify(streamCall) }, reader);
    const refusal = await reader.opened;
    if (refusal) throw this.refused(this.chat.url, streamCall, refusal.statusCode, rawHeaderRecord(refusal.rawHeaders), refusal.text);
    return reader.parts;
  }

  /**
   * One embeddings request (OpenAI takes up to 2,048 inputs in one); an answer longer than
   * `maxBytes` is not read further (ModelAnswerLimitError). An answer that is not an embeddings
   * list, or holds a vector that is neither float32 base64 nor numbers (or a value that is not a
   * finite number), is an invalid answer, as the SDK's response schema would find it.
   */
  async embed(call: WireEmbeddingsCall, signal: AbortLike, maxBytes: number, callHeaders?: Record<string, string>): Promise<WireEmbeddings> {
    if (this.floatsOnly) return this.embedAs('float', call, signal, maxBytes, callHeaders);
    try {
      return await this.embedAs('base64', call, signal, maxBytes, callHeaders);
    } catch (error) {
      // Some servers refuse base64 (older vLLM, proxies in front of OpenAI's API) rather than ignore it: ask them for numbers, from now on.
      // Not Keel refusing its own request (core/hop.ts): that loop, asked again for numbers, would only be refused again.
      if (!(error instanceof APICallError) || !REFUSED_REQUEST.has(error.statusCode ?? 0) || openAIErrorFields(error.responseBody)?.code === UPSTREAM_LOOP_CODE) throw error;
      const answer = await this.embedAs('float', call, signal, maxBytes, callHeaders);
      this.floatsOnly = true;
      return answer;
    }
  }

  private async embedAs(encoding: 'base64' | 'float', call: WireEmbeddingsCall, signal: AbortLike, maxBytes: number, callHeaders?: Record<string, string>): Promise<WireEmbeddings> {
    const { url, origin, path } = this.embeddings;
    const body = { ...call, encoding_format: encoding };
    let answer: TextAnswer;
    try {
      answer = await dispatchText(this.dispatcher, { origin, path, method: 'POST', headers: this.headersWith(callHeaders), body: JSON.stringify(body) }, signal, maxBytes);
    } catch (error) {
      if (signal.aborted || error instanceof ModelAnswerLimitError) throw error;
      throw connectionError(url, body, error);
    }
    const { statusCode, text } = answer;
    if (statusCode < 200 || statusCode >= 300) throw this.refused(url, body, statusCode, rawHeaderRecord(answer.rawHeaders), text);
    const json = jsonOf(text);
    const embeddings = embeddingsOf(json);
    if (embeddings) return embeddings;
    // Billed all the same: the usage it reported (when it did) goes with the error, for the call to be charged it (`reportedTokensOf`).
    const tokens = promptTokensOf(json);
    throw invalidAnswer(url, body, statusCode, text, rawHeaderRecord(answer.rawHeaders), tokens === undefined ? undefined : ({ tokens } satisfies ReportedTokens));
  }

  /** The provider's headers, with a call's own (its hop header: ProviderRegistry.hopHeaders) over them; most calls have none. */
  private headersWith(callHeaders: Record<string, string> | undefined): Record<string, string> {
    return callHeaders ? { ...this.headers, ...callHeaders } : this.headers;
  }

  /** A non-2xx answer as `APICallError`, with OpenAI's error message when the body is its error object. */
  private refused(url: string, call: unknown, statusCode: number, headers: Record<string, string>, text: string): APICallError {
    let message = `HTTP ${statusCode}`;
    try {
      const parsed = JSON.parse(text) as { error?: { message?: string } };
      if (typeof parsed.error?.message === 'string') message = parsed.error.message;
    } catch {
      // not OpenAI's error object: the status says it
    }
    return upstreamError(url, call, message, statusCode, headers, text);
  }
}

/**
 * The `code` and `param` of an OpenAI error object (`{error: {code, param}}`), when the body is one
 * and they are short identifiers: what a client acts on (`context_length_exceeded`), passed on with
 * the provider's words for a refusal that was the request's fault.
 */
export function openAIErrorFields(body: string | undefined): { code: string | null; param: string | null } | undefined {
  if (!body?.startsWith('{')) return undefined;
  let parsed: unknown;
  try {
    parsed = JSON.parse(body);
  } catch {
    return undefined;
  }
  const fields = (parsed as { error?: { code?: unknown; param?: unknown } } | null)?.error;
  const identifier = (value: unknown) => (typeof value === 'string' && /^[\w.[\]-]{1,100}$/.test(value) ? value : null);
  const code = identifier(fields?.code);
  const param = identifier(fields?.param);
  return code || param ? { code, param } : undefined;
}

/** What an embeddings answer whose vectors could not be read carries on its error (`APICallError.data`): the input tokens it reported. */
interface ReportedTokens {
  tokens: number;
}

/** The input tokens an embeddings answer reported (`usage.prompt_tokens`), whether or not its vectors can be read; undefined when none. */
function promptTokensOf(value: unknown): number | undefined {
  const tokens = (value as { usage?: { prompt_tokens?: unknown } | null } | null | undefined)?.usage?.prompt_tokens;
  return typeof tokens === 'number' && Number.isFinite(tokens) ? tokens : undefined;
}

/** The input tokens a 2xx embeddings answer reported although its vectors could not be read (`embed` threw it); undefined for any other error. */
export function reportedTokensOf(error: unknown): number | undefined {
  if (!APICallError.isInstance(error)) return undefined;
  const tokens = (error.data as Partial<ReportedTokens> | undefined)?.tokens;
  return typeof tokens === 'number' ? tokens : undefined;
}

/** An embeddings list's vectors, indexes and tokens, or undefined when `value` is none (see `embed`). */
function embeddingsOf(value: unknown): WireEmbeddings | undefined {
  if (typeof value !== 'object' || value === null) return undefined;
  const { data } = value as { data?: unknown };
  if (!Array.isArray(data)) return undefined;
  const vectors: Float32Array[] = [];
  const indexes: unknown[] = [];
  for (const item of data as unknown[]) {
    if (typeof item !== 'object' || item === null) return undefined;
    const { embedding, index } = item as { embedding?: unknown; index?: unknown };
    const vector = vectorOf(embedding);
    if (!vector) return undefined;
    vectors.push(vector);
    indexes.push(index);
  }
  return { vectors, indexes, tokens: promptTokensOf(value) };
}

/** Whether every value of `vector` is a finite number (a loop: `every` calls a function per value, 6 million in a large answer). */
export function allFinite(vector: Float32Array): boolean {
  for (let i = 0; i < vector.length; i++) if (!Number.isFinite(vector[i])) return false;
  return true;
}

/** The `=` a base64 text ends with (two at most). */
const paddingOf = (text: string): number => (text.endsWith('==') ? 2 : text.endsWith('=') ? 1 : 0);

/**
 * The bytes of a base64 text, padded or not, or undefined when it is no base64: Node's decoder
 * skips what is not base64 and stops at a `=` inside, without a word, so every character must have
 * been decoded. Line breaks (MIME encoders wrap at 76) are taken out first, only when there are any.
 */
function base64Bytes(text: string, unwrapped = false): Buffer | undefined {
  const bytes = Buffer.from(text, 'base64');
  if (text.length % 4 !== 1 && bytes.length === Math.floor((text.length * 3) / 4) - paddingOf(text)) return bytes;
  return !unwrapped && /\s/.test(text) ? base64Bytes(text.replace(/\s+/g, ''), true) : undefined;
}

/**
 * A vector from base64 (float32, little-endian — this platform's order, as OpenAI's SDKs read it
 * with the platform's typed arrays) or from JSON numbers; undefined when it is neither, or holds a
 * value that is not a finite number (NaN fits in float32 but in no JSON answer or pgvector column).
 */
function vectorOf(embedding: unknown): Float32Array | undefined {
  let vector: Float32Array;
  if (typeof embedding === 'string') {
    const bytes = base64Bytes(embedding);
    if (!bytes || bytes.length % 4 !== 0) return undefined;
    // A short string's bytes may sit in Buffer's shared pool at an offset a Float32Array cannot start at.
    vector = bytes.byteOffset % 4 === 0 ? new Float32Array(bytes.buffer, bytes.byteOffset, bytes.length / 4) : new Float32Array(new Uint8Array(bytes).buffer);
  } else if (Array.isArray(embedding)) {
    if (!embedding.every((n) => typeof n === 'number')) return undefined;
    vector = Float32Array.from(embedding);
  } else {
    return undefined;
  }
  return allFinite(vector) ? vector : undefined;
}

interface TextAnswer {
  statusCode: number;
  rawHeaders: Buffer[];
  text: string;
}

/**
 * One request on the dispatcher, its whole answer read as text. undici's `request()` wraps every
 * answer in a Node stream (and an async resource) that a non-streamed call only reads to the end;
 * a handler of our own keeps the chunks instead. The signal aborts the request as it does there;
 * an answer past `maxBytes` aborts it with ModelAnswerLimitError.
 */
function dispatchText(dispatcher: Dispatcher, options: Dispatcher.DispatchOptions, signal: AbortLike, maxBytes: number): Promise<TextAnswer> {
  return new Promise((resolve, reject) => {
    let statusCode = 0;
    let rawHeaders: Buffer[] = [];
    const chunks: Buffer[] = [];
    let size = 0;
    let abort: ((reason?: Error) => void) | undefined;
    if (signal.aborted) return reject(signal.reason ?? new Error('aborted'));
    const done = signal.onAbort(() => abort?.(signal.reason));
    dispatcher.dispatch(options, {
      onConnect(abortRequest) {
        abort = abortRequest;
        if (signal.aborted) abortRequest(signal.reason);
      },
      onHeaders(status, headers) {
        statusCode = status;
        rawHeaders = headers;
        if (status >= 200 && status < 300) signal.answering?.();
        return true;
      },
      onData(chunk) {
        if ((size += chunk.length) > maxBytes) {
          abort?.(new ModelAnswerLimitError(502, `The model's answer exceeded ${maxBytes} bytes`, statusCode >= 200 && statusCode < 300));
          return false;
        }
        chunks.push(chunk);
        return true;
      },
      onComplete() {
        done();
        resolve({ statusCode, rawHeaders, text: withoutBom(chunks.length === 1 ? chunks[0]!.toString('utf8') : Buffer.concat(chunks).toString('utf8')) });
      },
      onError(error) {
        done();
        reject(error);
      },
    });
  });
}

/**
 * The text without the byte order mark it may start with: Node's decoding keeps it (where fetch's
 * `text()`, and so the SDK, drops it), and JSON.parse refuses it.
 */
const withoutBom = (text: string): string => (text.charCodeAt(0) === 0xfeff ? text.slice(1) : text);

/** A refused stream's answer: its status, headers and the start of its body. */
interface Refusal {
  statusCode: number;
  rawHeaders: Buffer[];
  text: string;
}

/** Parts a stream's reader holds before it stops reading the upstream until they are taken. */
const PAUSE_AT_PARTS = 256;

/**
 * A streamed answer read off the dispatcher into the queue of its parts. undici's `request()`
 * wraps every answer in a Node stream (an async resource, an AbortSignal listener, a string
 * decoder stream), which an async generator then read chunk by chunk: on a zero-latency upstream,
 * layers that cost more than reading the events themselves. Here the events are parsed as the data
 * arrives and their parts queued (`parts`); the upstream is paused while many wait. The answer is
 * whole at `[DONE]`, or at the response's end after a finish reason: its last parts are queued
 * then; a response still open DONE_GRACE_MS after its `[DONE]` is closed.
 */
class SseReader implements Dispatcher.DispatchHandlers {
  /** Settles once the headers came: undefined for a 2xx (read `parts`); for any other status, its refusal, once the start of its body is read. */
  readonly opened: Promise<Refusal | undefined>;
  /** Stopping their iteration early closes the connection (unless the answer is whole); taking the last one resumes a paused upstream. */
  readonly parts = new AsyncQueue<WirePart>({ onReturn: () => this.stop(), onDrained: () => this.unpause() });
  private open!: (refusal: Refusal | undefined) => void;
  private openFailed!: (error: Error) => void;
  private statusCode = 0;
  private rawHeaders: Buffer[] = [];
  private readonly decoder = new StringDecoder('utf8');
  /** A refusal's body so far; for a 2xx, the start of a line whose end has not come yet. */
  private rest = '';
  /** undici is through with the request (complete or failed): nothing to abort. */
  private settled = false;
  private abortRequest: ((reason?: Error) => void) | undefined;
  private resume: (() => void) | undefined;
  private paused = false;
  private grace: NodeJS.Timeout | undefined;
  /** The answer's tool calls as they are put together, from their first piece on. */
  private tools: ToolCallAssembly | undefined;
  /**
   * The answer's characters read so far (text, reasoning, tool-call input), held to the limit here:
   * the model manager counts them too, but only as its caller takes them, and a slow caller leaves
   * them queued here (up to PAUSE_AT_PARTS parts, each up to the limit).
   */
  private outputChars = 0;
  /**
   * The characters of the log probabilities read (logprobsWeight): no output (not counted above), but
   * held for a slow caller as it is, so held to what the call asked for.
   */
  private logprobsRead = 0;
  private finishReason: string | null | undefined;
  /** A `data:` event was read: the answer is a stream, whatever came of it. */
  private streamed = false;
  /** An event's data lines so far, while they are no JSON yet (data over several lines: see read). */
  private data: string | null = null;
  /** The last read ended with a CR: a LF starting the next ends the same line. */
  private afterCR = false;
  /** Text was read: a byte order mark is only the body's first character (see read). */
  private begun = false;
  /** The start of a 2xx answer's body, to name an answer that is no stream (a server that ignores `stream`). */
  private opening = '';
  private usage: OpenAIUsage | null | undefined;
  private readonly unsubscribe: () => void;

  /** The call declared tools: its tool calls are read as `generateText` reads them (toolCallOf). */
  private readonly declared: boolean;

  constructor(
    private readonly url: string,
    private readonly call: WireCall,
    private readonly signal: AbortLike,
    private readonly maxChars: number,
    private readonly logprobsChars: number,
  ) {
    this.declared = call.tools !== undefined;
    this.opened = new Promise((resolve, reject) => {
      this.open = resolve;
      this.openFailed = reject;
    });
    this.unsubscribe = signal.onAbort(() => this.abortRequest?.(signal.reason));
  }

  onConnect(abort: (reason?: Error) => void): void {
    this.abortRequest = abort;
    if (this.signal.aborted) abort(this.signal.reason);
  }

  onHeaders(statusCode: number, rawHeaders: Buffer[], resume: () => void): boolean {
    if (statusCode < 200) return true; // an interim answer (103 Early Hints): the real one follows
    this.statusCode = statusCode;
    this.rawHeaders = rawHeaders;
    this.resume = resume;
    if (this.isAnswer()) {
      this.signal.answering?.();
      this.open(undefined);
    }
    return true;
  }

  onData(chunk: Buffer): boolean {
    if (!this.isAnswer()) {
      // A refusal: only its start is read, then the connection is closed.
      this.rest += this.decoder.write(chunk);
      if (this.rest.length < this.maxChars) return true;
      this.refuse();
      this.abortRequest?.(new Error('The refusal is read'));
      return false;
    }
    if (this.parts.ended) return true; // after [DONE]: waiting for the response's end only
    try {
      this.read(this.decoder.write(chunk));
    } catch (error) {
      this.parts.fail(error as Error);
      this.abortRequest?.(error as Error);
      return false;
    }
    // A whole answer (its [DONE] in this read) is not paused: its response's end is still to be read.
    if (this.parts.ended || this.parts.size < PAUSE_AT_PARTS) return true;
    this.paused = true;
    return false;
  }

  onComplete(): void {
    this.settle();
    if (!this.isAnswer()) return this.refuse();
    if (this.parts.ended) return;
    if (this.data !== null) {
      // An event whose blank line never came: the response's end ends it.
      try {
        if (this.dispatch(this.data, true)) return;
      } catch (error) {
        return this.parts.fail(error as Error);
      }
    }
    // A last line without its line end is no event. Ended cleanly but cut off (a proxy's timeout,
    // a crashed server): a dropped connection, not an answer.
    // A body that held no event at all is no stream (a server that ignores `stream` answers JSON):
    // asking again gets the same, so it is the provider's 502, not a dropped connection retried.
    if (!this.finishReason && !this.streamed && this.opening.trim()) {
      return this.parts.fail(upstreamError(this.url, this.call, `The answer was not a stream of events: it began ${JSON.stringify(this.opening.slice(0, 120))}`, this.statusCode));
    }
    if (!this.finishReason) return this.parts.fail(upstreamError(this.url, this.call, 'The stream ended before the answer did (no finish_reason, no [DONE])', undefined));
    this.finish();
  }

  onError(error: Error): void {
    this.settle();
    const failure = () => (this.signal.aborted || error instanceof ModelAnswerLimitError ? error : connectionError(this.url, this.call, error));
    if (this.statusCode === 0) return this.openFailed(failure());
    if (!this.isAnswer()) return this.refuse(); // what came of the refusal is all there is
    // After [DONE] (the grace's end, a dropped connection), a failure of its own or the reader's
    // stop, the parts have ended: the answer stands (or failed already); aborted, what waits is not wanted.
    if (!this.parts.ended) this.parts.fail(failure(), this.signal.aborted);
  }

  private isAnswer(): boolean {
    return this.statusCode >= 200 && this.statusCode < 300;
  }

  private refuse(): void {
    this.open({ statusCode: this.statusCode, rawHeaders: this.rawHeaders, text: withoutBom(this.rest.slice(0, this.maxChars)) });
  }

  private settle(): void {
    this.settled = true;
    this.unsubscribe();
    clearTimeout(this.grace);
  }

  /** The reader stopped before the answer was whole: the rest is not wanted. */
  private stop(): void {
    if (!this.settled) this.abortRequest?.(new Error('The stream was closed by its reader'));
  }

  private unpause(): void {
    if (!this.paused) return;
    this.paused = false;
    this.resume?.();
  }

  /**
   * Parses the lines `text` ends (only the new text is searched for line ends: a long line costs its
   * length once, not once per chunk). An event is its `data:` lines joined with line feeds, as the
   * SSE spec (and the SDK's parser) reads it; a `data:` line that is whole JSON on its own is read at
   * once, without waiting for the blank line after it (every OpenAI-compatible server writes one
   * line an event, and some no blank line between them), so only data over several lines waits.
   */
  private read(chunk: string): void {
    // A byte order mark the body starts with is no part of its first line (the SSE spec and the SDK's
    // parser drop it): left there, that line was no `data:` line, and its event lost without a word.
    if (!this.begun && chunk) {
      this.begun = true;
      chunk = withoutBom(chunk);
    }
    // CR or CRLF line ends (rare) as LF; the LF of a CRLF cut between two reads is not a line of its own.
    let text = this.afterCR && chunk.charCodeAt(0) === 10 ? chunk.slice(1) : chunk;
    this.afterCR = text.charCodeAt(text.length - 1) === 13;
    if (text.includes('\r')) text = text.replace(/\r\n?/g, '\n');
    if (!this.streamed && this.opening.length < 120) this.opening += text.slice(0, 120);
    let start = 0;
    for (let end = text.indexOf('\n'); end !== -1; start = end + 1, end = text.indexOf('\n', start)) {
      const line = this.rest ? this.rest + text.slice(start, end) : text.slice(start, end);
      this.rest = '';
      if (line === '') {
        if (this.data !== null && this.dispatch(this.data, true)) return;
        continue;
      }
      if (!line.startsWith('data:')) {
        // A comment (`: OPENROUTER PROCESSING`) is how an upstream says it is still at work while a
        // reasoning model thinks, silent otherwise for minutes: progress for the chunk timeout,
        // which would cut the call off and try it again. The stream's deadline still bounds it.
        if (line.charCodeAt(0) === 58) this.parts.push(PROGRESS);
        continue;
      }
      this.streamed = true;
      const data = line.charCodeAt(5) === 32 ? line.slice(6) : line.slice(5);
      if (this.data === null ? this.dispatch(data, false) : ((this.data += `\n${data}`), false)) return;
    }
    this.rest = start === 0 ? this.rest + text : text.slice(start);
    if (this.rest.length + (this.data?.length ?? 0) > this.maxChars) throw new ModelAnswerLimitError(502, `An event of the model's answer exceeded ${this.maxChars} characters`, true);
  }

  /**
   * An event's data: `[DONE]`, or a completion chunk. Not yet `whole` (its blank line not read), data
   * that is no JSON is held for the lines that follow it. True at `[DONE]`: nothing after it is read.
   */
  private dispatch(data: string, whole: boolean): boolean {
    this.data = null;
    const trimmed = data.trim();
    if (trimmed === '[DONE]') {
      // The answer is whole: nothing after [DONE] is read. The response usually ends in the same
      // read (undici completes it before this turn's microtasks); one that ends a moment later (its
      // own write) is waited for a little, so as not to lose the connection; one kept open is closed.
      this.finish();
      queueMicrotask(() => {
        if (!this.settled) this.grace = setTimeout(() => this.abortRequest?.(new Error('The response did not end after [DONE]')), DONE_GRACE_MS);
      });
      return true;
    }
    const json = jsonOf(trimmed);
    // No JSON yet: the first of its data lines, held for the rest (JSON of another shape is refused at once).
    if (json === NOT_JSON && !whole) this.data = data;
    else {
      const value = json === NOT_JSON ? undefined : asCompletion(json as Completion | null);
      if (!value) throw invalidAnswer(this.url, this.call, this.statusCode, trimmed);
      this.event(value);
    }
    return false;
  }

  private event(value: Completion): void {
    // The provider's error object, handed on as the SDK hands it on: the model manager reads both alike.
    if (value.error) throw new StreamErrorEvent(value.error);
    if (value.usage) this.usage = value.usage;
    const choice = value.choices?.[0];
    const delta = choice?.delta;
    if (choice?.finish_reason) this.finishReason = choice.finish_reason;
    const reasoning = delta?.reasoning_content ?? delta?.reasoning;
    let emitted = false;
    if (reasoning) {
      emitted = true;
      this.parts.push({ type: 'reasoning-delta', text: reasoning });
      this.output(reasoning.length);
    }
    const pieces: (TextPiece | TextPart)[] = contentPieces(delta?.content);
    const refusal = refusalOf(delta?.refusal);
    const refused: TextPart | undefined = refusal ? { type: 'refusal-delta', text: refusal } : undefined;
    // The chunk's token log probabilities go with its text (and its refusal), as OpenAI's chunk carries them.
    // Not asked for, they are ignored: held to an allowance of none, they failed the answer.
    const logprobs = this.call.logprobs ? logprobsOf(choice?.logprobs) : undefined;
    if (logprobs && (this.logprobsRead += logprobsWeight(logprobs.content) + logprobsWeight(logprobs.refusal)) > this.logprobsChars) throw logprobsTooLong(this.logprobsChars);
    if (logprobs?.content) {
      const last = pieces.findLast((piece): piece is TextPart => piece.type === 'text-delta');
      if (last) last.logprobs = logprobs.content;
      else pieces.push({ type: 'text-delta', text: '', logprobs: logprobs.content });
    }
    if (logprobs?.refusal) {
      if (refused) refused.logprobs = logprobs.refusal;
      else pieces.push({ type: 'refusal-delta', text: '', logprobs: logprobs.refusal });
    }
    if (refused) pieces.push(refused);
    for (const piece of pieces) {
      emitted = true;
      this.parts.push(piece);
      this.output(piece.text.length);
    }
    for (const piece of delta?.tool_calls ?? []) this.toolDelta(piece);
    if (!emitted) this.parts.push(PROGRESS);
  }

  private toolDelta(piece: ToolCallDelta): void {
    this.output(piece.function?.arguments?.length ?? 0);
    (this.tools ??= new ToolCallAssembly(this.declared, (chars) => this.output(chars))).add(piece);
  }

  /** Counts output read; past the limit the read fails after the part that passed it, which is queued (so metered, as what came). */
  private output(chars: number): void {
    if ((this.outputChars += chars) > this.maxChars) throw new ModelAnswerLimitError(502, `The model's answer exceeded ${this.maxChars} characters`, true);
  }

  /** The answer is whole: its tool calls, then `finish`. */
  private finish(): void {
    let calls: ToolCall[];
    try {
      calls = this.tools?.finish() ?? [];
    } catch (error) {
      return this.parts.fail(error as Error); // a call without a name: an invalid answer, as through the SDK
    }
    for (const toolCall of calls) this.parts.push({ type: 'tool-call', toolCall });
    this.parts.push({ type: 'finish', finishReason: finishReasonOf(this.finishReason), usage: usageOf(this.usage) });
    this.parts.end();
  }
}

/** Raw response headers (name, value, name, value…) as one record, repeated names joined as Node joins them. */
function rawHeaderRecord(raw: Buffer[]): Record<string, string> {
  const out: Record<string, string> = {};
  for (let i = 0; i + 1 < raw.length; i += 2) {
    const name = raw[i]!.toString('latin1').toLowerCase();
    const value = raw[i + 1]!.toString('latin1');
    out[name] = name in out ? `${out[name]}, ${value}` : value;
  }
  return out;
}

function upstreamError(url: string, call: unknown, message: string, statusCode: number | undefined, responseHeaders?: Record<string, string>, responseBody?: string): APICallError {
  const retryable = statusCode === undefined || statusCode === 408 || statusCode === 409 || statusCode === 429 || statusCode >= 500;
  return new APICallError({ message, url, requestBodyValues: call, statusCode, responseHeaders, responseBody, isRetryable: retryable });
}

/** A connection that failed or closed early, as the SDK reports it: an APICallError without a status (retryable). */
function connectionError(url: string, call: unknown, error: unknown): APICallError {
  const message = error instanceof Error ? error.message : String(error);
  return new APICallError({ message: `Cannot connect to API: ${message}`, url, requestBodyValues: call, isRetryable: true, cause: error });
}

/**
 * A completion (or stream chunk) from its JSON text, or undefined when the text is not one: not
 * JSON, not an object, or fields this reading uses of another type (what the SDK's response schema
 * refuses, as far as it matters here).
 */
function completionOf(text: string): Completion | undefined {
  const value = jsonOf(text);
  return value === NOT_JSON ? undefined : asCompletion(value as Completion | null);
}

const NOT_JSON = Symbol('not JSON');

function jsonOf(text: string): unknown {
  try {
    return JSON.parse(text) as unknown;
  } catch {
    return NOT_JSON;
  }
}

/** `value` when it has a completion's (or a chunk's) shape as the SDK's schema checks it. */
function asCompletion(value: Completion | null): Completion | undefined {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) return undefined;
  const { choices } = value;
  if (choices === undefined || choices === null) return value;
  if (!Array.isArray(choices)) return undefined;
  const choice = choices[0];
  if (choice === undefined) return value;
  if (typeof choice !== 'object' || choice === null) return undefined;
  const message = choice.message ?? choice.delta;
  if (message === undefined || message === null) return value;
  if (typeof message !== 'object') return undefined;
  const { content, tool_calls: toolCalls } = message;
  if (content !== undefined && content !== null && typeof content !== 'string' && !(Array.isArray(content) && content.every(isContentPart))) return undefined;
  if (toolCalls !== undefined && toolCalls !== null && (!Array.isArray(toolCalls) || !toolCalls.every(isToolCallDelta))) return undefined;
  return value;
}

/** A content part of the shape the SDK's schema takes: an object with a `type` text. */
const isContentPart = (value: unknown): boolean => typeof value === 'object' && value !== null && typeof (value as { type?: unknown }).type === 'string';

/** A tool call (or a piece of one) of the shape the SDK's schemas take: nothing where a string or a number goes that is neither. */
function isToolCallDelta(value: unknown): boolean {
  if (typeof value !== 'object' || value === null) return false;
  const { index, id, function: fn } = value as Record<string, unknown>;
  if (!optional(index, 'number') || !optional(id, 'string')) return false;
  if (fn === undefined || fn === null) return true;
  if (typeof fn !== 'object') return false;
  const { name, arguments: args } = fn as Record<string, unknown>;
  return optional(name, 'string') && optional(args, 'string');
}

const optional = (value: unknown, type: 'string' | 'number'): boolean => value === undefined || value === null || typeof value === type;

/**
 * An answer that is no chat completion, as the SDK reports one (its JSON response handler): an
 * APICallError with the answer's 2xx status, so not retried, and a 502 for the caller.
 */
function invalidAnswer(url: string, call: unknown, statusCode: number, text: string, responseHeaders?: Record<string, string>, data?: unknown): APICallError {
  return new APICallError({ message: 'Invalid JSON response', url, requestBodyValues: call, statusCode, responseHeaders, responseBody: text, isRetryable: false, data });
}

/** How long a stream's response may take to end after its [DONE] before its connection is closed. */
const DONE_GRACE_MS = 200;

/** One pool of keep-alive connections per registry, shared by its providers (undici keeps one per origin). */
export function wireDispatcher(): Agent {
  return new Agent({ keepAliveTimeout: 10_000, keepAliveMaxTimeout: 60_000 });
}
