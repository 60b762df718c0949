import { createHmac } from 'node:crypto';
import { isIPv6 } from 'node:net';

import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import type { Redis } from 'ioredis';

import { noteRefusal } from '../core/access-log.js';
import type { Settings } from '../core/config.js';
import { RateLimiterUnavailableError, TooManyRequestsError } from '../core/errors.js';
import { type Logger, RepeatedLine } from '../core/logger.js';

// ==================== Counters ====================

/** A counter's value after a hit, and the time left in its window. */
export interface Count {
  count: number;
  ttlMs: number;
}

/** Fixed-window counters: in Redis when configured (shared by every node), else in memory. */
export interface CounterStore {
  /** Adds one to `key`; its window of `windowMs` starts with its first hit. */
  hit(key: string, windowMs: number): Promise<Count>;
  /** Takes one back: the hit turned out not to count (a successful login). */
  refund(key: string): Promise<void>;
  /** Reads `key` without counting (count 0 when its window has ended or never began). */
  peek(key: string): Promise<Count>;
}

// One round trip each; the key gets its expiry in the same step as its first increment.
const HIT_SCRIPT = `local c = redis.call('INCR', KEYS[1])
local t = redis.call('PTTL', KEYS[1])
if t < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[1]); t = tonumber(ARGV[1]) end
return {c, t}`;
const REFUND_SCRIPT = `local c = tonumber(redis.call('GET', KEYS[1]) or '0')
if c > 0 then return redis.call('DECR', KEYS[1]) end
return 0`;
const PEEK_SCRIPT = `return {tonumber(redis.call('GET', KEYS[1]) or '0'), redis.call('PTTL', KEYS[1])}`;

class RedisCounters implements CounterStore {
  constructor(private readonly redis: Redis) {}

  async hit(key: string, windowMs: number): Promise<Count> {
    const [count, ttlMs] = (await this.redis.eval(HIT_SCRIPT, 1, key, windowMs)) as [number, number];
    return { count, ttlMs };
  }

  async refund(key: string): Promise<void> {
    await this.redis.eval(REFUND_SCRIPT, 1, key);
  }

  async peek(key: string): Promise<Count> {
    const [count, ttlMs] = (await this.redis.eval(PEEK_SCRIPT, 1, key)) as [number, number];
    return { count, ttlMs: Math.max(ttlMs, 0) };
  }
}

export class MemoryCounters implements CounterStore {
  private readonly counters = new Map<string, { count: number; resetAt: number }>();

  /** `capacity`: large enough that a flood of made-up keys cannot push a real one out within its window. */
  constructor(private readonly capacity = 100_000) {}

  async hit(key: string, windowMs: number): Promise<Count> {
    const now = Date.now();
    let counter = this.counters.get(key);
    if (!counter || counter.resetAt <= now) {
      this.counters.delete(key);
      if (this.counters.size >= this.capacity) this.evict(now);
      counter = { count: 0, resetAt: now + windowMs };
      this.counters.set(key, counter);
    }
    counter.count += 1;
    return { count: counter.count, ttlMs: counter.resetAt - now };
  }

  async refund(key: string): Promise<void> {
    const counter = this.counters.get(key);
    if (counter && counter.count > 0) counter.count -= 1;
  }

  async peek(key: string): Promise<Count> {
    const now = Date.now();
    const counter = this.counters.get(key);
    return counter && counter.resetAt > now ? { count: counter.count, ttlMs: counter.resetAt - now } : { count: 0, ttlMs: 0 };
  }

  /** Drops expired counters, or the oldest one when none has expired (Map keeps insertion order). */
  private evict(now: number): void {
    for (const [key, counter] of this.counters) if (counter.resetAt <= now) this.counters.delete(key);
    if (this.counters.size >= this.capacity) {
      const oldest = this.counters.keys().next();
      if (!oldest.done) this.counters.delete(oldest.value);
    }
  }
}

/** The counters every limit of this process shares the kind of: Redis when configured, else memory. */
export function counterStore(redis: Redis | null): CounterStore {
  return redis ? new RedisCounters(redis) : new MemoryCounters();
}

// ==================== Limiter ====================

interface Limiter {
  store: CounterStore;
  windowMs: number;
  /** The stored key: the limit's name and a keyed digest of what it counts, never an email or address in clear. */
  key(name: string, subject: string): string;
}

const limiters = new WeakMap<Settings, Limiter>();

function limiterOf(app: FastifyInstance): Limiter {
  const { settings, redis } = app;
  let limiter = limiters.get(settings);
  if (!limiter) {
    const secret = createHmac('sha256', 'keel:rate-limit').update(settings.SECRET_KEY).digest();
    const prefix = redis ? `${settings.REDIS_KEY_PREFIX}rate-limit:` : '';
    limiter = {
      store: counterStore(redis),
      windowMs: settings.RATE_LIMIT_WINDOW_SECONDS * 1000,
      key: (name, subject) => `${prefix}${name}:${createHmac('sha256', secret).update(subject).digest('base64url').slice(0, 22)}`,
    };
    limiters.set(settings, limiter);
  }
  return limiter;
}

/** Hits that are taken back when the request succeeds (see refundOnSuccess), each with the one failure that keeps it, if only one does. */
const refundable = new WeakMap<FastifyRequest, { key: string; keptBy: number | undefined }[]>();

/** Written once per window while the counters are down (per process: the request limits and the keys' rpm alike). */
const limiterUnavailable = new RepeatedLine();

/** The counters could not be reached: said in the log (once a window) and answered 503 with a short Retry-After, never failing open. */
export function countersUnavailable(log: Logger, error: unknown, fields: Record<string, unknown>): RateLimiterUnavailableError {
  const line = limiterUnavailable.take();
  if (line) log.error({ err: error, ...fields, ...line }, 'rate limiter unavailable');
  return new RateLimiterUnavailableError();
}

/** Counts one hit on `name:subject`; throws 429 beyond `max`, 503 when the counters cannot be reached. */
async function count(request: FastifyRequest, name: string, subject: string, options: RateLimitOptions): Promise<Count> {
  const limiter = limiterOf(request.server);
  const key = limiter.key(name, subject);
  try {
    const counted = await limiter.store.hit(key, limiter.windowMs);
    if (options.failuresOnly) refundable.set(request, [...(refundable.get(request) ?? []), { key, keptBy: options.failureStatus }]);
    return counted;
  } catch (error) {
    // Failing open would switch brute-force protection off whenever Redis is down.
    throw countersUnavailable(request.log, error, { limiter: name });
  }
}

/** 429, and the limit's name in the access log line (never the email or address it counted). */
function refuse(request: FastifyRequest, name: string, max: number, counted: Count): never {
  noteRefusal(request, `rate limit ${name}: ${max} per ${request.server.settings.RATE_LIMIT_WINDOW_SECONDS}s`);
  throw new TooManyRequestsError(counted.ttlMs / 1000);
}

export type LimitHook = (request: FastifyRequest, reply: FastifyReply) => Promise<void>;

export interface RateLimitOptions {
  /** Count only requests that fail: a 2xx/3xx answer takes its hit back (needs `refundOnSuccess` as onSend). */
  failuresOnly?: boolean;
  /**
   * With `failuresOnly`: the one failure that keeps its hit (a wrong password's 400); any other
   * answer takes it back too (a 422 before the check, a 409 after a right password).
   */
  failureStatus?: number;
}

/**
 * A hook that allows `max` requests per window for each key `keyOf` gives (per address, per
 * account...); `keyOf` answering null counts nothing. Use it as `onRequest` when the key needs no
 * body (per address: then requests that fail validation or parsing count too), or as
 * `preValidation` when it does (the body is parsed there but not yet validated: read it with `bodyField`).
 */
export function rateLimit(
  app: FastifyInstance,
  name: string,
  max: number,
  keyOf: (request: FastifyRequest) => string | null,
  options: RateLimitOptions = {},
): LimitHook {
  limiterOf(app);
  return async (request) => {
    const subject = keyOf(request);
    if (subject === null) return;
    const counted = await count(request, name, subject, options);
    if (counted.count > max) refuse(request, name, max, counted);
  };
}

/** onSend hook of routes with `failuresOnly` limits: a successful answer (or a failure other than `failureStatus`) takes the request's hits back. */
export async function refundOnSuccess(request: FastifyRequest, reply: FastifyReply, payload: unknown): Promise<unknown> {
  const hits = refundable.get(request);
  const status = reply.statusCode;
  const refunded = hits?.filter(({ keptBy }) => status < 400 || (keptBy !== undefined && status !== keptBy));
  if (refunded?.length) {
    refundable.delete(request);
    const { store } = limiterOf(request.server);
    await Promise.all(refunded.map(({ key }) => store.refund(key))).catch((error: unknown) =>
      request.log.error({ err: error }, 'rate limiter refund failed'),
    );
  }
  return payload;
}

// ==================== Login lockout ====================

/**
 * preValidation hook of the login: failures are counted per (account, address), so that nobody can
 * lock an owner out from elsewhere. Across all addresses, an account past `ceiling` failures in the
 * window no longer gives addresses that have already failed on it their full allowance: each gets
 * no further try, while an address that has not failed (the owner's) still gets in. A distributed
 * guesser thus gets about `ceiling` + one try per fresh address, instead of `perAddress` per address.
 */
export function loginLockout(app: FastifyInstance, perAddress: number, ceiling: number): LimitHook {
  limiterOf(app);
  return async (request) => {
    const account = byAccount(bodyField(request, 'username'));
    if (account === null) return; // validation answers 422; the per-address limit has counted it
    const pair = await count(request, 'login-account-address', `${account}\n${byIp(request)}`, { failuresOnly: true });
    if (pair.count > perAddress) refuse(request, 'login-account-address', perAddress, pair);
    const total = await count(request, 'login-account', account, { failuresOnly: true });
    if (total.count > ceiling && pair.count > 1) refuse(request, 'login-account', ceiling, total);
  };
}

// ==================== Keys ====================

/** A top-level field of a parsed (not yet validated) body, when it is a string. */
export function bodyField(request: FastifyRequest, field: string): string | null {
  const body = request.body;
  if (typeof body !== 'object' || body === null) return null;
  const value = (body as Record<string, unknown>)[field];
  return typeof value === 'string' ? value : null;
}

/** Per account: the email as lookups normalise it (crud/user.ts getByEmail); null for no email. */
export function byAccount(email: string | null): string | null {
  return email === null ? null : email.trim().toLowerCase();
}

/** Per client address; IPv6 per /64, since one client usually holds a whole /64. */
export function byIp(request: FastifyRequest): string {
  const ip = request.ip;
  if (!isIPv6(ip) || ip.startsWith('::ffff:')) return ip;
  const [head = '', tail = ''] = ip.split('::');
  const left = head ? head.split(':') : [];
  const right = tail ? tail.split(':') : [];
  const groups = ip.includes('::') ? [...left, ...Array<string>(8 - left.length - right.length).fill('0'), ...right] : left;
  return `${groups.slice(0, 4).map((g) => g.padStart(4, '0')).join(':')}::/64`;
}
