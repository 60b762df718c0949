import type { FastifyPluginAsyncZod } from 'fastify-type-provider-zod';

import { ProviderCreate, ProviderPublic, ProviderUpdate } from '../schemas/provider.js';

import { providerService } from '../services/provider-service.js';
import { requireSuperuser } from '../utils/authentication.js';
import { registerOwnedRoutes } from './owned-routes.js';

/** Model providers (base URL, sealed API key and headers): superusers only. */
export const providersRouter: FastifyPluginAsyncZod = async (app) => {
  app.addHook('onRequest', requireSuperuser);

  registerOwnedRoutes(app, {
    noun: 'Provider',
    path: '/providers',
    idParam: 'provider_id',
    tags: ['models'],
    schemas: { create: ProviderCreate, update: ProviderUpdate, public: ProviderPublic },
    service: providerService(app.models),
    errors: { delete: [409] },
    descriptions: {
      create: 'Superusers only. The API key and headers are stored encrypted and never returned; `name` is what models refer to as their provider. 409 when the name is taken.',
      update: 'Superusers only. A change of `base_url` or `kind` does not keep the stored `api_key` and `headers`: give them again in the same request (or `null` to drop them), else 422 naming each one. Kept, they would go to the new host; refused rather than dropped, so that a record is never left without its key unnoticed.',
      delete: 'Superusers only. 409 while models name it as their provider (delete them or move them to another provider first); a record named `openai`, `anthropic` or `google` is deleted anyway, its models going back to the credentials from the settings.',
    },
  });
};
