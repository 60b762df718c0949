import type { FastifyInstance } from 'fastify';

import { apiKeysRouter } from '../routers/api-keys.js';
import { loginRouter } from '../routers/login.js';
import { projectsRouter } from '../routers/projects.js';
import { usersRouter } from '../routers/users.js';

export const API_PREFIX = '/api/v1';

/** The router registry: every resource router, mounted under the API prefix. */
export async function registerApi(app: FastifyInstance): Promise<void> {
  await app.register(
    async (api) => {
      await api.register(loginRouter);
      await api.register(usersRouter);
      await api.register(apiKeysRouter);
      await api.register(projectsRouter);
    },
    { prefix: API_PREFIX },
  );
}
