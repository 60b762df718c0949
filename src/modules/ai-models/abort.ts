/**
 * What a caller aborts a model call with. An AbortSignal is one; `CallerAbort` is a lighter one for
 * the per-request path (the gateway's client going away): the manager only reads `aborted` and
 * `reason` and adds and removes one listener, which on an AbortSignal (an EventTarget, behind an
 * AbortController) costs several microseconds per call on Node 20 for an abort that almost never
 * happens. Where a real AbortSignal is needed (undici's streams, the AI SDK) the attempt makes its
 * own (model-manager.ts `Attempt`).
 */
export interface CallerSignal {
  readonly aborted: boolean;
  readonly reason: unknown;
  addEventListener(type: 'abort', listener: () => void, options?: { once?: boolean }): void;
  removeEventListener(type: 'abort', listener: () => void): void;
}

/** A `CallerSignal` and its trigger in one object: listeners are called once, on the first `abort()`. */
export class CallerAbort implements CallerSignal {
  aborted = false;
  reason: unknown = undefined;
  private listeners: (() => void)[] | undefined;

  addEventListener(_type: 'abort', listener: () => void): void {
    if (this.aborted) return; // as an aborted AbortSignal: 'abort' has fired already
    (this.listeners ??= []).push(listener);
  }

  removeEventListener(_type: 'abort', listener: () => void): void {
    const index = this.listeners?.indexOf(listener) ?? -1;
    if (index >= 0) this.listeners!.splice(index, 1);
  }

  /** Without a reason, AbortController's: a DOMException named AbortError. */
  abort(reason?: unknown): void {
    if (this.aborted) return;
    this.aborted = true;
    this.reason = reason ?? new DOMException('This operation was aborted', 'AbortError');
    const listeners = this.listeners;
    this.listeners = undefined;
    if (listeners) for (const listener of listeners) listener();
  }
}
