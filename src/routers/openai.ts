import type { FastifyError, FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { type FastifyPluginAsyncZod, validatorCompiler } from 'fastify-type-provider-zod';

import { noteRefusal } from '../core/access-log.js';
import { ShuttingDownError, UnauthorizedError } from '../core/errors.js';
import { shutdownCutAtMs } from '../core/http-server.js';
import { type JsonBodyCheck,jsonBodyParser } from '../core/json-body.js';

import {
  ChatCompletion,
  ChatCompletionEvents,
  ChatCompletionRequest,
  ChatRequestBounds,
  chatRequestBoundsIssue,
  EmbeddingList,
  EmbeddingRequest,
  MAX_BODY_DEPTH,
  MAX_BODY_VALUES,
  MAX_JSON_DEPTH,
  openAIErrors,
  OpenAIModel,
  OpenAIModelList,
  OpenAIModelParams,
  SHAPE_CHECKED_FROM_BYTES,
  simpleChatRequest,
} from '../schemas/openai.js';

import { CallerAbort, ModelNotFoundError } from '../modules/ai-models/index.js';
import { isAgentModel } from '../services/agent-completions.js';
import {
  callContext,
  CodedOpenAIError,
  completionBody,
  CompletionFrames,
  completionJson,
  embeddingsAnswer,
  InvalidRequestError,
  modelObject,
  openAIErrorFrom,
  openStream,
  paramOf,
  toChatRequest,
  toEmbedRequest,
} from '../services/openai-gateway.js';
import { cutOffStalledReader } from '../services/stalled-readers.js';
import { requireUser } from '../utils/authentication.js';
import { jsonShapeIssue } from '../utils/json-shape.js';
import { agentModelRoutes } from './openai-agents.js';

/** Where the OpenAI-compatible surface lives: clients set `baseURL` to `<keel>/v1`. */
export const OPENAI_PREFIX = '/v1';

const tags = ['openai'];
const JSON_TYPE = 'application/json; charset=utf-8';

/** What a /v1 route threw, for the error object's type and code (the app's handler answers `{detail}` first). */
const thrownErrors = new WeakMap<FastifyRequest, unknown>();

/**
 * What aborts a call when the client goes away before the answer is complete: the model manager
 * aborts the upstream request with it. A CallerAbort, not an AbortController: nothing on this path
 * needs an AbortSignal of the caller's, and one costs more per call than the rest of the
 * plumbing (see modules/ai-models/abort.ts).
 */
function disconnectSignal(reply: FastifyReply, inFlight: Set<CallerAbort>): CallerAbort {
  const abort = new CallerAbort();
  inFlight.add(abort);
  // A response closes once: `on`, not `once`, whose wrapper (a bound function and its state) is ~100 bytes a call.
  reply.raw.on('close', () => {
    inFlight.delete(abort);
    if (!reply.raw.writableFinished) abort.abort();
  });
  return abort;
}

/**
 * Once closing, the model calls still in flight (long streams) are aborted shortly before the
 * shutdown deadline (shutdownCutAtMs): a stream then ends with an error event and its call is
 * metered and its hold released, where the deadline's exit had cut it off silently, unmetered,
 * its credit held until the reservation expired.
 */
function cutOffAtShutdown(app: FastifyInstance, inFlight: Set<CallerAbort>): void {
  let timer: NodeJS.Timeout | undefined;
  app.addHook('preClose', (done) => {
    timer = setTimeout(() => {
      const reason = new ShuttingDownError();
      for (const call of inFlight) call.abort(reason);
    }, shutdownCutAtMs(app.settings));
    timer.unref();
    done();
  });
  app.addHook('onClose', (_instance, done) => {
    clearTimeout(timer);
    done();
  });
}

/**
 * The OpenAI-compatible gateway: a thin adapter over `app.models` (the one call path). Errors are
 * OpenAI's error objects with OpenAI's status codes: the app's error handler maps every error
 * (as for the rest of the API) and this plugin's onSend hook reshapes its `{detail}`.
 */
export const openaiRouter: FastifyPluginAsyncZod = async (app) => {
  const { models } = app;
  const inFlight = new Set<CallerAbort>();
  app.addHook('onRequest', requireUser);
  // OpenAI's routes take JSON only: the app's text and form parsers (kept for the rest of the API)
  // read `curl -d` and `text/plain` bodies as a string or a form, which the schema then refused
  // as "expected object" or "model: missing" instead of naming the content type (415 below).
  // JSON is read as the app reads it, its shape first (shapeRefusal).
  app.removeContentTypeParser(['text/plain', 'application/x-www-form-urlencoded', 'application/json']);
  app.addContentTypeParser('application/json', { parseAs: 'string' }, jsonBodyParser(app, shapeRefusal));
  registerOpenAIErrors(app);
  cutOffAtShutdown(app, inFlight);
  const agents = agentModelRoutes(app);

  app.get(
    '/models',
    {
      schema: {
        operationId: 'openai_list_models',
        summary: 'List Models (OpenAI)',
        description:
          'The enabled models a call answers (their provider configured, or a fallback of theirs that stands in while it is not), as OpenAI lists models, then your agents as `agent:<id>` (`owned_by: keel-agent`). ' +
          'A model\'s `owned_by` is its own provider, also while a fallback answers for it (the id is that model\'s; an answer names the model that gave it, and `GET /api/v1/models/{id}` says `answered_by`).',
        tags,
        response: { 200: OpenAIModelList, ...openAIErrors },
      },
    },
    async (request) => ({
      object: 'list' as const,
      data: [
        ...models
          .listAvailableModels()
          .filter((m) => models.answersFor(m) !== undefined)
          .map((m) => modelObject(m.id, m.provider)),
        ...(await agents.list(request)),
      ],
    }),
  );

  app.get(
    '/models/:model',
    {
      schema: {
        operationId: 'openai_retrieve_model',
        summary: 'Retrieve Model (OpenAI)',
        description: 'By id or alias (an id\'s slashes escaped or not: `/v1/models/meta-llama/Llama-3.1-8B-Instruct`), or `agent:<id>` for an agent you may use; 404 `model_not_found` for a model the list leaves out (unknown, disabled, or its provider not configured and no fallback standing in) and another user\'s agent.',
        tags,
        params: OpenAIModelParams,
        response: { 200: OpenAIModel, ...openAIErrors },
      },
    },
    async (request) => {
      const { model } = request.params;
      if (isAgentModel(model)) return agents.retrieve(request, model);
      const found = models.modelAsCalled(model);
      // What the list leaves out is not found here either: a model whose provider is not configured, and none of whose fallbacks can answer for it, cannot be called.
      if (!found || !found.enabled || models.answersFor(found) === undefined) throw new ModelNotFoundError(model);
      // Its own provider, as listed, whoever answers for it now: owned_by says whose model the id is.
      return modelObject(found.id, found.provider);
    },
  );

  app.post(
    '/chat/completions',
    {
      bodyLimit: app.settings.GATEWAY_BODY_LIMIT_BYTES,
      // The usual body is checked by hand (simpleChatRequest); any other, and every invalid one, by
      // Zod. First its bounds, by counting: the work of either check grows with what it counts.
      validatorCompiler: (route) => {
        const zod = validatorCompiler(route as unknown as Parameters<typeof validatorCompiler>[0]);
        if (route.httpPart !== 'body') return zod;
        const bounds = validatorCompiler({ ...route, schema: ChatRequestBounds });
        return (data: unknown) => {
          if (chatRequestBoundsIssue(data)) return bounds(data);
          const simple = simpleChatRequest(data);
          return simple ? { value: simple } : zod(data);
        };
      },
      schema: {
        operationId: 'openai_create_chat_completion',
        summary: 'Create Chat Completion (OpenAI)',
        description:
          'OpenAI\'s Chat Completions through the model manager (retries, fallbacks, timeouts, metering). `stream: true` answers `text/event-stream` in OpenAI\'s chunk framing, ending in `data: [DONE]`. Only `n=1`. With `model: agent:<id>` the agent runs on a thread — `metadata.thread_id`, or a new one that the earlier user/assistant messages start — the last message (the user\'s) is its input, and the answer is the run\'s (`x-keel-thread-id`, `x-keel-run-id` headers; `metadata` in the body). A stream whose run starts later than GATEWAY_STREAM_HEARTBEAT_MS answers 200 with keep-alives first: a start refused then is its error event, and its headers name a run (and new thread) that was never made. A stream is sent only as fast as its client reads it (the upstream is held back meanwhile); a client that takes nothing for four intervals of RUN_EVENTS_KEEPALIVE_SECONDS (its connection full) is disconnected, its call aborted (and metered as such; an agent\'s run cancelled). For agents: system, tool messages and `tools` are 400; 404 `model_not_found` for another user\'s agent; 409 while a run works on the thread, and when the history and input would take the thread past MAX_MESSAGES_PER_THREAD messages (start a new thread); 429 `rate_limit_exceeded` (with `retry-after`, before any run starts) for a stream when you hold RUN_EVENTS_MAX_STREAMS_PER_USER run-event streams open on this server already; 500 `agent_run_failed` with the run\'s error; 503 `service_unavailable` before anything is written when the run events cannot be reached (a run whose events cannot be read after its start for 6 s running is cancelled before that 503, so a retry starts the only run; a shorter outage is read through). A stream whose run is resumed mid-step (its worker stopped) does not send the text it sent already again: it goes on after it; when the resumed step says something else, the stream ends with an error event `agent_run_resumed` (not to be retried: the run goes on, and GET /api/v1/runs/{run_id} or its thread has the answer), and a non-stream answer is always the thread\'s.',
        tags,
        body: ChatCompletionRequest,
        // Both answers a client generator should know of: the completion, or (`stream: true`) its events.
        response: { 200: { content: { 'application/json': { schema: ChatCompletion }, 'text/event-stream': { schema: ChatCompletionEvents } } }, ...openAIErrors },
      },
    },
    async (request, reply) => {
      const { body } = request;
      if (isAgentModel(body.model)) return agents.complete(request, reply);
      const caller = disconnectSignal(reply, inFlight);
      const chat = toChatRequest(body, callContext(request.principal), caller, request.hops);
      if (body.stream) {
        const opened = await openStream(models.stream(chat), body.model, app.settings.GATEWAY_STREAM_HEARTBEAT_MS);
        const frames = new CompletionFrames(opened.model, body.stream_options?.include_usage === true);
        cutOffStalledReader(request, reply.raw, { model: body.model }, 'chat completion stream', {
          onCutOff: () => app.metrics.chatCompletionStreams.stalled.inc(),
          // A stream outlives its request's authentication: once its key is revoked or deleted (its
          // token outdated, its user deactivated or deleted) it ends with a 401 error event, its
          // upstream call aborted and metered for what it streamed, rather than at the model's end.
          onCredentialLost: () => caller.abort(new UnauthorizedError()),
        });
        return reply
          .header('content-type', 'text/event-stream; charset=utf-8')
          .header('cache-control', 'no-cache')
          .header('x-accel-buffering', 'no')
          .send(completionBody(opened, frames, request.log, reply.raw) as never);
      }
      const result = await models.chat(chat);
      return reply.type(JSON_TYPE).send(completionJson(result));
    },
  );

  app.post(
    '/embeddings',
    {
      bodyLimit: app.settings.GATEWAY_BODY_LIMIT_BYTES,
      schema: {
        operationId: 'openai_create_embeddings',
        summary: 'Create Embeddings (OpenAI)',
        description: 'Embeddings of one text or a list of texts; `encoding_format: base64` sends little-endian float32 values.',
        tags,
        body: EmbeddingRequest,
        response: { 200: EmbeddingList, ...openAIErrors },
      },
    },
    async (request, reply) => {
      const { body } = request;
      const result = await models.embed(toEmbedRequest(body, callContext(request.principal), disconnectSignal(reply, inFlight), request.hops));
      return reply.type(JSON_TYPE).send(embeddingsAnswer(result, body.encoding_format) as never);
    },
  );
};

/**
 * A body's shape, read before it is parsed when it is long enough for its parse to cost
 * (utils/json-shape.ts): one nesting past MAX_BODY_DEPTH or holding more than MAX_BODY_VALUES
 * values is a 400 naming the bound and where it was passed, before JSON.parse spends seconds of the
 * event loop on it. (A compressed body never comes here: it is refused with 415 before parsing.)
 */
const shapeRefusal: JsonBodyCheck = (_request, text) => {
  if (text.length <= SHAPE_CHECKED_FROM_BYTES) return undefined;
  const issue = jsonShapeIssue(text, MAX_BODY_DEPTH, MAX_BODY_VALUES);
  if (!issue) return undefined;
  if (issue.kind === 'depth') {
    const message = `The request body nests deeper than ${MAX_BODY_DEPTH} levels of arrays and objects; a JSON Schema (a tool's parameters, a response format's schema) nests no deeper than ${MAX_JSON_DEPTH} levels`;
    return new InvalidRequestError(message, paramOf(['body', ...deepField(issue.path)]));
  }
  return new InvalidRequestError(`The request body holds more than ${MAX_BODY_VALUES} JSON values (array items and object members, at any depth): no request of this API needs as many`, paramOf(['body', ...issue.path.slice(0, 1)]));
};

/**
 * The field a body nested too deeply is refused at: a schema where the schema's own check names it
 * (`tools[0].function.parameters`, `response_format.json_schema.schema`), else the first four steps
 * of the path (`metadata.a[0][0]`), not every level down to the bound.
 */
function deepField(path: readonly (string | number)[]): readonly (string | number)[] {
  if (path[0] === 'tools' && path[2] === 'function' && path[3] === 'parameters') return path.slice(0, 4);
  if (path[0] === 'response_format' && path[1] === 'json_schema' && path[2] === 'schema') return path.slice(0, 3);
  return path.slice(0, 4);
}

/** OpenAI's refusal of a body that is not JSON (415, `unsupported_content_type`), naming what was sent. */
function unsupportedContentType(contentType: string | undefined): CodedOpenAIError {
  const sent = contentType?.trim() ? `you specified the header 'Content-Type: ${contentType.trim().slice(0, 100)}'` : 'you sent no Content-Type header';
  return new CodedOpenAIError(415, `Unsupported content type. This API method only accepts 'application/json' requests, but ${sent}. Send the body as JSON with 'Content-Type: application/json'.`, 'unsupported_content_type');
}

/**
 * Errors under /v1 in OpenAI's shape, unknown URLs and wrong methods included: this context's error
 * handler notes what was thrown and hands it on to the app's handler (which logs it and picks the
 * status and `{detail}`); the preSerialization hook turns that `{detail}` into OpenAI's error
 * object before the response schema serializes it. Success answers are strings (or a list object)
 * and pass untouched.
 */
function registerOpenAIErrors(app: FastifyInstance): void {
  app.setErrorHandler((error, request) => {
    // The app's handler answers it (and reads the rest of the body); the client is told in OpenAI's words.
    thrownErrors.set(request, (error as FastifyError).code === 'FST_ERR_CTP_INVALID_MEDIA_TYPE' ? unsupportedContentType(request.headers['content-type']) : error);
    throw error;
  });
  // Unknown URLs and wrong methods under /v1 too: the app's not-found handler throws, this context's error handler notes it.
  app.setNotFoundHandler((request) => app.routeNotFound(request));
  app.addHook('preSerialization', (request, reply, payload: unknown, done) => {
    if (reply.statusCode < 400 || payload === null || typeof payload !== 'object' || !('detail' in payload)) return done(null, payload);
    const { status, body, headers } = openAIErrorFrom(reply.statusCode, payload.detail, thrownErrors.get(request));
    noteRefusal(request, body.error.message.slice(0, 300));
    void reply.code(status);
    if (headers) void reply.headers(headers);
    done(null, body);
  });
}
