import { createRequire } from 'node:module';
import { MessageChannel, receiveMessageOnPort, Worker } from 'node:worker_threads';

import type { PgliteLink } from './pglite-client.js';

export interface PgliteThreadOptions {
  dataDir: string;
  /** Added to PGlite's default start parameters. */
  startParams: string[];
  /**
   * The thread's nice value (Linux; 0 leaves it as the process's): how much of a busy core the
   * database's statements yield to the threads that answer requests (see PGLITE_THREAD_NICE).
   */
  nice?: number;
  /**
   * Linux: the thread runs under SCHED_IDLE (set with util-linux's `chrt`): it gets a core only when
   * nothing else wants one (see PGLITE_THREAD_SCHED_IDLE). Opening fails when it cannot be set.
   */
  schedIdle?: boolean;
}

/**
 * How long the main thread blocks for the answer to an exchange made while the session is held (a
 * transaction's statement) before it lets its event loop run and takes the answer as a message
 * instead: a long statement (a reindex, a migration) must not stop the server. A transaction's
 * usual statement answers well within a millisecond.
 */
const HELD_BLOCK_MS = 10;

/**
 * The thread's young generation: its JavaScript makes little garbage (PGlite's calls and the
 * replies' small wrappers; the replies' bytes live outside the heap), and V8's default for a
 * worker keeps ~16 MB of it resident.
 */
const THREAD_YOUNG_GENERATION_MB = 3;

/**
 * The word a held exchange's two sides agree on: the thread moves it from WAITING to ANSWERED (and
 * wakes the main thread) unless the main thread moved it to ASYNC first, having stopped blocking;
 * then the thread says so with a message. Both moves are compare-and-swaps, so exactly one side
 * wins and the answer is taken exactly once.
 */
const WAITING = 0;
const ANSWERED = 1;
const ASYNC = 2;

/**
 * Blocks this thread until the word at 0 leaves WAITING, for `ms` at most. The word, not what
 * Atomics.wait returns, says whether it left: the thread's notify for an earlier exchange comes just
 * after it moved the word, and may wake the wait for the next one. Whether it left WAITING.
 */
export function blockWhileWaiting(state: Int32Array, ms: number): boolean {
  const until = performance.now() + ms;
  for (let left = ms; Atomics.load(state, 0) === WAITING; left = until - performance.now()) {
    if (left <= 0) return false;
    Atomics.wait(state, 0, WAITING, left);
  }
  return true;
}

/**
 * The thread's code. It is a script rather than a module file so that it runs the same from dist/
 * and from src/ (tsx, the tests), which a worker's file could not. It opens PGlite with pgvector
 * (a new directory twice: see openPglite in db.ts), then answers each batch of protocol messages
 * with their raw replies, in order; the replies' buffers are transferred, not copied. A held
 * exchange (`held`) is answered in the same order, on a port of its own that nothing listens to:
 * the main thread takes its answer there (receiveMessageOnPort) once the shared word says it is in.
 */
const THREAD = `
const { parentPort, workerData } = require('node:worker_threads');
const { existsSync, readlinkSync } = require('node:fs');
const { setPriority } = require('node:os');
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
// This thread's own priority: Linux schedules threads apart, and /proc/thread-self names this one's
// id (elsewhere there is no such file and the thread keeps the process's priority).
let threadId = null;
try {
  threadId = readlinkSync('/proc/thread-self').split('/').pop();
} catch {}
if (workerData.nice && threadId !== null) {
  try {
    setPriority(Number(threadId), workerData.nice);
  } catch {}
}
// SCHED_IDLE has no call in Node: chrt sets it (lowering a thread's policy needs no privilege).
function scheduleIdle() {
  if (threadId === null) throw new Error('PGLITE_THREAD_SCHED_IDLE=true: SCHED_IDLE is a Linux policy (there is no /proc/thread-self here); set PGLITE_THREAD_SCHED_IDLE=false');
  try {
    require('node:child_process').execFileSync('chrt', ['--idle', '-p', '0', threadId], { stdio: ['ignore', 'ignore', 'pipe'], timeout: 10000 });
  } catch (e) {
    const said = e && e.stderr ? String(e.stderr).trim() : '';
    throw new Error('PGLITE_THREAD_SCHED_IDLE=true: util-linux chrt could not give the database thread SCHED_IDLE (' + (said || (e && e.message) || e) + '); install util-linux or set PGLITE_THREAD_SCHED_IDLE=false');
  }
}
// After opening: the database's start (initdb, recovery) does not wait for a busy host's cores.
open()
  .then(async () => {
    if (!workerData.schedIdle) return;
    try {
      scheduleIdle();
    } catch (e) {
      await pg.close();
      throw e;
    }
  })
  .then(() => parentPort.postMessage({ open: true }), (e) => parentPort.postMessage({ open: false, error: failure(e) }));
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
const heldState = new Int32Array(workerData.heldState);
parentPort.on('message', (m) => {
  if (m.held) {
    turn = turn.then(async () => {
      try {
        const reply = await exchange(new Uint8Array(m.held));
        workerData.heldPort.postMessage(reply, [reply.buffer]);
      } catch (e) {
        workerData.heldPort.postMessage(failure(e));
      }
      // WAITING -> ANSWERED wakes a main thread that blocks; ASYNC: it stopped blocking, tell it.
      if (Atomics.compareExchange(heldState, 0, ${WAITING}, ${ANSWERED}) === ${WAITING}) Atomics.notify(heldState, 0);
      else parentPort.postMessage({ heldAnswered: true });
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
  const held = new MessageChannel();
  const heldState = new Int32Array(new SharedArrayBuffer(4));
  const worker = new Worker(THREAD, {
    eval: true,
    resourceLimits: { maxYoungGenerationSizeMb: THREAD_YOUNG_GENERATION_MB },
    workerData: {
      ...options,
      pglite: require.resolve('@electric-sql/pglite'),
      vector: require.resolve('@electric-sql/pglite-pgvector'),
      heldPort: held.port2,
      heldState: heldState.buffer,
    },
    transferList: [held.port2],
  });
  const waiting: { resolve: (reply: Uint8Array) => void; reject: (error: unknown) => void }[] = [];
  let outgoing: Uint8Array[] = [];
  let stopped: Error | null = null;
  let closing: ((failure?: Failure) => void) | null = null;
  let opening: ((failure?: Failure) => void) | null = null;
  /** A held exchange that outlasted HELD_BLOCK_MS, until its answer is taken: told when that answer is in. */
  let heldAsync: { resolve: () => void; reject: (error: unknown) => void } | null = null;

  /**
   * Idle: the thread does not keep the process alive (nor did PGlite on the main thread). Not while
   * closing: the close waits for the thread's word, and an answer to a statement sent before it (a
   * WAL flush of the background writer) let the process end with that word still to come.
   */
  const letGoWhenIdle = () => {
    if (waiting.length === 0 && !heldAsync && !closing) worker.unref();
  };
  const stop = (error: Error) => {
    stopped ??= error;
    for (const w of waiting.splice(0)) w.reject(stopped);
    heldAsync?.reject(stopped);
    heldAsync = null;
    opening?.({ message: error.message });
    closing?.();
  };
  worker.on('error', (error) => stop(error));
  worker.on('exit', (code) => stop(new Error(`the embedded database's thread stopped (exit code ${code})`)));
  worker.on('message', (m: { open?: boolean; closed?: boolean; error?: Failure; replies?: (Uint8Array | Failure)[]; heldAnswered?: true }) => {
    if (m.heldAnswered) heldAsync?.resolve();
    else if (m.replies) {
      for (const reply of m.replies) {
        const w = waiting.shift()!;
        if (reply instanceof Uint8Array) w.resolve(reply);
        else w.reject(asError(reply));
      }
      letGoWhenIdle();
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

  /** The answer of the held exchange just made, from its port (the state said it is in). */
  const heldAnswer = (): Uint8Array => {
    heldAsync = null;
    const reply = receiveMessageOnPort(held.port1)?.message as Uint8Array | Failure | undefined;
    // Cannot happen: the thread posts the answer before it moves the state.
    if (reply === undefined) throw new Error("the embedded database's thread lost an answer");
    if (reply instanceof Uint8Array) return reply;
    throw asError(reply);
  };

  return {
    send,
    // The session is held: the thread's next work is this answer's caller's next statement. Waiting
    // for it here, rather than for this event loop to come round to a message, keeps the one
    // session from idling (and spares the loop a turn per statement). Not when something sent
    // before is unanswered: the answer would wait behind it.
    sendHeld: async (message) => {
      if (stopped) throw stopped;
      // (Or a held exchange that took long is still unanswered.)
      if (waiting.length > 0 || outgoing.length > 0 || heldAsync) return send(message);
      Atomics.store(heldState, 0, WAITING);
      // A copy of its own to transfer (a Buffer may be a view of Node's shared pool).
      const copy = new Uint8Array(message);
      worker.postMessage({ held: copy.buffer }, [copy.buffer]);
      blockWhileWaiting(heldState, HELD_BLOCK_MS);
      // Still working: wait for the thread's message instead, unless the answer came in just now.
      if (Atomics.compareExchange(heldState, 0, WAITING, ASYNC) === WAITING) {
        worker.ref();
        try {
          // Rejected by stop (which clears it) when the thread ends first.
          await new Promise<void>((resolve, reject) => (heldAsync = { resolve, reject }));
        } finally {
          heldAsync = null;
          letGoWhenIdle();
        }
      }
      return heldAnswer();
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
