import { mkdirSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { afterEach, describe, expect, it } from 'vitest';

import type { Settlement } from '../../src/crud/billing.js';
import { takeUnwritten } from '../../src/services/unwritten-usage.js';

const settlement = (fields: Partial<Settlement>): Settlement => ({
  reservationId: 'a-block',
  userId: 'a-user',
  apiKeyId: null,
  projectId: null,
  cost: '1',
  chargeAccount: true,
  chargeKey: false,
  usageRecordId: 'a-call',
  description: 'chat fake',
  ...fields,
});

let dir = '';
afterEach(() => {
  if (dir) rmSync(dir, { recursive: true, force: true });
});

describe('takeUnwritten', () => {
  it("a take whose restore of a dead taker's file fails takes none of that save's files: the settlements and the release after them go together, later", () => {
    dir = mkdtempSync(join(tmpdir(), 'keel-unwritten-'));
    const save = `1700000000000-4242-${'a'.repeat(8)}-aaaa-aaaa-aaaa-${'a'.repeat(12)}`;
    // A process gone (killed -9) after it took the save's settlements' file, before its release's.
    const gone = 999_999;
    writeFileSync(join(dir, `${save}-000000.json.${gone}.taken`), JSON.stringify({ usage: [], settlements: [], windowSettlements: [settlement({ release: '1' })], blockReleases: [] }));
    writeFileSync(join(dir, `${save}-000001.json`), JSON.stringify({ usage: [], settlements: [], windowSettlements: [], blockReleases: [settlement({ cost: '0', usageRecordId: 'its-release' })] }));

    // The restore fails. In life another process, having listed the directory too, restored the
    // file first (this one's rename then finds it gone) and takes the save's files after it: this
    // take, by taking the release, wrote it before those settlements. Here a directory under the
    // restore's name makes the rename fail the same way, deterministically.
    const restored = join(dir, `${save}-000000-r${gone}.json`);
    mkdirSync(restored);
    writeFileSync(join(restored, 'in-the-way'), '');
    const failed = takeUnwritten(dir, [], 1_000, () => {});
    expect(failed.parts).toEqual([]);
    expect(readdirSync(dir)).toContain(`${save}-000001.json`);

    // Once the restore can be made: settlements and release in one take.
    rmSync(restored, { recursive: true });
    const taken = takeUnwritten(dir, [], 1_000, () => {});
    expect(taken.parts.map((part) => [part.windowSettlements.length, part.blockReleases.length])).toEqual([
      [1, 0],
      [0, 1],
    ]);
    expect(readdirSync(dir).filter((name) => name.endsWith('.json'))).toEqual([]);
  });
});
