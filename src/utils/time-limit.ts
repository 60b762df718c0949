/** How work ended: done, or why not (its rejection, or a TimedOutError). */
export type Outcome = { ok: true } | { ok: false; error: unknown };

/** Work still running when the caller stopped waiting for it. */
export class TimedOutError extends Error {
  constructor(ms: number) {
    super(`no answer within ${ms} ms`);
    this.name = 'TimedOutError';
  }
}

/**
 * How `work` ended within `ms`: its rejection, or a TimedOutError when it is still running then (it
 * is not cancelled: it goes on, unwatched).
 */
export async function settledWithin(ms: number, work: Promise<unknown>): Promise<Outcome> {
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<Outcome>((resolve) => {
    timer = setTimeout(() => resolve({ ok: false, error: new TimedOutError(ms) }), ms);
  });
  try {
    return await Promise.race([work.then((): Outcome => ({ ok: true }), (error: unknown): Outcome => ({ ok: false, error })), late]);
  } finally {
    clearTimeout(timer);
  }
}

/** Whether `work` fulfils within `ms` (settledWithin, when why not does not matter). */
export async function fulfilledWithin(ms: number, work: Promise<unknown>): Promise<boolean> {
  return (await settledWithin(ms, work)).ok;
}

/**
 * `work`'s outcome, or a rejection with the signal's reason as soon as it aborts: work that does
 * not stop on the signal (or not at once) no longer holds up what aborted it; its late outcome is
 * dropped.
 */
export function untilAborted<T>(work: Promise<T>, signal: AbortSignal): Promise<T> {
  return new Promise<T>((resolve, reject) => {
    const onAbort = () => reject(signal.reason instanceof Error ? signal.reason : new Error('aborted'));
    if (signal.aborted) onAbort();
    else signal.addEventListener('abort', onAbort, { once: true });
    work.then(resolve, reject).finally(() => signal.removeEventListener('abort', onAbort));
  });
}

/**
 * `work()`'s outcome, with `onAbort` called should `signal` abort while it runs (at once if it has
 * already); the listener is removed once the work settles, however it ends, so a signal that
 * outlives many such works (the app's closing signal) holds none of them.
 */
export async function abortingWith<T>(signal: AbortSignal, onAbort: () => void, work: () => Promise<T>): Promise<T> {
  if (signal.aborted) onAbort();
  else signal.addEventListener('abort', onAbort, { once: true });
  try {
    return await work();
  } finally {
    signal.removeEventListener('abort', onAbort);
  }
}
