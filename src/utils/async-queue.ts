/**
 * A queue that a producer fills from callbacks and a consumer reads with `for await`: what an
 * async generator over a shared array and a wake-up promise does, without the generator. Each of
 * its steps is a promise chain and a resumption; here an item that is already queued is handed
 * over in one resolved promise. A streamed model call's parts pass through two such queues (the
 * wire's reader, the model manager's events), so this is on the hot path of every streamed call.
 *
 * Items come out in order; a failure is thrown once the items queued before it are taken. Stopping
 * the iteration early (`return()`: a `break`, an error in the loop) drops what is queued and calls
 * `onReturn` (the producer's cue to stop), once, and not after the producer has ended; `onDrained`
 * is called whenever the last queued item is taken (a paused producer's cue to go on).
 */
export class AsyncQueue<T> implements AsyncIterableIterator<T> {
  private items: T[] = [];
  private head = 0;
  private waiting: { resolve(result: IteratorResult<T>): void; reject(error: Error): void } | undefined;
  private failure: Error | undefined;
  private closed = false;
  /** The producer has been told to stop (`onReturn`). */
  private stopping = false;

  constructor(private readonly hooks: { onReturn?(): void; onDrained?(): void } = {}) {}

  /** Items queued and not taken yet. */
  get size(): number {
    return this.items.length - this.head;
  }

  /** No item will be added any more: ended, failed or stopped by its reader. */
  get ended(): boolean {
    return this.closed;
  }

  push(item: T): void {
    if (this.closed) return;
    this.items.push(item);
    this.wake();
  }

  /** The last item is queued: the iteration ends once they are taken. */
  end(): void {
    if (this.closed) return;
    this.closed = true;
    this.wake();
  }

  /** Ends the iteration with `error`, after the items queued so far (or none, with `discard`). */
  fail(error: Error, discard = false): void {
    if (this.closed) return;
    if (discard) this.items.length = this.head = 0;
    this.closed = true;
    this.failure = error;
    this.wake();
  }

  [Symbol.asyncIterator](): this {
    return this;
  }

  next(): Promise<IteratorResult<T>> {
    if (this.head < this.items.length) return Promise.resolve({ value: this.take(), done: false });
    if (this.failure) return Promise.reject(this.failure);
    if (this.closed) return Promise.resolve({ value: undefined, done: true });
    // One reader: a second waiting `next()` would take the first one's place, which then never settled.
    if (this.waiting) return Promise.reject(new Error('AsyncQueue: next() called while another next() waits'));
    return new Promise((resolve, reject) => (this.waiting = { resolve, reject }));
  }

  return(): Promise<IteratorResult<T>> {
    if (this.closed) return Promise.resolve({ value: undefined, done: true });
    if (this.waiting) {
      // Stopped from outside while a `next()` waits: as an async generator's return waits behind a
      // running step, the producer is told to stop and that `next()` gets what it ends with (the
      // failure it reports, say, which its reader may want to log).
      if (!this.stopping) {
        this.stopping = true;
        this.hooks.onReturn?.();
      }
      return Promise.resolve({ value: undefined, done: true });
    }
    this.closed = true;
    this.items.length = this.head = 0;
    if (!this.stopping) this.hooks.onReturn?.();
    return Promise.resolve({ value: undefined, done: true });
  }

  private take(): T {
    const item = this.items[this.head]!;
    // Not held once taken: a long answer read slowly would otherwise stay whole until the queue drains.
    this.items[this.head++] = undefined as T;
    if (this.head === this.items.length) {
      this.items.length = this.head = 0;
      this.hooks.onDrained?.();
    }
    return item;
  }

  private wake(): void {
    const waiting = this.waiting;
    if (!waiting || (this.head === this.items.length && !this.closed)) return;
    // Cleared first: taking an item may let the producer go on, and it may push at once.
    this.waiting = undefined;
    if (this.head < this.items.length) waiting.resolve({ value: this.take(), done: false });
    else if (this.failure) waiting.reject(this.failure);
    else waiting.resolve({ value: undefined, done: true });
  }
}
