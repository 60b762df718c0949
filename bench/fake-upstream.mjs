/* global process, Buffer, setTimeout */
// A zero-latency OpenAI-compatible upstream for the gateway benchmark: every answer is prepared
// once at start and written at once (no timers, no logging). PORT (default 8201). LATENCY_MS (default
// 0): a streamed answer waits this long before its first chunk (a model's time to first token).
// EMBED_DIMENSIONS (default 8): the size of its embeddings.
//   POST /v1/chat/completions  → a completion, or with "stream": true five SSE chunks + usage + [DONE]
//   POST /v1/embeddings        → one embedding per input: JSON numbers, or float32 base64 when
//                                `encoding_format: base64` asks (as OpenAI answers); prepared once per count
import { createServer } from 'node:http';

const port = Number(process.env.PORT ?? 8201);
const latencyMs = Number(process.env.LATENCY_MS ?? 0);
const dimensions = Number(process.env.EMBED_DIMENSIONS ?? 8);
// Values as a model's are: float32, spread over [-0.1, 0.1].
const vector = Float32Array.from({ length: dimensions }, (_, i) => Math.sin(i + 1) / 10);
const vectorJson = JSON.stringify(Array.from(vector));
const vectorBase64 = JSON.stringify(Buffer.from(vector.buffer).toString('base64'));
const created = Math.floor(Date.now() / 1000);
const usage = { prompt_tokens: 12, completion_tokens: 5, total_tokens: 17, prompt_tokens_details: { cached_tokens: 0 }, completion_tokens_details: { reasoning_tokens: 0 } };

const completion = (model) =>
  JSON.stringify({
    id: 'chatcmpl-bench',
    object: 'chat.completion',
    created,
    model,
    choices: [{ index: 0, message: { role: 'assistant', content: 'Hello from the benchmark upstream.' }, finish_reason: 'stop', logprobs: null }],
    usage,
  });

const streamed = (model) => {
  const base = { id: 'chatcmpl-bench', object: 'chat.completion.chunk', created, model };
  const chunk = (delta, finish = null) => `data: ${JSON.stringify({ ...base, choices: [{ index: 0, delta, finish_reason: finish }] })}\n\n`;
  return [
    chunk({ role: 'assistant', content: '' }),
    ...['Hello ', 'from ', 'the ', 'benchmark ', 'upstream.'].map((content) => chunk({ content })),
    chunk({}, 'stop'),
    `data: ${JSON.stringify({ ...base, choices: [], usage })}\n\n`,
    'data: [DONE]\n\n',
  ];
};

const cache = new Map();
const prepared = (key, make) => {
  let value = cache.get(key);
  if (value === undefined) cache.set(key, (value = make()));
  return value;
};

const server = createServer((req, res) => {
  let raw = '';
  req.setEncoding('utf8');
  req.on('data', (chunk) => (raw += chunk));
  req.on('end', () => {
    if (req.url === '/health') return res.end('ok');
    let body;
    try {
      body = JSON.parse(raw || '{}');
    } catch {
      res.writeHead(400).end();
      return;
    }
    const model = typeof body.model === 'string' ? body.model : 'bench-model';
    if (req.url.endsWith('/chat/completions')) {
      if (body.stream) {
        const chunks = prepared(`s:${model}`, () => streamed(model));
        const send = () => {
          res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache' });
          for (const piece of chunks.slice(0, -1)) res.write(piece);
          res.end(chunks.at(-1));
        };
        if (latencyMs > 0) setTimeout(send, latencyMs);
        else send();
        return;
      }
      const text = prepared(`c:${model}`, () => completion(model));
      res.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
      res.end(text);
      return;
    }
    if (req.url.endsWith('/embeddings')) {
      const count = Array.isArray(body.input) ? body.input.length : 1;
      const base64 = body.encoding_format === 'base64';
      const text = prepared(`e:${model}:${count}:${base64}`, () => {
        const items = Array.from({ length: count }, (_, index) => `{"object":"embedding","index":${index},"embedding":${base64 ? vectorBase64 : vectorJson}}`);
        return `{"object":"list","model":${JSON.stringify(model)},"data":[${items.join(',')}],"usage":{"prompt_tokens":${count},"total_tokens":${count}}}`;
      });
      res.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) }).end(text);
      return;
    }
    res.writeHead(404).end();
  });
});
server.keepAliveTimeout = 60_000;
server.listen(port, '127.0.0.1');
process.once('SIGTERM', () => server.close(() => process.exit(0)));
