/**
 * The app's UsageMeter: every call through `app.models` is reserved here before it goes upstream
 * and settled here after it ends.
 *
 * reserve: API-key rpm (counter: memory, or Redis when scaled) → with BILLING_ENABLED the
 * worst-case cost held from the user's credits, and from the key's `max_budget` when it has one
 * (one conditional UPDATE each). With billing off and a key without limits it does no I/O.
 *
 * settle (after the answer, never on the caller's path): Prometheus, a usage record into the
 * batch writer, and — when something was held — one statement that releases the hold, charges the
 * exact cost and writes the ledger entry (a key's budget charged where there may be none — billing
 * off, or nothing held — the usage record, which makes a retry of that statement charge nothing
 * twice). Nothing is lost: a failed batch or settlement is kept and retried, and `close()` (the
 * app's close hook) refuses calls from then on and writes what is left; what the database still
 * does not take then (it is down) is saved under DATA_DIR/usage-unwritten and written by the next
 * start (`recoverUnwritten`). Past USAGE_MAX_PENDING_ROWS records the database has not taken,
 * calls are refused (503), not records dropped.
 */
import { randomUUID } from 'node:crypto';
import { setImmediate as setImmediatePromise } from 'node:timers/promises';

import type { Redis } from 'ioredis';

import type { Settings } from '../core/config.js';
import type { Database, Db } from '../core/db.js';
import { type CredentialsGone, CredentialsGoneError, databaseError, PaymentRequiredError, ShuttingDownError, TooManyRequestsError, UsageBacklogError } from '../core/errors.js';
import type { Logger } from '../core/logger.js';
import type { ModelMetrics } from '../core/metrics.js';

import * as billingCrud from '../crud/billing.js';
import * as userCrud from '../crud/user.js';
import type { CostEstimate, TokenUsage, UsageMeter, UsageRecord, UsageReservation } from '../modules/ai-models/index.js';
import { costUnits, unitsCost, ZERO_USAGE } from '../modules/ai-models/index.js';
import { isDiskFullCode } from '../utils/error-chain.js';
import { isoFormatter } from '../utils/iso-time.js';
import { type Count, type CounterStore, counterStore, countersUnavailable } from '../utils/rate-limit.js';
import { storableText } from '../utils/text.js';
import { fulfilledWithin } from '../utils/time-limit.js';
import { type CreditBlock, CreditWindows } from './credit-window.js';
import { type KeyLimits, loadKeyLimits } from './key-limits.js';
import { formatMoney, notEnoughCreditsMessage, overBudgetMessage } from './money.js';
import { forgetUnwritten, refreshTaken, saveUnwritten, takeUnwritten, unwrittenDir, type UnwrittenUsage } from './unwritten-usage.js';

export interface UsageMeterOptions {
  db: Db;
  settings: Settings;
  log: Logger;
  metrics: ModelMetrics;
  redis: Redis | null;
}

const RPM_WINDOW_MS = 60_000;

/** A key's `rpm` refusal, and how to read its wait back from it (a run's error keeps only its words: agent-completions.ts). */
const keyRateLimitMessage = (rpm: number, seconds: number) => `API key rate limit reached: rpm ${rpm} (model calls per minute); try again in ${seconds} s`;
export const KEY_RATE_LIMITED = /^API key rate limit reached: rpm \d+ \(model calls per minute\); try again in (\d+) s$/;
const rpmRefusal = (rpm: number, counted: Count) => new TooManyRequestsError(counted.ttlMs / 1000, keyRateLimitMessage(rpm, Math.max(1, Math.ceil(counted.ttlMs / 1000))));

/** Drizzle's query errors carry the statement's parameters (here: whole batches); log the driver's error. */
const cause = (error: unknown): unknown => (error as { cause?: unknown }).cause ?? error;

/**
 * The database refused a statement for what it was given (SQLSTATE class 22, data; 23, integrity),
 * not for being unreachable: retried as it is, it fails the same way every time.
 */
const refusedForData = (error: unknown): boolean => /^2[23]/.test(databaseError(error)?.code ?? '');
/**
 * A retried settlement whose first attempt committed after the retry had looked for it (a reply
 * lost while the statement still ran): the ledger's one usage entry per call refused the retry
 * whole, so the call is charged, once. A retried batch may be refused by its entry's id first
 * (made ahead with the settlement, `Settlement.json`: the same in both attempts).
 */
const chargedAlready = (error: unknown): boolean => {
  const refusal = databaseError(error);
  return refusal?.code === '23505' && (refusal.constraint === 'ux_credit_transactions_usage_record_id' || refusal.constraint === 'credit_transactions_pkey');
};
const SWEEP_INTERVAL_MS = 60_000;
/** The longest `written()` holds a read or a run's end. */
const WRITTEN_WAIT_MS = 2_000;
/** A credit window's block nobody used for this long goes back to the account. */
const WINDOW_IDLE_MS = 2_000;

const MAX_REFILLS_PER_CALL = 3;
/** The log's words for a call refused because its credentials went away (`credentialsGone`). */
const GONE_BEFORE_HOLD: Record<CredentialsGone, string> = {
  api_key_deleted: 'its API key was deleted',
  api_key_revoked: 'its API key was revoked',
  user_deleted: 'its user was deleted',
  user_deactivated: 'its user was deactivated',
};
/** A usage row's times as ISO strings (calls settled together often ended, or started, in the same millisecond). */
const endTime = isoFormatter();
const startTime = isoFormatter();
/** TokenUsage's kinds, in its order (the order their series first appear in /metrics, as before). */
const TOKEN_KINDS = Object.keys(ZERO_USAGE) as (keyof TokenUsage)[];

/**
 * On a billed call's settlement whose usage row is queued apart (`buffer`): that row, in
 * `pairedRows` while both are unwritten. A symbol, so that JSON (the files of `saveUnwritten`)
 * leaves it out: a saved settlement does not carry its row a second time.
 */
const PAIRED_ROW = Symbol('paired usage row');
type PairedSettlement = billingCrud.Settlement & { [PAIRED_ROW]?: string };

/** What a call holds: nothing (null ids), a reservation row, or part of a credit window's block. */
interface Held {
  reservationId: string | null;
  chargeAccount: boolean;
  chargeKey: boolean;
  window?: { block: CreditBlock; units: bigint };
}

/**
 * At start, embedded: releases the credit reservations found in the database. PGlite runs in one
 * process per data directory (its lock: core/data-dir-lock.ts), so any reservation there before this
 * process holds one is a dead process's (killed mid-call, kill -9): waiting for its expiry
 * (BILLING_RESERVATION_TTL_SECONDS, up to 15 min) kept that credit from the account, and its calls
 * refused (402), for nothing. Call it once, before any meter of the process is made (`keel start`
 * serves the API and runs jobs through meters of its own): it would take a live meter's holds too.
 * Scaled (PostgreSQL), other nodes' reservations are live: they keep their expiry (the sweep's).
 */
export async function releaseHoldsLeftBehind(database: Database, log: Logger): Promise<number> {
  if (database.kind !== 'pglite') return 0;
  const released = await billingCrud.releaseAll(database.db);
  if (released) log.warn({ component: 'usage-meter', released }, 'credit reservations of an earlier process released at start (embedded: it ended mid-call)');
  return released;
}

export class UsageMeterService implements UsageMeter {
  private readonly db: Db;
  private readonly settings: Settings;
  private readonly log: Logger;
  private readonly metrics: ModelMetrics;
  private readonly counters: CounterStore;
  private readonly rpmPrefix: string;
  /** Usage rows as JSON (`usageRowJson`), made as each call settled: a flush only joins them. */
  private buffer: string[] = [];
  private failedSettlements: billingCrud.Settlement[] = [];
  /** Settlements waiting for the statement in flight (`settling`) to end. */
  private settlements: billingCrud.Settlement[] = [];
  private settling: Promise<void> | null = null;
  /** The settlements the statement in flight (`settling`) writes, and that statement (settled either way). */
  private settlingBatch: billingCrud.Settlement[] = [];
  private settlingStatement: Promise<void> | null = null;
  /** Credit windows (BILLING_CREDIT_WINDOW_CALLS > 0): holds from memory, settled with the batch writer. */
  private readonly windows: CreditWindows | undefined;
  private windowSettlements: billingCrud.Settlement[] = [];
  /** Retired blocks to give back, and holds that failed with no telling whether they committed (`releaseLost`), written after the settlements queued before them. */
  private blockReleases: billingCrud.Settlement[] = [];
  private windowTimer: NodeJS.Timeout | undefined;
  private readonly inFlight = new Set<Promise<unknown>>();
  /** Calls ended whose settlement waits for the event loop's next check phase (see defer). */
  private deferred: { held: Held; record: UsageRecord }[] = [];
  private deferredTimer: NodeJS.Immediate | undefined;
  private flushing: Promise<void> | null = null;
  /** Flushes ended so far: a hold refused while one was being written tries again after it (see `hold`). */
  private flushes = 0;
  /** Flushes begun so far: a file taken back is done with once a flush begun after its take writes all it took (see `flush`). */
  private flushesBegun = 0;
  /** Writes that failed (or were put off) and were kept for a retry (`retryLater`): a flush during which this did not move wrote all it took. */
  private failures = 0;
  /** The flush `flushQueued` callers wait for while one runs. */
  private followingFlush: Promise<void> | null = null;
  private flushTimer: NodeJS.Timeout | undefined;
  private sweepTimer: NodeJS.Timeout | undefined;
  /** close() has begun: calls are refused from then on (see close). */
  private closing = false;
  /** close() has resolved: what a call still in flight then adds is written at once (`lateFlush`), no timer runs any more. */
  private closed = false;
  private lateFlush: NodeJS.Immediate | undefined;
  /**
   * What the flush's statement in flight holds, taken off the queues (its usage rows and window
   * settlements, the failed settlements it retries, the block releases it ends with): saved with
   * the queues by `saveUnwritten`, which the shutdown deadline may call while that statement hangs.
   */
  private writing: UnwrittenUsage = { usage: [], settlements: [], windowSettlements: [], blockReleases: [] };
  /** How many of `writing.settlements` the retry (`retryFailed`) has written so far. */
  private retriedUpTo = 0;
  /** What the last save of unwritten usage could not keep (saveUnwritten failed): said by `lostAtShutdown`. */
  private lost: string | null = null;
  /** Files of unwritten usage were left on disk for want of room in the queue (`recoverUnwritten`). */
  private unwrittenLeft = false;
  /** Calls are being refused for the backlog of unwritten usage (logged once, until a flush brings it under the limit). */
  private backlogged = false;
  /**
   * Files of unwritten usage this process took (`recoverUnwritten`) whose items are not yet known to
   * be written, each with the flushes begun before its take (`flushesBegun`).
   */
  private recovered: { file: string; takenAfter: number }[] = [];
  /**
   * The settlements taken back from saved files (`recoverUnwritten`) not yet written (their block
   * releases are `releases`): counted toward the take's room, not toward refusing calls (`callRecords`). Not a
   * settlement taken with its call's usage row: paired again (`takeBack`), the row counts for both.
   */
  private fromFiles = new Set<billingCrud.Settlement>();
  /**
   * A write failed and no flush has written all it took since: the records taken back from files
   * count toward refusing calls again (`callRecords`), so an outage that lasts across restarts does
   * not let each process serve its limit's worth on top of the save it took, and save both.
   */
  private writesFailing = false;
  /**
   * The usage rows (queued apart, `buffer`) of billed calls whose settlement is unwritten too: such
   * a call counts once toward USAGE_MAX_PENDING_ROWS (`unwrittenRows`), as one that leaves a row
   * alone or a settlement carrying its row does. Counted once per record, a billed call counted
   * twice, and calls were refused at half the limit. A row leaves once it or its settlement (which
   * names it: PAIRED_ROW) is written or set aside: the other then counts alone. One set, deleted
   * from by either side, where a map each way cost a billed call two writes and two deletes.
   */
  private readonly pairedRows = new Set<string>();
  /**
   * The credit releases not yet written (a retired block's, a failed hold's: `releaseReservation`,
   * or taken back from saved files): in the queues like the records, but not toward refusing calls
   * (`callRecords`). They carry no usage and no charge; a lost one only leaves its credit held until
   * the reservation expires (or, embedded, the next start). While the database is down every call
   * whose hold statement fails leaves one, and counted, a few failed calls brought the 503 that many
   * calls nearer for records there were none of.
   */
  private readonly releases = new Set<billingCrud.Settlement>();

  constructor(options: UsageMeterOptions) {
    this.db = options.db;
    this.settings = options.settings;
    this.log = options.log.child({ component: 'usage-meter' });
    this.metrics = options.metrics;
    this.counters = counterStore(options.redis);
    this.rpmPrefix = options.redis ? `${options.settings.REDIS_KEY_PREFIX}rate-limit:api-key-rpm:` : 'api-key-rpm:';
    if (options.settings.BILLING_ENABLED && options.settings.BILLING_CREDIT_WINDOW_CALLS > 0) {
      this.windows = new CreditWindows({
        blockCalls: options.settings.BILLING_CREDIT_WINDOW_CALLS,
        ttlSeconds: options.settings.BILLING_RESERVATION_TTL_SECONDS,
        idleMs: WINDOW_IDLE_MS,
        onRetired: (block) => this.releaseBlock(block),
        background: (work) => this.track(work),
        hold: (held) => this.holdOnce(held),
      });
    }
  }

  /** Writes what an earlier process left unwritten; releases reservations left by crashed processes now and every minute. */
  start(): void {
    this.recoverUnwritten();
    this.track(this.sweep());
    this.sweepTimer = setInterval(
      () => {
        // What another process on this DATA_DIR saved since (stopped while the database was down).
        this.recoverUnwritten();
        this.track(this.sweep());
      },
      Math.min(SWEEP_INTERVAL_MS, this.settings.BILLING_RESERVATION_TTL_SECONDS * 500),
    );
    this.sweepTimer.unref();
    if (this.windows) {
      const windows = this.windows;
      this.windowTimer = setInterval(() => windows.retireIdle(), WINDOW_IDLE_MS);
      this.windowTimer.unref();
    }
  }

  // ==================== reserve ====================

  reserve(estimate: CostEstimate): UsageReservation | Promise<UsageReservation> {
    if (this.closing) throw new ShuttingDownError();
    if (this.backlogFull()) this.refuseForBacklog();
    const keyId = estimate.context.api_key_id ?? null;
    if (keyId === null) return this.hold(estimate, null);
    const limits = estimate.context.api_key_limits;
    if (limits) return this.hold(estimate, limits);
    return loadKeyLimits(this.db, keyId).then((loaded) => this.hold(estimate, loaded));
  }

  private hold(estimate: CostEstimate, limits: KeyLimits | null): UsageReservation | Promise<UsageReservation> {
    const userId = estimate.context.user_id ?? null;
    const free = estimate.cost === '0';
    const chargeAccount = this.settings.BILLING_ENABLED && userId !== null;
    const budgeted = limits !== null && limits.max_budget !== null;
    const holdAccount = chargeAccount && !free;
    const holdKey = budgeted && !free;
    // One call, one request of the key's rpm: its fallbacks are not counted again, nor calls
    // exempted by their caller (ingestion's embedding batches: see CallContext.rpm_exempt).
    const rpm = estimate.fallback || estimate.context.rpm_exempt ? null : limits?.rpm;
    if (!holdAccount && !holdKey && !rpm) {
      return this.reservation({ reservationId: null, chargeAccount, chargeKey: budgeted });
    }
    // The usual billed call (the account only): from the user's credit window, without I/O when it has room.
    const windows = holdAccount && !holdKey ? this.windows : undefined;
    const units = windows ? costUnits(estimate.cost) : BigInt(0);
    const fromWindow = (block: CreditBlock | undefined) =>
      block && this.reservation({ reservationId: block.id, chargeAccount, chargeKey: budgeted, window: { block, units } });
    if (windows && !rpm) {
      const served = fromWindow(windows.tryHold(userId!, units));
      if (served) return served;
    }
    return (async () => {
      if (rpm) await this.countRequest(estimate, rpm);
      if (!holdAccount && !holdKey) return this.reservation({ reservationId: null, chargeAccount, chargeKey: budgeted });
      if (windows) {
        // A burst can empty a fresh block before every waiter had its share: those take the next one.
        for (let refills = 0; ; refills++) {
          const served = fromWindow(windows.tryHold(userId!, units));
          if (served) return served;
          if (refills === MAX_REFILLS_PER_CALL || !(await windows.refill(userId!, estimate.cost))) break;
        }
        // No block to be had (the balance is low): this call holds its own amount, as without windows.
      }
      const id = randomUUID();
      const held = {
        id,
        userId,
        // The key only where its budget is held (its part is what the sweep gives back by it), as a
        // credit window's block does: a call may name a key deleted since, with no limits left
        // (ingestion queued through it), which the reservation's foreign key would refuse.
        apiKeyId: holdKey ? estimate.context.api_key_id! : null,
        accountAmount: holdAccount ? estimate.cost : null,
        keyAmount: holdKey ? estimate.cost : null,
        ttlSeconds: this.settings.BILLING_RESERVATION_TTL_SECONDS,
      };
      const flushes = this.flushes;
      let outcome = await this.holdOnce(held);
      // Refused while this process may still owe the account credit, the call waits for that flush
      // and tries once more, so a call the account covers is not refused for a block with nothing in progress.
      if (outcome === 'balance' && this.windows && holdAccount) {
        // A call that holds per call by design (through a key with a budget) was refused for the
        // block the user's other calls took, idle now (402 right after such a call): it goes back too.
        if (holdKey) this.windows.retireUnused(userId);
        if (this.mayOweAccount(this.windows, userId, flushes)) {
          // What was queued when it began (not `flush()`'s "until nothing is pending", which under
          // load waits on other calls' rows). A flush that fails keeps what it held for the next
          // (logged there): this call is then refused as it was.
          await this.flushQueued().catch(() => undefined);
          outcome = await this.holdOnce(held);
        }
      }
      // Refused while a call of the same user or key that has ended still holds its worst case here
      // (its settlement waits for the next check phase, or is being written): a client that sends its
      // next call as soon as the last answered would be refused for credit that call no longer needs.
      if (outcome !== 'held' && this.owesHolds(held)) {
        await this.settleOwed(held);
        outcome = await this.holdOnce(held);
      }
      if (outcome === 'balance') throw await this.notEnoughCredits(userId!, estimate);
      if (outcome === 'budget') throw await this.overBudget(estimate);
      return this.reservation({ reservationId: id, chargeAccount, chargeKey: budgeted });
    })();
  }

  /**
   * A hold statement (a call's, or a credit window's block's). One that fails may have committed
   * all the same (its reply lost with the connection, or a server silent past the query timeout
   * that runs it once it is reached again): the row, which no call or block in memory stands for,
   * would keep the credit (and a key's budget) held until it expired, after the outage. Its release
   * goes with the next flush; with no such row it releases nothing.
   */
  private holdOnce(held: billingCrud.Hold): Promise<billingCrud.HoldOutcome> {
    return billingCrud.hold(this.db, held).catch((error: unknown) => {
      this.releaseLost(held);
      throw error;
    });
  }

  private async countRequest(estimate: CostEstimate, rpm: number): Promise<void> {
    const keyId = estimate.context.api_key_id!;
    const counted = await this.rpmCounter(keyId, (key) => this.counters.hit(key, RPM_WINDOW_MS));
    if (counted.count > rpm) throw rpmRefusal(rpm, counted);
  }

  /**
   * A run's start through a key with `rpm` (run-service.ts): 429 when the key has made its `rpm`
   * calls this minute, so its first call would be refused — before the start writes a thread, its
   * messages and a run that would only fail (one per refused call), as a catalog model's call writes
   * nothing. A look, counting nothing: the run's model calls count as they are made (reserve), and
   * starts at the same moment may all pass it, to be refused by their first call's count.
   */
  async refuseSpentKeyRpm(keyId: string, rpm: number): Promise<void> {
    const counted = await this.rpmCounter(keyId, (key) => this.counters.peek(key));
    if (counted.count >= rpm) throw rpmRefusal(rpm, counted);
  }

  private async rpmCounter(keyId: string, read: (key: string) => Promise<Count>): Promise<Count> {
    try {
      return await read(`${this.rpmPrefix}${keyId}`);
    } catch (error) {
      throw countersUnavailable(this.log, error, { apiKeyId: keyId });
    }
  }

  /**
   * The refusal of a hold the account did not cover. The user may be gone instead: deleted after the
   * call was authenticated and before its hold reached their account (whose row went with them), or
   * deactivated (the hold takes nothing of an inactive user's: `holdAccount`). The call is then
   * answered as one made with their credentials now is (401), not with a balance of 0.
   */
  private async notEnoughCredits(userId: string, estimate: CostEstimate): Promise<PaymentRequiredError | CredentialsGoneError> {
    const [credits, user] = await Promise.all([billingCrud.getBalance(this.db, userId), userCrud.getById(this.db, userId)]);
    if (!user || !user.is_active) return this.credentialsGone(estimate, user ? 'user_deactivated' : 'user_deleted');
    return new PaymentRequiredError(`${notEnoughCreditsMessage(credits)}; this call to ${estimate.model} needs up to ${formatMoney(estimate.cost)}`);
  }

  /**
   * The refusal of a hold the key's budget did not take. The key may be gone instead: deleted after
   * the call was authenticated and before its hold reached the row (the hold's conditional UPDATE
   * then finds none, as for a key over budget), or revoked, or its owner deactivated (the hold takes
   * nothing of such a key's: `holdKey`). The call is answered as one made with the key now is (401),
   * not with a budget the key no longer has; nothing was held (one transaction).
   */
  private async overBudget(estimate: CostEstimate): Promise<PaymentRequiredError | CredentialsGoneError> {
    const keyId = estimate.context.api_key_id!;
    const budget = await billingCrud.keyBudget(this.db, keyId);
    if (!budget) return this.credentialsGone(estimate, 'api_key_deleted');
    if (budget.revoked) return this.credentialsGone(estimate, 'api_key_revoked');
    if (budget.ownerInactive) return this.credentialsGone(estimate, 'user_deactivated');
    return new PaymentRequiredError(`${overBudgetMessage(budget.maxBudget ?? '0', budget)}; this call to ${estimate.model} needs up to ${formatMoney(estimate.cost)}`);
  }

  /** Said once, at info: the client's credentials went away, nothing failed here. */
  private credentialsGone(estimate: CostEstimate, reason: CredentialsGone): CredentialsGoneError {
    const ids = { userId: estimate.context.user_id ?? null, apiKeyId: estimate.context.api_key_id ?? null, model: estimate.model };
    this.log.info(ids, `model call refused: ${GONE_BEFORE_HOLD[reason]} before its hold`);
    return new CredentialsGoneError(reason);
  }

  /** `holdsOutput`: credit is held (the account's, a window's block, a key's budget), sized by the call's output maximum, which it must then send. */
  private reservation(held: Held): UsageReservation {
    return { settle: (record) => this.defer(held, record), holdsOutput: held.reservationId !== null };
  }

  // ==================== settle ====================

  /**
   * The manager settles a call as it returns, before the caller has answered: the settlement
   * (metrics, the usage row, the window's arithmetic) runs in the event loop's next check phase
   * instead, after the answer has been written, the calls ended meanwhile together. `idle()` runs
   * what is still waiting, so nothing is skipped by a flush or at shutdown.
   */
  private defer(held: Held, record: UsageRecord): void {
    this.deferred.push({ held, record });
    this.deferredTimer ??= setImmediate(() => this.settleDeferred());
  }

  private settleDeferred(): void {
    if (this.deferredTimer) clearImmediate(this.deferredTimer);
    this.deferredTimer = undefined;
    const calls = this.deferred;
    this.deferred = [];
    for (const { held, record } of calls) {
      try {
        this.settle(held, record);
      } catch (error) {
        this.log.error({ err: error, model: record.model }, 'usage meter failed to settle a call');
      }
    }
  }

  private settle(held: Held, record: UsageRecord): void {
    this.observe(record);
    const id = randomUUID();
    const started = startTime(record.started_at.getTime());
    const ctx = record.context;
    const row = billingCrud.usageRowJson({
      id,
      created_at: endTime(record.started_at.getTime() + record.latency_ms),
      owner_id: ctx.user_id ?? null,
      api_key_id: ctx.api_key_id ?? null,
      project_id: ctx.project_id ?? null,
      agent_id: ctx.agent_id ?? null,
      run_id: ctx.run_id ?? null,
      model: record.model,
      provider: record.provider,
      operation: record.operation,
      input_tokens: record.tokens.input,
      cached_input_tokens: record.tokens.cached_input,
      cache_write_tokens: record.tokens.cache_write,
      output_tokens: record.tokens.output,
      reasoning_tokens: record.tokens.reasoning,
      cost: record.cost,
      latency_ms: record.latency_ms,
      time_to_first_token_ms: record.time_to_first_token_ms,
      status: record.status,
      error: record.error === null ? null : storableText(record.error, 2_000),
      estimated: record.estimated,
      attempts: record.attempts,
      started_at: started,
      // A key with a budget has its spend moved by the settlement below; others with the batch.
      charge_key: !held.chargeKey,
    });
    if (held.reservationId === null && (record.cost === '0' || (!held.chargeAccount && !held.chargeKey))) {
      this.enqueue(row);
      return;
    }
    const settlement: PairedSettlement = {
      reservationId: held.reservationId,
      userId: ctx.user_id ?? null,
      apiKeyId: ctx.api_key_id ?? null,
      projectId: ctx.project_id ?? null,
      cost: record.cost,
      chargeAccount: held.chargeAccount,
      chargeKey: held.chargeKey,
      usageRecordId: id,
      description: `${record.operation} ${record.model}${record.status === 'success' ? '' : ` (${record.status})`}`,
    };
    // A key charged where the call may get no ledger entry — billing off, or nothing held (a free
    // estimate: the account may have no row, never granted) — the settlement writes the call's usage
    // row, whose id tells a retried settlement that had committed to move nothing again
    // (Settlement.usage). A call that held its cost held it from an account: its entry tells.
    if (held.chargeKey && (!held.chargeAccount || held.reservationId === null)) {
      settlement.usage = row;
    } else {
      settlement[PAIRED_ROW] = row;
      this.pairedRows.add(row);
      this.enqueue(row);
    }
    if (held.window) {
      // Covered by the block in memory: written with the next batch (the block keeps the credit held meanwhile).
      const { block, units } = held.window;
      const cost = costUnits(record.cost);
      const used = cost < units ? cost : units;
      settlement.release = unitsCost(used);
      settlement.json = billingCrud.settlementJson(settlement);
      this.windowSettlements.push(settlement);
      this.windows!.settled(block, units, used);
      return;
    }
    this.settlements.push(settlement);
    if (!this.settling) this.track((this.settling = this.settlePending()));
  }

  /** A retired block whose calls have all settled: delete its row, giving what is left of it back to the account. */
  private releaseBlock(block: CreditBlock): void {
    this.releaseReservation({ reservationId: block.id, userId: block.userId, apiKeyId: null, chargeAccount: true, chargeKey: false, description: 'credit window released' });
  }

  /** A hold whose statement failed with no telling whether it committed: its row, if any, goes back whole. */
  private releaseLost(held: billingCrud.Hold): void {
    this.releaseReservation({
      reservationId: held.id,
      userId: held.userId,
      apiKeyId: held.apiKeyId,
      chargeAccount: held.accountAmount !== null,
      chargeKey: held.keyAmount !== null,
      description: 'credit hold released (its statement failed)',
    });
  }

  /** Deletes a reservation's row with the next flush (after the settlements queued before it), giving back what it holds; charges nothing. */
  private releaseReservation(release: Pick<billingCrud.Settlement, 'reservationId' | 'userId' | 'apiKeyId' | 'chargeAccount' | 'chargeKey' | 'description'>): void {
    const item: billingCrud.Settlement = { ...release, projectId: null, cost: '0', usageRecordId: randomUUID() };
    this.blockReleases.push(item);
    this.releases.add(item);
    this.schedule();
  }

  /**
   * Writes the queued settlements, one statement per batch: the first call's goes out at once, and
   * calls that end while a statement is in flight are settled together by the next one.
   */
  private async settlePending(): Promise<void> {
    try {
      while (this.settlements.length) {
        const batch = this.settlements.splice(0, this.settings.USAGE_FLUSH_MAX_ROWS);
        this.settlingBatch = batch;
        const statement = billingCrud.settleMany(this.db, batch);
        this.settlingStatement = statement.then(
          () => undefined,
          () => undefined,
        );
        try {
          await statement;
          this.wroteItems(batch);
        } catch (error) {
          this.log.error({ err: cause(error), settlements: batch.length }, 'credit settlement failed; kept for a retry');
          // Off the batch in flight first: counted once (unwrittenRows).
          this.settlingBatch = [];
          this.failedSettlements.push(...batch);
          this.retryLater();
        }
      }
    } finally {
      this.settling = null;
      this.settlingBatch = [];
      this.settlingStatement = null;
    }
  }

  /** The call's metrics, by series key: the label values joined by newlines, which model ids and provider names never contain. */
  private observe(record: UsageRecord): void {
    const { model, provider, operation, status, tokens } = record;
    const m = this.metrics;
    const byModel = `${model}\n${provider}`;
    const byCall = `${byModel}\n${operation}\n${status}`;
    const callLabels = { model, provider, operation, status };
    m.calls.incKeyed(byCall, callLabels);
    m.latency.observeKeyed(byCall, callLabels, record.latency_ms / 1000);
    if (record.time_to_first_token_ms !== null) m.timeToFirstToken.observeKeyed(byModel, { model, provider }, record.time_to_first_token_ms / 1000);
    for (const kind of TOKEN_KINDS) {
      const count = tokens[kind];
      if (count > 0) m.tokens.incKeyed(`${byModel}\n${kind}`, { model, provider, kind }, count);
    }
    const cost = Number(record.cost);
    if (cost > 0) m.cost.incKeyed(byModel, { model, provider }, cost);
  }

  // ==================== Batch writer ====================

  /**
   * Past USAGE_MAX_PENDING_ROWS unwritten records, calls are refused (`reserve`) rather than
   * records dropped: the calls in flight then still add theirs, a bounded few past the limit.
   */
  private refuseForBacklog(): never {
    if (!this.backlogged) {
      this.backlogged = true;
      this.log.error({ pending: this.callRecords() }, 'model calls refused: usage records are not being written to the database');
    }
    throw new UsageBacklogError();
  }

  private enqueue(row: string): void {
    this.buffer.push(row);
    if (this.buffer.length >= this.settings.USAGE_FLUSH_MAX_ROWS) this.track(this.flush());
    else this.schedule();
  }

  /**
   * Writes what was just queued with the next flush (USAGE_FLUSH_INTERVAL_MS); once closed, at once
   * (in the next check phase, with whatever else its turn of the event loop queued).
   */
  private schedule(): void {
    if (this.closed) {
      this.lateFlush ??= setImmediate(() => {
        // A block taken for a call that reserved before close() began goes back too.
        this.windows?.retireIdle(true);
        this.lateFlush = undefined;
        this.track(this.flush());
      });
      return;
    }
    if (this.flushTimer) return;
    this.flushTimer = setTimeout(() => {
      this.flushTimer = undefined;
      this.track(this.flush());
    }, this.settings.USAGE_FLUSH_INTERVAL_MS);
    this.flushTimer.unref();
  }

  /** After a failure: the next flush retries what was kept (once closed, the next write of a late call does). */
  private retryLater(): void {
    this.failures += 1;
    this.writesFailing = true;
    if (!this.closed) this.schedule();
  }

  /**
   * Records not in the database yet, each toward USAGE_MAX_PENDING_ROWS: usage rows, settlements
   * and block releases, queued, kept after a failure, or in a statement in flight; a billed call's
   * usage row and settlement, both unwritten, as one (`pairedRows`). With the usage
   * rows alone, every statement that took rows off the buffer during an outage let that many more
   * calls through, and calls that leave only a settlement (a key with a budget, billing off: it
   * carries the usage row; a per-call hold's) were never refused: memory without bound, and more
   * than the limit lost to a kill -9.
   */
  private unwrittenRows(): number {
    const writing = this.writing;
    return (
      this.buffer.length +
      writing.usage.length +
      this.settlements.length +
      this.settlingBatch.length +
      this.failedSettlements.length +
      (writing.settlements.length - this.retriedUpTo) +
      this.windowSettlements.length +
      writing.windowSettlements.length +
      this.blockReleases.length +
      writing.blockReleases.length -
      this.pairedRows.size
    );
  }

  /**
   * The unwritten records that count toward refusing calls: what USAGE_MAX_PENDING_ROWS bounds is
   * the calls' usage records and charges this process holds unwritten (what a kill -9 would lose),
   * so not the credit releases (`releases`: no usage, no charge), nor the settlements taken back
   * from saved files while writes succeed. A save's are taken whole, past the take's room (see
   * `recoverUnwritten`): counted, a process that saved about USAGE_MAX_PENDING_ROWS of them at
   * shutdown had the next one refuse every call (503), the database up, until it had written them
   * all. They count toward the take's room instead (`unwrittenRows`), which keeps the take bounded.
   * Usage rows taken back still count: a take never goes past its room with them. While writes
   * fail (`writesFailing`) they count too: the database down, calls are refused at the limit
   * whatever was taken back.
   */
  /**
   * Whether calls are refused for what waits unwritten: USAGE_MAX_PENDING_ROWS of the calls' records
   * (`callRecords`), or as many credit releases. Releases have their own bound, not a share of the
   * records': while the database is down every call whose hold statement fails leaves one, so
   * without it an outage under load grew memory without end; past it such calls would fail at
   * their hold anyway.
   */
  private backlogFull(): boolean {
    const limit = this.settings.USAGE_MAX_PENDING_ROWS;
    return this.callRecords() >= limit || this.releases.size >= limit;
  }

  private callRecords(): number {
    return this.unwrittenRows() - this.releases.size - (this.writesFailing ? 0 : this.fromFiles.size);
  }

  /** `items` are written (or set aside): those taken back from files no longer wait, and a billed call's row counts alone. */
  private wroteItems(items: readonly billingCrud.Settlement[]): void {
    if (this.fromFiles.size) for (const item of items) this.fromFiles.delete(item);
    if (this.releases.size) for (const item of items) this.releases.delete(item);
    if (!this.pairedRows.size) return;
    for (const item of items) {
      const row = (item as PairedSettlement)[PAIRED_ROW];
      if (row !== undefined) this.pairedRows.delete(row);
    }
  }

  /** Usage `rows` are written (or set aside): a billed call's settlement counts alone. */
  private wroteRows(rows: readonly string[]): void {
    if (this.pairedRows.size) for (const row of rows) this.pairedRows.delete(row);
  }

  /**
   * Writes the buffered usage records and retries failed settlements; one flush at a time. What
   * fails stays for the next flush (logged), so a database outage loses nothing.
   */
  flush(): Promise<void> {
    if (this.flushing) return this.flushing.then(() => (this.hasPending() ? this.flush() : undefined));
    const thisFlush = ++this.flushesBegun;
    const failures = this.failures;
    let wroteAll = false;
    this.flushing = this.writeOnce()
      .then(() => {
        // Nothing it took was kept for a retry (nor anything else meanwhile, a per-call
        // settlement's statement: that errs toward keeping files, never toward losing them).
        wroteAll = this.failures === failures;
      })
      .finally(() => {
        this.flushing = null;
        this.flushes += 1;
        if (wroteAll) this.writesFailing = false;
        if (this.backlogged && !this.backlogFull()) {
          this.backlogged = false;
          this.log.info({ pending: this.callRecords() }, 'usage records are being written again: model calls resume');
        }
        // After a failure, saved files wait for the retry (USAGE_FLUSH_INTERVAL_MS: retryLater) to
        // write: taken at once, an outage read file after file into flushes bound to fail.
        if (!wroteAll) return;
        try {
          // A flush takes everything queued when it began, what files taken before then held
          // included: having written all it took, it wrote what those held, whether or not calls
          // keep the queue from emptying (waiting for it to empty kept them on disk under steady
          // load, for a kill -9 to have the next process write them again). With nothing left
          // pending, every file taken is written.
          this.forgetRecovered(this.hasPending() ? thisFlush : undefined);
          if (this.unwrittenLeft && !this.closing) this.recoverUnwritten();
        } catch (error) {
          this.log.error({ err: error }, 'usage saved by earlier processes: its files could not be handled');
        }
      });
    return this.flushing;
  }

  /**
   * Whether a hold refused for `userId`, which began after `flushes` flushes, may have missed credit
   * this process gives back: a retired block's release and its calls' charges are written only with
   * the next flush — or the one being written, or one written while the hold ran.
   */
  private mayOweAccount(windows: CreditWindows, userId: string, flushes: number): boolean {
    return this.owesAccount(userId) || (windows.hadBlock(userId) && (this.flushing !== null || this.flushes !== flushes));
  }

  /**
   * Per-call holds of this process that ended and are not yet settled (waiting for the next check
   * phase, queued, or being written) and that hold what `held` holds from: the user's account, or
   * the key's budget.
   */
  private owesHolds(held: billingCrud.Hold): boolean {
    // A per-call hold's settlement (a reservation id, not a window's) from the same account or key.
    const same = (reservationId: string | null, charge: Pick<Held, 'chargeAccount' | 'chargeKey'>, userId: string | null | undefined, apiKeyId: string | null | undefined) =>
      reservationId !== null && ((held.accountAmount !== null && charge.chargeAccount && userId === held.userId) || (held.keyAmount !== null && charge.chargeKey && apiKeyId === held.apiKeyId));
    return (
      this.deferred.some(({ held: h, record }) => !h.window && same(h.reservationId, h, record.context.user_id, record.context.api_key_id)) ||
      this.settlements.some((s) => same(s.reservationId, s, s.userId, s.apiKeyId)) ||
      this.settlingBatch.some((s) => same(s.reservationId, s, s.userId, s.apiKeyId))
    );
  }

  /**
   * Settles the ended calls `held` waits for: those waiting for the next check phase go into the
   * queue now, then statement by statement until none of them is left (a failed one is kept for a
   * retry, and no longer waited for) — not until the queue is empty, which other accounts' calls
   * ending meanwhile would put off without bound.
   */
  private async settleOwed(held: billingCrud.Hold): Promise<void> {
    this.settleDeferred();
    while (this.settlingStatement && this.owesHolds(held)) await this.settlingStatement;
  }

  /** Writes of this process that change the user's available credit: a retired block's release, its calls' charges. */
  private owesAccount(userId: string): boolean {
    return this.blockReleases.some((r) => r.userId === userId) || this.windowSettlements.some((s) => s.userId === userId);
  }

  private hasPending(): boolean {
    return this.buffer.length > 0 || this.failedSettlements.length > 0 || this.windowSettlements.length > 0 || this.blockReleases.length > 0;
  }

  /**
   * One flush: the buffered usage records and the window calls' settlements, together in
   * statements of at most USAGE_FLUSH_MAX_ROWS of each (`writeUsage`: one statement and one commit
   * for both), handing the event loop back between statements. On PGlite a statement runs on this
   * thread: one statement per flush instead of two halves the answers in flight that a flush holds
   * up (bench/RESULTS.md: the c1 p99), and turns of the loop between statements keep it to one
   * statement's time each.
   */
  private async writeOnce(): Promise<void> {
    // The blocks retired before this flush began: their calls' settlements were queued before them
    // (`settle` queues a call's settlement, then tells its window), so this flush writes those first.
    const releases = this.blockReleases;
    this.blockReleases = [];
    this.writing.blockReleases = releases;
    try {
      if (!(await this.writeQueued())) {
        this.writing.blockReleases = []; // back on the queue: in one list at a time (see releaseBlocks)
        this.blockReleases.unshift(...releases);
        return;
      }
      await this.retryFailed();
      await this.releaseBlocks(releases);
    } finally {
      this.writing.blockReleases = [];
    }
  }

  /** The usage records and window settlements queued when the flush began; false when a statement failed (what it held is kept). */
  private async writeQueued(): Promise<boolean> {
    const max = this.settings.USAGE_FLUSH_MAX_ROWS;
    let statements = 0;
    // What is queued now; what calls add meanwhile waits for the next flush (so a busy process still ends its flush).
    for (let rows = this.buffer.length, settles = this.windowSettlements.length; (rows > 0 && this.buffer.length) || (settles > 0 && this.windowSettlements.length); ) {
      if (statements++) await setImmediatePromise();
      const usage = this.buffer.splice(0, Math.min(max, rows));
      const settlements = this.windowSettlements.splice(0, Math.min(max, settles));
      rows -= usage.length;
      settles -= settlements.length;
      this.writing.usage = usage;
      this.writing.windowSettlements = settlements;
      try {
        await billingCrud.writeUsage(this.db, usage, settlements);
        this.wroteRows(usage);
        this.wroteItems(settlements);
      } catch (error) {
        if (refusedForData(error)) {
          // One row the database refuses would fail its batch at every retry and hold up all that
          // came after it: the rows go one by one (what is refused is set aside, logged), the
          // settlements are retried one by one after this loop (retryFailed).
          this.log.error({ err: cause(error), rows: usage.length, settlements: settlements.length }, 'usage batch refused by the database; written one by one');
          // Off the in-flight list before they are kept: still there while the rows go one by one,
          // they were counted twice (unwrittenRows) and saved twice by a shutdown meanwhile.
          this.writing.windowSettlements = [];
          this.failedSettlements.push(...settlements);
          if (await this.writeRowsApart(usage)) continue;
          return false;
        }
        this.writing.usage = [];
        this.writing.windowSettlements = [];
        this.buffer.unshift(...usage);
        this.failedSettlements.push(...settlements);
        this.log.error({ err: cause(error), pending: this.buffer.length, settlements: settlements.length }, 'usage records not written; kept for a retry');
        this.retryLater();
        return false;
      } finally {
        this.writing.usage = [];
        this.writing.windowSettlements = [];
      }
    }
    return true;
  }

  /**
   * Usage rows one statement each; one the database refuses goes in stripped (`withRowStripped`),
   * and one refused stripped too is set aside (logged). False when the database failed otherwise
   * (the rest kept).
   */
  private async writeRowsApart(rows: string[]): Promise<boolean> {
    for (const [i, row] of rows.entries()) {
      try {
        await this.withRowStripped(row, (usage) => billingCrud.insertUsage(this.db, [usage]));
        this.wroteRows([row]);
      } catch (error) {
        if (refusedForData(error)) {
          this.log.error({ err: cause(error), usageRecord: billingCrud.usageRowId(row) }, 'usage record refused by the database, stripped too; set aside');
          this.wroteRows([row]);
          continue;
        }
        this.writing.usage = []; // `rows`: off the in-flight list before they are kept (see writeQueued)
        this.buffer.unshift(...rows.slice(i));
        this.log.error({ err: cause(error), pending: this.buffer.length }, 'usage records not written; kept for a retry');
        this.retryLater();
        return false;
      }
    }
    return true;
  }

  /**
   * `write` with a call's usage row, and, when the database refuses it for its data, once more with
   * the row stripped of what the provider reported (`usageRowStripped`; logged): a call that
   * happened stays in the usage summary, and its cost in its key's `spent` (a row with
   * `charge_key`, or the settlement that carries it), so the key's budget is held to it. For both
   * a row of its own (`writeRowsApart`) and one its settlement carries (`settleAgain`). What the
   * stripped row's write throws is the caller's: refused too, the row is set aside.
   */
  private async withRowStripped(row: string, write: (row: string) => Promise<unknown>): Promise<void> {
    try {
      await write(row);
    } catch (error) {
      if (!refusedForData(error)) throw error;
      this.log.error({ err: cause(error), usageRecord: billingCrud.usageRowId(row) }, 'usage record refused by the database; written again stripped to its id and cost');
      await write(billingCrud.usageRowStripped(row));
    }
  }

  /**
   * Settlements that failed before (or were taken back from saved files), in order, in statements
   * of USAGE_FLUSH_MAX_ROWS (`settleMany`, retried: one that had committed moves nothing again),
   * handing the event loop back between statements: thousands kept through an outage, all counted
   * toward USAGE_MAX_PENDING_ROWS, are written in as many statements as a flush of their size, not
   * one each (which kept calls refused, the database up, for as long as that took). A statement
   * refused for what it holds goes again one by one (`retryEach`); one the database cannot take
   * now keeps it and everything after it for the next flush.
   */
  private async retryFailed(): Promise<void> {
    const settlements = this.failedSettlements;
    this.failedSettlements = [];
    this.writing.settlements = settlements;
    this.retriedUpTo = 0;
    const keep = (from: number, error: unknown) => {
      // Off the in-flight list before they are kept (in one list at a time: see releaseBlocks).
      this.writing.settlements = [];
      this.retriedUpTo = 0;
      // Ahead of what failed meanwhile (settlePending's): queued before it.
      this.failedSettlements = settlements.slice(from).concat(this.failedSettlements);
      this.log.error({ err: cause(error), pending: this.failedSettlements.length }, 'credit settlements not written; kept for a retry');
      this.retryLater();
    };
    try {
      for (let at = 0; at < settlements.length; ) {
        if (at > 0) await setImmediatePromise();
        const batch = settlements.slice(at, at + this.settings.USAGE_FLUSH_MAX_ROWS);
        try {
          await billingCrud.settleMany(this.db, batch, true);
        } catch (error) {
          if (!refusedForData(error)) return keep(at, error);
          if (chargedAlready(error)) this.log.info({ settlements: batch.length }, 'credit settlements retried while a first attempt committed; charged once (written one by one)');
          const failed = await this.retryEach(batch);
          if (failed) {
            this.wroteItems(batch.slice(0, failed.index));
            return keep(at + failed.index, failed.error);
          }
        }
        this.wroteItems(batch);
        at += batch.length;
        this.retriedUpTo = at;
      }
    } finally {
      this.writing.settlements = [];
      this.retriedUpTo = 0;
    }
  }

  /**
   * Settlements one by one: one the database refuses for its data is set aside (logged with what
   * it would have charged: the call goes uncharged rather than every later one). Returns where
   * the database failed otherwise, if it did (that one and those after it are not written).
   */
  private async retryEach(settlements: billingCrud.Settlement[]): Promise<{ index: number; error: unknown } | undefined> {
    for (const [index, settlement] of settlements.entries()) {
      try {
        await this.settleAgain(settlement);
      } catch (error) {
        if (chargedAlready(error)) {
          this.log.info({ usageRecord: settlement.usageRecordId }, 'credit settlement retried after its first attempt committed; charged once');
          continue;
        }
        if (refusedForData(error)) {
          const { reservationId, userId, apiKeyId, cost, usageRecordId, description } = settlement;
          this.log.error({ err: cause(error), settlement: { reservationId, userId, apiKeyId, cost, usageRecordId, description } }, 'credit settlement refused by the database; set aside');
          continue;
        }
        return { index, error };
      }
    }
    return undefined;
  }

  /**
   * A failed settlement, again. One that writes its call's usage row goes with the row stripped
   * when the database refuses it for its data (`withRowStripped`: the row may be what it refuses):
   * the hold is still released and the key still charged, and the row's id still makes a retry of
   * that statement, after a lost reply, charge the key nothing again. A stripped row refused too
   * sets the settlement aside (`retryEach`): uncharged, never twice.
   */
  private async settleAgain(settlement: billingCrud.Settlement): Promise<void> {
    if (settlement.usage === undefined) return billingCrud.settle(this.db, settlement, true);
    await this.withRowStripped(settlement.usage, (usage) => billingCrud.settle(this.db, { ...settlement, usage }, true));
  }

  /**
   * Gives retired blocks back, all in one statement: each is its own reservation row, so
   * `settleMany` releases them as `settle` would one by one (at 64 clients a block of 32 worst
   * cases lasts ~32 calls: a statement per release was as many statements as blocks taken).
   * A block goes back only once every call it served has been charged: its release hands back what
   * its row still holds, which includes the part of a call whose settlement is still to be written,
   * and until that settlement the account would show credit already spent as available to other
   * calls (CI saw 32 of 50 calls pass against a balance covering 30). So a block with a settlement
   * still unwritten (failed, kept for a retry) waits for the flush that writes it.
   */
  private async releaseBlocks(releases: billingCrud.Settlement[]): Promise<void> {
    if (!releases.length) return;
    const unwritten = new Set<string | null>();
    for (const queue of [this.failedSettlements, this.windowSettlements]) for (const s of queue) if (typeof s.release === 'string') unwritten.add(s.reservationId);
    const ready = releases.filter((r) => !unwritten.has(r.reservationId));
    // What is put back goes off the flush's in-flight list first: a record in two of the meter's
    // lists is counted twice (unwrittenRows) and, if the process stops during the statement below,
    // saved twice (saveUnwritten), then released twice in one statement once taken back.
    this.writing.blockReleases = ready;
    if (ready.length < releases.length) {
      this.blockReleases.unshift(...releases.filter((r) => unwritten.has(r.reservationId)));
      this.retryLater();
    }
    if (!ready.length) return;
    try {
      await billingCrud.settleMany(this.db, ready);
      this.wroteItems(ready);
    } catch (error) {
      this.writing.blockReleases = [];
      this.failedSettlements.push(...ready);
      this.log.error({ err: cause(error), pending: this.failedSettlements.length }, 'credit settlements not written; kept for a retry');
      this.retryLater();
    }
  }

  /**
   * Writes what this process has charged so far: the calls that have ended, their usage rows and
   * ledger entries (and `userId`'s credit-window block, when no call is using it). Metering stays
   * off the answer's path, but not off what its client reads next: the balance, ledger and usage
   * summary read after a call, and a run's end (SPEC §5: the run's calls are charged when it is
   * seen ended), wait for this. What the database does not take stays for the next flush (logged there).
   */
  async written(userId?: string): Promise<void> {
    this.settleDeferred();
    const writing = (async () => {
      // Settlements of calls held per call are statements of their own (tracked).
      if (this.inFlight.size) await Promise.allSettled([...this.inFlight]);
      if (userId !== undefined) this.windows?.retireUnused(userId);
      if (this.flushing || this.hasPending()) await this.flushQueued();
    })();
    // Best effort, bounded: with the database slow or gone the read goes on (and answers for itself).
    await fulfilledWithin(WRITTEN_WAIT_MS, writing);
  }

  /**
   * Writes everything queued now: a flush, or, while one runs (it took what was queued when it
   * began), one more after it, shared by every caller meanwhile — not `flush()`'s "until nothing is
   * pending", which under load waits for other calls' rows again and again.
   */
  private flushQueued(): Promise<void> {
    if (!this.flushing) return this.flush();
    return (this.followingFlush ??= this.flushing.then(() => {
      this.followingFlush = null;
      // One begun meanwhile (the recovery of saved files starts one as a flush ends) took all that
      // was queued before it: that one, not a chain "until nothing is pending".
      return this.flushing ?? this.flush();
    }));
  }

  /** Resolves once every settlement started so far has run and the buffer has been written. */
  async idle(): Promise<void> {
    this.settleDeferred();
    while (this.inFlight.size) await Promise.allSettled([...this.inFlight]);
    // After the work in flight: a block taken ahead meanwhile goes back too.
    this.windows?.retireIdle(true);
    await this.flush();
  }

  private track(promise: Promise<unknown>): void {
    const tracked = promise.catch((error: unknown) => this.log.error({ err: cause(error) }, 'usage meter task failed'));
    this.inFlight.add(tracked);
    void tracked.finally(() => this.inFlight.delete(tracked));
  }

  /** Releases reservations whose process died before settling them. */
  async sweep(): Promise<number> {
    const released = await billingCrud.releaseExpired(this.db);
    if (released) this.log.warn({ released }, 'expired credit reservations released (a process ended mid-call)');
    return released;
  }

  /**
   * The app's close hook (after the HTTP requests, runs and jobs of the process have ended): from
   * now on calls are refused (503 — the process is going away; nothing is served that could go
   * unrecorded), and everything queued is written before this resolves: the calls settled meanwhile
   * too, whose settlement waits for the next check phase or is being written. A call still in
   * flight then (it reserved before) is written as it ends (see `schedule`).
   */
  async close(): Promise<void> {
    this.closing = true;
    clearInterval(this.sweepTimer);
    clearInterval(this.windowTimer);
    clearTimeout(this.flushTimer);
    this.flushTimer = undefined;
    for (let attempt = 1; ; ) {
      await this.idle();
      if (this.drained()) break;
      // Calls that ended meanwhile: once more. What the database did not take: wait a little, up to three times.
      if (!this.hasPending()) continue;
      if (attempt === 3) {
        this.saveUnwritten();
        break;
      }
      await new Promise((resolve) => setTimeout(resolve, 200 * attempt++));
    }
    this.closed = true;
    clearTimeout(this.flushTimer);
    this.flushTimer = undefined;
  }

  /**
   * At shutdown, what the database would not take (it is down): saved under DATA_DIR for the next
   * start (or a running process's sweep) to write (unwritten-usage.ts). The records and charges of
   * calls already answered are not lost with the process, and the credit its blocks held goes back
   * then, not at their expiry. Synchronous: the shutdown deadline calls it too.
   */
  saveUnwritten(): void {
    // With what statements in flight hold (the shutdown deadline calls this while one may hang on
    // the database): saved as well, since none may commit before the process exits; one that
    // does is written once all the same (every write in the files is idempotent).
    const writing = this.writing;
    const queues: UnwrittenUsage = {
      usage: writing.usage.concat(this.buffer),
      settlements: writing.settlements.slice(this.retriedUpTo).concat(this.failedSettlements, this.settlingBatch, this.settlements),
      windowSettlements: writing.windowSettlements.concat(this.windowSettlements),
      blockReleases: writing.blockReleases.concat(this.blockReleases),
    };
    const counts = { usageRecords: queues.usage.length, settlements: queues.settlements.length + queues.windowSettlements.length, blockReleases: queues.blockReleases.length };
    if (!counts.usageRecords && !counts.settlements && !counts.blockReleases) return;
    const dir = unwrittenDir(this.settings.DATA_DIR);
    try {
      const files = saveUnwritten(dir, queues);
      // Saved again with the rest: the files they were recovered from are done with.
      this.forgetRecovered();
      // Saved again: what a statement still in flight holds and puts back after a failure counts as a call's.
      this.fromFiles.clear();
      this.releases.clear();
      this.pairedRows.clear();
      this.buffer = [];
      this.failedSettlements = [];
      this.windowSettlements = [];
      this.blockReleases = [];
      this.settlements = [];
      this.lost = null;
      this.log.error({ ...counts, dir, files }, 'usage not written at shutdown (database unavailable); saved for the next start to write');
    } catch (error) {
      const code = (error as NodeJS.ErrnoException).code;
      const why = isDiskFullCode(code) ? `the disk holding it is full (${code})` : (code ?? (error as Error).message);
      this.lost =
        `${counts.usageRecords} usage records, ${counts.settlements} charges and ${counts.blockReleases} credit block releases are lost: ` +
        `the database would not take them and they could not be saved under ${dir}: ${why}`;
      this.log.error({ ...counts, err: error }, 'usage not written at shutdown, and could not be saved');
    }
  }

  /**
   * What the last shutdown save could not keep, in words (how many records, where, why); null when
   * nothing was lost. The process says it last and exits non-zero: records and charges of calls
   * already answered are gone, which a clean exit would hide.
   */
  lostAtShutdown(): string | null {
    return this.lost;
  }

  /**
   * Queues what processes saved (saveUnwritten) to be written; the files go once it is written
   * (the first flush begun after the take that writes all it took: `flush`) or saved again. Files
   * are taken while the unwritten records hold under half of USAGE_MAX_PENDING_ROWS, the rest after
   * a flush that writes brings them under again (or at the next sweep): a long outage's usage rows
   * never fill the queue to where calls are refused. A save's settlements and the block releases
   * after them are taken whole (`takeUnwritten`), past the room if need be: written in statements
   * of USAGE_FLUSH_MAX_ROWS (`retryFailed`), they are soon off it, and meanwhile they do not count
   * toward refusing calls (`callRecords`), only toward the room of the next take.
   */
  private recoverUnwritten(): void {
    // Held still, to a process of another pid namespace sharing DATA_DIR (it cannot check this one's pid).
    refreshTaken(this.recovered.map((recovered) => recovered.file));
    const room = Math.floor(this.settings.USAGE_MAX_PENDING_ROWS / 2) - this.unwrittenRows();
    this.unwrittenLeft = room <= 0;
    if (this.unwrittenLeft) return;
    const onUnreadable = (file: string, error: unknown) => this.log.error({ err: error, file }, 'usage left unwritten by an earlier process could not be read; set aside');
    const held = this.recovered.map((recovered) => recovered.file);
    const { taken, parts, more } = takeUnwritten(unwrittenDir(this.settings.DATA_DIR), held, room, onUnreadable);
    this.unwrittenLeft = more;
    if (!taken.length) return;
    const counts = { usageRecords: 0, settlements: 0, blockReleases: 0 };
    // A billed call saved with its usage row and its settlement apart is paired again (`pairedRows`)
    // when both are taken: counted apart, it counted twice toward refusing calls while writes fail.
    const rowsById = parts.some((part) => part.settlements.length || part.windowSettlements.length) ? new Map<string, string>() : undefined;
    if (rowsById) {
      // And with a row an earlier take queued, still unwritten: a save's settlements come after its
      // rows, so a file of rows split by the room has some calls' rows taken a take before their
      // settlements. Left apart, each of those calls counted twice while writes failed.
      const earlier = (rows: readonly string[]) => {
        for (const row of rows) if (!this.pairedRows.has(row)) rowsById.set(billingCrud.usageRowId(row), row);
      };
      earlier(this.writing.usage);
      earlier(this.buffer);
      for (const part of parts) for (const row of part.usage) rowsById.set(billingCrud.usageRowId(row), row);
    }
    for (const part of parts) {
      // Item by item: a spread of 100,000s of items passes the call stack's limit.
      for (const row of part.usage) this.buffer.push(row);
      this.takeBack(this.failedSettlements, part.settlements, rowsById);
      this.takeBack(this.windowSettlements, part.windowSettlements, rowsById);
      for (const release of part.blockReleases) {
        this.blockReleases.push(release);
        this.releases.add(release);
      }
      counts.usageRecords += part.usage.length;
      counts.settlements += part.settlements.length + part.windowSettlements.length;
      counts.blockReleases += part.blockReleases.length;
    }
    for (const file of taken) this.recovered.push({ file, takenAfter: this.flushesBegun });
    this.log.info({ files: taken.length, ...counts }, 'writing the usage earlier processes left unwritten');
    this.track(this.flush());
  }

  /**
   * Queues settlements read from saved files, item by item, as above: one whose call's
   * usage row was taken with it (`rowsById`) paired with it, as the call's settlement was before it
   * was saved (the row counts for both, toward refusing calls too); the others marked as taken
   * from files (`fromFiles`).
   */
  private takeBack(queue: billingCrud.Settlement[], items: readonly PairedSettlement[], rowsById?: ReadonlyMap<string, string>): void {
    for (const item of items) {
      queue.push(item);
      const row = item.usage === undefined ? rowsById?.get(item.usageRecordId) : undefined;
      if (row !== undefined) {
        item[PAIRED_ROW] = row;
        this.pairedRows.add(row);
        continue;
      }
      this.fromFiles.add(item);
    }
  }

  /**
   * Deletes the files recovered from once what they held is written or saved again: those taken
   * before flush number `takenBefore` began, or all of them.
   */
  private forgetRecovered(takenBefore = Infinity): void {
    const done = this.recovered.filter((recovered) => recovered.takenAfter < takenBefore);
    if (!done.length) return;
    this.recovered = this.recovered.filter((recovered) => recovered.takenAfter >= takenBefore);
    forgetUnwritten(done.map((recovered) => recovered.file));
  }

  /** Nothing queued, waiting for the next check phase, or being written. */
  private drained(): boolean {
    return !this.hasPending() && !this.deferred.length && !this.settlements.length && !this.inFlight.size;
  }
}
