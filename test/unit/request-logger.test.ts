import { Writable } from 'node:stream';

import pino from 'pino';
import { describe, expect, it, vi } from 'vitest';

import { lazyRequestLogger, loggerOptions } from '../../src/core/logger.js';

function capture() {
  const lines: Record<string, unknown>[] = [];
  const stream = new Writable({
    write(chunk: Buffer, _encoding, done) {
      lines.push(JSON.parse(chunk.toString()) as Record<string, unknown>);
      done();
    },
  });
  return { lines, logger: pino(loggerOptions({ LOG_LEVEL: 'info', LOG_FORMAT: 'json' }), stream) };
}

describe('lazyRequestLogger (Fastify request loggers made on first use)', () => {
  it('makes no pino child until a log method is called, then logs with the bindings and redaction', async () => {
    const { lines, logger } = capture();
    const child = vi.spyOn(logger, 'child');
    const log = lazyRequestLogger(logger, { reqId: 'r-1' }, {});
    expect(child).not.toHaveBeenCalled();
    expect(log.level).toBe('info');
    log.info({ token: 'secret-token', user: { password: 'pw' } }, 'hello');
    log.error('second');
    expect(child).toHaveBeenCalledTimes(1);
    await new Promise((resolve) => setImmediate(resolve));
    expect(lines).toMatchObject([
      { reqId: 'r-1', msg: 'hello', token: '[redacted]', user: { password: '[redacted]' } },
      { reqId: 'r-1', msg: 'second', level: 50 },
    ]);
  });

  it('honours a route log level and hands child() on', async () => {
    const { lines, logger } = capture();
    const log = lazyRequestLogger(logger, { reqId: 'r-2' }, { level: 'warn' });
    expect(log.level).toBe('warn');
    log.info('dropped');
    log.child({ component: 'x' }).warn('kept');
    await new Promise((resolve) => setImmediate(resolve));
    expect(lines).toMatchObject([{ reqId: 'r-2', component: 'x', msg: 'kept' }]);
    expect(lines).toHaveLength(1);
  });
});
