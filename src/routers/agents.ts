import type { FastifyPluginAsyncZod } from 'fastify-type-provider-zod';

import { AgentCreate, AgentIdParams, AgentKnowledge, AgentKnowledgePublic, AgentListQuery, AgentPublic, AgentUpdate, AgentVersionParams, AgentVersionPublic } from '../schemas/agent.js';
import { authErrors, ErrorBody, listOf, Pagination } from '../schemas/common.js';

import * as agentService from '../services/agent-service.js';
import { contextOf } from '../services/context.js';
import { requireUser } from '../utils/authentication.js';
import { registerOwnedRoutes } from './owned-routes.js';

const tags = ['agents'];

/** Agents on the resource kit, and their numbered versions. */
export const agentsRouter: FastifyPluginAsyncZod = async (app) => {
  app.addHook('onRequest', requireUser);

  registerOwnedRoutes(app, {
    noun: 'Agent',
    path: '/agents',
    idParam: 'agent_id',
    tags,
    schemas: { create: AgentCreate, update: AgentUpdate, public: AgentPublic },
    service: agentService,
    listQuery: AgentListQuery,
    createErrors: [404, 409],
    errors: { update: [409] },
    descriptions: {
      list: 'Newest first; `?project_id=` lists one project\'s agents.',
      create: '`model` must name an enabled chat model of the catalog (422 otherwise); `tools` only known tools. The agent starts at version 1.',
      update: 'A change to what the agent does (system prompt, model, temperature, max output tokens, tools, knowledge) makes a new version; name, description, project, tags, metadata and `is_default` do not.',
    },
  });

  // ==================== Knowledge ====================

  app.get(
    '/agents/:agent_id/knowledge',
    {
      schema: {
        operationId: 'get_agent_knowledge',
        summary: 'Get Agent Knowledge',
        description:
          'The folders and entries the agent\'s `knowledge_search` tool searches, with their names. A project-scoped key is shown only its project\'s (ids too), as in every agent and version it reads: an account\'s agent may name other projects\' knowledge.',
        tags,
        params: AgentIdParams,
        response: { 200: AgentKnowledgePublic, 404: ErrorBody, ...authErrors },
      },
    },
    async (request) => agentService.getKnowledge(contextOf(request), request.params.agent_id),
  );

  app.put(
    '/agents/:agent_id/knowledge',
    {
      schema: {
        operationId: 'set_agent_knowledge',
        summary: 'Set Agent Knowledge',
        description:
          'Replaces the folders and entries the agent searches. Each must be a folder or entry of the agent\'s owner (with a project-scoped key: of its project), 422 naming it otherwise; a project-scoped key replaces only what it is shown, and the ids of other projects\' knowledge the agent names stay. A change makes a new agent version.',
        tags,
        params: AgentIdParams,
        body: AgentKnowledge,
        response: { 200: AgentKnowledgePublic, 404: ErrorBody, 409: ErrorBody, ...authErrors },
      },
    },
    async (request) => agentService.setKnowledge(contextOf(request), request.params.agent_id, request.body),
  );

  // ==================== Versions ====================

  app.get(
    '/agents/:agent_id/versions',
    {
      schema: {
        operationId: 'list_agent_versions',
        summary: 'List Agent Versions',
        description: 'Newest first.',
        tags,
        params: AgentIdParams,
        querystring: Pagination,
        response: { 200: listOf(AgentVersionPublic), 404: ErrorBody, ...authErrors },
      },
    },
    async (request) => agentService.listVersions(contextOf(request), request.params.agent_id, request.query),
  );

  app.get(
    '/agents/:agent_id/versions/:version',
    {
      schema: {
        operationId: 'get_agent_version',
        summary: 'Get Agent Version',
        tags,
        params: AgentVersionParams,
        response: { 200: AgentVersionPublic, 404: ErrorBody, ...authErrors },
      },
    },
    async (request) => agentService.getVersion(contextOf(request), request.params.agent_id, request.params.version),
  );
};
