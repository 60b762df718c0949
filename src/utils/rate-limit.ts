import { isIPv6 } from 'node:net';

import type { FastifyInstance, FastifyRequest, preHandlerAsyncHookHandler } from 'fastify';

import { noteRefusal } from '../core/access-log.js';
import { ServiceUnavailableError, TooManyRequestsError } from '../core/errors.js';

/**
 * A preHandler that allows `max` requests per window for each key `keyOf` gives (per IP, per
 * account...). Counters live in Redis when it is configured, so every node shares them.
 */
export function rateLimit(
  app: FastifyInstance,
  name: string,
  max: number,
  keyOf: (request: FastifyRequest) => string,
): preHandlerAsyncHookHandler {
  const check = app.createRateLimit({
    max,
    timeWindow: app.settings.RATE_LIMIT_WINDOW_SECONDS * 1000,
    keyGenerator: (request) => `${name}:${keyOf(request)}`,
  });
  return async (request) => {
    let result;
    try {
      result = await check(request);
    } catch (error) {
      // Failing open would switch brute-force protection off whenever Redis is down.
      request.log.error({ err: error, limiter: name }, 'rate limiter unavailable');
      throw new ServiceUnavailableError('Rate limiter unavailable, try again later');
    }
    if (!result.isAllowed && result.isExceeded) {
      noteRefusal(request, `rate limit ${name}: ${max} per ${app.settings.RATE_LIMIT_WINDOW_SECONDS}s`);
      throw new TooManyRequestsError(result.ttlInSeconds);
    }
  };
}

/** Per account: the email as lookups normalise it (crud/user.ts getByEmail). */
export const byAccount = (email: string) => email.trim().toLowerCase();

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
