import type { FastifyBaseLogger } from 'fastify';
import pino, { type LoggerOptions } from 'pino';

import type { Settings } from './config.js';

/** Paths whose values never reach a log line, whatever object they are logged in. */
export const REDACTED_PATHS = [
  'req.headers.authorization',
  'req.headers["x-api-key"]',
  'req.headers.cookie',
  'headers.authorization',
  'headers["x-api-key"]',
  'authorization',
  'password',
  'new_password',
  'current_password',
  'hashed_password',
  'token',
  'access_token',
  'key',
  'secret',
  'SECRET_KEY',
  'SMTP_PASSWORD',
  '*.password',
  '*.new_password',
  '*.current_password',
  '*.hashed_password',
  '*.token',
  '*.access_token',
  '*.secret',
  '*.key',
  '*.authorization',
];

export function loggerOptions(settings: Pick<Settings, 'LOG_LEVEL' | 'LOG_FORMAT'>): LoggerOptions {
  return {
    level: settings.LOG_LEVEL,
    redact: { paths: REDACTED_PATHS, censor: '[redacted]' },
    base: undefined,
    timestamp: pino.stdTimeFunctions.isoTime,
    ...(settings.LOG_FORMAT === 'pretty'
      ? { transport: { target: 'pino-pretty', options: { translateTime: 'SYS:HH:MM:ss.l', ignore: 'pid,hostname' } } }
      : {}),
  };
}

/** The process logger; Fastify derives per-request children (carrying `reqId`) from it. */
export function createLogger(settings: Pick<Settings, 'LOG_LEVEL' | 'LOG_FORMAT'>): pino.Logger {
  const options = loggerOptions(settings);
  if (settings.LOG_FORMAT === 'pretty') return pino(options);
  // Asynchronous writes keep logging off the request's critical path; flushed on shutdown.
  return pino(options, pino.destination({ dest: 1, sync: false, minLength: 4096 }));
}

/** What services log through: the process logger or a request's child (which carries `reqId`). */
export type Logger = FastifyBaseLogger;
