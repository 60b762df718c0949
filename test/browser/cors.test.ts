import type { FastifyInstance } from 'fastify';
import { afterAll, beforeAll, expect, it } from 'vitest';

import { buildTestApp, openTestDatabase } from '../helpers/app.js';
import { type Browser, describeWithChromium, launchChromium, listen, type PageServer, servePage } from '../helpers/browser.js';
import { createUser, type TestUser } from '../helpers/factories.js';

interface Outcome {
  step: string;
  status: number | 'failed';
  requestId?: string | null;
}

/**
 * What a single-page app on another origin does: create, rename and delete a project with a
 * bearer token, reading the exposed `x-request-id`. Runs in the page; a refused request is a
 * rejected fetch ("failed").
 */
async function editProjects({ api, token }: { api: string; token: string }): Promise<Outcome[]> {
  const outcomes: Outcome[] = [];
  const headers = { authorization: `Bearer ${token}`, 'x-request-id': 'from-the-browser' };
  const call = async (step: string, method: string, path: string, body?: unknown) => {
    try {
      const json = body === undefined ? {} : { body: JSON.stringify(body), headers: { ...headers, 'content-type': 'application/json' } };
      const response = await fetch(api + path, { method, headers, ...json });
      outcomes.push({ step, status: response.status, requestId: response.headers.get('x-request-id') });
      return response.ok ? ((await response.json()) as { id: string }) : null;
    } catch {
      outcomes.push({ step, status: 'failed' });
      return null;
    }
  };
  const created = await call('create', 'POST', '/api/v1/projects', { name: 'from the browser' });
  const id = created?.id ?? '00000000-0000-4000-8000-000000000000';
  await call('rename', 'PATCH', `/api/v1/projects/${id}`, { name: 'renamed in the browser' });
  await call('delete', 'DELETE', `/api/v1/projects/${id}`);
  return outcomes;
}

describeWithChromium('CORS from a browser page on another origin', () => {
  let browser: Browser;
  let app: FastifyInstance;
  let destroy: () => Promise<void>;
  let api: string;
  let allowed: PageServer;
  let refused: PageServer;
  let alice: TestUser;

  beforeAll(async () => {
    const page = '<!doctype html><title>a single-page app</title><p>app</p>';
    allowed = await servePage(page);
    refused = await servePage(page);
    const opened = await openTestDatabase();
    destroy = opened.destroy;
    app = await buildTestApp(opened.database, { BACKEND_CORS_ORIGINS: allowed.origin });
    api = await listen(app);
    alice = await createUser(app);
    browser = await launchChromium();
  });
  afterAll(async () => {
    await browser?.close();
    await app?.close();
    await destroy?.();
    await allowed?.close();
    await refused?.close();
  });

  const runFrom = async (origin: string) => {
    const page = await browser.context.newPage();
    await page.goto(`${origin}/`);
    const outcomes = await page.evaluate(editProjects, { api, token: alice.token });
    await page.close();
    return outcomes;
  };

  it('an allowed origin creates, renames (PATCH) and deletes (DELETE), and reads x-request-id', async () => {
    const outcomes = await runFrom(allowed.origin);
    expect(outcomes).toEqual([
      { step: 'create', status: 200, requestId: 'from-the-browser' },
      { step: 'rename', status: 200, requestId: 'from-the-browser' },
      { step: 'delete', status: 200, requestId: 'from-the-browser' },
    ]);
  });

  it('a refused origin gets nothing through: every fetch fails and nothing is created', async () => {
    const before = (await app.inject({ method: 'GET', url: '/api/v1/projects', headers: alice.headers })).json<{ count: number }>().count;
    const outcomes = await runFrom(refused.origin);
    expect(outcomes).toEqual([
      { step: 'create', status: 'failed' },
      { step: 'rename', status: 'failed' },
      { step: 'delete', status: 'failed' },
    ]);
    const after = (await app.inject({ method: 'GET', url: '/api/v1/projects', headers: alice.headers })).json<{ count: number }>().count;
    expect(after).toBe(before);
  });
});
