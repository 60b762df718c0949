/** Typed errors of the model call path; HttpErrors, so routes map them without extra code. */
import { HttpError } from '../../core/errors.js';

export class ModelNotFoundError extends HttpError {
  constructor(readonly model: string) {
    super(404, `Model ${model} not found`);
  }
}

/** The model exists but cannot do what was asked (e.g. embeddings from a chat model). */
export class ModelCapabilityError extends HttpError {
  constructor(model: string, capability: string) {
    super(400, `Model ${model} does not support ${capability}`);
  }
}

/** The model's answer is not what the call asked for: the provider's fault, in words the client can act on. */
export class ModelAnswerError extends HttpError {
  constructor(message: string) {
    super(502, message);
  }
}

/** The answer broke the call's tool choice (a tool call under `none`, none under `required`, no call of the named tool). */
export class ModelToolChoiceError extends ModelAnswerError {}

/** Upstream refusals that are the request's fault (too long, a bad tool schema): their words help the client fix it. */
export const CLIENT_FAULT_UPSTREAM: ReadonlySet<number> = new Set([400, 413, 422]);

/** What the client is told of an upstream failure: the provider's own words only when the request was at fault. */
function upstreamDetail(diagnosis: string, status: number | undefined): string {
  if (status === undefined) return 'The model provider could not be reached';
  if (CLIENT_FAULT_UPSTREAM.has(status)) return diagnosis;
  // A success status whose body was no answer (not JSON, not a completion).
  if (status < 300) return 'The model provider sent an answer that could not be read';
  return `The model provider refused the request (status ${status})`;
}

/**
 * The provider answered with an error, or could not be reached, after every retry and fallback.
 * `message` is the diagnosis (the provider's own message, its address, a connection error): for the
 * log and the usage record only, since it may name hosts or fragments of the provider's key;
 * `detail`, what every client sees, is generic unless the request itself was at fault (400, 413, 422).
 */
export class UpstreamError extends HttpError {
  constructor(
    diagnosis: string,
    readonly upstreamStatus?: number,
    /** How long the provider asked to be left alone (its retry-after), when it said. */
    readonly retryAfterMs?: number,
    /** The provider's error `code` and `param` (OpenAI's error object), for a refusal that was the request's fault. */
    readonly upstreamError?: { code: string | null; param: string | null },
    /** Not tried again for its `retryAfterMs`, longer than the call waits: the caller's to wait (`interactive`). */
    readonly waitPassedOn = false,
  ) {
    super(502, upstreamDetail(diagnosis, upstreamStatus));
    this.message = diagnosis;
  }

  /** The same error in other words (its provider's credentials taken out of what the provider said). */
  reworded(diagnosis: string): UpstreamError {
    return new UpstreamError(diagnosis, this.upstreamStatus, this.retryAfterMs, this.upstreamError, this.waitPassedOn);
  }

  /** The same error, its wait left to the caller. */
  passedOn(): UpstreamError {
    return new UpstreamError(this.message, this.upstreamStatus, this.retryAfterMs, this.upstreamError, true);
  }
}

/**
 * A request option the model's provider cannot take, refused before anything is sent: answered
 * without it, the caller would not know it went unheard (OpenAI's `logprobs` for an Anthropic
 * model). `option` is the option's name in OpenAI's API (`logprobs`, `logit_bias`).
 */
export class ModelOptionError extends HttpError {
  constructor(
    readonly model: string,
    readonly option: string,
    readonly reason: string,
  ) {
    super(400, `${option} is not supported by model ${model}: ${reason}`);
  }

  /** The same refusal said of `model`, for `reason` (a fallback's refusal as the model the client asked for's). */
  asRefusalOf(model: string, reason: string): ModelOptionError {
    return new ModelOptionError(model, this.option, reason);
  }
}

/**
 * A value of the request the model's provider cannot take, which OpenAI takes, refused before
 * anything is sent (400): for Anthropic and Google a conversation without a user or assistant
 * message that says anything (only system messages, or only empty ones); for Google a system
 * message past the start, or a function name that does not start with a letter or `_`. `param` is
 * the request's, by its name in OpenAI's API (`messages`, `messages[3]`, `tools`).
 */
export class ModelValueError extends HttpError {
  constructor(
    readonly model: string,
    readonly param: string,
    readonly reason: string,
  ) {
    super(400, `${param} cannot be sent to model ${model}: ${reason}`);
  }

  /** The same refusal said of `model`, for `reason` (see ModelOptionError.asRefusalOf). */
  asRefusalOf(model: string, reason: string): ModelValueError {
    return new ModelValueError(model, this.param, reason);
  }
}

/** A call setting or provider option the SDK refuses for the provider (400, in the SDK's words). */
export class ModelArgumentError extends HttpError {
  constructor(detail: string) {
    super(400, detail);
  }
}

/**
 * An image or file the prompt names by URL that could not be downloaded for the provider: not
 * there, too large (MODEL_MAX_DOWNLOAD_BYTES), or at an address the SDK refuses (a private or local
 * one, another scheme). The request's fault: 400, in words that say which and why.
 */
export class ModelDownloadError extends HttpError {
  constructor(detail: string) {
    super(400, detail);
  }
}

/** 504: the model did not answer within the call's time (MODEL_TIMEOUT_MS, or the call's own), after every retry and fallback. */
export class ModelTimeoutError extends HttpError {
  constructor(readonly timeoutMs: number) {
    super(504, `The model did not answer within ${timeoutMs} ms`);
  }
}

/**
 * An answer cut off by one of its limits (its upstream request closed, the call not retried): a
 * stream past its total time (504), an answer past its size (502).
 */
export class ModelAnswerLimitError extends HttpError {
  constructor(
    status: 502 | 504,
    detail: string,
    /** The provider answered (a 2xx) before the limit cut it off: it billed the call (see `run`). */
    readonly answered = false,
  ) {
    super(status, detail);
  }
}

/** The caller's AbortSignal fired (client disconnect, cancelled run). */
export class ModelCallAbortedError extends HttpError {
  constructor() {
    super(499, 'The model call was aborted');
  }
}

/**
 * A stream's `{"error": {...}}` event as the wire reads it: the provider's error object, which the
 * SDK hands on as it is (a plain object); the model manager reads both as the provider's failure.
 */
export class StreamErrorEvent extends Error {
  constructor(readonly event: unknown) {
    const message = typeof event === 'string' ? event : (event as { message?: unknown } | null | undefined)?.message;
    super(typeof message === 'string' ? message : 'An error event without a message');
  }
}
