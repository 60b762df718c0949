import { and, eq, isNull, or, type SQL, sql } from 'drizzle-orm';
import type { PgColumn } from 'drizzle-orm/pg-core';

import { ForbiddenError, NotFoundError } from '../core/errors.js';

import type { Principal } from './authentication.js';

/** What a project-scoped API key may do with a resource: nothing (403), read it, or read and write it. */
export type ScopedKeyAccess = 'none' | 'read' | 'write';

export type Action = 'read' | 'write';

/**
 * Who may see and change one kind of resource, declared once per resource. The same rule yields the
 * SQL condition of get/list/update/delete and the check of a row already loaded, so the two cannot
 * drift apart. Another user's resource answers 404, exactly like a missing one.
 */
export interface AccessPolicy<Row> {
  /** How the resource is named in messages: `Project` → "Project not found". */
  readonly noun: string;
  /** The column holding the owning user's id. */
  readonly ownerColumn: PgColumn;
  /** The column holding the project the row belongs to (for projects: `id`); null when none. */
  readonly projectColumn: PgColumn | null;
  readonly scopedKey: ScopedKeyAccess;
  /** A scoped key also reads its account's rows that have no project (agents): its user's, a superuser's too. */
  readonly scopedKeyReadsUnassigned: boolean;
  /** Superusers see and change every user's rows (projects); false keeps rows personal (API keys). */
  readonly superuserSeesAll: boolean;
  readonly ownerOf: (row: Row) => string;
  readonly projectOf: (row: Row) => string | null;
  readonly notFound: () => NotFoundError;
  /**
   * The SQL condition selecting the rows the caller may `action` on (undefined: all rows). Throws
   * 403 when a scoped key may not `action` on this resource at all.
   */
  where(principal: Principal, action: Action): SQL | undefined;
  /** The same rule for a loaded row: the row; 403 when the caller reads it but may not change it (`write`); else 404. */
  check(principal: Principal, row: Row | undefined, action: Action): Row;
  /** Refuses (403) a scoped key that may not create here, or whose project is not `projectId`. */
  checkCreate(principal: Principal, projectId: string | null): void;
  /**
   * The project a new row goes into: the one asked for, or — when the client left it out — a
   * scoped key's own project (null for other callers); checked as `checkCreate` does. Also the
   * check of a row moved to another project (`project_id` in a change).
   */
  projectForCreate(principal: Principal, requested: string | null | undefined): string | null;
}

export const SCOPED_KEY_REFUSED = 'This API key is limited to one project';

/** Account resources (users, API keys, administration) refuse project-scoped keys: 403. */
export function refuseScopedKey(principal: Principal): void {
  if (principal.scopeProjectId !== null) throw new ForbiddenError(SCOPED_KEY_REFUSED);
}

export interface PolicyOptions<Row> {
  noun: string;
  owner: PgColumn;
  project: PgColumn | null;
  scopedKey: ScopedKeyAccess;
  scopedKeyReadsUnassigned?: boolean;
  superuserSeesAll: boolean;
  /** How to read the owner and project of a loaded row; by default the columns' own names (models name properties as columns). */
  ownerOf?: (row: Row) => string;
  projectOf?: (row: Row) => string | null;
}

export function definePolicy<Row>(options: PolicyOptions<Row>): AccessPolicy<Row> {
  const { owner, project, scopedKey, superuserSeesAll } = options;
  const field = (row: Row, column: PgColumn) => (row as Record<string, unknown>)[column.name] as string | null;
  const ownerOf = options.ownerOf ?? ((row: Row) => field(row, owner)!);
  const projectOf = options.projectOf ?? ((row: Row) => (project === null ? null : field(row, project)));
  const readsUnassigned = options.scopedKeyReadsUnassigned ?? false;
  const notFound = () => new NotFoundError(`${options.noun} not found`);

  /** The scoped key's project, after refusing what the key may not do at all; null for other callers. */
  function scopeOf(principal: Principal, action: Action): string | null {
    const scope = principal.scopeProjectId;
    if (scope === null) return null;
    if (scopedKey === 'none' || (action === 'write' && scopedKey === 'read')) refuseScopedKey(principal);
    return scope;
  }

  return {
    noun: options.noun,
    ownerColumn: owner,
    projectColumn: project,
    scopedKey,
    scopedKeyReadsUnassigned: readsUnassigned,
    superuserSeesAll,
    ownerOf,
    projectOf,
    notFound,

    where(principal, action) {
      const scope = scopeOf(principal, action);
      const { user } = principal;
      const byOwner = superuserSeesAll && user.is_superuser ? undefined : eq(owner, user.id);
      if (scope === null) return byOwner;
      // A resource without a project column is outside every project: a scoped key sees none of it.
      if (project === null) return sql`false`;
      // The unassigned rows are the key's account's own, a superuser's key's too (not every user's).
      const unassigned = byOwner ? isNull(project) : and(isNull(project), eq(owner, user.id));
      const inScope = readsUnassigned && action === 'read' ? or(eq(project, scope), unassigned) : eq(project, scope);
      return and(byOwner, inScope);
    },

    check(principal, row, action) {
      const scope = scopeOf(principal, action);
      if (row === undefined) throw notFound();
      const { user } = principal;
      if (!(superuserSeesAll && user.is_superuser) && ownerOf(row) !== user.id) throw notFound();
      if (scope !== null) {
        const rowProject = project === null ? undefined : projectOf(row);
        if (rowProject === scope) return row;
        // The account's row outside every project, which the key reads: refused, not "not found" (SPEC §2: 403).
        if (readsUnassigned && rowProject === null && ownerOf(row) === user.id) {
          if (action === 'write') refuseScopedKey(principal);
          return row;
        }
        throw notFound();
      }
      return row;
    },

    checkCreate(principal, projectId) {
      const scope = scopeOf(principal, 'write');
      // A scoped key creates only in its project, and never a project itself (it is not in one).
      if (scope !== null && (project === null || projectId !== scope)) refuseScopedKey(principal);
    },

    projectForCreate(principal, requested) {
      const projectId = requested === undefined ? principal.scopeProjectId : requested;
      this.checkCreate(principal, projectId);
      return projectId;
    },
  };
}
