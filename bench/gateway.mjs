/* global process, console, Buffer */
// The gateway benchmark: what Keel's /v1/chat/completions adds over calling a zero-latency
// OpenAI-compatible upstream directly, with @portkey-ai/gateway as a peer, in one run.
//   node bench/gateway.mjs            (ROUNDS=3 N1=2000 DURATION=5 CLIENTS="16 64" TARGETS="embedded postgres portkey")
// Every round measures, interleaved, each target against the same upstream (bench/fake-upstream.mjs):
//   direct   the upstream itself (the baseline)
//   embedded Keel `start` (PGlite), API-key auth, a provider record + model added through the API
//   postgres Keel `api` on PostgreSQL (PG_ADMIN_URL; a database of its own, dropped at the end)
//   portkey  @portkey-ai/gateway (x-portkey-provider: openai, x-portkey-custom-host: the upstream)
//   bare-proxy  bench/bare-proxy.mjs: bare Fastify passing the call to the upstream with undici (as
//            Keel does), nothing else — the floor of a two-hop gateway on this machine
// in two modes — non-stream (latency = whole answer) and stream with include_usage (latency = time
// to the first body chunk), and the same with two function tools in each call (MODES "tools stream-tools") — at 1 client (N1 sequential requests: p50/p99; added = target − direct,
// same round) and at each CLIENTS count (closed loop for DURATION s: req/s, p50, p99). Server CPU
// per request is read from /proc. Raw lines: bench/out/gateway/raw.tsv; summary: summary.md.
// The c1 added p99 from blocks (target's N1 calls, then direct's) compares tails taken at different
// moments of a loaded machine; each round also interleaves N1 target calls with N1 direct ones
// (INTERLEAVED=0 leaves it out): its p99 − direct p99, and p99 − direct p50 (see bench/README.md).
import { execFileSync } from 'node:child_process';
import { appendFileSync, mkdirSync, rmSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import { cpus, loadavg, totalmem } from 'node:os';
import { resolve } from 'node:path';

import { addCredits, addUpstreamModel, cpuMs, createDatabase, fmt, keelEnv, keelNodeArgs, mainThreadCpuMs, median, now, percentile, settle, sleep, start, stop, waitUp } from './lib.mjs';

const ROUNDS = Number(process.env.ROUNDS ?? 3);
const N1 = Number(process.env.N1 ?? 2000);
const DURATION = Number(process.env.DURATION ?? 5);
const CLIENTS = (process.env.CLIENTS ?? '16 64').split(/\s+/).filter(Boolean).map(Number);
const MODES = (process.env.MODES ?? 'nonstream stream').split(/\s+/).filter(Boolean);
const TARGETS = (process.env.TARGETS ?? 'embedded postgres portkey').split(/\s+/).filter(Boolean);
const INTERLEAVED = process.env.INTERLEAVED !== '0';
// A/B in one run: BASE_CHECKOUT=<another checkout, built> adds `embedded-base` / `postgres-base`, the
// same setups from that checkout, measured in the same rounds (e.g. the base commit via git archive).
const BASE_CHECKOUT = process.env.BASE_CHECKOUT ?? '';
// KEEL_ENV="NAME=value ..." adds settings to every Keel server (e.g. BILLING_ENABLED=false);
// BASE_KEEL_ENV to the `-base` servers only (an A/B of settings: BASE_CHECKOUT a copy of this tree).
// Keel's servers get the node flags of their checkout's `npm start`, then KEEL_NODE_ARGS, e.g.
// KEEL_NODE_ARGS="--cpu-prof --cpu-prof-dir=/tmp/prof" (NODE_OPTIONS refuses --cpu-prof).
// WARMUP (default 5000): calls each target serves before the first round.
// OUT_DIR and PORT_BASE (ports PORT_BASE..+6) let another benchmark run beside this one.
const OUT = process.env.OUT_DIR ?? 'bench/out/gateway';
const PORT_BASE = Number(process.env.PORT_BASE ?? 8201);
const PORTS = { upstream: PORT_BASE, embedded: PORT_BASE + 1, postgres: PORT_BASE + 2, portkey: PORT_BASE + 3, 'embedded-base': PORT_BASE + 4, 'postgres-base': PORT_BASE + 5, 'bare-proxy': PORT_BASE + 6 };
const UPSTREAM = `http://127.0.0.1:${PORTS.upstream}/v1`;
const MODEL = 'bench-model';

rmSync(OUT, { recursive: true, force: true });
mkdirSync(OUT, { recursive: true });
const RAW = `${OUT}/raw.tsv`;
writeFileSync(RAW, '');

/** Adds the upstream as a provider and model (as the superuser), gives the superuser credits, and returns an API key of theirs. */
async function configureKeel(port) {
  const admin = await addUpstreamModel(port, UPSTREAM, MODEL);
  const { key } = await admin.call('POST', '/api-keys', { name: 'bench' });
  // Billing is on (BILLING_ENABLED): every call holds its worst case and settles, so the user needs credits.
  const me = await admin.call('GET', '/users/me');
  await addCredits(admin, me.id);
  return key;
}

// ==================== Load ====================

const HELLO = { model: MODEL, messages: [{ role: 'user', content: 'Say hello.' }], max_tokens: 16 };
// The `tools` modes send what an agent framework sends: the call's function tools (the upstream answers in text either way).
const TOOLS = [
  { type: 'function', function: { name: 'get_weather', description: 'The weather in a city', parameters: { type: 'object', properties: { city: { type: 'string' }, unit: { type: 'string', enum: ['celsius', 'fahrenheit'] } }, required: ['city'] } } },
  { type: 'function', function: { name: 'search_docs', description: 'Search the documentation', parameters: { type: 'object', properties: { query: { type: 'string' }, limit: { type: 'integer' } }, required: ['query'] } } },
];
const STREAMED = { stream: true, stream_options: { include_usage: true } };
const BODIES = {
  nonstream: Buffer.from(JSON.stringify(HELLO)),
  stream: Buffer.from(JSON.stringify({ ...HELLO, ...STREAMED })),
  tools: Buffer.from(JSON.stringify({ ...HELLO, tools: TOOLS })),
  'stream-tools': Buffer.from(JSON.stringify({ ...HELLO, ...STREAMED, tools: TOOLS })),
};
const streams = (mode) => mode.startsWith('stream');

/** One request; resolves with the latency that counts (whole answer, or first chunk when streaming). */
function once(target, mode, agent) {
  const body = BODIES[mode];
  return new Promise((resolve) => {
    const started = now();
    const request = http.request(
      {
        host: '127.0.0.1',
        port: target.port,
        path: target.path,
        method: 'POST',
        agent,
        headers: { ...target.headers, 'content-type': 'application/json', 'content-length': body.length },
      },
      (response) => {
        let first = null;
        response.on('data', () => {
          first ??= now();
        });
        response.on('end', () => {
          const end = now();
          resolve({ ok: response.statusCode === 200, ms: streams(mode) ? (first ?? end) - started : end - started });
        });
        response.on('error', () => resolve({ ok: false, ms: now() - started }));
      },
    );
    request.on('error', () => resolve({ ok: false, ms: now() - started }));
    request.end(body);
  });
}

async function measure(target, mode, clients) {
  const agent = new http.Agent({ keepAlive: true, maxSockets: clients });
  const latencies = [];
  let errors = 0;
  // Warm-up: connections, JIT, caches.
  const warm = clients === 1 ? 200 : clients * 10;
  await Promise.all(Array.from({ length: clients }, async () => {
    for (let i = 0; i < warm / clients; i++) await once(target, mode, agent);
  }));
  const cpuBefore = cpuMs(target.pid);
  const mainBefore = mainThreadCpuMs(target.pid);
  const started = now();
  if (clients === 1) {
    for (let i = 0; i < N1; i++) {
      const { ok, ms } = await once(target, mode, agent);
      if (ok) latencies.push(ms);
      else errors++;
    }
  } else {
    const deadline = started + DURATION * 1000;
    await Promise.all(Array.from({ length: clients }, async () => {
      while (now() < deadline) {
        const { ok, ms } = await once(target, mode, agent);
        if (ok) latencies.push(ms);
        else errors++;
      }
    }));
  }
  const seconds = (now() - started) / 1000;
  const cpuPerRequest = target.pid ? ((cpuMs(target.pid) - cpuBefore) * 1000) / Math.max(1, latencies.length + errors) : NaN;
  // The main thread's alone (its JavaScript): embedded, PGlite may run on a thread of its own.
  const mainPerRequest = target.pid ? ((mainThreadCpuMs(target.pid) - mainBefore) * 1000) / Math.max(1, latencies.length + errors) : NaN;
  agent.destroy();
  latencies.sort((a, b) => a - b);
  const row = {
    target: target.name,
    mode,
    clients,
    rps: (latencies.length + errors) / seconds,
    p50: percentile(latencies, 50) ?? NaN,
    p99: percentile(latencies, 99) ?? NaN,
    errors,
    cpu_us: cpuPerRequest,
  };
  appendFileSync(RAW, `${[row.target, row.mode, row.clients, row.rps.toFixed(1), row.p50.toFixed(3), row.p99.toFixed(3), row.errors, row.cpu_us.toFixed(1)].join('\t')}\n`);
  console.log(`${row.target.padEnd(13)} ${mode.padEnd(9)} c${String(clients).padEnd(3)} ${row.rps.toFixed(0).padStart(6)} req/s  p50 ${row.p50.toFixed(3)} ms  p99 ${row.p99.toFixed(3)} ms  errors ${errors}  server CPU ${row.cpu_us.toFixed(0)} µs/req (main thread ${fmt(mainPerRequest, 0)})`);
  return row;
}

/**
 * c1, interleaved with direct: N1 pairs of sequential calls (direct then target, the order swapped
 * every pair), so that both samples see the same moments of the machine. Returns the target's and
 * direct's p50/p99 from the same window.
 */
async function measureInterleaved(target, direct, mode) {
  const agents = [new http.Agent({ keepAlive: true, maxSockets: 1 }), new http.Agent({ keepAlive: true, maxSockets: 1 })];
  for (let i = 0; i < 100; i++) {
    await once(direct, mode, agents[0]);
    await once(target, mode, agents[1]);
  }
  const [d, t] = [[], []];
  let errors = 0;
  for (let i = 0; i < N1; i++) {
    const pair = i % 2 ? [[target, agents[1], t], [direct, agents[0], d]] : [[direct, agents[0], d], [target, agents[1], t]];
    for (const [who, agent, latencies] of pair) {
      const { ok, ms } = await once(who, mode, agent);
      if (ok) latencies.push(ms);
      else errors++;
    }
  }
  for (const agent of agents) agent.destroy();
  d.sort((a, b) => a - b);
  t.sort((a, b) => a - b);
  const row = {
    target: target.name,
    mode,
    p50: percentile(t, 50) ?? NaN,
    p99: percentile(t, 99) ?? NaN,
    direct_p50: percentile(d, 50) ?? NaN,
    direct_p99: percentile(d, 99) ?? NaN,
    errors,
  };
  appendFileSync(RAW, `${[row.target, mode, '1i', '', row.p50.toFixed(3), row.p99.toFixed(3), errors, '', row.direct_p50.toFixed(3), row.direct_p99.toFixed(3)].join('\t')}\n`);
  console.log(`${row.target.padEnd(13)} ${mode.padEnd(9)} c1 interleaved  p50 ${row.p50.toFixed(3)} ms  p99 ${row.p99.toFixed(3)} ms  (direct p50 ${row.direct_p50.toFixed(3)}, p99 ${row.direct_p99.toFixed(3)})  errors ${errors}`);
  return row;
}

// ==================== Run ====================

const load = [loadavg()];
const upstream = start(OUT, 'upstream', ['bench/fake-upstream.mjs'], { PORT: String(PORTS.upstream) });
await waitUp(PORTS.upstream);
const targets = [{ name: 'direct', port: PORTS.upstream, path: '/v1/chat/completions', headers: { authorization: 'Bearer sk-bench' }, pid: upstream.pid }];

/** Keel embedded (`start`, PGlite) or on PostgreSQL (`api`, a database of its own) from `checkout`. */
async function startKeel(name, kind, checkout) {
  const base = name.endsWith('-base');
  const port = PORTS[name];
  // Absolute (the base checkout runs in its own directory), whether OUT_DIR is relative or not.
  const dataDir = resolve(OUT, `data-${name}`);
  let env;
  if (kind === 'embedded') env = keelEnv(port, { DATA_DIR: dataDir, DATABASE_URL: '' }, { base });
  else {
    // Dropped at exit by lib.mjs.
    env = keelEnv(port, { DATA_DIR: dataDir, DATABASE_URL: createDatabase(`keel_gateway_bench_${process.pid}_${name.replace('-', '_')}`) }, { base });
    execFileSync(process.execPath, ['bin/keel.js', 'migrate'], { env: { ...process.env, ...env }, stdio: 'ignore', cwd: checkout });
  }
  const child = start(OUT, `keel-${name}`, ['bin/keel.js', kind === 'embedded' ? 'start' : 'api'], env, { cwd: checkout, nodeArgs: keelNodeArgs() });
  await waitUp(port);
  const key = await configureKeel(port);
  targets.push({ name, port, path: '/v1/chat/completions', headers: { authorization: `Bearer ${key}` }, pid: child.pid });
}
for (const kind of ['embedded', 'postgres']) {
  if (!TARGETS.includes(kind)) continue;
  await startKeel(kind, kind, undefined);
  if (BASE_CHECKOUT) await startKeel(`${kind}-base`, kind, BASE_CHECKOUT);
}
if (TARGETS.includes('portkey')) {
  const child = start(OUT, 'portkey', ['node_modules/@portkey-ai/gateway/build/start-server.js', `--port=${PORTS.portkey}`], {});
  await waitUp(PORTS.portkey, '/');
  targets.push({
    name: 'portkey',
    port: PORTS.portkey,
    path: '/v1/chat/completions',
    headers: { authorization: 'Bearer sk-bench', 'x-portkey-provider': 'openai', 'x-portkey-custom-host': UPSTREAM },
    pid: child.pid,
    // Its streamed answers fail on Node 20 (every provider: `TypeError: immutable` appending a
    // header to the upstream fetch Response), so it is measured without streaming.
    modes: ['nonstream', 'tools'],
  });
}

if (TARGETS.includes('bare-proxy')) {
  const child = start(OUT, 'bare-proxy', ['bench/bare-proxy.mjs'], { PORT: String(PORTS['bare-proxy']), UPSTREAM });
  await waitUp(PORTS['bare-proxy']);
  targets.push({ name: 'bare-proxy', port: PORTS['bare-proxy'], path: '/v1/chat/completions', headers: {}, pid: child.pid });
}

const inMode = (mode) => targets.filter((t) => !t.modes || t.modes.includes(mode));

// Before the first round, every target serves WARMUP calls (16 at a time): V8 keeps optimizing a
// server's hot paths for some thousands of calls after it starts, and a first round measured before
// that (bench/RESULTS.md, 2026-12-04, stop 31) is the JIT's, not the server's steady state.
const WARMUP = Number(process.env.WARMUP ?? 5000);
for (const mode of MODES) {
  for (const target of inMode(mode)) {
    const agent = new http.Agent({ keepAlive: true, maxSockets: 16 });
    await Promise.all(Array.from({ length: 16 }, async () => {
      for (let i = 0; i < WARMUP / 16; i++) await once(target, mode, agent);
    }));
    agent.destroy();
  }
}

const rows = [];
const interleaved = [];
for (let round = 1; round <= ROUNDS; round++) {
  console.log(`--- round ${round}/${ROUNDS} (load ${loadavg().map((l) => l.toFixed(1)).join(' ')})`);
  load.push(loadavg());
  for (const mode of MODES) {
    for (const clients of [1, ...CLIENTS]) {
      // Direct first, then the servers in an order reversed every other round (each follows another alike).
      const [direct, ...servers] = inMode(mode);
      for (const target of [direct, ...(round % 2 ? servers : servers.toReversed())]) {
        // Each target on a quiet machine: what the one before left running (an embedded server's
        // PGlite flushing a burst's usage rows, PostgreSQL's autovacuum) ran during the next one's
        // measurement, and the order of the rounds put PostgreSQL's non-base server after it more
        // often than its `-base` (a 14 % gap between two servers of the same build, stops 50-52).
        await settle();
        rows.push({ round, ...(await measure(target, mode, clients)) });
      }
    }
    if (!INTERLEAVED) continue;
    // Alternate the targets' order round by round (this phase runs each target for a while).
    const others = inMode(mode).filter((t) => t.name !== 'direct');
    for (const target of round % 2 ? others : others.toReversed()) {
      await settle();
      interleaved.push({ round, ...(await measureInterleaved(target, targets[0], mode)) });
    }
  }
}
load.push(loadavg());

// ==================== Summary ====================

const pick = (target, mode, clients) => rows.filter((r) => r.target === target && r.mode === mode && r.clients === clients);
const lines = [];
const out = (line = '') => lines.push(line);
out(`Run ${new Date().toISOString().slice(0, 16)}Z; ${cpus().length} cores (${cpus()[0]?.model ?? '?'}), ${Math.round(totalmem() / 2 ** 30)} GiB, Node ${process.version}; ROUNDS=${ROUNDS} N1=${N1} DURATION=${DURATION}s`);
out(`Load average (1 min) at start, each round, end: ${load.map((l) => l[0].toFixed(1)).join(', ')}`);
out();
out('Medians over the rounds; "added" = target − direct in the same round (then the median). Stream latency = time to the first chunk.');
if (INTERLEAVED) {
  out('"interleaved": N1 target calls alternating with N1 direct calls, same window: added p99 = p99 − direct p99, and p99 − direct p50 (all of the target\'s tail counted as added).');
}
out();
for (const mode of MODES) {
  out(`### ${streams(mode) ? 'Stream (time to first chunk)' : 'Non-stream (whole answer)'}${mode.endsWith('tools') ? ', with tools' : ''}`);
  out();
  const extra = INTERLEAVED ? ' interleaved: added p50 ms | added p99 ms | p99 − direct p50 ms |' : '';
  out(`| target | c1 p50 ms | c1 p99 ms | added p50 ms | added p99 ms |${extra} ${CLIENTS.map((c) => `c${c} req/s | c${c} p50 ms | c${c} p99 ms`).join(' | ')} | server CPU µs/req (c1, ${CLIENTS.map((c) => `c${c}`).join(', ')}) | errors |`);
  out(`| --- | --- | --- | --- | --- |${INTERLEAVED ? ' --- | --- | --- |' : ''} ${CLIENTS.map(() => '--- | --- | ---').join(' | ')} | --- | --- |`);
  for (const target of targets.filter((t) => !t.modes || t.modes.includes(mode))) {
    const one = pick(target.name, mode, 1);
    const added = (p) => median(one.map((r) => r[p] - pick('direct', mode, 1).find((d) => d.round === r.round)[p]));
    const cells = [fmt(median(one.map((r) => r.p50)), 3), fmt(median(one.map((r) => r.p99)), 3), target.name === 'direct' ? '–' : fmt(added('p50'), 3), target.name === 'direct' ? '–' : fmt(added('p99'), 3)];
    if (INTERLEAVED) {
      const mine = interleaved.filter((r) => r.target === target.name && r.mode === mode);
      const diff = (f) => (target.name === 'direct' ? '–' : fmt(median(mine.map(f)), 3));
      cells.push(diff((r) => r.p50 - r.direct_p50), diff((r) => r.p99 - r.direct_p99), diff((r) => r.p99 - r.direct_p50));
    }
    for (const c of CLIENTS) {
      const many = pick(target.name, mode, c);
      cells.push(fmt(median(many.map((r) => r.rps)), 0), fmt(median(many.map((r) => r.p50))), fmt(median(many.map((r) => r.p99))));
    }
    cells.push([1, ...CLIENTS].map((c) => fmt(median(pick(target.name, mode, c).map((r) => r.cpu_us)), 0)).join(', '));
    cells.push(String(rows.filter((r) => r.target === target.name && r.mode === mode).reduce((n, r) => n + r.errors, 0)));
    out(`| ${target.name} | ${cells.join(' | ')} |`);
  }
  if (!streams(mode) && targets.some((t) => t.name === 'portkey')) {
    const last = CLIENTS.at(-1);
    const portkey = median(pick('portkey', mode, last).map((r) => r.rps));
    for (const name of ['embedded', 'postgres', 'embedded-base', 'postgres-base']) {
      if (!targets.some((t) => t.name === name)) continue;
      out();
      out(`${name} / portkey at c${last}: ${fmt(median(pick(name, mode, last).map((r) => r.rps)) / portkey, 2)}×`);
    }
  }
  out();
}
writeFileSync(`${OUT}/summary.md`, `${lines.join('\n')}\n`);
console.log(`\n${lines.join('\n')}`);
// The servers write usage and give credit back on the way out: wait for them (15 s at most), then the
// exit handler drops the databases.
await Promise.race([stop(), sleep(15_000)]);
process.exit(0);
