/**
 * A fake OpenAI-compatible model server on 127.0.0.1 for tests: `/v1/chat/completions` (plain and
 * SSE), `/v1/embeddings`, `/v1/models`; and, as far as the AI SDK's Anthropic and Google models
 * read them, Anthropic's `/v1/messages` and Google's `/v1/models/{id}:generateContent`,
 * `:streamGenerateContent`, `:embedContent` and `:batchEmbedContents` (a provider of that kind
 * whose base URL is `url`), which answer the same scripts in their own shapes. Replies are scripted
 * per model (a queue; when it is empty the default reply answers). Faults: any status (429 with retry-after, 500...), hangs, dropped
 * connections (before or during a stream), bodies sent as they are, huge answers (`padBytes`),
 * connections held open after the answer. Every request is logged with its body and whether the client aborted it.
 */
import { createHash } from 'node:crypto';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';

export interface FakeUsage {
  prompt_tokens: number;
  completion_tokens: number;
  cached_tokens?: number;
  reasoning_tokens?: number;
  /** Of a predicted output, the tokens the answer did not use: billed as output, so counted in `completion_tokens` too (as OpenAI reports them). */
  rejected_prediction_tokens?: number;
}

export interface FakeToolCall {
  id: string;
  name: string;
  /** JSON text. */
  arguments: string;
}

export interface ScriptedReply {
  /** An error status (the body is OpenAI's error object unless `body` is given). */
  status?: number;
  headers?: Record<string, string>;
  body?: unknown;
  /** Never answer (until the client gives up). */
  hang?: boolean;
  /** Send `103 Early Hints` first (an interim answer a client must skip), then the reply. */
  earlyHints?: boolean;
  /**
   * Destroy the connection: before any byte (of the final answer), or after this many stream chunks
   * (the 200's headers and those chunks reach the client first: 0 drops it right after the headers;
   * a non-streamed chat or embeddings answer is dropped after its headers, whatever the count).
   */
  drop?: 'immediately' | { afterChunks: number };
  /** Stop sending (but keep the connection open) after this many stream chunks. */
  stallAfterChunks?: number;
  text?: string;
  /** Streamed pieces (default: `text` split after each space). */
  chunks?: string[];
  reasoning?: string;
  /** The model refuses (OpenAI's structured outputs): `message.refusal` (content null unless `text`), streamed as `delta.refusal` pieces split after each space. */
  refusal?: string;
  /**
   * A stream's answer and refusal pieces in this order (instead of `text`/`chunks` and `refusal`),
   * each its own chunk's `delta.content` or `delta.refusal`: the two interleaved, as a provider may send them.
   */
  deltas?: ({ content: string } | { refusal: string })[];
  /**
   * Before a stream's first chunk, an SSE comment (`: OPENROUTER PROCESSING`) every `everyMs` for
   * `forMs` (Infinity: comments only, until the client goes), as OpenRouter keeps a stream alive
   * while a reasoning model thinks.
   */
  comments?: { everyMs: number; forMs: number };
  /** Delay before each streamed chunk (and before a non-stream answer, or an error status, streamed or not). */
  chunkDelayMs?: number;
  toolCalls?: FakeToolCall[];
  /** null: the answer reports no usage (no `usage` field, no usage chunk), as some servers do. */
  usage?: FakeUsage | null;
  /** The answer's `usage` object as it is, instead of one made from `usage` (counts left out: `{}`, `{total_tokens: 57}`). */
  rawUsage?: unknown;
  /** Answer 200 with this body as it is, for a stream or not, or embeddings (a body that is no JSON, a broken stream, vectors out of order). */
  rawBody?: string;
  /** Where `rawBody` is cut into writes of their own, 20 ms apart, so the client reads them apart (a line end cut in two). */
  rawCuts?: number[];
  /** After the answer (a stream's `[DONE]` included), keep the connection open: for good, or this many ms before ending the response. */
  holdOpen?: true | number;
  /**
   * A non-streamed answer (chat or embeddings) this many bytes longer: JSON whitespace after its
   * opening brace, written in pieces only as fast as the client reads them, and no more once it has
   * gone — a huge answer that a client reading it whole would have to hold (see `bodyBytesSent`).
   */
  padBytes?: number;
  /** Chat answers carry log probabilities (no alternatives) when the request asked for none too, as a broken or careless server may. */
  logprobsUnasked?: boolean;
  /** Embeddings as JSON numbers whatever `encoding_format` asked, as some OpenAI-compatible servers answer. */
  floatsAlways?: boolean;
}

export interface LoggedRequest {
  method: string;
  path: string;
  model?: string;
  stream: boolean;
  body: Record<string, unknown>;
  headers: IncomingMessage['headers'];
  /** What the server did: a status, `hang` or `drop` (a stall mid-stream keeps 200). */
  reply: number | 'hang' | 'drop';
  /** The client closed the connection before the answer was complete. */
  aborted: boolean;
  /** The answer was written completely. */
  completed: boolean;
  /** Stream chunks written before the end or the abort. */
  chunksSent: number;
  /** SSE comments written before the first chunk (`comments`). */
  commentsSent: number;
  /** Bytes of a padded answer's body written before its end or the abort (`padBytes`). */
  bodyBytesSent: number;
}

/**
 * Writes `data`, resolving once the client has taken what is buffered (or has gone): a server
 * that writes only as fast as its client reads, as a real one does (a slow client holds it back).
 */
function writeAsRead(res: ServerResponse, data: string): Promise<void> | undefined {
  if (res.write(data)) return undefined;
  return new Promise<void>((resolve) => {
    const go = () => {
      res.off('drain', go);
      res.off('close', go);
      resolve();
    };
    res.on('drain', go);
    res.on('close', go);
  });
}

/**
 * Destroys the connection once what was written has gone out, as a server that sent it and then
 * failed: Node holds a response's writes (corked) until the next tick, and a destroy in this one
 * discarded the headers and the chunks with them (the client saw a connection fail before any answer).
 */
async function dropWhenSent(res: ServerResponse): Promise<void> {
  res.flushHeaders();
  await new Promise<void>((resolve) => setImmediate(resolve));
  res.socket?.destroy();
}

export const EMBEDDING_DIMENSIONS = 8;

/** The embedding the server returns for `text`: from its SHA-256, values in [-1, 1]. */
export function fakeEmbedding(text: string): number[] {
  const digest = createHash('sha256').update(text).digest();
  return Array.from({ length: EMBEDDING_DIMENSIONS }, (_, i) => digest.readInt16BE(i * 2) / 32768);
}

/**
 * A vector cut to the `dimensions` a request asked for, as OpenAI shortens text-embedding-3's; a
 * size it does not have is ignored, as a server that cannot lengthen its vectors and does not say so.
 */
function shortened(vector: number[], dimensions: unknown): number[] {
  return typeof dimensions === 'number' && dimensions < vector.length ? vector.slice(0, dimensions) : vector;
}

/** Dimensions of `lexicalEmbedding`: enough that hashed features rarely collide in a small corpus. */
export const LEXICAL_DIMENSIONS = 256;

/** The model for which the server answers with `lexicalEmbedding` instead of the SHA-256 vectors. */
export const LEXICAL_EMBEDDING_MODEL = 'fake-embed-lexical';

const STOP_WORDS = new Set(
  'a an and are as at be by can do does for from has have how i in is it its of on or should that the their this to was what when where which who why will with you your'.split(' '),
);

/** An FNV-1a hash: cheap, stable across runs and processes. */
function fnv1a(text: string): number {
  let hash = 0x811c9dc5;
  for (let i = 0; i < text.length; i++) hash = Math.imul(hash ^ text.charCodeAt(i), 0x01000193);
  return hash >>> 0;
}

/**
 * A deterministic embedding that carries some meaning, so that hybrid search has a real signal to
 * fuse: the words (stop words left out) and their character trigrams, hashed with a sign into
 * LEXICAL_DIMENSIONS buckets, weighted 1 + log(count), normalised to unit length. Texts sharing
 * words or word stems ("report" / "reported") land near each other; a random vector would not.
 */
export function lexicalEmbedding(text: string): number[] {
  const vector = new Array<number>(LEXICAL_DIMENSIONS).fill(0);
  const counts = new Map<string, number>();
  const add = (feature: string) => counts.set(feature, (counts.get(feature) ?? 0) + 1);
  for (const word of text.toLowerCase().match(/[\p{L}\p{N}]+/gu) ?? []) {
    if (STOP_WORDS.has(word)) continue;
    add(`w:${word}`);
    const padded = `^${word}$`;
    for (let i = 0; i + 3 <= padded.length; i++) add(`t:${padded.slice(i, i + 3)}`);
  }
  for (const [feature, count] of counts) {
    const hash = fnv1a(feature);
    // A whole word says more than one of its trigrams.
    const weight = (feature.startsWith('w:') ? 1 : 0.4) * (1 + Math.log(count));
    vector[hash % LEXICAL_DIMENSIONS]! += (hash & 0x8000_0000 ? -1 : 1) * weight;
  }
  const norm = Math.hypot(...vector) || 1;
  return vector.map((value) => value / norm);
}

/**
 * The log probabilities the server gives a request that asks for them (`logprobs: true`): one entry
 * a piece of the answer (a streamed chunk's text), `top` alternatives each (`top_logprobs`), the
 * first the piece itself.
 */
export function fakeLogprobs(pieces: string[], top: number) {
  const entry = (token: string, logprob: number) => ({ token, logprob, bytes: [...Buffer.from(token)] });
  return pieces.map((token, i) => ({
    ...entry(token, -(i + 1) / 8),
    top_logprobs: Array.from({ length: top }, (_, k) => entry(k === 0 ? token : `${token}~${k}`, -(i + 1) / 8 - k)),
  }));
}

/** What a request asks of log probabilities: the top count, or undefined for none. */
const askedLogprobs = (body: Record<string, unknown>): number | undefined => (body.logprobs === true ? (typeof body.top_logprobs === 'number' ? body.top_logprobs : 0) : undefined);

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export class FakeModelServer {
  readonly log: LoggedRequest[] = [];
  /** TCP connections accepted so far (keep-alive reuses them). */
  connections = 0;
  private readonly scripts = new Map<string, ScriptedReply[]>();
  defaultReply: ScriptedReply = { text: 'Hello from the fake model.', usage: { prompt_tokens: 10, completion_tokens: 5 } };
  private waiters: (() => void)[] = [];

  private constructor(private readonly server: Server) {}

  static async start(): Promise<FakeModelServer> {
    const server = createServer();
    const fake = new FakeModelServer(server);
    server.on('request', (req, res) => void fake.handle(req, res));
    server.on('connection', () => (fake.connections += 1));
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    return fake;
  }

  /** Base URL for OpenAI clients (ends in /v1). */
  get url(): string {
    return `http://127.0.0.1:${(this.server.address() as AddressInfo).port}/v1`;
  }

  /** Queues replies for `model` (`*`: any model without its own queue). */
  script(model: string, ...replies: ScriptedReply[]): void {
    this.scripts.set(model, [...(this.scripts.get(model) ?? []), ...replies]);
  }

  reset(): void {
    this.scripts.clear();
    this.log.length = 0;
  }

  requestsFor(model: string): LoggedRequest[] {
    return this.log.filter((r) => r.model === model);
  }

  /** Resolves when `predicate` holds for the log (checked after every change). */
  async waitFor(predicate: (log: LoggedRequest[]) => boolean, timeoutMs = 5_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (!predicate(this.log)) {
      if (Date.now() > deadline) throw new Error(`fake model server: condition not met in ${timeoutMs} ms`);
      await new Promise<void>((resolve) => {
        this.waiters.push(resolve);
        setTimeout(resolve, 50);
      });
    }
  }

  /**
   * Resolves with request `index` once it has sent no stream chunk for `quietMs`: its client holds
   * it back (or it ended). However big the sockets' buffers between, they are full by then.
   */
  async stalled(index = 0, quietMs = 300, timeoutMs = 10_000): Promise<LoggedRequest> {
    const deadline = Date.now() + timeoutMs;
    await this.waitFor((log) => log[index] !== undefined, timeoutMs);
    const entry = this.log[index]!;
    for (let sent = -1; sent !== entry.chunksSent; ) {
      if (Date.now() > deadline) throw new Error(`fake model server: request ${index} still sending after ${timeoutMs} ms`);
      sent = entry.chunksSent;
      await new Promise((resolve) => setTimeout(resolve, quietMs));
    }
    return entry;
  }

  async close(): Promise<void> {
    this.server.closeAllConnections();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }

  private changed(): void {
    const waiters = this.waiters;
    this.waiters = [];
    for (const w of waiters) w();
  }

  private next(model: string | undefined): ScriptedReply {
    for (const key of [model ?? '', '*']) {
      const queue = this.scripts.get(key);
      if (queue?.length) return queue.shift() as ScriptedReply;
    }
    return this.defaultReply;
  }

  private async handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    let raw = '';
    for await (const chunk of req) raw += String(chunk);
    const body = (raw ? JSON.parse(raw) : {}) as Record<string, unknown>;
    const path = new URL(req.url ?? '/', 'http://fake').pathname;
    // Google names the model, and whether to stream, in the path.
    const google = GOOGLE_PATH.exec(path);
    const entry: LoggedRequest = {
      method: req.method ?? 'GET',
      path,
      model: google ? google[1] : typeof body.model === 'string' ? body.model : undefined,
      stream: body.stream === true || google?.[2] === 'streamGenerateContent',
      body,
      headers: req.headers,
      reply: 200,
      aborted: false,
      completed: false,
      chunksSent: 0,
      commentsSent: 0,
      bodyBytesSent: 0,
    };
    this.log.push(entry);
    res.on('close', () => {
      if (!res.writableFinished) entry.aborted = true;
      this.changed();
    });
    this.changed();

    if (path === '/v1/models') return this.json(res, entry, 200, { object: 'list', data: [] });
    const reply = this.next(entry.model);
    if (reply.earlyHints) await new Promise<void>((resolve) => res.writeEarlyHints({ link: '</style.css>; rel=preload; as=style' }, resolve));
    if (reply.hang) {
      entry.reply = 'hang';
      return; // the client's timeout or abort closes it
    }
    if (reply.drop === 'immediately') {
      entry.reply = 'drop';
      req.socket.destroy();
      return;
    }
    if (reply.status && reply.status >= 400) {
      if (reply.chunkDelayMs) await sleep(reply.chunkDelayMs);
      const error = reply.body ?? { error: { message: `fake error ${reply.status}`, type: 'server_error', param: null, code: null } };
      return this.json(res, entry, reply.status, error, reply.headers);
    }
    if (reply.chunkDelayMs && !entry.stream) await sleep(reply.chunkDelayMs);
    if (path !== '/v1/chat/completions' && path !== '/v1/embeddings' && path !== '/v1/messages' && !google) return this.json(res, entry, 404, { error: { message: 'not found' } });
    if (reply.rawBody !== undefined) return this.raw(res, entry, reply);
    if (path === '/v1/embeddings' || google?.[2] === 'embedContent' || google?.[2] === 'batchEmbedContents') return this.embeddings(res, entry, body, reply, google?.[2]);
    if (path === '/v1/messages') return entry.stream ? this.frames(res, entry, reply, anthropicEvents(entry.model, reply), '') : this.json(res, entry, 200, anthropicMessage(entry.model, reply));
    if (google) return entry.stream ? this.frames(res, entry, reply, googleChunks(reply), '') : this.json(res, entry, 200, googleResponse(reply, reply.chunks ?? (reply.text ? [reply.text] : [])));
    if (entry.stream) return this.streamChat(res, entry, body, reply);
    if (typeof reply.drop === 'object') return this.dropAfterHeaders(res, entry);
    if (reply.padBytes) return this.padded(res, entry, this.completion(entry.model, reply, body), reply.padBytes);
    return this.json(res, entry, 200, this.completion(entry.model, reply, body));
  }

  private json(res: ServerResponse, entry: LoggedRequest, status: number, payload: unknown, headers: Record<string, string> = {}): void {
    entry.reply = status;
    res.writeHead(status, { 'content-type': 'application/json', ...headers });
    res.end(JSON.stringify(payload), () => {
      entry.completed = true;
      this.changed();
    });
  }

  /** `payload` with `padBytes` of whitespace after its `{`, written as the client reads (no content-length: chunked). */
  private async padded(res: ServerResponse, entry: LoggedRequest, payload: unknown, padBytes: number): Promise<void> {
    const PIECE = 64 * 1024;
    entry.reply = 200;
    res.writeHead(200, { 'content-type': 'application/json' });
    const text = JSON.stringify(payload);
    const write = (data: string) => {
      entry.bodyBytesSent += Buffer.byteLength(data);
      return writeAsRead(res, data);
    };
    await write('{');
    const spaces = ' '.repeat(PIECE);
    for (let left = padBytes; left > 0 && !entry.aborted && !res.destroyed; left -= PIECE) await write(left >= PIECE ? spaces : spaces.slice(0, left));
    if (entry.aborted || res.destroyed) return;
    res.end(text.slice(1), () => {
      entry.bodyBytesSent += Buffer.byteLength(text) - 1;
      entry.completed = true;
      this.changed();
    });
  }

  private async raw(res: ServerResponse, entry: LoggedRequest, reply: ScriptedReply): Promise<void> {
    res.writeHead(200, { 'content-type': entry.stream ? 'text/event-stream' : 'application/json', ...reply.headers });
    const body = reply.rawBody ?? '';
    let from = 0;
    for (const cut of reply.rawCuts ?? []) {
      res.write(body.slice(from, cut));
      from = cut;
      await sleep(20);
    }
    this.end(res, entry, reply, body.slice(from));
  }

  /** Ends the response with `last`, or writes it and ends later or never (`holdOpen`). */
  private end(res: ServerResponse, entry: LoggedRequest, reply: ScriptedReply, last: string): void {
    const done = () => {
      entry.completed = true;
      this.changed();
    };
    if (reply.holdOpen === undefined) {
      res.end(last, done);
      return;
    }
    res.write(last);
    if (reply.holdOpen !== true) setTimeout(() => res.end(done), reply.holdOpen);
  }

  private usageOf(reply: ScriptedReply) {
    if (reply.rawUsage !== undefined) return reply.rawUsage;
    const u = reply.usage ?? { prompt_tokens: 0, completion_tokens: 0 };
    return {
      prompt_tokens: u.prompt_tokens,
      completion_tokens: u.completion_tokens,
      total_tokens: u.prompt_tokens + u.completion_tokens,
      prompt_tokens_details: { cached_tokens: u.cached_tokens ?? 0 },
      completion_tokens_details: { reasoning_tokens: u.reasoning_tokens ?? 0, ...(u.rejected_prediction_tokens !== undefined && { accepted_prediction_tokens: 0, rejected_prediction_tokens: u.rejected_prediction_tokens }) },
    };
  }

  private toolCallsOf(reply: ScriptedReply) {
    return reply.toolCalls?.map((t, index) => ({ index, id: t.id, type: 'function', function: { name: t.name, arguments: t.arguments } }));
  }

  private completion(model: string | undefined, reply: ScriptedReply, body: Record<string, unknown> = {}) {
    const toolCalls = this.toolCallsOf(reply);
    const top = askedLogprobs(body) ?? (reply.logprobsUnasked ? 0 : undefined);
    const logprobs =
      top === undefined
        ? null
        : { content: reply.text ? fakeLogprobs(reply.chunks ?? reply.text.split(/(?<= )/), top) : null, refusal: reply.refusal ? fakeLogprobs(reply.refusal.split(/(?<= )/), top) : null };
    return {
      id: 'chatcmpl-fake',
      object: 'chat.completion',
      created: Math.floor(Date.now() / 1000),
      model,
      choices: [
        {
          index: 0,
          message: { role: 'assistant', content: reply.text ?? null, reasoning_content: reply.reasoning, refusal: reply.refusal ?? null, tool_calls: toolCalls },
          finish_reason: toolCalls?.length ? 'tool_calls' : 'stop',
          logprobs,
        },
      ],
      usage: reply.usage === null ? undefined : this.usageOf(reply),
    };
  }

  private async streamChat(res: ServerResponse, entry: LoggedRequest, body: Record<string, unknown>, reply: ScriptedReply): Promise<void> {
    entry.reply = 200;
    res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache' });
    const base = { id: 'chatcmpl-fake', object: 'chat.completion.chunk', created: Math.floor(Date.now() / 1000), model: entry.model };
    const chunks: unknown[] = [];
    if (reply.reasoning) chunks.push({ choices: [{ index: 0, delta: { role: 'assistant', reasoning_content: reply.reasoning }, finish_reason: null }] });
    // The answer's pieces as they go out: the script's order, or the text's then the refusal's.
    const deltas = reply.deltas ?? [...(reply.chunks ?? (reply.text ? reply.text.split(/(?<= )/) : [])).map((content) => ({ content })), ...(reply.refusal?.split(/(?<= )/) ?? []).map((refusal) => ({ refusal }))];
    const pieces = deltas.flatMap((delta) => ('content' in delta ? [delta.content] : []));
    const refusals = deltas.flatMap((delta) => ('refusal' in delta ? [delta.refusal] : []));
    // Asked for, each chunk's log probabilities are its piece's, as OpenAI streams them.
    const top = askedLogprobs(body) ?? (reply.logprobsUnasked ? 0 : undefined);
    // Made once for the answer (each chunk's is one of them): thousands of pieces stream as fast as a few.
    const entries = top === undefined ? undefined : { content: fakeLogprobs(pieces, top), refusal: fakeLogprobs(refusals, top) };
    const logprobsOf = (kind: 'content' | 'refusal', i: number) => (entries ? { logprobs: { content: null, refusal: null, [kind]: [entries[kind][i]] } } : {});
    const seen = { content: 0, refusal: 0 };
    for (const delta of deltas) {
      const kind = 'content' in delta ? 'content' : 'refusal';
      chunks.push({ choices: [{ index: 0, delta: { role: 'assistant', ...delta }, finish_reason: null, ...logprobsOf(kind, seen[kind]++) }] });
    }
    const toolCalls = this.toolCallsOf(reply);
    if (toolCalls) chunks.push({ choices: [{ index: 0, delta: { role: 'assistant', tool_calls: toolCalls }, finish_reason: null }] });
    chunks.push({ choices: [{ index: 0, delta: {}, finish_reason: toolCalls?.length ? 'tool_calls' : 'stop' }] });
    const includeUsage = (body.stream_options as { include_usage?: boolean } | undefined)?.include_usage === true;
    if (includeUsage && reply.usage !== null) chunks.push({ choices: [], usage: this.usageOf(reply) });

    if (reply.comments) {
      const { everyMs, forMs } = reply.comments;
      for (const started = Date.now(); Date.now() - started < forMs; await sleep(everyMs)) {
        if (entry.aborted || res.destroyed) return;
        res.write(': OPENROUTER PROCESSING\n\n');
        entry.commentsSent += 1;
        this.changed();
      }
    }

    await this.frames(
      res,
      entry,
      reply,
      // Rendered as they go out: a stream held back by its client holds only the frame it is on,
      // so the memory a test measures in this process is the client's side (Keel's), not the fake's.
      (function* () {
        for (const chunk of chunks) yield `data: ${JSON.stringify({ ...base, ...(chunk as object) })}\n\n`;
      })(),
      'data: [DONE]\n\n',
    );
  }

  /** A 200 whose body never comes: the connection is destroyed once its headers have gone out. */
  private async dropAfterHeaders(res: ServerResponse, entry: LoggedRequest): Promise<void> {
    entry.reply = 'drop';
    res.writeHead(200, { 'content-type': 'application/json' });
    await dropWhenSent(res);
  }

  /** An event stream's frames, as the script's faults (drop, stall, delay) let them go, then `last`. */
  private async frames(res: ServerResponse, entry: LoggedRequest, reply: ScriptedReply, frames: Iterable<string>, last: string): Promise<void> {
    if (!res.headersSent) {
      entry.reply = 200;
      res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache' });
    }
    for (const frame of frames) {
      if (entry.aborted) return;
      if (typeof reply.drop === 'object' && entry.chunksSent >= reply.drop.afterChunks) {
        entry.reply = 'drop';
        return dropWhenSent(res);
      }
      if (reply.stallAfterChunks !== undefined && entry.chunksSent >= reply.stallAfterChunks) return;
      if (reply.chunkDelayMs) await sleep(reply.chunkDelayMs);
      if (entry.aborted) return;
      const written = writeAsRead(res, frame);
      entry.chunksSent += 1;
      this.changed();
      if (written) await written;
    }
    this.end(res, entry, reply, last);
  }

  /** OpenAI's embeddings answer, or Google's (`google`: the method its path names). */
  private embeddings(res: ServerResponse, entry: LoggedRequest, body: Record<string, unknown>, reply: ScriptedReply, google?: string): void {
    if (typeof reply.drop === 'object') return void this.dropAfterHeaders(res, entry);
    const vectorFor = (text: string, dimensions: unknown) => shortened(entry.model === LEXICAL_EMBEDDING_MODEL ? lexicalEmbedding(text) : fakeEmbedding(text), dimensions);
    if (google) {
      // One request's content (`:embedContent`), or a batch of them; Google reports no usage.
      const requests = (google === 'embedContent' ? [body] : body.requests) as GoogleEmbedRequest[];
      const vectors = requests.map((r) => vectorFor(r.content.parts.map((part) => part.text ?? '').join(''), r.outputDimensionality));
      return this.json(res, entry, 200, google === 'embedContent' ? { embedding: { values: vectors[0] } } : { embeddings: vectors.map((values) => ({ values })) });
    }
    const input = Array.isArray(body.input) ? (body.input as string[]) : [String(body.input)];
    const tokens = input.reduce((n, text) => n + Math.ceil(text.length / 4), 0);
    // base64 when asked (float32, little-endian), as OpenAI answers.
    const base64 = body.encoding_format === 'base64' && !reply.floatsAlways;
    const encoded = (vector: number[]) => (base64 ? Buffer.from(Float32Array.from(vector).buffer).toString('base64') : vector);
    const payload = {
      object: 'list',
      model: entry.model,
      data: input.map((text, index) => ({ object: 'embedding', index, embedding: encoded(vectorFor(text, body.dimensions)) })),
      usage: reply.usage === null ? undefined : { prompt_tokens: tokens, total_tokens: tokens },
    };
    if (reply.padBytes) return void this.padded(res, entry, payload, reply.padBytes);
    this.json(res, entry, 200, payload);
  }
}

const GOOGLE_PATH = /^\/v1\/models\/([^/:]+):(generateContent|streamGenerateContent|embedContent|batchEmbedContents)$/;

/** One text's request to Google's embeddings API, as its SDK sends it. */
interface GoogleEmbedRequest {
  content: { parts: { text?: string }[] };
  outputDimensionality?: number;
}

/** A script's usage in Anthropic's terms: `output_tokens` counts the thinking, as Anthropic's do. */
function anthropicUsage(reply: ScriptedReply) {
  const u = reply.usage ?? { prompt_tokens: 0, completion_tokens: 0 };
  return { input_tokens: u.prompt_tokens, output_tokens: u.completion_tokens, output_tokens_details: { thinking_tokens: u.reasoning_tokens ?? 0 } };
}

/** A script's answer as Anthropic's Messages API gives it: the thinking, the text, the tool calls. */
function anthropicMessage(model: string | undefined, reply: ScriptedReply) {
  return {
    id: 'msg_fake',
    type: 'message',
    role: 'assistant',
    model,
    content: [
      ...(reply.reasoning ? [{ type: 'thinking', thinking: reply.reasoning, signature: 'fake-signature' }] : []),
      ...(reply.text ? [{ type: 'text', text: reply.text }] : []),
      ...(reply.toolCalls ?? []).map((t) => ({ type: 'tool_use', id: t.id, name: t.name, input: JSON.parse(t.arguments) as unknown })),
    ],
    stop_reason: reply.toolCalls?.length ? 'tool_use' : 'end_turn',
    stop_sequence: null,
    usage: anthropicUsage(reply),
  };
}

/** The same answer as Anthropic streams it: a block for the thinking, the text (a delta a piece), each tool call. */
function anthropicEvents(model: string | undefined, reply: ScriptedReply): string[] {
  const blocks: { start: object; deltas: object[] }[] = [];
  if (reply.reasoning) blocks.push({ start: { type: 'thinking', thinking: '' }, deltas: [{ type: 'thinking_delta', thinking: reply.reasoning }, { type: 'signature_delta', signature: 'fake-signature' }] });
  const pieces = reply.chunks ?? (reply.text ? reply.text.split(/(?<= )/) : []);
  if (pieces.length) blocks.push({ start: { type: 'text', text: '' }, deltas: pieces.map((text) => ({ type: 'text_delta', text })) });
  for (const t of reply.toolCalls ?? []) blocks.push({ start: { type: 'tool_use', id: t.id, name: t.name }, deltas: [{ type: 'input_json_delta', partial_json: t.arguments }] });
  const usage = anthropicUsage(reply);
  const events: object[] = [{ type: 'message_start', message: { id: 'msg_fake', model, role: 'assistant', usage: { input_tokens: usage.input_tokens } } }];
  blocks.forEach(({ start, deltas }, index) => {
    events.push({ type: 'content_block_start', index, content_block: start }, ...deltas.map((delta) => ({ type: 'content_block_delta', index, delta })), { type: 'content_block_stop', index });
  });
  events.push({ type: 'message_delta', delta: { stop_reason: reply.toolCalls?.length ? 'tool_use' : 'end_turn' }, usage: { output_tokens: usage.output_tokens, output_tokens_details: usage.output_tokens_details } }, { type: 'message_stop' });
  return events.map((event) => `event: ${(event as { type: string }).type}\ndata: ${JSON.stringify(event)}\n\n`);
}

/**
 * A script's answer as Google's generateContent gives it, with `pieces` as its text: the thoughts as
 * `thought` parts, and usage whose `candidatesTokenCount` leaves them out (`thoughtsTokenCount`).
 */
function googleResponse(reply: ScriptedReply, pieces: string[], last = true) {
  const u = reply.usage ?? { prompt_tokens: 0, completion_tokens: 0 };
  const thoughts = u.reasoning_tokens ?? 0;
  const parts = [
    ...(reply.reasoning ? [{ text: reply.reasoning, thought: true }] : []),
    ...pieces.map((text) => ({ text })),
    ...(reply.toolCalls ?? []).map((t) => ({ functionCall: { name: t.name, args: JSON.parse(t.arguments) as unknown } })),
  ];
  return {
    candidates: [{ index: 0, content: { role: 'model', parts }, ...(last && { finishReason: 'STOP' }) }],
    ...(last && { usageMetadata: { promptTokenCount: u.prompt_tokens, candidatesTokenCount: u.completion_tokens - thoughts, thoughtsTokenCount: thoughts, totalTokenCount: u.prompt_tokens + u.completion_tokens } }),
  };
}

/** The same answer as streamGenerateContent sends it: the thoughts, then a chunk a text piece, the last with the finish and usage. */
function googleChunks(reply: ScriptedReply): string[] {
  const pieces = reply.chunks ?? (reply.text ? reply.text.split(/(?<= )/) : []);
  const chunks = [];
  if (reply.reasoning) chunks.push(googleResponse({ reasoning: reply.reasoning }, [], false));
  pieces.forEach((piece, i) => chunks.push(googleResponse({ ...reply, reasoning: undefined, toolCalls: i === pieces.length - 1 ? reply.toolCalls : undefined }, [piece], i === pieces.length - 1)));
  if (!pieces.length) chunks.push(googleResponse({ ...reply, reasoning: undefined }, [], true));
  return chunks.map((chunk) => `data: ${JSON.stringify(chunk)}\n\n`);
}
