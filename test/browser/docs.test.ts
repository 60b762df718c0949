import type { Page } from 'playwright-core';
import { afterAll, beforeAll, expect, it } from 'vitest';

import { useTestApp } from '../helpers/app.js';
import { type Browser, describeWithChromium, launchChromium, listen, type PageLog, screenshot, watch } from '../helpers/browser.js';
import { type OpenApiDocument, type OpenApiOperation, operationsOf } from '../helpers/routes.js';

type Operation = OpenApiOperation;

const ctx = useTestApp();

describeWithChromium('the /docs reference page in Chromium', () => {
  let browser: Browser;
  let base: string;
  let document: OpenApiDocument;
  let page: Page;
  let log: PageLog;

  beforeAll(async () => {
    // Opened by a name, over plain HTTP, as from another machine of the network: Chromium treats
    // 127.0.0.1 and localhost as secure, and so would not show what a CSP of the page does elsewhere
    // (`upgrade-insecure-requests` sent its script to https://, and the page stayed blank).
    const local = new URL(await listen(ctx.app));
    base = `http://keel-docs.test:${local.port}`;
    document = (await ctx.app.inject({ method: 'GET', url: '/api/v1/openapi.json' })).json<OpenApiDocument>();
    browser = await launchChromium(['--host-resolver-rules=MAP keel-docs.test 127.0.0.1']);
    page = await browser.context.newPage();
    log = watch(page);
    await page.goto(`${base}/docs`, { waitUntil: 'networkidle' });
  });
  afterAll(async () => {
    await browser?.close();
  });

  /** The page's section of one operation (Scalar's id: `<document>/tag/<tag>/<METHOD><path>`). */
  const section = (method: string, path: string, operation: Operation) =>
    page.locator(`section[id$="/tag/${operation.tags[0]}/${method.toUpperCase()}${path}"]`);

  /** Property names of an operation's 200 response, from the document's component. */
  const successFields = (operation: Operation): string[] => {
    const ref = (operation.responses['200']?.content?.['application/json']?.schema as { $ref?: string } | undefined)?.$ref;
    const name = ref?.replace('#/components/schemas/', '');
    return Object.keys((name && document.components.schemas[name]?.properties) ?? {});
  };

  it('opens "Get Project" and shows the fields of ProjectPublic in its 200 response', async () => {
    const operation = document.paths['/api/v1/projects/{project_id}']!.get!;
    const fields = successFields(operation);
    expect(fields).toEqual(expect.arrayContaining(['id', 'owner_id', 'name', 'description', 'created_at', 'updated_at']));

    await page.getByRole('button', { name: /projects/i }).first().click();
    await page.getByText('Get Project', { exact: true }).first().click();
    const get = section('get', '/api/v1/projects/{project_id}', operation);
    await get.getByRole('heading', { name: /Get Project/ }).waitFor();
    // Expand the 200 response: its schema lists the fields.
    await get.getByRole('button', { name: /^200/ }).first().click();
    const text = await get.innerText();
    for (const field of fields) expect(text, `field ${field}`).toContain(field);
    expect(text).not.toContain('No Body');
    await screenshot(page, 'docs-get-project.png');
  });

  it('renders every operation with its summary and the fields of its success response', async () => {
    const missing: string[] = [];
    for (const { path, method, operation } of operationsOf(document)) {
      await page.evaluate(`location.hash = ${JSON.stringify(`tag/${operation.tags[0]}/${method.toUpperCase()}${path}`)}`);
      const where = section(method, path, operation);
      await where.waitFor({ timeout: 10_000 }).catch(() => missing.push(`${operation.operationId}: no section`));
      if (!(await where.count())) continue;
      const text = await where.innerText();
      if (!text.includes(operation.summary)) missing.push(`${operation.operationId}: no summary`);
      for (const field of successFields(operation)) {
        if (!text.includes(field)) missing.push(`${operation.operationId}: no ${field}`);
      }
    }
    expect(missing).toEqual([]);
    // One section after the other, each rendered by the page: the walk grows with the API.
  }, 120_000);

  it('logs no console error and asks no other host than the server', () => {
    // Chromium's notice that it ignores Cross-Origin-Opener-Policy over plain HTTP (it applies over HTTPS) is the transport's, not the page's.
    const errors = log.consoleErrors.filter((error) => !error.startsWith('The Cross-Origin-Opener-Policy header has been ignored'));
    expect(errors, JSON.stringify(errors)).toEqual([]);
    expect(log.requests.length).toBeGreaterThan(2);
    const foreign = log.requests.filter((url) => !url.startsWith(`${base}/`) && !url.startsWith('data:'));
    expect(foreign).toEqual([]);
    // The document is fetched once, not embedded in the page as well.
    expect(log.requests.filter((url) => url.includes('openapi'))).toHaveLength(1);
  });
});
