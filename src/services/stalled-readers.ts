import type { ServerResponse } from 'node:http';

import type { FastifyRequest } from 'fastify';

import { stillAuthenticated } from '../utils/authentication.js';

/** Keep-alive intervals a reader's socket may take nothing (stay full) before its stream is cut off. */
export const STALLED_READER_KEEPALIVES = 4;

/**
 * Calls `look` every `intervalMs` until `raw` closes (which every answer's end does, a client's
 * leaving too); returns what stops it sooner. The one timer of the looks an answer that outlives its
 * request takes (watchStalledReader, watchCredential).
 */
function lookUntilClosed(raw: ServerResponse, intervalMs: number, look: () => void): () => void {
  const timer = setInterval(look, intervalMs);
  const stop = () => {
    clearInterval(timer);
    raw.off('close', stop);
  };
  raw.once('close', stop);
  return stop;
}

/**
 * Watches a long-lived streamed answer (run events, /v1 completions) for a reader that takes
 * nothing: one whose response stays full (`writableNeedDrain`) with no less waiting in it, look
 * after look, every `intervalMs` (the stream's keep-alive interval), STALLED_READER_KEEPALIVES
 * looks in a row, is handed to `onStalled` once (which cuts it off). Without it such a reader keeps
 * its socket, its timers and whatever its stream holds (a reader of the run's log, a model call
 * held back for it) for as long as it likes. A reader that took something (a `drain`, or less
 * waiting than at the last look) starts the count again: a slow but live reader may take far
 * longer than the cut-off to empty its socket's buffer, and cutting it off would cut it off again
 * on every reconnect. Writers keep their backpressure (write until full, then wait for `drain`),
 * so what waits only grows by their keep-alive comments while a reader takes nothing. Stops by
 * itself when the response closes; returns what stops it sooner. `onLook`, if given, is called at
 * every look too: what else a stream checks at that pace shares its timer.
 */
export function watchStalledReader(raw: ServerResponse, intervalMs: number, onStalled: () => void, onLook?: () => void): () => void {
  let looks = 0;
  let waiting: number | undefined;
  const took = () => {
    looks = 0;
    waiting = undefined;
  };
  const stopLooking = lookUntilClosed(raw, intervalMs, () => {
    onLook?.();
    const left = raw.writableLength;
    if (!raw.writableNeedDrain || waiting === undefined || left < waiting) {
      looks = 0;
      waiting = raw.writableNeedDrain ? left : undefined;
      return;
    }
    if (++looks < STALLED_READER_KEEPALIVES) return;
    stop();
    onStalled();
  });
  const stop = () => {
    stopLooking();
    raw.off('drain', took);
    raw.off('close', stop);
  };
  raw.on('drain', took);
  raw.once('close', stop);
  return stop;
}

/** What a watched stream does besides being cut off when its reader stalls (cutOffStalledReader). */
export interface StreamWatch {
  /** Counts a cut-off where the stream is counted. */
  onCutOff?: () => void;
  /** Ends the stream once its credential no longer authenticates its caller (credentialLook). */
  onCredentialLost?: () => void;
}

/** The pace of every look an answer that outlives its request takes: its keep-alive interval. */
const lookIntervalMs = (request: FastifyRequest): number => request.server.settings.RUN_EVENTS_KEEPALIVE_SECONDS * 1000;

/**
 * A look at whether the request's credential still authenticates its caller: `onLost` is called
 * once it no longer does (its API key revoked, deleted or expired, its token outdated, its user
 * deactivated or deleted), before `raw`'s answer ended. Asked through the key and user caches
 * (stillAuthenticated), so an answer costs no database read per chunk. One check at a time (a slow
 * one is not overtaken by the next look's), and one end; a check that fails (the database down)
 * ends nothing.
 */
function credentialLook(request: FastifyRequest, raw: ServerResponse, fields: Record<string, unknown>, what: string, onLost: () => void): () => void {
  let checking = false;
  let lost = false;
  return () => {
    if (checking || lost) return;
    checking = true;
    void stillAuthenticated(request).then(
      (authenticated) => {
        checking = false;
        if (authenticated || lost || raw.destroyed || raw.writableEnded) return;
        lost = true;
        request.log.info(fields, `${what} ended: its credential no longer authenticates`);
        onLost();
      },
      () => (checking = false),
    );
  };
}

/**
 * Cuts off `raw`'s stream once its reader has taken nothing for STALLED_READER_KEEPALIVES
 * intervals of RUN_EVENTS_KEEPALIVE_SECONDS (watchStalledReader): the same for every long-lived
 * stream of the API, run events and /v1 completions alike. Destroying the response is what a
 * client leaving does: a model call held back for it is aborted (and metered as aborted), a run's
 * reader stops. With `onCredentialLost` (run-event streams, streamed /v1 completions), the
 * stream's credential is checked again at the same pace, on the same timer (credentialLook).
 */
export function cutOffStalledReader(request: FastifyRequest, raw: ServerResponse, fields: Record<string, unknown>, what: string, watch: StreamWatch = {}): void {
  const { onCutOff, onCredentialLost } = watch;
  // It stops by itself when the response closes, which every stream's end does. The stall watcher
  // goes on past a lost credential, so a reader that takes nothing after that end is still cut off.
  watchStalledReader(
    raw,
    lookIntervalMs(request),
    () => {
      request.log.info(fields, `${what} cut off: its reader took nothing`);
      onCutOff?.();
      raw.destroy();
    },
    onCredentialLost && credentialLook(request, raw, fields, what, onCredentialLost),
  );
}

/**
 * Checks the credential of an answer that is not streamed but outlives its request's
 * authentication (a non-stream `agent:` completion, which waits for its run's end) at the pace of
 * a stream's (every RUN_EVENTS_KEEPALIVE_SECONDS, credentialLook), until `raw` closes: `onLost`
 * ends it. Nothing is written to its socket before the answer, so it has no reader to stall.
 */
export function watchCredential(request: FastifyRequest, raw: ServerResponse, fields: Record<string, unknown>, what: string, onLost: () => void): void {
  lookUntilClosed(raw, lookIntervalMs(request), credentialLook(request, raw, fields, what, onLost));
}
