/**
 * Credit windows: holds served from memory instead of one database statement per call.
 *
 * A process takes a block of a user's credit with the same conditional UPDATE a call's hold uses
 * (a reservation row of `BILLING_CREDIT_WINDOW_CALLS` × the call's worst case — more for a busy
 * user: twice their calls in flight in this process, or a second's worth at the pace their last
 * block was used, up to 16 × the setting (see `blockCallsFor`); refused unless `balance - reserved`
 * covers all of it, and then the usual size is tried), then serves that user's holds from the
 * block in memory.
 * A call's settlement releases what it used from the block's row together with the charge (see
 * `Settlement.release`), so at every moment `reserved` = what blocks and per-call holds still
 * hold, and the balance still moves only with its ledger entry. When the block cannot serve a hold
 * it is retired and a new one taken; a retired block whose calls have all settled is released
 * (its row deleted, what is left of it back to `available`) once their settlements are written:
 * released before one of them, the account would show that call's spent credit as available.
 * Blocks retire when idle, after half the reservation TTL at most, and at shutdown.
 *
 * The next block is taken ahead, off the calls' path: when a block has less than a quarter of it
 * left (or three quarters of its time are gone) the hold that notices starts taking the next one
 * in the background, so a steady stream of calls never waits for a block (a call that did was ~1 %
 * of sequential calls: the gateway's p99, bench/RESULTS.md). Taking it retires the old block, whose
 * rest goes back once its calls have settled. When the account cannot cover the next block the
 * old one serves on until it is empty, then calls hold per call as before.
 *
 * Why this never overdraws: a block is taken only when the account covers it (twice over: see
 * `hold`, so other processes are never starved by an idle block), and the block serves
 * at most its own amount. Across processes each takes its own blocks from the same row. A block's
 * hold commits only once it is on disk (per-call holds commit asynchronously): a database crash
 * cannot take back a block its process goes on serving calls from. A process that dies leaves its
 * block's row, which expires and is released by the sweep like a call's hold.
 * When a block cannot be taken (the balance is low), the caller holds per call as before, so a
 * nearly empty account behaves exactly as without windows.
 */
import { randomUUID } from 'node:crypto';
import { setImmediate as setImmediatePromise } from 'node:timers/promises';

import { CREDIT_BLOCK_MAX_AGE_MS } from '../core/config.js';

import type * as billingCrud from '../crud/billing.js';
import { costUnits, unitsCost } from '../modules/ai-models/index.js';

export interface CreditBlock {
  readonly id: string;
  readonly userId: string;
  /** What the block held when taken, in 10^-12 credits. */
  readonly size: bigint;
  /** Not yet handed to a call, in 10^-12 credits (`costUnits`: integer arithmetic per call, no Decimals). */
  available: bigint;
  /** The next block was asked for (taken ahead: see `tryHold`), whatever came of it. */
  renewing: boolean;
  /** Calls holding from this block that have not settled. */
  outstanding: number;
  /** Calls held from this block so far. */
  served: number;
  retired: boolean;
  readonly takenAt: number;
  lastUsedAt: number;
}

export interface CreditWindowOptions {
  /** Block size, in calls of the size of the one that takes it. */
  blockCalls: number;
  ttlSeconds: number;
  /** A block with no call for this long is released. */
  idleMs: number;
  /** A block whose calls have all settled after it retired: release its row (queued behind their settlements). */
  onRetired: (block: CreditBlock) => void;
  /** Work started off the calls' path (taking the next block ahead): the owner tracks it, logs its failure and waits for it at shutdown. */
  background: (work: Promise<unknown>) => void;
  /**
   * A block's hold statement (the meter's `holdOnce`: one whose statement failed, which may have
   * committed all the same, has its row released with the next flush).
   */
  hold: (held: billingCrud.Hold) => Promise<billingCrud.HoldOutcome>;
}

/** The most a busy user's block grows to, in blocks of `blockCalls` (see `blockCallsFor`). */
const MAX_BLOCK_GROWTH = 16;
/** A block used up faster than this makes the next one as large as that pace needs for this long. */
const BLOCK_MIN_LIFE_MS = 1_000;

export class CreditWindows {
  private readonly current = new Map<string, CreditBlock>();
  private readonly taking = new Map<string, Promise<boolean>>();
  /**
   * Calls held from a block (current or retired) that have not settled, by user. An entry stays, at
   * 0, once the user's last call has settled (retireIdle drops it): deleted then, the Map re-made
   * its table at every call of a user calling one at a time (~150 bytes a call).
   */
  private readonly inFlight = new Map<string, number>();
  /** The user's latest block, current or retired by its successor (not when retired idle): its pace sizes the next. */
  private readonly latest = new Map<string, CreditBlock>();
  private readonly maxAgeMs: number;

  constructor(private readonly options: CreditWindowOptions) {
    // A block's row expires after the TTL: it must retire well before, and its calls end before the TTL too.
    this.maxAgeMs = Math.min((options.ttlSeconds * 1000) / 2, CREDIT_BLOCK_MAX_AGE_MS);
  }

  /** Holds `units` (see `costUnits`) from the user's block in memory; undefined when the block cannot (take one, or hold per call). */
  tryHold(userId: string, units: bigint): CreditBlock | undefined {
    const block = this.current.get(userId);
    if (!block) return undefined;
    const now = Date.now();
    if (now - block.takenAt > this.maxAgeMs || block.available < units) {
      this.retire(block);
      return undefined;
    }
    block.available -= units;
    block.outstanding += 1;
    block.served += 1;
    this.inFlight.set(userId, (this.inFlight.get(userId) ?? 0) + 1);
    block.lastUsedAt = now;
    if (!block.renewing && (block.available < block.size / BigInt(4) || now - block.takenAt > (this.maxAgeMs * 3) / 4)) {
      block.renewing = true;
      // After this turn of the event loop (the answer's): on PGlite the statement runs on this thread.
      const amount = unitsCost(units);
      this.options.background(setImmediatePromise().then(() => this.refill(userId, amount)));
    }
    return block;
  }

  /**
   * Takes a new block for the user sized for calls like this one; false when the account cannot
   * cover a whole block. Calls arriving while a block is being taken wait for that one.
   */
  refill(userId: string, amount: string): Promise<boolean> {
    let taking = this.taking.get(userId);
    if (!taking) {
      taking = this.take(userId, amount).finally(() => this.taking.delete(userId));
      this.taking.set(userId, taking);
    }
    return taking;
  }

  private async take(userId: string, amount: string): Promise<boolean> {
    const unit = costUnits(amount);
    const calls = this.blockCallsFor(userId);
    let size = unit * BigInt(calls);
    let id = randomUUID();
    let outcome = await this.hold(userId, id, size);
    // A block grown for a busy user that the account cannot cover: the usual size may still fit.
    if (outcome !== 'held' && calls > this.options.blockCalls) {
      size = unit * BigInt(this.options.blockCalls);
      id = randomUUID();
      outcome = await this.hold(userId, id, size);
    }
    if (outcome !== 'held') return false;
    const previous = this.current.get(userId);
    if (previous) this.retire(previous);
    const now = Date.now();
    const block: CreditBlock = { id, userId, size, available: size, renewing: false, outstanding: 0, served: 0, retired: false, takenAt: now, lastUsedAt: now };
    this.current.set(userId, block);
    this.latest.set(userId, block);
    return true;
  }

  /**
   * Holds a block only while the account has twice its size free: a block takes at most half of
   * what is free, so another process (whose calls cannot be served from this one's block) always
   * finds as much again for its own calls. Taking all of it, a block left another node's calls
   * refused with the credit unused until the block went idle (2–3 s).
   */
  private hold(userId: string, id: string, size: bigint) {
    // Durable before the block serves a call (see billingCrud.hold's DURABLE_COMMIT).
    const hold = { id, userId, apiKeyId: null, accountAmount: unitsCost(size), accountCover: unitsCost(size * BigInt(2)), keyAmount: null, ttlSeconds: this.options.ttlSeconds, durable: true };
    return this.options.hold(hold);
  }

  /**
   * Calls' worst cases in the user's next block: `blockCalls`; or twice the user's calls in flight;
   * or, when the latest block was used up within BLOCK_MIN_LIFE_MS, as many calls as its pace makes
   * in that time — whichever is most, at most MAX_BLOCK_GROWTH × `blockCalls`. A block smaller
   * than the calls in flight cannot hold them all: at 64 clients a block of 32 served ~32 calls, so
   * every ~32nd call waited for the next block's statement and every block cost a release statement
   * too. A block that lasts ~50 ms (one client at ~1,000 calls/s) costs those two statements every
   * ~50 calls, and embedded each one holds up the call that comes next (the 1-client p99).
   */
  private blockCallsFor(userId: string): number {
    const base = this.options.blockCalls;
    let calls = Math.max(base, 2 * (this.inFlight.get(userId) ?? 0));
    const latest = this.latest.get(userId);
    const age = latest ? Date.now() - latest.takenAt : Infinity;
    if (latest && age < BLOCK_MIN_LIFE_MS) calls = Math.max(calls, Math.ceil((latest.served * BLOCK_MIN_LIFE_MS) / Math.max(age, 1)));
    return Math.min(calls, base * MAX_BLOCK_GROWTH);
  }

  /**
   * A call held from `block` ended having used `used` of its `held` amount (used ≤ held: the
   * settlement releases `used` from the block's row); the rest goes back to the block.
   */
  settled(block: CreditBlock, held: bigint, used: bigint): void {
    block.outstanding -= 1;
    const calls = (this.inFlight.get(block.userId) ?? 0) - 1;
    this.inFlight.set(block.userId, calls > 0 ? calls : 0);
    if (!block.retired) block.available += held - used;
    else if (block.outstanding === 0) this.options.onRetired(block);
  }

  /** Retires blocks nobody used for `idleMs` (every block: `all`), releasing those without calls in flight. */
  retireIdle(all = false): void {
    const cutoff = Date.now() - this.options.idleMs;
    for (const block of this.current.values()) if (all || block.lastUsedAt < cutoff) this.retire(block);
    // An idle user's next block starts from the usual size again (and the map keeps only active users).
    for (const [userId, block] of this.latest) if (block.retired && (all || block.lastUsedAt < cutoff)) this.latest.delete(userId);
    for (const [userId, calls] of this.inFlight) if (calls === 0) this.inFlight.delete(userId);
  }

  /** The user has had a block lately (current, or retired and perhaps not yet given back). */
  hadBlock(userId: string): boolean {
    return this.current.has(userId) || this.latest.has(userId);
  }

  /** Retires the user's block if no call is using it: what it held goes back to the account now, not once it has been idle for `idleMs`. */
  retireUnused(userId: string): void {
    const block = this.current.get(userId);
    if (block && block.outstanding === 0) this.retire(block);
  }

  private retire(block: CreditBlock): void {
    if (block.retired) return;
    block.retired = true;
    if (this.current.get(block.userId) === block) this.current.delete(block.userId);
    if (block.outstanding === 0) this.options.onRetired(block);
  }
}
