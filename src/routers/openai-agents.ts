import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';

import type { ChatCompletionRequest } from '../schemas/openai.js';

import {
  agentCompletionChunks,
  agentCompletionJson,
  agentModelObject,
  answerOf,
  cancelAbandoned,
  CLIENT_LEFT,
  listAgentModels,
  type OpenedRun,
  resolveAgentModel,
  SERVER_CLOSING,
  startAgentCompletion,
} from '../services/agent-completions.js';
import { contextOf, type ServiceContext } from '../services/context.js';
import { firstEvent, keptAlive } from '../services/openai-gateway.js';

/** Runs `listener` once `signal` aborts (now, if it already has). */
function whenAborted(signal: AbortSignal, listener: () => void): void {
  if (signal.aborted) listener();
  else signal.addEventListener('abort', listener, { once: true });
}

/**
 * The `agent:<id>` models of /v1 (services/agent-completions.ts), for the OpenAI router: called in
 * its context, so errors are OpenAI's error objects. Each completion reads its run's events until
 * the run ends; a client that leaves first cancels the run, and a server that closes ends the read
 * (the run is handed back and resumes, as any run does).
 */
export function agentModelRoutes(app: FastifyInstance) {
  const readers = new Set<AbortController>();
  app.addHook('preClose', (done) => {
    for (const reader of readers) reader.abort(SERVER_CLOSING);
    done();
  });

  async function complete(request: FastifyRequest<{ Body: ChatCompletionRequest }>, reply: FastifyReply): Promise<FastifyReply> {
    const { body } = request;
    const ctx = contextOf(request);
    // Listening from the start: a client that leaves while the run is being queued still cancels it.
    const reader = new AbortController();
    readers.add(reader);
    reply.raw.once('close', () => {
      readers.delete(reader);
      if (!reply.raw.writableFinished) reader.abort(CLIENT_LEFT);
    });
    // The run started and its first piece read, as one wait: a stream's heartbeat (firstEvent) runs
    // from before the run's insert, so a slow start (a lock wait, a busy database) is a silence the
    // client is kept from as a model's is.
    const opening = openRun(ctx, body, reader.signal, reply);
    if (body.stream) {
      // The first piece before any byte (a run that fails to start, or before its first text,
      // answers an HTTP error), or, past GATEWAY_STREAM_HEARTBEAT_MS, a keep-alive first, as the catalog's streams.
      const { first, heartbeat } = await firstEvent(opening, app.settings.GATEWAY_STREAM_HEARTBEAT_MS);
      const chunks = agentCompletionChunks(first, body.model, body.stream_options?.include_usage === true, request.log);
      return reply
        .header('content-type', 'text/event-stream; charset=utf-8')
        .header('cache-control', 'no-cache')
        .header('x-accel-buffering', 'no')
        .send(keptAlive(chunks, heartbeat, first instanceof Promise));
    }
    const { run, pieces, first } = await opening;
    let next = first;
    while (!next.done && next.value.type === 'text') next = await pieces.next();
    // answerOf's last piece is the answer, or it throws: it never just ends.
    if (next.done || next.value.type !== 'done') throw new Error('run events ended without an answer');
    return reply.type('application/json; charset=utf-8').send(agentCompletionJson(run, body.model, next.value));
  }

  /**
   * Starts the completion's run and reads its answer's first piece. A client that leaves, before
   * the run exists or after, has it cancelled. The run's headers go out with the answer's head,
   * unless a keep-alive sent that before the run existed (a stream whose start outlasted the
   * heartbeat's interval): its chunks' id, `chatcmpl-<run id>`, names the run then.
   */
  async function openRun(ctx: ServiceContext, body: ChatCompletionRequest, signal: AbortSignal, reply: FastifyReply): Promise<OpenedRun> {
    const run = await startAgentCompletion(ctx, app.runs, body);
    whenAborted(signal, () => {
      if (signal.reason === CLIENT_LEFT) void cancelAbandoned(ctx, app.runs, run.id);
    });
    void reply.header('x-keel-thread-id', run.thread_id).header('x-keel-run-id', run.id);
    const pieces = answerOf(app.runs.bus.events.read(run.id, 0, signal), signal)[Symbol.asyncIterator]();
    return { run, pieces, first: await pieces.next() };
  }

  return {
    complete,
    list: (request: FastifyRequest) => listAgentModels(contextOf(request)),
    retrieve: async (request: FastifyRequest, model: string) => agentModelObject(await resolveAgentModel(contextOf(request), model)),
  };
}
