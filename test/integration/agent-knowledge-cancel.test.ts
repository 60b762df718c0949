/**
 * A cancel (or the run's deadline) while the built-in knowledge_search waits for the query's
 * embedding aborts that upstream call and ends the run at once (SPEC §5: "the model call is aborted
 * at once"): the tool passes the run's signal to the search. It passed none, and the runner waited
 * for the tool until the provider call timed out.
 */
import { beforeAll, describe, expect, it } from 'vitest';

import { useTestApp } from '../helpers/app.js';
import { createUser } from '../helpers/factories.js';
import { apiOf, sleep } from '../helpers/http.js';
import { createFolder, ingested } from '../helpers/knowledge.js';
import { createAgent, createThread, readEvents, startRun, useRunServer } from '../helpers/runs.js';

const MODEL = 'fake-precise';
// Embeddings on (PGlite has pgvector); a provider call may take up to 15 s.
const ctx = useTestApp({ EMBEDDING_MODEL: 'fake-embed', MODEL_MAX_RETRIES: '0', MODEL_TIMEOUT_MS: '15000', RUN_LEASE_SECONDS: '30' });
const api = apiOf(ctx);
const server = useRunServer(ctx);

// PGlite has pgvector; the machine's PostgreSQL does not (search there is full text only: no query embedding).
describe.runIf(!process.env.DATABASE_URL)('cancel while knowledge_search embeds the query', () => {
  let user: Awaited<ReturnType<typeof createUser>>;
  let folderId: string;
  beforeAll(async () => {
    user = await createUser(ctx.app);
    const folder = await createFolder(ctx.app, user.headers, { name: 'Handbook' });
    folderId = folder.id;
    await ingested(ctx.app, user.headers, folder.id, { filename: 'handbook.md', content: '# Handbook\n\nInvoices are sent on the first working day of every month.', type: 'text/markdown' });
  });

  it('aborts the embedding call and ends the run at once', async () => {
    const { fake, base } = server;
    const agent = await createAgent(ctx.app, user.headers, { tools: ['knowledge_search'], knowledge: { folder_ids: [folderId] } });
    fake.script(MODEL, { toolCalls: [{ id: 'call_0', name: 'knowledge_search', arguments: JSON.stringify({ query: 'when are invoices sent' }) }] }, { text: 'done' });
    // The query's embedding never comes (until the 15 s timeout).
    fake.script('fake-embed', { hang: true });
    const thread = await createThread(ctx.app, user.headers);
    const run = await startRun(ctx.app, user.headers, thread.id, { agent_id: agent.id, input: 'question' });
    const reading = readEvents(base, user.headers, run.id, { timeoutMs: 30_000 });
    await fake.waitFor((log) => log.some((r) => r.path.includes('embeddings') && r.reply === 'hang'), 10_000);
    await sleep(100);
    const sent = Date.now();
    const cancelled = await api('POST', `/runs/${run.id}/cancel`, user.headers);
    expect(cancelled.statusCode).toBe(200);
    const { events } = await reading;
    const took = Date.now() - sent;
    const embedding = fake.log.find((r) => r.path.includes('embeddings') && r.reply === 'hang')!;
    expect(events.at(-1)!.event).toBe('run.cancelled');
    // At once: well within a second, not when the provider call times out.
    expect(took).toBeLessThan(2_000);
    expect(embedding.aborted).toBe(true);
  }, 60_000);
});
