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

/** The provider answered with an error, or could not be reached, after every retry and fallback. */
export class UpstreamError extends HttpError {
  constructor(
    detail: string,
    readonly upstreamStatus?: number,
  ) {
    super(502, detail);
  }
}

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
  constructor(status: 502 | 504, detail: string) {
    super(status, detail);
  }
}

/** The caller's AbortSignal fired (client disconnect, cancelled run). */
export class ModelCallAbortedError extends HttpError {
  constructor() {
    super(499, 'The model call was aborted');
  }
}
