/**
 * Review (knowledge base): Markdown is extracted on the main thread (extract.ts: markdownSpans, no
 * worker, no time limit), and headingTitle's link pattern (markdown.ts:11) is quadratic in a
 * heading's length: a heading of 100,000 "[" (a 100 KB upload) holds the event loop for ~9 s on
 * this machine, 1 MB for ~15 minutes, and every other request waits.
 */
import { monitorEventLoopDelay } from 'node:perf_hooks';

import { beforeAll, describe, expect, it } from 'vitest';

import { useTestApp } from '../helpers/app.js';
import { createUser, type TestUser } from '../helpers/factories.js';
import { createFolder, settled, uploaded } from '../helpers/knowledge.js';

const ctx = useTestApp();
let alice: TestUser;
beforeAll(async () => {
  alice = await createUser(ctx.app);
});

describe('review: a Markdown heading built to be slow', () => {
  it('does not hold the event loop for seconds while the document is read', async () => {
    const folder = await createFolder(ctx.app, alice.headers);
    const histogram = monitorEventLoopDelay({ resolution: 10 });
    histogram.enable();
    const entry = await uploaded(ctx.app, alice.headers, folder.id, { filename: 'brackets.md', type: 'text/markdown', content: `# ${'['.repeat(60_000)}\n\nbody\n` });
    await settled(ctx.app, alice.headers, entry.id, 60_000);
    histogram.disable();
    // The longest single block of the event loop, in ms.
    expect(histogram.max / 1e6).toBeLessThan(1_000);
  }, 90_000);
});
