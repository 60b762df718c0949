/**
 * Review: JobSealer (provider secrets at rest, job payloads in Redis) opened a payload whose
 * AES-GCM tag was cut to 4 bytes: Node checks only as many tag bytes as it is given unless the
 * decipher is made with `authTagLength`. A forger then needs 2^32 tries, not 2^128.
 */
import { expect, it } from 'vitest';

import { JobSealer } from '../../src/core/job-crypto.js';

it('a sealed payload whose tag was shortened is refused', () => {
  const sealer = new JobSealer('x'.repeat(40), 'keel:provider-secrets');
  const sealed = sealer.seal('provider:p:api_key', 'sk-secret');
  const [version, iv, data, tag] = sealed.split('.');
  for (const bytes of [4, 8, 12, 15]) {
    const cut = [version, iv, data, Buffer.from(tag!, 'base64url').subarray(0, bytes).toString('base64url')].join('.');
    expect(() => sealer.open('provider:p:api_key', cut), `${bytes}-byte tag`).toThrow();
  }
  expect(sealer.open('provider:p:api_key', sealed)).toBe('sk-secret');
});
