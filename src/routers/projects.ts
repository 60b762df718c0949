import type { FastifyPluginAsyncZod } from 'fastify-type-provider-zod';

import { authErrors, HTTPError, listOf, Message, Pagination } from '../schemas/common.js';
import { ProjectCreate, ProjectIdParams, ProjectPublic, ProjectStats, ProjectUpdate } from '../schemas/project.js';

import * as projectService from '../services/project-service.js';
import { requireUser } from '../utils/authentication.js';

const tags = ['projects'];

/** The reference resource: later routers follow this shape (schema, auth hook, one service call). */
export const projectsRouter: FastifyPluginAsyncZod = async (app) => {
  const { db, settings } = app;
  app.addHook('onRequest', requireUser);

  // ==================== CRUD Endpoints ====================

  app.get(
    '/projects',
    {
      schema: {
        operationId: 'list_projects',
        summary: 'List Projects',
        tags,
        querystring: Pagination,
        response: { 200: listOf(ProjectPublic), ...authErrors },
      },
    },
    async (request) => projectService.list(db, request.principal, request.query),
  );

  app.post(
    '/projects',
    {
      schema: {
        operationId: 'create_project',
        summary: 'Create Project',
        tags,
        body: ProjectCreate,
        response: { 200: ProjectPublic, 409: HTTPError, ...authErrors },
      },
    },
    async (request) => projectService.create(db, settings, request.principal, request.body),
  );

  app.get(
    '/projects/:project_id',
    {
      schema: {
        operationId: 'get_project',
        summary: 'Get Project',
        tags,
        params: ProjectIdParams,
        response: { 200: ProjectPublic, 404: HTTPError, ...authErrors },
      },
    },
    async (request) => projectService.getVisible(db, request.principal, request.params.project_id),
  );

  app.patch(
    '/projects/:project_id',
    {
      schema: {
        operationId: 'update_project',
        summary: 'Update Project',
        tags,
        params: ProjectIdParams,
        body: ProjectUpdate,
        response: { 200: ProjectPublic, 404: HTTPError, ...authErrors },
      },
    },
    async (request) => projectService.update(db, request.principal, request.params.project_id, request.body),
  );

  app.delete(
    '/projects/:project_id',
    {
      schema: {
        operationId: 'delete_project',
        summary: 'Delete Project',
        tags,
        params: ProjectIdParams,
        response: { 200: Message, 404: HTTPError, ...authErrors },
      },
    },
    async (request) => {
      await projectService.remove(db, request.principal, request.params.project_id);
      return { message: 'Project deleted successfully' };
    },
  );

  // ==================== Stats ====================

  app.get(
    '/projects/:project_id/stats',
    {
      schema: {
        operationId: 'get_project_stats',
        summary: 'Get Project Stats',
        tags,
        params: ProjectIdParams,
        response: { 200: ProjectStats, 404: HTTPError, ...authErrors },
      },
    },
    async (request) => projectService.stats(db, request.principal, request.params.project_id),
  );
};
