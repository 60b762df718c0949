import { execFile } from 'node:child_process';
import { mkdtempSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { promisify } from 'node:util';

import openapiTS, { astToString } from 'openapi-typescript';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { SUPERUSER_EMAIL, SUPERUSER_PASSWORD, useTestApp } from '../helpers/app.js';
import { listen } from '../helpers/browser.js';
import type { OpenApiDocument } from '../helpers/routes.js';

const run = promisify(execFile);
const ROOT = resolve(import.meta.dirname, '../..');
const TSC = join(ROOT, 'node_modules/typescript/bin/tsc');
/** tsc and a child process per test: slow on a busy machine. */
const TIMEOUT_MS = 180_000;

/**
 * What a user of Keel writes after `npx openapi-typescript http://keel/api/v1/openapi.json`: a
 * typed client (openapi-fetch) that logs in with the OAuth2 form, creates a project and reads it
 * back. The `@ts-expect-error` lines prove the types are real (not `any`): were they loose, tsc
 * would report the directives as unused.
 */
const CLIENT = `import createClient from 'openapi-fetch';

import type { paths } from './schema.js';

const client = createClient<paths>({ baseUrl: process.env.KEEL_URL });

const login = await client.POST('/api/v1/login/access-token', {
  body: { username: process.env.KEEL_EMAIL ?? '', password: process.env.KEEL_PASSWORD ?? '' },
  bodySerializer: (body) => new URLSearchParams(body as Record<string, string>),
  headers: { 'content-type': 'application/x-www-form-urlencoded' },
});
if (!login.data) throw new Error('login failed: ' + JSON.stringify(login.error));
const headers = { authorization: 'Bearer ' + login.data.access_token };

const created = await client.POST('/api/v1/projects', { body: { name: 'typed client', description: 'made by openapi-fetch' }, headers });
if (!created.data) throw new Error('create failed: ' + JSON.stringify(created.error));
const id: string = created.data.id;

const got = await client.GET('/api/v1/projects/{project_id}', { params: { path: { project_id: id } }, headers });
if (!got.data) throw new Error('get failed: ' + JSON.stringify(got.error));
const project: { id: string; owner_id: string; name: string; description: string | null; created_at: string; updated_at: string } = got.data;
console.log(JSON.stringify(project));

export function typeChecks(): void {
  // @ts-expect-error: no such path
  void client.GET('/api/v1/no-such-path');
  // @ts-expect-error: a project's name is a string
  void client.POST('/api/v1/projects', { body: { name: 42 }, headers });
  // @ts-expect-error: the path parameter is required
  void client.GET('/api/v1/projects/{project_id}', { headers });
}
`;

const TSCONFIG = {
  compilerOptions: {
    target: 'ES2022',
    module: 'NodeNext',
    moduleResolution: 'NodeNext',
    lib: ['ES2022', 'DOM'],
    types: ['node'],
    strict: true,
    noEmit: true,
    skipLibCheck: true,
  },
  files: ['client.ts', 'schema.d.ts'],
};

const ctx = useTestApp();

describe('a typed client generated from the live document (openapi-typescript + openapi-fetch)', () => {
  let base: string;
  let dir: string;

  /** A project of its own: the client, generated types, and this repository's node_modules. */
  const writeProject = (types: string) => {
    dir = mkdtempSync(join(tmpdir(), 'keel-openapi-client-'));
    symlinkSync(join(ROOT, 'node_modules'), join(dir, 'node_modules'), 'dir');
    writeFileSync(join(dir, 'package.json'), JSON.stringify({ type: 'module', private: true }));
    writeFileSync(join(dir, 'tsconfig.json'), JSON.stringify(TSCONFIG));
    writeFileSync(join(dir, 'schema.d.ts'), types);
    writeFileSync(join(dir, 'client.ts'), CLIENT);
  };
  /** tsc's report, empty when the client compiles. */
  const typecheck = () =>
    run(process.execPath, [TSC, '-p', dir], { cwd: dir }).then(
      () => '',
      (error: { stdout?: string; message: string }) => error.stdout || error.message,
    );

  beforeAll(async () => {
    base = await listen(ctx.app);
  });
  afterAll(() => {
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  it('generates types, compiles with tsc, and creates and reads a project against the running server', async () => {
    writeProject(astToString(await openapiTS(new URL(`${base}/api/v1/openapi.json`))));
    expect(await typecheck()).toBe('');
    const { stdout } = await run(process.execPath, ['--import', 'tsx', 'client.ts'], {
      cwd: dir,
      env: { ...process.env, KEEL_URL: base, KEEL_EMAIL: SUPERUSER_EMAIL, KEEL_PASSWORD: SUPERUSER_PASSWORD },
    });
    const project = JSON.parse(stdout.trim()) as { id: string; name: string; description: string };
    expect(project).toMatchObject({ name: 'typed client', description: 'made by openapi-fetch' });
    const stored = await ctx.app.inject({ method: 'GET', url: `/api/v1/projects/${project.id}`, headers: { authorization: `Bearer ${await token()}` } });
    expect(stored.json()).toEqual(project);
  }, TIMEOUT_MS);

  it('fails to compile when the document drops a field clients use', async () => {
    const document = (await ctx.app.inject({ method: 'GET', url: '/api/v1/openapi.json' })).json<OpenApiDocument>();
    const schema = document.components.schemas.ProjectPublic as { properties: Record<string, unknown>; required: string[] };
    delete schema.properties.name;
    schema.required = schema.required.filter((field) => field !== 'name');
    rmSync(dir, { recursive: true, force: true });
    writeProject(astToString(await openapiTS(document as never)));
    expect(await typecheck()).toMatch(/client\.ts.*error TS\d+:.*'name'/);
  }, TIMEOUT_MS);

  async function token(): Promise<string> {
    const response = await ctx.app.inject({
      method: 'POST',
      url: '/api/v1/login/access-token',
      payload: new URLSearchParams({ username: SUPERUSER_EMAIL, password: SUPERUSER_PASSWORD }).toString(),
      headers: { 'content-type': 'application/x-www-form-urlencoded' },
    });
    return response.json<{ access_token: string }>().access_token;
  }
});
