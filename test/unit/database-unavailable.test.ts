import Fastify from 'fastify';
import { describe, expect, it } from 'vitest';

import { DATABASE_RETRY_AFTER_SECONDS, isDatabaseUnavailableCode } from '../../src/core/db-errors.js';
import { registerErrorHandler } from '../../src/core/errors.js';

describe('database unavailable SQLSTATEs', () => {
  it.each(['08000', '08001', '08003', '08004', '08006', '08P01', '57P01', '57P02', '57P03', '57P04', '3D000', '53300', '57014', '55P03'])('%s means unavailable', (code) => {
    expect(isDatabaseUnavailableCode(code)).toBe(true);
  });

  it.each(['23505', '22P02', '42P01', '53100', '40001', '3F000', '28P01'])('%s does not', (code) => {
    expect(isDatabaseUnavailableCode(code)).toBe(false);
  });
});

/** What the error handler answers for `error` thrown by a route. */
async function answerTo(error: unknown) {
  const app = Fastify({ logger: false });
  registerErrorHandler(app);
  app.get('/', async () => {
    throw error;
  });
  const response = await app.inject({ method: 'GET', url: '/' });
  await app.close();
  return response;
}

const withCode = (code: string, message = 'database error') => Object.assign(new Error(message), { code });

describe('the error handler on database errors', () => {
  it.each([
    ['a dropped database (3D000)', withCode('3D000')],
    ['too many connections (53300)', withCode('53300')],
    ['an admin shutdown (57P01), wrapped by the query builder', Object.assign(new Error('Failed query'), { cause: withCode('57P01') })],
    ['a broken connection (08006)', withCode('08006')],
    ['a pool connect timeout', new Error('timeout exceeded when trying to connect')],
    ['a refused connection', withCode('ECONNREFUSED', 'connect ECONNREFUSED 127.0.0.1:5432')],
  ])('answers 503 with Retry-After for %s', async (_label, error) => {
    const response = await answerTo(error);
    expect(response.statusCode).toBe(503);
    expect(response.headers['retry-after']).toBe(String(DATABASE_RETRY_AFTER_SECONDS));
    expect(response.json()).toEqual({ detail: 'Service unavailable' });
  });

  it('keeps other database errors as they were: 409 for a duplicate, 500 for a bug', async () => {
    expect((await answerTo(withCode('23505'))).statusCode).toBe(409);
    const bug = await answerTo(withCode('42P01'));
    expect(bug.statusCode).toBe(500);
    expect(bug.headers['retry-after']).toBeUndefined();
  });
});
