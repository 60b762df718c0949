/* global process, console, Buffer */
// The embeddings benchmark: what one large /v1/embeddings call costs Keel, and how long it holds
// the event loop that answers everyone else's requests meanwhile.
//   node bench/embeddings.mjs   (ROUNDS=3 INPUTS=2048 DIMENSIONS=3072 FORMATS="base64 float")
// A zero-latency upstream (bench/fake-upstream.mjs, answers prepared once) returns INPUTS vectors
// of DIMENSIONS float32 values, as JSON numbers or as base64 when asked (OpenAI does both). Keel
// (`start`, embedded, billing on) serves the call to a client asking for FORMATS (the openai SDK
// asks for base64 unless told otherwise) while a prober asks GET /health one request after another:
// its slowest answer during the call is how long another user would have waited; `direct` is the
// same call to the upstream itself (the floor). Per round and
// format: the call's latency, the probes' max and p99, Keel's CPU (main thread and whole process)
// and its RSS after the call. BASE_CHECKOUT=<another checkout, built> adds `embedded-base`, the same
// from that checkout, in the same rounds. Raw lines: bench/out/embeddings/raw.tsv.
import { appendFileSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import { cpus, loadavg, tmpdir } from 'node:os';
import { join, resolve } from 'node:path';

import { addCredits, cpuMs, fmt, keelEnv, keelNodeArgs, mainThreadCpuMs, median, now, percentile, rssMb, signIn, sleep, start, stop, SUPERUSER, waitUp } from './lib.mjs';

const ROUNDS = Number(process.env.ROUNDS ?? 3);
const INPUTS = Number(process.env.INPUTS ?? 2048);
const DIMENSIONS = Number(process.env.DIMENSIONS ?? 3072);
const FORMATS = (process.env.FORMATS ?? 'base64 float').split(/\s+/).filter(Boolean);
const BASE_CHECKOUT = process.env.BASE_CHECKOUT ?? '';
const OUT = process.env.OUT_DIR ?? 'bench/out/embeddings';
const PORT_BASE = Number(process.env.PORT_BASE ?? 8301);
const MODEL = 'bench-embed';

rmSync(OUT, { recursive: true, force: true });
mkdirSync(OUT, { recursive: true });
const RAW = `${OUT}/raw.tsv`;
writeFileSync(RAW, 'round\ttarget\tformat\tcall_ms\tprobe_max_ms\tprobe_p99_ms\tprobes\tmain_cpu_ms\tcpu_ms\trss_mb\n');

const agent = new http.Agent({ keepAlive: true });

/** One request; the answer's body is counted, never parsed (a 120 MB answer parsed here would stall the prober too). */
function request(port, method, path, headers, body) {
  return new Promise((resolvePromise, reject) => {
    const req = http.request({ host: '127.0.0.1', port, method, path, headers, agent }, (res) => {
      let bytes = 0;
      res.on('data', (chunk) => (bytes += chunk.length));
      res.on('end', () => resolvePromise({ status: res.statusCode, bytes }));
      res.on('error', reject);
    });
    req.on('error', reject);
    req.end(body);
  });
}

/** GET /health one after another until `done()`; each answer's time. */
async function probe(port, done) {
  const times = [];
  while (!done()) {
    const started = now();
    await request(port, 'GET', '/health', {});
    times.push(now() - started);
  }
  return times;
}

async function startKeel(name, checkout, port) {
  const dataDir = mkdtempSync(join(tmpdir(), `keel-bench-${name}-`));
  const child = start(OUT, `keel-${name}`, ['bin/keel.js', 'start'], keelEnv(port, { DATA_DIR: dataDir }), { cwd: resolve(checkout), nodeArgs: keelNodeArgs() });
  await waitUp(port);
  const admin = await signIn(port, SUPERUSER.email, SUPERUSER.password);
  await admin.call('POST', '/providers', { name: 'bench', kind: 'openai-compatible', base_url: `http://127.0.0.1:${PORT_BASE}/v1`, api_key: 'sk-bench' });
  await admin.call('POST', '/models', { id: MODEL, provider: 'bench', capabilities: ['embedding'], pricing: { input_cost_per_million_tokens: '0.02', output_cost_per_million_tokens: '0' } });
  const { key } = await admin.call('POST', '/api-keys', { name: 'bench' });
  const me = await admin.call('GET', '/users/me');
  await addCredits(admin, me.id);
  return { name, port, child, key, dataDir };
}

const upstream = start(OUT, 'upstream', ['bench/fake-upstream.mjs'], { PORT: String(PORT_BASE), EMBED_DIMENSIONS: String(DIMENSIONS) });
await waitUp(PORT_BASE);
// `direct`: the upstream itself, the floor (its /health answered by the same process).
const targets = [{ name: 'direct', port: PORT_BASE, child: upstream, key: 'none' }, await startKeel('embedded', '.', PORT_BASE + 1)];
if (BASE_CHECKOUT) targets.push(await startKeel('embedded-base', BASE_CHECKOUT, PORT_BASE + 2));

const input = Array.from({ length: INPUTS }, (_, i) => `text number ${i} to embed`);
const bodies = Object.fromEntries(FORMATS.map((format) => [format, Buffer.from(JSON.stringify({ model: MODEL, input, encoding_format: format }))]));
const results = [];

console.log(`machine: ${cpus().length} × ${cpus()[0]?.model}, Node ${process.version}; ${INPUTS} inputs × ${DIMENSIONS} dimensions`);
for (let round = 1; round <= ROUNDS + 1; round++) {
  // Round 0 warms each target up (the upstream prepares its answers; Keel's code paths compile).
  const warmup = round === 1;
  for (const target of targets) {
    for (const format of FORMATS) {
      const headers = { authorization: `Bearer ${target.key}`, 'content-type': 'application/json', 'content-length': bodies[format].length };
      const pid = target.child.pid;
      const [main0, cpu0] = [mainThreadCpuMs(pid), cpuMs(pid)];
      let finished = false;
      const probes = probe(target.port, () => finished);
      const started = now();
      const answer = await request(target.port, 'POST', '/v1/embeddings', headers, bodies[format]);
      const callMs = now() - started;
      finished = true;
      const times = (await probes).sort((a, b) => a - b);
      if (answer.status !== 200) throw new Error(`${target.name} answered ${answer.status}`);
      const row = { round: String(round - 1), target: target.name, format, callMs, probeMax: times.at(-1) ?? 0, probeP99: percentile(times, 99) ?? 0, probes: times.length, mainCpu: mainThreadCpuMs(pid) - main0, cpu: cpuMs(pid) - cpu0, rss: rssMb(pid) };
      if (!warmup) {
        results.push(row);
        appendFileSync(RAW, `${Object.values(row).map((v) => (typeof v === 'number' ? fmt(v, 1) : v)).join('\t')}\n`);
      }
      console.log(`${warmup ? 'warm-up' : `round ${round - 1}`} ${target.name} ${format}: call ${fmt(callMs, 0)} ms (${(answer.bytes / 1e6).toFixed(1)} MB), /health max ${fmt(row.probeMax, 1)} ms p99 ${fmt(row.probeP99, 1)} ms over ${times.length}, CPU main ${fmt(row.mainCpu, 0)} ms, process ${fmt(row.cpu, 0)} ms, RSS ${fmt(row.rss, 0)} MB; load ${loadavg()[0].toFixed(2)}`);
      await sleep(1000);
    }
  }
}

const lines = ['| target | format | call ms | /health max ms | /health p99 ms | main-thread CPU ms | process CPU ms | RSS MB |', '| --- | --- | --- | --- | --- | --- | --- | --- |'];
for (const target of targets) {
  for (const format of FORMATS) {
    const rows = results.filter((r) => r.target === target.name && r.format === format);
    const m = (key) => fmt(median(rows.map((r) => r[key])), 0);
    lines.push(`| ${target.name} | ${format} | ${m('callMs')} | ${m('probeMax')} | ${m('probeP99')} | ${m('mainCpu')} | ${m('cpu')} | ${m('rss')} |`);
  }
}
writeFileSync(`${OUT}/summary.md`, `${lines.join('\n')}\n`);
console.log(`\nmedians of ${ROUNDS} rounds:\n${lines.join('\n')}`);
agent.destroy();
await stop(targets.map((t) => t.child));
for (const target of targets) if (target.dataDir) rmSync(target.dataDir, { recursive: true, force: true });
