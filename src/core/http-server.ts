import type { ServerOptions, ServerResponse } from 'node:http';
import type { Socket } from 'node:net';

import type { FastifyReply, FastifyRequest } from 'fastify';

import type { Settings } from './config.js';

/** What Node answers on its own, before a request reaches Fastify, in the API's `{detail}` shape. */
function clientErrorAnswer(code: string | undefined): { status: number; reason: string; detail: string } {
  switch (code) {
    case 'ERR_HTTP_REQUEST_TIMEOUT':
      return { status: 408, reason: 'Request Timeout', detail: 'Request timeout: the request was not received in time' };
    case 'HPE_HEADER_OVERFLOW':
      return { status: 431, reason: 'Request Header Fields Too Large', detail: 'Request header fields too large' };
    default:
      return { status: 400, reason: 'Bad Request', detail: 'Malformed HTTP request' };
  }
}

/**
 * Node's `clientError`: a request line or headers it cannot parse, headers over its limit, or a
 * client too slow to send its request. The answer is written on the socket, which is then closed.
 */
export function answerClientError(error: NodeJS.ErrnoException, socket: Socket): void {
  // A reset connection: there is nobody to answer.
  if (error.code === 'ECONNRESET' || socket.destroyed) return;
  const { status, reason, detail } = clientErrorAnswer(error.code);
  const body = JSON.stringify({ detail });
  // Not in the middle of an answer already on its way (Node's own handler checks the same).
  const answering = (socket as Socket & { _httpMessage?: { headersSent?: boolean } })._httpMessage?.headersSent === true;
  if (socket.writable && !answering) {
    socket.write(
      `HTTP/1.1 ${status} ${reason}\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: ${Buffer.byteLength(body)}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n${body}`,
    );
  }
  socket.destroy();
}

/**
 * The server's timeouts (Fastify options): headers and the whole request must arrive in time (a
 * trickled body is cut off with 408), an idle keep-alive connection is closed after its timeout.
 */
export function serverOptions(settings: Settings) {
  const requestTimeout = settings.HTTP_REQUEST_TIMEOUT_MS;
  // Node refuses a headers timeout longer than the request timeout.
  const headersTimeout = Math.min(settings.HTTP_HEADERS_TIMEOUT_MS, requestTimeout);
  const http: ServerOptions = {
    requestTimeout,
    headersTimeout,
    // How often Node checks those two (its default, 30 s, would let a short timeout run long).
    connectionsCheckingInterval: Math.min(1_000, Math.floor(headersTimeout / 2)),
  };
  return {
    http,
    requestTimeout,
    keepAliveTimeout: settings.HTTP_KEEP_ALIVE_TIMEOUT_MS,
    clientErrorHandler: answerClientError,
  };
}

/**
 * Makes closing the server end connections that have no request in flight, those that never
 * carried one included, and refuse connections that arrive while it closes. Node 20's
 * `closeIdleConnections` (Fastify's `forceCloseConnections: 'idle'`) skips a connection on which
 * no request was ever parsed — e.g. the one `fetch` opens beside a socket it aborted, or after a
 * 503 while closing — and `server.close()` then waits for its keep-alive timeout. Fastify closes
 * the listening server only after every onClose hook (runs handed back first), so new connections
 * keep arriving until then. Returns what to call when closing starts; costs nothing per request
 * (the answer a socket is busy with is Node's `_httpMessage`, set once a request's headers are parsed).
 */
export function trackConnections(server: { on(event: 'connection', listener: (socket: Socket) => void): unknown }): {
  startClosing: () => void;
  cutUnreceivedBodies: () => void;
} {
  const sockets = new Set<Socket>();
  let closing = false;
  server.on('connection', (socket) => {
    if (closing) {
      socket.destroy();
      return;
    }
    sockets.add(socket);
    socket.once('close', () => sockets.delete(socket));
  });
  return {
    startClosing: () => {
      closing = true;
      for (const socket of sockets) {
        if (!busyWith(socket)) socket.destroy();
        else endOnceAnswered(socket);
      }
    },
    /**
     * Closes the connections whose request's body is still arriving (see shutdownCutAtMs): a client
     * trickling one held `server.close()` until HTTP_REQUEST_TIMEOUT_MS, and the deadline then
     * exited 1. Nothing of such a request has run but the reading of its body.
     */
    cutUnreceivedBodies: () => {
      for (const socket of sockets) if (busyWith(socket)?.req.complete === false) socket.destroy();
    },
  };
}

/**
 * When, after closing starts, what still waits on a client (a model stream, a request body still
 * arriving) is cut: 2 s before the shutdown deadline (SHUTDOWN_TIMEOUT_MS), a quarter of it at
 * most, so the process ends cleanly (metered, exit 0) before the deadline's exit 1.
 */
export function shutdownCutAtMs(settings: Pick<Settings, 'SHUTDOWN_TIMEOUT_MS'>): number {
  const timeout = settings.SHUTDOWN_TIMEOUT_MS;
  return timeout - Math.min(SHUTDOWN_CUT_BEFORE_MS, timeout / 4);
}

const SHUTDOWN_CUT_BEFORE_MS = 2_000;

/** The answer a socket is busy with (Node's `_httpMessage`, set once a request's headers are parsed). */
const busyWith = (socket: Socket): ServerResponse | undefined => (socket as Socket & { _httpMessage?: ServerResponse | null })._httpMessage ?? undefined;

/**
 * Ends a connection busy when closing began once it has answered what it was asked (requests
 * pipelined behind it too): kept alive, as its answer's headers said before closing began, it held
 * `server.close()` until its keep-alive timeout (72 s), far past the shutdown deadline.
 */
function endOnceAnswered(socket: Socket): void {
  const response = busyWith(socket);
  if (!response) {
    socket.end();
    return;
  }
  // After the turn in which Node hands the socket to a request pipelined behind this one.
  response.once('close', () => setImmediate(() => endOnceAnswered(socket)));
}

/**
 * Requests answered while the server drains (their `Connection: close` asks the client to move to
 * another node): an early answer to their body keeps that close rather than the connection.
 */
export const drainingRequests = new WeakSet<object>();

/** After an early answer (413, 404, 415) to a body still arriving: how much of the rest is read and dropped, and for how long, before the connection is closed. */
const LINGER_BYTES = 16 * 1024 * 1024;
const LINGER_MS = 2_000;

/**
 * An answer given before the request's body was read to its end: once the answer is out, the
 * rest is read and dropped for a while, so that a client still sending sees the answer rather
 * than a connection reset; past LINGER_BYTES or LINGER_MS the connection is closed.
 */
export function lingerOnUnreadBody(request: FastifyRequest, reply: FastifyReply): void {
  const raw = request.raw;
  if (raw.complete) return;
  reply.raw.once('finish', () => {
    if (raw.complete) return;
    raw.unpipe();
    let read = 0;
    // Destroying the request destroys its connection.
    const close = () => raw.destroy();
    const timer = setTimeout(close, LINGER_MS);
    timer.unref();
    raw.on('data', (chunk: Buffer) => {
      read += chunk.length;
      if (read > LINGER_BYTES) close();
    });
    raw.once('end', () => clearTimeout(timer));
    raw.once('close', () => clearTimeout(timer));
    raw.resume();
  });
}

/**
 * A `rewriteUrl` (before the router reads the URL) that escapes the slashes of the one segment
 * after each of `prefixes`: model ids have slashes (`meta-llama/Llama-3.1-8B-Instruct` as vLLM
 * serves it, OpenRouter's `openai/gpt-4o`), which the openai package escapes but other clients and
 * curl write into the path as they are, where a one-segment route (`/v1/models/{id}`,
 * `/api/v1/models/{model_id}`) answered 404. A trailing slash stays the router's to ignore. Any
 * other URL is returned as it is, after a comparison per prefix.
 */
export function slashesInLastSegment(prefixes: readonly string[]): (url: string) => string {
  return (url) => {
    const prefix = prefixes.find((p) => url.startsWith(p));
    if (prefix === undefined) return url;
    const query = url.indexOf('?', prefix.length);
    let end = query === -1 ? url.length : query;
    if (end > prefix.length + 1 && url[end - 1] === '/') end--;
    const segment = url.slice(prefix.length, end);
    if (!segment.includes('/')) return url;
    return `${prefix}${segment.replaceAll('/', '%2F')}${url.slice(end)}`;
  };
}
