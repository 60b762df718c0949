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
      delete: 'Superusers only. 409 while models name it as their provider (delete them or move them to another provider first); a record named `openai`, `anthropic` or `google` is deleted anyway, its models going back to the credentials from the settings.',
    },
  });
};
