import type { FastifyPluginAsyncZod } from 'fastify-type-provider-zod';

import { ApiKeyCreate, ApiKeyCreated, ApiKeyIdParams, ApiKeyPublic, ApiKeyUpdate } from '../schemas/api-key.js';
import { authErrors, HTTPError, listOf, Message, Pagination } from '../schemas/common.js';

import * as apiKeyService from '../services/api-key-service.js';
import { requireUser } from '../utils/authentication.js';

const tags = ['api-keys'];

export const apiKeysRouter: FastifyPluginAsyncZod = async (app) => {
  const { db, settings } = app;
  app.addHook('onRequest', requireUser);

  app.get(
    '/api-keys',
    {
      schema: {
        operationId: 'list_api_keys',
        summary: 'List API Keys',
        tags,
        querystring: Pagination,
        response: { 200: listOf(ApiKeyPublic), ...authErrors },
      },
    },
    async (request) => apiKeyService.list(db, request.principal, request.query),
  );

  app.post(
    '/api-keys',
    {
      schema: {
        operationId: 'create_api_key',
        summary: 'Create API Key',
        description: 'The answer holds the secret `key`; it is shown this once and stored only as a hash.',
        tags,
        body: ApiKeyCreate,
        response: { 200: ApiKeyCreated, 400: HTTPError, 404: HTTPError, 409: HTTPError, ...authErrors },
      },
    },
    async (request) => apiKeyService.create(db, settings, request.log, request.principal, request.body),
  );

  app.get(
    '/api-keys/:api_key_id',
    {
      schema: {
        operationId: 'get_api_key',
        summary: 'Get API Key',
        tags,
        params: ApiKeyIdParams,
        response: { 200: ApiKeyPublic, 404: HTTPError, ...authErrors },
      },
    },
    async (request) => apiKeyService.getVisible(db, request.principal, request.params.api_key_id),
  );

  app.patch(
    '/api-keys/:api_key_id',
    {
      schema: {
        operationId: 'update_api_key',
        summary: 'Update API Key',
        description: 'Rename, or revoke with `{"status": "revoked"}`; revocation is final.',
        tags,
        params: ApiKeyIdParams,
        body: ApiKeyUpdate,
        response: { 200: ApiKeyPublic, 404: HTTPError, ...authErrors },
      },
    },
    async (request) => apiKeyService.update(db, request.principal, request.params.api_key_id, request.body),
  );

  app.delete(
    '/api-keys/:api_key_id',
    {
      schema: {
        operationId: 'delete_api_key',
        summary: 'Delete API Key',
        tags,
        params: ApiKeyIdParams,
        response: { 200: Message, 404: HTTPError, ...authErrors },
      },
    },
    async (request) => {
      await apiKeyService.remove(db, request.principal, request.params.api_key_id);
      return { message: 'API key deleted successfully' };
    },
  );
};
