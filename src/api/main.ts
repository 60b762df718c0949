import type { FastifyInstance, RouteOptions } from 'fastify';

import { agentsRouter } from '../routers/agents.js';
import { apiKeysRouter } from '../routers/api-keys.js';
import { billingRouter } from '../routers/billing.js';
import { knowledgeRouter } from '../routers/knowledge.js';
import { loginRouter } from '../routers/login.js';
import { modelsRouter } from '../routers/models.js';
import { projectsRouter } from '../routers/projects.js';
import { providersRouter } from '../routers/providers.js';
import { runsRouter } from '../routers/runs.js';
import { threadsRouter } from '../routers/threads.js';
import { usersRouter } from '../routers/users.js';

export const API_PREFIX = '/api/v1';

const routeTables = new WeakMap<FastifyInstance, RouteOptions[]>();

/** Every route registered under the API prefix, as declared (tests sweep it for auth, ids, schemas). */
export function apiRoutes(app: FastifyInstance): readonly RouteOptions[] {
  return routeTables.get(app) ?? [];
}

/** The router registry: every resource router, mounted under the API prefix. */
export async function registerApi(app: FastifyInstance): Promise<void> {
  const routes: RouteOptions[] = [];
  routeTables.set(app, routes);
  await app.register(
    async (api) => {
      api.addHook('onRoute', (route) => {
        routes.push(route);
      });
      await api.register(loginRouter);
      await api.register(usersRouter);
      await api.register(apiKeysRouter);
      await api.register(projectsRouter);
      await api.register(modelsRouter);
      await api.register(providersRouter);
      await api.register(agentsRouter);
      await api.register(threadsRouter);
      await api.register(runsRouter);
      await api.register(billingRouter);
      await api.register(knowledgeRouter);
    },
    { prefix: API_PREFIX },
  );
}
