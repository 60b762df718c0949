import type { ServerResponse } from 'node:http';

import type { FastifyReply, FastifyRequest } from 'fastify';
import type { FastifyPluginAsyncZod } from 'fastify-type-provider-zod';
import { z } from 'zod';

import type { Run } from '../models/index.js';

import { authErrors, ErrorBody, listOf, Message } from '../schemas/common.js';
import { RunCreate, RunCreateWithThread, RunEventsQuery, RunIdParams, RunListQuery, RunPublic, RunRetryQuery, ThreadIdParams } from '../schemas/run.js';

import { eventDataJson, type RunEvent } from '../modules/agents/run-bus.js';
import { contextOf } from '../services/context.js';
import * as runService from '../services/run-service.js';
import { cutOffStalledReader } from '../services/stalled-readers.js';
import { requireUser } from '../utils/authentication.js';

const tags = ['runs'];
/** What a route that queues a run answers. */
const startAnswers = { 202: RunPublic, 402: ErrorBody, 404: ErrorBody, 409: ErrorBody, 429: ErrorBody, ...authErrors };

const publicPage = <T extends { data: Parameters<typeof runService.publicRun>[0][] }>(page: T) => ({ ...page, data: page.data.map(runService.publicRun) });

/** `Last-Event-ID` as a seq: a non-negative integer, anything else is ignored. */
function lastEventId(request: FastifyRequest): number | undefined {
  const value = request.headers['last-event-id'];
  return typeof value === 'string' && /^\d{1,15}$/.test(value.trim()) ? Number(value.trim()) : undefined;
}

/** 202 with the queued run and where to find it. */
function accepted(reply: FastifyReply, run: Run): FastifyReply {
  return reply.code(202).header('location', `${reply.server.prefix}/runs/${run.id}`).send(runService.publicRun(run));
}

const frame = (event: RunEvent) => `id: ${event.seq}\nevent: ${event.event}\ndata: ${eventDataJson(event)}\n\n`;

/** Runs of agents on threads (SPEC §5), and their event streams. */
export const runsRouter: FastifyPluginAsyncZod = async (app) => {
  app.addHook('onRequest', requireUser);

  // Open event streams end when the server closes (they would otherwise hold it open).
  const streams = new Set<AbortController>();
  app.addHook('preClose', (done) => {
    for (const stream of streams) stream.abort();
    done();
  });

  app.post(
    '/threads/:thread_id/runs',
    {
      schema: {
        operationId: 'create_thread_run',
        summary: 'Create Run',
        description:
          'Queues a run of an agent (default: your default agent) on the thread: **202** with the run. `input` becomes the thread\'s next user message first; without it the run answers the thread as it is, 422 at `input` when the thread has no message for the model to read (none, blank ones, tool results alone). One run is active on a thread at a time: under `multitask_strategy` `reject` (default) a busy thread answers 409, `enqueue` queues the run behind the active one, `interrupt` cancels it. 402 when billing is on and the balance cannot cover the first step; 429 beyond MAX_ACTIVE_RUNS_PER_USER. 409 too when `input` would take the thread past MAX_MESSAGES_PER_THREAD messages (an `enqueue` run\'s input counts from its start): start a new thread.',
        tags,
        params: ThreadIdParams,
        body: RunCreate,
        response: startAnswers,
      },
    },
    async (request, reply) => {
      return accepted(reply, await runService.startOnThread(contextOf(request), app.runs, request.params.thread_id, request.body));
    },
  );

  app.get(
    '/threads/:thread_id/runs',
    {
      schema: {
        operationId: 'list_thread_runs',
        summary: 'List Thread Runs',
        description: 'Newest first; `?status=` narrows the list.',
        tags,
        params: ThreadIdParams,
        querystring: RunListQuery,
        response: { 200: listOf(RunPublic), 404: ErrorBody, ...authErrors },
      },
    },
    async (request) => publicPage(await runService.listForThread(contextOf(request), request.params.thread_id, request.query)),
  );

  app.post(
    '/runs',
    {
      schema: {
        operationId: 'create_run',
        summary: 'Create Run With Thread',
        description: 'A new thread (`thread.title`, `thread.project_id`) with `input` as its first message, and a run on it: **202** with the run.',
        tags,
        body: RunCreateWithThread,
        response: startAnswers,
      },
    },
    async (request, reply) => {
      return accepted(reply, await runService.startWithThread(contextOf(request), app.runs, request.body));
    },
  );

  app.get(
    '/runs/active',
    {
      schema: {
        operationId: 'list_active_runs',
        summary: 'List Active Runs',
        description: 'Your queued and running runs, newest first.',
        tags,
        querystring: RunListQuery.omit({ status: true }),
        response: { 200: listOf(RunPublic), ...authErrors },
      },
    },
    async (request) => publicPage(await runService.listActive(contextOf(request), request.query)),
  );

  app.get(
    '/runs/:run_id',
    {
      schema: { operationId: 'get_run', summary: 'Get Run', tags, params: RunIdParams, response: { 200: RunPublic, 404: ErrorBody, ...authErrors } },
    },
    async (request) => runService.publicRun(await runService.get(contextOf(request), request.params.run_id)),
  );

  app.delete(
    '/runs/:run_id',
    {
      schema: {
        operationId: 'delete_run',
        summary: 'Delete Run',
        description: 'An ended run and its events (its messages stay in the thread); 409 while it is queued or running.',
        tags,
        params: RunIdParams,
        response: { 200: Message, 404: ErrorBody, 409: ErrorBody, ...authErrors },
      },
    },
    async (request) => {
      await runService.remove(contextOf(request), request.params.run_id);
      return { message: 'Run deleted successfully' };
    },
  );

  app.post(
    '/runs/:run_id/cancel',
    {
      schema: {
        operationId: 'cancel_run',
        summary: 'Cancel Run',
        description: 'Cancels a queued or running run; a running run\'s model call is aborted at once. 409 once the run has ended.',
        tags,
        params: RunIdParams,
        response: { 200: RunPublic, 404: ErrorBody, 409: ErrorBody, ...authErrors },
      },
    },
    async (request) => runService.publicRun(await runService.cancel(contextOf(request), app.runs, request.params.run_id)),
  );

  app.post(
    '/runs/:run_id/retry',
    {
      schema: {
        operationId: 'retry_run',
        summary: 'Retry Run',
        description:
          'A new run with the same agent, model and input, for a failed or cancelled run (409 otherwise): **202** with the new run. A run active on the thread now is met by `?multitask_strategy=`, `reject` by default (409 naming it), never by the retried run\'s own strategy: a retry cancels an active run only when asked to (`interrupt`). A retry whose input is not in the thread (its message deleted, or an `enqueue` run cancelled before it took the thread) appends it: 409 when that would take the thread past MAX_MESSAGES_PER_THREAD messages. 409 too for a run that had no input, on a thread left with no message for the model to read (its messages deleted since): the model would have nothing to answer.',
        tags,
        params: RunIdParams,
        querystring: RunRetryQuery,
        response: startAnswers,
      },
    },
    async (request, reply) => {
      return accepted(reply, await runService.retry(contextOf(request), app.runs, request.params.run_id, request.query.multitask_strategy));
    },
  );

  app.get(
    '/runs/:run_id/events',
    {
      schema: {
        operationId: 'stream_run_events',
        summary: 'Stream Run Events',
        description:
          'Server-Sent Events: `id:` the event\'s seq (from 1), `event:` its name, `data:` JSON with `run_id` and `seq`. With `Last-Event-ID: N` or `?after=N` (both: the later one) every event after N comes exactly once, then the live ones; the stream ends after the final event (`run.completed`, `run.failed`, `run.cancelled`). Every `message.created` ends in a `message.completed`: one whose step never reached the thread (the run was cancelled or failed mid-message, or resumed after its worker stopped) has `status: "incomplete"`, `reason` (`cancelled`, `failed`, `interrupted`) and the text and tool calls streamed so far, and is not in the thread (`GET /threads/{id}/messages`). Every `tool.call` gets its `tool.result` (`tool_call_id`, `name`, `content`, `is_error`, `step`) before its message\'s `message.completed`: one whose tool was still running when the run stopped is an error result (`content` "Error: the tool call did not complete: …", `is_error: true`) with `status: "incomplete"` and the same `reason`. Keep-alive comments at least every RUN_EVENTS_KEEPALIVE_SECONDS; at one of them a stream whose credential no longer works (its API key revoked, deleted or expired, its token outdated, its user deactivated) ends, and a reconnect answers 401. A reader that takes nothing for four keep-alive intervals (its connection full) is disconnected: reconnect with `Last-Event-ID` for the rest. **410** when the run ended more than RUN_EVENTS_TTL_SECONDS ago and its events are gone (`GET /runs/{id}` has its final state); **429** (with `retry-after`) when you hold RUN_EVENTS_MAX_STREAMS_PER_USER event streams open on this server already (streamed `agent:` completions count too): close one first; **503** when the event store (Redis) cannot be reached.',
        tags,
        params: RunIdParams,
        querystring: RunEventsQuery,
        response: {
          200: { description: 'The run\'s events', content: { 'text/event-stream': { schema: z.string().describe('Server-Sent Events').meta({ id: 'RunEventStream' }) } } },
          404: ErrorBody,
          410: ErrorBody,
          429: ErrorBody,
          503: ErrorBody,
          ...authErrors,
        },
      },
    },
    async (request, reply) => {
      // Counted from here until the socket closes, whatever the answer (the stream, a 404, a HEAD):
      // before the run is looked up, so a user at the limit costs no query.
      app.eventStreams.hold(request.principal.user.id, reply.raw);
      // Both: an EventSource opened with ?after=N reconnects to that URL with Last-Event-ID: M. The
      // later one, so what the client has is not sent again.
      const after = Math.max(request.query.after ?? 0, lastEventId(request) ?? 0);
      const { run, done } = await runService.eventsFrom(contextOf(request), app.runs, request.params.run_id, after);
      // HEAD (Fastify's, from this GET) answers the stream's headers and ends: it would otherwise wait, bodiless, for the run's end.
      streamEvents(request, reply, run.id, after, done || request.method === 'HEAD', streams);
    },
  );
};

/**
 * Writes the run's events as SSE until the final one, the client leaves or the server closes. The
 * run never waits for this client: the log buffers a bounded number of events per reader and a
 * slower one catches up from the log (its socket's backpressure only slows this loop).
 */
function streamEvents(request: FastifyRequest, reply: FastifyReply, runId: string, after: number, done: boolean, streams: Set<AbortController>): void {
  const { settings, runs, log, eventStreams } = request.server;
  void reply.hijack();
  const raw = reply.raw;
  raw.writeHead(200, {
    ...(reply.getHeaders() as Record<string, string>),
    'content-type': 'text/event-stream; charset=utf-8',
    'cache-control': 'no-store',
    'x-accel-buffering': 'no',
  });
  if (done) {
    raw.end();
    return;
  }
  const controller = new AbortController();
  streams.add(controller);
  const leave = () => controller.abort();
  raw.on('close', leave);
  // Events that arrive together (a model's burst of deltas, a step's messages) go out in one write;
  // the headers and the first comment go with the events the reader replays at once.
  let corked = false;
  const uncork = () => {
    corked = false;
    raw.uncork();
  };
  const corkOnce = () => {
    if (corked) return;
    corked = true;
    raw.cork();
    process.nextTick(uncork);
  };
  corkOnce();
  raw.write(': connected\n\n');
  // Whether an event went out since the last keep-alive: a stream that waits that long checks that
  // its run still exists. A run deleted before its final event was written (with its thread, project
  // or owner, a moment after a cancel) gets none: its stream ends rather than waiting for ever.
  let quiet = true;
  const keepAlive = setInterval(() => {
    raw.write(': keep-alive\n\n');
    if (quiet) void runService.stillStored(runs.db, runId).then((stored) => stored || controller.abort(), () => undefined);
    quiet = true;
  }, settings.RUN_EVENTS_KEEPALIVE_SECONDS * 1000);
  // A reader that takes nothing for that long is gone or holding the connection: it is cut off (it
  // may reconnect with its Last-Event-ID), not kept with its socket, reader and timer for good.
  // The stream outlives its request's authentication: once its API key is revoked, deleted or
  // expired (or its token outdated, its user deactivated), it ends at the next look rather than
  // with the run, which goes on when the key did not start it; a reconnect answers 401.
  cutOffStalledReader(request, raw, { runId }, 'run event stream', {
    onCutOff: () => eventStreams.cutOffStalled(),
    onCredentialLost: () => controller.abort(),
  });
  void (async () => {
    try {
      for await (const event of runs.bus.events.read(runId, after, controller.signal)) {
        quiet = false;
        corkOnce();
        await writeFrame(raw, frame(event), controller.signal);
      }
    } catch (error) {
      if (!controller.signal.aborted) log.error({ err: error, runId }, 'run event stream failed');
    } finally {
      // The stall watcher is left to stop itself at the close: a reader that takes nothing of the
      // end is still cut off rather than holding its socket until TCP gives up.
      clearInterval(keepAlive);
      streams.delete(controller);
      raw.off('close', leave);
      raw.end();
    }
  })();
}

/**
 * Bytes of a large event's frame written at a time. A write counts in the socket's buffered length
 * until all of it is out: a reader taking one large event (megabytes of text) slowly would show no
 * progress (see watchStalledReader) until the end of it; slice by slice it does.
 */
const FRAME_SLICE_BYTES = 64 * 1024;

/** Writes one event's frame, waiting for the reader to take it (a reader that takes nothing is cut off by watchStalledReader, which ends the wait). */
async function writeFrame(raw: ServerResponse, text: string, signal: AbortSignal): Promise<void> {
  if (text.length <= FRAME_SLICE_BYTES) {
    if (!raw.write(text)) await drained(raw, signal);
    return;
  }
  const bytes = Buffer.from(text);
  for (let at = 0; at < bytes.length && !signal.aborted; at += FRAME_SLICE_BYTES) {
    if (!raw.write(bytes.subarray(at, at + FRAME_SLICE_BYTES))) await drained(raw, signal);
  }
}

/** Resolves when the socket can take more or the stream is over. */
function drained(raw: ServerResponse, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const finish = () => {
      raw.off('drain', finish);
      signal.removeEventListener('abort', finish);
      resolve();
    };
    raw.once('drain', finish);
    signal.addEventListener('abort', finish, { once: true });
  });
}
