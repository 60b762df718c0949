import type { FastifyBaseLogger } from 'fastify';
import pino, { type LoggerOptions } from 'pino';
import pretty from 'pino-pretty';

import { isoFormatter } from '../utils/iso-time.js';
import type { Settings } from './config.js';

/** Paths whose values never reach a log line, whatever object they are logged in. */
export const REDACTED_PATHS = [
  'req.headers.authorization',
  'req.headers["x-api-key"]',
  'req.headers.cookie',
  'headers.authorization',
  'headers["x-api-key"]',
  'headers.cookie',
  // A plugin's options holding the request's headers: @fastify/multipart logs `busboyOptions` at trace.
  '*.headers.authorization',
  '*.headers["x-api-key"]',
  '*.headers.cookie',
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

const logTime = isoFormatter();

export function loggerOptions(settings: Pick<Settings, 'LOG_LEVEL' | 'LOG_FORMAT'>): LoggerOptions {
  return {
    level: settings.LOG_LEVEL,
    redact: { paths: REDACTED_PATHS, censor: '[redacted]' },
    base: undefined,
    // pino.stdTimeFunctions.isoTime, its Date formatted once per millisecond (one line per request, at least).
    timestamp: () => `,"time":"${logTime(Date.now())}"`,
  };
}

/**
 * Gathers log lines and hands them to SonicBoom about `size` characters at a time. SonicBoom's own
 * buffering (`minLength`) measures the UTF-8 length of its whole pending string on every write
 * (which flattens that growing string): under load, with a write in flight, that is kilobytes per
 * log line, 3 % of a gateway call's CPU (bench/RESULTS.md). Here a line costs an array push.
 */
class LineBatch {
  private lines: string[] = [];
  private length = 0;

  constructor(
    private readonly target: ReturnType<typeof pino.destination>,
    private readonly size: number,
  ) {}

  write(line: string): boolean {
    this.lines.push(line);
    this.length += line.length;
    if (this.length >= this.size) this.pass();
    return true;
  }

  private pass(): void {
    if (this.lines.length === 0) return;
    this.target.write(this.lines.join(''));
    this.lines = [];
    this.length = 0;
  }

  /** What pino's `logger.flush(cb)` calls: what is gathered goes to SonicBoom, which writes it at once. */
  flush(cb?: (error?: Error) => void): void {
    this.pass();
    this.target.flush(cb);
  }

  flushSync(): void {
    this.pass();
    this.target.flushSync();
  }
}

/** Characters of JSON log lines gathered before they go to SonicBoom. */
const LOG_BATCH_CHARS = 16_384;

/** The longest a JSON log line waits in the buffer: a crash (kill -9) loses at most this much. */
export const LOG_FLUSH_INTERVAL_MS = 1_000;

/** The process logger; Fastify derives per-request children (carrying `reqId`) from it. */
export function createLogger(settings: Pick<Settings, 'LOG_LEVEL' | 'LOG_FORMAT'>): pino.Logger {
  const options = loggerOptions(settings);
  if (settings.LOG_FORMAT === 'pretty') {
    // In this thread, written at once: a transport would start a worker thread (tens of MB and a
    // slower start) for what is a developer's terminal.
    return pino(options, pretty({ translateTime: 'SYS:HH:MM:ss.l', ignore: 'pid,hostname', sync: true }));
  }
  // Asynchronous, buffered writes keep logging off the request's critical path. The buffer is
  // flushed every second (a quiet server's lines still show, a crash loses at most that second)
  // and synchronously when the process exits.
  // 16 KB a write (~70 access lines): each write is a request to libuv's thread pool, which at
  // 4 KB cost ~1.5 % of a gateway call's main-thread time at 64 clients (bench/RESULTS.md).
  const destination = new LineBatch(pino.destination({ dest: 1, sync: false }), LOG_BATCH_CHARS);
  setInterval(() => destination.flush(), LOG_FLUSH_INTERVAL_MS).unref();
  process.once('exit', () => {
    try {
      destination.flushSync();
    } catch {
      // stdout is gone or busy: nothing more can be written
    }
  });
  return pino(options, destination);
}

/** What services log through: the process logger or a request's child (which carries `reqId`). */
export type Logger = FastifyBaseLogger;

/**
 * A log line every request would repeat while a dependency is down ("database unavailable"): the
 * first in each window is written, with how many were left out before it (`repeated`). A
 * ten-second database outage under load wrote ~38,000 such lines, stack traces and all; each
 * request still has its access line (its status, its request id).
 */
export class RepeatedLine {
  private writtenAt = Number.NEGATIVE_INFINITY;
  private leftOut = 0;

  constructor(private readonly windowMs = 5_000) {}

  /** The fields to add to this line, or null: leave it out. */
  take(now = performance.now()): { repeated?: number } | null {
    if (now - this.writtenAt < this.windowMs) {
      this.leftOut++;
      return null;
    }
    this.writtenAt = now;
    const repeated = this.leftOut;
    this.leftOut = 0;
    return repeated ? { repeated } : {};
  }
}

type LogMethod = 'fatal' | 'error' | 'warn' | 'info' | 'debug' | 'trace' | 'silent';
const LOG_METHODS: readonly LogMethod[] = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'];

/**
 * Fastify's per-request logger, made on first use. Fastify derives a pino child (carrying `reqId`)
 * for every request, and pino runs each binding through the redaction of the `*.…` paths above
 * (parsing every path, per call): ~1 % of a gateway call's CPU and ~4 KB of its garbage, for a
 * logger most requests never use (the access line has a logger of its own). This stands in for it
 * and creates the very same child when a log method is first called.
 */
class LazyRequestLogger {
  private made: FastifyBaseLogger | undefined;

  constructor(
    private readonly parent: FastifyBaseLogger,
    private readonly bindings: Record<string, unknown>,
    private readonly options: object,
  ) {}

  get real(): FastifyBaseLogger {
    return (this.made ??= this.parent.child(this.bindings, this.options));
  }

  get level(): string {
    return this.made?.level ?? (this.options as { level?: string }).level ?? this.parent.level;
  }

  set level(level: string) {
    this.real.level = level;
  }

  child(...args: Parameters<FastifyBaseLogger['child']>): FastifyBaseLogger {
    return this.real.child(...args);
  }
}
// The log methods on the prototype: nothing allocated per request but the stand-in itself.
for (const method of LOG_METHODS) {
  Object.defineProperty(LazyRequestLogger.prototype, method, {
    value: function (this: LazyRequestLogger, ...args: unknown[]) {
      const real = this.real;
      return Reflect.apply(real[method], real, args) as unknown;
    },
  });
}

/** Fastify's `childLoggerFactory`: request loggers made on first use (see LazyRequestLogger). */
export function lazyRequestLogger(logger: FastifyBaseLogger, bindings: Record<string, unknown>, options: object): FastifyBaseLogger {
  return new LazyRequestLogger(logger, bindings, options) as unknown as FastifyBaseLogger;
}
