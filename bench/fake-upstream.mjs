/* global process, Buffer, setTimeout */
// A zero-latency OpenAI-compatible upstream for the gateway benchmark: every answer is prepared
// once at start and written at once (no timers, no logging). PORT (default 8201). LATENCY_MS (default
// 0): a streamed answer waits this long before its first chunk (a model's time to first token).
//   POST /v1/chat/completions  → a completion, or with "stream": true five SSE chunks + usage + [DONE]
//   POST /v1/embeddings        → one 8-dimension embedding per input
import { createServer } from 'node:http';

const port = Number(process.env.PORT ?? 8201);
const latencyMs = Number(process.env.LATENCY_MS ?? 0);
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
      const inputs = Array.isArray(body.input) ? body.input : [body.input];
      const text = JSON.stringify({
        object: 'list',
        model,
        data: inputs.map((_, index) => ({ object: 'embedding', index, embedding: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8] })),
        usage: { prompt_tokens: inputs.length, total_tokens: inputs.length },
      });
      res.writeHead(200, { 'content-type': 'application/json' }).end(text);
      return;
    }
    res.writeHead(404).end();
  });
});
server.keepAliveTimeout = 60_000;
server.listen(port, '127.0.0.1');
process.once('SIGTERM', () => server.close(() => process.exit(0)));
