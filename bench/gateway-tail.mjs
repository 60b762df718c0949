/* global process, console, Buffer, performance */
// The gateway's tail at 1 client: N1 sequential `POST /v1/chat/completions` per target (STREAM=1:
// streamed, timed to the first chunk as bench/gateway.mjs times them; otherwise whole answers),
// with bench/tail-preload.mjs in Keel recording its garbage collections, database statements and
// each request's time in the server. Every request slower than the target's p50 + SLOW_MS is put
// down to what overlapped it in the server (a major or minor GC, a database statement — which — or
// nothing seen), so what makes the tail is named from in-process evidence, not from timing alone.
//   node bench/gateway-tail.mjs     (ROUNDS=2 N1=3000 SLOW_MS=1 TARGETS="embedded postgres")
// BASE_CHECKOUT=<dir> adds `<target>-base` from that checkout (built), interleaved in the rounds.
// BASE_KEEL_ENV="NAME=value ..." gives the `-base` servers settings of their own (an A/B of settings).
// KEEL_NODE_ARGS reaches Keel too (e.g. --trace-gc). Output: bench/out/gateway-tail/ (logs, events).
// Each target's measured calls also read the scheduler's times (/proc/…/schedstat): CPU and
// run-queue wait per call of Keel's threads, its main thread, the upstream, and PostgreSQL's backends.
import { execFileSync } from 'node:child_process';
import { mkdirSync, readFileSync, rmSync } from 'node:fs';
import http from 'node:http';
import { loadavg } from 'node:os';
import { resolve } from 'node:path';

import { addCredits, addUpstreamModel, createDatabase, keelEnv, keelNodeArgs, percentile, PG_ADMIN_URL, schedMs, sleep, start, stop, waitUp } from './lib.mjs';

const ROUNDS = Number(process.env.ROUNDS ?? 2);
const N1 = Number(process.env.N1 ?? 3000);
const SLOW_MS = Number(process.env.SLOW_MS ?? 1);
// Calls before each round's measured ones (connections, JIT): V8 keeps optimizing Keel's hot paths for some thousands of calls after start.
const WARMUP = Number(process.env.WARMUP ?? 300);
const TARGETS = (process.env.TARGETS ?? 'embedded postgres').split(/\s+/).filter(Boolean);
const BASE_CHECKOUT = process.env.BASE_CHECKOUT ?? '';
const OUT = resolve(process.env.OUT_DIR ?? 'bench/out/gateway-tail');
const PORT_BASE = Number(process.env.PORT_BASE ?? 8261);
const PRELOAD = resolve('bench/tail-preload.mjs');
const MODEL = 'bench-model';
const wall = () => (performance.timeOrigin + performance.now()) * 1000;

rmSync(OUT, { recursive: true, force: true });
mkdirSync(OUT, { recursive: true });

const STREAM = process.env.STREAM === '1';
const BODY = Buffer.from(JSON.stringify({ model: MODEL, messages: [{ role: 'user', content: 'Say hello.' }], max_tokens: 16, ...(STREAM ? { stream: true } : {}) }));

function once(port, headers, agent) {
  return new Promise((done) => {
    const started = wall();
    const request = http.request({ host: '127.0.0.1', port, path: '/v1/chat/completions', method: 'POST', agent, headers: { ...headers, 'content-type': 'application/json', 'content-length': BODY.length } }, (response) => {
      // `end`: what is timed (a stream's first chunk); `done`: the answer's last byte, which the server's own span ends before.
      let first;
      response.on('data', () => (first ??= wall()));
      response.on('end', () => {
        const done_ = wall();
        done({ ok: response.statusCode === 200, start: started, end: STREAM ? (first ?? done_) : done_, done: done_ });
      });
    });
    request.on('error', () => done({ ok: false, start: started, end: wall(), done: wall() }));
    request.end(BODY);
  });
}

const load = [loadavg()[0]];
const upstreamPort = PORT_BASE;
const UPSTREAM = `http://127.0.0.1:${upstreamPort}/v1`;
const upstream = start(OUT, 'upstream', ['bench/fake-upstream.mjs'], { PORT: String(upstreamPort) });
await waitUp(upstreamPort);
const targets = [{ name: 'direct', port: upstreamPort, headers: { authorization: 'Bearer sk-bench' }, child: upstream, samples: [], sched: [] }];

/** PostgreSQL's backends serving `database` (Keel's pool), by pid. */
const backends = (database) =>
  database
    ? execFileSync('psql', ['-w', PG_ADMIN_URL, '-Atc', `select pid from pg_stat_activity where datname = '${database}'`], { encoding: 'utf8' }).split('\n').filter(Boolean).map(Number)
    : [];
/** Scheduler times (ms) now: the target's process (all threads, main thread), the upstream's, its database backends'. */
const readSched = (target, pids) => {
  const keel = schedMs(target.child.pid);
  const up = schedMs(upstream.pid);
  const db = pids.map(schedMs).reduce((a, b) => ({ run: a.run + b.run, wait: a.wait + b.wait }), { run: 0, wait: 0 });
  return { run: keel.run, wait: keel.wait, mainRun: keel.main.run, mainWait: keel.main.wait, upRun: up.run, upWait: up.wait, dbRun: db.run, dbWait: db.wait };
};

let nextPort = PORT_BASE + 1;
for (const kind of TARGETS) {
  for (const [suffix, checkout] of [['', undefined], ...(BASE_CHECKOUT ? [['-base', BASE_CHECKOUT]] : [])]) {
    const name = `${kind}${suffix}`;
    const port = nextPort++;
    const dataDir = resolve(OUT, `data-${name}`);
    const tailFile = resolve(OUT, `events-${name}.tsv`);
    let env = { DATA_DIR: dataDir, DATABASE_URL: '', TAIL_FILE: tailFile };
    const base = { base: suffix === '-base' };
    let database;
    if (kind === 'postgres') {
      database = `${process.env.BENCH_DB_PREFIX ?? ''}keel_gwtail_${process.pid}_${name.replace('-', '_')}`;
      env = { ...env, DATABASE_URL: createDatabase(`keel_gwtail_${process.pid}_${name.replace('-', '_')}`) };
      execFileSync(process.execPath, ['bin/keel.js', 'migrate'], { env: { ...process.env, ...keelEnv(port, env, base) }, stdio: 'ignore', cwd: checkout });
    }
    const child = start(OUT, `keel-${name}`, ['bin/keel.js', kind === 'embedded' ? 'start' : 'api'], keelEnv(port, env, base), { cwd: checkout, nodeArgs: ['--import', PRELOAD, ...keelNodeArgs()] });
    await waitUp(port);
    const admin = await addUpstreamModel(port, UPSTREAM, MODEL);
    const { key } = await admin.call('POST', '/api-keys', { name: 'bench' });
    await addCredits(admin, (await admin.call('GET', '/users/me')).id);
    targets.push({ name, port, headers: { authorization: `Bearer ${key}` }, child, tailFile, database, samples: [], sched: [] });
  }
}

for (let round = 1; round <= ROUNDS; round++) {
  load.push(loadavg()[0]);
  for (const target of targets) {
    const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
    for (let i = 0; i < WARMUP; i++) await once(target.port, target.headers, agent);
    const first = target.samples.length;
    const pids = backends(target.database);
    const before = readSched(target, pids);
    for (let i = 0; i < N1; i++) {
      const sample = await once(target.port, target.headers, agent);
      if (sample.ok) target.samples.push(sample);
    }
    const after = readSched(target, pids);
    target.sched.push(Object.fromEntries(Object.keys(after).map((k) => [k, (after[k] - before[k]) / N1])));
    agent.destroy();
    const mine = target.samples.slice(first).map((s) => (s.end - s.start) / 1000).sort((a, b) => a - b);
    console.log(`round ${round} ${target.name} done: p50 ${percentile(mine, 50)?.toFixed(3) ?? '–'} p99 ${percentile(mine, 99)?.toFixed(3) ?? '–'} ms (${mine.length} answered)`);
  }
}
load.push(loadavg()[0]);
await Promise.race([stop(targets.filter((t) => t.tailFile).map((t) => t.child)), sleep(20_000)]);

// ==================== Analysis ====================

const BUCKETS = [0.5, 0.75, 1, 1.5, 2, 3, 5, 10, Infinity];
const histogram = (ms) => BUCKETS.map((edge, i) => ms.filter((v) => v >= (BUCKETS[i - 1] ?? 0) && v < edge).length);
const ms = (t) => t.samples.map((s) => (s.end - s.start) / 1000).sort((a, b) => a - b);
console.log(`\n${STREAM ? 'Streamed, timed to the first chunk' : 'Whole answers'}. Load average (1 min): ${load.map((l) => l.toFixed(1)).join(', ')}; ${ROUNDS} rounds × ${N1} requests; slow = p50 + ${SLOW_MS} ms`);
// Stalls: calls of 5 ms or more, and of 10 ms or more, per 1000 calls (a 128-row flush on PGlite's thread is ~10 ms).
const perThousand = (all, floor) => ((all.filter((v) => v >= floor).length * 1000) / Math.max(1, all.length)).toFixed(2);
console.log(`\n| target | p50 ms | p90 | p99 | p99.9 | ${BUCKETS.map((b, i) => `${BUCKETS[i - 1] ?? 0}–${b === Infinity ? '' : b}`).join(' | ')} | ≥5 ms /1000 | ≥10 ms /1000 |`);
console.log(`| --- | --- | --- | --- | --- | ${BUCKETS.map(() => '---').join(' | ')} | --- | --- |`);
for (const target of targets) {
  const all = ms(target);
  console.log(`| ${target.name} | ${[50, 90, 99, 99.9].map((q) => percentile(all, q).toFixed(3)).join(' | ')} | ${histogram(all).join(' | ')} | ${perThousand(all, 5)} | ${perThousand(all, 10)} |`);
}

// Per call, the rounds' medians: CPU and run-queue wait (µs) of the target's process (direct: the
// upstream's), its main thread, the upstream's (behind Keel), PostgreSQL's backends.
const mid = (values) => values.sort((a, b) => a - b)[Math.floor(values.length / 2)];
console.log('\nPer call, µs, median of the rounds (run = on a CPU, wait = runnable, waiting for one):');
console.log('| target | process run / wait | main thread run / wait | upstream run / wait | PostgreSQL backends run / wait |');
console.log('| --- | --- | --- | --- | --- |');
for (const target of targets) {
  const m = (k) => (mid(target.sched.map((s) => s[k])) * 1000).toFixed(0);
  console.log(`| ${target.name} | ${m('run')} / ${m('wait')} | ${target.tailFile ? `${m('mainRun')} / ${m('mainWait')}` : '–'} | ${target.tailFile ? `${m('upRun')} / ${m('upWait')}` : '–'} | ${target.database ? `${m('dbRun')} / ${m('dbWait')}` : '–'} |`);
}

for (const target of targets.filter((t) => t.tailFile)) {
  let events;
  try {
    events = readFileSync(target.tailFile, 'utf8').trim().split('\n').map((line) => line.split('\t'));
  } catch {
    console.log(`\n${target.name}: no events file`);
    continue;
  }
  const gcs = events.filter((e) => e[0] === 'gc').map(([, s, e, kind]) => ({ s: +s, e: +e, kind }));
  const dbs = events.filter((e) => e[0] === 'db').map(([, s, e, text]) => ({ s: +s, e: +e, text }));
  const all = ms(target);
  const threshold = percentile(all, 50) + SLOW_MS;
  const slow = target.samples.filter((s) => (s.end - s.start) / 1000 >= threshold);
  const causes = new Map();
  const note = (cause, sample) => {
    const entry = causes.get(cause) ?? { n: 0, extra: 0 };
    entry.n++;
    entry.extra += (sample.end - sample.start) / 1000 - percentile(all, 50);
    causes.set(cause, entry);
  };
  // Statements a request runs itself (auth, a hold) are in every request; "other" statements are those
  // whose span overlaps a slow request's but began before it or are not the request's own kind.
  for (const sample of slow) {
    const overlaps = (x) => x.s < sample.end && x.e > sample.start;
    const gc = gcs.filter(overlaps);
    const db = dbs.filter(overlaps);
    const parts = [];
    for (const g of gc) parts.push(`gc ${g.kind} ${((g.e - g.s) / 1000).toFixed(1)}ms`);
    const texts = [...new Set(db.map((d) => d.text.replace(/\$\d+/g, '$').slice(0, 40)))];
    if (texts.length) parts.push(`db: ${texts.join(' + ')}`);
    note(parts.length ? parts.map((p) => p.replace(/ [\d.]+ms$/, '')).join(' & ') : 'nothing seen', sample);
  }
  const loop = events.find((e) => e[0] === 'loop');
  const gcSummary = ['minor', 'major', 'incremental'].map((kind) => {
    const of = gcs.filter((g) => g.kind === kind).map((g) => (g.e - g.s) / 1000).sort((a, b) => a - b);
    return `${kind} ${of.length} (p50 ${(percentile(of, 50) ?? 0).toFixed(2)}, max ${(of.at(-1) ?? 0).toFixed(2)} ms)`;
  });
  const perCall = dbs.length / Math.max(1, target.samples.length);
  console.log(`\n#### ${target.name}: ${slow.length} slow requests (≥ ${threshold.toFixed(2)} ms) of ${target.samples.length}`);
  console.log(`GCs: ${gcSummary.join('; ')}; statements ${dbs.length} (${perCall.toFixed(2)} per request); event loop delay ${loop ? loop.slice(1).join(' samples, ') : '?'}`);
  console.log('| overlapping in the server | slow requests | mean extra ms |');
  console.log('| --- | --- | --- |');
  for (const [cause, { n, extra }] of [...causes].sort((a, b) => b[1].n - a[1].n).slice(0, 12)) console.log(`| ${cause} | ${n} | ${(extra / n).toFixed(2)} |`);
  // Where a request's time went, from the client's and the server's clocks (one machine, one clock):
  // before the server saw it (the client, the kernel, or Keel's event loop busy with something
  // else), in the server (request event → response finished), and after (the kernel, the client).
  const spans = events.filter((e) => e[0] === 'req').map(([, s, e]) => ({ s: +s, e: +e })).sort((a, b) => a.s - b.s);
  const ups = events.filter((e) => e[0] === 'up').map(([, s, e, , busy]) => ({ s: +s, e: +e, busy: +busy })).sort((a, b) => a.s - b.s);
  const split = (sample) => {
    const span = spans.find((x) => x.s >= sample.start && x.e <= sample.done);
    if (!span) return undefined;
    const up = ups.find((x) => x.s >= span.s && x.e <= span.e);
    const upstreamMs = up ? up.e - up.s : 0;
    return [span.s - sample.start, span.e - span.s - upstreamMs, upstreamMs, up ? up.busy : 0, sample.done - span.e].map((us) => us / 1000);
  };
  // Each call's parts, found once (a search through the spans per call) for both tables below.
  const parts = new Map(target.samples.map((sample) => [sample, split(sample)]));
  const quantile = (values, q) => percentile(values.sort((a, b) => a - b), q)?.toFixed(2) ?? '–';
  const medians = (samples) => {
    const found = samples.map((sample) => parts.get(sample)).filter(Boolean);
    return [0, 1, 2, 3, 4].map((i) => quantile(found.map((p) => p[i]), 50)).join(' / ');
  };
  console.log(`\nbefore the server / in the server without the upstream / the upstream call / this thread busy during it / after, medians ms: all ${medians(target.samples)}; slow ${medians(slow)}`);
  // Every call (not only the slow ones) by what overlapped it in the server: which part of the call
  // grows when a statement or a GC runs beside it (stop 31: a flush lengthens the upstream call, whose
  // wake-ups wait for a core, and nothing else).
  const groups = new Map();
  for (const [sample, part] of parts) {
    if (!part) continue;
    const overlaps = (x) => x.s < sample.end && x.e > sample.start;
    const key = [dbs.some(overlaps) && 'a statement', gcs.some(overlaps) && 'a GC'].filter(Boolean).join(' & ') || 'nothing';
    const group = groups.get(key) ?? { server: [], upstream: [] };
    group.server.push(part[1] + part[2]);
    group.upstream.push(part[2]);
    groups.set(key, group);
  }
  console.log('\n| calls overlapping | calls | in the server p50 / p99 ms | the upstream call p50 / p99 ms |');
  console.log('| --- | --- | --- | --- |');
  for (const [key, { server, upstream }] of [...groups].sort((a, b) => b[1].server.length - a[1].server.length)) {
    console.log(`| ${key} | ${server.length} | ${quantile(server, 50)} / ${quantile(server, 99)} | ${quantile(upstream, 50)} / ${quantile(upstream, 99)} |`);
  }
}
process.exit(0);
