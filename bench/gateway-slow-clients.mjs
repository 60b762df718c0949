#!/usr/bin/env node
/* global process, console, fetch */
// What clients that stop reading a streamed answer cost Keel, and what the upstream gets to send
// meanwhile: /v1/chat/completions with `stream: true` against an upstream (in this process) that
// streams ANSWER_MB of text in 2 KB pieces as fast as Keel reads it (it waits for `drain`).
//   node bench/gateway-slow-clients.mjs   (CLIENTS=20 ANSWER_MB=16 SETTLE=3 PORT_BASE=8231)
// For this checkout, and BASE_CHECKOUT (another built checkout) when given: embedded Keel `start`
// (billing on, as bench/gateway.mjs runs it), one warm-up stream read whole, Keel's RSS; then
// CLIENTS streams opened at once whose clients read the first bytes and then nothing; after SETTLE s
// Keel's RSS again and how much the upstream had sent; then the clients read on to the end (every
// answer must arrive whole). Prints a line per checkout; add them to bench/RESULTS.md.
import { mkdirSync, rmSync } from 'node:fs';
import { createServer, request } from 'node:http';
import { resolve } from 'node:path';

import { addCredits, addUpstreamModel, keelEnv, keelNodeArgs, rssMb, sleep, start, stop, waitUp } from './lib.mjs';

const CLIENTS = Number(process.env.CLIENTS ?? 20);
const ANSWER_MB = Number(process.env.ANSWER_MB ?? 16);
const SETTLE = Number(process.env.SETTLE ?? 3);
const PORT_BASE = Number(process.env.PORT_BASE ?? 8231);
const BASE_CHECKOUT = process.env.BASE_CHECKOUT ?? '';
const OUT = process.env.OUT_DIR ?? 'bench/out/gateway-slow-clients';
const MODEL = 'bench-long-model';
const PIECE = `${'x'.repeat(2_047)} `;
const PIECES = Math.ceil((ANSWER_MB * 1024 * 1024) / PIECE.length);

rmSync(OUT, { recursive: true, force: true });
mkdirSync(OUT, { recursive: true });

// ==================== The upstream ====================

/** Bytes each upstream response has written so far (by request order). */
const sent = [];
const chunkOf = (content) => `data: ${JSON.stringify({ id: 'chatcmpl-long', object: 'chat.completion.chunk', created: 0, model: MODEL, choices: [{ index: 0, delta: { content }, finish_reason: null }] })}\n\n`;
const FRAME = chunkOf(PIECE);
const END = [
  `data: ${JSON.stringify({ id: 'chatcmpl-long', object: 'chat.completion.chunk', created: 0, model: MODEL, choices: [{ index: 0, delta: {}, finish_reason: 'stop' }] })}\n\n`,
  `data: ${JSON.stringify({ id: 'chatcmpl-long', object: 'chat.completion.chunk', created: 0, model: MODEL, choices: [], usage: { prompt_tokens: 5, completion_tokens: PIECES, total_tokens: PIECES + 5 } })}\n\n`,
  'data: [DONE]\n\n',
].join('');

/** Resolves once `res` can take more, or has closed. */
const drained = (res) =>
  new Promise((go) => {
    const done = () => {
      res.off('drain', done).off('close', done);
      go();
    };
    res.on('drain', done).on('close', done);
  });

const upstream = createServer((req, res) => {
  req.resume();
  req.on('end', async () => {
    const index = sent.push(0) - 1;
    res.writeHead(200, { 'content-type': 'text/event-stream' });
    for (let i = 0; i < PIECES && !res.destroyed; i++) {
      sent[index] += FRAME.length;
      if (!res.write(FRAME)) await drained(res);
    }
    res.end(END);
  });
});
await new Promise((done) => upstream.listen(PORT_BASE, '127.0.0.1', done));

// ==================== Clients ====================

const body = JSON.stringify({ model: MODEL, messages: [{ role: 'user', content: 'A long answer, please.' }], stream: true, stream_options: { include_usage: true } });

/** A streamed call whose client reads its first bytes, then waits for `readOn` before it reads the rest; resolves with the answer's length. */
function slowStream(port, key, readOn) {
  return new Promise((resolveAnswer, reject) => {
    const req = request({ host: '127.0.0.1', port, method: 'POST', path: '/v1/chat/completions', headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' } }, (res) => {
      let chars = 0;
      let tail = '';
      res.setEncoding('utf8');
      res.once('data', () => {
        res.pause();
        readOn.then(() => res.resume());
      });
      res.on('data', (text) => {
        chars += text.length;
        tail = (tail + text).slice(-64);
      });
      res.on('end', () => (res.statusCode === 200 && tail.endsWith('data: [DONE]\n\n') ? resolveAnswer(chars) : reject(new Error(`status ${res.statusCode}, ended with ${JSON.stringify(tail)}`))));
      res.on('error', reject);
    });
    req.on('error', reject);
    req.end(body);
  });
}

/** Keel's V8 heap in use plus its memory outside the heap (Buffers), the lowest of five samples over a second (the nearest to after a collection), in MB. */
async function liveMb(port) {
  const samples = [];
  for (let i = 0; i < 5; i++) {
    const text = await (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
    const metric = (name) => Number(new RegExp(`^${name} (\\S+)$`, 'm').exec(text)[1]);
    samples.push((metric('nodejs_heap_size_used_bytes') + metric('nodejs_external_memory_bytes')) / 1024 / 1024);
    await sleep(200);
  }
  return Math.min(...samples);
}

// ==================== Per checkout ====================

async function measure(label, checkout, port) {
  const env = keelEnv(port, { DATA_DIR: resolve(OUT, `data-${label}`), DATABASE_URL: '', MODEL_MAX_RESPONSE_BYTES: String((ANSWER_MB + 1) * 1024 * 1024) });
  const child = start(OUT, `keel-${label}`, ['bin/keel.js', 'start'], env, { cwd: checkout, nodeArgs: keelNodeArgs() });
  await waitUp(port);
  const admin = await addUpstreamModel(port, `http://127.0.0.1:${PORT_BASE}/v1`, MODEL);
  const { key } = await admin.call('POST', '/api-keys', { name: 'bench' });
  await addCredits(admin, (await admin.call('GET', '/users/me')).id, '1000000000');
  sent.length = 0;
  await slowStream(port, key, Promise.resolve());
  await sleep(1_000);
  const before = { rss: rssMb(child.pid), live: await liveMb(port) };
  sent.length = 0;
  let readOn;
  const released = new Promise((go) => (readOn = go));
  const answers = Array.from({ length: CLIENTS }, () => slowStream(port, key, released));
  await sleep(SETTLE * 1_000);
  const during = { rss: rssMb(child.pid), live: await liveMb(port) };
  const sentMb = sent.map((bytes) => bytes / 1024 / 1024).sort((a, b) => a - b);
  readOn();
  const lengths = await Promise.all(answers);
  await stop([child]);
  const answerMb = lengths.reduce((a, b) => a + b, 0) / CLIENTS / 1024 / 1024;
  const perStream = (key) => `${before[key].toFixed(0)} → ${during[key].toFixed(0)} MB (+${((during[key] - before[key]) / CLIENTS).toFixed(2)} MB a stream)`;
  console.log(
    `${label.padEnd(6)} ${CLIENTS} stalled streams of ${answerMb.toFixed(1)} MB each: Keel's heap + Buffers ${perStream('live')}, RSS ${perStream('rss')}; ` +
      `the upstream had sent a median ${sentMb[Math.floor(sentMb.length / 2)].toFixed(1)} MB a stream (${sentMb[0].toFixed(1)}–${sentMb.at(-1).toFixed(1)}); all answers whole`,
  );
}

try {
  await measure('this', undefined, PORT_BASE + 1);
  if (BASE_CHECKOUT) await measure('base', BASE_CHECKOUT, PORT_BASE + 2);
} finally {
  await stop();
  upstream.close();
}
