import type { FastifyRequest } from 'fastify';
import { describe, expect, it } from 'vitest';

import { byAccount, byIp, MemoryCounters } from '../../src/utils/rate-limit.js';

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
    // No email (a body that will fail validation): nothing to count per account.
    expect(byAccount(null)).toBeNull();
  });
});

describe('in-memory counters', () => {
  it('count within a window, take hits back, and start over once it has passed', async () => {
    const counters = new MemoryCounters();
    expect((await counters.hit('a', 60_000)).count).toBe(1);
    const second = await counters.hit('a', 60_000);
    expect(second.count).toBe(2);
    expect(second.ttlMs).toBeGreaterThan(59_000);
    await counters.refund('a');
    expect((await counters.hit('a', 60_000)).count).toBe(2);
    expect((await counters.hit('b', 1)).count).toBe(1);
    await new Promise((resolve) => setTimeout(resolve, 5));
    expect((await counters.hit('b', 1)).count).toBe(1);
  });

  it('never go below zero', async () => {
    const counters = new MemoryCounters();
    await counters.refund('none');
    await counters.hit('c', 60_000);
    await counters.refund('c');
    await counters.refund('c');
    expect((await counters.hit('c', 60_000)).count).toBe(1);
  });

  it('make room by dropping expired counters first, then the oldest', async () => {
    const counters = new MemoryCounters(3);
    await counters.hit('expired', 1);
    await counters.hit('old', 60_000);
    await counters.hit('kept', 60_000);
    await new Promise((resolve) => setTimeout(resolve, 5));
    await counters.hit('new', 60_000); // full: the expired one goes
    expect((await counters.hit('old', 60_000)).count).toBe(2);
    await counters.hit('newer', 60_000); // full, none expired: the oldest ('old') goes
    expect((await counters.hit('kept', 60_000)).count).toBe(2);
    expect((await counters.hit('old', 60_000)).count).toBe(1);
  });
});
