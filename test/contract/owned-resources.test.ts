import { expect } from 'vitest';

import { useTestApp } from '../helpers/app.js';
import { call } from '../helpers/http.js';
import { ownedResourceContract } from './owned-resource.js';

const ctx = useTestApp();

// One call per owned resource: what it is called, a valid create and change, and its rules.

ownedResourceContract(ctx, {
  path: '/projects',
  idParam: 'project_id',
  notFound: 'Project not found',
  create: { name: 'Contract project', description: 'd' },
  update: { name: 'Renamed' },
  invalidCreates: [{}, { name: '' }, { name: 'n'.repeat(256) }],
  invalidUpdates: [{ name: null }, { owner_id: '00000000-0000-0000-0000-000000000000' }],
  superuserSeesAll: true,
  scopedKey: 'read',
  // The row of a project is the project itself.
  inProject: async (_app, _owner, projectId) => projectId,
});

ownedResourceContract(ctx, {
  path: '/api-keys',
  idParam: 'api_key_id',
  notFound: 'API key not found',
  create: { name: 'Contract key' },
  update: { name: 'Renamed key' },
  invalidCreates: [{}, { name: 'k', status: 'active' }, { name: 'k', expires_at: 'tomorrow' }],
  invalidUpdates: [{ status: 'active' }, { name: '' }],
  // SPEC §2: superusers see and change everything (a leaked key of any user is theirs to revoke).
  superuserSeesAll: true,
  scopedKey: 'none',
});

ownedResourceContract(ctx, {
  path: '/agents',
  idParam: 'agent_id',
  notFound: 'Agent not found',
  create: { name: 'Contract agent', model: 'gpt-4.1', system_prompt: 'Be brief.' },
  update: { name: 'Renamed agent' },
  invalidCreates: [{}, { name: 'a' }, { name: 'a', model: 'no-such-model' }, { name: 'a', model: 'gpt-4.1', tools: ['rm_rf'] }, { name: 'a', model: 'gpt-4.1', temperature: 3 }],
  invalidUpdates: [{ model: 'no-such-model' }, { tools: ['rm_rf'] }, { version: 7 }, { owner_id: '00000000-0000-0000-0000-000000000000' }],
  superuserSeesAll: true,
  scopedKey: 'write',
});

ownedResourceContract(ctx, {
  path: '/threads',
  idParam: 'thread_id',
  notFound: 'Thread not found',
  create: { title: 'Contract thread' },
  update: { title: 'Renamed thread' },
  invalidCreates: [{ title: 't'.repeat(256) }, { status: 'busy' }, { metadata: [] }],
  invalidUpdates: [{ status: 'busy' }, { title: null }],
  superuserSeesAll: true,
  scopedKey: 'write',
});

ownedResourceContract(ctx, {
  path: '/threads/:thread_id/messages',
  idParam: 'message_id',
  notFound: 'Message not found',
  create: { content: 'Hello' },
  update: { content: 'Hello again' },
  invalidCreates: [{}, { content: '' }, { content: 'x', role: 'assistant' }, { content: 'x', run_id: '00000000-0000-0000-0000-000000000000' }],
  invalidUpdates: [{ role: 'assistant' }, { content: '' }],
  superuserSeesAll: true,
  scopedKey: 'write',
  order: 'oldest',
  parent: {
    notFound: 'Thread not found',
    create: async (app, owner, projectId) => {
      const response = await call(app, 'POST', '/threads', owner.headers, { title: 'Parent', ...(projectId ? { project_id: projectId } : {}) });
      expect(response.statusCode, response.body).toBe(200);
      return response.json<{ id: string }>().id;
    },
  },
});

ownedResourceContract(ctx, {
  path: '/knowledge-base/folders',
  idParam: 'folder_id',
  notFound: 'Folder not found',
  // The same name each time: a clash gets a number (`Contract folder (1)`), never a 409.
  create: { name: 'Contract folder', description: 'd' },
  update: { name: 'Renamed folder' },
  invalidCreates: [{}, { name: '' }, { name: '..' }, { name: 'a/b' }, { name: 'n'.repeat(256) }, { name: 'f', owner_id: '00000000-0000-0000-0000-000000000000' }],
  invalidUpdates: [{ name: '' }, { name: null }, { name: 'x\u0000y' }],
  superuserSeesAll: true,
  scopedKey: 'write',
});
