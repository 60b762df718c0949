import type { FastifyPluginAsyncZod } from 'fastify-type-provider-zod';

import { authErrors, ErrorBody, listOf, Message } from '../schemas/common.js';
import { ModelCreate, ModelIdParams, ModelListQuery, ModelPublic, ModelUpdate } from '../schemas/model.js';

import { contextOf } from '../services/context.js';
import * as modelService from '../services/model-service.js';
import { requireSuperuser, requireUser } from '../utils/authentication.js';

const tags = ['models'];

/** The model catalog: every user (and scoped key) reads it; superusers change it. */
export const modelsRouter: FastifyPluginAsyncZod = async (app) => {
  const { models } = app;

  app.get(
    '/models',
    {
      onRequest: requireUser,
      schema: {
        operationId: 'list_models',
        summary: 'List Models',
        description: 'Enabled models by priority (highest first); `include_disabled=true` adds the disabled ones. Prices are decimal strings per million tokens.',
        tags,
        querystring: ModelListQuery,
        response: { 200: listOf(ModelPublic), ...authErrors },
      },
    },
    async (request) => modelService.list(models, request.query),
  );

  app.post(
    '/models',
    {
      onRequest: requireSuperuser,
      schema: {
        operationId: 'create_model',
        summary: 'Create Model',
        description:
          'Superusers only. A built-in id creates an override of that model; another id a custom model, which needs `provider` (a built-in provider or a provider record name) and `pricing`. 409 when the model already has an override or exists; a deleted built-in is restored. 422 naming the field when an alias or the id names another model, or a fallback is unknown, the model itself or cannot do what the model does. Catalog writes are checked and written one at a time on every node, against the catalog as the database holds it.',
        tags,
        body: ModelCreate,
        response: { 200: ModelPublic, 404: ErrorBody, 409: ErrorBody, ...authErrors },
      },
    },
    async (request, reply) => {
      const created = await modelService.create(contextOf(request), models, request.body);
      void reply.header('location', `${app.prefix}/models/${encodeURIComponent(created.id)}`);
      return created;
    },
  );

  app.get(
    '/models/:model_id',
    {
      onRequest: requireUser,
      schema: {
        operationId: 'get_model',
        summary: 'Get Model',
        description: 'By id or alias (an alias answers the model it names). A disabled model is shown too.',
        tags,
        params: ModelIdParams,
        response: { 200: ModelPublic, 404: ErrorBody, ...authErrors },
      },
    },
    async (request) => modelService.get(models, request.params.model_id),
  );

  app.patch(
    '/models/:model_id',
    {
      onRequest: requireSuperuser,
      schema: {
        operationId: 'update_model',
        summary: 'Update Model',
        description:
          'Superusers only: enable or disable, change prices (the whole `pricing`), priority, fallbacks and the rest. Aliases and fallbacks are checked as for `POST /models` (422 naming the field), one write at a time on every node. 409 naming them when the change would break the fallbacks of other models (an alias they name dropped, a capability they need removed): change their fallbacks first. Disabling a model others name as a fallback is allowed (their calls skip it while it is disabled) and logged as a warning.',
        tags,
        params: ModelIdParams,
        body: ModelUpdate,
        response: { 200: ModelPublic, 404: ErrorBody, 409: ErrorBody, ...authErrors },
      },
    },
    async (request) => modelService.update(contextOf(request), models, request.params.model_id, request.body),
  );

  app.delete(
    '/models/:model_id',
    {
      onRequest: requireSuperuser,
      schema: {
        operationId: 'delete_model',
        summary: 'Delete Model',
        description:
          'Superusers only. A custom model is removed; a built-in one is hidden and its overrides dropped (`POST /models` with its id brings it back). 409 while other models name it as a fallback (remove it from their fallbacks first).',
        tags,
        params: ModelIdParams,
        response: { 200: Message, 404: ErrorBody, 409: ErrorBody, ...authErrors },
      },
    },
    async (request) => {
      await modelService.remove(contextOf(request), models, request.params.model_id);
      return { message: 'Model deleted successfully' };
    },
  );
};
