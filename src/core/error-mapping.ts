import type { FastifyRequest } from 'fastify';

/** What the error handler answers for a database error: a status and a `{detail}` message. */
export interface DatabaseAnswer {
  status: number;
  detail: string;
}

/**
 * Answers for constraint violations a resource words itself, by constraint name (the name Drizzle
 * gives a foreign key: `<table>_<column>_<referenced table>_<column>_fk`). Resources declare theirs
 * with `constraintAnswers()` next to their crud.
 */
const byConstraint = new Map<string, DatabaseAnswer>();

export function constraintAnswers(answers: Record<string, DatabaseAnswer>): void {
  for (const [name, answer] of Object.entries(answers)) byConstraint.set(name, answer);
}

/**
 * The answer for an integrity violation (23505 unique, 23503 foreign key, 23001 restrict), or null
 * for other errors. A foreign key violated by a DELETE (`on delete restrict` or `no action`: rows
 * still refer to the one deleted) is a 409 conflict, not a missing reference.
 */
export function integrityAnswer(error: { code: string; constraint?: string; message?: string }): DatabaseAnswer | null {
  if (error.code !== '23505' && error.code !== '23503' && error.code !== '23001') return null;
  if (error.code === '23001' || (error.code === '23503' && /^update or delete on table/.test(error.message ?? ''))) {
    return { status: 409, detail: 'The resource is still in use by other resources' };
  }
  const own = error.constraint === undefined ? undefined : byConstraint.get(error.constraint);
  if (own) return own;
  return error.code === '23505' ? { status: 409, detail: 'Resource already exists' } : { status: 404, detail: 'Referenced resource not found' };
}

/**
 * An unknown query parameter is reported with the parameters the route accepts, so that a client
 * sending `?skip=` learns to send `?offset=`.
 */
export function unknownQueryMessage(request: FastifyRequest): string {
  const schema = request.routeOptions.schema?.querystring as { shape?: Record<string, unknown> } | undefined;
  const accepted = Object.keys(schema?.shape ?? {});
  return accepted.length
    ? `Unknown query parameter; accepted: ${accepted.join(', ')}`
    : 'Unknown query parameter; this route takes none';
}
