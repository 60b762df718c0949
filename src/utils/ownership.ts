import { NotFoundError } from '../core/errors.js';

import type { Principal } from './authentication.js';

/**
 * Whether the caller may see a resource: its owner or a superuser, and, for a project-scoped key,
 * only resources of that project.
 */
export function canSee(principal: Principal, resource: { ownerId: string; projectId: string | null }): boolean {
  const { user, projectScope } = principal;
  if (projectScope !== null && resource.projectId !== projectScope) return false;
  return user.is_superuser || resource.ownerId === user.id;
}

/**
 * The one ownership check: a resource the caller may not see answers 404, exactly as a missing one,
 * so ids of other users' resources reveal nothing.
 */
export function ensureVisible<T>(
  principal: Principal,
  resource: T | undefined,
  scope: (resource: T) => { ownerId: string; projectId: string | null },
  what: string,
): T {
  if (resource === undefined || !canSee(principal, scope(resource))) throw new NotFoundError(`${what} not found`);
  return resource;
}
