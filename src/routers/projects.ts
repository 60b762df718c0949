import type { FastifyPluginAsyncZod } from 'fastify-type-provider-zod';

import { authErrors, ErrorBody } from '../schemas/common.js';
import { ProjectCreate, ProjectIdParams, ProjectPublic, ProjectStats, ProjectUpdate } from '../schemas/project.js';

import { contextOf } from '../services/context.js';
import * as projectService from '../services/project-service.js';
import { requireUser } from '../utils/authentication.js';
import { registerOwnedRoutes } from './owned-routes.js';

const tags = ['projects'];

/** The reference resource: the five owned-resource routes, plus its own (stats) written beside them. */
export const projectsRouter: FastifyPluginAsyncZod = async (app) => {
  app.addHook('onRequest', requireUser);

  registerOwnedRoutes(app, {
    noun: 'Project',
    path: '/projects',
    idParam: 'project_id',
    tags,
    schemas: { create: ProjectCreate, update: ProjectUpdate, public: ProjectPublic },
    service: projectService,
    // While a run works on one of its threads.
    errors: { delete: [409] },
  });

  // ==================== Stats ====================

  app.get(
    '/projects/:project_id/stats',
    {
      schema: {
        operationId: 'get_project_stats',
        summary: 'Get Project Stats',
        tags,
        params: ProjectIdParams,
        response: { 200: ProjectStats, 404: ErrorBody, ...authErrors },
      },
    },
    async (request) => projectService.stats(contextOf(request), request.params.project_id),
  );
};
