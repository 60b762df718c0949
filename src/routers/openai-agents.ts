import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';

import type { ChatCompletionRequest } from '../schemas/openai.js';

import {
  agentCompletionChunks,
  agentCompletionJson,
  agentModelObject,
  answerOfRun,
  cancelUnread,
  CLIENT_LEFT,
  type CompletionIds,
  completionIds,
  CREDENTIAL_LOST,
  listAgentModels,
  type OpenedRun,
  resolveAgentModel,
  SERVER_CLOSING,
  startAgentCompletion,
} from '../services/agent-completions.js';
import { contextOf, type ServiceContext } from '../services/context.js';
import { firstEvent, keptAlive } from '../services/openai-gateway.js';
import { cutOffStalledReader, watchCredential } from '../services/stalled-readers.js';

/** Runs `listener` once `signal` aborts (now, if it already has). */
function whenAborted(signal: AbortSignal, listener: () => void): void {
  if (signal.aborted) listener();
  else signal.addEventListener('abort', listener, { once: true });
}

/** The headers that say which thread and run a completion's are. */
function nameRun(reply: FastifyReply, { runId, threadId }: Pick<CompletionIds, 'runId' | 'threadId'>): void {
  void reply.header('x-keel-thread-id', threadId).header('x-keel-run-id', runId);
}

/**
 * The `agent:<id>` models of /v1 (services/agent-completions.ts), for the OpenAI router: called in
 * its context, so errors are OpenAI's error objects. Each completion reads its run's events until
 * the run ends; a client that leaves first cancels the run (so does a credential that stops
 * working, streamed or not), and a server that closes ends the read (the run is handed back and resumes, as
 * any run does).
 */
export function agentModelRoutes(app: FastifyInstance) {
  const readers = new Set<AbortController>();
  app.addHook('preClose', (done) => {
    for (const reader of readers) reader.abort(SERVER_CLOSING);
    done();
  });

  async function complete(request: FastifyRequest<{ Body: ChatCompletionRequest }>, reply: FastifyReply): Promise<FastifyReply> {
    const { body } = request;
    // A stream holds its run's reader and its socket for as long as its client keeps it, the run's
    // end included: counted with the user's run-event streams until the socket closes, refused (429)
    // before the run starts. A non-stream answer reads only while its run is active
    // (MAX_ACTIVE_RUNS_PER_USER bounds those) and is sent whole at its end.
    if (body.stream) app.eventStreams.hold(request.principal.user.id, reply.raw);
    const ctx = contextOf(request);
    // Listening from the start: a client that leaves while the run is being queued still cancels it.
    const reader = new AbortController();
    readers.add(reader);
    reply.raw.once('close', () => {
      readers.delete(reader);
      if (!reply.raw.writableFinished) reader.abort(CLIENT_LEFT);
    });
    // Chosen before the start: a stream's head may go out before the run's insert (below).
    const ids = completionIds(body);
    // The answer outlives its request's authentication: once its credential stops working (a key
    // expired, a token outdated, which cancel no run by themselves; a revocation or deactivation,
    // which do) the run it started is cancelled as for a client that left, not left running and
    // charged for nobody, and the answer is the 401 that credential now gets (answerOf).
    const onCredentialLost = () => reader.abort(CREDENTIAL_LOST);
    const watched = { model: body.model, runId: ids.runId };
    // The run started and its first piece read, as one wait: a stream's heartbeat (firstEvent) runs
    // from before the run's insert, so a slow start (a lock wait, a busy database) is a silence the
    // client is kept from as a model's is.
    const opening = openRun(ctx, body, ids, reader.signal, reply);
    if (body.stream) {
      // The first piece before any byte (a run that fails to start, or before its first text,
      // answers an HTTP error), or, past GATEWAY_STREAM_HEARTBEAT_MS, a keep-alive first, as the catalog's streams.
      const { first, heartbeat } = await firstEvent(opening, app.settings.GATEWAY_STREAM_HEARTBEAT_MS);
      const late = first instanceof Promise;
      // Late, the head goes out now, maybe before the run exists: with the ids it is being made
      // with. A start refused after this is the stream's error event, under ids of no run.
      if (late) nameRun(reply, ids);
      const chunks = agentCompletionChunks(first, ids, body.model, body.stream_options?.include_usage === true, request.log);
      cutOffStalledReader(request, reply.raw, watched, 'agent completion stream', {
        // Counted with the run-event streams it is held among (hold, above): its run is cancelled, as for a client that left.
        onCutOff: () => app.eventStreams.cutOffStalled(),
        onCredentialLost,
      });
      return reply
        .header('content-type', 'text/event-stream; charset=utf-8')
        .header('cache-control', 'no-cache')
        .header('x-accel-buffering', 'no')
        .send(keptAlive(chunks, heartbeat, late));
    }
    // Nothing is written before the answer: only the credential is watched, at a stream's pace.
    watchCredential(request, reply.raw, watched, 'agent completion', onCredentialLost);
    const { run, pieces, first } = await opening;
    let next = first;
    // The text as it streams (and whether it diverged) is a stream's concern: the answer is the run's as written.
    while (!next.done && next.value.type !== 'done') next = await pieces.next();
    // answerOf's last piece is the answer, or it throws: it never just ends.
    if (next.done || next.value.type !== 'done') throw new Error('run events ended without an answer');
    return reply.type('application/json; charset=utf-8').send(agentCompletionJson(run, body.model, next.value));
  }

  /**
   * Starts the completion's run, with `ids`, and reads its answer's first piece. A client that
   * leaves, before the run exists or after, has it cancelled. The run's headers are set once it
   * exists (an error after the start carries them too), unless the head went out before (a stream
   * whose start outlasted the heartbeat's interval, which set them from `ids`).
   */
  async function openRun(ctx: ServiceContext, body: ChatCompletionRequest, ids: CompletionIds, signal: AbortSignal, reply: FastifyReply): Promise<OpenedRun> {
    const run = await startAgentCompletion(ctx, app.runs, body, ids);
    ids.started = true;
    whenAborted(signal, () => void cancelUnread(ctx, app.runs, run.id, signal.reason));
    // reply.sent is only the end of the body: headersSent is the head's.
    if (!reply.raw.headersSent) nameRun(reply, { runId: run.id, threadId: run.thread_id });
    const pieces = answerOfRun(ctx, app.runs, run.id, signal)[Symbol.asyncIterator]();
    return { run, pieces, first: await pieces.next() };
  }

  return {
    complete,
    list: (request: FastifyRequest) => listAgentModels(contextOf(request)),
    retrieve: async (request: FastifyRequest, model: string) => agentModelObject(await resolveAgentModel(contextOf(request), model)),
  };
}
