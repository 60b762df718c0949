/**
 * Whether `work` fulfils within `ms`: false when it rejects or is still running then (it is not
 * cancelled: it goes on, unwatched).
 */
export async function fulfilledWithin(ms: number, work: Promise<unknown>): Promise<boolean> {
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<false>((resolve) => {
    timer = setTimeout(() => resolve(false), ms);
  });
  try {
    return await Promise.race([work.then(() => true), late]);
  } catch {
    return false;
  } finally {
    clearTimeout(timer);
  }
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
