/* global process, console, performance, Buffer */
// Where the time from POST /threads/{id}/runs to the first message.delta goes in scaled mode:
// `keel api` + WORKERS × `keel worker` (PostgreSQL + Redis) with bench/trace-preload.mjs loaded,
// RUNS runs one after the other (one client, zero-latency fake model); prints, per hop, the
// median time (ms after the POST was sent) at which each process did each thing.
//   PORT_BASE=8450 RUNS=40 WORKERS=1 node bench/runs-trace.mjs   (needs `npm run build`)
// CLIENTS=50 DURATION=8 then loads it: CLIENTS clients (a user and thread each) start runs and read
// them to the end for DURATION s, and it prints what each process sent per completed run
// (statements and commands by text) and its CPU per run: where a second worker's CPU goes.
// WORKERS=0 traces embedded mode (`keel start` on PGlite, its statements as `pglite>`).
// CHECKOUT=<dir> traces another build (e.g. a baseline); KEEL_ENV="NAME=value ..." adds settings.
import { execFileSync, spawn } from 'node:child_process';
import { mkdirSync, openSync, readFileSync, rmSync, writeSync } from 'node:fs';
import http from 'node:http';
import { resolve } from 'node:path';

import { addCredits, addUpstreamModel, cpuMs, createDatabase, keelEnv, keelNodeArgs, median, signIn, sleep, start, stop, waitForLog, waitUp } from './lib.mjs';

const PORT_BASE = Number(process.env.PORT_BASE ?? 8450);
const RUNS = Number(process.env.RUNS ?? 40);
const WORKERS = Number(process.env.WORKERS ?? 1);
const OUT = resolve(process.env.OUT ?? 'bench/out/runs-trace');
const TRACE = `${OUT}/trace.tsv`;
const CHECKOUT = resolve(process.env.CHECKOUT ?? '.');
const REDIS_URL = process.env.REDIS_URL || 'redis://127.0.0.1:6379';
const CLIENTS = Number(process.env.CLIENTS ?? 0);
const DURATION = Number(process.env.DURATION ?? 8);
const MODEL = 'bench-model';
const DB_PREFIX = process.env.BENCH_DB_PREFIX ?? 'keel_runs_trace_';
rmSync(OUT, { recursive: true, force: true });
mkdirSync(OUT, { recursive: true });

// KEEL_NODE_ARGS (e.g. "--cpu-prof --cpu-prof-dir=bench/out/prof") go to Keel's processes too.
// TRACE=0 leaves the tracer out (a profile without its cost; no statement counts then).
const preload = [...(process.env.TRACE === '0' ? [] : ['--import', resolve('bench/trace-preload.mjs')]), ...keelNodeArgs()];
const traced = (role) => ({ TRACE_FILE: TRACE, TRACE_ROLE: role });
const fd = openSync(TRACE, 'a');
const t = () => Math.round((performance.timeOrigin + performance.now()) * 1000);
const mark = (what) => writeSync(fd, `${t()}\tclient\t${what}\n`);

start(OUT, 'upstream', ['bench/fake-upstream.mjs'], { PORT: String(PORT_BASE), ...traced('upstream') }, { nodeArgs: preload });
await waitUp(PORT_BASE);
const port = PORT_BASE + 1;
const env = WORKERS
  ? keelEnv(port, { DATABASE_URL: createDatabase(`${DB_PREFIX}${process.pid}`), REDIS_URL, REDIS_KEY_PREFIX: `${DB_PREFIX.replaceAll('_', '-')}${process.pid}:`, RATE_LIMIT_LOGIN_PER_IP: '100000' })
  : keelEnv(port, { DATA_DIR: `${OUT}/data`, DATABASE_URL: '', REDIS_URL: '', RATE_LIMIT_LOGIN_PER_IP: '100000' });
if (WORKERS) execFileSync(process.execPath, ['bin/keel.js', 'migrate'], { cwd: CHECKOUT, env: { ...process.env, ...env }, stdio: 'ignore' });
// WORKERS=0: embedded, one `keel start` (PGlite) does everything.
const processes = { api: start(OUT, 'api', ['bin/keel.js', WORKERS ? 'api' : 'start'], { ...env, ...traced('api') }, { cwd: CHECKOUT, nodeArgs: preload }) };
for (let i = 1; i <= WORKERS; i++) processes[`worker${i}`] = start(OUT, `worker${i}`, ['bin/keel.js', 'worker'], { ...env, ...traced(`worker${i}`) }, { cwd: CHECKOUT, nodeArgs: preload });
await waitUp(port);
for (let i = 1; i <= WORKERS; i++) await waitForLog(`${OUT}/worker${i}.log`, '"worker started"');

const admin = await addUpstreamModel(port, `http://127.0.0.1:${PORT_BASE}/v1`, MODEL);
const created = await admin.call('POST', '/users', { email: 'tracer@bench.test', password: 'bench-user-password', full_name: 'Tracer' });
await addCredits(admin, created.id);
const user = await signIn(port, 'tracer@bench.test', 'bench-user-password');
const agentRow = await user.call('POST', '/agents', { name: 'trace agent', model: MODEL, system_prompt: 'Answer briefly.' });
const agent = new http.Agent({ keepAlive: true });
const headers = { authorization: `Bearer ${user.token}` };

function post(path, body, as = headers) {
  return new Promise((done, fail) => {
    const payload = JSON.stringify(body);
    const req = http.request({ host: '127.0.0.1', port, method: 'POST', path, agent, headers: { ...as, 'content-type': 'application/json', 'content-length': Buffer.byteLength(payload) } }, (res) => {
      let text = '';
      res.on('data', (c) => (text += c));
      res.on('end', () => done({ status: res.statusCode, body: text }));
    });
    req.on('error', fail);
    req.end(payload);
  });
}

function events(runId, as = headers, quiet = false) {
  return new Promise((done, fail) => {
    const req = http.get({ host: '127.0.0.1', port, path: `/api/v1/runs/${runId}/events`, agent, headers: { ...as, accept: 'text/event-stream' } }, (res) => {
      let seenDelta = quiet;
      res.setEncoding('utf8');
      res.on('data', (text) => {
        if (!seenDelta && text.includes('event: message.delta')) {
          seenDelta = true;
          mark('first delta');
        }
      });
      res.on('end', () => (quiet || mark('end'), done()));
    });
    req.on('error', fail);
  });
}

if (CLIENTS > 0) await load();

/** CLIENTS clients for DURATION s; prints per completed run what each process sent and its CPU. */
async function load() {
  const clients = [];
  for (let i = 0; i < CLIENTS; i++) {
    const made = await admin.call('POST', '/users', { email: `loader${i}@bench.test`, password: 'bench-user-password', full_name: `Loader ${i}` });
    await addCredits(admin, made.id);
    const session = await signIn(port, `loader${i}@bench.test`, 'bench-user-password');
    const agentOf = await session.call('POST', '/agents', { name: `load agent ${i}`, model: MODEL, system_prompt: 'Answer briefly.' });
    const thread = await session.call('POST', '/threads', { title: 'load' });
    clients.push({ as: { authorization: `Bearer ${session.token}` }, agentId: agentOf.id, threadId: thread.id });
  }
  let completed = 0;
  const loop = async (client, until) => {
    while (performance.now() < until) {
      const answer = await post(`/api/v1/threads/${client.threadId}/runs`, { agent_id: client.agentId, input: 'Say hello.' }, client.as);
      if (answer.status !== 202) throw new Error(`POST ${answer.status} ${answer.body}`);
      await events(JSON.parse(answer.body).id, client.as, true);
      completed++;
    }
  };
  await Promise.all(clients.map((client) => loop(client, performance.now() + 1000))); // warm-up
  completed = 0;
  const cpuBefore = Object.fromEntries(Object.entries(processes).map(([role, child]) => [role, cpuMs(child.pid)]));
  // STRACE=1: the system calls of each Keel process over the window (strace -c), written to OUT/strace-<role>.txt.
  const tracers = process.env.STRACE ? Object.entries(processes).map(([role, child]) => spawn('strace', ['-c', '-f', '-p', String(child.pid), '-o', `${OUT}/strace-${role}.txt`], { stdio: 'ignore' })) : [];
  if (tracers.length) await sleep(500);
  const begin = t();
  const monotonic = [process.hrtime.bigint() / 1000n];
  await Promise.all(clients.map((client) => loop(client, performance.now() + DURATION * 1000)));
  const end = t();
  monotonic.push(process.hrtime.bigint() / 1000n);
  await Promise.all(tracers.map((tracer) => new Promise((done) => (tracer.once('exit', done), tracer.kill('SIGINT')))));
  const cpu = Object.entries(processes).map(([role, child]) => `${role} ${((cpuMs(child.pid) - cpuBefore[role]) / completed).toFixed(2)}`);
  await sleep(300); // the processes' trace buffers are flushed every 100 ms
  const sent = new Map();
  for (const line of readFileSync(TRACE, 'utf8').trim().split('\n')) {
    const [time, role, what] = line.split('\t');
    if (Number(time) < begin || Number(time) >= end || !/^(pg|pglite|redis)> /.test(what)) continue;
    const key = `${role}\t${what}`;
    sent.set(key, (sent.get(key) ?? 0) + 1);
  }
  const totals = new Map();
  for (const [key, n] of sent) {
    const [role, what] = key.split('\t');
    const kind = `${role} ${what.slice(0, what.indexOf('>'))}`;
    totals.set(kind, (totals.get(kind) ?? 0) + n);
  }
  console.log(`${CHECKOUT}: load, ${CLIENTS} clients × ${DURATION} s, WORKERS=${WORKERS}: ${completed} runs (${(completed / ((end - begin) / 1e6)).toFixed(1)}/s)`);
  console.log(`CPU ms per run: ${cpu.join(', ')}; window (monotonic µs, as in --cpu-prof profiles) ${monotonic.join('–')}`);
  console.log(`sent per run: ${[...totals].sort().map(([kind, n]) => `${kind} ${(n / completed).toFixed(2)}`).join(', ')}`);
  for (const [key, n] of [...sent].sort((a, b) => b[1] - a[1]).slice(0, 40)) console.log(`${(n / completed).toFixed(2).padStart(7)}  ${key.replace('\t', '  ')}`);
  await stop();
  process.exit(0);
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
    if (l.time < begin.time || l.time >= next || !/^(pg|pglite|redis)> /.test(l.what)) continue;
    const key = `${l.role} ${l.what.slice(0, l.what.indexOf('>'))}`;
    counts.set(key, (counts.get(key) ?? 0) + 1 / RUNS);
  }
}
const rows = [...byLabel].filter(([, times]) => times.length >= RUNS / 2).map(([label, times]) => ({ label, at: median(times.sort((a, b) => a - b)), n: times.length })).sort((a, b) => a.at - b.at);
console.log(`${CHECKOUT}: ${RUNS} runs, WORKERS=${WORKERS}; first delta p50 ${median(firstDelta.sort((a, b) => a - b)).toFixed(2)} ms`);
console.log(`per run (POST to the next POST, thread creation included): ${[...counts].sort().map(([key, n]) => `${key} ${n.toFixed(1)}`).join(', ')}`);
for (const row of rows) console.log(`${row.at.toFixed(2).padStart(8)} ms  ${row.label.replace('\t', '  ')}${row.n < RUNS ? `  (${row.n}/${RUNS})` : ''}`);
process.exit(0);
