import { DownloadError } from 'ai';
import { describe, expect, it } from 'vitest';

import { CallDownloads, type FetchedFile, type FileFetcher } from '../../src/modules/ai-models/downloads.js';

/**
 * The network is the edge here: a fetcher serving files of `sizes` bytes by URL, refusing past its
 * `maxBytes` as the SDK's download does, and counting what it was asked (and how many at once).
 */
function servedFiles(sizes: Record<string, number>, hangOn?: string) {
  const asked: { url: string; maxBytes: number }[] = [];
  let open = 0;
  let mostOpen = 0;
  const fetcher: FileFetcher = async (url, maxBytes, signal) => {
    asked.push({ url: url.href, maxBytes });
    open += 1;
    mostOpen = Math.max(mostOpen, open);
    try {
      await new Promise<void>((resolve, reject) => {
        if (url.href === hangOn) signal.addEventListener('abort', () => reject(signal.reason as Error), { once: true });
        else setTimeout(resolve, 5);
      });
      const size = sizes[url.href] ?? 0;
      if (size > maxBytes) throw new DownloadError({ url: url.href, message: `Download of ${url.href} exceeded maximum size of ${maxBytes} bytes.` });
      return { data: new Uint8Array(size), mediaType: 'image/png' } satisfies FetchedFile;
    } finally {
      open -= 1;
    }
  };
  return { fetcher, asked, mostOpen: () => mostOpen };
}

const url = (name: string) => new URL(`https://images.example/${name}.png`);
const wanted = (...names: string[]) => names.map((name) => ({ url: url(name), isUrlSupportedByModel: false }));
const limits = { maxFiles: 3, maxBytes: 100, maxTotalBytes: 150 };

describe('CallDownloads', () => {
  it('refuses a prompt naming more URLs than a call may fetch, before fetching any', async () => {
    const served = servedFiles({});
    const downloads = new CallDownloads(limits, served.fetcher);
    await expect(downloads.forTry(new AbortController().signal)(wanted('a', 'b', 'c', 'd'))).rejects.toThrow(/names 4 images or files by URL .* at most 3 \(MODEL_MAX_DOWNLOADS\)/);
    expect(served.asked).toEqual([]);
  });

  it('fetches one at a time, each within what is left of the call\'s total, and refuses the file that passes it', async () => {
    const served = servedFiles({ [url('a').href]: 60, [url('b').href]: 60, [url('c').href]: 60 });
    const downloads = new CallDownloads(limits, served.fetcher);
    await expect(downloads.forTry(new AbortController().signal)(wanted('a', 'b', 'c'))).rejects.toThrow(/pass 150 bytes together \(MODEL_MAX_DOWNLOAD_TOTAL_BYTES\) at https:\/\/images\.example\/c\.png/);
    expect(served.asked.map(({ maxBytes }) => maxBytes)).toEqual([100, 90, 30]);
    expect(served.mostOpen()).toBe(1);
  });

  it("fetches each URL once for all the call's tries, keeps what the model is given by URL out, and fetches again what a try's abort cut short", async () => {
    const served = servedFiles({ [url('a').href]: 10, [url('b').href]: 10 }, url('slow').href);
    const downloads = new CallDownloads(limits, served.fetcher);
    const first = new AbortController();
    const trying = downloads.forTry(first.signal)(wanted('a', 'b', 'slow'));
    await new Promise((resolve) => setTimeout(resolve, 50));
    first.abort(new Error('the try timed out'));
    await expect(trying).rejects.toThrow(/timed out/);
    // The next try (a retry, or a fallback that takes one URL itself): a and b as fetched, slow again.
    const second = downloads.forTry(new AbortController().signal)([...wanted('a'), { url: url('b'), isUrlSupportedByModel: true }]);
    const got = await second;
    expect(got.map((file) => file && file.data.byteLength)).toEqual([10, null]);
    expect(served.asked.map(({ url: asked }) => asked)).toEqual([url('a').href, url('b').href, url('slow').href]);
    const third = new AbortController();
    const again = downloads.forTry(third.signal)(wanted('slow'));
    await new Promise((resolve) => setTimeout(resolve, 20));
    third.abort(new Error('cancelled'));
    await expect(again).rejects.toThrow(/cancelled/);
    expect(served.asked.filter(({ url: asked }) => asked === url('slow').href)).toHaveLength(2);
  });

  it('does not hand a try a fetch that an ended try began and its abort has not reached yet', async () => {
    const served = servedFiles({}, url('slow').href);
    const downloads = new CallDownloads(limits, served.fetcher);
    const first = new AbortController();
    const trying = downloads.forTry(first.signal)(wanted('slow'));
    await new Promise((resolve) => setTimeout(resolve, 20));
    // The try times out, and a fallback asks for the same file at once, before the fetch has failed.
    first.abort(new Error('the try timed out'));
    const next = new AbortController();
    const fallback = downloads.forTry(next.signal)(wanted('slow'));
    await expect(trying).rejects.toThrow(/timed out/);
    await new Promise((resolve) => setTimeout(resolve, 20));
    next.abort(new Error('the fallback was cancelled'));
    await expect(fallback).rejects.toThrow(/fallback was cancelled/);
    expect(served.asked.map(({ url: asked }) => asked)).toEqual([url('slow').href, url('slow').href]);
  });

  it('begins none of the fetches queued after one that fails', async () => {
    const served = servedFiles({ [url('a').href]: 500, [url('b').href]: 10 });
    const downloads = new CallDownloads(limits, served.fetcher);
    await expect(downloads.forTry(new AbortController().signal)(wanted('a', 'b'))).rejects.toThrow(/exceeded maximum size of 100 bytes/);
    await new Promise((resolve) => setTimeout(resolve, 30));
    expect(served.asked.map(({ url: asked }) => asked)).toEqual([url('a').href]);
  });
});
