import type { FastifyRequest } from 'fastify';
import { describe, expect, it } from 'vitest';

import { byAccount, byIp } from '../../src/utils/rate-limit.js';

const from = (ip: string) => ({ ip }) as FastifyRequest;

describe('rate-limit keys', () => {
  it('counts IPv4 clients per address', () => {
    expect(byIp(from('203.0.113.7'))).toBe('203.0.113.7');
    expect(byIp(from('203.0.113.7'))).not.toBe(byIp(from('203.0.113.8')));
  });

  it('counts IPv6 clients per /64, however the address is written', () => {
    const key = byIp(from('2001:db8:1:2::1'));
    expect(key).toBe('2001:0db8:0001:0002::/64');
    expect(byIp(from('2001:db8:1:2:ffff:ffff:ffff:ffff'))).toBe(key);
    expect(byIp(from('2001:0db8:0001:0002:0:0:0:9'))).toBe(key);
    expect(byIp(from('2001:db8:1:3::1'))).not.toBe(key);
    expect(byIp(from('::1'))).toBe('0000:0000:0000:0000::/64');
    // IPv4 mapped into IPv6 stays per address.
    expect(byIp(from('::ffff:203.0.113.7'))).toBe('::ffff:203.0.113.7');
  });

  it('counts accounts by their normalised email, as the lookup does', () => {
    expect(byAccount('  Ada@Example.COM ')).toBe('ada@example.com');
  });
});
