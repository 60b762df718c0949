import { useTestApp } from '../helpers/app.js';
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
  superuserSeesAll: false,
  scopedKey: 'none',
});
