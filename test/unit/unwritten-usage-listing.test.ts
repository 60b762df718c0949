import * as fs from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { afterEach, describe, expect, it, vi } from 'vitest';

import type { Settlement } from '../../src/crud/billing.js';
import { saveUnwritten, takeUnwritten } from '../../src/services/unwritten-usage.js';

// The directory's listing is the file system's: what a listing returns of entries made during it
// is up to the file system (readdir returns only the entries there throughout), so the test gives
// the take the listing a concurrent save can produce.
vi.mock('node:fs', async (importOriginal) => {
  const actual = await importOriginal<typeof fs>();
  return { ...actual, readdirSync: vi.fn(actual.readdirSync) };
});

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
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
  vi.mocked(fs.readdirSync).mockReset();
});

describe('takeUnwritten, listing while a save ends', () => {
  it.each([
    ['its last (the release)', 2],
    ['its first (the usage rows)', 0],
  ])("takes a save's files a listing made during the save missed, %s (its mark gone once the take looks), in the order saved: the block release goes with the settlements before it", (_missed, missed) => {
    dir = fs.mkdtempSync(join(tmpdir(), 'keel-unwritten-listing-'));
    saveUnwritten(dir, {
      usage: [JSON.stringify({ id: 'a-row' })],
      settlements: [],
      windowSettlements: [settlement({ release: '1' })],
      blockReleases: [settlement({ cost: '0', usageRecordId: 'its-release' })],
    });
    const files = fs.readdirSync(dir).sort();
    expect(files).toHaveLength(3);
    // The listing saw neither the save's mark nor one of its files: the save began and ended while it ran.
    const listing = files.filter((name) => name !== files[missed]);
    vi.mocked(fs.readdirSync).mockImplementationOnce((() => listing) as unknown as typeof fs.readdirSync);

    const taken = takeUnwritten(dir, [], 1_000, () => {});
    expect(taken.parts.map((part) => [part.usage.length, part.windowSettlements.length, part.blockReleases.length])).toEqual([
      [1, 0, 0],
      [0, 1, 0],
      [0, 0, 1],
    ]);
    expect(fs.readdirSync(dir).filter((name) => name.endsWith('.json'))).toEqual([]);
  });
});
