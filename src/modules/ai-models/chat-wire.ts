/**
 * Chat Completions spoken directly over a pooled HTTP client, for `openai-compatible` providers and
 * calls the request body can express without the AI SDK (no tools, text messages, no provider
 * options). It sends what the SDK's openai-compatible chat model would send and reads the answer
 * (JSON, or SSE chunks) into the manager's parts, without the SDK's per-call Zod parsing, `fetch`
 * and web streams: on a zero-latency upstream those were most of the CPU a call cost (see
 * bench/RESULTS.md). Errors come out as the SDK's `APICallError` (status, headers, retryability),
 * so the manager's retries, fallbacks and error answers treat both paths alike.
 */
import type { Readable } from 'node:stream';

import { APICallError, type ModelMessage } from 'ai';
import { Agent, type Dispatcher, request as httpRequest } from 'undici';

import { ModelAnswerLimitError } from './errors.js';
import type { ToolCall } from './model-manager.js';
import type { TokenUsage } from './types.js';

/** An OpenAI chat message as the wire carries it. */
type WireMessage = { role: 'system' | 'user' | 'assistant'; content: string | { type: 'text'; text: string }[] };

export interface WireCall {
  model: string;
  messages: WireMessage[];
  max_tokens?: number;
  temperature?: number;
  top_p?: number;
  stop?: string[];
  response_format?: unknown;
}

export interface WireAnswer {
  text: string;
  reasoning: string | undefined;
  toolCalls: ToolCall[];
  finishReason: string;
  /** Undefined when the answer carried no usage. */
  usage: TokenUsage | undefined;
}

/** A streamed answer's pieces, as the manager's stream loop reads them; `progress`: a chunk without content. */
export type WirePart =
  | { type: 'text-delta' | 'reasoning-delta'; text: string }
  | { type: 'tool-call'; toolCall: ToolCall }
  | { type: 'finish'; finishReason: string; usage: TokenUsage | undefined }
  | { type: 'progress' };

const PROGRESS: WirePart = { type: 'progress' };

/**
 * A tool call the model made though the call declared no tools, as the SDK hands it back: its
 * input parsed when it is JSON, else the text that came.
 */
export function undeclaredToolCall(toolCallId: string, toolName: string, text: string): ToolCall {
  let input: unknown = text;
  try {
    input = JSON.parse(text) as unknown;
  } catch {
    // not JSON: kept as text
  }
  return { toolCallId, toolName, input };
}

interface ToolCallText {
  id: string;
  name: string;
  text: string;
}

interface OpenAIUsage {
  prompt_tokens?: number;
  completion_tokens?: number;
  prompt_tokens_details?: { cached_tokens?: number | null } | null;
  completion_tokens_details?: { reasoning_tokens?: number | null } | null;
}

interface ToolCallDelta {
  index?: number;
  id?: string;
  function?: { name?: string; arguments?: string };
}

interface ChoiceMessage {
  content?: string | null;
  reasoning_content?: string | null;
  reasoning?: string | null;
  tool_calls?: ToolCallDelta[] | null;
}

interface Completion {
  choices?: { message?: ChoiceMessage; delta?: ChoiceMessage; finish_reason?: string | null }[];
  usage?: OpenAIUsage | null;
  error?: { message?: string };
}

/** The SDK's mapping of OpenAI's finish reasons (`mapOpenAICompatibleFinishReason`). */
const FINISH_REASONS: Record<string, string> = { stop: 'stop', length: 'length', content_filter: 'content-filter', function_call: 'tool-calls', tool_calls: 'tool-calls' };
const finishReasonOf = (reason: string | null | undefined): string => (reason ? (FINISH_REASONS[reason] ?? 'other') : 'other');

/**
 * The SDK's reading of OpenAI usage (`convertOpenAICompatibleChatUsage`): missing counts are 0; no
 * usage at all is unknown (undefined), not zero: the manager then estimates it.
 */
function usageOf(usage: OpenAIUsage | null | undefined): TokenUsage | undefined {
  if (!usage) return undefined;
  return {
    input: usage.prompt_tokens ?? 0,
    cached_input: usage.prompt_tokens_details?.cached_tokens ?? 0,
    cache_write: 0,
    output: usage.completion_tokens ?? 0,
    reasoning: usage.completion_tokens_details?.reasoning_tokens ?? 0,
  };
}

/**
 * The messages as OpenAI's wire format, converted as the SDK converts them (a single text part is
 * sent as a string); undefined when one of them needs the SDK (images, files, tool calls, tool
 * results, reasoning parts).
 */
export function wireMessages(system: string | undefined, messages: readonly ModelMessage[]): WireMessage[] | undefined {
  const out: WireMessage[] = system ? [{ role: 'system', content: system }] : [];
  for (const message of messages) {
    if (message.role === 'system') {
      out.push({ role: 'system', content: message.content });
      continue;
    }
    if (message.role !== 'user' && message.role !== 'assistant') return undefined;
    const { content } = message;
    if (typeof content === 'string') {
      out.push({ role: message.role, content });
      continue;
    }
    const texts: { type: 'text'; text: string }[] = [];
    for (const part of content) {
      if (part.type !== 'text') return undefined;
      texts.push({ type: 'text', text: part.text });
    }
    if (message.role === 'assistant') out.push({ role: 'assistant', content: texts.map((t) => t.text).join('') });
    else out.push({ role: 'user', content: texts.length === 1 ? texts[0]!.text : texts });
  }
  return out;
}

/** What aborts a non-streamed call: an attempt's timer or its caller (the manager's `Attempt`), without an AbortSignal of its own. */
export interface AbortLike {
  readonly aborted: boolean;
  readonly reason: Error | undefined;
  /** Calls `listener` once when aborted; returns what unsubscribes it. */
  onAbort(listener: () => void): () => void;
}

/** One provider's Chat Completions endpoint: its URL, headers and a keep-alive connection pool. */
export class ChatWire {
  private readonly url: string;
  private readonly origin: string;
  private readonly path: string;
  private readonly headers: Record<string, string>;

  constructor(
    baseUrl: string,
    apiKey: string | null | undefined,
    extraHeaders: Record<string, string> | null | undefined,
    private readonly dispatcher: Agent,
  ) {
    this.url = `${baseUrl.replace(/\/+$/, '')}/chat/completions`;
    const url = new URL(this.url);
    this.origin = url.origin;
    this.path = `${url.pathname}${url.search}`;
    this.headers = {
      ...(apiKey ? { authorization: `Bearer ${apiKey}` } : {}),
      ...extraHeaders,
      'content-type': 'application/json',
    };
  }

  /** A non-streamed call; an answer longer than `maxBytes` is not read further (ModelAnswerLimitError). */
  async generate(call: WireCall, signal: AbortLike, maxBytes: number): Promise<WireAnswer> {
    let answer: TextAnswer;
    try {
      answer = await dispatchText(this.dispatcher, { origin: this.origin, path: this.path, method: 'POST', headers: this.headers, body: JSON.stringify(call) }, signal, maxBytes);
    } catch (error) {
      if (signal.aborted || error instanceof ModelAnswerLimitError) throw error;
      throw connectionError(this.url, call, error);
    }
    const { statusCode, text } = answer;
    if (statusCode < 200 || statusCode >= 300) throw this.refused(call, statusCode, rawHeaderRecord(answer.rawHeaders), text);
    const completion = completionOf(text);
    const choice = completion?.choices?.[0];
    if (!completion || !choice) throw invalidAnswer(this.url, call, statusCode, text, rawHeaderRecord(answer.rawHeaders));
    const message = choice.message ?? {};
    const toolCalls = (message.tool_calls ?? []).map((c) => undeclaredToolCall(c.id ?? '', c.function?.name ?? '', c.function?.arguments ?? ''));
    return {
      text: message.content ?? '',
      reasoning: message.reasoning_content ?? message.reasoning ?? undefined,
      toolCalls,
      finishReason: finishReasonOf(choice.finish_reason),
      usage: usageOf(completion.usage),
    };
  }

  /**
   * A streamed call (with `include_usage`): the parts in order, ending with `finish`. Tool calls
   * arrive in pieces and are handed on whole when the stream ends. An upstream error chunk, a
   * dropped connection, a stream that ends with neither a finish reason nor `[DONE]` (cut off) or
   * the signal throws; so do an event (a line) or tool calls longer than `maxChars`, which the wire
   * would hold. Stopping the iteration closes the upstream request.
   */
  async stream(call: WireCall, signal: AbortSignal, maxChars: number): Promise<AsyncIterable<WirePart>> {
    const { statusCode, body } = await this.post({ ...call, stream: true, stream_options: { include_usage: true } }, signal, maxChars);
    const { url } = this;
    return (async function* () {
      const tools = new Map<number, ToolCallText>();
      let finishReason: string | null | undefined;
      let usage: OpenAIUsage | null | undefined;
      let done = false;
      let grace: NodeJS.Timeout | undefined;
      let toolChars = 0;
      let rest = '';
      try {
        body.setEncoding('utf8');
        read: for await (const chunk of body as AsyncIterable<string>) {
          if (done) continue; // after [DONE]: only waiting for the response's end (see below)
          // Only the new chunk is searched for line ends: a long line costs its length once, not once per chunk.
          let start = 0;
          for (let end = chunk.indexOf('\n'); end !== -1; start = end + 1, end = chunk.indexOf('\n', start)) {
            const line = rest ? rest + chunk.slice(start, end) : chunk.slice(start, end);
            rest = '';
            if (!line.startsWith('data:')) continue;
            const data = line.slice(5).trim();
            if (data === '[DONE]') {
              // The answer is whole: nothing after [DONE] is read. The response usually ends with it:
              // the loop then runs out with the body (a break would destroy it, which builds two
              // errors with stack traces — ~3 % of a streamed call's CPU — for a connection that is
              // back in the pool anyway). One that ends a moment later (its own write) is waited for
              // a little, so as not to lose the connection; one kept open is closed after DONE_GRACE_MS.
              done = true;
              if (!responseEnded(body)) grace = setTimeout(() => body.destroy(), DONE_GRACE_MS);
              continue read;
            }
            const value = completionOf(data);
            if (!value) throw invalidAnswer(url, call, statusCode, data);
            if (value.error) throw upstreamError(url, call, value.error.message ?? 'Upstream error in the stream', undefined);
            if (value.usage) usage = value.usage;
            const choice = value.choices?.[0];
            const delta = choice?.delta;
            if (choice?.finish_reason) finishReason = choice.finish_reason;
            const reasoning = delta?.reasoning_content ?? delta?.reasoning;
            let emitted = false;
            if (reasoning) {
              emitted = true;
              yield { type: 'reasoning-delta', text: reasoning };
            }
            if (delta?.content) {
              emitted = true;
              yield { type: 'text-delta', text: delta.content };
            }
            for (const piece of delta?.tool_calls ?? []) {
              const index = piece.index ?? tools.size;
              const known = tools.get(index);
              const text = piece.function?.arguments ?? '';
              if ((toolChars += text.length) > maxChars) throw new ModelAnswerLimitError(502, `The model's answer exceeded ${maxChars} characters`);
              if (known) known.text += text;
              else tools.set(index, { id: piece.id ?? '', name: piece.function?.name ?? '', text });
            }
            if (!emitted) yield PROGRESS;
          }
          rest = start === 0 ? rest + chunk : chunk.slice(start);
          if (rest.length > maxChars) throw new ModelAnswerLimitError(502, `An event of the model's answer exceeded ${maxChars} characters`);
        }
      } catch (error) {
        // After [DONE] (the grace's end, a dropped connection) the answer is whole all the same.
        if (!done) {
          if (signal.aborted || error instanceof APICallError || error instanceof ModelAnswerLimitError) throw error;
          throw connectionError(url, call, error);
        }
      } finally {
        clearTimeout(grace);
        // Stopped early (at [DONE], a break, an error): the rest of the body is not wanted; this closes
        // the connection, unless the response was complete already (then it stays in the pool).
        if (!body.readableEnded) body.destroy();
      }
      // Ended cleanly but cut off (a proxy's timeout, a crashed server): a dropped connection, not an answer.
      if (!finishReason && !done) throw upstreamError(url, call, 'The stream ended before the answer did (no finish_reason, no [DONE])', undefined);
      for (const tool of tools.values()) yield { type: 'tool-call', toolCall: undeclaredToolCall(tool.id, tool.name, tool.text) };
      yield { type: 'finish', finishReason: finishReasonOf(finishReason), usage: usageOf(usage) };
    })();
  }

  /** Sends the request; a non-2xx answer throws `APICallError` with OpenAI's error message (of its first `maxChars`). */
  private async post(call: WireCall & { stream?: true; stream_options?: { include_usage: true } }, signal: AbortSignal, maxChars: number) {
    let response;
    try {
      response = await httpRequest(this.url, { method: 'POST', headers: this.headers, body: JSON.stringify(call), signal, dispatcher: this.dispatcher });
    } catch (error) {
      if (signal.aborted) throw error;
      throw connectionError(this.url, call, error);
    }
    const { statusCode, headers, body } = response;
    if (statusCode >= 200 && statusCode < 300) return response;
    throw this.refused(call, statusCode, flatHeaders(headers), await headOf(body, maxChars));
  }

  /** A non-2xx answer as `APICallError`, with OpenAI's error message when the body is its error object. */
  private refused(call: unknown, statusCode: number, headers: Record<string, string>, text: string): APICallError {
    let message = `HTTP ${statusCode}`;
    try {
      const parsed = JSON.parse(text) as { error?: { message?: string } };
      if (typeof parsed.error?.message === 'string') message = parsed.error.message;
    } catch {
      // not OpenAI's error object: the status says it
    }
    return upstreamError(this.url, call, message, statusCode, headers, text);
  }
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
        return true;
      },
      onData(chunk) {
        if ((size += chunk.length) > maxBytes) {
          abort?.(new ModelAnswerLimitError(502, `The model's answer exceeded ${maxBytes} bytes`));
          return false;
        }
        chunks.push(chunk);
        return true;
      },
      onComplete() {
        done();
        resolve({ statusCode, rawHeaders, text: chunks.length === 1 ? chunks[0]!.toString('utf8') : Buffer.concat(chunks).toString('utf8') });
      },
      onError(error) {
        done();
        reject(error);
      },
    });
  });
}

/** The start of a body, at most `maxChars` of it (an error answer: the rest is not read). */
async function headOf(body: Readable, maxChars: number): Promise<string> {
  let text = '';
  try {
    body.setEncoding('utf8');
    for await (const chunk of body as AsyncIterable<string>) {
      text += chunk;
      if (text.length >= maxChars) break;
    }
  } catch {
    // what came is all there is
  }
  return text.slice(0, maxChars);
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

function flatHeaders(headers: Record<string, string | string[] | undefined>): Record<string, string> {
  const out: Record<string, string> = {};
  for (const [name, value] of Object.entries(headers)) if (value !== undefined) out[name] = Array.isArray(value) ? value.join(', ') : value;
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
  let value: Completion | null;
  try {
    value = JSON.parse(text) as Completion | null;
  } catch {
    return undefined;
  }
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
  if (content !== undefined && content !== null && typeof content !== 'string') return undefined;
  if (toolCalls !== undefined && toolCalls !== null && !Array.isArray(toolCalls)) return undefined;
  return value;
}

/**
 * An answer that is no chat completion, as the SDK reports one (its JSON response handler): an
 * APICallError with the answer's 2xx status, so not retried, and a 502 for the caller.
 */
function invalidAnswer(url: string, call: unknown, statusCode: number, text: string, responseHeaders?: Record<string, string>): APICallError {
  return new APICallError({ message: 'Invalid JSON response', url, requestBodyValues: call, statusCode, responseHeaders, responseBody: text, isRetryable: false });
}

/** How long a stream's response may take to end after its [DONE] before its connection is closed. */
const DONE_GRACE_MS = 200;

/**
 * undici has pushed the response's end into its body (the request is complete, its connection back
 * in the pool), read or not. `readableEnded` turns true only once the reader reached it; Node has no
 * public name for this state (undici reads `_readableState` too).
 */
function responseEnded(body: Readable): boolean {
  return (body as Readable & { _readableState?: { ended?: boolean } })._readableState?.ended === true;
}

/** One pool of keep-alive connections per registry, shared by its providers (undici keeps one per origin). */
export function wireDispatcher(): Agent {
  return new Agent({ keepAliveTimeout: 10_000, keepAliveMaxTimeout: 60_000 });
}
