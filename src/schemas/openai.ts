/**
 * The OpenAI-compatible surface (`/v1`): request and response shapes as OpenAI's API defines them,
 * limited to what Keel serves. Every field of OpenAI's that would change the answer is here, to be
 * passed on or refused (docs/decisions.md, "Request fields"); other unknown fields are ignored
 * (the tools built on OpenAI's SDKs send fields of their own).
 */
import { z } from 'zod';

import { nestsWithin } from './common.js';

// ==================== Errors ====================

export const OpenAIError = z
  .object({
    error: z.object({
      message: z.string(),
      type: z.string(),
      param: z.string().nullable(),
      code: z.string().nullable(),
    }),
  })
  .meta({ id: 'OpenAIError' });

/** Every error a /v1 route may answer, in OpenAI's shape. */
export const openAIErrors = {
  400: OpenAIError,
  401: OpenAIError,
  402: OpenAIError,
  403: OpenAIError,
  404: OpenAIError,
  409: OpenAIError,
  415: OpenAIError,
  429: OpenAIError,
  500: OpenAIError,
  502: OpenAIError,
  503: OpenAIError,
  504: OpenAIError,
} as const;

// ==================== Models ====================

export const OpenAIModel = z
  .object({
    id: z.string(),
    object: z.literal('model'),
    created: z.number().int(),
    owned_by: z.string(),
  })
  .meta({ id: 'OpenAIModel' });

export const OpenAIModelList = z.object({ object: z.literal('list'), data: z.array(OpenAIModel) }).meta({ id: 'OpenAIModelList' });

/**
 * Any length the router takes (MAX_PARAM_LENGTH): an id longer than any model's is a model that
 * does not exist, 404 model_not_found as OpenAI answers it, not a 400 about its length.
 */
export const OpenAIModelParams = z.object({ model: z.string().min(1) });

// ==================== Chat completions ====================

const TextPart = z.object({ type: z.literal('text'), text: z.string() });
/** An image's data URL as OpenAI takes it: an image type and base64 (no line breaks; its digits captured, padding aside). */
const IMAGE_DATA_URL = /^data:image\/[\w.+-]+(?:;[\w.+-]+=[^;,]*)*;base64,([A-Za-z0-9+/]*)={0,2}$/i;
/** An http(s) URL, or an image's data URL whose digits are of a length base64 can have (never 1 more than a multiple of 4). */
const isImageUrl = (url: string): boolean => /^https?:\/\//i.test(url) || (IMAGE_DATA_URL.exec(url)?.[1]!.length ?? 1) % 4 !== 1;

const ImagePart = z.object({
  type: z.literal('image_url'),
  // Anything else would be taken for base64 data and sent on as an image, or refused by the SDK (a 500).
  image_url: z.object({
    url: z.string().refine(isImageUrl, { error: 'Expected an http(s) URL or a data URL of an image in base64 (data:image/png;base64,…)' }),
    detail: z.enum(['auto', 'low', 'high']).nullish(),
  }),
});
const RefusalPart = z.object({ type: z.literal('refusal'), refusal: z.string() });

const TextContent = z.union([z.string(), z.array(TextPart)]);

const ToolCallIn = z.object({
  id: z.string().min(1),
  type: z.literal('function'),
  function: z.object({ name: z.string().min(1), arguments: z.string() }),
});

/**
 * A participant's name as OpenAI's API takes it (`messages[].name`): no whitespace and none of
 * `< | \\ / >` (the pattern its own 400 quotes; the older ASCII-only rule refused `José` and
 * `alice@example.com`, which OpenAI takes), at most 256 characters (Keel's bound: OpenAI states
 * none). Sent on to OpenAI-compatible providers; the others have no such field (docs/decisions.md).
 */
export const PARTICIPANT_NAME = /^[^\s<|\\/>]{1,256}$/u;
const ParticipantName = z.string().regex(PARTICIPANT_NAME, { error: 'A name is 1 to 256 characters without whitespace or any of < | \\ / >' }).nullish();

const SystemMessage = z.object({ role: z.enum(['system', 'developer']), content: TextContent, name: ParticipantName });
const UserMessage = z.object({
  role: z.literal('user'),
  // No parts is no message: sent on, OpenAI answers 400 (as it does here, at the same param).
  content: z.union([z.string(), z.array(z.discriminatedUnion('type', [TextPart, ImagePart])).min(1)]),
  name: ParticipantName,
});
const AssistantMessage = z.object({
  role: z.literal('assistant'),
  content: z.union([z.string(), z.array(z.discriminatedUnion('type', [TextPart, RefusalPart]))]).nullish(),
  tool_calls: z.array(ToolCallIn).nullish(),
  refusal: z.string().nullish(),
  name: ParticipantName,
});
const ToolMessage = z.object({ role: z.literal('tool'), content: TextContent, tool_call_id: z.string().min(1) });

// Bounds on what a request may hold that no real client reaches, each checked before anything
// else reads the body (chatRequestBoundsIssue): within the 20 MB body (GATEWAY_BODY_LIMIT_BYTES),
// hundreds of thousands of messages or parts each cost the gateway CPU to check, convert and
// estimate, and one such request held the event loop (every other request of the node) 1 to 3 s.
// Not settings: no operator has a client that needs more.

/**
 * Azure OpenAI's documented limit on a Chat Completions request's `messages` (2,048), OpenAI's own
 * for an embeddings request's inputs. Not for an `agent:<id>` model, whose messages start a thread:
 * MAX_MESSAGES_PER_THREAD, the operator's, bounds those (409 from the thread's own check).
 */
export const MAX_MESSAGES = 2048;

/** `agent:<id>` models are Keel's agents, run by services/agent-completions.ts; the model manager never sees them. */
export const AGENT_MODEL_PREFIX = 'agent:';
/** Whether a request's model is bounded by MAX_MESSAGES: every model but an agent. */
const boundedModel = (model: unknown): boolean => typeof model !== 'string' || !model.startsWith(AGENT_MODEL_PREFIX);
/** OpenAI's documented limit: "a max of 128 functions". */
export const MAX_TOOLS = 128;
/**
 * Content parts and tool calls of all messages together (and a prediction's parts): four for each
 * message a request may hold, where a conversation's message is a text, an image or two, a few tool
 * calls; the 500 images OpenAI takes in a request fit. A bound on each message's alone would still
 * let 2,048 messages carry millions of them.
 */
export const MAX_MESSAGE_PARTS = 4 * MAX_MESSAGES;

/**
 * How deep a client's free-form JSON (a tool's parameters, a response schema, a tool call's
 * arguments) may nest: past any real schema (each level of a JSON Schema object is two), far short
 * of what would exhaust the call stack of the code that serializes it on the way upstream.
 */
export const MAX_JSON_DEPTH = 64;

/** OpenAI's limits on a request's `metadata`: 16 pairs, keys of at most 64 characters, values of at most 512. */
export const MAX_METADATA_PAIRS = 16;
/** OpenAI's limit on a `logit_bias`'s tokens (its 400 past 300): each is a line of the provider's sampler. */
export const MAX_LOGIT_BIAS_TOKENS = 300;
/**
 * JSON values (every object, array, string, number... at any depth) in all of a request's free-form
 * JSON Schemas together (the tools' `parameters`, `response_format.json_schema.schema`): each is
 * walked for its depth, estimated and serialized upstream. OpenAI states a size only for strict
 * schemas (5,000 properties, a few values each); 128 such tools still fit.
 */
export const MAX_SCHEMA_VALUES = 100_000;
/**
 * The nesting and the values a /v1 body may have, read before it is parsed (utils/json-shape.ts,
 * routers/openai.ts), past the bounds above with room: a schema's MAX_JSON_DEPTH levels below the
 * request's own four; MAX_SCHEMA_VALUES, the messages' and parts' few values each, and the rest.
 */
export const MAX_BODY_DEPTH = 72;
export const MAX_BODY_VALUES = 250_000;
/** Bodies this long or shorter are parsed without their shape read first: their parse costs a few milliseconds at most. */
export const SHAPE_CHECKED_FROM_BYTES = 64 * 1024;

const TOO_MANY_MESSAGES = `At most ${MAX_MESSAGES} messages in a request`;
const TOO_MANY_TOOLS = `At most ${MAX_TOOLS} tools in a request`;
const TOO_MANY_PARTS = `At most ${MAX_MESSAGE_PARTS} content parts and tool calls in a request, all messages together`;
const TOO_MANY_BIASES = `At most ${MAX_LOGIT_BIAS_TOKENS} tokens`;
const TOO_MANY_PAIRS = `At most ${MAX_METADATA_PAIRS} pairs`;
const TOO_MANY_SCHEMA_VALUES = `At most ${MAX_SCHEMA_VALUES} values in the tools' parameters and the response format's schema, all together`;

/** A bound a request passes: where, and the most it takes. */
export interface BoundsIssue {
  path: (string | number)[];
  maximum: number;
  message: string;
}

/**
 * Where a request passes MAX_MESSAGE_PARTS: the array (a message's content or tool calls, the
 * prediction's content) that takes the count past it.
 */
function partsIssue(messages: readonly unknown[], prediction: unknown): BoundsIssue | undefined {
  let parts = 0;
  const past = (array: unknown): boolean => Array.isArray(array) && (parts += array.length) > MAX_MESSAGE_PARTS;
  const issue = (path: (string | number)[]): BoundsIssue => ({ path, maximum: MAX_MESSAGE_PARTS, message: TOO_MANY_PARTS });
  for (let index = 0; index < messages.length; index++) {
    const message = messages[index];
    if (typeof message !== 'object' || message === null) continue;
    const { content, tool_calls: calls } = message as { content?: unknown; tool_calls?: unknown };
    if (past(content)) return issue(['messages', index, 'content']);
    if (past(calls)) return issue(['messages', index, 'tool_calls']);
  }
  if (typeof prediction === 'object' && prediction !== null && past((prediction as { content?: unknown }).content)) return issue(['prediction', 'content']);
  return undefined;
}

/**
 * The values of a free-form schema, counted into `budget` (what is left of MAX_SCHEMA_VALUES):
 * what remains after it, below 0 once the budget is spent (the walk stops there). Not below
 * MAX_JSON_DEPTH levels, which the schema refuses anyway (FreeFormObject).
 */
function schemaValuesLeft(value: unknown, budget: number, depth = 0): number {
  budget -= 1;
  if (budget < 0 || value === null || typeof value !== 'object' || depth >= MAX_JSON_DEPTH) return budget;
  if (Array.isArray(value)) {
    for (const item of value) if ((budget = schemaValuesLeft(item, budget, depth + 1)) < 0) return budget;
    return budget;
  }
  for (const key in value) if ((budget = schemaValuesLeft((value as Record<string, unknown>)[key], budget, depth + 1)) < 0) return budget;
  return budget;
}

/** Where a request's free-form schemas pass MAX_SCHEMA_VALUES, all together: the schema that takes the count past it. */
function schemaValuesIssue(tools: unknown, responseFormat: unknown): BoundsIssue | undefined {
  let budget = MAX_SCHEMA_VALUES;
  const issue = (path: (string | number)[]): BoundsIssue => ({ path, maximum: MAX_SCHEMA_VALUES, message: TOO_MANY_SCHEMA_VALUES });
  if (Array.isArray(tools)) {
    for (let index = 0; index < tools.length; index++) {
      const parameters = (tools[index] as { function?: { parameters?: unknown } } | null)?.function?.parameters;
      if (parameters !== undefined && (budget = schemaValuesLeft(parameters, budget)) < 0) return issue(['tools', index, 'function', 'parameters']);
    }
  }
  const schema = (responseFormat as { json_schema?: { schema?: unknown } } | null)?.json_schema?.schema;
  if (schema !== undefined && schemaValuesLeft(schema, budget) < 0) return issue(['response_format', 'json_schema', 'schema']);
  return undefined;
}

/** Whether a plain object has more than `max` keys. */
const moreKeysThan = (value: unknown, max: number): boolean => isRecord(value) && Object.keys(value).length > max;

/**
 * The first bound (MAX_TOOLS, MAX_LOGIT_BIAS_TOKENS, MAX_METADATA_PAIRS, MAX_MESSAGES,
 * MAX_MESSAGE_PARTS, MAX_SCHEMA_VALUES) a chat request's body passes, by
 * counting alone: the route checks it before the body is parsed by hand or by Zod, whose parse of
 * every message came before its own array checks. What it finds is what the schema refuses, at
 * the same path and in the same words, and in the order Zod reports them.
 */
export function chatRequestBoundsIssue(data: unknown): BoundsIssue | undefined {
  if (typeof data !== 'object' || data === null) return undefined;
  const { model, messages, tools, prediction, logit_bias: bias, metadata, response_format: responseFormat } = data as Record<string, unknown>;
  // The fields' own checks first (tools, logit_bias, metadata: Zod's, in the schema's order), then its refinement's counts.
  if (Array.isArray(tools) && tools.length > MAX_TOOLS) return { path: ['tools'], maximum: MAX_TOOLS, message: TOO_MANY_TOOLS };
  if (moreKeysThan(bias, MAX_LOGIT_BIAS_TOKENS)) return { path: ['logit_bias'], maximum: MAX_LOGIT_BIAS_TOKENS, message: TOO_MANY_BIASES };
  if (moreKeysThan(metadata, MAX_METADATA_PAIRS)) return { path: ['metadata'], maximum: MAX_METADATA_PAIRS, message: TOO_MANY_PAIRS };
  if (Array.isArray(messages) && messages.length > MAX_MESSAGES && boundedModel(model)) return { path: ['messages'], maximum: MAX_MESSAGES, message: TOO_MANY_MESSAGES };
  return partsIssue(Array.isArray(messages) ? messages : [], prediction) ?? schemaValuesIssue(tools, responseFormat);
}

/** A bound passed, as the schema's own array check reports it. */
const addBoundsIssue = (ctx: z.RefinementCtx, { path, maximum, message }: BoundsIssue): void =>
  ctx.addIssue({ code: 'too_big', origin: 'array', maximum, inclusive: true, path, message });

/** chatRequestBoundsIssue as a schema, for the route to run first (its error then is Zod's, as for every other refusal). */
export const ChatRequestBounds = z.unknown().superRefine((data, ctx) => {
  const issue = chatRequestBoundsIssue(data);
  if (issue) addBoundsIssue(ctx, issue);
});

export const ChatMessage = z.discriminatedUnion('role', [SystemMessage, UserMessage, AssistantMessage, ToolMessage]);
export type ChatMessage = z.infer<typeof ChatMessage>;


/** A JSON object of the client's (a JSON Schema), at most MAX_JSON_DEPTH levels deep. */
const FreeFormObject = z.record(z.string(), z.unknown()).refine((value) => nestsWithin(value, MAX_JSON_DEPTH), { error: `Nested deeper than ${MAX_JSON_DEPTH} levels` });

const FunctionTool = z.object({
  type: z.literal('function'),
  function: z.object({
    name: z.string().regex(/^[\w-]{1,64}$/, { error: 'A function name is 1 to 64 letters, digits, _ or -' }),
    description: z.string().nullish(),
    parameters: FreeFormObject.nullish(),
    strict: z.boolean().nullish(),
  }),
});

const ToolChoice = z.union([
  z.enum(['none', 'auto', 'required']),
  z.object({ type: z.literal('function'), function: z.object({ name: z.string().min(1) }) }),
]);

const ResponseFormat = z.discriminatedUnion('type', [
  z.object({ type: z.literal('text') }),
  z.object({ type: z.literal('json_object') }),
  z.object({
    type: z.literal('json_schema'),
    json_schema: z.object({
      name: z.string().min(1).max(64),
      description: z.string().optional(),
      schema: FreeFormObject.optional(),
      strict: z.boolean().nullish(),
    }),
  }),
]);


const MaxTokens = z.number().int().min(1).max(10_000_000).nullish();

/**
 * A `logit_bias` with each token id in its integer form (`"0001"` → `"1"`): the openai SDK model
 * sends ids as numbers, openai-compatible providers (over the wire, the SDK's model) got them as
 * written, so one body reached providers two ways. Two keys naming one token are refused (which
 * bias won was the path's). Ids nearly always come canonical: that body is kept as it is, so only
 * a bias pays for one look at its keys.
 */
function canonicalTokenIds(bias: Record<string, number>, ctx: z.RefinementCtx): Record<string, number> {
  const keys = Object.keys(bias);
  if (keys.every((key) => key.length === 1 || key[0] !== '0')) return bias;
  const out: Record<string, number> = {};
  for (const key of keys) {
    // At most 10 digits (the key's schema): a double holds each exactly.
    const id = String(Number(key));
    if (Object.hasOwn(out, id)) {
      const first = keys.find((other) => String(Number(other)) === id)!;
      ctx.addIssue({ code: 'custom', message: `Keys ${JSON.stringify(first)} and ${JSON.stringify(key)} name one token id, ${id}` });
      return z.NEVER;
    }
    out[id] = bias[key]!;
  }
  return out;
}

/** OpenAI's reasoning efforts (those its SDK model takes). */
const REASONING_EFFORTS = ['none', 'minimal', 'low', 'medium', 'high', 'xhigh', 'max'] as const;
const REASONING_EFFORT_SET: ReadonlySet<unknown> = new Set(REASONING_EFFORTS);
const PROMPT_CACHE_RETENTION = ['in_memory', '24h'] as const;
const PROMPT_CACHE_RETENTIONS: ReadonlySet<unknown> = new Set(PROMPT_CACHE_RETENTION);

/** OpenAI's words for `stream_options` without `stream: true`. */
export const STREAM_OPTIONS_WITHOUT_STREAM = 'The \'stream_options\' parameter is only allowed when \'stream\' is enabled.';

export const ChatCompletionRequest = z
  .object({
    model: z.string().min(1).max(200),
    messages: z
      .array(ChatMessage)
      .min(1)
      .describe(`At most ${MAX_MESSAGES}, and ${MAX_MESSAGE_PARTS} content parts and tool calls in all of them together; for an \`agent:<id>\` model, as many as a thread holds (MAX_MESSAGES_PER_THREAD, 409 past it).`),
    stream: z.boolean().nullish(),
    stream_options: z.object({ include_usage: z.boolean().nullish() }).nullish().describe('Only with `stream: true` (400 otherwise, as OpenAI answers); null is no options.'),
    tools: z.array(FunctionTool).max(MAX_TOOLS, { error: TOO_MANY_TOOLS }).nullish(),
    tool_choice: ToolChoice.nullish(),
    parallel_tool_calls: z.boolean().nullish().describe('false: at most one tool call an answer. For OpenAI and OpenAI-compatible models, and Anthropic ones (with tools); dropped for Google models.'),
    response_format: ResponseFormat.nullish(),
    n: z.literal(1, { error: 'Only n=1 is supported' }).nullish(),
    max_tokens: MaxTokens,
    max_completion_tokens: MaxTokens,
    temperature: z.number().min(0).max(2).nullish(),
    top_p: z.number().min(0).max(1).nullish(),
    frequency_penalty: z.number().min(-2).max(2).nullish(),
    presence_penalty: z.number().min(-2).max(2).nullish(),
    seed: z.number().int().min(Number.MIN_SAFE_INTEGER).max(Number.MAX_SAFE_INTEGER).nullish(),
    reasoning_effort: z
      .enum(REASONING_EFFORTS)
      .nullish()
      .describe(
        'For models that reason: as it is for OpenAI and OpenAI-compatible models; for Anthropic and Google models with the `reasoning` capability a thinking budget (low 1,024 tokens, medium 2,048, high 4,096, xhigh 8,192, max 16,384; none and minimal: none asked), held and charged as output, or for a Claude model that thinks only adaptively the effort itself (within max_tokens); dropped for other models.',
      ),
    user: z.string().max(256).nullish(),
    // What the openai package has in place of `user` (deprecated there): passed on as `user` is.
    prompt_cache_key: z
      .string()
      .max(64)
      .nullish()
      .describe('At most 64 characters, for models of `openai` providers (OpenAI\'s prompt cache buckets requests by it: cached input is billed at its lower price); dropped for others, whose servers may refuse it.'),
    prompt_cache_retention: z
      .enum(PROMPT_CACHE_RETENTION)
      .nullish()
      .describe('How long OpenAI keeps the prompt\'s cache (`24h`: extended caching), for models of `openai` providers; dropped for others, whose servers may refuse it.'),
    safety_identifier: z
      .string()
      .max(64)
      .nullish()
      .describe('Your end user\'s stable id (a hash), at most 64 characters, for models of `openai` providers (OpenAI\'s abuse checks tell your users apart by it); dropped for others, whose servers may refuse it.'),
    logprobs: z.boolean().nullish().describe('The answer\'s token log probabilities in `choices[].logprobs` (streamed with each chunk), for models of OpenAI and OpenAI-compatible providers; 400 for others.'),
    top_logprobs: z.number().int().min(0).max(20).nullish().describe('With `logprobs: true`: the likeliest tokens at each place, this many.'),
    logit_bias: z
      .record(z.string().regex(/^\d{1,10}$/, { error: 'A key is a token id' }), z.number().min(-100).max(100))
      .refine((bias) => Object.keys(bias).length <= MAX_LOGIT_BIAS_TOKENS, { error: TOO_MANY_BIASES })
      .transform(canonicalTokenIds)
      .nullish()
      .describe(`Token id → bias (-100 to 100), at most ${MAX_LOGIT_BIAS_TOKENS} tokens, for models of OpenAI and OpenAI-compatible providers; 400 for others. Ids are sent in their integer form (\`"007"\` as \`"7"\`); two keys naming one id are 400.`),
    stop: z.union([z.string(), z.array(z.string()).max(4)]).nullish(),
    verbosity: z.enum(['low', 'medium', 'high']).nullish().describe('For models of OpenAI and OpenAI-compatible providers; dropped for others (a hint, as docs/decisions.md has it).'),
    store: z.boolean().nullish().describe('Ignored: the provider account is the operator\'s, whose retention a caller does not turn on.'),
    prediction: z
      .object({ type: z.literal('content'), content: z.union([z.string(), z.array(TextPart)]) })
      .nullish()
      .describe('Predicted output, passed to OpenAI and OpenAI-compatible providers, whose tokens of it the answer does not use are billed as output (the credit hold counts it); ignored by others.'),
    service_tier: z
      .enum(['auto', 'default'], { error: 'Only `auto` and `default`: Keel bills every call at its catalog\'s price, so other tiers are not offered' })
      .nullish()
      .describe('`auto` or `default` only (the provider\'s default tier).'),
    // Asked for, they would change the answer; not served, so refused rather than dropped.
    modalities: z
      .array(z.literal('text', { error: 'Only text output is served' }))
      .nullish()
      .describe('`["text"]` only.'),
    audio: z.null({ error: 'Audio output is not served' }).optional(),
    web_search_options: z.null({ error: 'Web search is not served: use an agent with a search tool' }).optional(),
    functions: z.null({ error: 'The deprecated `functions` are not served: send `tools`' }).optional(),
    function_call: z.null({ error: 'The deprecated `function_call` is not served: send `tool_choice`' }).optional(),
    metadata: z
      .record(z.string().max(64), z.string().max(512))
      .refine((pairs) => Object.keys(pairs).length <= MAX_METADATA_PAIRS, { error: TOO_MANY_PAIRS })
      .nullish()
      .describe(`OpenAI's string pairs (at most ${MAX_METADATA_PAIRS}, keys of at most 64 characters, values of at most 512); not sent to providers (OpenAI keeps it only with a stored completion, and \`store\` is ignored). For an \`agent:<id>\` model, \`thread_id\` names the thread to run on (default: a new one).`),
  })
  .superRefine(({ model, messages, prediction, stream, stream_options: streamOptions, tools, tool_choice: choice, logprobs, top_logprobs: top, response_format: responseFormat }, ctx) => {
    if (messages.length > MAX_MESSAGES && boundedModel(model)) addBoundsIssue(ctx, { path: ['messages'], maximum: MAX_MESSAGES, message: TOO_MANY_MESSAGES });
    const parts = partsIssue(messages, prediction);
    if (parts) addBoundsIssue(ctx, parts);
    const schemaValues = schemaValuesIssue(tools, responseFormat);
    if (schemaValues) addBoundsIssue(ctx, schemaValues);
    // As OpenAI refuses it: options of a stream on an answer that is not streamed (the client asked
    // for a usage chunk it would never get). Null is no options: clients send it for an unset field.
    if (streamOptions !== null && streamOptions !== undefined && stream !== true) ctx.addIssue({ code: 'custom', path: ['stream_options'], message: STREAM_OPTIONS_WITHOUT_STREAM });
    // As OpenAI refuses it: asked for the top tokens without the log probabilities, the client would get neither.
    if (top !== null && top !== undefined && logprobs !== true) ctx.addIssue({ code: 'custom', path: ['top_logprobs'], message: '`top_logprobs` needs `logprobs: true`' });
    // A choice that asks for a tool call needs tools to call (the SDK would drop it without a word
    // and the model answer in text); `none` and `auto` mean the same with or without them.
    if (choice === null || choice === undefined) return;
    if (typeof choice !== 'object') {
      if (choice === 'required' && !tools?.length) ctx.addIssue({ code: 'custom', path: ['tool_choice'], message: '`required` needs `tools` to choose from' });
      return;
    }
    if (!tools?.some((tool) => tool.function.name === choice.function.name)) {
      ctx.addIssue({ code: 'custom', path: ['tool_choice'], message: `No tool named ${JSON.stringify(choice.function.name)} in \`tools\`` });
    }
  })
  .meta({ id: 'ChatCompletionRequest' });
export type ChatCompletionRequest = z.infer<typeof ChatCompletionRequest>;

const ToolCallOut = z.object({
  id: z.string(),
  type: z.literal('function'),
  function: z.object({ name: z.string(), arguments: z.string() }),
});

export const CompletionUsage = z
  .object({
    prompt_tokens: z.number().int(),
    completion_tokens: z.number().int(),
    total_tokens: z.number().int(),
    prompt_tokens_details: z.object({ cached_tokens: z.number().int() }),
    completion_tokens_details: z.object({ reasoning_tokens: z.number().int() }),
  })
  .meta({ id: 'CompletionUsage' });

const FinishReason = z.enum(['stop', 'length', 'tool_calls', 'content_filter']);

export const ChatCompletion = z
  .object({
    id: z.string(),
    object: z.literal('chat.completion'),
    created: z.number().int(),
    model: z.string(),
    choices: z.array(
      z.object({
        index: z.number().int(),
        message: z.object({
          role: z.literal('assistant'),
          content: z.string().nullable(),
          reasoning_content: z.string().optional().describe('The model\'s reasoning, for models that reason and give it (streamed as `reasoning_content` deltas).'),
          refusal: z
            .string()
            .nullable()
            .describe('The model\'s refusal to answer, where its provider tells one apart (OpenAI\'s, with structured outputs); `content` is then null and `finish_reason` the provider\'s (`stop`). Streamed as `refusal` deltas.'),
          tool_calls: z.array(ToolCallOut).optional(),
        }),
        finish_reason: FinishReason,
        logprobs: z
          .object({ content: z.array(z.unknown()).nullable(), refusal: z.array(z.unknown()).nullable() })
          .nullable()
          .describe('With `logprobs: true`: the tokens\' log probabilities as the provider gave them (`{token, logprob, bytes, top_logprobs}` each).'),
      }),
    ),
    usage: CompletionUsage,
    metadata: z
      .object({ thread_id: z.string(), run_id: z.string() })
      .optional()
      .describe('For an `agent:<id>` model: the thread the agent ran on (send it back as `metadata.thread_id` to go on) and the run.'),
  })
  .meta({
    id: 'ChatCompletion',
    description: 'The answer; with `stream: true` the route answers `text/event-stream` of `chat.completion.chunk` objects ending in `data: [DONE]`.',
  });

/** A streamed completion as it goes over the wire (`stream: true`). */
export const ChatCompletionEvents = z.string().meta({
  id: 'ChatCompletionEvents',
  description: 'Server-sent events: `data: <chat.completion.chunk JSON>` per chunk (`delta.content`, `delta.refusal` for a refusal, `delta.reasoning_content`, `delta.tool_calls`; the last one with `usage` and no choices when `stream_options.include_usage`), then `data: [DONE]`; a failure after the first chunk is a `data: {"error": {...}}` event.',
});

// ==================== Embeddings ====================

export const EmbeddingRequest = z
  .object({
    model: z.string().min(1).max(200),
    // An empty text has no embedding: OpenAI refuses it too.
    // Token ids (OpenAI's other input) are a tokenizer's, which the catalog's models do not share;
    // LangChain's OpenAIEmbeddings sends them unless told not to, so the refusal says what to send.
    input: z.union([z.string().min(1), z.array(z.string().min(1)).min(1).max(2048)], {
      error: 'input must be a text or a list of 1 to 2048 texts, none of them empty (token ids are not taken: send the text)',
    }),
    // Null for each optional field is as good as leaving it out, as for a chat completion's: clients
    // that serialize a request model with its unset fields (pydantic's `model_dump()`) send it.
    encoding_format: z.enum(['float', 'base64']).nullish(),
    dimensions: z
      .number()
      .int()
      .min(1)
      .max(65_536)
      .nullish()
      .describe('The size of the vectors, for models that can shorten theirs (OpenAI\'s text-embedding-3, Google\'s, OpenAI-compatible servers that take it); an answer of another size is a 502.'),
    user: z.string().max(256).nullish(),
  })
  .meta({ id: 'EmbeddingRequest', description: 'Text input only (token arrays are not accepted).' });
export type EmbeddingRequest = z.infer<typeof EmbeddingRequest>;

export const EmbeddingList = z
  .object({
    object: z.literal('list'),
    data: z.array(
      z.object({
        object: z.literal('embedding'),
        index: z.number().int(),
        embedding: z.union([z.array(z.number()), z.string().meta({ description: 'Little-endian float32 values, base64' })]),
      }),
    ),
    model: z.string(),
    usage: z.object({ prompt_tokens: z.number().int(), total_tokens: z.number().int() }),
  })
  .meta({ id: 'EmbeddingList' });

// ==================== The hot route's common body, without Zod ====================

const SIMPLE_ROLES = new Set(['system', 'developer', 'user', 'assistant']);
/**
 * Keys `simpleChatRequest` checks itself; any other key of the schema (tools, response_format,
 * logit_bias with its canonical token ids, ...) sends the body to Zod.
 */
const SIMPLE_KEYS = new Set([
  'model',
  'messages',
  'stream',
  'stream_options',
  'n',
  'max_tokens',
  'max_completion_tokens',
  'temperature',
  'top_p',
  'frequency_penalty',
  'presence_penalty',
  'seed',
  'stop',
  'user',
  'prompt_cache_key',
  'prompt_cache_retention',
  'safety_identifier',
  'reasoning_effort',
]);
const SCHEMA_KEYS = new Set(Object.keys(ChatCompletionRequest.shape));

const isRecord = (value: unknown): value is Record<string, unknown> => typeof value === 'object' && value !== null && !Array.isArray(value);
const nullishNumber = (value: unknown, min: number, max: number, integer = false): boolean =>
  value === undefined || value === null || (typeof value === 'number' && value >= min && value <= max && (!integer || Number.isInteger(value)));
const nullishString = (value: unknown, maxLength: number): boolean => value === undefined || value === null || (typeof value === 'string' && value.length <= maxLength);

/**
 * The body as `ChatCompletionRequest.parse` returns it, for the shape nearly every call has (text
 * messages, the sampling settings), checked by hand: Zod's parse was ~2.5 % of a gateway call's
 * CPU (bench/RESULTS.md). Undefined for anything else — other fields, content parts, tool calls,
 * and every invalid body — which Zod then parses, so its errors (and their OpenAI `param`) are
 * unchanged. Keys outside the schema are dropped, as Zod's object drops them.
 */
export function simpleChatRequest(data: unknown): ChatCompletionRequest | undefined {
  if (!isRecord(data)) return undefined;
  const out: Record<string, unknown> = {};
  for (const key in data) {
    if (!SCHEMA_KEYS.has(key)) continue;
    if (!SIMPLE_KEYS.has(key)) return undefined;
    out[key] = data[key];
  }
  const { model, messages, stream, stream_options: streamOptions, n, stop } = out;
  if (typeof model !== 'string' || model.length < 1 || model.length > 200) return undefined;
  if (!Array.isArray(messages) || messages.length < 1 || (messages.length > MAX_MESSAGES && boundedModel(model))) return undefined;
  const parsed: Record<string, unknown>[] = [];
  for (const message of messages as unknown[]) {
    if (!isRecord(message)) return undefined;
    const { role, content, name } = message;
    if (typeof role !== 'string' || !SIMPLE_ROLES.has(role) || typeof content !== 'string') return undefined;
    const copy: Record<string, unknown> = { role, content };
    for (const key in message) {
      if (key === 'role' || key === 'content') continue;
      // Known keys of other shapes (tool_calls, refusal, tool_call_id): Zod's.
      if (key !== 'name') {
        if (key === 'tool_calls' || key === 'refusal' || key === 'tool_call_id') return undefined;
        continue;
      }
      if (name === undefined) continue;
      if (typeof name !== 'string' || !PARTICIPANT_NAME.test(name)) return undefined;
      copy.name = name;
    }
    parsed.push(copy);
  }
  out.messages = parsed;
  if (stream !== undefined && stream !== null && typeof stream !== 'boolean') return undefined;
  if (streamOptions !== undefined && streamOptions !== null) {
    // Not streamed: Zod's refusal (400 at stream_options).
    if (stream !== true || !isRecord(streamOptions)) return undefined;
    const includeUsage = streamOptions.include_usage;
    if (includeUsage !== undefined && includeUsage !== null && typeof includeUsage !== 'boolean') return undefined;
    out.stream_options = includeUsage === undefined ? {} : { include_usage: includeUsage };
  }
  if (n !== undefined && n !== null && n !== 1) return undefined;
  if (!nullishNumber(out.max_tokens, 1, 10_000_000, true) || !nullishNumber(out.max_completion_tokens, 1, 10_000_000, true)) return undefined;
  if (!nullishNumber(out.temperature, 0, 2) || !nullishNumber(out.top_p, 0, 1)) return undefined;
  if (!nullishNumber(out.frequency_penalty, -2, 2) || !nullishNumber(out.presence_penalty, -2, 2)) return undefined;
  if (!nullishNumber(out.seed, Number.MIN_SAFE_INTEGER, Number.MAX_SAFE_INTEGER, true)) return undefined;
  if (!nullishString(out.user, 256) || !nullishString(out.prompt_cache_key, 64) || !nullishString(out.safety_identifier, 64)) return undefined;
  if (out.reasoning_effort !== undefined && out.reasoning_effort !== null && !REASONING_EFFORT_SET.has(out.reasoning_effort)) return undefined;
  if (out.prompt_cache_retention !== undefined && out.prompt_cache_retention !== null && !PROMPT_CACHE_RETENTIONS.has(out.prompt_cache_retention)) return undefined;
  if (stop !== undefined && stop !== null && typeof stop !== 'string') {
    if (!Array.isArray(stop) || stop.length > 4 || !stop.every((s) => typeof s === 'string')) return undefined;
    out.stop = [...(stop)];
  }
  return out as ChatCompletionRequest;
}
