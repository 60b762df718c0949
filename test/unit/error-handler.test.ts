import { writeFileSync } from 'node:fs';
import { Writable } from 'node:stream';

import Fastify from 'fastify';
import { describe, expect, it } from 'vitest';

import { registerErrorHandler } from '../../src/core/errors.js';

import { UpstreamError } from '../../src/modules/ai-models/index.js';

/** What the app's one error handler answers for `error` thrown by a route, and the lines it logs. */
async function answerTo(error: unknown) {
  const lines: Record<string, unknown>[] = [];
  const stream = new Writable({
    write(chunk: Buffer, _encoding, done) {
      lines.push(JSON.parse(chunk.toString()) as Record<string, unknown>);
      done();
    },
  });
  const app = Fastify({ logger: { level: 'warn', stream } });
  registerErrorHandler(app);
  app.get('/', async () => {
    throw error;
  });
  const response = await app.inject({ method: 'GET', url: '/' });
  await app.close();
  return { response, lines };
}

describe('the error handler on errors that say more than the client may read', () => {
  it('answers an upstream failure with its generic detail and logs the diagnosis', async () => {
    const diagnosis = 'Upstream 401 error: Incorrect API key provided: sk-secr****1234';
    const { response, lines } = await answerTo(new UpstreamError(diagnosis, 401));
    expect(response.statusCode).toBe(502);
    expect(response.json()).toEqual({ detail: 'The model provider refused the request (status 401)' });
    expect(response.body).not.toContain('sk-secr');
    expect(lines).toHaveLength(1);
    expect(lines).toMatchObject([{ level: 40, err: { message: diagnosis } }]);
  });

  it('logs nothing for an error whose detail is all there is', async () => {
    const { response, lines } = await answerTo(new UpstreamError('Upstream 400 error: context too long', 400));
    expect(response.json()).toEqual({ detail: 'Upstream 400 error: context too long' });
    expect(lines).toEqual([]);
  });
});

describe('the error handler on a stack overflow', () => {
  it('answers input nested deeper than the call stack as a validation error, not a 500', async () => {
    const deep = JSON.parse(`${'['.repeat(100_000)}${']'.repeat(100_000)}`) as unknown;
    const overflow = (() => {
      try {
        JSON.stringify(deep);
      } catch (error) {
        return error;
      }
    })();
    expect(overflow).toBeInstanceOf(RangeError);
    const { response, lines } = await answerTo(overflow);
    expect(response.statusCode).toBe(422);
    expect(response.json()).toEqual({ detail: [{ loc: ['body'], msg: 'Input is nested too deeply', type: 'value_error' }] });
    expect(lines).toMatchObject([{ level: 40 }]);
  });

  it('keeps other range errors a 500', async () => {
    expect((await answerTo(new RangeError('Invalid array length'))).response.statusCode).toBe(500);
  });
});

describe('the error handler on a full disk', () => {
  it('answers 507 saying so (logged once a window: another test may have had this one)', async () => {
    const full = (() => {
      try {
        writeFileSync('/dev/full', 'x');
      } catch (error) {
        return error;
      }
    })();
    expect(full).toMatchObject({ code: 'ENOSPC' });
    const { response } = await answerTo(full);
    expect(response.statusCode).toBe(507);
    expect(response.json()).toEqual({ detail: 'The server is out of storage space; try again later' });
  });
});
