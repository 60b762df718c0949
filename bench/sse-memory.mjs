/* global process, console, setTimeout, clearInterval, setInterval, fetch */
// Memory per open SSE stream of GET /api/v1/runs/{id}/events (target: < 50 KB per stream).
//   node bench/sse-memory.mjs        (STREAMS=1000 MODES="embedded scaled" SETTLE=5 TOKEN_MS=200 PORT=8221)
// For each mode it starts Keel — embedded: `keel start` on a fresh DATA_DIR; scaled: `keel api` +
// `keel worker` on a database of its own (PG_ADMIN_URL) and REDIS_URL — signs in as the superuser,
// adds this script's slow upstream as an openai-compatible provider with a model, creates an agent
// and a thread, and starts one run whose answer streams a token every TOKEN_MS. Once its first
// `message.delta` arrives it opens and closes a few streams (warm-up), samples the API process
// (RSS from /proc, V8 heap from /metrics: the lowest of several samples, the closest to after a GC),
// opens STREAMS streams at once (each its own connection, replay then live), waits SETTLE s while
// they receive live deltas, samples again, and prints (after − before) / STREAMS. Then it cancels
// the run and checks that every stream ended with `run.cancelled`.
import { execFileSync, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdirSync, openSync, readFileSync, rmSync } from 'node:fs';
import http from 'node:http';

const STREAMS = Number(process.env.STREAMS ?? 1000);
const MODES = (process.env.MODES ?? 'embedded scaled').split(/\s+/).filter(Boolean);
const SETTLE = Number(process.env.SETTLE ?? 5);
const TOKEN_MS = Number(process.env.TOKEN_MS ?? 200);
const WARM_UP_STREAMS = 20;
const PORT = Number(process.env.PORT ?? 8221);
const PG_ADMIN_URL = process.env.PG_ADMIN_URL ?? 'postgres://postgres@127.0.0.1:5432/postgres';
const REDIS_URL = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379';
const OUT = 'bench/out/sse-memory';
const MODEL = 'bench-slow-model';
const PASSWORD = 'bench-superuser-password';

rmSync(OUT, { recursive: true, force: true });
mkdirSync(OUT, { recursive: true });
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// ==================== A slow upstream ====================

/** An OpenAI-compatible server whose streamed answer is a token every TOKEN_MS until the client goes. */
function startSlowUpstream() {
  const server = http.createServer((req, res) => {
    req.resume();
    req.on('end', () => {
      if (!req.url.endsWith('/chat/completions')) return res.writeHead(404).end();
      const base = { id: 'chatcmpl-slow', object: 'chat.completion.chunk', created: Math.floor(Date.now() / 1000), model: MODEL };
      const chunk = (delta) => `data: ${JSON.stringify({ ...base, choices: [{ index: 0, delta, finish_reason: null }] })}\n\n`;
      res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache' });
      res.write(chunk({ role: 'assistant', content: '' }));
      let n = 0;
      const timer = setInterval(() => res.write(chunk({ content: `token${n++} ` })), TOKEN_MS);
      res.on('close', () => clearInterval(timer)); // the run was cancelled: its request aborted
    });
  });
  return new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve(server)));
}

// ==================== Keel ====================

const children = [];
const databases = [];
process.on('exit', () => {
  for (const child of children) if (child.exitCode === null) child.kill('SIGKILL');
  for (const name of databases) {
    try {
      execFileSync('psql', ['-w', PG_ADMIN_URL, '-qc', `drop database if exists "${name}" with (force)`], { stdio: 'ignore' });
    } catch {
      // best effort
    }
  }
});
for (const signal of ['SIGINT', 'SIGTERM']) process.on(signal, () => process.exit(130));

function keel(name, command, env) {
  const log = openSync(`${OUT}/${name}.log`, 'w');
  const child = spawn(process.execPath, ['bin/keel.js', command], { env: { ...process.env, ...env }, stdio: ['ignore', log, log] });
  children.push(child);
  return child;
}

/** Starts the mode's processes; resolves with the API's port and pid (the process whose memory counts). */
async function startKeel(mode) {
  const port = PORT;
  const env = {
    ENVIRONMENT: 'local',
    SECRET_KEY: randomBytes(32).toString('hex'),
    FIRST_SUPERUSER: 'admin@bench.test',
    FIRST_SUPERUSER_PASSWORD: PASSWORD,
    LOG_FORMAT: 'json',
    LOG_LEVEL: 'warn',
    HOST: '127.0.0.1',
    PORT: String(port),
    DATA_DIR: `${OUT}/data-${mode}`,
    REDIS_URL: '',
    DATABASE_URL: '',
  };
  if (mode === 'embedded') {
    const api = keel('keel-embedded', 'start', env);
    return { port, pid: api.pid };
  }
  const database = `keel_sse_bench_${process.pid}`;
  databases.push(database);
  execFileSync('psql', ['-w', PG_ADMIN_URL, '-qc', `create database "${database}"`]);
  Object.assign(env, {
    DATABASE_URL: `${PG_ADMIN_URL.replace(/\/[^/]*$/, '')}/${database}`,
    REDIS_URL,
    REDIS_KEY_PREFIX: `keel-sse-bench-${process.pid}:`,
  });
  execFileSync(process.execPath, ['bin/keel.js', 'migrate'], { env: { ...process.env, ...env }, stdio: 'ignore' });
  const api = keel('keel-api', 'api', env);
  keel('keel-worker', 'worker', env);
  return { port, pid: api.pid };
}

async function waitUp(port) {
  for (let i = 0; i < 240; i++) {
    try {
      if ((await fetch(`http://127.0.0.1:${port}/health`)).ok) return;
    } catch {
      // not yet
    }
    await sleep(250);
  }
  throw new Error(`Keel does not answer on port ${port}`);
}

/** Calls the API as the superuser (after `signIn`); throws with the answer on a non-2xx. */
function apiClient(port) {
  const base = `http://127.0.0.1:${port}/api/v1`;
  let token = null;
  const call = async (method, path, body) => {
    const response = await fetch(`${base}${path}`, {
      method,
      headers: { ...(token ? { authorization: `Bearer ${token}` } : {}), ...(body ? { 'content-type': 'application/json' } : {}) },
      body: body ? JSON.stringify(body) : undefined,
    });
    const text = await response.text();
    if (!response.ok) throw new Error(`${method} ${path}: ${response.status} ${text}`);
    return text ? JSON.parse(text) : null;
  };
  const signIn = async () => {
    const response = await fetch(`${base}/login/access-token`, {
      method: 'POST',
      headers: { 'content-type': 'application/x-www-form-urlencoded' },
      body: `username=${encodeURIComponent('admin@bench.test')}&password=${PASSWORD}`,
    });
    if (!response.ok) throw new Error(`login: ${response.status} ${await response.text()}`);
    token = (await response.json()).access_token;
  };
  return { call, signIn, base, token: () => token };
}

// ==================== Streams ====================

/**
 * Opens GET /runs/{id}/events on a connection of its own; keeps only counts (the client's memory
 * is not what is measured, but 1000 of them share this process).
 */
function openStream(api, runId) {
  const stream = { status: 0, events: 0, ended: false, lastEvent: '', request: null };
  stream.opened = new Promise((resolve, reject) => {
    stream.request = http.get(
      `${api.base}/runs/${runId}/events`,
      { agent: false, headers: { authorization: `Bearer ${api.token()}`, accept: 'text/event-stream' } },
      (response) => {
        stream.status = response.statusCode;
        if (response.statusCode !== 200) return reject(new Error(`GET /runs/${runId}/events: ${response.statusCode}`));
        response.setEncoding('utf8');
        let pending = '';
        response.on('data', (text) => {
          pending += text;
          const frames = pending.split('\n\n');
          pending = frames.pop();
          for (const frame of frames) {
            const name = /^event: (.+)$/m.exec(frame)?.[1];
            if (!name) continue; // a keep-alive comment
            stream.events++;
            stream.lastEvent = name;
            if (stream.events === 1) resolve(stream);
          }
        });
        response.on('end', () => (stream.ended = true));
        response.on('error', () => (stream.ended = true));
      },
    );
    stream.request.on('error', reject);
  });
  return stream;
}

// ==================== Sampling ====================

function rssBytes(pid) {
  return Number(/VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))[1]) * 1024;
}

async function heapBytes(port) {
  const text = await (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
  return Number(/^nodejs_heap_size_used_bytes (\S+)$/m.exec(text)[1]);
}

/** The lowest heap (closest to after a collection) and the median RSS over a few seconds. */
async function sample(port, pid) {
  const heaps = [];
  const rss = [];
  for (let i = 0; i < 8; i++) {
    heaps.push(await heapBytes(port));
    rss.push(rssBytes(pid));
    await sleep(400);
  }
  rss.sort((a, b) => a - b);
  return { heap: Math.min(...heaps), rss: rss[Math.floor(rss.length / 2)] };
}

// ==================== Run ====================

const upstream = await startSlowUpstream();
const rows = [];
for (const mode of MODES) {
  const { port, pid } = await startKeel(mode);
  await waitUp(port);
  const api = apiClient(port);
  await api.signIn();
  await api.call('POST', '/providers', {
    name: 'bench-slow',
    kind: 'openai-compatible',
    base_url: `http://127.0.0.1:${upstream.address().port}/v1`,
    api_key: 'sk-bench',
  });
  await api.call('POST', '/models', {
    id: MODEL,
    provider: 'bench-slow',
    capabilities: ['chat'],
    pricing: { input_cost_per_million_tokens: '0.4', output_cost_per_million_tokens: '1.6' },
  });
  const agent = await api.call('POST', '/agents', { name: 'slow counter', model: MODEL, system_prompt: 'Count slowly.' });
  const thread = await api.call('POST', '/threads', { title: 'sse memory bench' });
  const run = await api.call('POST', `/threads/${thread.id}/runs`, { agent_id: agent.id, input: 'Count.' });

  // The run is streaming once a delta arrives; a few streams opened and closed load every code path.
  const first = openStream(api, run.id);
  const deadline = Date.now() + 30_000;
  while (first.lastEvent !== 'message.delta') {
    if (Date.now() > deadline) throw new Error(`run ${run.id} did not stream (see ${OUT}/*.log)`);
    await sleep(50);
  }
  const warm = Array.from({ length: WARM_UP_STREAMS }, () => openStream(api, run.id));
  await Promise.all(warm.map((stream) => stream.opened));
  for (const stream of [first, ...warm]) stream.request.destroy();
  await sleep(1_000);

  const before = await sample(port, pid);
  const opening = Date.now();
  const streams = Array.from({ length: STREAMS }, () => openStream(api, run.id));
  await Promise.all(streams.map((stream) => stream.opened));
  const openMs = Date.now() - opening;
  const eventsAtOpen = streams.reduce((sum, stream) => sum + stream.events, 0);
  await sleep(SETTLE * 1000);
  const after = await sample(port, pid);
  const live = streams.filter((stream) => !stream.ended).length;
  const liveEvents = (streams.reduce((sum, stream) => sum + stream.events, 0) - eventsAtOpen) / STREAMS;

  await api.call('POST', `/runs/${run.id}/cancel`);
  const endBy = Date.now() + 10_000;
  while (streams.some((stream) => !stream.ended) && Date.now() < endBy) await sleep(100);
  const cancelled = streams.filter((stream) => stream.ended && stream.lastEvent === 'run.cancelled').length;
  for (const stream of streams) stream.request.destroy();

  rows.push({
    mode,
    streams: STREAMS,
    rssKb: (after.rss - before.rss) / STREAMS / 1024,
    heapKb: (after.heap - before.heap) / STREAMS / 1024,
    openMs,
    live,
    liveEvents,
    cancelled,
  });
  // The next mode listens on the same port: wait until these processes are gone.
  const stopping = children.splice(0).filter((child) => child.exitCode === null);
  await Promise.all(
    stopping.map(
      (child) =>
        new Promise((resolve) => {
          child.once('exit', resolve);
          child.kill('SIGTERM');
        }),
    ),
  );
}
upstream.close();

console.log('| mode | streams | RSS per stream | heap per stream | target | opened in | open after SETTLE | live events per stream | ended with run.cancelled |');
console.log('| --- | --- | --- | --- | --- | --- | --- | --- | --- |');
for (const row of rows) {
  const verdict = row.rssKb < 50 ? 'met' : 'MISSED';
  console.log(
    `| ${row.mode} | ${row.streams} | ${row.rssKb.toFixed(1)} KB | ${row.heapKb.toFixed(1)} KB | < 50 KB (${verdict}) | ${row.openMs} ms | ${row.live} | ${row.liveEvents.toFixed(1)} | ${row.cancelled} |`,
  );
}
