/* global process, console, performance, Buffer */
// Where the time from POST /threads/{id}/runs to the first message.delta goes in scaled mode:
// `keel api` + WORKERS × `keel worker` (PostgreSQL + Redis) with bench/trace-preload.mjs loaded,
// RUNS runs one after the other (one client, zero-latency fake model); prints, per hop, the
// median time (ms after the POST was sent) at which each process did each thing.
//   PORT_BASE=8450 RUNS=40 WORKERS=1 node bench/runs-trace.mjs   (needs `npm run build`)
// CHECKOUT=<dir> traces another build (e.g. a baseline); KEEL_ENV="NAME=value ..." adds settings.
import { execFileSync } from 'node:child_process';
import { mkdirSync, openSync, readFileSync, rmSync, writeSync } from 'node:fs';
import http from 'node:http';
import { resolve } from 'node:path';

import { addCredits, addUpstreamModel, createDatabase, keelEnv, median, signIn, sleep, start, stop, waitForLog, waitUp } from './lib.mjs';

const PORT_BASE = Number(process.env.PORT_BASE ?? 8450);
const RUNS = Number(process.env.RUNS ?? 40);
const WORKERS = Number(process.env.WORKERS ?? 1);
const OUT = resolve(process.env.OUT ?? 'bench/out/runs-trace');
const TRACE = `${OUT}/trace.tsv`;
const CHECKOUT = resolve(process.env.CHECKOUT ?? '.');
const REDIS_URL = process.env.REDIS_URL || 'redis://127.0.0.1:6379';
const MODEL = 'bench-model';
rmSync(OUT, { recursive: true, force: true });
mkdirSync(OUT, { recursive: true });

const preload = ['--import', resolve('bench/trace-preload.mjs')];
const traced = (role) => ({ TRACE_FILE: TRACE, TRACE_ROLE: role });
const fd = openSync(TRACE, 'a');
const t = () => Math.round((performance.timeOrigin + performance.now()) * 1000);
const mark = (what) => writeSync(fd, `${t()}\tclient\t${what}\n`);

start(OUT, 'upstream', ['bench/fake-upstream.mjs'], { PORT: String(PORT_BASE), ...traced('upstream') }, { nodeArgs: preload });
await waitUp(PORT_BASE);
const port = PORT_BASE + 1;
const env = keelEnv(port, {
  DATABASE_URL: createDatabase(`keel_runs_trace_${process.pid}`),
  REDIS_URL,
  REDIS_KEY_PREFIX: `keel-runs-trace-${process.pid}:`,
  RATE_LIMIT_LOGIN_PER_IP: '100000',
  ...(process.env.KEEL_ENV ? Object.fromEntries(process.env.KEEL_ENV.split(/\s+/).filter(Boolean).map((pair) => pair.split('='))) : {}),
});
execFileSync(process.execPath, ['bin/keel.js', 'migrate'], { cwd: CHECKOUT, env: { ...process.env, ...env }, stdio: 'ignore' });
start(OUT, 'api', ['bin/keel.js', 'api'], { ...env, ...traced('api') }, { cwd: CHECKOUT, nodeArgs: preload });
for (let i = 1; i <= WORKERS; i++) start(OUT, `worker${i}`, ['bin/keel.js', 'worker'], { ...env, ...traced(`worker${i}`) }, { cwd: CHECKOUT, nodeArgs: preload });
await waitUp(port);
for (let i = 1; i <= WORKERS; i++) await waitForLog(`${OUT}/worker${i}.log`, '"worker started"');

const admin = await addUpstreamModel(port, `http://127.0.0.1:${PORT_BASE}/v1`, MODEL);
const created = await admin.call('POST', '/users', { email: 'tracer@bench.test', password: 'bench-user-password', full_name: 'Tracer' });
await addCredits(admin, created.id);
const user = await signIn(port, 'tracer@bench.test', 'bench-user-password');
const agentRow = await user.call('POST', '/agents', { name: 'trace agent', model: MODEL, system_prompt: 'Answer briefly.' });
const agent = new http.Agent({ keepAlive: true });
const headers = { authorization: `Bearer ${user.token}` };

function post(path, body) {
  return new Promise((done, fail) => {
    const payload = JSON.stringify(body);
    const req = http.request({ host: '127.0.0.1', port, method: 'POST', path, agent, headers: { ...headers, 'content-type': 'application/json', 'content-length': Buffer.byteLength(payload) } }, (res) => {
      let text = '';
      res.on('data', (c) => (text += c));
      res.on('end', () => done({ status: res.statusCode, body: text }));
    });
    req.on('error', fail);
    req.end(payload);
  });
}

function events(runId) {
  return new Promise((done, fail) => {
    const req = http.get({ host: '127.0.0.1', port, path: `/api/v1/runs/${runId}/events`, agent, headers: { ...headers, accept: 'text/event-stream' } }, (res) => {
      let seenDelta = false;
      res.setEncoding('utf8');
      res.on('data', (text) => {
        if (!seenDelta && text.includes('event: message.delta')) {
          seenDelta = true;
          mark('first delta');
        }
      });
      res.on('end', () => (mark('end'), done()));
    });
    req.on('error', fail);
  });
}

for (let i = 0; i < RUNS + 5; i++) {
  const thread = await user.call('POST', '/threads', { title: 'trace' });
  await sleep(40);
  mark(`POST ${i}`);
  const answer = await post(`/api/v1/threads/${thread.id}/runs`, { agent_id: agentRow.id, input: 'Say hello.' });
  if (answer.status !== 202) throw new Error(`POST ${answer.status} ${answer.body}`);
  mark('202');
  await events(JSON.parse(answer.body).id);
  await sleep(40);
}
await sleep(300);
await stop();

// Per run (the first 5 are warm-up): each (process, action, occurrence) at its time after the POST.
const lines = readFileSync(TRACE, 'utf8').trim().split('\n').map((line) => {
  const [time, role, what] = line.split('\t');
  return { time: Number(time), role, what };
}).sort((a, b) => a.time - b.time);
const starts = lines.filter((l) => l.role === 'client' && l.what.startsWith('POST '));
const byLabel = new Map();
const firstDelta = [];
for (const [index, begin] of starts.entries()) {
  if (index < 5) continue;
  const end = lines.find((l) => l.role === 'client' && l.what === 'end' && l.time > begin.time);
  const seen = new Map();
  for (const l of lines) {
    if (l.time < begin.time || l.time > end.time) continue;
    const key = `${l.role}\t${l.what}`;
    const n = (seen.get(key) ?? 0) + 1;
    seen.set(key, n);
    const label = `${key}${n > 1 ? ` #${n}` : ''}`;
    if (!byLabel.has(label)) byLabel.set(label, []);
    byLabel.get(label).push((l.time - begin.time) / 1000);
    if (l.role === 'client' && l.what === 'first delta') firstDelta.push((l.time - begin.time) / 1000);
  }
}
// Per run: statements and commands each process sent (PostgreSQL queries, Redis commands).
const counts = new Map();
for (const [index, begin] of starts.entries()) {
  if (index < 5) continue;
  const next = starts[index + 1]?.time ?? Infinity;
  for (const l of lines) {
    if (l.time < begin.time || l.time >= next || !/^(pg|redis)> /.test(l.what)) continue;
    const key = `${l.role} ${l.what.slice(0, l.what.indexOf('>'))}`;
    counts.set(key, (counts.get(key) ?? 0) + 1 / RUNS);
  }
}
const rows = [...byLabel].filter(([, times]) => times.length >= RUNS / 2).map(([label, times]) => ({ label, at: median(times.sort((a, b) => a - b)), n: times.length })).sort((a, b) => a.at - b.at);
console.log(`${CHECKOUT}: ${RUNS} runs, WORKERS=${WORKERS}; first delta p50 ${median(firstDelta.sort((a, b) => a - b)).toFixed(2)} ms`);
console.log(`per run (POST to the next POST, thread creation included): ${[...counts].sort().map(([key, n]) => `${key} ${n.toFixed(1)}`).join(', ')}`);
for (const row of rows) console.log(`${row.at.toFixed(2).padStart(8)} ms  ${row.label.replace('\t', '  ')}${row.n < RUNS ? `  (${row.n}/${RUNS})` : ''}`);
process.exit(0);
