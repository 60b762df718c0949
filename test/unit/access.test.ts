import { type SQL } from 'drizzle-orm';
import { PgDialect, pgTable, uuid } from 'drizzle-orm/pg-core';
import { describe, expect, it } from 'vitest';

import type { User } from '../../src/models/index.js';

import { definePolicy, type ScopedKeyAccess } from '../../src/utils/access.js';
import type { Principal } from '../../src/utils/authentication.js';

// A resource of the kind later issues add (agents): owned, optionally in a project.
const agents = pgTable('agents', { id: uuid('id').primaryKey(), owner_id: uuid('owner_id').notNull(), project_id: uuid('project_id') });
interface Agent {
  id: string;
  owner_id: string;
  project_id: string | null;
}

const policy = (scopedKey: ScopedKeyAccess, scopedKeyReadsUnassigned = false) =>
  definePolicy<Agent>({
    noun: 'Agent',
    owner: agents.owner_id,
    project: agents.project_id,
    scopedKey,
    scopedKeyReadsUnassigned,
    superuserSeesAll: false,
    ownerOf: (row) => row.owner_id,
    projectOf: (row) => row.project_id,
  });

const principal = (scopeProjectId: string | null, is_superuser = false): Principal => ({
  user: { id: 'u1', is_superuser } as User,
  apiKeyId: scopeProjectId ? 'k1' : null,
  apiKeyLimits: scopeProjectId ? { max_budget: null, rpm: null } : null,
  scopeProjectId,
});
const render = (condition: SQL | undefined) => {
  if (!condition) return undefined;
  const { sql, params } = new PgDialect().sqlToQuery(condition);
  return { sql, params };
};
const row = (project_id: string | null, owner_id = 'u1'): Agent => ({ id: 'a1', owner_id, project_id });

describe('an access policy', () => {
  it('limits a user to their own rows, in SQL and in JS', () => {
    const p = policy('write');
    expect(render(p.where(principal(null), 'read'))).toEqual({ sql: '"agents"."owner_id" = $1', params: ['u1'] });
    expect(p.check(principal(null), row(null), 'write')).toEqual(row(null));
    expect(() => p.check(principal(null), row(null, 'u2'), 'read')).toThrow('Agent not found');
    expect(() => p.check(principal(null), undefined, 'read')).toThrow('Agent not found');
  });

  it('gives a write-scoped key its project’s rows, to read, change and create in', () => {
    const p = policy('write');
    expect(render(p.where(principal('p1'), 'write'))).toEqual({ sql: '("agents"."owner_id" = $1 and "agents"."project_id" = $2)', params: ['u1', 'p1'] });
    expect(p.check(principal('p1'), row('p1'), 'write')).toEqual(row('p1'));
    expect(() => p.check(principal('p1'), row('p2'), 'read')).toThrow('Agent not found');
    expect(() => p.check(principal('p1'), row(null), 'read')).toThrow('Agent not found');
    expect(() => p.checkCreate(principal('p1'), 'p1')).not.toThrow();
    expect(() => p.checkCreate(principal('p1'), 'p2')).toThrow('This API key is limited to one project');
    expect(() => p.checkCreate(principal('p1'), null)).toThrow('This API key is limited to one project');
  });

  it('lets a scoped key read the account’s unassigned rows when declared, but change only its project’s', () => {
    const p = policy('write', true);
    expect(render(p.where(principal('p1'), 'read'))?.sql).toBe('("agents"."owner_id" = $1 and ("agents"."project_id" = $2 or "agents"."project_id" is null))');
    expect(render(p.where(principal('p1'), 'write'))?.sql).toBe('("agents"."owner_id" = $1 and "agents"."project_id" = $2)');
    expect(p.check(principal('p1'), row(null), 'read')).toEqual(row(null));
    // Read but not changed: refused (403), not "not found"; another project's row it cannot see at all.
    expect(() => p.check(principal('p1'), row(null), 'write')).toThrow('This API key is limited to one project');
    expect(() => p.check(principal('p1'), row('p2'), 'write')).toThrow('Agent not found');
    expect(() => p.check(principal('p1'), row('p2'), 'read')).toThrow('Agent not found');
  });

  it('refuses (403) what a read-only or refused scoped key may not do', () => {
    expect(() => policy('read').where(principal('p1'), 'write')).toThrow('This API key is limited to one project');
    expect(() => policy('read').check(principal('p1'), row('p1'), 'write')).toThrow('This API key is limited to one project');
    expect(() => policy('none').where(principal('p1'), 'read')).toThrow('This API key is limited to one project');
    expect(policy('read').check(principal('p1'), row('p1'), 'read')).toEqual(row('p1'));
  });

  it('shows superusers every row only when the resource says so', () => {
    expect(render(policy('read').where(principal(null, true), 'read'))?.sql).toBe('"agents"."owner_id" = $1');
    const shared = definePolicy<Agent>({ noun: 'Agent', owner: agents.owner_id, project: null, scopedKey: 'read', superuserSeesAll: true, ownerOf: (r) => r.owner_id });
    expect(shared.where(principal(null, true), 'read')).toBeUndefined();
    expect(shared.check(principal(null, true), row(null, 'u2'), 'write')).toEqual(row(null, 'u2'));
    // Without a project column, nothing is inside a scoped key's project.
    expect(render(shared.where(principal('p1'), 'read'))?.sql).toBe('false');
    expect(() => shared.check(principal('p1'), row(null), 'read')).toThrow('Agent not found');
  });
});
