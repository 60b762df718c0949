import { createRequire } from 'node:module';
import { MessageChannel, receiveMessageOnPort, Worker } from 'node:worker_threads';

import type { PgliteLink } from './pglite-client.js';

export interface PgliteThreadOptions {
  dataDir: string;
  /** Added to PGlite's default start parameters. */
  startParams: string[];
}

/**
 * How long the main thread blocks for the answer to an exchange made while the session is held
 * before it waits for it asynchronously instead (a long statement in a transaction: a reindex, a
 * migration). A transaction's usual statement answers in well under a millisecond.
 */
const HELD_BLOCK_MS = 20;

/**
 * The thread's code. It is a script rather than a module file so that it runs the same from dist/
 * and from src/ (tsx, the tests), which a worker's file could not. It opens PGlite with pgvector
 * (a new directory twice: see openPglite in db.ts), then answers each batch of protocol messages
 * with their raw replies, in order; the replies' buffers are transferred, not copied. A held
 * exchange (`held`) is answered in the same order, on its own port, and its answer is signalled
 * on the shared flag the main thread may be blocked on.
 */
const THREAD = `
const { parentPort, workerData } = require('node:worker_threads');
const { existsSync } = require('node:fs');
const { join } = require('node:path');
const { PGlite } = require(workerData.pglite);
const { vector } = require(workerData.vector);
let pg;
const failure = (e) => ({ message: String((e && e.message) || e), code: e && e.code, errno: e && e.errno });
async function open() {
  const { dataDir, startParams } = workerData;
  const options = { extensions: { vector }, startParams: [...PGlite.defaultStartParams, ...startParams] };
  const initdb = !dataDir.startsWith('memory://') && !existsSync(join(dataDir, 'PG_VERSION'));
  pg = await PGlite.create(dataDir, options);
  if (initdb) {
    await pg.close();
    pg = await PGlite.create(dataDir, options);
  }
}
open().then(() => parentPort.postMessage({ open: true }), (e) => parentPort.postMessage({ open: false, error: failure(e) }));
// As rawExchange in pglite-client.ts: the raw reply without PGlite's own parsing (and keeping) of it.
async function exchange(message) {
  const chunks = [];
  await pg.execProtocolRawStream(message, { syncToFs: false, onRawData: (bytes) => void chunks.push(bytes.slice()) });
  if (chunks.length === 1) return chunks[0];
  // A buffer of its own (Buffer.concat may use the shared pool, which cannot be transferred).
  const reply = new Uint8Array(chunks.reduce((n, chunk) => n + chunk.length, 0));
  let at = 0;
  for (const chunk of chunks) {
    reply.set(chunk, at);
    at += chunk.length;
  }
  return reply;
}
// Batches are answered one after the other, in the order they came.
let turn = Promise.resolve();
const { heldPort, heldFlag } = workerData;
const flag = new Int32Array(heldFlag);
parentPort.on('message', (m) => {
  if (m.held) {
    turn = turn.then(async () => {
      try {
        const reply = await exchange(new Uint8Array(m.held));
        heldPort.postMessage(reply, [reply.buffer]);
      } catch (e) {
        heldPort.postMessage(failure(e));
      }
      Atomics.store(flag, 0, 1);
      Atomics.notify(flag, 0);
    });
    return;
  }
  if (m.close) {
    turn = turn.then(() => pg.close()).then(() => parentPort.postMessage({ closed: true }), (e) => parentPort.postMessage({ closed: false, error: failure(e) }));
    return;
  }
  turn = turn.then(async () => {
    const replies = [];
    const transfer = [];
    let offset = 0;
    for (const length of m.lengths) {
      const message = new Uint8Array(m.batch, offset, length);
      offset += length;
      try {
        const reply = await exchange(message);
        replies.push(reply);
        transfer.push(reply.buffer);
      } catch (e) {
        replies.push(failure(e));
      }
    }
    parentPort.postMessage({ replies }, transfer);
  });
});
`;

interface Failure {
  message: string;
  code?: string;
  errno?: number;
}

function asError(failure: Failure): Error {
  return Object.assign(new Error(failure.message), failure.code === undefined ? {} : { code: failure.code }, failure.errno === undefined ? {} : { errno: failure.errno });
}

/**
 * PGlite in a worker thread, so its WebAssembly runs beside the main thread (on another core)
 * rather than on it. The messages sent in one turn of the event loop go as one batch, copied once
 * into a buffer that is transferred; the thread answers them in order.
 */
export async function openPgliteThread(options: PgliteThreadOptions): Promise<PgliteLink> {
  const require = createRequire(import.meta.url);
  // Held exchanges: their answers come on a port of their own, read at once (receiveMessageOnPort),
  // and the flag says when one is there (0: waiting, 1: answered, 2: the thread stopped).
  const held = new MessageChannel();
  const heldFlag = new Int32Array(new SharedArrayBuffer(4));
  const worker = new Worker(THREAD, {
    eval: true,
    workerData: {
      ...options,
      pglite: require.resolve('@electric-sql/pglite'),
      vector: require.resolve('@electric-sql/pglite-pgvector'),
      heldPort: held.port2,
      heldFlag: heldFlag.buffer,
    },
    transferList: [held.port2],
  });
  const waiting: { resolve: (reply: Uint8Array) => void; reject: (error: unknown) => void }[] = [];
  let outgoing: Uint8Array[] = [];
  let stopped: Error | null = null;
  let heldUnanswered = false;
  let closing: ((failure?: Failure) => void) | null = null;
  let opening: ((failure?: Failure) => void) | null = null;

  const stoppedError = () => stopped ?? new Error("the embedded database's thread stopped");
  const stop = (error: Error) => {
    stopped ??= error;
    Atomics.store(heldFlag, 0, 2);
    Atomics.notify(heldFlag, 0);
    for (const w of waiting.splice(0)) w.reject(stopped);
    opening?.({ message: error.message });
    closing?.();
  };
  worker.on('error', (error) => stop(error));
  worker.on('exit', (code) => stop(new Error(`the embedded database's thread stopped (exit code ${code})`)));
  worker.on('message', (m: { open?: boolean; closed?: boolean; error?: Failure; replies?: (Uint8Array | Failure)[] }) => {
    if (m.replies) {
      for (const reply of m.replies) {
        const w = waiting.shift()!;
        if (reply instanceof Uint8Array) w.resolve(reply);
        else w.reject(asError(reply));
      }
      // Idle: the thread does not keep the process alive (nor did PGlite on the main thread).
      if (waiting.length === 0) worker.unref();
    } else if (m.open !== undefined) opening?.(m.error);
    else if (m.closed !== undefined) closing?.(m.error);
  });

  const flush = () => {
    if (outgoing.length === 0) return;
    const messages = outgoing;
    outgoing = [];
    const lengths = messages.map((message) => message.byteLength);
    const batch = new Uint8Array(lengths.reduce((a, b) => a + b, 0));
    let offset = 0;
    for (const message of messages) {
      batch.set(message, offset);
      offset += message.byteLength;
    }
    worker.postMessage({ batch: batch.buffer, lengths }, [batch.buffer]);
  };

  const opened = await new Promise<Failure | undefined>((resolve) => (opening = resolve));
  opening = null;
  if (opened) {
    await worker.terminate();
    throw asError(opened);
  }
  worker.unref();

  const send = (message: Uint8Array) =>
    new Promise<Uint8Array>((resolve, reject) => {
      if (stopped) return reject(stopped);
      if (waiting.length === 0) worker.ref();
      waiting.push({ resolve, reject });
      outgoing.push(message);
      if (outgoing.length === 1) queueMicrotask(flush);
    });

  return {
    send,
    // Waits for the answer on this thread when nothing sent before is still unanswered (else it
    // would wait for those too): the session is held, so the thread's next work is this answer's
    // caller's next statement, which is sent without waiting for this event loop's next turn.
    sendHeld: async (message) => {
      if (stopped) throw stopped;
      // (Or another held exchange is still unanswered: one that took long, waited for asynchronously.)
      if (waiting.length > 0 || outgoing.length > 0 || heldUnanswered) return send(message);
      heldUnanswered = true;
      Atomics.store(heldFlag, 0, 0);
      // A copy of its own to transfer (a Buffer's may be a view of Node's shared pool).
      const copy = new Uint8Array(message);
      worker.postMessage({ held: copy.buffer }, [copy.buffer]);
      if (Atomics.wait(heldFlag, 0, 0, HELD_BLOCK_MS) === 'timed-out') {
        worker.ref();
        try {
          await Atomics.waitAsync(heldFlag, 0, 0).value;
        } finally {
          if (waiting.length === 0) worker.unref();
        }
      }
      heldUnanswered = false;
      // No answer: the thread stopped (the flag was set by stop).
      const reply = receiveMessageOnPort(held.port1)?.message as Uint8Array | Failure | undefined;
      if (reply === undefined) throw stoppedError();
      if (reply instanceof Uint8Array) return reply;
      throw asError(reply);
    },
    close: async () => {
      if (stopped) return;
      worker.ref();
      // After the messages already sent.
      if (outgoing.length > 0) flush();
      const failure = await new Promise<Failure | undefined>((resolve) => {
        closing = resolve;
        worker.postMessage({ close: true });
      });
      stopped = new Error('database is closed');
      await worker.terminate();
      if (failure) throw asError(failure);
    },
  };
}
