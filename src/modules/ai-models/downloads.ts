/**
 * The images and files a call's prompt names by URL, fetched by Keel for a provider not given them
 * by URL (openai-compatible ones, Google models that take no outside URLs). A request of a few KB
 * can name hundreds of URLs: unbounded, one call fetched them all at once and again for every
 * retry and fallback (measured: 60 images of 4 MB, a retry, 480 MB fetched and ~3 GB of memory), a
 * way to exhaust a node's memory and to make it hammer any public host. So a call fetches:
 * - at most `maxFiles` distinct URLs (MODEL_MAX_DOWNLOADS), refused before any is fetched;
 * - at most `maxTotalBytes` together (MODEL_MAX_DOWNLOAD_TOTAL_BYTES), each at most `maxBytes`
 *   (MODEL_MAX_DOWNLOAD_BYTES): one after another, each given what is left as its limit, so what
 *   a call holds never passes the budget;
 * - each URL once: its retries and fallbacks reuse what was fetched (a fetch a try's abort cut
 *   short is fetched again by the next try).
 */
import { createDownload, DownloadError, type Experimental_DownloadFunction as DownloadFunction } from 'ai';

export interface DownloadLimits {
  /** The most distinct URLs one call fetches. */
  maxFiles: number;
  /** The most fetched of one URL. */
  maxBytes: number;
  /** The most fetched by one call, all its URLs together. */
  maxTotalBytes: number;
}

export interface FetchedFile {
  data: Uint8Array;
  mediaType: string | undefined;
}

/** Fetches `url`, at most `maxBytes` of it: the SDK's download (its checks of the address, redirects included). */
export type FileFetcher = (url: URL, maxBytes: number, abortSignal: AbortSignal) => Promise<FetchedFile>;

const sdkFetcher: FileFetcher = (url, maxBytes, abortSignal) => createDownload({ maxBytes })({ url, abortSignal });

/** A URL's fetch, with what ends the try that began it. */
interface Download {
  fetching: Promise<FetchedFile>;
  stop: AbortSignal;
  fetched: boolean;
}

/** One call's downloads (see the module's comment); `forTry` gives each try its download function. */
export class CallDownloads {
  /** `files`, made by its first use: most calls download nothing (every call on the OpenAI wire), and an empty Map is ~200 bytes a call. */
  private byUrl: Map<string, Download> | undefined;
  /** Bytes of the files fetched so far. */
  private spent = 0;
  /** The last fetch queued: fetches run one after another. */
  private queue: Promise<unknown> = Promise.resolve();

  constructor(
    private readonly limits: DownloadLimits,
    private readonly fetchFile: FileFetcher = sdkFetcher,
  ) {}

  /** By URL: fetched, or being fetched (removed again when the fetch fails), with what ends the try that began it. */
  private get files(): Map<string, Download> {
    return (this.byUrl ??= new Map());
  }

  /** The download function (the SDK's `experimental_download`) of a try that `signal` aborts. */
  forTry(signal: AbortSignal): DownloadFunction {
    return async (requested) => {
      const wanted = requested.filter((file) => !file.isUrlSupportedByModel).map((file) => file.url);
      // The SDK asks on every call, most with nothing to fetch: no map, controller or listener for those.
      if (!wanted.length) return requested.map(() => null);
      const names = new Set([...this.files.keys(), ...wanted.map((url) => url.href)]);
      if (names.size > this.limits.maxFiles) {
        throw new DownloadError({
          url: wanted[0]!.href,
          message: `The request names ${names.size} images or files by URL for Keel to fetch for this model; at most ${this.limits.maxFiles} (MODEL_MAX_DOWNLOADS)`,
        });
      }
      // A fetch that fails ends the try: those queued after it are not begun.
      const stop = new AbortController();
      const onAbort = () => stop.abort(signal.reason);
      if (signal.aborted) onAbort();
      else signal.addEventListener('abort', onAbort, { once: true });
      try {
        const fetched = await Promise.all(wanted.map((url) => this.fetch(url, stop)));
        let next = 0;
        return requested.map((file) => (file.isUrlSupportedByModel ? null : fetched[next++]!));
      } finally {
        signal.removeEventListener('abort', onAbort);
      }
    };
  }

  /** `url` fetched for a try that `stop` ends: a failure ends it, before the next fetch queued begins. */
  private fetch(url: URL, stop: AbortController): Promise<FetchedFile> {
    const known = this.files.get(url.href);
    // A fetch still running for a try that has ended is not taken: its abort may not have reached
    // it yet (a fallback begins at once), and the new try would fail with the old one's reason.
    if (known && (known.fetched || !known.stop.aborted)) return known.fetching;
    const fetching = this.queue.then(() => {
      stop.signal.throwIfAborted();
      return this.fetchWithin(url, stop.signal);
    });
    const entry = { fetching, stop: stop.signal, fetched: false };
    void fetching.then(
      () => (entry.fetched = true),
      () => undefined,
    );
    this.files.set(url.href, entry);
    this.queue = fetching.catch((error: unknown) => {
      // Fetched again by a later try (a retry after a timeout); those after it in this try's queue are not begun.
      if (this.files.get(url.href) === entry) this.files.delete(url.href);
      stop.abort(error);
    });
    return fetching;
  }

  private async fetchWithin(url: URL, signal: AbortSignal): Promise<FetchedFile> {
    const left = this.limits.maxTotalBytes - this.spent;
    const limit = Math.min(this.limits.maxBytes, left);
    const overBudget = () =>
      new DownloadError({ url: url.href, message: `The images and files this request names by URL pass ${this.limits.maxTotalBytes} bytes together (MODEL_MAX_DOWNLOAD_TOTAL_BYTES) at ${url.href}` });
    if (limit <= 0) throw overBudget();
    try {
      const file = await this.fetchFile(url, limit, signal);
      this.spent += file.data.byteLength;
      return file;
    } catch (error) {
      // Cut at what was left of the call's budget, not at the file's own limit: the budget is what it passed.
      if (limit < this.limits.maxBytes && DownloadError.isInstance(error) && /exceeded maximum size/.test(error.message)) throw overBudget();
      throw error;
    }
  }
}
