/**
 * The `fetch` the AI SDK's providers are given (providers.ts): it bounds what Keel reads of an
 * answer, as the wire client does (openai-wire.ts). The SDK itself reads a non-streamed body whole,
 * up to a fixed 2 GiB (provider-utils' `readResponseWithSizeLimit`), so an upstream that sends
 * gigabytes — any `openai-compatible` base URL is one a superuser typed in — would otherwise be
 * buffered. Past the limit the body errors with ModelAnswerLimitError (502, naming the limit) and
 * its reading stops, which cancels the response and so closes the upstream connection; the
 * manager finds the error inside the SDK's wrapping (see `classify`) and answers it as on the wire.
 */
import { ModelAnswerLimitError } from './errors.js';

/** `answered`: the body was a 2xx answer's (billed by the provider), not an error's. */
export const answerTooLong = (maxBytes: number, answered = true): ModelAnswerLimitError => new ModelAnswerLimitError(502, `The model's answer exceeded ${maxBytes} bytes`, answered);

/**
 * What the manager expects of an answer, told to this fetch in a request header that it takes off
 * before the request leaves (the SDK passes a call's `headers` through to `fetch`): `stream` for
 * its two stream paths, else the most a non-streamed answer may take when the call asked for more
 * than MODEL_MAX_RESPONSE_BYTES (embeddings' vectors, log probabilities). Told rather than guessed
 * from the request: a body parsed to find `"stream": true` cost a parse of every streamed call's
 * prompt (up to GATEWAY_BODY_LIMIT_BYTES of images), and each provider names its methods its own way.
 */
const ANSWER_HEADER = 'x-keel-answer';
export const STREAM_ANSWER = { [ANSWER_HEADER]: 'stream' } as const;
export const answerOfAtMost = (bytes: number): Record<string, string> => ({ [ANSWER_HEADER]: String(bytes) });

/**
 * What one vector of an embeddings answer may take beyond MODEL_MAX_RESPONSE_BYTES: the vectors
 * come as JSON numbers (~20 bytes a dimension), so a batch the client may legitimately ask for
 * (OpenAI takes 2,048 inputs; 3,072 dimensions are usual) answers with far more than one chat
 * answer's limit. 128 KiB holds 4,096 dimensions at 32 bytes each; the answer stays bounded by what
 * the request asked for (each request of a call sent in several, by its own count).
 */
const EMBEDDING_ANSWER_BYTES = 128 * 1024;

/** The most an embeddings answer of `vectors` vectors may take (the wire's and the SDK's). */
export const embeddingsAnswerLimit = (maxBytes: number, vectors: number): number => Math.max(maxBytes, vectors * EMBEDDING_ANSWER_BYTES);

/**
 * What one log probability entry of a chat answer may take: OpenAI writes each token of the answer
 * as `{"token", "logprob", "bytes": [...], "top_logprobs": [...]}` and each of its `top_logprobs`
 * alternatives the same way without the list, some 60 to 90 bytes for a usual token (the bytes
 * list is 2 to 4 characters a byte). With `top_logprobs: 20` that is ~1.5 KB a token, so a
 * legitimate answer of ~10,000 tokens passes 16 MiB: the limit of an answer that carries them
 * grows with what the call asked for. 160 bytes leaves room for long tokens (runs of spaces,
 * escaped bytes) and stays a bound a broken or hostile upstream cannot pass.
 */
const LOGPROB_ENTRY_BYTES = 160;

/**
 * The most an answer's log probabilities may take, in MODEL_MAX_RESPONSE_BYTES: `max_tokens` is the
 * client's (up to 10,000,000) and a model's own limit is not always known, so without a ceiling any
 * key holder could lift the bound on a body read whole by gigabytes. 8 holds top_logprobs 20 for
 * ~40,000 tokens at 160 bytes an entry (some 80,000 at the ~1.5 KB a token OpenAI writes).
 */
const LOGPROBS_CEILING = 8;

/**
 * What an answer's log probabilities may take beyond MODEL_MAX_RESPONSE_BYTES (`maxBytes`): one
 * entry a token of its output (`outputTokens`: the maximum it was sent with, or the model's own
 * when smaller) and one for each alternative asked for, at most LOGPROBS_CEILING times `maxBytes`;
 * nothing when the call asked for none.
 */
export function logprobsAllowance(logprobs: boolean | undefined, topLogprobs: number | undefined, outputTokens: number, maxBytes: number): number {
  return logprobs ? Math.min(outputTokens * (1 + (topLogprobs ?? 0)) * LOGPROB_ENTRY_BYTES, LOGPROBS_CEILING * maxBytes) : 0;
}

/**
 * What a list of log probability entries weighs against logprobsAllowance in a stream: its length as
 * JSON, as the SDK's paths have it and the entries go on to the caller. Not the event that carried
 * it, whose id, model, text and framing take more than a usual token's entry (each event is capped
 * on its own): counted whole, a legitimate answer with few alternatives was cut off halfway.
 */
export const logprobsWeight = (entries: unknown[] | null | undefined): number => (entries ? JSON.stringify(entries).length : 0);

/** A stream's log probabilities past their allowance (`chars`), on the wire and the SDK's paths alike. */
export const logprobsTooLong = (chars: number): ModelAnswerLimitError => new ModelAnswerLimitError(502, `The log probabilities of the model's answer exceeded ${chars} characters`, true);

/** The request without the manager's header, and what that header said (provider-utils sends headers as a record, lower-cased). */
function takeExpectation(init: RequestInit | undefined): { init: RequestInit | undefined; expected: string | undefined } {
  const headers = init?.headers;
  if (headers instanceof Headers) {
    const expected = headers.get(ANSWER_HEADER) ?? undefined;
    if (expected === undefined) return { init, expected };
    const rest = new Headers(headers);
    rest.delete(ANSWER_HEADER);
    return { init: { ...init, headers: rest }, expected };
  }
  if (!headers || Array.isArray(headers) || !(ANSWER_HEADER in headers)) return { init, expected: undefined };
  const { [ANSWER_HEADER]: expected, ...rest } = headers as Record<string, string>;
  return { init: { ...init, headers: rest }, expected };
}

/**
 * A non-streamed body: it is read whole (the SDK's JSON handlers), so its total is what is held —
 * counted as decoded (fetch undoes gzip), so a small compressed body that inflates counts in full.
 */
function totalLimit(maxBytes: number, answered: boolean): TransformStream<Uint8Array, Uint8Array> {
  let size = 0;
  return new TransformStream({
    transform(chunk, controller) {
      if ((size += chunk.byteLength) > maxBytes) throw answerTooLong(maxBytes, answered);
      controller.enqueue(chunk);
    },
  });
}

const LF = 0x0a;
const CR = 0x0d;

/**
 * A streamed body (server-sent events). Its total is not capped here: the JSON framing of each
 * chunk is several times the text it carries, so a byte total would cut a long answer far below the
 * limit's meaning, and a stream is long-lived by design — its text, reasoning and tool calls are
 * counted against the limit by the manager as they arrive, and its time by MODEL_STREAM_TIMEOUT_MS.
 * What that count cannot see is an event the SDK's SSE parser is still assembling (no text reaches
 * the manager until it ends): an event that does not end would grow without bound. So each event
 * (up to its empty line) may take at most `maxBytes`, as one event of the wire may.
 */
function eventLimit(maxBytes: number): TransformStream<Uint8Array, Uint8Array> {
  /** Bytes since the last event ended: what the parser holds. */
  let pending = 0;
  let atLineStart = true;
  let afterCR = false;
  return new TransformStream({
    transform(chunk, controller) {
      // Line ends as SSE has them (CRLF, LF, CR); an empty line ends the event.
      for (let i = 0; i < chunk.length; i++) {
        const byte = chunk[i];
        if (byte === LF && afterCR) {
          afterCR = false; // CRLF: the line ended at its CR
          continue;
        }
        afterCR = byte === CR;
        if (byte === LF || byte === CR) {
          if (atLineStart) {
            pending = 0;
            continue;
          }
          atLineStart = true;
        } else {
          atLineStart = false;
        }
        pending += 1;
      }
      if (pending > maxBytes) throw answerTooLong(maxBytes);
      controller.enqueue(chunk);
    },
  });
}

/**
 * The signals of requests whose provider began a 2xx answer (see `answeredOn`): one entry per SDK
 * call's 2xx. The AbortSignal is the only per-try object this fetch is handed, and it is Node's,
 * with no spare slot: a mark set on it (a symbol-keyed property) grows its property store, measured
 * on Node 20 at ~45 bytes a signal against the entry's ~42, so the set stays.
 */
const ANSWERED = new WeakSet<AbortSignal>();

/** Whether the request sent with `signal` through a limitedFetch got a 2xx status: the provider bills it from then on. */
export const answeredOn = (signal: AbortSignal): boolean => ANSWERED.has(signal);

/**
 * `fetch` with the answer limit on the response's body. The request, its AbortSignal included,
 * goes to the global fetch untouched; an abort errors the body as before (the limit's stream
 * passes the error on).
 */
export function limitedFetch(maxBytes: number): typeof globalThis.fetch {
  return async (input, asked) => {
    const { init, expected } = takeExpectation(asked);
    const response = await fetch(input, init);
    if (response.ok && init?.signal) ANSWERED.add(init.signal);
    const { body } = response;
    if (!body) return response;
    // An error answer is read whole (the SDK's error handlers), whatever was asked.
    const stream = response.ok && expected === 'stream';
    const total = response.ok && !stream ? Math.max(maxBytes, Number(expected ?? 0) || 0) : maxBytes;
    if (!stream && Number(response.headers.get('content-length')) > total) {
      // Said up front: not a byte of it is read.
      await body.cancel().catch(() => {});
      throw answerTooLong(total, response.ok);
    }
    // Erroring the transform cancels `body` (pipeThrough), which closes the upstream connection.
    const limited = body.pipeThrough(stream ? eventLimit(maxBytes) : totalLimit(total, response.ok));
    return new Response(limited, { status: response.status, statusText: response.statusText, headers: response.headers });
  };
}
