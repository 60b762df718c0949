import type { Redis } from 'ioredis';

import type { Logger } from '../../core/logger.js';

import { asRunBusError, type RedisSubscriber } from './redis-subscriber.js';
import { CANCEL_MARK_TTL_SECONDS, type RunSignals } from './run-bus.js';

export interface RedisRunSignalsOptions {
  /** REDIS_KEY_PREFIX. */
  keyPrefix: string;
}

interface Subscription {
  onCancel: (reason: string | undefined) => void;
  done: boolean;
}

interface CancelMessage {
  run_id: string;
  reason: string | null;
}

/**
 * Scaled mode's cancels: PUBLISH on one channel every node listens to through its one subscriber
 * connection (cancels are rare, so one channel beats a SUBSCRIBE per running run), plus a
 * short-lived key per cancelled run that subscribe() checks once the channel is confirmed.
 */
export class RedisRunSignals implements RunSignals {
  private readonly subscriptions = new Map<string, Set<Subscription>>();
  private readonly releaseSubscriber: () => void;
  private readonly stopCatchingUp: () => void;
  /** Resolves once the cancel channel is confirmed; replaced after a failure so the next subscribe retries. */
  private listening: Promise<(() => void) | null> | null = null;
  private closed = false;

  constructor(
    private readonly redis: Redis,
    private readonly subscriber: RedisSubscriber,
    private readonly options: RedisRunSignalsOptions,
    private readonly logger: Logger,
  ) {
    this.releaseSubscriber = subscriber.use();
    this.stopCatchingUp = subscriber.onReconnect(() => this.checkMarksOnceListening([...this.subscriptions.keys()]));
    void this.listen();
  }

  private get channel(): string {
    return `${this.options.keyPrefix}run:cancels`;
  }

  private markKey(runId: string): string {
    return `${this.options.keyPrefix}run:${runId}:cancel`;
  }

  async cancel(runId: string, reason?: string): Promise<void> {
    const message: CancelMessage = { run_id: runId, reason: reason ?? null };
    try {
      await this.redis
        .multi()
        // NX: the first cancel's reason stands, as onCancel reports only the first.
        .set(this.markKey(runId), JSON.stringify(message), 'EX', CANCEL_MARK_TTL_SECONDS, 'NX')
        .publish(this.channel, JSON.stringify(message))
        .exec();
    } catch (error) {
      throw asRunBusError(error);
    }
  }

  subscribe(runId: string, onCancel: (reason: string | undefined) => void): () => void {
    const subscription: Subscription = { onCancel, done: false };
    let subscriptions = this.subscriptions.get(runId);
    if (!subscriptions) this.subscriptions.set(runId, (subscriptions = new Set()));
    subscriptions.add(subscription);
    // Registered first, then the mark is read once the channel is confirmed: a cancel is either
    // published after that (and delivered) or marked before the read.
    this.checkMarksOnceListening([runId]);
    return () => {
      subscription.done = true;
      subscriptions.delete(subscription);
      if (subscriptions.size === 0 && this.subscriptions.get(runId) === subscriptions) this.subscriptions.delete(runId);
    };
  }

  private listen(): Promise<(() => void) | null> {
    if (this.closed) return Promise.resolve(null);
    this.listening ??= this.subscriber
      .listen(this.channel, (raw) => {
        try {
          const message = JSON.parse(raw) as CancelMessage;
          this.deliver(message.run_id, message.reason ?? undefined);
        } catch (error) {
          this.logger.warn({ err: error }, 'unreadable run cancel message ignored');
        }
      })
      .catch((error: unknown) => {
        this.logger.error({ err: error }, 'run cancels cannot be received (Redis unreachable); the next subscribe retries');
        this.listening = null;
        return null;
      });
    return this.listening;
  }

  /** Delivers the cancels marked for `runIds`, once the channel is confirmed (so none falls between). */
  private checkMarksOnceListening(runIds: string[]): void {
    void this.listen().then((listening) => listening && this.checkMarks(runIds));
  }

  private async checkMarks(runIds: string[]): Promise<void> {
    if (runIds.length === 0) return;
    try {
      const marks = await this.redis.mget(runIds.map((runId) => this.markKey(runId)));
      marks.forEach((mark, index) => {
        if (mark !== null) this.deliver(runIds[index]!, (JSON.parse(mark) as CancelMessage).reason ?? undefined);
      });
    } catch (error) {
      // The runner also re-reads the run's status; a cancel is late, not lost.
      this.logger.warn({ err: error, runIds }, 'run cancel marks unreadable');
    }
  }

  private deliver(runId: string, reason: string | undefined): void {
    for (const subscription of this.subscriptions.get(runId) ?? []) {
      if (subscription.done) continue;
      subscription.done = true;
      try {
        subscription.onCancel(reason);
      } catch (error) {
        this.logger.error({ err: error, runId }, 'run cancel handler failed');
      }
    }
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.stopCatchingUp();
    const stop = await this.listening;
    stop?.();
    this.subscriptions.clear();
    this.releaseSubscriber();
  }
}
