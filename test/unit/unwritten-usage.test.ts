import { spawnSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readdirSync, renameSync, rmSync, statSync, utimesSync, watch, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout } from 'node:timers/promises';

import { afterEach, describe, expect, it } from 'vitest';

import { processIdentity, startTime } from '../../src/core/process-identity.mjs';

import type { Settlement } from '../../src/crud/billing.js';
import { forgetUnwritten, refreshTaken, saveUnwritten, takeUnwritten, type UnwrittenUsage } from '../../src/services/unwritten-usage.js';

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
let staging = '';
afterEach(() => {
  for (const made of [dir, staging]) if (made) rmSync(made, { recursive: true, force: true });
});

/** A save's queues: a usage row, a credit block's settlement, then its release. */
const blockSave: UnwrittenUsage = {
  usage: [JSON.stringify({ id: 'a-row' })],
  settlements: [],
  windowSettlements: [settlement({ release: '1' })],
  blockReleases: [settlement({ cost: '0', usageRecordId: 'its-release' })],
};

/**
 * The files `saveUnwritten` writes for `queues` (in the order it publishes them), as a save of
 * process `saver` made at `at`: written by the module into a directory of their own, then renamed
 * to that save's names, for a test to publish into `dir` one by one as the save does.
 */
function savedBy(saver: number, at: number, queues: UnwrittenUsage): { stamp: string; files: string[] } {
  staging = mkdtempSync(join(tmpdir(), 'keel-unwritten-staging-'));
  saveUnwritten(staging, queues);
  const names = readdirSync(staging).sort();
  const stamp = names[0]!.replace(/-\d{6}\.json$/, '').replace(/^\d+-\d+-/, `${at}-${saver}-`);
  const files = names.map((name) => {
    const renamed = name.replace(/^\d+-\d+-[^.]*?(-\d{6}\.json)$/, `${stamp}$1`);
    renameSync(join(staging, name), join(staging, renamed));
    return renamed;
  });
  return { stamp, files };
}

const publish = (file: string) => renameSync(join(staging, file), join(dir, file));

/** What each part of a take holds: [usage rows, window settlements, block releases]. */
const shapes = (parts: UnwrittenUsage[]) => parts.map((part) => [part.usage.length, part.windowSettlements.length, part.blockReleases.length]);

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

  it("a take while another process's save is being written takes none of that save's files: its settlements go with the block release after them, once the save is whole", () => {
    dir = mkdtempSync(join(tmpdir(), 'keel-unwritten-'));
    // The saver is a live process other than this one: this test's parent.
    const { stamp, files } = savedBy(process.ppid, Date.now(), blockSave);
    expect(files.length).toBe(3); // usage rows, the block's settlement, its release
    // The moment a concurrent save is at when its settlements' file is renamed in and its
    // release's not yet: its mark of a save in progress, then its files so far.
    writeFileSync(join(dir, `${stamp}.saving`), '');
    publish(files[0]!);
    publish(files[1]!);
    const during = takeUnwritten(dir, [], 1_000, () => {});
    // Taken now, the settlement went without its release: a later take (or another process, once
    // this one saved the settlement again under a later save at its shutdown) wrote the release
    // first, and the credit the settlement still charges showed as free.
    expect(shapes(during.parts)).toEqual([]);
    expect(during.taken).toEqual([]);

    // The save ends: its release renamed in, its mark removed. Everything goes in one take.
    publish(files[2]!);
    rmSync(join(dir, `${stamp}.saving`));
    const after = takeUnwritten(dir, [], 1_000, () => {});
    expect(shapes(after.parts)).toEqual([
      [1, 0, 0],
      [0, 1, 0],
      [0, 0, 1],
    ]);
    expect(readdirSync(dir).filter((name) => name.endsWith('.json'))).toEqual([]);
  });

  it('a save cut short (its process gone, or the save older than any save takes) is taken as far as it was written', () => {
    dir = mkdtempSync(join(tmpdir(), 'keel-unwritten-'));
    const gone = spawnSync(process.execPath, ['-e', '']).pid;
    for (const [saver, at] of [
      [gone, Date.now()], // killed mid-save
      [process.ppid, 1_700_000_000_000], // its pid since reused by a live process
    ] as const) {
      const { stamp, files } = savedBy(saver, at, blockSave);
      writeFileSync(join(dir, `${stamp}.saving`), '');
      publish(files[0]!);
      publish(files[1]!);
      const taken = takeUnwritten(dir, [], 1_000, () => {});
      expect(shapes(taken.parts)).toEqual([
        [1, 0, 0],
        [0, 1, 0],
      ]);
      // Its mark goes with it: the files the save wrote are all it will write.
      forgetUnwritten(taken.taken);
      expect(readdirSync(dir)).toEqual([]);
      rmSync(staging, { recursive: true });
    }
  });

  it('a save written before saves were marked (no mark) is taken as soon as it is seen', () => {
    dir = mkdtempSync(join(tmpdir(), 'keel-unwritten-'));
    const { files } = savedBy(process.ppid, Date.now(), blockSave);
    for (const file of files) publish(file);
    expect(shapes(takeUnwritten(dir, [], 1_000, () => {}).parts)).toEqual([
      [1, 0, 0],
      [0, 1, 0],
      [0, 0, 1],
    ]);
  });

  it.runIf(process.platform === 'linux')("judges a save's mark by the process it names beyond its pid: a later process given the pid is not it; one of another pid namespace holds the save while it is young", () => {
    const [boot, namespace, start] = processIdentity().split(' ');
    const dead = spawnSync(process.execPath, ['-e', '']).pid;
    const cases = [
      // This process's pid, another start: a later process given the pid of a saver killed mid-save.
      { saver: process.pid, at: Date.now(), mark: `${boot} ${namespace} ${Number(start) - 1}`, busy: false },
      // Another pid namespace (a container sharing the directory): its pid means nothing here.
      { saver: dead, at: Date.now(), mark: `${boot} pid:[1] ${start}`, busy: true },
      { saver: dead, at: 1_700_000_000_000, mark: `${boot} pid:[1] ${start}`, busy: false },
    ];
    for (const { saver, at, mark, busy } of cases) {
      dir = mkdtempSync(join(tmpdir(), 'keel-unwritten-'));
      const { stamp, files } = savedBy(saver, at, blockSave);
      writeFileSync(join(dir, `${stamp}.saving`), mark);
      for (const file of files.slice(0, 2)) publish(file);
      const taken = takeUnwritten(dir, [], 1_000, () => {});
      expect(shapes(taken.parts)).toEqual(busy ? [] : [[1, 0, 0], [0, 1, 0]]);
      expect(readdirSync(dir).includes(`${stamp}.saving`)).toBe(busy);
      rmSync(dir, { recursive: true, force: true });
      rmSync(staging, { recursive: true, force: true });
    }
  });

  it.runIf(process.platform === 'linux')('judges a taken file by the process its name gives beyond its pid: a later process given the pid is not it; one of another pid namespace holds it while it touches it', () => {
    const [boot, namespace, start] = processIdentity().split(' ');
    const inode = /\d+/.exec(namespace!)![0];
    const parent = startTime(process.ppid)!;
    const save = `1700000000000-4242-${'b'.repeat(8)}-bbbb-bbbb-bbbb-${'b'.repeat(12)}`;
    const longAgo = new Date(Date.now() - 11 * 60_000);
    const cases = [
      // This process's pid (pid 1 of the next container), another start: an earlier process's file.
      { taker: `${process.pid}_${boot}_${inode}_${Number(start) - 1}`, touched: new Date(), held: false },
      // A live process here (this test's parent), by its start; and a later one given its pid.
      { taker: `${process.ppid}_${boot}_${inode}_${parent}`, touched: longAgo, held: true },
      { taker: `${process.ppid}_${boot}_${inode}_${Number(parent) + 1}`, touched: new Date(), held: false },
      // Another pid namespace (a container sharing the directory): held while its holder touches it.
      { taker: `${process.pid}_${boot}_1_${start}`, touched: new Date(), held: true },
      { taker: `${process.pid}_${boot}_1_${start}`, touched: longAgo, held: false },
      // This process's own, not held (a take that failed to set it aside): taken back.
      { taker: `${process.pid}_${boot}_${inode}_${start}`, touched: new Date(), held: false },
    ];
    for (const { taker, touched, held } of cases) {
      dir = mkdtempSync(join(tmpdir(), 'keel-unwritten-'));
      const file = join(dir, `${save}-000000.json.${taker}.taken`);
      writeFileSync(file, JSON.stringify(blockSave));
      utimesSync(file, touched, touched);
      const taken = takeUnwritten(dir, [], 1_000, () => {});
      expect({ taker, taken: shapes(taken.parts) }).toEqual({ taker, taken: held ? [] : [[1, 1, 1]] });
      if (!held) expect(taken.taken).toEqual([join(dir, `${save}-000000-r${taker.split('_')[0]}.json.${process.pid}_${boot}_${inode}_${start}.taken`)]);
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('touches the taken files a process holds (refreshTaken), so another pid namespace leaves them to it', () => {
    dir = mkdtempSync(join(tmpdir(), 'keel-unwritten-'));
    const file = join(dir, `1700000000000-4242-${'c'.repeat(8)}-cccc-cccc-cccc-${'c'.repeat(12)}-000000.json.4242_${'0'.repeat(8)}-0000-0000-0000-${'0'.repeat(12)}_1_1.taken`);
    writeFileSync(file, JSON.stringify(blockSave));
    utimesSync(file, new Date(0), new Date(0));
    expect(takeUnwritten(dir, [], 1_000, () => {}).parts).toHaveLength(1); // untouched: its holder is gone
    const [taken] = readdirSync(dir);
    utimesSync(join(dir, taken!), new Date(0), new Date(0));
    refreshTaken([join(dir, taken!), join(dir, 'gone-since')]);
    expect(Date.now() - statSync(join(dir, taken!)).mtimeMs).toBeLessThan(60_000);
  });

  it.each([
    ['its last (the release)', 2],
    ['its first (the usage rows)', 0],
  ])("takes a save's files a listing made during the save missed, %s (its mark gone once the take looks), in the order saved: the block release goes with the settlements before it", (_missed, missed) => {
    dir = mkdtempSync(join(tmpdir(), 'keel-unwritten-'));
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

  it.runIf(process.platform === 'linux')('writes its mark before its first file, and removes it after its last', async () => {
    dir = mkdtempSync(join(tmpdir(), 'keel-unwritten-'));
    // The directory's changes in the order they happened (inotify keeps it): the mark made, the
    // files (each written under a temporary name, then renamed), the mark removed.
    const seen: string[] = [];
    const watcher = watch(dir, (_event, name) => seen.push(String(name)));
    try {
      const saved = saveUnwritten(dir, blockSave);
      expect(saved).toBe(3);
      const stamp = readdirSync(dir)[0]!.replace(/-\d{6}\.json$/, '');
      await setTimeout(200);
      // The mark is written aside (`.saving-draft`) and renamed in, whole, before any file.
      const firstFile = seen.findIndex((name) => name.startsWith(`${stamp}-`));
      expect(seen).toContain(`${stamp}.saving-draft`);
      expect(seen.indexOf(`${stamp}.saving`)).toBeGreaterThan(seen.lastIndexOf(`${stamp}.saving-draft`));
      expect(seen.indexOf(`${stamp}.saving`)).toBeLessThan(firstFile);
      expect(seen.at(-1)).toBe(`${stamp}.saving`);
      expect(seen.filter((name) => name.endsWith('.json'))).toHaveLength(3);
      expect(readdirSync(dir).filter((name) => name.endsWith('.saving'))).toEqual([]);
      expect(stamp).toMatch(new RegExp(`^\\d+-${process.pid}-`));
    } finally {
      watcher.close();
    }
  });
});

