import { describe, expect, it } from 'vitest';

import { JobSealer } from '../../src/core/job-crypto.js';

const sealer = new JobSealer('k'.repeat(40));
const data = { to: 'ada@example.com', text: 'https://app/reset-password?token=abc' };

describe('job data sealing', () => {
  it('round-trips, and shows nothing of the data', () => {
    const sealed = sealer.seal('send-email', data);
    // Whole strings, not a fragment: three random base64url letters spell 'ada' about once in 3,000 seals.
    for (const plain of [data.to, 'reset-password', Buffer.from(JSON.stringify(data)).toString('base64url').slice(0, 12)]) {
      expect(sealed).not.toContain(plain);
    }
    expect(Buffer.from(sealed.split('.')[2]!, 'base64url').toString('latin1')).not.toContain('ada@example.com');
    expect(sealer.open('send-email', sealed)).toEqual(data);
    // A fresh IV each time.
    expect(sealer.seal('send-email', data)).not.toBe(sealed);
  });

  it('refuses data altered, moved to another job, or sealed under another SECRET_KEY', () => {
    const sealed = sealer.seal('send-email', data);
    const [v, iv, body, tag] = sealed.split('.') as [string, string, string, string];
    const flipped = Buffer.from(body, 'base64url');
    flipped[0]! ^= 1;
    expect(() => sealer.open('send-email', [v, iv, flipped.toString('base64url'), tag].join('.'))).toThrow();
    expect(() => sealer.open('other-job', sealed)).toThrow();
    expect(() => new JobSealer('o'.repeat(40)).open('send-email', sealed)).toThrow();
    expect(() => sealer.open('send-email', '{"to":"ada@example.com"}')).toThrow(/not a sealed/);
  });

  it('derives a separate key per purpose: provider secrets do not open as job data, nor the reverse', () => {
    const providers = new JobSealer('k'.repeat(40), 'keel:provider-secrets');
    const sealed = providers.seal('provider:1:api_key', 'sk-secret');
    expect(providers.open('provider:1:api_key', sealed)).toBe('sk-secret');
    expect(() => sealer.open('provider:1:api_key', sealed)).toThrow();
    expect(() => providers.open('send-email', sealer.seal('send-email', data))).toThrow();
  });

  it('refuses a payload whose GCM tag was cut short (Node checks only the tag bytes it is given unless told its length)', () => {
    const secrets = new JobSealer('x'.repeat(40), 'keel:provider-secrets');
    const sealed = secrets.seal('provider:p:api_key', 'sk-secret');
    const [version, iv, body, tag] = sealed.split('.');
    for (const bytes of [4, 8, 12, 15]) {
      const cut = [version, iv, body, Buffer.from(tag!, 'base64url').subarray(0, bytes).toString('base64url')].join('.');
      expect(() => secrets.open('provider:p:api_key', cut), `${bytes}-byte tag`).toThrow();
    }
    expect(secrets.open('provider:p:api_key', sealed)).toBe('sk-secret');
  });
});
