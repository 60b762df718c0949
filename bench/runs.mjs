/* global process, console, Buffer */
// The agent-runs benchmark (issue 8): how soon a run's first token reaches an SSE client, and how
// many runs complete per second, with a zero-latency model, against baselines in the same run.
//   node bench/runs.mjs   (ROUNDS=3 N1=300 DURATION=10 CLIENTS=50 TARGETS="embedded" CHECKOUTS="this=." PORT_BASE=8229)
// Targets, each started once per checkout (CHECKOUTS="label=dir ...", e.g. "base=/tmp/keel-base this=."
// for an A/B against another build; each dir needs `npm run build`):
//   direct    the fake upstream (bench/fake-upstream.mjs) streamed directly: POST → first chunk
//   bare-sse  bench/baseline-sse-server.mjs: bare Fastify, POST 202 then GET SSE of canned events
//   embedded  `keel start` (PGlite) on a fresh DATA_DIR
//   scaled-N  `keel api` + N × `keel worker` on PostgreSQL (a database of its own, PG_ADMIN_URL) and
//             REDIS_URL (a key prefix of its own); skipped, with a note, when its runs do not start;
//   scaled-NxC  the same with RUN_CONCURRENCY=C on its workers. Its run slots (N × C) bound the runs
//             in flight: with MODEL_LATENCY_MS ≫ a run's CPU and N × C < CLIENTS, the slots (not the
//             clients, not the CPU) bound throughput, and "scaled-1xC scaled-2xC" measures what a
//             worker adds (e.g. TARGETS="scaled-1x8 scaled-2x8" MODEL_LATENCY_MS=1000 N1=0); the
//             summary says which bound each target had
// Per Keel server: USERS (= CLIENTS) users, each with credits (billing on), an agent on the
// upstream's model and its own threads. Every round measures, interleaved:
//   c1   N1 runs one after the other, each on a new thread (made untimed): the time from sending
//        POST /threads/{id}/runs to the first `message.delta` at an SSE client that opens
//        GET /runs/{id}/events as soon as the 202 arrives (p50/p99), read on to `run.completed`
//   cN   CLIENTS clients for DURATION s, each on a thread of its own (new each round): start a run,
//        read its events to `run.completed`, again (completed runs/s, p50/p99 of the whole run)
// with the server processes' CPU per run from /proc, and for cN the cores each part used (Keel's
// processes; scaled: PostgreSQL's backends of its database and the whole Redis server at REDIS_URL,
// which others may share), and the workers' event-loop wake-ups and read/write syscalls per run.
// cN starts after WARMUP s (3) of the same load, so that every process (each worker) has compiled
// its hot code: a cold worker costs about twice the CPU per run. MODEL_LATENCY_MS (default 0) makes the fake model wait before its first chunk (label
// a figure with it); KEEL_ENV="NAME=value ..." adds settings (e.g. JOB_CONCURRENCY=16) to every
// Keel process. Keel's node processes get their checkout's `npm start` flags, then KEEL_NODE_ARGS
// (e.g. "--cpu-prof --cpu-prof-dir=bench/out/runs/prof"). Raw lines: bench/out/runs/raw.tsv.
import { execFileSync } from 'node:child_process';
import { appendFileSync, mkdirSync, rmSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import { cpus, loadavg, totalmem } from 'node:os';
import { resolve } from 'node:path';

import { addCredits, addUpstreamModel, cpuMs, createDatabase, fmt, keelEnv, keelEnvOverrides, keelNodeArgs, loopCounters, mainThreadCpuMs, median, now, percentile, PG_ADMIN_URL, signIn, sleep, start, stop, waitForLog, waitUp } from './lib.mjs';

const ROUNDS = Number(process.env.ROUNDS ?? 3);
const N1 = Number(process.env.N1 ?? 300);
const DURATION = Number(process.env.DURATION ?? 10);
const CLIENTS = Number(process.env.CLIENTS ?? 50);
const WARMUP = Number(process.env.WARMUP ?? 3);
const USERS = Number(process.env.USERS ?? CLIENTS);
const TARGETS = (process.env.TARGETS ?? 'embedded').split(/\s+/).filter(Boolean);
const CHECKOUTS = (process.env.CHECKOUTS ?? 'this=.').split(/\s+/).filter(Boolean).map((pair) => {
  const [label, dir] = pair.split('=');
  return { label, dir: resolve(dir) };
});
const REDIS_URL = process.env.REDIS_URL || 'redis://127.0.0.1:6379';
const OUT = 'bench/out/runs';
const MODEL = 'bench-model';
// Ports PORT_BASE (upstream), +1 (bare SSE), +2… (Keel servers): another bench can run beside this one.
const PORT_BASE = Number(process.env.PORT_BASE ?? 8229);
const UPSTREAM_PORT = PORT_BASE;
const UPSTREAM = `http://127.0.0.1:${UPSTREAM_PORT}/v1`;
const PASSWORD = 'bench-user-password';
const INPUT = 'Say hello.';
const MODEL_LATENCY_MS = Number(process.env.MODEL_LATENCY_MS ?? 0);
const KEEL_ENV = keelEnvOverrides();

rmSync(OUT, { recursive: true, force: true });
mkdirSync(OUT, { recursive: true });
const RAW = `${OUT}/raw.tsv`;
writeFileSync(RAW, 'round\ttarget\tclients\truns_per_s\tfirst_delta_p50_ms\tfirst_delta_p99_ms\trun_p50_ms\trun_p99_ms\terrors\tcpu_ms_per_run\n');

// ==================== One run, as a client sees it ====================

const agent = new http.Agent({ keepAlive: true, maxSockets: 4 * CLIENTS });

/** A request whose body is read whole; resolves { status, body }. */
function request(port, method, path, headers, body) {
  return new Promise((done) => {
    const payload = body === undefined ? undefined : Buffer.from(JSON.stringify(body));
    const req = http.request({ host: '127.0.0.1', port, method, path, agent, headers: { ...headers, ...(payload ? { 'content-type': 'application/json', 'content-length': payload.length } : {}) } }, (res) => {
      let text = '';
      res.setEncoding('utf8');
      res.on('data', (chunk) => (text += chunk));
      res.on('end', () => done({ status: res.statusCode, body: text }));
      res.on('error', () => done({ status: 0, body: '' }));
    });
    req.on('error', () => done({ status: 0, body: '' }));
    req.end(payload);
  });
}

/**
 * Reads a response as SSE until `last` (a final event name) and calls `onEvent(name)` per event;
 * resolves with the final event's name (or null when the stream ended without one).
 */
function readEvents(res, onEvent) {
  return new Promise((done) => {
    let pending = '';
    let final = null;
    res.setEncoding('utf8');
    res.on('data', (text) => {
      pending += text;
      let cut;
      while ((cut = pending.indexOf('\n\n')) >= 0) {
        const frame = pending.slice(0, cut);
        pending = pending.slice(cut + 2);
        const name = /^event: (.+)$/m.exec(frame)?.[1];
        if (!name) continue;
        onEvent(name);
        if (name === 'run.completed' || name === 'run.failed' || name === 'run.cancelled') final = name;
      }
    });
    res.on('end', () => done(final));
    res.on('error', () => done(final));
  });
}

/** One run on a Keel-shaped server: POST the run, open its events at the 202, read to the end. */
async function keelRun(target, user, threadId) {
  const started = now();
  const answer = await request(target.port, 'POST', `/api/v1/threads/${threadId}/runs`, user.headers, { agent_id: user.agentId, input: INPUT });
  if (answer.status !== 202) return { ok: false, why: `POST runs ${answer.status} ${answer.body.slice(0, 200)}` };
  const runId = JSON.parse(answer.body).id;
  let firstDelta = NaN;
  const final = await new Promise((done) => {
    const req = http.get({ host: '127.0.0.1', port: target.port, path: `/api/v1/runs/${runId}/events`, agent, headers: { ...user.headers, accept: 'text/event-stream' } }, (res) => {
      if (res.statusCode !== 200) {
        res.resume();
        return done(`GET events ${res.statusCode}`);
      }
      readEvents(res, (name) => {
        if (name === 'message.delta' && Number.isNaN(firstDelta)) firstDelta = now() - started;
      }).then(done);
    });
    req.on('error', (error) => done(String(error)));
  });
  const ms = now() - started;
  return final === 'run.completed' ? { ok: true, firstDelta, ms } : { ok: false, why: `ended with ${final}` };
}

/** The direct baseline: the upstream's streamed completion, timed to its first chunk and its end. */
function directRun(target) {
  const body = Buffer.from(JSON.stringify({ model: MODEL, messages: [{ role: 'user', content: INPUT }], stream: true, stream_options: { include_usage: true } }));
  return new Promise((done) => {
    const started = now();
    const req = http.request({ host: '127.0.0.1', port: target.port, method: 'POST', path: '/v1/chat/completions', agent, headers: { authorization: 'Bearer sk-bench', 'content-type': 'application/json', 'content-length': body.length } }, (res) => {
      let first = NaN;
      res.on('data', () => {
        if (Number.isNaN(first)) first = now() - started;
      });
      res.on('end', () => done({ ok: res.statusCode === 200, firstDelta: first, ms: now() - started }));
      res.on('error', () => done({ ok: false }));
    });
    req.on('error', () => done({ ok: false }));
    req.end(body);
  });
}

// ==================== Targets ====================

let nextPort = PORT_BASE + 2;
const serverOf = (checkout, name, child, extra = {}) => ({ name: `${name}${CHECKOUTS.length > 1 ? `@${checkout.label}` : ''}`, kind: name.startsWith('scaled') || name === 'embedded' ? 'keel' : name, pids: [child.pid], ...extra });

/** Users with credits, an agent each; `user.headers` signs requests. */
async function prepareUsers(port) {
  const admin = await addUpstreamModel(port, UPSTREAM, MODEL);
  const users = [];
  for (let i = 0; i < USERS; i++) {
    const email = `runner${i}@bench.test`;
    const created = await admin.call('POST', '/users', { email, password: PASSWORD, full_name: `Runner ${i}` });
    await addCredits(admin, created.id);
    const session = await signIn(port, email, PASSWORD);
    const agentRow = await session.call('POST', '/agents', { name: `bench agent ${i}`, model: MODEL, system_prompt: 'Answer briefly.' });
    users.push({ session, headers: { authorization: `Bearer ${session.token}` }, agentId: agentRow.id });
  }
  return users;
}

/** `scaled-N` (N workers) or `scaled-NxC` (N workers running C runs at once each); null otherwise. */
function scaledTarget(name) {
  const match = /^scaled-(\d+)(?:x(\d+))?$/.exec(name);
  if (!match || !Number(match[1])) return null;
  return { workers: Number(match[1]), runConcurrency: match[2] ? Number(match[2]) : undefined, family: match[2] ? `x${match[2]}` : '' };
}

async function startKeel(checkout, name) {
  const port = nextPort++;
  const options = { cwd: checkout.dir, nodeArgs: keelNodeArgs() };
  // Logins of many bench users from one address; the per-user active-run limit leaves room for them.
  const env = keelEnv(port, { DATA_DIR: `${resolve(OUT)}/data-${name}-${checkout.label}`, DATABASE_URL: '', RATE_LIMIT_LOGIN_PER_IP: '100000' });
  const tag = `${name}-${checkout.label}`;
  if (name === 'embedded') {
    const child = start(OUT, `keel-${tag}`, ['bin/keel.js', 'start'], env, options);
    await waitUp(port);
    return { ...serverOf(checkout, name, child), port, users: await prepareUsers(port) };
  }
  const scaled = scaledTarget(name);
  if (!scaled) throw new Error(`unknown target ${name} (embedded, scaled-1, scaled-2, scaled-2x8, …)`);
  const { workers } = scaled;
  // scaled-NxC: this target's workers run C runs at once each (RUN_CONCURRENCY), whatever KEEL_ENV says.
  if (scaled.runConcurrency) env.RUN_CONCURRENCY = String(scaled.runConcurrency);
  const databaseUrl = createDatabase(`keel_runs_bench_${process.pid}_${name.replace('-', '_')}_${checkout.label}`);
  const database = databaseUrl.slice(databaseUrl.lastIndexOf('/') + 1);
  Object.assign(env, {
    DATABASE_URL: databaseUrl,
    REDIS_URL,
    REDIS_KEY_PREFIX: `${process.env.BENCH_DB_PREFIX ?? ''}keel-runs-bench-${process.pid}-${tag}:`,
  });
  execFileSync(process.execPath, ['bin/keel.js', 'migrate'], { cwd: checkout.dir, env: { ...process.env, ...env }, stdio: 'ignore' });
  const api = start(OUT, `keel-${tag}-api`, ['bin/keel.js', 'api'], env, options);
  const workerPids = Array.from({ length: workers }, (_, i) => start(OUT, `keel-${tag}-worker${i + 1}`, ['bin/keel.js', 'worker'], env, options).pid);
  await waitUp(port);
  // The workers load the model catalog at start: the bench's model is added once they have.
  for (let i = 1; i <= workers; i++) await waitForLog(`${OUT}/keel-${tag}-worker${i}.log`, '"worker started"');
  const server = { ...serverOf(checkout, name, api), port, users: await prepareUsers(port), database, workerPids, slots: workers * Number(env.RUN_CONCURRENCY ?? 32) };
  server.pids.push(...workerPids);
  return server;
}

const newThread = async (user) => (await user.session.call('POST', '/threads', { title: 'bench' })).id;

// ==================== Measuring ====================

function record(round, target, clients, results, seconds, cpu) {
  const good = results.filter((r) => r.ok);
  const errors = results.length - good.length;
  const firsts = good.map((r) => r.firstDelta).filter(Number.isFinite).sort((a, b) => a - b);
  const totals = good.map((r) => r.ms).sort((a, b) => a - b);
  const row = {
    round,
    target: target.name,
    clients,
    rps: good.length / seconds,
    firstP50: percentile(firsts, 50) ?? NaN,
    firstP99: percentile(firsts, 99) ?? NaN,
    runP50: percentile(totals, 50) ?? NaN,
    runP99: percentile(totals, 99) ?? NaN,
    errors,
    cpuPerRun: target.pids.length ? cpu / Math.max(1, results.length) : NaN,
  };
  appendFileSync(RAW, `${[round, row.target, clients, fmt(row.rps, 1), fmt(row.firstP50, 3), fmt(row.firstP99, 3), fmt(row.runP50, 3), fmt(row.runP99, 3), errors, fmt(row.cpuPerRun, 3)].join('\t')}\n`);
  const why = results.find((r) => !r.ok)?.why;
  console.log(`${row.target.padEnd(16)} c${String(clients).padEnd(3)} ${fmt(row.rps, 0).padStart(6)} runs/s  first delta p50 ${fmt(row.firstP50, 2)} p99 ${fmt(row.firstP99, 2)} ms  run p50 ${fmt(row.runP50, 2)} p99 ${fmt(row.runP99, 2)} ms  errors ${errors}${why ? ` (${why})` : ''}  CPU ${fmt(row.cpuPerRun, 2)} ms/run`);
  return row;
}

const serverCpu = (target) => target.pids.reduce((sum, pid) => sum + cpuMs(pid), 0);

/** The backends of PostgreSQL serving `database` (Keel's pools). */
function backendsOf(database) {
  const out = execFileSync('psql', ['-w', PG_ADMIN_URL, '-Atc', `select pid from pg_stat_activity where datname = '${database}'`], { encoding: 'utf8' });
  return out.split('\n').filter(Boolean).map(Number);
}

// The process of the Redis at REDIS_URL (not just any redis-server on the machine).
let redisPid;
try {
  redisPid = Number(/process_id:(\d+)/.exec(execFileSync('redis-cli', ['-u', REDIS_URL, 'info', 'server'], { encoding: 'utf8' }))?.[1]) || undefined;
} catch {
  redisPid = undefined;
}

/** CPU ms so far of each part of a target: Keel's API (or only) process and its main thread, its workers, its PostgreSQL backends, Redis. */
function partsCpu(target) {
  const sum = (pids) => pids.reduce((total, pid) => total + cpuMs(pid), 0);
  // main: the API process's main thread alone (embedded, PGlite may run on a thread of its own).
  const parts = { api: cpuMs(target.pids[0]), main: mainThreadCpuMs(target.pids[0]) };
  if (target.workerPids) {
    parts.workers = sum(target.workerPids);
    // The workers' main threads alone: the rest is V8's compiler and GC threads and libuv's pool.
    parts.workersMain = target.workerPids.reduce((total, pid) => total + mainThreadCpuMs(pid), 0);
    parts.pg = sum(backendsOf(target.database));
    parts.redis = cpuMs(redisPid);
  }
  return parts;
}

/** The workers' event-loop counters, summed (lib.mjs loopCounters). */
function workerLoops(target) {
  const total = { wakeups: 0, syscalls: 0 };
  for (const pid of target.workerPids) {
    const counters = loopCounters(pid);
    total.wakeups += counters.wakeups;
    total.syscalls += counters.syscalls;
  }
  return total;
}

async function one(target, user) {
  if (target.kind === 'direct') return directRun(target);
  if (target.kind === 'bare-sse') return keelRun(target, { headers: {}, agentId: null }, '00000000-0000-0000-0000-000000000000');
  return keelRun(target, user, await newThread(user));
}

async function measureOne(round, target, count) {
  const user = target.users?.[0];
  for (let i = 0; i < 20; i++) await one(target, user); // warm-up
  const results = [];
  let cpu = 0;
  let seconds = 0;
  for (let i = 0; i < count; i++) {
    // The thread is made outside the timed part (and its CPU), as a client would have it already.
    const threadId = target.kind === 'keel' ? await newThread(user) : null;
    const cpuBefore = serverCpu(target);
    const started = now();
    results.push(target.kind === 'keel' ? await keelRun(target, user, threadId) : await one(target, user));
    seconds += (now() - started) / 1000;
    cpu += serverCpu(target) - cpuBefore;
  }
  return record(round, target, 1, results, seconds, cpu);
}

async function measureMany(round, target) {
  const threads = target.kind === 'keel' ? await Promise.all(Array.from({ length: CLIENTS }, (_, i) => newThread(target.users[i % target.users.length]))) : [];
  const loop = async (i, until, sink) => {
    const user = target.users?.[i % target.users.length];
    while (now() < until) {
      const result = target.kind === 'keel' ? await keelRun(target, user, threads[i]) : await one(target, user);
      sink?.push(result);
      if (!result.ok && target.kind === 'keel') await sleep(50); // a failing target is not hammered
    }
  };
  // Warm-up: every process of the target (each worker) compiles its hot code before it is measured.
  await Promise.all(Array.from({ length: CLIENTS }, (_, i) => loop(i, now() + WARMUP * 1000)));
  const results = [];
  const cpuBefore = serverCpu(target);
  const partsBefore = target.kind === 'keel' ? partsCpu(target) : null;
  const loopsBefore = target.workerPids ? workerLoops(target) : null;
  const started = now();
  await Promise.all(Array.from({ length: CLIENTS }, (_, i) => loop(i, started + DURATION * 1000, results)));
  const seconds = (now() - started) / 1000;
  const row = record(round, target, CLIENTS, results, seconds, serverCpu(target) - cpuBefore);
  if (partsBefore) {
    // Cores used by each part over the measurement, and its CPU per completed run.
    const after = partsCpu(target);
    const done = Math.max(1, results.filter((r) => r.ok).length);
    row.parts = Object.fromEntries(Object.keys(after).map((part) => [part, { cores: (after[part] - partsBefore[part]) / (seconds * 1000), msPerRun: (after[part] - partsBefore[part]) / done }]));
    console.log(`${' '.repeat(21)}cores used (CPU ms/run): ${Object.entries(row.parts).map(([part, v]) => `${part} ${fmt(v.cores, 2)} (${fmt(v.msPerRun, 2)})`).join(', ')}${target.workerPids ? ' — pg: backends of its database (those open at the end), redis: the whole server' : ''}`);
    if (loopsBefore) {
      const loops = workerLoops(target);
      row.workerLoops = { wakeups: (loops.wakeups - loopsBefore.wakeups) / done, syscalls: (loops.syscalls - loopsBefore.syscalls) / done };
      console.log(`${' '.repeat(21)}workers per completed run (all workers together): ${fmt(row.workerLoops.wakeups, 1)} event-loop wake-ups, ${fmt(row.workerLoops.syscalls, 1)} read/write syscalls`);
    }
  }
  return row;
}

// ==================== Run ====================

const load = [loadavg()];
const upstream = start(OUT, 'upstream', ['bench/fake-upstream.mjs'], { PORT: String(UPSTREAM_PORT), LATENCY_MS: String(MODEL_LATENCY_MS) });
await waitUp(UPSTREAM_PORT);
const bare = start(OUT, 'bare-sse', ['bench/baseline-sse-server.mjs'], { PORT: String(PORT_BASE + 1) });
await waitUp(PORT_BASE + 1);
const targets = [
  { name: 'direct', kind: 'direct', port: UPSTREAM_PORT, pids: [upstream.pid] },
  { name: 'bare-sse', kind: 'bare-sse', port: PORT_BASE + 1, pids: [bare.pid] },
];
const skipped = [];
for (const name of TARGETS) {
  for (const checkout of CHECKOUTS) {
    const target = await startKeel(checkout, name);
    // A target whose runs never stream (e.g. workers that do not run runs yet) is left out, with a note.
    const probe = await Promise.race([keelRun(target, target.users[0], await newThread(target.users[0])), sleep(20_000).then(() => ({ ok: false, why: 'no run.completed within 20 s' }))]);
    if (!probe.ok) {
      skipped.push(`${target.name}: ${probe.why}`);
      console.log(`skipping ${target.name}: ${probe.why}`);
      continue;
    }
    targets.push(target);
  }
}

const rows = [];
for (let round = 1; round <= ROUNDS; round++) {
  console.log(`--- round ${round}/${ROUNDS} (load ${loadavg().map((l) => l.toFixed(1)).join(' ')})`);
  load.push(loadavg());
  // The baselines first, then Keel's targets in an order reversed every other round: in a fixed
  // order, the Keel targets' CPU per run fell with their place in the round, whatever the build.
  const baselines = targets.filter((t) => t.kind !== 'keel');
  const keel = targets.filter((t) => t.kind === 'keel');
  const order = [...baselines, ...(round % 2 ? keel : keel.toReversed())];
  // N1=0 leaves c1 out (e.g. with a slow model, where only throughput is of interest).
  if (N1 > 0) for (const target of order) rows.push(await measureOne(round, target, N1));
  for (const target of order) rows.push(await measureMany(round, target));
}
load.push(loadavg());
await stop();

// ==================== Summary ====================

const pick = (target, clients) => rows.filter((r) => r.target === target && r.clients === clients);
const lines = [];
const out = (line = '') => lines.push(line);
out(`Run ${new Date().toISOString().slice(0, 16)}Z; ${cpus().length} cores (${cpus()[0]?.model ?? '?'}), ${Math.round(totalmem() / 2 ** 30)} GiB, Node ${process.version}; ROUNDS=${ROUNDS} N1=${N1} DURATION=${DURATION}s WARMUP=${WARMUP}s CLIENTS=${CLIENTS} USERS=${USERS}; checkouts ${CHECKOUTS.map((c) => `${c.label}=${c.dir}`).join(', ')}`);
out(`Load average (1 min) at start, each round, end: ${load.map((l) => l[0].toFixed(1)).join(', ')}`);
out(`Model: ${MODEL_LATENCY_MS ? `${MODEL_LATENCY_MS} ms before its first chunk (MODEL_LATENCY_MS)` : 'zero latency'}${Object.keys(KEEL_ENV).length ? `; KEEL_ENV ${process.env.KEEL_ENV}` : ''}`);
if (skipped.length) out(`Skipped: ${skipped.join('; ')}`);
out();
out(`Medians over the rounds. c1: POST /threads/{id}/runs → first message.delta at the SSE client (target p50 < 10 ms); c${CLIENTS}: completed runs/s (target ≥ 200 embedded), whole-run latency.`);
out();
out(`| target | c1 first delta p50 ms | c1 first delta p99 ms | c1 whole run p50 ms | c${CLIENTS} runs/s | c${CLIENTS} run p50 ms | c${CLIENTS} run p99 ms | server CPU ms/run (c1, c${CLIENTS}) | errors |`);
out('| --- | --- | --- | --- | --- | --- | --- | --- | --- |');
for (const target of targets) {
  const c1 = pick(target.name, 1);
  const cn = pick(target.name, CLIENTS);
  out(`| ${target.name} | ${fmt(median(c1.map((r) => r.firstP50)), 2)} | ${fmt(median(c1.map((r) => r.firstP99)), 2)} | ${fmt(median(c1.map((r) => r.runP50)), 2)} | ${fmt(median(cn.map((r) => r.rps)), 0)} | ${fmt(median(cn.map((r) => r.runP50)), 1)} | ${fmt(median(cn.map((r) => r.runP99)), 1)} | ${fmt(median(c1.map((r) => r.cpuPerRun)), 2)}, ${fmt(median(cn.map((r) => r.cpuPerRun)), 2)} | ${[...c1, ...cn].reduce((n, r) => n + r.errors, 0)} |`);
}
for (const target of targets) {
  const parts = pick(target.name, CLIENTS).map((r) => r.parts).filter(Boolean);
  if (!parts.length) continue;
  const names = Object.keys(parts[0]);
  if (target === targets.find((t) => pick(t.name, CLIENTS).some((r) => r.parts))) out(`\nc${CLIENTS}, cores used by each part (its CPU ms per completed run), medians: pg = the backends of the target's database, redis = the whole server (shared with anything else on the machine)\n`);
  out(`- ${target.name}: ${names.map((name) => `${name} ${fmt(median(parts.map((p) => p[name].cores)), 2)} (${fmt(median(parts.map((p) => p[name].msPerRun)), 2)})`).join(', ')}`);
}
// What bounds a scaled target's throughput: its run slots (workers × RUN_CONCURRENCY), the clients,
// or neither (then the CPU, or latency): a ratio means something only next to this.
const scaledTargets = targets.filter((target) => target.slots);
if (scaledTargets.length) {
  out(`\nRuns in flight at most: min(run slots = workers × RUN_CONCURRENCY, c${CLIENTS} clients); whole-run p50 at c1 ${N1 > 0 ? 'above' : 'not measured (N1=0)'}`);
  out();
  for (const target of scaledTargets) out(`- ${target.name}: ${target.slots} slots → ${target.slots < CLIENTS ? `bound by its slots (${target.slots} runs in flight)` : `bound by the ${CLIENTS} clients, or the CPU, before its slots`}`);
}
for (const checkout of CHECKOUTS) {
  const suffix = CHECKOUTS.length > 1 ? `@${checkout.label}` : '';
  const families = [...new Set(TARGETS.map(scaledTarget).filter(Boolean).map((scaled) => scaled.family))];
  for (const family of families) {
    const one = median(pick(`scaled-1${family}${suffix}`, CLIENTS).map((r) => r.rps));
    const two = median(pick(`scaled-2${family}${suffix}`, CLIENTS).map((r) => r.rps));
    if (Number.isFinite(one) && Number.isFinite(two)) out(`\nscaled${family}${suffix}: 2 workers / 1 worker at c${CLIENTS} = ${fmt(two / one, 2)}× (target ≥ 1.6×)`);
  }
}
writeFileSync(`${OUT}/summary.md`, `${lines.join('\n')}\n`);
console.log(`\n${lines.join('\n')}`);
agent.destroy();
process.exit(0);
