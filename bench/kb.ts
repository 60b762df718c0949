/**
 * Knowledge-base benchmarks (issue 9, "Done when"). Run `npm run build` first, then
 *
 *   npx tsx bench/kb.ts            (PARTS="ingest search rss"; see bench/README.md for the settings)
 *
 * - ingest: `keel start` (compiled, embedded, no EMBEDDING_MODEL) as a child process; a Markdown
 *   file of TEXT_MB and a PDF of PDF_PAGES streamed over HTTP to the upload route, timed from the
 *   first byte sent to the entry's `ready`. Baseline, same run: extraction + chunking alone (the
 *   modules ingestion calls, in this process).
 * - search: CHUNKS chunks seeded straight into knowledge_chunks (bigram text learnt from the
 *   kb-eval corpus, to_tsvector as ingestion writes it; and, on PGlite, the fake lexical embedder's
 *   vectors with the HNSW index), then `POST /knowledge-base/search` timed over HTTP from this process
 *   (one client, the corpus questions in turn) on an in-process app: full text on PGlite and on
 *   PostgreSQL (a database of its own, dropped at the end), hybrid on PGlite. Baseline, same run:
 *   the full-text SELECT the service runs, sent straight to the database.
 * - worker-rss (not in the default PARTS): the same PDF ingested by a `keel worker` on PostgreSQL
 *   and Redis (the API a process of its own); RSS of the worker's process group.
 * - rss: `keel start` (started once, then restarted on its database) ingesting a pdfkit PDF of
 *   BIG_PDF_MB; RSS of its process group sampled every 100 ms (worker threads included); CHECKOUTS
 *   ("name=dir ...") runs it for each build in turn on the same file (A/B).
 */
import { type ChildProcess, spawn, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { cpSync, createReadStream, createWriteStream, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { request } from 'node:http';
import { cpus, loadavg, tmpdir } from 'node:os';
import { join, resolve } from 'node:path';

import { sql } from 'drizzle-orm';
import type { FastifyInstance } from 'fastify';
import PDFDocument from 'pdfkit';
import pino from 'pino';

import { loadSettings, type Settings } from '../src/core/config.js';
import { type Database, openDatabase } from '../src/core/db.js';
import { migrateUp } from '../src/core/migrate.js';

import { knowledgeChunks, knowledgeEntries, knowledgeFolders, users } from '../src/models/index.js';

import { buildApp } from '../src/app.js';
import { queryRows } from '../src/crud/owned.js';
import { chunkDocumentAsync, chunkOptionsFrom } from '../src/modules/knowledge/chunk.js';
import { extractDocument, extractLimitsFrom } from '../src/modules/knowledge/extract.js';
import { ensureVectorIndex, writeEmbeddings } from '../src/services/knowledge/embeddings.js';
import { ensureFirstSuperuser } from '../src/services/user-service.js';
import { FakeModelServer, LEXICAL_EMBEDDING_MODEL, lexicalEmbedding } from '../test/helpers/fake-model-server.js';
import { KB_EVAL_DIR, loadQuestions } from '../test/helpers/kb-eval-corpus.js';
import { adminQuery, databaseUrl } from '../test/helpers/postgres.js';
import { keelScript } from './lib.mjs';

const root = resolve(import.meta.dirname, '..');
const env = (name: string, fallback: string) => process.env[name] ?? fallback;
const PARTS = env('PARTS', 'ingest search rss').split(/\s+/);
const TEXT_MB = Number(env('TEXT_MB', '20'));
const PDF_PAGES = Number(env('PDF_PAGES', '2000'));
const BIG_PDF_MB = Number(env('BIG_PDF_MB', '50'));
/** A big PDF kept between runs (made there when missing): pdfkit takes minutes to write 50 MB. */
const BIG_PDF = process.env.BIG_PDF;
/** Keel processes listen on PORT_BASE … PORT_BASE + 4 (two benches side by side need their own). */
const PORT_BASE = Number(env('PORT_BASE', '8231'));
/** Prefix of the PostgreSQL databases the bench creates (and drops). */
const DB_PREFIX = env('DB_PREFIX', 'keel_bench_kb');
const CHUNKS = Number(env('CHUNKS', '100000'));
const CHUNKS_PER_ENTRY = 100;
const REQUESTS = Number(env('REQUESTS', '300'));
const WARMUP = 20;
const PG_ADMIN_URL = env('PG_ADMIN_URL', 'postgres://postgres@127.0.0.1:5432/postgres');
const TARGETS = env('TARGETS', 'pglite postgres').split(/\s+/);
/** Where the fake embedding provider runs for hybrid search: `process` (its own) or `inline` (this one). */
const FAKE_MODEL = env('FAKE_MODEL', 'process');
const ADMIN = { email: 'admin@kb-bench.test', password: 'kb-bench-password' };

const log = (line: string) => console.log(line);
/** A Markdown table under a heading, for bench/RESULTS.md. */
function logTable(title: string, columns: string[], rows: string[]): void {
  log(`\n### ${title}\n`);
  log(`| ${columns.join(' | ')} |`);
  log(`|${' --- |'.repeat(columns.length)}`);
  for (const row of rows) log(row);
}
const load = () => loadavg().map((n) => n.toFixed(2)).join(' ');

// ==================== Text ====================

/** A bigram chain learnt from the eval corpus: sentences with the vocabulary and rhythm of real documents. */
function textGenerator(seed = 7) {
  const words = readdirSync(join(KB_EVAL_DIR, 'documents'))
    .map((name) => readFileSync(join(KB_EVAL_DIR, 'documents', name), 'utf8'))
    .join(' ')
    .replace(/<[^>]+>/g, ' ')
    .match(/[A-Za-z][A-Za-z'-]*|\d+(?:[.,]\d+)?/g)!;
  const next = new Map<string, string[]>();
  for (let i = 0; i + 1 < words.length; i++) {
    const list = next.get(words[i]!) ?? [];
    list.push(words[i + 1]!);
    next.set(words[i]!, list);
  }
  let state = seed;
  const random = (n: number) => ((state = (state * 1103515245 + 12345) % 2 ** 31), state % n);
  const sentence = () => {
    let word = words[random(words.length)]!;
    const out = [word];
    for (let n = 6 + random(18); out.length < n; ) {
      const options = next.get(word);
      word = options ? options[random(options.length)]! : words[random(words.length)]!;
      out.push(word);
    }
    const text = out.join(' ');
    return `${text[0]!.toUpperCase()}${text.slice(1)}.`;
  };
  const paragraph = () => Array.from({ length: 2 + random(5) }, sentence).join(' ');
  return { sentence, paragraph, random };
}

function writeMarkdown(path: string, megabytes: number): void {
  const { paragraph } = textGenerator();
  const parts: string[] = [];
  let size = 0;
  for (let n = 0; size < megabytes * 1e6; n++) {
    const part = n % 12 === 0 ? `${'#'.repeat(1 + (n % 3))} Section ${n}\n\n` : `${paragraph()}\n\n`;
    parts.push(part);
    size += Buffer.byteLength(part);
  }
  writeFileSync(path, parts.join(''));
}

/** A PDF of `pages` text pages, made by pdfkit. */
async function writePdf(path: string, pages: number): Promise<void> {
  const { paragraph } = textGenerator(11);
  const pdf = new PDFDocument({ compress: true });
  const written = new Promise<void>((r) => pdf.pipe(createWriteStream(path)).on('finish', () => r()));
  for (let page = 0; page < pages; page++) {
    if (page > 0) pdf.addPage();
    pdf.fontSize(18).text(`Chapter ${page + 1}`);
    for (let i = 0; i < 6; i++) pdf.fontSize(10).text(paragraph()).moveDown(0.5);
    if (page % 50 === 0) await new Promise((r) => setImmediate(r)); // let the stream drain
  }
  pdf.end();
  await written;
}

// ==================== keel start (child process) ====================

interface Server {
  child: ChildProcess;
  base: string;
  headers: Record<string, string>;
  dataDir: string;
}

/** Environment of a bench Keel process: generous knowledge-base limits, the bench's superuser. */
function keelProcessEnv(dataDir: string, port: number, extra: Record<string, string>): NodeJS.ProcessEnv {
  return {
    PATH: process.env.PATH,
    ENVIRONMENT: 'local',
    SECRET_KEY: randomBytes(32).toString('hex'),
    DATA_DIR: dataDir,
    PORT: String(port),
    LOG_LEVEL: 'warn',
    FIRST_SUPERUSER: ADMIN.email,
    FIRST_SUPERUSER_PASSWORD: ADMIN.password,
    KB_MAX_FILE_BYTES: String(200 * 1024 ** 2),
    KB_MAX_BYTES_PER_USER: String(1024 ** 3),
    KB_MAX_TEXT_CHARS: String(200_000_000),
    KB_EXTRACT_TIMEOUT_SECONDS: '1200',
    HTTP_REQUEST_TIMEOUT_MS: '600000',
    ...extra,
  };
}

async function startKeel(port: number, extra: Record<string, string> = {}, checkout = root, command = 'start'): Promise<Server> {
  const dataDir = extra.DATA_DIR ?? mkdtempSync(join(tmpdir(), 'keel-bench-kb-data-'));
  // As `npm start` / `npm run keel` start it in `checkout`: its node flags and environment.
  const script = keelScript(checkout);
  const child = spawn(process.execPath, [...script.flags, join(checkout, 'bin/keel.js'), command], {
    cwd: checkout,
    detached: true, // its own process group: RSS is summed over it
    stdio: ['ignore', 'ignore', 'inherit'],
    env: { ...script.env, ...keelProcessEnv(dataDir, port, extra) },
  });
  const base = `http://127.0.0.1:${port}`;
  for (let i = 0; ; i++) {
    try {
      if ((await fetch(`${base}/health`)).ok) break;
    } catch {
      // not listening yet
    }
    if (i > 600) throw new Error('keel start: no /health in 60 s');
    await new Promise((r) => setTimeout(r, 100));
  }
  const token = await fetch(`${base}/api/v1/login/access-token`, {
    method: 'POST',
    headers: { 'content-type': 'application/x-www-form-urlencoded' },
    body: new URLSearchParams({ username: ADMIN.email, password: ADMIN.password }),
  });
  const { access_token } = (await token.json()) as { access_token: string };
  return { child, base, headers: { authorization: `Bearer ${access_token}` }, dataDir };
}

async function stopKeel(server: Server, remove = true): Promise<void> {
  const exited = new Promise((r) => server.child.once('exit', r));
  server.child.kill('SIGTERM');
  await exited;
  if (remove) rmSync(server.dataDir, { recursive: true, force: true });
}

async function api<T>(server: Server, method: string, path: string, body?: unknown): Promise<T> {
  const response = await fetch(`${server.base}/api/v1${path}`, {
    method,
    headers: { ...server.headers, ...(body ? { 'content-type': 'application/json' } : {}) },
    body: body ? JSON.stringify(body) : undefined,
  });
  if (!response.ok) throw new Error(`${method} ${path}: ${response.status} ${await response.text()}`);
  return (await response.json()) as T;
}

/** Streams the file as multipart/form-data (never whole in memory); the entry id. */
function uploadFile(server: Server, folderId: string, path: string): Promise<string> {
  const boundary = `----keelbench${randomBytes(8).toString('hex')}`;
  const filename = path.split('/').pop()!;
  const head = Buffer.from(`--${boundary}\r\nContent-Disposition: form-data; name="file"; filename="${filename}"\r\nContent-Type: application/octet-stream\r\n\r\n`);
  const tail = Buffer.from(`\r\n--${boundary}--\r\n`);
  const url = new URL(`${server.base}/api/v1/knowledge-base/folders/${folderId}/upload`);
  return new Promise((resolvePromise, reject) => {
    const req = request(url, {
      method: 'POST',
      headers: { ...server.headers, 'content-type': `multipart/form-data; boundary=${boundary}`, 'content-length': head.length + statSync(path).size + tail.length },
    });
    req.on('response', (res) => {
      let text = '';
      res.on('data', (c: Buffer) => (text += String(c)));
      res.on('end', () => (res.statusCode === 201 ? resolvePromise((JSON.parse(text) as { id: string }).id) : reject(new Error(`upload ${res.statusCode}: ${text}`))));
    });
    req.on('error', reject);
    req.write(head);
    const file = createReadStream(path);
    file.on('error', reject);
    file.on('end', () => req.end(tail));
    file.pipe(req, { end: false });
  });
}

async function untilSettled(server: Server, id: string): Promise<{ status: string; error: string | null; chunk_count: number }> {
  for (;;) {
    const entry = await api<{ status: string; error: string | null; chunk_count: number }>(server, 'GET', `/knowledge-base/entries/${id}`);
    if (entry.status === 'ready' || entry.status === 'failed') return entry;
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** RSS (MB) of the process group, from ps. */
function groupRssMb(pgid: number): number {
  const out = spawnSync('ps', ['-o', 'rss=', '-g', String(pgid)], { encoding: 'utf8' }).stdout;
  return Math.round(out.split('\n').reduce((sum, line) => sum + (Number(line.trim()) || 0), 0) / 1024);
}

// ==================== Parts ====================

const benchSettings: Settings = loadSettings({ ENVIRONMENT: 'local', SECRET_KEY: 'x'.repeat(40) });

/** CHECKOUTS ("name=dir ...", default this one): the builds a part runs in turn, as [name, dir]. */
function checkoutsToRun(): [string, string][] {
  return env('CHECKOUTS', `this=${root}`)
    .split(/\s+/)
    .map((pair) => pair.split('=') as [string, string]);
}

/** Extraction + chunking alone, in this process: the baseline of ingestion, and the text size. */
async function bareExtraction(path: string): Promise<{ textMb: number; seconds: number; chunks: number }> {
  const began = performance.now();
  const doc = await extractDocument({ path, filename: path.split('/').pop()! }, { ...extractLimitsFrom(benchSettings), maxTextChars: 200_000_000, timeoutMs: 1_200_000 });
  const chunks = await chunkDocumentAsync(doc, chunkOptionsFrom(benchSettings));
  return { textMb: Buffer.byteLength(doc.text) / 1e6, seconds: (performance.now() - began) / 1000, chunks: chunks.length };
}

async function ingestPart(dir: string): Promise<void> {
  const files = [join(dir, 'text.md'), join(dir, 'doc.pdf')];
  writeMarkdown(files[0]!, TEXT_MB);
  await writePdf(files[1]!, PDF_PAGES);
  const bare = new Map<string, Awaited<ReturnType<typeof bareExtraction>>>();
  for (const path of files) bare.set(path, await bareExtraction(path));
  const checkouts = checkoutsToRun();
  const rows: string[] = [];
  // Round by round, each build in turn on each file: a change of load hits both alike.
  for (let round = 0; round < Number(env('ROUNDS', '1')); round++) {
    for (const [name, checkout] of checkouts) {
      const server = await startKeel(PORT_BASE, {}, checkout);
      try {
        const folder = await api<{ id: string }>(server, 'POST', '/knowledge-base/folders', { name: 'bench' });
        for (const path of files) {
          const { textMb, seconds: bareSeconds } = bare.get(path)!;
          const cpuBefore = cpuSeconds(server.child.pid!);
          const began = performance.now();
          const entry = await untilSettled(server, await uploadFile(server, folder.id, path));
          const seconds = (performance.now() - began) / 1000;
          const cpu = cpuSeconds(server.child.pid!) - cpuBefore;
          if (entry.status !== 'ready') throw new Error(`${path}: ${entry.error}`);
          const perMin = (s: number) => ((textMb / s) * 60).toFixed(0);
          rows.push(`| ${name} | ${path.split('/').pop()} | ${(statSync(path).size / 1e6).toFixed(1)} | ${textMb.toFixed(1)} | ${entry.chunk_count} | ${seconds.toFixed(1)} | ${perMin(seconds)} | ${cpu} | ${bareSeconds.toFixed(1)} | ${perMin(bareSeconds)} | ${load()} |`);
          log(rows.at(-1)!);
        }
      } finally {
        await stopKeel(server);
      }
    }
  }
  logTable('Ingestion throughput (embedded `keel start`, no EMBEDDING_MODEL; upload over HTTP → ready)', ['checkout', 'file', 'file MB', 'text MB', 'chunks', 'end to end s', 'text MB/min', 'server CPU s', 'bare extract+chunk s', 'bare MB/min', 'load avg'], rows);
}

/**
 * A text-heavy PDF of `megabytes`, made by pdfkit: A4 pages of 70 positioned lines of Helvetica,
 * content streams uncompressed (pdfkit writes each line as a kerned TJ array of hex strings, about
 * 2.4 bytes of file per character of text). The event loop is let in after each page, so the
 * output can flow to the file (pdfkit pushes it without back-pressure).
 */
async function writeBigPdf(path: string, megabytes: number): Promise<void> {
  const { sentence } = textGenerator(13);
  const pdf = new PDFDocument({ compress: false, autoFirstPage: false });
  const out = createWriteStream(path);
  const written = new Promise<void>((r) => out.on('finish', () => r()));
  pdf.pipe(out);
  // pdfkit keeps the pages' content streams until the end: the size is known by pages, ~19.6 KB each.
  for (let page = 0; page < Math.ceil((megabytes * 1e6) / 19_600); page++) {
    pdf.addPage({ size: 'A4', margin: 40 });
    pdf.font('Helvetica').fontSize(9);
    for (let line = 0; line < 70; line++) pdf.text(sentence(), 40, 40 + line * 11, { lineBreak: false });
    await new Promise((r) => setImmediate(r));
    if (out.writableLength > 1e6) await new Promise<void>((r) => out.once('drain', () => r()));
  }
  pdf.end();
  await written;
}

/**
 * Peak and at-rest RSS of `keel start` (API, worker and PGlite: one process) ingesting the big PDF,
 * for each checkout of CHECKOUTS ("name=dir ..."; default this one), in turn on the same file. The
 * server is started once to create its database, stopped and started again on it: the resting
 * figure is a restarted worker's (the first start also runs initdb and the migrations).
 */
async function rssPart(dir: string): Promise<void> {
  const path = await bigPdf(dir);
  const checkouts = checkoutsToRun();
  const rows: string[] = [];
  for (const [name, checkout] of checkouts) {
    const first = await startKeel(PORT_BASE + 1, {}, checkout);
    const freshRest = groupRssMb(first.child.pid!);
    await stopKeel(first, false);
    const server = await startKeel(PORT_BASE + 1, { DATA_DIR: first.dataDir }, checkout);
    try {
      const folder = await api<{ id: string }>(server, 'POST', '/knowledge-base/folders', { name: 'bench' });
      const pgid = server.child.pid!;
      const atRest = groupRssMb(pgid);
      log(spawnSync('ps', ['-o', 'pid,rss,args', '-g', String(pgid)], { encoding: 'utf8' }).stdout);
      const began = performance.now();
      let peak = atRest;
      const timeline: number[] = [];
      const sampler = setInterval(() => {
        const rss = groupRssMb(pgid);
        peak = Math.max(peak, rss);
        if (timeline.length < (performance.now() - began) / 5000) timeline.push(rss);
      }, 100);
      const id = await uploadFile(server, folder.id, path);
      const entry = await untilSettled(server, id);
      const seconds = (performance.now() - began) / 1000;
      clearInterval(sampler);
      log(`${name}: RSS every 5 s from the upload's first byte (MB): ${timeline.join(' ')}`);
      await new Promise((r) => setTimeout(r, 2000));
      const after = groupRssMb(pgid);
      const content = await fetch(`${server.base}/api/v1/knowledge-base/entries/${id}/content`, { headers: server.headers });
      const textMb = content.ok ? Buffer.byteLength(await content.text()) / 1e6 : NaN;
      rows.push(
        `| ${name} | ${(statSync(path).size / 1e6).toFixed(1)} | ${entry.status}${entry.error ? ` (${entry.error})` : ''} | ${textMb.toFixed(1)} | ${entry.chunk_count} | ${seconds.toFixed(1)} | ${((textMb / seconds) * 60).toFixed(1)} | ${freshRest} | ${atRest} | **${peak}** | ${after} | ${load()} |`,
      );
      log(rows.at(-1)!);
    } finally {
      await stopKeel(server);
    }
  }
  logTable('Memory of `keel start` (API + worker + PGlite, one process group) ingesting a large PDF', ['checkout', 'file MB', 'status', 'text MB', 'chunks', 'upload → ready s', 'text MB/min', 'RSS idle after first start MB', 'RSS at rest (restarted) MB', 'peak RSS MB', 'RSS 2 s after MB', 'load avg'], rows);
}

/** The big PDF: BIG_PDF when set (written there first when missing), else a fresh one in `dir`. */
async function bigPdf(dir: string): Promise<string> {
  const path = BIG_PDF ?? join(dir, 'big.pdf');
  if (!existsSync(path)) await writeBigPdf(path, BIG_PDF_MB);
  return path;
}

/**
 * Peak and at-rest RSS of a `keel worker` (scaled: PostgreSQL + Redis, the API in a process of its
 * own) ingesting the big PDF: the worker the issue's memory target names, without PGlite or the API.
 * For each checkout of CHECKOUTS ("name=dir ..."; default this one) in turn, on the same file.
 */
async function workerRssPart(dir: string): Promise<void> {
  const path = await bigPdf(dir);
  const checkouts = checkoutsToRun();
  const rows: string[] = [];
  for (const [label, checkout] of checkouts) {
    const name = `${DB_PREFIX}_worker_${process.pid}`;
    await adminQuery(PG_ADMIN_URL, `create database "${name}"`);
    try {
      // One SECRET_KEY for both: jobs travel sealed under it, and a worker with another key drops
      // the API's job (the entry then waits for the sweeper, a minute or two).
      const shared = {
        DATABASE_URL: databaseUrl(PG_ADMIN_URL, name),
        REDIS_URL: env('REDIS_URL', 'redis://127.0.0.1:6379'),
        REDIS_KEY_PREFIX: `${DB_PREFIX}${process.pid}:`,
        SECRET_KEY: randomBytes(32).toString('hex'),
      };
      rows.push(`| ${label} ${await ingestWithWorker(dir, path, shared, checkout)}`);
      log(rows.at(-1)!);
    } finally {
      await adminQuery(PG_ADMIN_URL, `drop database if exists "${name}" with (force)`);
    }
  }
  logTable('Memory of `keel worker` (scaled: PostgreSQL + Redis) ingesting a large PDF', ['checkout', 'file MB', 'status', 'text MB', 'chunks', 'upload → ready s', 'worker CPU s', 'text MB per CPU min', 'worker RSS at rest MB', 'worker peak RSS MB', 'load avg'], rows);
}

/** CPU seconds (user + system) of a process, from ps. */
function cpuSeconds(pid: number): number {
  return Number(spawnSync('ps', ['-o', 'times=', '-p', String(pid)], { encoding: 'utf8' }).stdout.trim()) || 0;
}

/** `keel migrate`, `keel api` and one `keel worker` of `checkout` on `shared`'s databases; the worker's RSS and CPU while it ingests the PDF at `path` (a table row's cells after the first). */
async function ingestWithWorker(dir: string, path: string, shared: Record<string, string>, checkout: string): Promise<string> {
  const migrated = spawnSync(process.execPath, [join(checkout, 'bin/keel.js'), 'migrate'], { cwd: checkout, env: keelProcessEnv(dir, PORT_BASE + 3, shared), stdio: 'inherit' });
  if (migrated.status !== 0) throw new Error('keel migrate failed');
  const apiServer = await startKeel(PORT_BASE + 3, shared, checkout, 'api');
  const script = keelScript(checkout);
  const worker = spawn(process.execPath, [...script.flags, join(checkout, 'bin/keel.js'), 'worker'], {
    cwd: checkout,
    detached: true,
    stdio: ['ignore', 'ignore', 'inherit'],
    env: { ...script.env, ...keelProcessEnv(apiServer.dataDir, PORT_BASE + 4, shared) },
  });
  try {
    await new Promise((r) => setTimeout(r, 5000)); // the worker connects and loads the catalog
    const folder = await api<{ id: string }>(apiServer, 'POST', '/knowledge-base/folders', { name: 'bench' });
    const atRest = groupRssMb(worker.pid!);
    const cpuBefore = cpuSeconds(worker.pid!);
    let peak = atRest;
    const began = performance.now();
    const timeline: number[] = [];
    const sampler = setInterval(() => {
      const rss = groupRssMb(worker.pid!);
      peak = Math.max(peak, rss);
      if (timeline.length < (performance.now() - began) / 5000) timeline.push(rss);
    }, 100);
    const id = await uploadFile(apiServer, folder.id, path);
    const uploaded = (performance.now() - began) / 1000;
    const entry = await untilSettled(apiServer, id);
    const seconds = (performance.now() - began) / 1000;
    clearInterval(sampler);
    const cpu = cpuSeconds(worker.pid!) - cpuBefore;
    log(`worker RSS every 5 s from the upload's first byte (MB): ${timeline.join(' ')}; upload answered after ${uploaded.toFixed(1)} s`);
    const content = await fetch(`${apiServer.base}/api/v1/knowledge-base/entries/${id}/content`, { headers: apiServer.headers });
    const textMb = content.ok ? Buffer.byteLength(await content.text()) / 1e6 : NaN;
    return `| ${(statSync(path).size / 1e6).toFixed(1)} | ${entry.status}${entry.error ? ` (${entry.error})` : ''} | ${textMb.toFixed(1)} | ${entry.chunk_count} | ${seconds.toFixed(1)} | ${cpu} | ${((textMb / cpu) * 60).toFixed(1)} | ${atRest} | **${peak}** | ${load()} |`;
  } finally {
    const exited = new Promise((r) => worker.once('exit', r));
    worker.kill('SIGTERM');
    await exited;
    await stopKeel(apiServer);
  }
}

const percentile = (sorted: number[], p: number) => sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))]!;

async function timed(run: (query: string) => Promise<unknown>, queries: string[]): Promise<{ p50: number; p99: number; max: number; slowest: string }> {
  for (let i = 0; i < WARMUP; i++) await run(queries[i % queries.length]!);
  const times: { ms: number; query: string }[] = [];
  for (let i = 0; i < REQUESTS; i++) {
    const query = queries[i % queries.length]!;
    const began = performance.now();
    await run(query);
    times.push({ ms: performance.now() - began, query });
  }
  times.sort((a, b) => a.ms - b.ms);
  const ms = times.map((t) => t.ms);
  return { p50: percentile(ms, 50), p99: percentile(ms, 99), max: ms.at(-1)!, slowest: times.at(-1)!.query };
}

/** Text of one seeded chunk: paragraphs until about CHUNK_CHARS characters (~400 o200k tokens, a full default chunk). */
const CHUNK_CHARS = Number(env('CHUNK_CHARS', '1700'));
/** Bump when what `seed` writes changes: the cached seeded databases are keyed by it. */
const SEED_VERSION = 2;
const SEED_BATCH = 500;

/**
 * Seeds CHUNKS chunks for the superuser (and, with `vectors`, their lexical embeddings and the HNSW
 * index) in batches of SEED_BATCH rows, the tsvector computed by the database as ingestion does.
 */
async function seed(database: Database, ownerId: string, vectors: boolean): Promise<number> {
  const began = performance.now();
  const { paragraph } = textGenerator(3);
  const chunkText = () => {
    let text = paragraph();
    while (text.length < CHUNK_CHARS) text += ` ${paragraph()}`;
    return text;
  };
  const [folder] = await database.db.insert(knowledgeFolders).values({ owner_id: ownerId, name: 'seeded' }).returning({ id: knowledgeFolders.id });
  const entryCount = Math.ceil(CHUNKS / CHUNKS_PER_ENTRY);
  const entries = await database.db
    .insert(knowledgeEntries)
    .values(
      Array.from({ length: entryCount }, (_, e) => ({
        owner_id: ownerId,
        folder_id: folder!.id,
        filename: `doc-${e}.md`,
        mime_type: 'text/markdown',
        format: 'markdown' as const,
        size_bytes: 1,
        sha256: '0'.repeat(64),
        storage_key: `seeded/${e}`,
        status: 'ready' as const,
        chunk_count: CHUNKS_PER_ENTRY,
      })),
    )
    .returning({ id: knowledgeEntries.id });
  for (let first = 0; first < CHUNKS; first += SEED_BATCH) {
    const texts = Array.from({ length: Math.min(SEED_BATCH, CHUNKS - first) }, chunkText);
    const rows = await database.db
      .insert(knowledgeChunks)
      .values(
        texts.map((text, i) => ({
          entry_id: entries[Math.floor((first + i) / CHUNKS_PER_ENTRY)]!.id,
          owner_id: ownerId,
          chunk_index: (first + i) % CHUNKS_PER_ENTRY,
          text,
          heading_path: [`Section ${(first + i) % CHUNKS_PER_ENTRY}`],
          token_count: Math.ceil(text.length / 4),
          tsv: sql`to_tsvector('english', ${text})`,
        })),
      )
      .returning({ id: knowledgeChunks.id });
    if (vectors) await writeEmbeddings(database.db, LEXICAL_EMBEDDING_MODEL, rows.map((r) => r.id), texts.map(lexicalEmbedding));
    if (first % 10_000 === 0) log(`  seeded ${first + texts.length} chunks, ${((performance.now() - began) / 1000).toFixed(0)} s`);
  }
  if (vectors) {
    await database.db.execute(sql`set maintenance_work_mem = '512MB'`);
    await ensureVectorIndex(database.db, lexicalEmbedding('x').length);
  }
  await database.db.execute(sql`analyze`);
  return (performance.now() - began) / 1000;
}

const BENCH_SECRET = 'kb-bench-secret-'.repeat(4);

/**
 * A seeded database to run on, from a cache kept between runs (seeding 100k chunks takes minutes):
 * on PGlite a data directory under bench/out copied for the run, on PostgreSQL a template database
 * copied by `create database … template`. The cache is migrated up first, so a migration added
 * since it was seeded runs once on it, as it would on a user's database. FRESH_SEED=1 rebuilds.
 */
async function seededDatabase(target: string): Promise<{ location: Record<string, string>; cleanup: () => Promise<void>; seeded: string }> {
  const key = `kb-seed-v${SEED_VERSION}-${CHUNKS}-${CHUNK_CHARS}`;
  const fresh = process.env.FRESH_SEED === '1';
  const common = { ENVIRONMENT: 'local', SECRET_KEY: BENCH_SECRET, FIRST_SUPERUSER: ADMIN.email, FIRST_SUPERUSER_PASSWORD: ADMIN.password };
  /** Migrates the cached database up (a migration added since it was seeded runs once, on the cache), and seeds it if asked. */
  const prepare = async (location: Record<string, string>, seedIt: boolean): Promise<string> => {
    const dataDir = mkdtempSync(join(tmpdir(), 'keel-bench-kb-seed-'));
    const settings = loadSettings({ ...common, ...location, DATA_DIR: dataDir });
    const database = await openDatabase(settings);
    try {
      await migrateUp(database, pino({ level: 'silent' }));
      if (!seedIt) return '';
      await ensureFirstSuperuser(database.db, settings, pino({ level: 'silent' }));
      const [admin] = await database.db.select({ id: users.id }).from(users).where(sql`${users.email} = ${ADMIN.email}`);
      const seconds = await seed(database, admin!.id, database.kind === 'pglite');
      return `seeded ${CHUNKS} chunks (~${CHUNK_CHARS} characters each) in ${seconds.toFixed(0)} s (load ${load()})`;
    } finally {
      await database.close();
      rmSync(dataDir, { recursive: true, force: true });
    }
  };
  if (target === 'postgres') {
    const template = `keel_bench_${key.replaceAll('-', '_')}`;
    const exists = (await adminQuery(PG_ADMIN_URL, 'select 1 from pg_database where datname = $1', [template])).length > 0;
    let seeded = `copied the cached seed database ${template}`;
    if (fresh || !exists) {
      await adminQuery(PG_ADMIN_URL, `drop database if exists "${template}" with (force)`);
      await adminQuery(PG_ADMIN_URL, `create database "${template}"`);
    }
    seeded = (await prepare({ DATABASE_URL: databaseUrl(PG_ADMIN_URL, template) }, fresh || !exists)) || seeded;
    const name = `${DB_PREFIX}_${randomBytes(4).toString('hex')}`;
    await adminQuery(PG_ADMIN_URL, `create database "${name}" template "${template}"`);
    return { location: { DATABASE_URL: databaseUrl(PG_ADMIN_URL, name) }, seeded, cleanup: () => adminQuery(PG_ADMIN_URL, `drop database if exists "${name}" with (force)`).then(() => undefined) };
  }
  const cache = join(root, 'bench/out', key);
  let seeded = `copied the cached seed directory bench/out/${key}`;
  const seedIt = fresh || !existsSync(join(cache, 'PG_VERSION'));
  if (seedIt) {
    rmSync(cache, { recursive: true, force: true });
    mkdirSync(cache, { recursive: true });
  }
  seeded = (await prepare({ PGLITE_DATA_DIR: cache }, seedIt)) || seeded;
  const dir = mkdtempSync(join(tmpdir(), 'keel-bench-kb-pglite-'));
  cpSync(cache, dir, { recursive: true });
  return { location: { PGLITE_DATA_DIR: dir }, seeded, cleanup: async () => rmSync(dir, { recursive: true, force: true }) };
}

async function appOn(database: Database, settings: Record<string, string>): Promise<{ app: FastifyInstance; base: string; headers: Record<string, string> }> {
  const logger = pino({ level: 'silent' });
  const app = await buildApp({ settings: loadSettings({ ENVIRONMENT: 'local', LOG_LEVEL: 'silent', ...settings }), database, logger, vectorSearch: database.kind === 'pglite', runJobs: false });
  const base = await app.listen({ host: '127.0.0.1', port: 0 });
  const token = await app.inject({
    method: 'POST',
    url: '/api/v1/login/access-token',
    payload: new URLSearchParams({ username: ADMIN.email, password: ADMIN.password }).toString(),
    headers: { 'content-type': 'application/x-www-form-urlencoded' },
  });
  return { app, base, headers: { authorization: `Bearer ${token.json<{ access_token: string }>().access_token}`, 'content-type': 'application/json' } };
}

/**
 * The fake embedding provider: in a process of its own (default), as a remote provider would be, or
 * on this process's event loop with Keel and the client (FAKE_MODEL=inline, as before 2026-12-03).
 */
async function startFakeModel(): Promise<{ url: string; close: () => Promise<unknown> }> {
  if (FAKE_MODEL === 'inline') return FakeModelServer.start();
  const child = spawn(process.execPath, [...process.execArgv, join(root, 'bench/fake-model.ts')], { stdio: ['pipe', 'pipe', 'inherit'] });
  const url = await new Promise<string>((resolve, reject) => {
    let out = '';
    child.stdout.on('data', (data: Buffer) => {
      out += data.toString();
      if (out.includes('\n')) resolve(out.split('\n')[0]!);
    });
    child.once('exit', (code) => reject(new Error(`the fake model server stopped (exit code ${code})`)));
  });
  const exited = new Promise((resolve) => child.once('exit', resolve));
  return { url, close: () => (child.stdin.end(), exited) };
}

async function searchTarget(target: string, queries: string[]): Promise<void> {
  const { location, cleanup, seeded } = await seededDatabase(target);
  const common = { SECRET_KEY: BENCH_SECRET, FIRST_SUPERUSER: ADMIN.email, FIRST_SUPERUSER_PASSWORD: ADMIN.password, DATA_DIR: mkdtempSync(join(tmpdir(), 'keel-bench-kb-data-')) };
  const settings = { ...common, ...location };
  const database = await openDatabase(loadSettings({ ENVIRONMENT: 'local', ...settings }));
  const fake = await startFakeModel();
  const apps: FastifyInstance[] = [];
  try {
    await migrateUp(database, pino({ level: 'silent' }));
    const [admin] = await database.db.select({ id: users.id }).from(users).where(sql`${users.email} = ${ADMIN.email}`);
    const vectors = database.kind === 'pglite';
    const [size] = await queryRows<{ chunks: number; tokens: number; tsv_bytes: number }>(
      database.db,
      sql`select count(*)::int as chunks, avg(token_count)::int as tokens, avg(pg_column_size(tsv))::int as tsv_bytes from knowledge_chunks`,
    );
    log(`\n${target}: ${seeded}; ${size!.chunks} chunks, ~${size!.tokens} tokens and a ${size!.tsv_bytes}-byte tsvector (stored) on average; load ${load()}`);
    if (PARTS.includes('seed')) return;

    const rows: string[] = [];
    let slowest = '';
    const row = (mode: string, via: string, r: { p50: number; p99: number; max: number; slowest: string }) => {
      rows.push(`| ${target} | ${mode} | ${via} | ${r.p50.toFixed(1)} | ${r.p99.toFixed(1)} | ${r.max.toFixed(1)} | ${load()} |`);
      slowest ||= r.slowest;
    };
    const rawFullText = (query: string) =>
      queryRows(
        database.db,
        sql`select c.id, ts_rank_cd(c.tsv, q) as score from knowledge_chunks c join knowledge_entries e on e.id = c.entry_id, websearch_to_tsquery('english', ${query}) q
            where c.tsv @@ q and c.owner_id = ${admin!.id} order by score desc, c.id limit 5`,
      );
    row('full text', 'raw SELECT (baseline)', await timed(rawFullText, queries));
    const fullText = await appOn(database, settings);
    apps.push(fullText.app);
    const post = (server: { base: string; headers: Record<string, string> }) => async (query: string) => {
      const response = await fetch(`${server.base}/api/v1/knowledge-base/search`, { method: 'POST', headers: server.headers, body: JSON.stringify({ query, top_k: 5 }) });
      const body = (await response.json()) as { mode: string };
      if (!response.ok) throw new Error(JSON.stringify(body));
      return body;
    };
    row('full text', 'POST /knowledge-base/search', await timed(post(fullText), queries));
    if (vectors) {
      const hybrid = await appOn(database, { ...settings, EMBEDDING_MODEL: LEXICAL_EMBEDDING_MODEL });
      apps.push(hybrid.app);
      await fetch(`${hybrid.base}/api/v1/providers`, { method: 'POST', headers: hybrid.headers, body: JSON.stringify({ name: 'fake', kind: 'openai-compatible', base_url: fake.url, api_key: 'sk-fake' }) });
      await fetch(`${hybrid.base}/api/v1/models`, {
        method: 'POST',
        headers: hybrid.headers,
        body: JSON.stringify({ id: LEXICAL_EMBEDDING_MODEL, provider: 'fake', capabilities: ['embedding'], pricing: { input_cost_per_million_tokens: '0', output_cost_per_million_tokens: '0' } }),
      });
      const mode = ((await post(hybrid)(queries[0]!))).mode;
      if (mode !== 'hybrid') throw new Error(`hybrid app answered ${mode}`);
      row('hybrid', 'POST /knowledge-base/search', await timed(post(hybrid), queries));
    }
    log('\n| database | mode | via | p50 ms | p99 ms | max ms | load avg |');
    log('| --- | --- | --- | --- | --- | --- | --- |');
    for (const line of rows) log(line);
    const explain = process.env.EXPLAIN ?? slowest;
    log(`\nPlan of the full-text SELECT for ${JSON.stringify(explain)} (the baseline's slowest query unless EXPLAIN names one):\n`);
    {
      const plan = await queryRows<{ 'QUERY PLAN': string }>(
        database.db,
        sql`explain analyze select c.id, ts_rank_cd(c.tsv, q) as score from knowledge_chunks c join knowledge_entries e on e.id = c.entry_id, websearch_to_tsquery('english', ${explain}) q
            where c.tsv @@ q and c.owner_id = ${admin!.id} order by score desc, c.id limit 5`,
      );
      log(plan.map((r) => r['QUERY PLAN']).join('\n'));
    }
  } finally {
    for (const app of apps.reverse()) await app.close();
    await fake.close();
    await database.close();
    await cleanup();
    rmSync(common.DATA_DIR, { recursive: true, force: true });
  }
}

// ==================== Run ====================

log(`node ${process.version}, ${cpus().length} × ${cpus()[0]?.model}, load avg ${load()}, ${new Date().toISOString()}`);
const dir = mkdtempSync(join(tmpdir(), 'keel-bench-kb-'));
try {
  if (PARTS.includes('ingest')) await ingestPart(dir);
  if (PARTS.includes('search') || PARTS.includes('seed')) {
    const queries = (await loadQuestions()).map((q) => q.question);
    log(`\n### Search latency at ${CHUNKS} chunks (one client, ${REQUESTS} requests after ${WARMUP} warm-up, the 69 eval questions in turn)`);
    for (const target of TARGETS) await searchTarget(target, queries);
  }
  if (PARTS.includes('rss')) await rssPart(dir);
  if (PARTS.includes('worker-rss')) await workerRssPart(dir);
} finally {
  rmSync(dir, { recursive: true, force: true });
}
