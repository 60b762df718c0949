import type { FastifyPluginAsyncZod } from 'fastify-type-provider-zod';

import { ApiKeyCreate, ApiKeyCreated, ApiKeyPublic, ApiKeyUpdate } from '../schemas/api-key.js';

import * as apiKeyService from '../services/api-key-service.js';
import { requireUser } from '../utils/authentication.js';
import { registerOwnedRoutes } from './owned-routes.js';

export const apiKeysRouter: FastifyPluginAsyncZod = async (app) => {
  app.addHook('onRequest', requireUser);
  // A key without a `max_budget` has its `spent` moved with the usage batch, up to
  // USAGE_FLUSH_INTERVAL_MS after its calls: what this process charged is written first, so a key
  // read right after its calls shows them, and a budget set on a key in use is held against what
  // it has really spent (set before, the calls after it could overrun it by what was unwritten).
  app.addHook('preHandler', async (request) => {
    if (request.method === 'GET' || request.method === 'PATCH') await app.meter.written();
  });

  registerOwnedRoutes(app, {
    noun: 'API key',
    path: '/api-keys',
    idParam: 'api_key_id',
    tags: ['api-keys'],
    schemas: { create: ApiKeyCreate, update: ApiKeyUpdate, public: ApiKeyPublic, created: ApiKeyCreated },
    service: apiKeyService,
    createErrors: [404, 409],
    descriptions: {
      create: 'The answer holds the secret `key`; it is shown this once and stored only as a hash.',
      update: 'Rename, or revoke with `{"status": "revoked"}`; revocation is final, and cancels the runs the key started that are still queued or running.',
      delete: 'Cancels the runs the key started that are still queued or running.',
    },
  });
};
