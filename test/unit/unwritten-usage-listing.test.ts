import { mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { afterEach, describe, expect, it } from 'vitest';

import type { Settlement } from '../../src/crud/billing.js';
import { saveUnwritten, takeUnwritten } from '../../src/services/unwritten-usage.js';

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

describe('takeUnwritten, listing while a save ends', () => {
  it.each([
    ['its last (the release)', 2],
    ['its first (the usage rows)', 0],
  ])("takes a save's files a listing made during the save missed, %s (its mark gone once the take looks), in the order saved: the block release goes with the settlements before it", (_missed, missed) => {
    dir = mkdtempSync(join(tmpdir(), 'keel-unwritten-listing-'));
    saveUnwritten(dir, {
      usage: [JSON.stringify({ id: 'a-row' })],
      settlements: [],
      windowSettlements: [settlement({ release: '1' })],
      blockReleases: [settlement({ cost: '0', usageRecordId: 'its-release' })],
    });
    const files = readdirSync(dir).sort();
    expect(files).toHaveLength(3);
    // What a listing of a large directory can return while a save begins and ends during it (readdir
    // returns only the entries there throughout): neither the save's mark nor one of its files. The
    // file system's own listing after it.
    let listings = 0;
    const list = (path: string) => (listings++ === 0 ? files.filter((name) => name !== files[missed]) : readdirSync(path));

    const taken = takeUnwritten(dir, [], 1_000, () => {}, list);
    expect(taken.parts.map((part) => [part.usage.length, part.windowSettlements.length, part.blockReleases.length])).toEqual([
      [1, 0, 0],
      [0, 1, 0],
      [0, 0, 1],
    ]);
    expect(readdirSync(dir).filter((name) => name.endsWith('.json'))).toEqual([]);
  });
});
