/**
 * The one path every model call in Keel takes: `chat`, `stream`, `embed`.
 *
 * resolve the model (id or alias) → reserve its worst-case cost with the meter → call the provider
 * with a timeout per attempt, retrying 429/5xx/connection errors with backoff (honouring
 * retry-after, bounded) → when retries are exhausted try the model's fallbacks → settle the meter
 * with the exact usage and cost (also after a failure or an abort). The caller's AbortSignal
 * aborts the upstream request at every stage.
 */
import {
  APICallError,
  asSchema,
  type AssistantContent,
  DownloadError,
  embedMany,
  type EmbedManyResult,
  type Experimental_DownloadFunction as DownloadFunction,
  type FinishReason,
  generateText,
  InvalidArgumentError,
  InvalidDataContentError,
  InvalidMessageRoleError,
  InvalidPromptError,
  InvalidResponseDataError,
  JSONParseError,
  type JSONSchema7,
  type JSONValue,
  type LanguageModel,
  type LanguageModelUsage,
  MessageConversionError,
  MissingToolResultsError,
  type ModelMessage,
  type OutputInterface,
  type ProviderMetadata,
  streamText,
  type ToolChoice,
  ToolChoiceViolationError,
  type ToolSet,
  TypeValidationError,
  UnsupportedFunctionalityError,
  wrapLanguageModel,
} from 'ai';
import { asLanguageModelUsage, convertToLanguageModelPrompt, prepareCallSettings } from 'ai/internal';

import { HttpError } from '../../core/errors.js';

import { AsyncQueue } from '../../utils/async-queue.js';
import { findInCauses } from '../../utils/error-chain.js';
import { isBlank } from '../../utils/text.js';
import { CallerAbort, type CallerSignal } from './abort.js';
import { answeredOn, answerOfAtMost, embeddingsAnswerLimit, logprobsAllowance, logprobsTooLong, logprobsWeight, STREAM_ANSWER } from './answer-limit.js';
import { isBuiltinModel } from './builtin-ids.js';
import type { ModelCatalog } from './catalog.js';
import { chargeableUsage, computeCost, estimateCost } from './cost.js';
import { CallDownloads, type DownloadLimits } from './downloads.js';
import {
  CLIENT_FAULT_UPSTREAM,
  ModelAnswerError,
  ModelAnswerLimitError,
  ModelArgumentError,
  ModelCallAbortedError,
  ModelCapabilityError,
  ModelDownloadError,
  ModelNotFoundError,
  ModelOptionError,
  ModelTimeoutError,
  ModelToolChoiceError,
  ModelValueError,
  StreamErrorEvent,
  UpstreamError,
} from './errors.js';
import {
  type AbortLike,
  allFinite,
  type ChoiceLogprobs,
  openAIErrorFields,
  type OpenAIWire,
  rawLogprobs,
  rawRefusal,
  reportedTokensOf,
  toolCallOf,
  type WireCall,
  type WireEmbeddings,
  type WireEmbeddingsCall,
  wireMessages,
  type WireTool,
  type WireToolChoice,
} from './openai-wire.js';
import type { ProviderSdks } from './provider-sdks.js';
import { type ProviderRecord, type ProviderRecords, type ProviderRegistry, ProviderUnavailableError } from './providers.js';
import { estimateTextTokens } from './token-estimate.js';
import { type Capability, type ModelInfo, type ModelOverride, type ProviderKind, STAND_IN_FOR, type TokenUsage, ZERO_USAGE } from './types.js';

// ==================== Interfaces ====================

/** Who a call is for; passed through untouched to the meter (usage records, credits, limits). */
export interface CallContext {
  user_id?: string;
  api_key_id?: string | null;
  /** The key's limits as authentication read them (exact: see cacheApiKeys); absent, the meter reads them. */
  api_key_limits?: { max_budget: string | null; rpm: number | null } | null;
  project_id?: string | null;
  agent_id?: string | null;
  run_id?: string | null;
  /**
   * The key's rpm does not count this call; its max_budget still does. For work one request
   * queued in bulk, which the client cannot pace (a document's embedding batches).
   */
  rpm_exempt?: boolean;
}

export type Operation = 'chat' | 'stream' | 'embed';

interface CallOptions {
  /** Catalog id or alias. */
  model: string;
  /** Aborts the call, the upstream request included: an AbortSignal, or a lighter `CallerAbort`. */
  signal?: CallerSignal;
  /** Per attempt; for streams, the longest wait for the next chunk (their total: `streamTimeoutMs`). Default: MODEL_TIMEOUT_MS. */
  timeoutMs?: number;
  /**
   * A client waits for this answer and backs off by itself when told (the `/v1` gateway's, by
   * Retry-After). A provider whose retry-after asks for longer than MODEL_RETRY_MAX_WAIT_MS is not
   * tried again — its fallbacks are, else the call ends at once with that wait
   * (`UpstreamError.waitPassedOn`); an attempt that timed out is not tried again on the same model
   * either (a hung upstream held the client a timeout per try: 6 min by default, past the 300 s
   * Node's fetch waits for headers; an answer that took too long takes as long again, billed again).
   * Without it (runs, ingestion: SPEC §5 retries provider errors and timeouts with backoff) the wait
   * is capped and the call retried.
   */
  interactive?: boolean;
  context?: CallContext;
  /** Other Keel deployments' hop marks the call's request came with (core/hop.ts): sent on with this deployment's. */
  hops?: readonly string[];
}

export type { ChoiceLogprobs } from './openai-wire.js';

export interface ChatRequest extends CallOptions {
  messages: ModelMessage[];
  system?: string;
  /** Tools without `execute`: the model's tool calls come back for the caller (the runner) to run. */
  tools?: ToolSet;
  toolChoice?: ToolChoice<ToolSet>;
  maxOutputTokens?: number;
  temperature?: number;
  topP?: number;
  frequencyPenalty?: number;
  presencePenalty?: number;
  /** Asks the provider for repeatable sampling (where it supports it). */
  seed?: number;
  /**
   * OpenAI's `reasoning_effort` (`none`…`max`): as it is for openai and openai-compatible providers,
   * as a thinking budget (THINKING_BUDGETS) for Anthropic and Google models that reason.
   */
  reasoningEffort?: string;
  /** OpenAI's `parallel_tool_calls` (false: at most one tool call an answer), for openai and openai-compatible; Anthropic's `disableParallelToolUse` when false. */
  parallelToolCalls?: boolean;
  /** OpenAI's `user` (the end user, for the provider's abuse checks), for openai and openai-compatible. */
  user?: string;
  /** OpenAI's `prompt_cache_key` (what its prompt cache buckets requests by), for `openai` providers only. */
  promptCacheKey?: string;
  /** OpenAI's `prompt_cache_retention` (how long its prompt cache keeps the prompt), for `openai` providers only, as `promptCacheKey`. */
  promptCacheRetention?: 'in_memory' | '24h';
  /** OpenAI's `safety_identifier` (the end user, for the provider's abuse checks: `user`'s successor), for `openai` providers only. */
  safetyIdentifier?: string;
  /**
   * OpenAI's `logprobs` (true: the answer's token log probabilities, `ChatResult.logprobs` and the
   * stream's text events) and `top_logprobs` (that many likeliest tokens at each place), for openai
   * and openai-compatible providers; another provider's model refuses the call (ModelOptionError).
   */
  logprobs?: boolean;
  topLogprobs?: number;
  /** OpenAI's `logit_bias` (token id → bias, -100 to 100), for openai and openai-compatible providers, as `logprobs`. */
  logitBias?: Record<string, number>;
  /** OpenAI's `verbosity` (`low`, `medium`, `high`), for openai and openai-compatible providers, as `logprobs`. */
  verbosity?: string;
  /**
   * OpenAI's `prediction` (predicted output, for speed): for openai and openai-compatible providers;
   * the others have no such thing and answer the same without it.
   */
  prediction?: Record<string, JSONValue>;
  stopSequences?: string[];
  /** JSON output (with a schema where the provider supports one); the text is returned unparsed. */
  responseFormat?: JsonResponseFormat;
  providerOptions?: Record<string, Record<string, never>> | ProviderMetadata;
  /**
   * `stream` only. false: the result's `text`, `reasoningText` and `responseMessages` stay empty,
   * for a caller that takes the answer from the events (the /v1 gateway). The answer is then held
   * only while its events wait for the caller, so a slow reader of a long answer costs Keel its
   * queues, not everything read so far (up to MODEL_MAX_RESPONSE_BYTES). Default true.
   */
  keepAnswer?: boolean;
}

export interface JsonResponseFormat {
  type: 'json';
  schema?: JSONSchema7;
  name?: string;
  description?: string;
  /** Whether the provider must hold the answer to the schema exactly (OpenAI's `strict`); default true, as the SDK sends it. */
  strict?: boolean;
}

export interface ToolCall {
  toolCallId: string;
  toolName: string;
  input: unknown;
  /**
   * The arguments as the model wrote them, where the provider gave them as text (OpenAI-style
   * providers, streamed Anthropic input): what the OpenAI-compatible surface answers, as OpenAI
   * does. `input` is their parse, whose numbers are doubles (an id past 2^53 comes out changed).
   */
  text?: string;
}

export interface CallOutcome {
  /** The model that answered (a fallback, maybe) and its provider. */
  model: string;
  provider: string;
  usage: TokenUsage;
  /** Decimal string, 12 decimal places at most. */
  cost: string;
  latency_ms: number;
}

export interface ChatResult extends CallOutcome {
  /** What the model said, without its refusal. */
  text: string;
  reasoningText?: string;
  /**
   * The model's refusal to answer, where its provider tells one apart (OpenAI's `refusal`, with
   * structured outputs): set instead of `text`, whose JSON it would not be; the answer's
   * `responseMessages` carry it as the assistant's text. Undefined when the model did not refuse.
   */
  refusal?: string;
  toolCalls: ToolCall[];
  /** The answer's token log probabilities (OpenAI's `choices[].logprobs`), when the call asked for them and the provider gave them: `chat` only (a stream's are in its text events). */
  logprobs?: ChoiceLogprobs;
  finishReason: string;
  /** Assistant (and tool-call) messages to append to the conversation. */
  responseMessages: ModelMessage[];
  time_to_first_token_ms: number | null;
}

export type StreamEvent =
  /** `logprobs`: the piece's token log probabilities, when the call asked for them (as OpenAI's chunk carries them with its text). */
  | { type: 'text-delta'; text: string; logprobs?: unknown[] }
  | { type: 'reasoning-delta'; text: string }
  /** A piece of the model's refusal (see ChatResult's `refusal`). */
  | { type: 'refusal-delta'; text: string; logprobs?: unknown[] }
  | { type: 'tool-call'; toolCall: ToolCall }
  | { type: 'finish'; result: ChatResult };

/**
 * Iterate for events; `result` settles when the stream ends (rejects on failure or abort). The
 * stream goes only as fast as it is iterated: a caller that awaits `result` without iterating holds
 * the upstream back once EVENTS_HIGH_WATER events wait, until the stream's deadline ends it.
 */
export interface ModelStream extends AsyncIterable<StreamEvent> {
  result: Promise<ChatResult>;
  /**
   * The model whose output the events carry (a fallback, maybe), from the first of them on:
   * retries and fallbacks end there. Undefined before.
   */
  readonly model: string | undefined;
}

export interface EmbedRequest extends CallOptions {
  values: string[];
  /**
   * The size of the vectors asked for (OpenAI's `dimensions`, Google's `outputDimensionality`), for
   * models that can shorten theirs; an answer of another size is refused (ModelAnswerError).
   */
  dimensions?: number;
  /** OpenAI's end-user id, for OpenAI and OpenAI-compatible providers. */
  user?: string;
  /**
   * The vectors are compared with vectors made by this model (a knowledge base's, stored under its
   * id): its fallbacks are not tried. Another model's vectors are of another space (of another
   * size, often), which a search would compare with these as if they were alike.
   */
  sameModel?: boolean;
}

export interface EmbedResult extends CallOutcome {
  /** float32, as OpenAI's models make them (and pgvector stores them). */
  embeddings: Float32Array[];
}

/** What the meter sees before a call: its worst-case cost. */
export interface CostEstimate {
  operation: Operation;
  model: string;
  provider: string;
  input_tokens: number;
  max_output_tokens: number;
  cost: string;
  context: CallContext;
  /** A fallback tried after the call's first model: the same call, already counted against rate limits. */
  fallback?: boolean;
}

export type CallStatus = 'success' | 'error' | 'aborted';

/** One row per model call (per model tried, when fallbacks run). */
export interface UsageRecord {
  operation: Operation;
  model: string;
  provider: string;
  tokens: TokenUsage;
  /** True when the provider reported no usage (an aborted stream, an answer without usage): tokens are estimated. */
  estimated: boolean;
  cost: string;
  latency_ms: number;
  time_to_first_token_ms: number | null;
  status: CallStatus;
  error: string | null;
  attempts: number;
  started_at: Date;
  context: CallContext;
}

export interface UsageReservation {
  /** Called exactly once, after the call ended; never on the caller's path (not awaited). */
  settle(record: UsageRecord): void | Promise<void>;
  /**
   * The reservation holds credit (an account's, a key's budget) sized by the estimate's
   * `max_output_tokens`: a call whose client set no maximum sends that one upstream, so that it
   * cannot cost more than was held. Absent or false (nothing held: billing off and no key budget,
   * a free model, a meter that only records), an OpenAI-style provider is sent none and answers as
   * OpenAI does, up to the model's own limit (sentOutputTokens).
   */
  readonly holdsOutput?: boolean;
}

/**
 * Metering: `reserve` runs before the upstream request (throw to refuse the call, e.g. 402) and
 * returns the reservation that `settle` closes with the actual usage. Billing and usage records
 * plug in here.
 */
export interface UsageMeter {
  reserve(estimate: CostEstimate): UsageReservation | Promise<UsageReservation>;
}

/** A meter that only reports usage (no reservation). */
export function usageCallback(onUsage: (record: UsageRecord) => void | Promise<void>): UsageMeter {
  return { reserve: () => ({ settle: onUsage }) };
}

export interface ModelManagerOptions {
  catalog: ModelCatalog;
  providers: ProviderRegistry;
  meter?: UsageMeter;
  timeoutMs: number;
  /** A streamed call's total time, retries and fallbacks included (MODEL_STREAM_TIMEOUT_MS). */
  streamTimeoutMs: number;
  /**
   * The most an answer may carry (MODEL_MAX_RESPONSE_BYTES): a streamed answer's text, reasoning
   * and tool-call input together, in characters; on the wire also a non-streamed body, in bytes, and
   * one event of a stream (the SDK's providers are given the same limit: ProviderRegistry).
   */
  maxResponseBytes: number;
  /** The most downloaded of an image or file a prompt names by URL (MODEL_MAX_DOWNLOAD_BYTES; default 20 MiB). */
  maxDownloadBytes?: number;
  /** The most images and files one call fetches (MODEL_MAX_DOWNLOADS; default 50), and their bytes together (MODEL_MAX_DOWNLOAD_TOTAL_BYTES; default 50 MiB): downloads.ts. */
  maxDownloads?: number;
  maxDownloadTotalBytes?: number;
  maxRetries: number;
  /** The longest wait between two attempts; a longer retry-after is capped to it (or passed on: `interactive`). */
  retryMaxWaitMs: number;
  /** First backoff step (doubles per retry, with jitter). Default 500 ms. */
  retryBaseDelayMs?: number;
  /**
   * Output tokens for a call that sets no maximum (capped by the model's own `max_output_tokens`):
   * sent upstream as its maximum, so the worst case its estimate assumed is a real bound.
   */
  defaultMaxOutputTokens: number;
  /** Where settle failures go (a meter must not break calls). */
  onMeterError?: (error: unknown, record: UsageRecord) => void;
}

export interface ModelView extends ModelInfo {
  available: boolean;
  unavailable_reason: string | null;
}

/** A model as the models routes show it (publicView). */
export interface ModelPublicView extends ModelView {
  /** Each of its fallbacks that its calls skip as things stand, and why (see fallbackUnavailable). */
  unavailable_fallbacks: { name: string; reason: string }[];
  /**
   * The model its calls go to as things stand (see answersFor), null when none can take them. For a
   * model that both chats and embeds, whose calls of each kind may fall to different fallbacks: the
   * one its chat calls go to, else its embeddings'.
   */
  answered_by: string | null;
}

/** What is known of a call ahead of it, for answersFor: what it does, and where known its request (as `chat` would be given it). */
export interface CallShape {
  /** The operation (one of STAND_IN_FOR); unset: any the model does. */
  capability?: Capability;
  request?: Partial<ChatRequest>;
}

// ==================== Internals ====================

/** A value as the text it is sent as (a tool call's input, a prompt's messages). */
const asText = (value: unknown): string => (typeof value === 'string' ? value : (JSON.stringify(value) ?? ''));

const estimateTokens = (value: unknown): number => Math.ceil(estimateTextTokens(asText(value)));

/**
 * What a predicted output (OpenAI's `prediction`) may add to the output billed: the tokens of the
 * prediction the answer does not use are billed as output (`rejected_prediction_tokens`, counted in
 * `completion_tokens`), and OpenAI does not say that `max_tokens` bounds them, so a hold of the
 * maximum alone could be passed by the whole prediction. Its UTF-8 bytes, not the prompt's estimate:
 * a byte-level tokenizer spends at most a token a byte, and the client chooses the text — punctuation
 * or random characters, a token a character or so, held at a quarter of a token passed the hold ~4×
 * at the output price.
 */
function predictedTokens(prediction: ChatRequest['prediction']): number {
  const content = prediction?.content;
  if (typeof content === 'string') return Buffer.byteLength(content, 'utf8');
  if (!Array.isArray(content)) return 0;
  let bytes = 0;
  for (const part of content) {
    const text = (part as { text?: unknown } | null)?.text;
    if (typeof text === 'string') bytes += Buffer.byteLength(text, 'utf8');
  }
  return bytes;
}

/**
 * What an image or file in a prompt reserves at least. Its text (a URL, or base64 of a small PNG)
 * says nothing of what the provider bills for it: a large image costs up to ~1,450 tokens at
 * OpenAI's GPT-4o and GPT-5 (tiles), ~1,600 at Anthropic, ~3,800 at OpenAI's nano models (patches
 * times their multiplier). Counted by its text alone, an image by URL with `max_tokens: 1` held ~30
 * tokens and was charged ~1,000: calls in parallel took a balance far below zero.
 */
export const MEDIA_PART_TOKENS = 4_096;

/**
 * What a prompt's images and files cost beyond (or instead of) their text in its estimate. An image
 * counts MEDIA_PART_TOKENS whatever its text: a provider scales it down, so a large one inline (a 3 MB
 * PNG's base64, ~1,000,000 tokens as text) held and, unanswered, was charged ~250 times what it costs.
 * A file (a PDF) counts its text's estimate, and MEDIA_PART_TOKENS at least: its pages are billed.
 */
function mediaAllowance(messages: ModelMessage[] | undefined): number {
  let tokens = 0;
  for (const message of messages ?? []) {
    if (message.role !== 'user' || typeof message.content === 'string') continue;
    for (const part of message.content) {
      if (part.type === 'image') tokens += MEDIA_PART_TOKENS - estimateTokens(part.image);
      else if (part.type === 'file') tokens += Math.max(0, MEDIA_PART_TOKENS - estimateTokens(part.data));
    }
  }
  return tokens;
}

/**
 * Whether `model` is known not to read images: a built-in model (the catalog data's, or as a
 * superuser changed it) without `vision`. A custom model's capabilities are the operator's, who may
 * not have said (the default is `chat` alone): its images are sent, for its server to take or refuse.
 */
const withoutVision = (model: ModelInfo): boolean => !model.capabilities.includes('vision') && isBuiltinModel(model.id);

/** Where a prompt's first image is, as OpenAI names it in its refusal (`messages[1].content[0].type`); undefined without one. */
function firstImageAt(messages: readonly ModelMessage[]): string | undefined {
  for (let index = 0; index < messages.length; index++) {
    const { role, content } = messages[index]!;
    if (role !== 'user' || typeof content === 'string') continue;
    const part = content.findIndex((p) => p.type === 'image' || (p.type === 'file' && p.mediaType.startsWith('image/')));
    if (part >= 0) return `messages[${index}].content[${part}].type`;
  }
  return undefined;
}

/**
 * The SDK's usage as the provider reported it: undefined when it reported none (the SDK leaves
 * both counts undefined then) or left a count out (`chargeableUsage` then estimates the call).
 */
function toTokenUsage(usage: LanguageModelUsage | undefined): TokenUsage | undefined {
  if (usage?.inputTokens === undefined || usage.outputTokens === undefined || leavesCountOut(usage.raw)) return undefined;
  return {
    input: usage.inputTokens,
    cached_input: usage.inputTokenDetails?.cacheReadTokens ?? 0,
    cache_write: usage.inputTokenDetails?.cacheWriteTokens ?? 0,
    output: usage.outputTokens,
    reasoning: usage.outputTokenDetails?.reasoningTokens ?? 0,
  };
}

/** Count names of Anthropic's usage and Google's `usageMetadata`: usage of theirs is taken as the SDK read it. */
const OTHER_USAGE_COUNTS = ['input_tokens', 'output_tokens', 'promptTokenCount', 'candidatesTokenCount'];

/**
 * The SDK reads a count that OpenAI-style usage left out, or sent as null, as 0 (`usage: {}` and
 * `{total_tokens: 57}` both read as 0 in, 0 out): told apart by the usage as it came.
 */
function leavesCountOut(raw: unknown): boolean {
  if (!raw || typeof raw !== 'object' || OTHER_USAGE_COUNTS.some((name) => name in raw)) return false;
  const { prompt_tokens: input, completion_tokens: output } = raw as Record<string, unknown>;
  return typeof input !== 'number' || typeof output !== 'number';
}

/**
 * The least time left before a stream's deadline (MODEL_STREAM_TIMEOUT_MS) that a retry or a
 * fallback is sent with: a tenth of the stream's time, at most a second. A try sent with a few ms
 * left went upstream (billed for its prompt) only to be cut off at the deadline, its caller told
 * of a timeout rather than of the provider's refusal; a second is less than most models take to a
 * first token, and a tenth keeps a short deadline (1 s, the least it may be) usable.
 */
const streamTryFloorMs = (streamTimeoutMs: number): number => Math.min(1_000, streamTimeoutMs / 10);

/** A provider's 2xx answer that could not be used (see `run`): the provider billed it. */
const brokenAnswer = (error: Error): boolean =>
  error instanceof ModelAnswerLimitError ? error.answered : error instanceof UpstreamError && error.upstreamStatus !== undefined && error.upstreamStatus >= 200 && error.upstreamStatus < 300;

/** The usage its provider reported for the call (as priced when the answer went out), undefined when none. */
const reportedUsage = (state: AttemptState): TokenUsage | undefined => (state.priced ? state.priced.usage : chargeableUsage(state.usage));

/** What a call is charged for when its provider reported no usage: the prompt's estimate and the output's (estimateTextTokens). */
function estimatedUsage(state: AttemptState): TokenUsage {
  return { ...ZERO_USAGE, input: state.inputTokens, output: Math.ceil(state.outputTokens) };
}

/**
 * A tool call's output tokens, estimated: its name and its arguments (a call without arguments is
 * still output the provider charges for: a stream of such calls was estimated at nothing).
 */
const toolCallTokens = (call: ToolCall): number => estimateTextTokens(call.toolName) + estimateTextTokens(asText(call.input));

/** An answer's output tokens as estimateTextTokens counts them, as the stream loop does while they arrive. */
function saidTokens(said: Said): number {
  let tokens = estimateTextTokens(said.text) + estimateTextTokens(said.reasoningText ?? '') + estimateTextTokens(said.refusal ?? '');
  for (const call of said.toolCalls) tokens += toolCallTokens(call);
  return tokens;
}

/**
 * Asks the provider for JSON and hands its text back as it came: the caller (the /v1 gateway, a
 * runner) decides what an invalid answer means, as OpenAI's API does.
 */
function jsonOutput(format: JsonResponseFormat): OutputInterface<string, string, never> {
  const { type, schema, name, description } = format;
  return {
    name: 'json',
    responseFormat: Promise.resolve({ type, schema, name, description }),
    parseCompleteOutput: ({ text }) => Promise.resolve(text),
    parsePartialOutput: ({ text }) => Promise.resolve({ partial: text }),
    createElementStreamTransform: () => undefined,
  };
}

/** The provider model interface the SDK's own calls end in (what every registry provider creates). */
type LanguageModelV3 = Extract<LanguageModel, { specificationVersion: 'v3' }>;

/** A tool call from the provider model itself, read as the wire reads one (`declared`: the call had tools). */
const modelToolCall = (declared: boolean, part: { toolCallId: string; toolName: string; input: string }): ToolCall => toolCallOf(declared, part.toolCallId, part.toolName, part.input);

type CallOptionsV3 = Parameters<LanguageModelV3['doGenerate']>[0];

/** `model` telling `read` the usage of each answer it gives (`doGenerate`), before the SDK reads the answer. */
function readingUsage(model: LanguageModel, read: (usage: Awaited<ReturnType<LanguageModelV3['doGenerate']>>['usage']) => void): LanguageModel {
  if (typeof model !== 'object' || model.specificationVersion !== 'v3') return model;
  return wrapLanguageModel({
    model,
    middleware: {
      specificationVersion: 'v3',
      wrapGenerate: async ({ doGenerate }) => {
        const result = await doGenerate();
        read(result.usage);
        return result;
      },
    },
  });
}

/** A call that goes to the provider model directly (directModel): the model, and the call's tools as declared to it. */
interface DirectCall {
  languageModel: LanguageModelV3;
  tools: FunctionTool[] | undefined;
}
/** A function tool as `generateText` declares it to a provider model (prepareToolsAndToolChoice). */
type FunctionTool = Extract<NonNullable<CallOptionsV3['tools']>[number], { type: 'function' }>;

/**
 * The call's tools as `generateText` declares them to a provider model (prepareToolsAndToolChoice);
 * null when one needs the SDK itself: a provider tool, a tool it would run or whose input it would
 * validate (a Zod schema, say), or a schema that is not at hand (a lazy one, whose JSON schema is a
 * promise). Undefined for an empty set, which the SDK sends as no tools.
 */
function functionTools(tools: ToolSet): FunctionTool[] | undefined | null {
  const out: FunctionTool[] = [];
  for (const [name, tool] of Object.entries(tools)) {
    if (tool.type !== undefined && tool.type !== 'function' && tool.type !== 'dynamic') return null;
    if (tool.execute !== undefined) return null;
    const schema = asSchema(tool.inputSchema);
    if (schema.validate !== undefined) return null;
    const inputSchema = atHand(schema.jsonSchema);
    if (inputSchema === undefined) return null;
    out.push({
      type: 'function',
      name,
      description: tool.description,
      inputSchema: inputSchema,
      ...(tool.inputExamples !== undefined && tool.inputExamples !== null ? { inputExamples: tool.inputExamples } : {}),
      providerOptions: tool.providerOptions,
      ...(tool.strict !== undefined && tool.strict !== null ? { strict: tool.strict } : {}),
    });
  }
  return out.length ? out : undefined;
}

/**
 * What a call's tools add to the prompt the provider counts: each one's name, description and
 * input schema (a schema the SDK only makes later counts as none). Counted in the estimate a call
 * reserves for: with only the tools' names there, a 40 KB description went upstream unreserved.
 */
function toolsSent(tools: ToolSet | undefined): unknown[] {
  if (!tools) return [];
  return Object.entries(tools).map(([name, tool]) => {
    let schema: unknown;
    try {
      schema = tool.inputSchema === undefined ? undefined : atHand(asSchema(tool.inputSchema).jsonSchema);
    } catch {
      // a schema that cannot be made now is made (or refused) by the call itself
    }
    return [name, tool.description ?? '', schema ?? null];
  });
}

/** A tool's JSON schema when it is at hand; undefined for a lazy schema's (a promise). */
function atHand(schema: JSONSchema7 | PromiseLike<JSONSchema7>): JSONSchema7 | undefined {
  return typeof (schema as PromiseLike<JSONSchema7>).then === 'function' ? undefined : (schema as JSONSchema7);
}

/** Function tools as the SDK's openai-compatible model sends them (`prepareTools`: name, description, parameters, strict). */
const wireTools = (tools: readonly FunctionTool[]): WireTool[] =>
  tools.map((t) => ({ type: 'function', function: { name: t.name, description: t.description, parameters: t.inputSchema, ...(t.strict !== undefined ? { strict: t.strict } : {}) } }));

/** The tool choice as `generateText` tells a provider model: `auto` when the call names none. */
function callToolChoice(choice: ToolChoice<ToolSet> | undefined): NonNullable<CallOptionsV3['toolChoice']> {
  if (choice === undefined) return { type: 'auto' };
  return typeof choice === 'string' ? { type: choice } : { type: 'tool', toolName: choice.toolName };
}

/**
 * What `generateText` checks of an answer to a call with tools before handing it back: a tool
 * choice other than `auto` that the model did not keep is an error (ToolChoiceViolationError),
 * checked here for the answers read without it (the wire's, the provider model's) so that every
 * path answers alike.
 */
function enforceToolChoice(choice: ToolChoice<ToolSet> | undefined, calls: readonly ToolCall[], finishReason: string, model: ModelInfo): void {
  const told = callToolChoice(choice);
  if (told.type === 'auto') return;
  const kept = told.type === 'none' ? calls.length === 0 : calls.some((call) => told.type === 'required' || call.toolName === told.toolName);
  if (!kept) throw toolChoiceViolation(told, finishReason, model);
}

const toolChoiceViolation = (toolChoice: { type: 'none' | 'required' } | { type: 'tool'; toolName: string }, finishReason: string, model: ModelInfo) =>
  new ToolChoiceViolationError({ toolChoice, finishReason: finishReason as FinishReason, provider: model.provider, modelId: model.id, content: [] });

function wireToolChoice(choice: ToolChoice<ToolSet> | undefined): WireToolChoice {
  const told = callToolChoice(choice);
  return told.type === 'tool' ? { type: 'function', function: { name: told.toolName } } : told.type;
}

/** What a chat answer said: ChatResult's fields beside its outcome and finish. */
type Said = Pick<ChatResult, 'text' | 'reasoningText' | 'refusal' | 'toolCalls' | 'responseMessages' | 'logprobs'>;

/**
 * Whether the AI SDK's openai model takes `id` for a reasoning model (its
 * getOpenAILanguageModelCapabilities, not exported): o-series and gpt-5 on, but for the
 * `gpt-N-chat` ones. For those it drops `logprobs` and `logit_bias` with a warning no one reads.
 */
function sdkReasoningModel(id: string): boolean {
  if (/^o\d+(?:-|$)/.test(id)) return true;
  const gpt = /^gpt-(\d+)(?:\.(\d+))?(?:-(.+))?$/.exec(id);
  return gpt !== null && Number(gpt[1]) >= 5 && !(gpt[2] === undefined && (gpt[3] ?? '').startsWith('chat'));
}

/**
 * What of the call a provider's SDK model may drop that the client would miss in the answer (see
 * unheardOption for which): the first such option, by its name in OpenAI's API. `logprobs` (the answer would come
 * without them) and a `logit_bias` (tokens the client banned or forced would go unheeded). Hints
 * a model may follow its own way (`seed`, penalties, `verbosity`, and `reasoning_effort` or
 * `parallel_tool_calls` where nativeOptions has no place for them) are dropped there: generic
 * clients send them to any model, and a 400 would stop calls that answer well without them
 * (docs/decisions.md).
 */
function droppedBy(request: Partial<ChatRequest>): string | undefined {
  if (request.logprobs) return 'logprobs';
  if (request.logitBias !== undefined) return 'logit_bias';
  return undefined;
}

/** A provider kind with an API of its own, which OpenAI's requests are fitted to (unlike OpenAI-style ones, which take them as they are). */
const ownApi = (kind: ProviderKind | undefined): kind is 'anthropic' | 'google' => kind === 'anthropic' || kind === 'google';

/** Whether a provider kind reads a text as none (BLANK). */
type Blank = (text: string) => boolean;

/**
 * The text each provider kind with an API of its own reads as none. Anthropic refuses a text block
 * that is empty or only whitespace (400). Google's SDK model leaves an empty assistant text out and
 * sends an empty user or system one, which Gemini refuses (a part without text); whitespace it
 * sends as it is, and Gemini answers it, so only empty text is none there.
 */
const BLANK: Readonly<Record<'anthropic' | 'google', Blank>> = {
  anthropic: isBlank,
  google: (text) => text.length === 0,
};

/** A system text that says nothing, for either provider: only whitespace (to Gemini, past the start, it would have nowhere to go). */
const SILENT_SYSTEM: Blank = BLANK.anthropic;

/** A part the model has something to read in: any but a `blank` text. */
const readable = (part: { type: string; text?: string }, blank: Blank): boolean => part.type !== 'text' || !blank(part.text!);

/** A message with something for the model to read (a tool's result always: both providers take an empty output). */
function saysSomething(message: ModelMessage, blank: Blank): boolean {
  if (message.role === 'tool') return true;
  if (message.role === 'system') return !SILENT_SYSTEM(message.content);
  return typeof message.content === 'string' ? !blank(message.content) : message.content.some((part) => readable(part, blank));
}

/**
 * Whether a conversation has a user or assistant message that says something: Anthropic refuses
 * one without (`messages: []` once the SDK has taken the system messages out; an empty block),
 * Google too (`contents` empty; a part without text), OpenAI answers it. Stops at the first such
 * message, nearly always the first or second: a cheap check on every call.
 */
const answerable = (messages: readonly ModelMessage[], blank: Blank): boolean => messages.some((message) => message.role !== 'system' && saysSomething(message, blank));

/**
 * The index of the last message where it is a user or system message that says nothing and
 * leaving it out (withoutBlanks) would end the conversation with an assistant message, else -1:
 * the client asked for a new turn, and the provider would take that assistant message for a
 * prefill to continue. (A blank last assistant message is left out: the conversation then ends as
 * a prefill of the client's would.) A conversation that ends in something said: at once.
 */
function blankAfterAssistant(messages: readonly ModelMessage[], blank: Blank): number {
  const last = messages.length - 1;
  if (last < 0 || messages[last]!.role === 'assistant' || saysSomething(messages[last]!, blank)) return -1;
  for (let i = last - 1; i >= 0; i -= 1) {
    const message = messages[i]!;
    if (saysSomething(message, blank)) return message.role === 'assistant' ? last : -1;
  }
  return -1;
}

/** A function name Gemini takes: OpenAI's (letters, digits, `_`, `-`) may start with a digit or `-`, Gemini's not. */
const GEMINI_FUNCTION_NAME = /^[A-Za-z_][\w.:-]{0,63}$/;

/**
 * What of a conversation that says something Google refuses and OpenAI takes (400 upstream, or
 * the SDK model's refusal after the hold): a system message past the start (lateSystemMessage),
 * a function name Gemini does not take (GEMINI_FUNCTION_NAME; named in the message, since the
 * tools' object puts numeric names first and so loses their index).
 */
function untakenByGoogle(messages: readonly ModelMessage[], tools: ToolSet | undefined): { param: string; reason: string } | undefined {
  const late = lateSystemMessage(messages, BLANK.google);
  if (late >= 0) return { param: `messages[${late}]`, reason: 'takes system and developer messages only before the first user or assistant message' };
  const misnamed = tools && Object.keys(tools).find((name) => !GEMINI_FUNCTION_NAME.test(name));
  if (misnamed !== undefined) return { param: 'tools', reason: `takes function names that start with a letter or _, not ${JSON.stringify(misnamed)}` };
  return undefined;
}

/**
 * The index of the first system message that says something after a user, assistant or tool
 * message that does (blank ones are not sent: withoutBlanks), else -1. Google's SDK model refuses
 * one (Gemini's system instruction is the conversation's head, with no place further on); OpenAI
 * and Anthropic take them anywhere.
 */
function lateSystemMessage(messages: readonly ModelMessage[], blank: Blank): number {
  let started = false;
  for (let i = 0; i < messages.length; i += 1) {
    const message = messages[i]!;
    if (!saysSomething(message, blank)) continue;
    if (message.role !== 'system') started = true;
    else if (started) return i;
  }
  return -1;
}

/**
 * The conversation as Anthropic and Google take it: without the text parts `blank` for the provider
 * (BLANK) and the messages left saying nothing (a replayed empty answer, an empty system message),
 * which it refuses and which said nothing to the model. The SDK model then joins two user turns
 * that met (Anthropic; Gemini takes them apart). Unchanged, the same array.
 */
function withoutBlanks(messages: ModelMessage[], blank: Blank): ModelMessage[] {
  const whole = (message: ModelMessage) =>
    message.role === 'tool' || typeof message.content === 'string' ? saysSomething(message, blank) : message.content.every((part) => readable(part, blank));
  if (messages.every(whole)) return messages;
  const out: ModelMessage[] = [];
  for (const message of messages) {
    if (message.role === 'tool' || typeof message.content === 'string') {
      if (saysSomething(message, blank)) out.push(message);
      continue;
    }
    const content = (message.content as { type: string; text?: string }[]).filter((part) => readable(part, blank));
    if (content.length > 0) out.push({ ...message, content } as ModelMessage);
  }
  return out;
}

/** What Anthropic takes as a tool_use id (its API's pattern); OpenAI takes any string, and other servers write `functions.name:0`. */
const ANTHROPIC_TOOL_ID = /^[\w-]+$/;

/** A tool call or result part whose id Anthropic would refuse (400). */
const foreignToolId = (part: { type: string; toolCallId?: string }): boolean => (part.type === 'tool-call' || part.type === 'tool-result') && !ANTHROPIC_TOOL_ID.test(part.toolCallId!);

/**
 * The conversation with each tool call id Anthropic would refuse rewritten in a form it takes, in
 * calls and results alike: `k_` and the id's UTF-8 in base64url (whose alphabet is the pattern),
 * distinct for distinct ids (an id the client wrote as such an encoding of another is not
 * foreseen). The ids only pair a call with its result: the conversation means the same. Unchanged,
 * the same array.
 */
function withAnthropicToolIds(messages: ModelMessage[]): ModelMessage[] {
  const foreign = (message: ModelMessage) => typeof message.content !== 'string' && (message.content as { type: string }[]).some(foreignToolId);
  if (!messages.some(foreign)) return messages;
  return messages.map((message) => {
    if (!foreign(message)) return message;
    const content = (message.content as { type: string; toolCallId?: string }[]).map((part) =>
      foreignToolId(part) ? { ...part, toolCallId: `k_${Buffer.from(part.toolCallId!).toString('base64url')}` } : part,
    );
    return { ...message, content } as ModelMessage;
  });
}

/** A call's provider options with `asked` merged into those under its key (none asked: the call's as they are). */
function withOptions(options: ChatRequest['providerOptions'], added: { key: string; asked: Record<string, JSONValue> } | undefined): ChatRequest['providerOptions'] {
  return added ? { ...options, [added.key]: { ...options?.[added.key], ...added.asked } } : options;
}

/**
 * The thinking budget (tokens) OpenAI's `reasoning_effort` asks of an Anthropic or Google model that
 * reasons. LiteLLM's figures for low, medium and high (low at 1,024, the least Anthropic takes), so
 * that a client moved from LiteLLM thinks as much, doubled on for the two efforts past `high`.
 * `none` and `minimal` ask for none: nothing is sent, which leaves Anthropic's models not thinking
 * and Google's at their default (a budget of 0 would turn Gemini Flash's off, but Gemini Pro and 3
 * answer it with a 400: they cannot stop thinking).
 */
const THINKING_BUDGETS: ReadonlyMap<string, number> = new Map([
  ['low', 1024],
  ['medium', 2048],
  ['high', 4096],
  ['xhigh', 8192],
  ['max', 16384],
]);

/** The least thinking budget sent (Anthropic takes none smaller): one the model's output cap leaves smaller is none. */
const MIN_THINKING_BUDGET = 1024;

/**
 * Whether an Anthropic call must go without thinking (as LiteLLM sends it). Its last assistant
 * message must start with a signed thinking block when it ends the conversation (a prefill) or
 * calls tools (a tool loop in progress), and a client of OpenAI's API has none to send back (the
 * SDK drops reasoning without a signature): Anthropic would answer 400. A forced tool choice
 * (`required`, a named tool) is one thinking forbids: the SDK model would send `auto` instead, and
 * an answer without the tool call fail enforceToolChoice after it was billed. So is a response
 * schema the SDK model asks for through its forced `json` tool (anthropicForcedJsonTool): under thinking
 * the model may answer prose, handed to the client as its JSON.
 */
function anthropicThinkingRefused({ messages, toolChoice, responseFormat }: Partial<ChatRequest>, modelId: string, anthropic: ProviderSdks['anthropic']): boolean {
  if (toolChoice !== undefined && toolChoice !== 'auto' && toolChoice !== 'none') return true;
  if (responseFormat !== undefined && anthropicForcedJsonTool(modelId, responseFormat.schema ?? ANY_JSON_OBJECT, anthropic)) return true;
  if (!messages) return false;
  // The conversation as it is sent: a blank last message left out is no prefill (one after an assistant message is refused: blankAfterAssistant).
  const sent = withoutBlanks(messages, BLANK.anthropic);
  for (let i = sent.length - 1; i >= 0; i -= 1) {
    const message = sent[i]!;
    if (message.role !== 'assistant') continue;
    return i === sent.length - 1 || (typeof message.content !== 'string' && message.content.some((part) => part.type === 'tool-call'));
  }
  return false;
}

/**
 * Whether Anthropic's SDK model forces a `json` tool to have `modelId` answer JSON of `schema` (as
 * its own checks read: Keel sets no `structuredOutputMode`), which thinking would relax to `auto`:
 * rather than Anthropic's `output_config.format`, for an id it does not take to have that format (a
 * custom id without `claude-`, Claude 3 and 4.0) or a schema the format cannot hold (an open object,
 * more than ten optional properties). A model that refuses forced tool use (Sonnet 5.5, Opus 5.5:
 * `rejectsForcedToolUse`) gets the tool as `auto` with or without thinking, so thinking changes
 * nothing there and is kept.
 */
function anthropicForcedJsonTool(modelId: string, schema: JSONSchema7, anthropic: ProviderSdks['anthropic']): boolean {
  const can = anthropic.getModelCapabilities(modelId);
  return (!can.supportsStructuredOutput || !anthropic.supportsNativeStructuredOutputSchema(schema)) && !can.rejectsForcedToolUse;
}

/** OpenAI's JSON mode (`json_object`) as a schema: any JSON object (see jsonFormatFor). */
const ANY_JSON_OBJECT: JSONSchema7 = { type: 'object' };

/**
 * The JSON response format a `kind` provider's model is asked for. Anthropic has no JSON mode: its
 * SDK model drops a JSON format without a schema (a warning nobody reads), so a client of OpenAI's
 * `json_object` could be answered prose. Any object is its schema there, which the SDK model asks
 * for through its forced `json` tool (an open object is one output_config.format cannot hold) and
 * answers that tool's input as the text: a JSON object, as OpenAI's JSON mode promises (but for a
 * model that refuses forced tool use, Sonnet and Opus 5.5, offered the tool as `auto`). Google's
 * SDK model sends a format without a schema as its JSON MIME type, which holds the answer to JSON.
 */
const jsonFormatFor = (kind: string | undefined, format: JsonResponseFormat | undefined): JsonResponseFormat | undefined =>
  format && kind === 'anthropic' && format.schema === undefined ? { ...format, schema: ANY_JSON_OBJECT } : format;

/**
 * Whether Anthropic's SDK model takes `modelId` for a Claude that thinks only adaptively (Opus 5.5,
 * Sonnet 5.5, ...): one that refuses a thinking budget, which the SDK model would swap for adaptive
 * thinking at Anthropic's default effort, every `reasoning_effort` alike. Such a model is sent
 * adaptive thinking with the effort itself (Anthropic's `output_config.effort`, the same five
 * names past `minimal`). Its thinking counts within `max_tokens` as it is sent (the SDK model adds
 * no budget), so the call holds no more than its maximum.
 */
const adaptiveThinkingOnly = (modelId: string, anthropic: ProviderSdks['anthropic']): boolean => anthropic.getModelCapabilities(modelId).rejectsBudgetThinking;

/**
 * A call's text, reasoning, refusal and tool calls with the assistant message the SDK would return
 * for them (a refusal as a text part after the text: the SDK's models read it so).
 */
function answer(text: string, reasoningText: string | undefined, toolCalls: ToolCall[], refusal?: string, logprobs?: ChoiceLogprobs): Said {
  const content: Exclude<AssistantContent, string> = [];
  if (reasoningText !== undefined) content.push({ type: 'reasoning', text: reasoningText });
  if (text) content.push({ type: 'text', text });
  if (refusal) content.push({ type: 'text', text: refusal });
  for (const call of toolCalls) {
    content.push({ type: 'tool-call', toolCallId: call.toolCallId, toolName: call.toolName, input: typeof call.input === 'object' && call.input !== null ? call.input : {} });
  }
  return { text, reasoningText, refusal, toolCalls, logprobs, responseMessages: content.length ? [{ role: 'assistant', content }] : [] };
}

/**
 * An answer's text without its refusal, for the SDK's paths: OpenAI's SDK models hand a refusal
 * (`rawRefusal` finds it in the response as it came) on as the answer's last text part.
 */
const withoutRefusal = (text: string, refusal: string | undefined): string => (refusal && text.endsWith(refusal) ? text.slice(0, text.length - refusal.length) : text);

/**
 * The finish of an answer whose refusal came apart from its text: the SDK's models say
 * `content-filter` for a refusal that stopped (it had no other way to tell one), OpenAI says `stop`.
 */
const finishOf = (unified: string, raw: string | undefined, refused: boolean): string => (refused && raw === 'stop' ? 'stop' : unified);

/** A streamed call's parts as the stream loop reads them, from either source (see streamSource). */
type StreamPart =
  | { type: 'text-delta' | 'refusal-delta'; text: string; logprobs?: unknown[] }
  | { type: 'reasoning-delta'; text: string }
  /** A piece of a tool call's input the SDK is assembling (the call itself comes whole later). */
  | { type: 'tool-input'; chars: number }
  | { type: 'tool-call'; toolCall: ToolCall }
  | { type: 'finish'; finishReason: string; usage: TokenUsage | undefined }
  /** Anything else upstream sent: the stream is alive. */
  | { type: 'progress' };

const PROGRESS: StreamPart = { type: 'progress' };

/**
 * Parts a streamed call queues for a caller that reads slower than the model writes; beyond it the
 * upstream is held back (the wire's own queue then fills and pauses its socket). Without it the
 * upstream's whole answer would be read and queued for a slow client (what the call keeps for its
 * result, the text read so far, is held to MODEL_MAX_RESPONSE_BYTES either way).
 */
const EVENTS_HIGH_WATER = 256;

interface StreamSource {
  parts: AsyncIterable<StreamPart>;
  /** A tool call breaks the call's tool choice `none`: checked here off the SDK's path, as `streamText` checks it. */
  noToolCalls?: boolean;
  /** The source holds the log probabilities to their allowance as it reads them (the wire), so they are not weighed again here. */
  logprobsHeld?: boolean;
  /** The assistant messages for what was streamed (after the parts ended). */
  responseMessages(text: string, reasoning: string | undefined, toolCalls: ToolCall[], refusal: string | undefined): Promise<ModelMessage[]>;
}

/**
 * Tells a refusal's pieces apart in an OpenAI SDK model's stream, which hands them on as text: a
 * chunk's text deltas follow its raw chunk, the refusal's last, so the one that is the chunk's
 * refusal is it. (Content equal to the refusal in the same chunk would be taken for it, and the
 * refusal for text: the same characters either way.) One string compared a text delta; no
 * allocation but the SDK's raw part.
 */
class RefusalReader {
  /** The refusal of the chunk last read, until its delta has come. */
  private pending: string | undefined;
  /** The token log probabilities of the chunk last read, until its text (content's) and refusal (refusal's) have come. */
  private logprobs: ChoiceLogprobs | undefined;
  /** A refusal came: the finish's `content-filter` was the SDK's word for it (finishOf). */
  refused = false;

  /** `asked`: the call asked for log probabilities (those a server sends anyway are not handed on). */
  constructor(private readonly asked: boolean) {}

  chunk(raw: unknown): void {
    this.pending = rawRefusal(raw, 'delta');
    if (this.asked) this.logprobs = rawLogprobs(raw);
  }

  kindOf(delta: string): 'text-delta' | 'refusal-delta' {
    if (this.pending === undefined || delta !== this.pending) return 'text-delta';
    this.pending = undefined;
    this.refused = true;
    return 'refusal-delta';
  }

  /** A text delta as its part: text or refusal, with its chunk's log probabilities (once) when it has them. */
  part(delta: string): Extract<StreamPart, { type: 'text-delta' | 'refusal-delta' }> {
    const type = this.kindOf(delta);
    const logprobs = this.logprobs?.[type === 'text-delta' ? 'content' : 'refusal'];
    if (!logprobs) return { type, text: delta };
    if (type === 'text-delta') this.logprobs!.content = null;
    else this.logprobs!.refusal = null;
    return { type, text: delta, logprobs };
  }

  /** Whether the chunk last read holds log probabilities no delta has taken yet (a chunk of empty content carries some too). */
  get hasLogprobs(): boolean {
    return Boolean(this.logprobs?.content ?? this.logprobs?.refusal);
  }
}

/** The log probabilities of an OpenAI-style answer (an SDK model's raw response body) when the call asked for them: a server may send them anyway. */
const askedLogprobs = (request: ChatRequest, body: unknown): ChoiceLogprobs | undefined => (request.logprobs ? rawLogprobs(body) : undefined);

/** The assistant message for a streamed answer read without the SDK (the wire, the provider model directly). */
const directResponseMessages: StreamSource['responseMessages'] = async (text, reasoning, toolCalls, refusal) => answer(text, reasoning, toolCalls, refusal).responseMessages;

class AttemptTimeout extends Error {}

/**
 * An attempt's abort: the caller's signal plus one timer, for the chunk timeout (counted from the
 * last `touch()`) or the stream's deadline, whichever comes first. The wire path listens to it
 * directly (`AbortLike`), streamed or not; an AbortSignal (`signal`, for the SDK) is made only
 * when asked for — one AbortController less per call on the wire.
 */
class Attempt implements AbortLike {
  aborted = false;
  reason: Error | undefined;
  private controller: AbortController | undefined;
  private listeners: (() => void)[] = [];
  private timer: NodeJS.Timeout | undefined;
  /** When the upstream last showed progress (`performance.now()`). */
  private alive = 0;
  /** The caller has not taken what came yet, so the upstream is held back: no chunk timeout meanwhile. */
  private waitingForCaller = false;
  /** The provider's 2xx answer began (on the wire; the SDK's fetch tells `answeredOn`). */
  private began = false;
  private readonly onCallerAbort = () => this.abort(this.caller?.reason as Error | undefined);
  /**
   * `touch()` only notes the time (a stream's every part calls it): when the timer fires with
   * progress since it was set, it is set again for what is left.
   */
  private readonly onTimer = () => {
    const now = performance.now();
    if (now >= this.deadline - 1) return this.abort(new ModelAnswerLimitError(504, `The model's answer did not finish within ${this.deadlineMs} ms`));
    // Held back by a slow caller, the upstream sends nothing: that is not the upstream's silence.
    const idleEnd = (this.waitingForCaller ? now : this.alive) + this.timeoutMs;
    if (now >= idleEnd - 1) return this.abort(new AttemptTimeout());
    this.timer = setTimeout(this.onTimer, Math.min(idleEnd, this.deadline) - now);
  };

  constructor(
    private readonly caller: CallerSignal | undefined,
    /** The call's downloads, shared by its tries. */
    private readonly files: CallDownloads,
    private readonly timeoutMs: number,
    /** When (`performance.now()`) a streamed call must have ended, and its length for the error; Infinity: no deadline. */
    private readonly deadline = Infinity,
    private readonly deadlineMs = 0,
  ) {
    // A caller gone already fires no 'abort' any more: the attempt starts aborted.
    if (caller?.aborted) this.abort(caller.reason as Error | undefined);
    else caller?.addEventListener('abort', this.onCallerAbort, { once: true });
    this.touch();
  }

  /** The SDK's download function for this try: the call's downloads (downloads.ts), awaited no longer than the try. */
  download(): DownloadFunction {
    return this.files.forTry(this.signal);
  }

  get signal(): AbortSignal {
    if (!this.controller) {
      this.controller = new AbortController();
      if (this.aborted) this.controller.abort(this.reason);
    }
    return this.controller.signal;
  }

  onAbort(listener: () => void): () => void {
    this.listeners.push(listener);
    return () => {
      const index = this.listeners.indexOf(listener);
      if (index >= 0) this.listeners.splice(index, 1);
    };
  }

  /** Ends the attempt with `reason`, aborting its upstream request; returns it, to throw. */
  fail(reason: Error): Error {
    this.abort(reason);
    return reason;
  }

  private abort(reason: Error | undefined): void {
    if (this.aborted) return;
    this.aborted = true;
    this.reason = reason;
    this.controller?.abort(reason);
    for (const listener of this.listeners.splice(0)) listener();
  }

  answering(): void {
    this.began = true;
  }

  /** Whether the provider began a 2xx answer to this try: it bills it, whatever comes of it. */
  get answered(): boolean {
    return this.began || (this.controller !== undefined && answeredOn(this.controller.signal));
  }

  touch(): void {
    this.alive = performance.now();
    this.timer ??= setTimeout(this.onTimer, Math.min(this.timeoutMs, this.deadline - this.alive));
  }

  /**
   * Resolves once `room` is called (the caller took what was queued) or the attempt ends: meanwhile
   * the stream loop reads nothing, so the upstream is held back, and the chunk timeout does not run
   * (the stream's deadline does: a caller that never reads does not hold a connection for ever).
   */
  waitForCaller(setRoom: (room: (() => void) | undefined) => void): Promise<void> {
    if (this.aborted) return Promise.resolve();
    this.waitingForCaller = true;
    return new Promise((resolve) => {
      const done = () => {
        setRoom(undefined);
        stopListening();
        this.waitingForCaller = false;
        this.touch();
        resolve();
      };
      const stopListening = this.onAbort(done);
      setRoom(done);
    });
  }

  end(): void {
    clearTimeout(this.timer);
    this.caller?.removeEventListener('abort', this.onCallerAbort);
  }
}

type Classified =
  | { kind: 'aborted' }
  | { kind: 'retryable'; error: Error; retryAfterMs?: number }
  /** This model cannot answer, whatever the request (its provider refused the credentials, the account or the model): no retry, its fallbacks may. */
  | { kind: 'next'; error: Error }
  | { kind: 'fatal'; error: Error };

/** Upstream statuses that are the provider's setup's fault, not the request's: a wrong key (401), no credit (402), no access (403), no such model (404). */
const PROVIDER_REFUSALS = new Set([401, 402, 403, 404]);

function retryAfterMs(headers: Record<string, string> | undefined): number | undefined {
  if (!headers) return undefined;
  const ms = Number(headers['retry-after-ms']);
  if (headers['retry-after-ms'] && Number.isFinite(ms)) return waitOf(ms);
  const value = headers['retry-after'];
  if (!value) return undefined;
  const seconds = Number(value);
  if (Number.isFinite(seconds)) return waitOf(seconds * 1000);
  const date = Date.parse(value);
  return Number.isNaN(date) ? undefined : waitOf(date - Date.now());
}

/**
 * The most of a provider's wait that is kept (a day): a caller that backs off by itself is told it
 * (a Retry-After in whole seconds), and a broken or hostile upstream's `1e300` was passed on as
 * `Retry-After: 1e+300`, no number of seconds a client reads.
 */
const MAX_RETRY_AFTER_MS = 86_400_000;

const waitOf = (ms: number): number => Math.min(MAX_RETRY_AFTER_MS, Math.max(0, ms));

const isApiCallError = (e: unknown): e is APICallError => APICallError.isInstance(e);
const isAnswerLimit = (e: unknown): e is ModelAnswerLimitError => e instanceof ModelAnswerLimitError;

/** Tokens a model or its server may add to each input: start and end marks, an instruction prompt (TEI's `--default-prompt`, instruct models'), ~10–30. */
const EMBEDDING_INPUT_EXTRA_TOKENS = 64;

/**
 * The most tokens embedding `values` can take: two a byte of UTF-8 text (byte-level BPE makes at
 * most one; SentencePiece's word marks can add one), plus each input's extra. What a provider
 * reports past it is not believed: an upstream that reported 10^15 tokens for three words was
 * charged the user's whole balance.
 */
function embeddingTokensBound(values: readonly string[]): number {
  return values.reduce((tokens, value) => tokens + 2 * Buffer.byteLength(value, 'utf8') + EMBEDDING_INPUT_EXTRA_TOKENS, 0);
}

/** Input tokens a provider reported for `values`, as far as they are believed (embeddingTokensBound); undefined when it reported none. */
const boundedTokens = (reported: number | undefined, values: readonly string[]): number | undefined => (reported === undefined ? undefined : Math.min(reported, embeddingTokensBound(values)));

/**
 * An answer with another number of vectors than the inputs it was asked for is the provider's
 * fault (502). One of a call sent in several requests (`part`: where its inputs start among the
 * call's) says which of the call's inputs that request held: the caller sent more than it names.
 */
function checkVectorCount(modelId: string, inputs: number, vectors: number, part?: { start: number; of: number }): void {
  if (vectors === inputs) return;
  throw new ModelAnswerError(`Model ${modelId} answered ${vectors} vector${vectors === 1 ? '' : 's'} for ${inputs} input${inputs === 1 ? '' : 's'}${whichInputs(inputs, part)}`);
}

/** Which of a call's inputs one of its requests held (`part`: where they start among the call's `of`), for its errors; nothing for a call of one request. */
const whichInputs = (inputs: number, part: { start: number; of: number } | undefined): string => (part ? ` (inputs ${part.start + 1} to ${part.start + inputs} of the call's ${part.of}, sent in several requests)` : '');

/**
 * A number past float32's range becomes an infinity, which no JSON answer or pgvector column holds:
 * the provider's fault (502). Checked for each request of a split call as it answers (`part`), as
 * its count is: the call is then charged what each request was billed (`SplitTry`), not every input.
 */
function checkFinite(modelId: string, vectors: readonly Float32Array[], part?: { start: number; of: number }): void {
  if (!vectors.every(allFinite)) throw new ModelAnswerError(`Model ${modelId} answered a vector with a value that is not a finite float32${whichInputs(vectors.length, part)}`);
}

/** The tokens an `embedMany` reported; it reports NaN when the provider sent no usage: unknown, estimated (see `price`). */
const sdkTokens = (result: EmbedManyResult): number | undefined => (Number.isFinite(result.usage.tokens) ? result.usage.tokens : undefined);

/** `attempt` as one request of a split try on the wire sees it: its 2xx told to `answering` as well (the attempt's `answered` stays the try's). */
function requestSignal(attempt: AbortLike, answering: () => void): AbortLike {
  return {
    get aborted() {
      return attempt.aborted;
    },
    get reason() {
      return attempt.reason;
    },
    onAbort: (listener) => attempt.onAbort(listener),
    answering: () => {
      answering();
      attempt.answering?.();
    },
  };
}

/**
 * One SDK request of a split try, with an AbortSignal of its own that `attempt`'s end aborts: the
 * SDK's fetch marks the signal of a request whose 2xx began (`answeredOn`), which tells that request
 * apart from the others sent beside it on the attempt's signal. `answering` is told it once it ends.
 */
async function sentApart<T>(attempt: Attempt, send: (signal: AbortSignal) => Promise<T>, answering: () => void): Promise<T> {
  const controller = new AbortController();
  if (attempt.aborted) controller.abort(attempt.reason);
  const stop = attempt.onAbort(() => controller.abort(attempt.reason));
  try {
    return await send(controller.signal);
  } finally {
    stop();
    if (answeredOn(controller.signal)) {
      answering();
      attempt.answering();
    }
  }
}

/** `promise` settled, as Promise.allSettled gives each of its promises. */
const settledOf = <T>(promise: Promise<T>): Promise<PromiseSettledResult<T>> =>
  promise.then(
    (value) => ({ status: 'fulfilled', value }),
    (reason: unknown) => ({ status: 'rejected', reason }),
  );

/** An embeddings call's answer before it is checked: vectors as listed, each request's `index` values (see `inInputOrder`), tokens reported. */
interface VectorsAnswer {
  vectors: Float32Array[];
  numbering: (readonly unknown[])[] | undefined;
  tokens: number | undefined;
}

/** One request's answer of a split try, and whether it was `kept` from an earlier try of the model (AttemptState.answeredParts) rather than sent in this one. */
interface SplitPart {
  answer: VectorsAnswer;
  kept: boolean;
}

/**
 * One request of a split try, the inputs from `start` on: the answer an earlier try of the model
 * kept for them (AttemptState.answeredParts: a retry sends only the requests that did not answer),
 * or else `sendAndCheck`'s, kept for the next try once it passed its checks.
 */
async function keptOrSent(state: Pick<AttemptState, 'answeredParts'>, start: number, inputs: number, sendAndCheck: () => Promise<VectorsAnswer>): Promise<SplitPart> {
  const answered = (state.answeredParts ??= new Map<number, VectorsAnswer>());
  const kept = answered.get(start);
  if (kept?.vectors.length === inputs) return { answer: kept, kept: true };
  const answer = await sendAndCheck();
  answered.set(start, answer);
  return { answer, kept: false };
}

/**
 * A split try's answer: its requests' answers joined in the order of their inputs, numbered when
 * each is. Its tokens are those of the requests sent in this try (one without usage makes them
 * unknown, as the SDK's sum does): a kept one was charged with the try it answered in (`failedTries`).
 */
function joinedParts(parts: readonly SplitPart[]): VectorsAnswer {
  let tokens: number | undefined = 0;
  for (const { answer, kept } of parts) if (!kept) tokens = tokens === undefined || answer.tokens === undefined ? undefined : tokens + answer.tokens;
  const numbered = parts.every(({ answer }) => answer.numbering !== undefined);
  return { vectors: parts.flatMap(({ answer }) => answer.vectors), numbering: numbered ? parts.flatMap(({ answer }) => answer.numbering!) : undefined, tokens };
}

/** What one `embedMany` answered, as a VectorsAnswer: OpenAI's shape numbers its vectors; Google's does not (taken as listed). */
function sdkAnswer(result: EmbedManyResult): VectorsAnswer {
  const answers = (result.responses ?? []).map((response) => (response?.body as { data?: unknown } | undefined)?.data);
  const numbering = answers.length && answers.every((data): data is unknown[] => Array.isArray(data)) ? answers.map((data) => data.map((item) => (item as { index?: unknown } | null)?.index)) : undefined;
  return { vectors: result.embeddings.map((vector) => Float32Array.from(vector)), numbering, tokens: sdkTokens(result) };
}

/** The most inputs OpenAI's embeddings endpoint takes in one request (the SDK's `maxEmbeddingsPerCall` for OpenAI-style providers). */
const OPENAI_EMBEDDING_INPUTS = 2048;

/**
 * An embeddings answer's vectors in the order of their inputs, one each. OpenAI-style answers
 * number their vectors (`index`), which the SDK does not read: it takes them as listed, so an answer
 * listed in another order would hand each input another input's vector. Each request's vectors
 * (`numbering`: one list of `index` values per request the inputs were sent in) are put in order by
 * their numbers when they have them; an answer whose count or numbers do not fit its inputs is the
 * provider's fault (502). Without numbering (Google's shape), as listed.
 */
function inInputOrder(modelId: string, inputs: number, vectors: Float32Array[], numbering: readonly (readonly unknown[])[] | undefined): Float32Array[] {
  const misfit = (what: string) => new ModelAnswerError(`Model ${modelId} ${what}`);
  checkVectorCount(modelId, inputs, vectors.length);
  if (!numbering?.length) return vectors;
  const ordered = vectors.slice();
  let offset = 0;
  for (const numbers of numbering) {
    if (numbers.every((n) => n === undefined)) {
      offset += numbers.length;
      continue;
    }
    const seen = new Set<number>();
    for (const n of numbers) {
      if (typeof n !== 'number' || !Number.isInteger(n) || n < 0 || n >= numbers.length || seen.has(n)) throw misfit(`numbered its vectors ${numbers.join(', ')} for ${numbers.length} inputs`);
      seen.add(n);
    }
    numbers.forEach((n, listed) => (ordered[offset + (n as number)] = vectors[offset + listed]!));
    offset += numbers.length;
  }
  return ordered;
}

/**
 * A connection that could not be made or was cut off, by what undici says of it. Its words, not
 * any TypeError: one a response handler throws over an odd answer would be retried as a drop.
 */
const isConnectionFailure = (error: unknown): error is Error => error instanceof Error && /ECONNRESET|ECONNREFUSED|socket|terminated|fetch failed/i.test(`${error.message} ${String(error.cause)}`);

function classify(error: unknown, attempt: Attempt, caller: CallerSignal | undefined, timeoutMs: number, interactive: boolean): Classified {
  if (caller?.aborted) return { kind: 'aborted' };
  if (attempt.aborted && attempt.reason instanceof AttemptTimeout) {
    return { kind: interactive ? 'next' : 'retryable', error: new ModelTimeoutError(timeoutMs) };
  }
  // The stream's deadline or the answer's size: the call ends here. On the SDK's path the size
  // limit (answer-limit.ts) errors the response body, which the SDK wraps in an APICallError.
  const limit = findInCauses(error, isAnswerLimit);
  if (limit) return { kind: 'fatal', error: limit };
  if (attempt.aborted && attempt.reason instanceof ModelAnswerLimitError) return { kind: 'fatal', error: attempt.reason };
  if (ToolChoiceViolationError.isInstance(error)) return { kind: 'fatal', error: new ModelToolChoiceError(error.message) };
  // A setting or provider option the SDK refuses (a reasoning effort its provider does not take): the request's fault.
  // So is a part its provider cannot take (a file type it has no place for).
  if (InvalidArgumentError.isInstance(error) || UnsupportedFunctionalityError.isInstance(error)) return { kind: 'fatal', error: new ModelArgumentError(error.message) };
  // A conversation the SDK cannot turn into a prompt (a tool call without its result, a role or
  // content out of place): the request's fault too, never the 500 of an unknown error.
  if (isPromptError(error)) return { kind: 'fatal', error: new ModelArgumentError(error.message) };
  // Before the connection errors: a download that failed to connect says "fetch failed" too.
  const download = findInCauses(error, (e): e is DownloadError => DownloadError.isInstance(e));
  if (download) return { kind: 'fatal', error: new ModelDownloadError(download.message) };
  const apiError = findInCauses(error, isApiCallError);
  if (apiError) {
    const status = apiError.statusCode;
    // A 2xx whose body a dropped connection cut off: the SDK reports the read's failure with the
    // answer's status, where the wire reports a dropped connection (no status). Retried on both:
    // the manager tries again only while no output has reached the caller (`state.streamed`), and
    // each cut-off try is charged its prompt's estimate (`failedTries`).
    if (status !== undefined && status >= 200 && status < 300 && isConnectionFailure(apiError.cause)) {
      return { kind: 'retryable', error: new UpstreamError(`Upstream connection error: ${apiError.message}: ${apiError.cause.message}`) };
    }
    const message = `Upstream ${status ?? 'connection'} error: ${apiError.message}`;
    const wait = retryAfterMs(apiError.responseHeaders);
    const upstream = new UpstreamError(message, status, wait, status !== undefined && CLIENT_FAULT_UPSTREAM.has(status) ? openAIErrorFields(apiError.responseBody) : undefined);
    if (status === undefined || status === 408 || status === 409 || status === 429 || status >= 500) {
      return { kind: 'retryable', error: upstream, retryAfterMs: wait };
    }
    if (PROVIDER_REFUSALS.has(status)) return { kind: 'next', error: upstream };
    return { kind: 'fatal', error: upstream };
  }
  // A streamed answer the SDK could not read (a chunk not JSON or not of its shape, no finish
  // reason): the upstream's fault, as its non-streamed reading reports it (an APICallError 200).
  if (JSONParseError.isInstance(error) || TypeValidationError.isInstance(error) || InvalidResponseDataError.isInstance(error)) {
    return { kind: 'fatal', error: new UpstreamError(`Upstream 200 error: ${InvalidResponseDataError.isInstance(error) ? error.message : 'Invalid JSON response'}`, 200) };
  }
  // A stream's error event (the provider's words, however they read: before the connection errors' pattern).
  if (error instanceof StreamErrorEvent) return { kind: 'retryable', error: new UpstreamError(`Upstream error in the stream: ${error.message}`) };
  if (error instanceof Error && (error.name === 'TypeError' || isConnectionFailure(error))) {
    return { kind: 'retryable', error: new UpstreamError(`Upstream connection error: ${error.message}`) };
  }
  return { kind: 'fatal', error: error instanceof Error ? error : new Error(String(error)) };
}

/**
 * What an SDK stream's error part carries, to throw: an Error as it is; anything else is the
 * provider's error event as its chunk held it (OpenAI's `{message, type, code}`), as the wire reads it.
 */
const streamError = (error: unknown): Error => (error instanceof Error ? error : new StreamErrorEvent(error));

/** The SDK's refusals of a prompt it cannot convert (`convertToLanguageModelPrompt` and the providers' converters). */
const isPromptError = (error: unknown): error is Error =>
  MissingToolResultsError.isInstance(error) ||
  InvalidPromptError.isInstance(error) ||
  InvalidMessageRoleError.isInstance(error) ||
  InvalidDataContentError.isInstance(error) ||
  MessageConversionError.isInstance(error);

/**
 * What a call its caller aborted throws: the caller's reason when it is an HttpError (the server
 * shutting down: a 503 the client may retry elsewhere), else ModelCallAbortedError (the client
 * went away). Metered as `aborted` either way.
 */
function abortedError(signal: CallerSignal | undefined): Error {
  const reason = signal?.reason;
  return reason instanceof HttpError ? reason : new ModelCallAbortedError();
}

/**
 * The call's reservation, or its caller's abort while it is being made, whichever comes first. A
 * hold can wait long (a database gone silent: the statement timeout + 2 s), and the caller may
 * stop waiting meanwhile: a client gone, or the server's shutdown, whose cut-off before the
 * deadline otherwise reached only calls already with their provider, so a request still waiting for
 * its hold had its connection cut by the deadline's exit, with no answer instead of a 503.
 * A reservation made after the abort goes to `settleLate`.
 */
async function untilAborted(
  reserving: UsageReservation | Promise<UsageReservation>,
  signal: CallerSignal | undefined,
  settleLate: (reservation: UsageReservation) => void,
): Promise<UsageReservation> {
  if (!signal || !(reserving instanceof Promise)) return reserving;
  return new Promise((resolve, reject) => {
    let abandoned = false;
    const onAbort = () => {
      abandoned = true;
      reject(abortedError(signal));
    };
    signal.addEventListener('abort', onAbort, { once: true });
    reserving.then(
      (reservation) => {
        signal.removeEventListener('abort', onAbort);
        if (abandoned) settleLate(reservation);
        else resolve(reservation);
      },
      (error: Error) => {
        signal.removeEventListener('abort', onAbort);
        // Refused after the caller left: nothing to tell it (a hold that failed is released by the meter).
        if (!abandoned) reject(error);
      },
    );
  });
}

function sleep(ms: number, signal: CallerSignal | undefined): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(abortedError(signal));
    const onAbort = () => {
      clearTimeout(timer);
      reject(abortedError(signal));
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener('abort', onAbort);
      resolve();
    }, ms);
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}

/** What one model's attempt produced; `streamed` says the caller already saw some of it. */
interface AttemptState {
  /** As the provider reported it; undefined when it reported none (then estimated: see `price`). */
  usage?: TokenUsage;
  /** `usage` is an estimate (the provider reported none). */
  estimated: boolean;
  /** The prompt's estimate, for an estimated usage (of the requests a split retry sends: `SplitTry.answer`). */
  inputTokens: number;
  /** The cost the answer reported, for the usage record of the same usage (computed once). */
  priced?: { usage: TokenUsage; cost: string };
  streamed: boolean;
  firstTokenAt: number | null;
  /** The characters of the answer so far (its size limit). */
  outputChars: number;
  /** Its tokens as estimated (estimateTextTokens), for an estimated usage. */
  outputTokens: number;
  /** The call's reservation holds its output maximum (UsageReservation.holdsOutput): it is sent upstream (sentOutputTokens). */
  capped: boolean;
  /** A try sent in several requests, while it runs (`embedOverWire`, `embedThroughSdk`): what a failure midway was billed for (`SplitTry.billed`). */
  split?: SplitTry;
  /**
   * The requests of the model's split tries that answered (and passed their checks), by where their
   * inputs start: a retry sends only the others, rather than have the provider bill (and count
   * against its quota) what it answered already. Each was charged with the try it answered in.
   */
  answeredParts?: Map<number, VectorsAnswer>;
}

/** One request of a split try (SplitTry): its inputs' estimate, and whether its provider's 2xx began. */
interface SplitRequest {
  readonly estimate: number;
  answered: boolean;
}

/**
 * A try whose inputs go upstream in several requests (embeddings past what one request takes:
 * OPENAI_EMBEDDING_INPUTS on the wire, the SDK model's `maxEmbeddingsPerCall` through it), one
 * after another or side by side: the provider bills each request on its own. One that fails
 * midway is charged what each request sent was billed, as a call of its own would be — not every
 * input's estimate.
 */
class SplitTry {
  /** The input tokens of the requests that ended: as reported, or estimated (none reported, or a 2xx that failed). */
  private endedTokens = 0;
  private endedEstimated = false;
  /** The estimates of the requests upstream (sent, not ended), and of those of them whose 2xx began. */
  private upstreamTokens = 0;
  private answeredTokens = 0;
  /** The estimates of every request sent. */
  private sentTokens = 0;

  /**
   * `send(request)`: one request of `inputs`, the provider's answer as `reported` reads its input
   * tokens (undefined: none reported, its estimate counts). One that fails on its own is billed as
   * a call of its own failing so would be: its estimate once its 2xx began, else nothing (a 5xx,
   * a 400); a 2xx whose answer could not be read, at the tokens it reported (`failed` reads them
   * off its error) when it did. One that fails with its try (`attempt` aborted: the caller gone,
   * the try's time up) stays upstream, for the try's end to bill (`billed`).
   */
  async request<T>(
    inputs: readonly string[],
    attempt: AbortLike,
    send: (request: SplitRequest) => Promise<T>,
    reported: (answer: T) => number | undefined,
    failed: (error: unknown) => number | undefined = () => undefined,
  ): Promise<T> {
    const request: SplitRequest = { estimate: estimateTokens(inputs.join('')), answered: false };
    this.upstreamTokens += request.estimate;
    this.sentTokens += request.estimate;
    let answer: T;
    try {
      answer = await send(request);
    } catch (error) {
      if (!attempt.aborted) {
        const tokens = request.answered ? failed(error) : undefined;
        this.ended(request, tokens ?? (request.answered ? request.estimate : 0), request.answered && tokens === undefined);
      }
      throw error;
    }
    // Answered (and billed), whatever comes of its answer after: a count of vectors that does not fit is checked after this.
    const tokens = reported(answer);
    this.ended(request, tokens ?? request.estimate, tokens === undefined);
    return answer;
  }

  /**
   * The try's answer, once each request answered (`joinedParts`). With requests kept from an
   * earlier try, the model's prompt estimate becomes that of those it sent (what an answer without
   * usage is charged: see `price`): the kept ones were charged with the try they answered in.
   */
  answer(parts: readonly SplitPart[], state: AttemptState): VectorsAnswer {
    state.split = undefined;
    if (parts.some(({ kept }) => kept)) state.inputTokens = this.sentTokens;
    return joinedParts(parts);
  }

  /** `request`'s provider began its 2xx: from then on it bills the request. */
  answering(request: SplitRequest): void {
    if (request.answered) return;
    request.answered = true;
    this.answeredTokens += request.estimate;
  }

  private ended(request: SplitRequest, tokens: number, estimated: boolean): void {
    this.upstreamTokens -= request.estimate;
    if (request.answered) this.answeredTokens -= request.estimate;
    this.endedTokens += tokens;
    this.endedEstimated ||= estimated;
  }

  /**
   * What the try was billed for once it failed, and whether any of it is an estimate: the requests
   * that ended, and each still upstream as `run` charges a call of one request cut off there — its
   * estimate once its 2xx began, or when the caller went away while it was upstream (`aborted`),
   * else nothing. The requests never sent, nothing.
   */
  billed(aborted: boolean): { tokens: number; estimated: boolean } {
    const upstream = aborted ? this.upstreamTokens : this.answeredTokens;
    return upstream > 0 ? { tokens: this.endedTokens + upstream, estimated: true } : { tokens: this.endedTokens, estimated: this.endedEstimated };
  }
}

type AttemptRunner<T> = (model: ModelInfo, attempt: Attempt, state: AttemptState) => Promise<T>;

// ==================== The manager ====================

export class ModelManager {
  /** What one call may fetch of the images and files its prompt names by URL (downloads.ts; the SDK's own limit is 2 GiB a file, and no count). */
  private readonly downloadLimits: DownloadLimits;

  constructor(private readonly options: ModelManagerOptions) {
    this.downloadLimits = { maxBytes: options.maxDownloadBytes ?? 20_971_520, maxFiles: options.maxDownloads ?? 50, maxTotalBytes: options.maxDownloadTotalBytes ?? 52_428_800 };
  }

  // ---------- Catalog ----------

  /** Replaces the catalog overrides and provider records at once (after a change in the database). */
  reload(overrides: readonly ModelOverride[], providers: readonly ProviderRecord[]): void {
    this.options.catalog.setOverrides(overrides);
    this.options.providers.setRecords(providers);
  }

  /** A catalog of this one's built-in models with `overrides` instead of its own, e.g. rows as a write finds them (this one unchanged). */
  catalogWith(overrides: readonly ModelOverride[]): ModelCatalog {
    return this.options.catalog.withOverrides(overrides);
  }

  /** Closes the providers' idle connections (the app's close hook). */
  close(): Promise<void> {
    return this.options.providers.close();
  }

  /** A catalog entry by id or alias, with its availability; disabled models too. */
  getModel(idOrAlias: string): ModelView | undefined {
    const model = this.options.catalog.getModel(idOrAlias);
    return model && this.view(model);
  }

  /** The model a call to `idOrAlias` makes (`ModelCatalog.modelAsCalled`: a pinned snapshot is called as asked), with its availability. */
  modelAsCalled(idOrAlias: string): ModelView | undefined {
    const model = this.options.catalog.modelAsCalled(idOrAlias);
    return model && this.view(model);
  }

  listAvailableModels({ includeDisabled = false } = {}): ModelView[] {
    return this.options.catalog.listModels({ includeDisabled }).map((m) => this.view(m));
  }

  private view(model: ModelInfo): ModelView {
    const status = this.options.providers.status(model.provider);
    return { ...model, available: status.available, unavailable_reason: status.available ? null : (status.reason ?? null) };
  }

  /**
   * A model's view with the fallbacks its calls skip as things stand: made only where the models
   * routes answer with it, since `modelAsCalled` is read at each run's start and a check of every
   * fallback (a catalog lookup and a provider status each) is of no use there.
   */
  publicView(model: ModelView): ModelPublicView {
    const capabilities = STAND_IN_FOR.filter((can) => model.capabilities.includes(can));
    const unavailable_fallbacks = model.fallbacks.flatMap((name) => {
      const reason = this.fallbackUnavailable(this.options.catalog.modelAsCalled(name), capabilities);
      return reason === undefined ? [] : [{ name, reason }];
    });
    return { ...model, unavailable_fallbacks, answered_by: this.answersFor(model) ?? null };
  }

  /**
   * Why a fallback (the model a fallback's name calls, if any) cannot take a call that needs
   * `capabilities` as things stand, or undefined when it can: what a call skips it for, without a
   * word to its caller (whose call fails with its own model's error), so the model's view says it.
   * A write of the model does not refuse these: a provider's credentials or a model's `enabled`
   * may come later, and the operator may set them in any order.
   */
  private fallbackUnavailable(fallback: ModelInfo | undefined, capabilities: readonly Capability[]): string | undefined {
    if (!fallback) return 'It names no model of the catalog';
    if (!fallback.enabled) return `Model ${fallback.id} is disabled`;
    if (!capabilities.every((can) => fallback.capabilities.includes(can))) return `Model ${fallback.id} lacks ${capabilities.filter((can) => !fallback.capabilities.includes(can)).join(' and ')}`;
    const status = this.options.providers.status(fallback.provider);
    return status.available ? undefined : (status.reason ?? `Provider ${fallback.provider} is unavailable`);
  }

  /**
   * The model that answers a call to `model` (of `call.capability`, with `call.request` as far as it
   * is known) as things stand: none when it is disabled, the model itself when its provider can be
   * called, else the first of its fallbacks that `run` falls to (chainOf: the same rule, standsIn),
   * else undefined. Without a capability, for the first of the model's operations (chat, then
   * embeddings) that something answers: `/v1/models` lists a model any of whose calls can be made.
   * What a request would be refused for by a fallback (refusal) is applied only with the request.
   */
  answersFor(model: ModelView, call: CallShape = {}): string | undefined {
    if (!model.enabled) return undefined; // its calls are refused (404), whatever its provider
    if (model.available) return model.id;
    const capabilities = call.capability ? [call.capability] : STAND_IN_FOR.filter((can) => model.capabilities.includes(can));
    for (const capability of capabilities) {
      const answering = this.chainOf(model, capability, call.request ?? {})[1];
      if (answering) return answering.id;
    }
    return undefined;
  }

  /** An enabled model that can do `capability`, or a typed error; whether its provider can be called is the chain's to say (run). */
  private resolve(idOrAlias: string, capability: Capability): ModelInfo {
    const model = this.options.catalog.modelAsCalled(idOrAlias);
    if (!model || !model.enabled) throw new ModelNotFoundError(idOrAlias);
    if (!model.capabilities.includes(capability)) throw new ModelCapabilityError(model.id, capability);
    return model;
  }

  // ---------- Calls ----------

  /**
   * A call's worst case on `model` as its reservation holds it: its output tokens (also sent
   * upstream as its maximum when the reservation holds credit: sentOutputTokens), the output it may be billed for beyond them (`extraOutputTokens`: a
   * thinking budget, see thinkingBudget; a predicted output's tokens, see predictedTokens), and their
   * cost with `inputTokens` in. Public so that a check made ahead of a call (a run's start) asks for
   * exactly what the call's reservation will.
   */
  worstCase(model: ModelInfo, inputTokens: number, maxOutputTokens: number | undefined, extraOutputTokens = 0): { outputTokens: number; cost: string } {
    const outputTokens = this.outputTokens(model, maxOutputTokens) + extraOutputTokens;
    return { outputTokens, cost: estimateCost(model.pricing, inputTokens, outputTokens) };
  }

  async chat(request: ChatRequest): Promise<ChatResult> {
    const started = performance.now();
    return this.run(request, request.signal, 'chat', 'chat', request.maxOutputTokens, async (model, attempt, state) => {
      const tools = request.tools && functionTools(request.tools);
      const wired = this.wireCall(request, model, tools, state.capped);
      const maxBytes = this.options.maxResponseBytes + this.logprobsAllowance(request, model, state.capped);
      if (wired) {
        const reply = await wired.wire.generate(wired.call, attempt, maxBytes, this.options.providers.hopHeaders(request.hops));
        state.usage = reply.usage;
        if (wired.call.tools) enforceToolChoice(request.toolChoice, reply.toolCalls, reply.finishReason, model);
        return this.chatResult(model, state, started, answer(reply.text, reply.reasoning, reply.toolCalls, reply.refusal, reply.logprobs), reply.finishReason, null);
      }
      const direct = this.directModel(model, tools);
      if (direct) return this.generate(request, direct, model, attempt, state, started, maxBytes);
      const options = this.sdkOptions(request, model, state.capped);
      const result = await generateText({
        ...options,
        // generateText refuses an answer that broke the tool choice without its usage: read as the
        // provider model answers, so that such an answer is charged as its provider billed it, as
        // the other paths charge it (usage set before enforceToolChoice), not recorded free.
        model: readingUsage(options.model, (usage) => (state.usage = toTokenUsage(asLanguageModelUsage(usage)))),
        headers: this.withHops(request, this.answerHeaders(maxBytes)),
        experimental_download: attempt.download(),
        abortSignal: attempt.signal,
      });
      state.usage = toTokenUsage(result.totalUsage);
      const toolCalls = result.toolCalls.map((c): ToolCall => ({ toolCallId: c.toolCallId, toolName: c.toolName, input: c.input as unknown }));
      // The SDK's messages keep the refusal as the assistant's text: the conversation reads on.
      const refusal = rawRefusal(result.response.body, 'message');
      const said: Said = { text: withoutRefusal(result.text, refusal), reasoningText: result.reasoningText, refusal, toolCalls, logprobs: askedLogprobs(request, result.response.body), responseMessages: result.response.messages };
      return this.chatResult(model, state, started, said, finishOf(result.finishReason, result.rawFinishReason, refusal !== undefined), null);
    });
  }

  /**
   * The Chat Completions request a call sends without the SDK (see openai-wire.ts), or undefined when
   * it needs the SDK: provider options, tools other than functions with a JSON schema at hand,
   * message parts the wire does not carry (wireMessages); providers other than `openai-compatible`.
   */
  private wireCall(request: ChatRequest, model: ModelInfo, tools: FunctionTool[] | undefined | null, capped: boolean): { wire: OpenAIWire; call: WireCall } | undefined {
    if (request.providerOptions || tools === null) return undefined;
    const wire = this.options.providers.chatWire(model.provider);
    if (!wire) return undefined;
    const messages = wireMessages(request.system, request.messages);
    if (!messages) return undefined;
    // The SDK's checks of the settings (integers, ranges), so both paths refuse the same input.
    const settings = this.callSettings(request, model, capped);
    const format = request.responseFormat;
    return {
      wire,
      call: {
        model: model.id,
        max_tokens: settings.maxOutputTokens,
        temperature: settings.temperature,
        top_p: settings.topP,
        frequency_penalty: settings.frequencyPenalty,
        presence_penalty: settings.presencePenalty,
        seed: settings.seed,
        user: request.user,
        parallel_tool_calls: request.parallelToolCalls,
        reasoning_effort: request.reasoningEffort,
        logprobs: request.logprobs,
        top_logprobs: request.topLogprobs,
        logit_bias: request.logitBias,
        verbosity: request.verbosity,
        prediction: request.prediction,
        // As the SDK's openai-compatible model sends it (structured outputs on: see providers.ts).
        response_format: !format
          ? undefined
          : format.schema
            ? { type: 'json_schema', json_schema: { schema: format.schema, strict: format.strict ?? true, name: format.name ?? 'response', description: format.description } }
            : { type: 'json_object' },
        stop: settings.stopSequences,
        messages,
        tools: tools && wireTools(tools),
        // The SDK asks for `auto` when the call names no choice (prepareToolsAndToolChoice).
        tool_choice: tools && wireToolChoice(request.toolChoice),
      },
    };
  }

  /**
   * The provider model a call goes to directly (`doGenerate`/`doStream`) with the call's tools as
   * declared to it (functionTools), or undefined when the call goes through the SDK's
   * `generateText`/`streamText`: tools the SDK must run or validate input for (`tools` null).
   */
  private directModel(model: ModelInfo, tools: FunctionTool[] | undefined | null): DirectCall | undefined {
    if (tools === null) return undefined;
    const languageModel = this.options.providers.languageModel(model.provider, model.id);
    return typeof languageModel === 'object' && languageModel.specificationVersion === 'v3' ? { languageModel, tools } : undefined;
  }

  /**
   * A chat call straight to the provider model's `doGenerate`: the same request the SDK's
   * `generateText` sends (prompt conversion, call settings, response format, tools and tool
   * choice), without its second Zod validation of the prompt (callers pass typed, validated
   * messages), telemetry spans and step machinery. Tool calls are read as `generateText` reads them
   * for tools with a plain JSON schema (toolCallOf), and its tool-choice check is made here.
   */
  private async generate(request: ChatRequest, direct: DirectCall, model: ModelInfo, attempt: Attempt, state: AttemptState, started: number, maxBytes: number): Promise<ChatResult> {
    const result = await direct.languageModel.doGenerate(await this.callOptions(request, direct, model, attempt, state.capped, this.withHops(request, this.answerHeaders(maxBytes))));
    state.usage = toTokenUsage(asLanguageModelUsage(result.usage));
    const declared = direct.tools !== undefined;
    let text = '';
    let reasoning: string | undefined;
    const toolCalls: ToolCall[] = [];
    for (const part of result.content) {
      if (part.type === 'text') text += part.text;
      else if (part.type === 'reasoning') reasoning = (reasoning ?? '') + part.text;
      else if (part.type === 'tool-call') toolCalls.push(modelToolCall(declared, part));
    }
    const refusal = rawRefusal(result.response?.body, 'message');
    const finishReason = finishOf(result.finishReason.unified, result.finishReason.raw, refusal !== undefined);
    if (declared) enforceToolChoice(request.toolChoice, toolCalls, finishReason, model);
    return this.chatResult(model, state, started, answer(withoutRefusal(text, refusal), reasoning, toolCalls, refusal, askedLogprobs(request, result.response?.body)), finishReason, null);
  }

  /**
   * The provider call options `generateText`/`streamText` would build for the call (its tools as
   * `functionTools` declared them), with `headers` for limitedFetch (answerHeaders, STREAM_ANSWER)
   * and the stream's `includeRawChunks` built in: not spread onto them afterwards, a copy a call.
   */
  private async callOptions(
    request: ChatRequest,
    { languageModel, tools }: DirectCall,
    model: ModelInfo,
    attempt: Attempt,
    capped: boolean,
    headers: Record<string, string> | undefined,
    includeRawChunks?: boolean,
  ) {
    const kind = this.options.providers.kind(model.provider);
    const prompt = await convertToLanguageModelPrompt({
      prompt: this.promptFor(request, kind),
      supportedUrls: await languageModel.supportedUrls,
      download: attempt.download(),
      abortSignal: attempt.signal,
    });
    const format = jsonFormatFor(kind, request.responseFormat);
    return {
      ...this.callSettings(request, model, capped),
      responseFormat: format && { type: 'json' as const, schema: format.schema, name: format.name, description: format.description },
      prompt,
      tools,
      toolChoice: tools && callToolChoice(request.toolChoice),
      providerOptions: this.providerOptions(request, model),
      abortSignal: attempt.signal,
      headers,
      includeRawChunks,
    };
  }

  /**
   * What tells limitedFetch a non-streamed answer's limit: nothing when it is MODEL_MAX_RESPONSE_BYTES,
   * the fetch's own (most calls: no header to make, and none for the fetch to take off and copy the
   * request's headers for), else the limit (answerOfAtMost).
   */
  private answerHeaders(maxBytes: number): Record<string, string> | undefined {
    return maxBytes > this.options.maxResponseBytes ? answerOfAtMost(maxBytes) : undefined;
  }

  /** A call's `headers` with its hop header (ProviderRegistry.hopHeaders) when its request came through other deployments. */
  private withHops(request: CallOptions, headers: Record<string, string> | undefined): Record<string, string> | undefined {
    const hops = this.options.providers.hopHeaders(request.hops);
    return hops ? { ...headers, ...hops } : headers;
  }

  /**
   * Streams a chat answer. Retries and fallbacks apply until the first event reaches the caller;
   * after that an upstream error ends the stream. Stopping the iteration (break, return) or the
   * signal aborts the upstream request.
   */
  stream(request: ChatRequest): ModelStream {
    // The caller's signal or the consumer stopping aborts the call. Linked by hand: AbortSignal.any
    // costs far more per call (weak references, a registry) on Node 20; a CallerAbort, not an
    // AbortController: the attempt makes an AbortSignal only for the SDK's paths, which need one.
    const consumer = new CallerAbort();
    const callerSignal = request.signal;
    const onCallerAbort = () => consumer.abort(callerSignal?.reason);
    if (callerSignal?.aborted) onCallerAbort();
    else callerSignal?.addEventListener('abort', onCallerAbort, { once: true });
    // The caller stopping its iteration before the end aborts the call. A caller slower than the
    // model is let catch up: at EVENTS_HIGH_WATER parts queued the loop below stops reading (the
    // wire then pauses the upstream's socket) until the caller has taken them all (`room`).
    let room: (() => void) | undefined;
    const setRoom = (next: (() => void) | undefined) => (room = next);
    const events = new AsyncQueue<StreamEvent>({ onReturn: () => consumer.abort(new ModelCallAbortedError()), onDrained: () => room?.() });

    const started = performance.now();
    let answering: string | undefined;
    const maxChars = this.options.maxResponseBytes;
    const keepAnswer = request.keepAnswer !== false;
    const result = this.run(request, consumer, 'stream', 'chat', request.maxOutputTokens, async (model, attempt, state) => {
      let text = '';
      let reasoning = '';
      let refusal = '';
      const toolCalls: ToolCall[] = [];
      let finishReason = 'unknown';
      let toolInputChars = 0;
      const logprobsChars = this.logprobsAllowance(request, model, state.capped);
      let logprobsRead = 0;
      /** A piece's log probabilities: no output (`seen` does not count them), held to what the call asked for on their own (the SDK's paths: the wire holds them as it reads). */
      const weigh = (logprobs: unknown[] | undefined) => {
        if (logprobs && !source.logprobsHeld && (logprobsRead += logprobsWeight(logprobs)) > logprobsChars) throw attempt.fail(logprobsTooLong(logprobsChars));
      };
      /** Output arrived (text, reasoning, a tool call's input): counted, and held to the size limit. */
      const seen = (output: string) => {
        attempt.touch();
        answering = model.id;
        state.streamed = true;
        state.firstTokenAt ??= performance.now();
        state.outputTokens += estimateTextTokens(output);
        // Past the size limit: cut off like a stream past its deadline (metered from what came).
        if ((state.outputChars += output.length) > maxChars) throw attempt.fail(new ModelAnswerLimitError(502, `The model's answer exceeded ${maxChars} characters`, true));
      };
      const source = await this.streamSource(request, model, attempt, state.capped);
      for await (const part of source.parts) {
        if (part.type === 'text-delta') {
          seen(part.text);
          weigh(part.logprobs);
          if (keepAnswer) text += part.text;
          events.push(part);
        } else if (part.type === 'reasoning-delta') {
          seen(part.text);
          if (keepAnswer) reasoning += part.text;
          events.push(part);
        } else if (part.type === 'refusal-delta') {
          seen(part.text);
          weigh(part.logprobs);
          if (keepAnswer) refusal += part.text;
          events.push(part);
        } else if (part.type === 'tool-call') {
          if (source.noToolCalls) throw toolChoiceViolation({ type: 'none' }, 'tool-calls', model);
          seen(asText(part.toolCall.input));
          state.outputTokens += estimateTextTokens(part.toolCall.toolName);
          toolCalls.push(part.toolCall);
          events.push(part);
        } else if (part.type === 'tool-input') {
          attempt.touch();
          // Input the SDK holds until its tool call is whole (which `seen` then counts as output):
          // limited on its own as it grows, as the wire limits what it assembles.
          if ((toolInputChars += part.chars) > maxChars) throw attempt.fail(new ModelAnswerLimitError(502, `The model's answer exceeded ${maxChars} characters`, true));
        } else if (part.type === 'finish') {
          finishReason = part.finishReason;
          state.usage = part.usage;
        } else {
          attempt.touch();
        }
        if (events.size >= EVENTS_HIGH_WATER) await attempt.waitForCaller(setRoom);
      }
      if (attempt.aborted) throw attempt.reason ?? new ModelCallAbortedError();
      const responseMessages = keepAnswer ? await source.responseMessages(text, reasoning || undefined, toolCalls, refusal || undefined) : [];
      const firstToken = state.firstTokenAt === null ? null : Math.round(state.firstTokenAt - started);
      return this.chatResult(model, state, started, { text, reasoningText: reasoning || undefined, refusal: refusal || undefined, toolCalls, responseMessages }, finishReason, firstToken);
    });
    result.then(
      (final) => {
        callerSignal?.removeEventListener('abort', onCallerAbort);
        events.push({ type: 'finish', result: final });
        events.end();
      },
      (error: unknown) => {
        callerSignal?.removeEventListener('abort', onCallerAbort);
        events.fail(error instanceof Error ? error : new Error(String(error)));
      },
    );
    // Reading `result` is optional for callers that iterate; its rejection then surfaces there.
    result.catch(() => {});
    return {
      result,
      get model() {
        return answering;
      },
      [Symbol.asyncIterator]: () => events,
    };
  }

  async embed(request: EmbedRequest): Promise<EmbedResult> {
    const started = performance.now();
    return this.run(request, request.signal, 'embed', 'embedding', 0, async (model, attempt, state) => {
      const wire = this.options.providers.embeddingsWire(model.provider);
      const answer = wire ? await this.embedOverWire(wire, request, model, attempt, state) : await this.embedThroughSdk(request, model, attempt, state);
      const tokens = boundedTokens(answer.tokens, request.values);
      // Before the answer is checked: one that does not fit its inputs was billed all the same, for what it reported.
      state.usage = tokens === undefined ? undefined : { ...ZERO_USAGE, input: tokens };
      const embeddings = inInputOrder(model.id, request.values.length, answer.vectors, answer.numbering);
      const { dimensions } = request;
      const size = dimensions ?? embeddings[0]?.length;
      if (size === 0) throw new ModelAnswerError(`Model ${model.id} answered empty vectors`);
      const otherSize = embeddings.find((vector) => vector.length !== size);
      // A provider that ignores `dimensions` (many OpenAI-compatible servers do) would hand back vectors a client's index of that size refuses.
      if (otherSize && dimensions !== undefined) throw new ModelAnswerError(`Model ${model.id} answered vectors of ${otherSize.length} dimensions where ${dimensions} were asked for: it may not support dimensions`);
      if (otherSize) throw new ModelAnswerError(`Model ${model.id} answered vectors of ${size} and ${otherSize.length} dimensions for one request`);
      return { ...this.outcome(model, state, started), embeddings };
    });
  }

  /**
   * Embeddings over the wire (openai-wire.ts), OPENAI_EMBEDDING_INPUTS inputs a request, one request
   * after another; with more than one, what each has been billed is kept on `state.split` while the
   * try runs, for a failure midway to be charged by (`SplitTry.billed`), and each answer on
   * `state.answeredParts`, for a retry to send only the requests that did not answer.
   */
  private async embedOverWire(wire: OpenAIWire, request: EmbedRequest, model: ModelInfo, attempt: AbortLike, state: AttemptState): Promise<VectorsAnswer> {
    const { values } = request;
    const send = (input: string[], signal: AbortLike) => {
      const call: WireEmbeddingsCall = { model: model.id, input };
      if (request.dimensions !== undefined) call.dimensions = request.dimensions;
      if (request.user !== undefined) call.user = request.user;
      return wire.embed(call, signal, embeddingsAnswerLimit(this.options.maxResponseBytes, input.length), this.options.providers.hopHeaders(request.hops));
    };
    /** The tokens a 2xx whose vectors could not be read reported (openai-wire's `embed` puts them on its error). */
    const failedTokens = (error: unknown, input: readonly string[]) => boundedTokens(reportedTokensOf(error), input);
    if (values.length <= OPENAI_EMBEDDING_INPUTS) {
      let answer: WireEmbeddings;
      try {
        answer = await send(values, attempt);
      } catch (error) {
        // Charged what it reported (see `run`), not its prompt's estimate.
        const tokens = failedTokens(error, values);
        if (tokens !== undefined) state.usage = { ...ZERO_USAGE, input: tokens };
        throw error;
      }
      // Checked as a whole (`inInputOrder`), once `embed` has put the usage it reported on `state`:
      // checked here, it would fail with no usage there yet, charged its prompt's estimate rather than what it was billed.
      return { vectors: answer.vectors, numbering: [answer.indexes], tokens: answer.tokens };
    }
    const split = new SplitTry();
    state.split = split;
    const parts: SplitPart[] = [];
    for (let start = 0; start < values.length; start += OPENAI_EMBEDDING_INPUTS) {
      const input = values.slice(start, start + OPENAI_EMBEDDING_INPUTS);
      parts.push(
        await keptOrSent(state, start, input.length, async () => {
          const sent = await split.request(
            input,
            attempt,
            (one) => send(input, requestSignal(attempt, () => split.answering(one))),
            (reply) => boundedTokens(reply.tokens, input),
            (error) => failedTokens(error, input),
          );
          // Each request's own count: one short and the next one long would otherwise pass as a whole,
          // every vector on another input (its usage is on `split` by now).
          checkVectorCount(model.id, input.length, sent.vectors.length, { start, of: values.length });
          return { vectors: sent.vectors, numbering: [sent.indexes], tokens: sent.tokens };
        }),
      );
    }
    return split.answer(parts, state);
  }

  /**
   * Embeddings through the AI SDK's model of the provider (Google's, Anthropic's none). Inputs past
   * what the model takes in one request (its `maxEmbeddingsPerCall`: Google's 100) go in requests
   * of that many, side by side where the model takes that, as `embedMany` would send them — but one
   * `embedMany` each, what each was billed kept on `state.split` (`SplitTry.billed`): one
   * `embedMany` of them all reports the first failure alone, not what the others were billed, and
   * leaves them running unseen. A failure is thrown once every request sent has ended. Each answer
   * is kept on `state.answeredParts`, for a retry to send only the requests that did not answer.
   */
  private async embedThroughSdk(request: EmbedRequest, model: ModelInfo, attempt: Attempt, state: AttemptState): Promise<VectorsAnswer> {
    const sdkModel = this.options.providers.embeddingModel(model.provider, model.id);
    const providerOptions = this.embedOptions(request, model);
    const send = (inputs: string[], abortSignal: AbortSignal) =>
      embedMany({
        model: sdkModel,
        values: inputs,
        maxRetries: 0,
        headers: this.withHops(request, this.answerHeaders(embeddingsAnswerLimit(this.options.maxResponseBytes, inputs.length))),
        providerOptions,
        abortSignal,
      });
    const { values } = request;
    const perRequest = typeof sdkModel === 'string' ? undefined : await sdkModel.maxEmbeddingsPerCall;
    if (perRequest === undefined || values.length <= perRequest) {
      const answer = sdkAnswer(await send(values, attempt.signal));
      checkFinite(model.id, answer.vectors);
      return answer;
    }
    const split = new SplitTry();
    state.split = split;
    const sendPart = (start: number): Promise<SplitPart> => {
      const inputs = values.slice(start, start + perRequest);
      return keptOrSent(state, start, inputs.length, async () => {
        const result = await split.request(inputs, attempt, (one) => sentApart(attempt, (signal) => send(inputs, signal), () => split.answering(one)), (sent) => boundedTokens(sdkTokens(sent), inputs));
        // Billed by now (`split`): a request that fails its checks is charged as one that answered.
        const part = { start, of: values.length };
        checkVectorCount(model.id, inputs.length, result.embeddings.length, part);
        const answer = sdkAnswer(result);
        checkFinite(model.id, answer.vectors, part);
        return answer;
      });
    };
    const starts = Array.from({ length: Math.ceil(values.length / perRequest) }, (_, i) => i * perRequest);
    let ended: PromiseSettledResult<SplitPart>[];
    if (typeof sdkModel !== 'string' && (await sdkModel.supportsParallelCalls)) {
      ended = await Promise.allSettled(starts.map(sendPart));
    } else {
      // One after another: none is sent after one failed.
      ended = [];
      for (const start of starts) {
        const one = await settledOf(sendPart(start));
        ended.push(one);
        if (one.status === 'rejected') break;
      }
    }
    const failed = ended.find((one) => one.status === 'rejected');
    if (failed) throw failed.reason;
    return split.answer(
      ended.map((one) => (one as PromiseFulfilledResult<SplitPart>).value),
      state,
    );
  }

  /**
   * A streamed call's parts, the same whether they come over the wire, straight from the provider
   * model or through the SDK's `streamText`; an upstream error or abort is thrown.
   */
  private async streamSource(request: ChatRequest, model: ModelInfo, attempt: Attempt, capped: boolean): Promise<StreamSource> {
    const tools = request.tools && functionTools(request.tools);
    const wired = this.wireCall(request, model, tools, capped);
    if (wired) {
      const parts = await wired.wire.stream(wired.call, attempt, this.options.maxResponseBytes, this.logprobsAllowance(request, model, capped), this.options.providers.hopHeaders(request.hops));
      return { parts, responseMessages: directResponseMessages, noToolCalls: wired.call.tool_choice === 'none', logprobsHeld: true };
    }
    // OpenAI's SDK models hand a refusal on as text: the raw chunks tell it apart (see RefusalReader).
    // Only theirs are asked for: every raw chunk is one more part through the stream.
    const includeRawChunks = this.options.providers.openAIOptions(model.provider) !== undefined;
    const direct = this.directModel(model, tools);
    if (direct) {
      const declared = direct.tools !== undefined;
      const { stream } = await direct.languageModel.doStream(await this.callOptions(request, direct, model, attempt, capped, this.withHops(request, STREAM_ANSWER), includeRawChunks));
      return {
        parts: (async function* () {
          const refusals = new RefusalReader(request.logprobs === true);
          for await (const part of stream) {
            if (part.type === 'text-delta') {
              if (part.delta || refusals.hasLogprobs) yield refusals.part(part.delta);
            } else if (part.type === 'reasoning-delta') {
              if (part.delta) yield { type: part.type, text: part.delta };
            } else if (part.type === 'raw') refusals.chunk(part.rawValue);
            else if (part.type === 'tool-input-delta') yield { type: 'tool-input', chars: part.delta.length };
            else if (part.type === 'tool-call') yield { type: 'tool-call', toolCall: modelToolCall(declared, part) };
            else if (part.type === 'finish') yield { type: 'finish', finishReason: finishOf(part.finishReason.unified, part.finishReason.raw, refusals.refused), usage: toTokenUsage(asLanguageModelUsage(part.usage)) };
            else if (part.type === 'error') throw streamError(part.error);
            else yield PROGRESS;
          }
        })(),
        responseMessages: directResponseMessages,
        noToolCalls: declared && request.toolChoice === 'none',
      };
    }
    const sdk = streamText({ ...this.sdkOptions(request, model, capped), experimental_download: attempt.download(), headers: this.withHops(request, STREAM_ANSWER), includeRawChunks, abortSignal: attempt.signal, onError: () => {} });
    return {
      parts: (async function* () {
        const refusals = new RefusalReader(request.logprobs === true);
        for await (const part of sdk.fullStream) {
          if (part.type === 'text-delta') yield refusals.part(part.text);
          else if (part.type === 'reasoning-delta') yield { type: part.type, text: part.text };
          else if (part.type === 'raw') refusals.chunk(part.rawValue);
          else if (part.type === 'tool-input-delta') yield { type: 'tool-input', chars: part.delta.length };
          else if (part.type === 'tool-call') yield { type: 'tool-call', toolCall: { toolCallId: part.toolCallId, toolName: part.toolName, input: part.input as unknown } };
          else if (part.type === 'finish') yield { type: 'finish', finishReason: finishOf(part.finishReason, part.rawFinishReason, refusals.refused), usage: toTokenUsage(part.totalUsage) };
          else if (part.type === 'error') throw streamError(part.error);
          else if (part.type === 'abort') throw attempt.reason ?? new ModelCallAbortedError();
          else yield PROGRESS;
        }
      })(),
      responseMessages: async () => (await sdk.response).messages,
    };
  }

  /**
   * The call's provider options, with what the request asks of OpenAI-style providers told to the
   * provider the way its SDK model takes it: a response schema that need not be strict
   * (`strictJsonSchema: false`; the SDK's default is strict), `reasoningEffort`, `user`, its
   * successors `prompt_cache_key` (with its `prompt_cache_retention`) and `safety_identifier` (OpenAI's own models only), and
   * `parallel_tool_calls` (`parallelToolCalls` for openai; an openai-compatible model sends keys it
   * does not know as they are). Anthropic and Google models take what they have a place for
   * (nativeOptions). The wire sends them itself.
   */
  private providerOptions(request: ChatRequest, model: ModelInfo): ChatRequest['providerOptions'] {
    const { responseFormat, reasoningEffort, user, promptCacheKey, promptCacheRetention, safetyIdentifier, parallelToolCalls, logprobs, topLogprobs, logitBias, verbosity, prediction } = request;
    if (
      responseFormat?.strict !== false &&
      reasoningEffort === undefined &&
      user === undefined &&
      promptCacheKey === undefined &&
      promptCacheRetention === undefined &&
      safetyIdentifier === undefined &&
      parallelToolCalls === undefined &&
      !logprobs &&
      logitBias === undefined &&
      verbosity === undefined &&
      prediction === undefined
    ) {
      return request.providerOptions;
    }
    const openAI = this.options.providers.openAIOptions(model.provider);
    if (!openAI) return withOptions(request.providerOptions, this.nativeOptions(request, model));
    const { kind, key } = openAI;
    const asked: Record<string, JSONValue> = {};
    if (responseFormat?.strict === false) asked.strictJsonSchema = false;
    if (reasoningEffort !== undefined) asked.reasoningEffort = reasoningEffort;
    if (user !== undefined) asked.user = user;
    // OpenAI's own: servers that speak its API refuse them as unknown fields (Groq, Cerebras, Mistral...), where a call without them works.
    if (kind === 'openai' && promptCacheKey !== undefined) asked.promptCacheKey = promptCacheKey;
    if (kind === 'openai' && promptCacheRetention !== undefined) asked.promptCacheRetention = promptCacheRetention;
    if (kind === 'openai' && safetyIdentifier !== undefined) asked.safetyIdentifier = safetyIdentifier;
    if (parallelToolCalls !== undefined) asked[kind === 'openai' ? 'parallelToolCalls' : 'parallel_tool_calls'] = parallelToolCalls;
    // The openai model's `logprobs` is true or the top count (it sends `logprobs` and `top_logprobs`).
    if (logprobs) Object.assign(asked, kind === 'openai' ? { logprobs: topLogprobs ?? true } : { logprobs: true, ...(topLogprobs !== undefined && { top_logprobs: topLogprobs }) });
    if (logitBias !== undefined) asked[kind === 'openai' ? 'logitBias' : 'logit_bias'] = logitBias;
    // Both models read `textVerbosity` (and send `verbosity`); `prediction` is the openai model's name and OpenAI's.
    if (verbosity !== undefined) asked.textVerbosity = verbosity;
    if (prediction !== undefined) asked.prediction = prediction;
    return withOptions(request.providerOptions, { key, asked });
  }

  /**
   * What an Anthropic or Google model takes of OpenAI's hints, keyed as its SDK model reads them:
   * the thinking `reasoning_effort` asks for (thinkingBudget, or the effort itself for a Claude that
   * thinks only adaptively: adaptiveThinkingOnly; Google's thoughts included in the answer, so they
   * come back as Anthropic's do, `reasoning_content`), and `parallel_tool_calls:
   * false` with tools as Anthropic's `disableParallelToolUse` (Google has no such switch).
   * Anthropic's SDK model makes room for the thinking itself: it adds the budget to `max_tokens`
   * (which must exceed it) and leaves out `temperature`, `top_p` and `top_k`, which thinking forbids;
   * callSettings makes it for Google's.
   */
  private nativeOptions(request: ChatRequest, model: ModelInfo): { key: string; asked: Record<string, JSONValue> } | undefined {
    const kind = this.options.providers.kind(model.provider);
    const effort = this.thinkingEffort(request, model);
    const budget = this.thinkingBudget(request, model, effort);
    const asked: Record<string, JSONValue> = {};
    if (kind === 'anthropic') {
      if (budget > 0) asked.thinking = { type: 'enabled', budgetTokens: budget };
      else if (effort !== undefined && adaptiveThinkingOnly(model.id, this.anthropic)) Object.assign(asked, { thinking: { type: 'adaptive' }, effort });
      if (request.parallelToolCalls === false && request.tools && Object.keys(request.tools).length > 0) asked.disableParallelToolUse = true;
    } else if (kind === 'google' && budget > 0) {
      asked.thinkingConfig = { thinkingBudget: budget, includeThoughts: true };
    }
    return kind !== undefined && Object.keys(asked).length > 0 ? { key: kind, asked } : undefined;
  }

  /**
   * The `reasoning_effort` of a call that asks `model` to think, else undefined: an effort that asks
   * for some (THINKING_BUDGETS names it), of an Anthropic or Google model whose capabilities include
   * reasoning (OpenAI-style providers take the effort itself; a model that does not reason would
   * refuse thinking upstream), and not an Anthropic call that cannot think (anthropicThinkingRefused).
   */
  private thinkingEffort(request: Partial<ChatRequest>, model: ModelInfo): string | undefined {
    const effort = request.reasoningEffort;
    if (effort === undefined || !THINKING_BUDGETS.has(effort) || !model.capabilities.includes('reasoning')) return undefined;
    const kind = this.options.providers.kind(model.provider);
    if (kind === 'anthropic' ? anthropicThinkingRefused(request, model.id, this.anthropic) : kind !== 'google') return undefined;
    return effort;
  }

  /** Anthropic's SDK package, for what its models take: loaded before a call to one is made (run: ProviderRegistry.ready). */
  private get anthropic(): ProviderSdks['anthropic'] {
    return this.options.providers.sdks.get('anthropic');
  }

  /**
   * The thinking budget (THINKING_BUDGETS) a call asks of `model` on top of its maximum, 0 where it
   * asks for none (thinkingEffort) or for thinking without a budget (adaptiveThinkingOnly: that
   * thinking counts within the `max_tokens` sent, so the call's maximum already holds it). Where the
   * catalog knows the model's output cap, the budget is what the cap leaves beside the call's
   * maximum (the two are sent as one: Anthropic's `max_tokens`, Google's `maxOutputTokens`), none
   * under MIN_THINKING_BUDGET: the SDK clamps only for the model ids it knows, and a custom id was
   * answered 400. What is sent and what the call holds both read it, so they agree.
   */
  private thinkingBudget(request: Partial<ChatRequest>, model: ModelInfo, effort = this.thinkingEffort(request, model)): number {
    if (effort === undefined || (this.options.providers.kind(model.provider) === 'anthropic' && adaptiveThinkingOnly(model.id, this.anthropic))) return 0;
    const asked = THINKING_BUDGETS.get(effort) ?? 0;
    const cap = model.max_output_tokens;
    const budget = cap === null ? asked : Math.min(asked, cap - this.outputTokens(model, request.maxOutputTokens));
    return budget >= MIN_THINKING_BUDGET ? budget : 0;
  }

  /** An embedding call's provider options (ProviderRegistry.embeddingOptions); a provider that cannot shorten its vectors refuses `dimensions` before anything is sent. */
  private embedOptions(request: EmbedRequest, model: ModelInfo): ProviderMetadata | undefined {
    const options = this.options.providers.embeddingOptions(model.provider, request.dimensions, request.user);
    if (options === null) throw new ModelCapabilityError(model.id, 'dimensions');
    return options;
  }

  /**
   * A call's settings as `generateText` checks and passes them (prepareCallSettings: integers,
   * ranges). A Google model's maximum makes room for its thinking budget: Gemini counts thoughts
   * within `maxOutputTokens`, so the caller's maximum alone left a thinking call's answer empty or
   * cut short (Anthropic's SDK model adds the budget to `max_tokens` itself).
   */
  private callSettings(request: ChatRequest, model: ModelInfo, capped: boolean) {
    const { temperature, topP, frequencyPenalty, presencePenalty, seed, stopSequences } = request;
    let maxOutputTokens = this.sentOutputTokens(request, model, capped);
    if (maxOutputTokens !== undefined && request.reasoningEffort !== undefined && this.options.providers.kind(model.provider) === 'google') maxOutputTokens += this.thinkingBudget(request, model);
    return prepareCallSettings({ maxOutputTokens, temperature, topP, frequencyPenalty, presencePenalty, seed, stopSequences });
  }

  /**
   * The call's system prompt and messages as `kind`'s models take them: Anthropic's and Google's
   * without the text blank for them (BLANK, withoutBlanks), Anthropic's with tool call ids it takes
   * (withAnthropicToolIds).
   */
  private promptFor(request: ChatRequest, kind: ProviderKind | undefined): { system: string | undefined; messages: ModelMessage[] } {
    const { system, messages } = request;
    if (!ownApi(kind)) return { system, messages };
    const blank = BLANK[kind];
    const sent = withoutBlanks(messages, blank);
    return { system: system !== undefined && SILENT_SYSTEM(system) ? undefined : system, messages: kind === 'anthropic' ? withAnthropicToolIds(sent) : sent };
  }

  private sdkOptions(request: ChatRequest, model: ModelInfo, capped: boolean) {
    const kind = this.options.providers.kind(model.provider);
    const format = jsonFormatFor(kind, request.responseFormat);
    return {
      model: this.options.providers.languageModel(model.provider, model.id),
      ...this.promptFor(request, kind),
      tools: request.tools,
      toolChoice: request.toolChoice,
      ...this.callSettings(request, model, capped),
      providerOptions: this.providerOptions(request, model),
      output: format && jsonOutput(format),
      maxRetries: 0,
    };
  }

  /** The answer's model, usage and cost (of `state.usage`, which the attempt has set). */
  private outcome(model: ModelInfo, state: AttemptState, started: number): CallOutcome {
    const { usage, cost } = this.price(model, state);
    return { model: model.id, provider: model.provider, usage, cost, latency_ms: Math.round(performance.now() - started) };
  }

  /** The outcome and what was said in one object literal: no spreads, on every chat call. */
  private chatResult(model: ModelInfo, state: AttemptState, started: number, said: Said, finishReason: string, firstTokenMs: number | null): ChatResult {
    // A streamed answer's output was counted part by part as it came (`seen`), kept or not.
    // Usage that is no usage (a count missing, negative) is estimated as none reported.
    const reported = chargeableUsage(state.usage);
    if (reported === undefined && !state.streamed) state.outputTokens = saidTokens(said);
    const { usage, cost } = this.price(model, state, reported);
    return {
      model: model.id,
      provider: model.provider,
      usage,
      cost,
      latency_ms: Math.round(performance.now() - started),
      text: said.text,
      reasoningText: said.reasoningText,
      refusal: said.refusal,
      toolCalls: said.toolCalls,
      logprobs: said.logprobs,
      responseMessages: said.responseMessages,
      finishReason,
      time_to_first_token_ms: firstTokenMs,
    };
  }

  /**
   * `state.usage` (set by the attempt) and its cost, kept for the usage record (computed once). A
   * provider that reported no usage is not a free call: its usage is estimated (and so marked).
   */
  private price(model: ModelInfo, state: AttemptState, reported = chargeableUsage(state.usage)): { usage: TokenUsage; cost: string } {
    let usage = reported;
    if (usage === undefined) {
      usage = estimatedUsage(state);
      state.estimated = true;
    }
    state.usage = usage;
    return (state.priced = { usage, cost: computeCost(model.pricing, usage) });
  }

  /** Resolution, reservation, retries, fallbacks and settlement around `runAttempt`. */
  private async run<T>(
    request: CallOptions & Partial<ChatRequest> & Partial<EmbedRequest>,
    /** What aborts the call (the request's, or a stream's own). */
    signal: CallerSignal | undefined,
    operation: Operation,
    capability: Capability,
    maxOutputTokens: number | undefined,
    runAttempt: AttemptRunner<T>,
  ): Promise<T> {
    const deadline = operation === 'stream' ? performance.now() + this.options.streamTimeoutMs : Infinity;
    /** The least time a retry or fallback of a stream is sent with (streamTryFloorMs); Infinity - x is Infinity for the rest. */
    const lastTryAt = deadline - streamTryFloorMs(this.options.streamTimeoutMs);
    const primary = this.resolve(request.model, capability);
    const status = this.options.providers.status(primary.provider);
    let chain: ModelInfo[];
    /** The error the call ends with unless a model answers: the last tried's, or why the first could not be. */
    let lastError: Error | undefined;
    if (status.available) {
      const refused = this.refusal(request, primary);
      if (refused) throw refused;
      chain = request.sameModel ? [primary] : this.chainOf(primary, capability, request);
    } else {
      // Its provider disabled, without credentials, or its secrets unreadable: the call falls to its
      // first usable fallback, as when its own tries fail; with none, it fails naming what is missing.
      lastError = new ProviderUnavailableError(primary.provider, status.reason ?? 'unavailable', status.missing);
      chain = request.sameModel ? [] : this.chainOf(primary, capability, request).slice(1);
      // With none, a fallback that could be called but refuses the request (an option it does not
      // take) tells the caller what to change: its 400, not the 503 of a provider they cannot fix.
      if (chain.length === 0) throw (request.sameModel ? undefined : this.fallbackRefusal(request.model, primary, capability, request)) ?? lastError;
    }
    /** Whether a model of the chain was reserved: the first is the call as the key's rate counts it, those after it its fallbacks. */
    let reservedOne = false;
    const inputTokens =
      operation === 'embed'
        ? estimateTokens((request.values ?? []).join(''))
        : Math.max(0, estimateTokens([request.system ?? '', request.messages, toolsSent(request.tools), request.responseFormat ?? null]) + mediaAllowance(request.messages));
    const predicted = predictedTokens(request.prediction);
    /** The images and files the prompt names by URL, fetched once for all the call's tries. */
    const files = new CallDownloads(this.downloadLimits);
    for (const model of chain) {
      if (signal?.aborted) throw abortedError(signal);
      // A stream's deadline gone, or too near: a fallback would be sent its request only to have it cut off.
      if (lastError && performance.now() >= lastTryAt) throw lastError;
      // An Anthropic or Google model's SDK package, on the first call to one (provider-sdks.ts). One
      // that cannot be loaded makes its provider unavailable: the model is passed over, as one whose
      // provider is not set up is (chainOf); with no model after it, the call fails with that 503.
      const loading = this.options.providers.ready(model.provider);
      if (loading) {
        try {
          await loading;
        } catch (error) {
          // The call's error unless a model after it is tried (whose own error then is).
          lastError ??= error as Error;
          continue;
        }
      }
      // The estimate's worst case: what the call sends upstream as its maximum (see outputTokens), the
      // thinking it asks for, and a prediction's tokens where they may be billed: by a provider it is
      // sent to (OpenAI-style ones: see providerOptions).
      const worst =
        operation === 'embed'
          ? this.worstCase(model, inputTokens, 0)
          : this.worstCase(model, inputTokens, maxOutputTokens, this.thinkingBudget(request, model) + (predicted > 0 && this.options.providers.openAIOptions(model.provider) ? predicted : 0));
      const estimate: CostEstimate = {
        operation,
        model: model.id,
        provider: model.provider,
        input_tokens: inputTokens,
        max_output_tokens: worst.outputTokens,
        cost: worst.cost,
        context: request.context ?? {},
        fallback: reservedOne,
      };
      reservedOne = true;
      const reservation = this.options.meter
        ? await untilAborted(this.options.meter.reserve(estimate), signal, (late) => {
            // Made after its caller stopped waiting: ended at once, an aborted call that never went upstream (its hold released).
            const record: UsageRecord = {
              operation,
              model: model.id,
              provider: model.provider,
              tokens: { ...ZERO_USAGE },
              estimated: false,
              cost: '0',
              latency_ms: 0,
              time_to_first_token_ms: null,
              status: 'aborted',
              error: new ModelCallAbortedError().message,
              attempts: 0,
              started_at: new Date(),
              context: request.context ?? {},
            };
            this.settleOffPath(late, record);
          })
        : undefined;
      const state: AttemptState = { estimated: false, inputTokens, streamed: false, firstTokenAt: null, outputChars: 0, outputTokens: 0, capped: reservation?.holdsOutput === true };
      const started = performance.now();
      const startedAt = new Date();
      let attempts = 0;
      /**
       * Tries of this model that failed once their provider had begun answering (its 2xx came), with
       * no output seen (a stream's output makes its try estimated anyway): timed out, or cut off by a
       * dropped connection before or after a first chunk that said nothing (a role-only delta). The
       * provider bills each, so the model's one record is charged each one's prompt estimate on top
       * of what its last try is charged (marked estimated), however its tries ended after them (a
       * retry's answer or 400, the caller gone during the wait). A try sent in several requests adds
       * what it was billed for instead (`SplitTry.billed`), however it failed.
       */
      const failedTries = { tokens: 0, estimated: false };
      const addFailedTry = (billed: { tokens: number; estimated: boolean }) => {
        failedTries.tokens += billed.tokens;
        failedTries.estimated ||= billed.estimated;
      };
      /** `abortedUpstream`: the caller went away while the request was with the provider (charged for its prompt at least). */
      const finish = (status: CallStatus, error: Error | null, abortedUpstream = false) => {
        if (!reservation) return;
        // A call ended after output reached the caller (an abort, an error) has no usage either:
        // estimated. So has one aborted while its request was upstream: the provider has the prompt
        // (and may go on answering a non-streamed call), so a caller that goes away before the
        // answer is charged for the prompt, not let off free.
        // Priced as the answer went out (price): its usage and cost as they are, not read again.
        const reported = reportedUsage(state);
        const ownEstimate = state.estimated || (reported === undefined && (state.streamed || abortedUpstream));
        let tokens = reported ?? (ownEstimate ? estimatedUsage(state) : { ...ZERO_USAGE });
        // Each try that failed after its provider began answering adds its prompt (0 on most calls: no copy).
        if (failedTries.tokens > 0) tokens = { ...tokens, input: tokens.input + failedTries.tokens };
        const record: UsageRecord = {
          operation,
          model: model.id,
          provider: model.provider,
          tokens,
          estimated: ownEstimate || failedTries.estimated,
          cost: state.priced?.usage === tokens ? state.priced.cost : computeCost(model.pricing, tokens),
          latency_ms: Math.round(performance.now() - started),
          time_to_first_token_ms: state.firstTokenAt === null ? null : Math.round(state.firstTokenAt - started),
          status,
          error: error?.message ?? null,
          attempts,
          started_at: startedAt,
          context: request.context ?? {},
        };
        queueMicrotask(() => this.settleOffPath(reservation, record));
      };

      if (signal?.aborted) {
        // The caller went away while the call was being reserved: it goes no further (settling releases the hold).
        finish('aborted', new ModelCallAbortedError());
        throw abortedError(signal);
      }
      for (;;) {
        attempts += 1;
        const timeoutMs = request.timeoutMs ?? this.options.timeoutMs;
        const attempt = new Attempt(signal, files, timeoutMs, deadline, this.options.streamTimeoutMs);
        // The credentials this try is sent with: what its error may echo, even once they are changed meanwhile.
        const sentWith = this.options.providers.current;
        try {
          // Its provider may have become one whose SDK package is loaded on first use since the chain
          // began (a superuser's change of its kind, or of the record a built-in id stands for).
          const loading = this.options.providers.ready(model.provider);
          if (loading) await loading;
          const value = await runAttempt(model, attempt, state);
          finish('success', null);
          return value;
        } catch (error) {
          const outcome = classify(error, attempt, signal, timeoutMs, request.interactive === true);
          // A try sent in several requests that failed midway: charged what its requests were billed
          // (each as a call of its own would be), not its whole prompt's estimate, however it failed.
          const split = state.split;
          state.split = undefined;
          if (split) addFailedTry(split.billed(outcome.kind === 'aborted'));
          if (outcome.kind === 'aborted') {
            finish('aborted', new ModelCallAbortedError(), !split);
            throw abortedError(signal);
          }
          const failure = this.withoutSecrets(outcome.error, model.provider, sentWith);
          lastError = failure;
          // A 2xx the call could not use (no JSON, no completion, past its size): the provider billed
          // it, so it is charged at least its prompt's estimate (and what a stream said), estimated.
          // An embeddings answer whose vectors could not be read but that reported its usage is charged that, exact
          // (`embedOverWire`); a chat answer's usage before it broke (a stream's) may not be all it was billed.
          if (!split && outcome.kind === 'fatal' && brokenAnswer(failure)) state.estimated ||= operation !== 'embed' || reportedUsage(state) === undefined;
          // Cut off after the provider's 2xx began, by the try's silence, by the stream's deadline (a
          // silent reasoning model runs up tokens upstream all the while) or by a dropped connection
          // before any output: it billed the try, which was recorded free and exact, and retried. Not
          // one whose usage came (a broken tool choice's answer): that usage is what it is charged;
          // nor one the provider ended with its own error event (it said the try failed, as a 5xx does).
          else if (!split && !state.streamed && attempt.answered && reportedUsage(state) === undefined && !(error instanceof StreamErrorEvent)) addFailedTry({ tokens: state.inputTokens, estimated: true });
          if (outcome.kind === 'fatal' || state.streamed) {
            finish('error', failure);
            throw failure;
          }
          const retryAfter = outcome.kind === 'retryable' ? outcome.retryAfterMs : undefined;
          const wait = this.backoff(attempts, retryAfter);
          // A stream's deadline that the wait would reach leaves this model no try: its caller was
          // held past the deadline for a try cut off at once, and told of a timeout, not of the
          // provider's refusal. Its retries are exhausted, the fallbacks get what time is left.
          const outOfTime = performance.now() + wait >= lastTryAt;
          // A provider that asks to be left alone longer than a call waits between tries would
          // likely refuse the capped try too: a caller that backs off by itself is told at once
          // (after the fallbacks), not after every try's wait in vain (40 s for a 429 by default).
          // A wait the deadline cut short is the caller's too.
          const passedOn = (outOfTime || (request.interactive && (retryAfter ?? 0) > this.options.retryMaxWaitMs)) && failure instanceof UpstreamError && retryAfter !== undefined;
          if (passedOn) lastError = failure.passedOn();
          if (passedOn || outOfTime || outcome.kind === 'next' || attempts > this.options.maxRetries) {
            finish('error', failure);
            break; // next model in the chain
          }
          await sleep(wait, signal).catch((e: unknown) => {
            finish('aborted', new ModelCallAbortedError());
            throw e;
          });
        } finally {
          attempt.end();
        }
      }
    }
    throw lastError ?? new UpstreamError('No model answered');
  }

  /**
   * What a provider said, without the provider's credentials: a server may echo what it was sent
   * (its Authorization header) in an error, which goes on to the caller (a 400's words reach the
   * client), the usage record and the log. Those the request was sent with (`sentWith`) and those
   * of now: a superuser who rotates a key while a call is in flight has the old one echoed back.
   */
  private withoutSecrets(error: Error, providerId: string, sentWith: ProviderRecords): Error {
    if (!(error instanceof UpstreamError)) return error;
    const { providers } = this.options;
    let diagnosis = error.message;
    for (const records of sentWith === providers.current ? [sentWith] : [sentWith, providers.current]) {
      for (const secret of providers.secrets(providerId, records)) diagnosis = diagnosis.replaceAll(secret, '[redacted]');
    }
    return diagnosis === error.message ? error : error.reworded(diagnosis);
  }

  /**
   * What the answer's log probabilities may take on `model`, beyond the answer's limit (see
   * logprobsAllowance): a client's max_tokens past the model's own limit is not sent on as more it
   * may answer, so it buys no more room.
   */
  private logprobsAllowance(request: ChatRequest, model: ModelInfo, capped: boolean): number {
    if (!request.logprobs) return 0;
    const tokens = Math.min(this.sentOutputTokens(request, model, capped) ?? Infinity, model.max_output_tokens ?? Infinity);
    return logprobsAllowance(request.logprobs, request.topLogprobs, tokens, this.options.maxResponseBytes);
  }

  /**
   * A call's output tokens: its own maximum, else the default, or the model's own limit when
   * smaller. An Anthropic or Google model's own limit bounds the caller's maximum too: both refuse a
   * larger one (400), which OpenAI's clients send freely as a ceiling, and the answer could not be
   * longer than the limit anyway (Anthropic's SDK model clamps it the same way, but only for the
   * Claude ids it knows). An OpenAI-style provider gets it as it is and answers as OpenAI does.
   */
  private outputTokens(model: ModelInfo, maxOutputTokens: number | undefined): number {
    const own = model.max_output_tokens;
    if (maxOutputTokens !== undefined) return own !== null && maxOutputTokens > own && ownApi(this.options.providers.kind(model.provider)) ? own : maxOutputTokens;
    const fallback = this.options.defaultMaxOutputTokens;
    return own !== null && own < fallback ? own : fallback;
  }
  /**
   * The output maximum a chat call sends upstream: outputTokens, but none when the client set none,
   * its reservation holds nothing by it (`capped` false: UsageReservation.holdsOutput) and its
   * provider is OpenAI-style — which answers as OpenAI does, up to the model's own limit, where
   * MODEL_DEFAULT_MAX_OUTPUT_TOKENS sent would end a long answer with `length`. Anthropic requires a
   * maximum, and Google's is where its thinking budget is made room in (callSettings): both are sent
   * outputTokens. A call whose reservation holds credit is sent what it held, so it cannot cost more.
   */
  private sentOutputTokens(request: Partial<ChatRequest>, model: ModelInfo, capped: boolean): number | undefined {
    if (request.maxOutputTokens === undefined && !capped && !ownApi(this.options.providers.kind(model.provider))) return undefined;
    return this.outputTokens(model, request.maxOutputTokens);
  }


  /**
   * Why `model` cannot take the call as it is, refused before anything is held or sent (a fallback
   * that cannot is skipped): an option its provider would not hear (unheardOption), an image for a
   * model known not to read one (withoutVision: OpenAI's 400 for such a model), a conversation
   * an Anthropic or Google model has nothing to answer in (answerable), one whose blank last message
   * left out would leave an assistant message to continue (blankAfterAssistant), or what else Google
   * refuses (untakenByGoogle); blank as the provider reads it (BLANK). OpenAI takes them all, so
   * OpenAI-style models get them as they are, for the price of a kind's look-up. Blank text beside
   * what the conversation says is left out instead (promptFor).
   */
  private refusal(request: Partial<ChatRequest>, model: ModelInfo): ModelOptionError | ModelValueError | undefined {
    const unheard = this.unheardOption(request, model);
    if (unheard) return new ModelOptionError(model.id, unheard.option, unheard.reason);
    const { messages } = request;
    if (messages === undefined) return undefined;
    const image = withoutVision(model) ? firstImageAt(messages) : undefined;
    if (image !== undefined) return new ModelValueError(model.id, image, 'it does not take image input (its catalog entry has no `vision` capability)');
    const kind = this.options.providers.kind(model.provider);
    if (!ownApi(kind)) return undefined;
    const blank = BLANK[kind];
    if (!answerable(messages, blank)) {
      return new ModelValueError(model.id, 'messages', `its provider (${kind}) needs a user or assistant message that says something, and this conversation has only system messages or empty ones`);
    }
    const trailing = blankAfterAssistant(messages, blank);
    if (trailing >= 0) {
      return new ModelValueError(
        model.id,
        `messages[${trailing}]`,
        `its provider (${kind}) takes no ${kind === 'anthropic' ? 'empty or whitespace' : 'empty'} message, and without this last one the assistant message before it would be continued rather than answered`,
      );
    }
    const untaken = kind === 'google' ? untakenByGoogle(messages, request.tools) : undefined;
    return untaken && new ModelValueError(model.id, untaken.param, `its provider (google) ${untaken.reason}`);
  }

  /**
   * The first option of the call (by its name in OpenAI's API) that the client would miss in the
   * answer and that `model`'s provider would not hear (droppedBy): `logprobs` and `logit_bias`,
   * which only OpenAI-style providers take, and which the openai SDK model drops for the models it
   * takes for reasoning ones. The SDK models would answer without them, and the caller not know.
   */
  private unheardOption(request: Partial<ChatRequest>, model: ModelInfo): { option: string; reason: string } | undefined {
    const option = droppedBy(request);
    if (option === undefined) return undefined;
    const kind = this.options.providers.kind(model.provider);
    if (kind === 'openai' && sdkReasoningModel(model.id)) return { option, reason: 'the openai provider\'s model drops it for reasoning models' };
    return ownApi(kind) ? { option, reason: `its provider (${kind}) does not take it` } : undefined;
  }

  /** Settles `reservation` with `record`, its failure to the meter's error hook (never the caller's). */
  private settleOffPath(reservation: UsageReservation, record: UsageRecord): void {
    Promise.resolve()
      .then(() => reservation.settle(record))
      .catch((e: unknown) => this.options.onMeterError?.(e, record));
  }

  /**
   * Whether `fallback` can stand in for a call of `capability` as things stand: enabled, able to do
   * that one operation (a model that chats and embeds may fall to one model for each), its provider
   * callable (fallbackUnavailable), and `request` nothing it would refuse (refusal). The one rule for
   * what a call falls to (chainOf) and what is said to answer ahead of one (answersFor).
   */
  private standsIn(fallback: ModelInfo, capability: Capability, request: Partial<ChatRequest>): boolean {
    return this.fallbackUnavailable(fallback, [capability]) === undefined && this.refusal(request, fallback) === undefined;
  }

  /**
   * The refusal (refusal) of the first of `model`'s fallbacks that could take a call of `capability`
   * as things stand (fallbackUnavailable) but not `request` as it is, if any: what a call whose own
   * model cannot be called, and that no fallback takes (chainOf), fails with. Only on that failure.
   * Said of `asked`, the model (or alias) the client named, with the fallback and its reason in the
   * words: naming only the fallback, a model the client never asked for, it read as if the request
   * had gone to the wrong model. Only the first refusing fallback is named (the others may refuse
   * for other reasons). Why the provider cannot be called (credentials not set, secrets
   * unreadable) is the operator's, not for this 400: the 503 without a refusing fallback says it.
   */
  private fallbackRefusal(asked: string, model: ModelInfo, capability: Capability, request: Partial<ChatRequest>): HttpError | undefined {
    for (const id of model.fallbacks) {
      const fallback = this.options.catalog.modelAsCalled(id);
      if (!fallback || fallback.id === model.id || this.fallbackUnavailable(fallback, [capability]) !== undefined) continue;
      const refused = this.refusal(request, fallback);
      if (refused) return refused.asRefusalOf(asked, `its provider cannot be called, and no fallback takes it (${fallback.id}, the first that could answer: ${refused.reason})`);
    }
    return undefined;
  }

  /** The model, then its fallbacks that can take the call (standsIn), each once. */
  private chainOf(model: ModelInfo, capability: Capability, request: Partial<ChatRequest>): ModelInfo[] {
    const out: ModelInfo[] = [model];
    for (const id of model.fallbacks) {
      const fallback = this.options.catalog.modelAsCalled(id);
      if (!fallback || out.some((m) => m.id === fallback.id)) continue;
      if (this.standsIn(fallback, capability, request)) out.push(fallback);
    }
    return out;
  }

  /** Retry-after when the upstream sent one, else exponential backoff with jitter; both capped. */
  private backoff(attempt: number, retryAfter: number | undefined): number {
    const cap = this.options.retryMaxWaitMs;
    if (retryAfter !== undefined) return Math.min(retryAfter, cap);
    const base = (this.options.retryBaseDelayMs ?? 500) * 2 ** (attempt - 1);
    return Math.min(cap, base / 2 + Math.random() * (base / 2));
  }
}
