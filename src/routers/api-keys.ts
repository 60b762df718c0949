import type { FastifyPluginAsyncZod } from 'fastify-type-provider-zod';

import { ApiKeyCreate, ApiKeyCreated, ApiKeyPublic, ApiKeyUpdate } from '../schemas/api-key.js';

import * as apiKeyService from '../services/api-key-service.js';
import { requireUser } from '../utils/authentication.js';
import { registerOwnedRoutes } from './owned-routes.js';

export const apiKeysRouter: FastifyPluginAsyncZod = async (app) => {
  app.addHook('onRequest', requireUser);

  registerOwnedRoutes(app, {
    noun: 'API key',
    path: '/api-keys',
    idParam: 'api_key_id',
    tags: ['api-keys'],
    schemas: { create: ApiKeyCreate, update: ApiKeyUpdate, public: ApiKeyPublic, created: ApiKeyCreated },
    service: apiKeyService,
    createErrors: [400, 404, 409],
    descriptions: {
      create: 'The answer holds the secret `key`; it is shown this once and stored only as a hash.',
      update: 'Rename, or revoke with `{"status": "revoked"}`; revocation is final, and cancels the runs the key started that are still queued or running.',
      delete: 'Cancels the runs the key started that are still queued or running.',
    },
  });
};
