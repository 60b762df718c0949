import type { Redis } from 'ioredis';

import type { Logger } from '../../core/logger.js';
import { ioredis } from '../../core/redis.js';

import { RunBusUnavailableError } from './run-bus-errors.js';

/**
 * Redis errors that mean "not reachable" become RunBusUnavailableError; a reply error (Redis
 * answered, e.g. a wrong type) is a bug and stays as it is.
 */
export function asRunBusError(error: unknown): Error {
  if (error instanceof RunBusUnavailableError || error instanceof ioredis().ReplyError) return error as Error;
  return new RunBusUnavailableError({ cause: error });
}

type MessageHandler = (message: string) => void;

/**
 * The process's one Redis connection in subscriber mode, shared by the run event log and the run
 * signals: each listens on channels through it, so open SSE streams and running runs cost no
 * connection of their own. The connection closes when its last user releases it.
 */
export class RedisSubscriber {
  private readonly connection: Redis;
  private readonly handlers = new Map<string, Set<MessageHandler>>();
  private readonly reconnectHandlers = new Set<() => void>();
  private users = 0;

  constructor(redis: Redis, connectionName: string, private readonly logger: Logger) {
    this.connection = redis.duplicate({ connectionName });
    // Failures surface in the subscribe calls that fail; this keeps them from crashing the process.
    this.connection.on('error', () => undefined);
    this.connection.on('message', (channel: string, message: string) => {
      for (const handler of this.handlers.get(channel) ?? []) handler(message);
    });
    // Also on the first connection: listens that failed while Redis was not there yet get retried.
    this.connection.on('ready', () => void this.afterReconnect());
  }

  /** Takes a share of the connection; the returned function gives it back (the last one closes it). */
  use(): () => void {
    this.users++;
    let released = false;
    return () => {
      if (released) return;
      released = true;
      if (--this.users === 0) this.connection.disconnect();
    };
  }

  /**
   * Calls `handler` with each message on `channel`; resolves once Redis has confirmed the
   * subscription, so whatever is published afterwards arrives. Returns the function that stops it.
   */
  async listen(channel: string, handler: MessageHandler): Promise<() => void> {
    let handlers = this.handlers.get(channel);
    if (!handlers) this.handlers.set(channel, (handlers = new Set()));
    handlers.add(handler);
    const stop = () => {
      if (!handlers.delete(handler) || handlers.size > 0 || this.handlers.get(channel) !== handlers) return;
      this.handlers.delete(channel);
      // Commands on one connection run in order: a later listen's SUBSCRIBE follows this one.
      this.connection.unsubscribe(channel).catch(() => undefined);
    };
    try {
      // SUBSCRIBE to a channel the connection already has is a no-op that still confirms.
      await this.connection.subscribe(channel);
    } catch (error) {
      stop();
      throw asRunBusError(error);
    }
    return stop;
  }

  /**
   * Runs `handler` after each (re)connection, once Redis has the connection's channels again: what
   * was published while it was away is lost, so users catch up from what Redis keeps.
   */
  onReconnect(handler: () => void): () => void {
    this.reconnectHandlers.add(handler);
    return () => this.reconnectHandlers.delete(handler);
  }

  private async afterReconnect(): Promise<void> {
    try {
      // ioredis re-sends SUBSCRIBE for every channel before 'ready' reaches us; a PING answered on
      // the same connection means Redis has processed them.
      await this.connection.ping();
    } catch {
      return; // gone again: the next 'ready' retries
    }
    this.logger.debug({ channels: this.handlers.size }, 'run bus subscriber connected; catching up');
    for (const handler of this.reconnectHandlers) handler();
  }
}
