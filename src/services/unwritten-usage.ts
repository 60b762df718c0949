/**
 * Usage a process could not write at shutdown (the database down, or the deadline first): its
 * meter's queues saved as files under DATA_DIR/usage-unwritten, for the next start on that
 * directory, or a running process's sweep, to write (usage-meter.ts). Every write in them is
 * idempotent (by usage record and ledger entry id), so what had reached the database after all is
 * not written twice.
 *
 * - A file holds at most ROWS_PER_FILE rows (a long outage's buffer passes what one JSON string
 *   can hold) and is written whole under a temporary name, fsynced and renamed: a reader never
 *   sees half of one. Names sort in the order the items were queued (a block's release after its
 *   calls' charges).
 * - A reader renames a file to `<name>.<pid>_<boot id>_<pid namespace>_<start>.taken` before
 *   reading it, so two processes on one DATA_DIR never both take it, and deletes it only once what
 *   it held is written or saved again; one left taken by a process that is gone is taken back under
 *   a name of its own (`…-r<pid>.json`, sorting just before its old one, under which that process
 *   may have saved the rest of a split file). The name says who holds it beyond its pid (pid 1 in
 *   every container sharing the directory): a holder that cannot be checked from here (another pid
 *   namespace or kernel) touches its files at every sweep, and is judged gone once they go
 *   TAKEN_STALE_MS untouched. A file that cannot be read is set aside as `<name>.unreadable`.
 * - A save marks itself in progress (`<save>.saving`, made before its first file and removed after
 *   its last, naming its process beyond its pid): a reader takes none of its files until then, or
 *   until its process is gone (killed mid-save: what it wrote is all there will be), or SAVE_MAX_MS
 *   after it began. Its files appear one rename at a time, and a reader listing the directory
 *   between two of them took a save's settlements without the block releases after them (see
 *   takeUnwritten). Saves of earlier versions have no mark: taken as seen.
 */
import { randomUUID } from 'node:crypto';
import { closeSync, fsyncSync, mkdirSync, openSync, readdirSync, readFileSync, renameSync, rmSync, statSync, utimesSync, writeFileSync } from 'node:fs';
import { hostname } from 'node:os';
import { join, resolve } from 'node:path';

import { processIdentity, recordedProcess } from '../core/process-identity.mjs';
import { processTag } from '../core/process-tag.js';

import type { Settlement } from '../crud/billing.js';

/** Under DATA_DIR. */
export const UNWRITTEN_DIR = 'usage-unwritten';

/** The most usage rows (or settlements) one file holds. */
const ROWS_PER_FILE = 10_000;

/**
 * A save marked in progress longer ago than this is taken whatever its mark says: no save takes
 * that long (a full queue's files are written in seconds), and a process that cannot be checked
 * from here (another pid namespace) may be long gone.
 */
const SAVE_MAX_MS = 10 * 60_000;

/**
 * A file taken by a process that cannot be checked from here (another pid namespace or kernel) and
 * untouched this long is taken back: its holder touches the files it holds at every sweep (a
 * minute at most, `refreshTaken`), so it is gone.
 */
const TAKEN_STALE_MS = 10 * 60_000;

/** A file taken: its name, and the pid and identity (processIdentity; '' for a file taken before they were named) of its taker. */
const TAKEN = /^(.+)\.json\.(\d+)(?:_([0-9a-f-]+)_(\d+)_(\d+))?\.taken$/;

/** A usage meter's queues: what one file holds a part of. */
export interface UnwrittenUsage {
  usage: string[];
  settlements: Settlement[];
  windowSettlements: Settlement[];
  blockReleases: Settlement[];
}

export const unwrittenDir = (dataDir: string): string => resolve(dataDir, UNWRITTEN_DIR);

/** Saves `queues` into files of `dir`; returns how many. Synchronous: the shutdown deadline calls it before the process exits. Throws what the file system throws. */
export function saveUnwritten(dir: string, queues: UnwrittenUsage): number {
  const parts: UnwrittenUsage[] = [];
  const split = <T>(items: T[], into: (part: UnwrittenUsage, slice: T[]) => void) => {
    for (let i = 0; i < items.length; i += ROWS_PER_FILE) {
      const part: UnwrittenUsage = { usage: [], settlements: [], windowSettlements: [], blockReleases: [] };
      into(part, items.slice(i, i + ROWS_PER_FILE));
      parts.push(part);
    }
  };
  split(queues.usage, (part, slice) => (part.usage = slice));
  split(queues.windowSettlements, (part, slice) => (part.windowSettlements = slice));
  split(queues.settlements, (part, slice) => (part.settlements = slice));
  split(queues.blockReleases, (part, slice) => (part.blockReleases = slice));
  const stamp = `${Date.now()}-${process.pid}-${randomUUID()}`;
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  // In progress until its last file is in (see takeUnwritten), naming this process beyond its pid;
  // written aside and renamed in, so a reader never finds it empty (judged by its pid alone then).
  // Left by a save that throws, it holds the files written so far until this process is gone
  // (SAVE_MAX_MS at most).
  const saving = join(dir, `${stamp}.saving`);
  removedOnFailure(`${saving}-draft`, () => {
    writeFileSync(`${saving}-draft`, processIdentity(), { mode: 0o600 });
    renameSync(`${saving}-draft`, saving);
  });
  for (const [i, part] of parts.entries()) writeWhole(join(dir, `${stamp}-${String(i).padStart(6, '0')}.json`), part);
  try {
    rmSync(saving);
  } catch {
    // The save is whole all the same: readers take it once this process is gone (SAVE_MAX_MS at most).
  }
  return parts.length;
}

/** Runs `write`, which makes `temporary`; removes it if `write` fails (a full disk): no reader takes it, so it stayed for good. */
function removedOnFailure(temporary: string, write: () => void): void {
  try {
    write();
  } catch (error) {
    rmSync(temporary, { force: true });
    throw error;
  }
}

/** Writes `part` to `path` under a temporary name, fsynced, then renamed: a reader never sees half of it. */
function writeWhole(path: string, part: UnwrittenUsage): void {
  const temporary = `${path.replace(/\.json$/, '')}.tmp`;
  removedOnFailure(temporary, () => {
    const fd = openSync(temporary, 'w', 0o600);
    try {
      // writeFileSync writes on until all of it is written (or throws): one writeSync may write only
      // part of it on a disk that is filling up, without an error, and half a file went in as whole.
      writeFileSync(fd, JSON.stringify(part));
      fsyncSync(fd);
    } finally {
      closeSync(fd);
    }
    renameSync(temporary, path);
  });
}

/** The save a file's name is of: without its number, a take-back's `-r<pid>`s and a taker's `.<pid>_<identity>.taken`. */
const saveOf = (name: string): string => name.replace(/-\d{6,}(?:-r\d+)*\.json(?:\.\d+(?:_[0-9a-f-]+_\d+_\d+)?\.taken)?$/, '');

/** The name this process takes file `name` under (TAKEN): its pid, and its identity where /proc tells it. */
function takenName(name: string): string {
  return `${name}.${processTag()}.taken`;
}

const records = (part: UnwrittenUsage): number => part.usage.length + part.settlements.length + part.windowSettlements.length + part.blockReleases.length;

/**
 * Takes the files of `dir` (those saved, and those a process that is gone left taken; not `held`,
 * this process's own), in the order they were saved, up to `maxRows` records: their paths as
 * taken, to delete once what they held is written (`forgetUnwritten`), what they held, in the
 * order it was queued, and whether files were left for a later take. Of a file with more usage
 * rows than fit, the rows past `maxRows` are saved back under its name for a later take.
 *
 * A save's settlements and the block releases after them (its files after its usage rows' files)
 * go in one take, whole, past `maxRows` if need be, and not while another live process holds a
 * file of that save: a block's release gives back what its row still holds, the part its calls'
 * settlements are still to charge included, so written before them (by another process, or by
 * this one after it saved part of them again under a later name) it showed that credit as free
 * and the account was undercharged. A save still being written (its `.saving` mark there, its
 * process alive) is not taken at all: listed between the renames of its files, its settlements
 * were there and the releases after them not yet; taken then, the settlements went alone, and
 * once this process saved them again under a save of its own (stopped before writing them), the
 * releases, left under the older save, sorted first: a take (another process's, or one whose room
 * ended before the settlements) wrote them before the settlements.
 */
export function takeUnwritten(
  dir: string,
  held: readonly string[],
  maxRows: number,
  onUnreadable: (file: string, error: unknown) => void,
  /** Lists `dir` (the file system's listing: what it returns of entries made during it is the file system's choice). */
  list: (dir: string) => string[] = listed,
): { taken: string[]; parts: UnwrittenUsage[]; more: boolean } {
  const taken: string[] = [];
  const parts: UnwrittenUsage[] = [];
  let rows = 0;
  /** The save whose settlements and releases this take has begun: its files are taken whatever the room. */
  let settling: string | null = null;
  /** The save whose mark was looked for last (its files sort together). */
  let checked: string | null = null;
  /** Saves a file of which another live process holds (or took just now), or still being written: none of their files is taken. */
  const busy = new Set<string>();
  const names = list(dir);
  if (!names.length) return { taken, parts, more: false }; // none saved
  for (const name of names) {
    const saving = /^(.+)\.saving$/.exec(name);
    if (saving) {
      if (saveInProgress(dir, saving[1]!)) busy.add(saving[1]!);
      continue;
    }
    const orphan = TAKEN.exec(name);
    if (!orphan || held.includes(join(dir, name))) continue;
    if (takerHolds(join(dir, name), orphan)) {
      busy.add(saveOf(name));
      continue;
    }
    // Back under a name of its own, not its old one: the process may have saved the rest of a
    // split file back under that name, which a rename would replace. It sorts just before it.
    const restored = `${orphan[1]}-r${orphan[2]}.json`;
    try {
      renameSync(join(dir, name), join(dir, restored));
      names.push(restored);
    } catch {
      // Another process took it back first, between this one's listing and now: that one takes the
      // save's other files after it, so none of them is taken here. Taken here, a release written
      // before the settlements it follows showed the credit they still charge as free.
      busy.add(saveOf(name));
    }
  }
  let saved = [...new Set(names)].filter((n) => n.endsWith('.json')).sort();
  for (let i = 0; i < saved.length; i++) {
    const name = saved[i]!;
    const save = saveOf(name);
    if (busy.has(save)) continue;
    // A listing of many entries is not one snapshot: a save begun during it may show its first
    // file and not its mark, made before that file. Asked again before the save's first file is taken.
    if (save !== checked) {
      checked = save;
      if (saveInProgress(dir, save)) {
        busy.add(save);
        continue;
      }
      // Nor, for a save that ended during it, all its files: listed again, now that they are all
      // in (its mark, gone, was removed after the last), the save's are all there.
      const missed = list(dir).filter((n) => n.endsWith('.json') && saveOf(n) === save && !saved.includes(n));
      if (missed.length) {
        saved = [...saved.slice(0, i), ...[...saved.slice(i), ...missed].sort()];
        i--;
        continue;
      }
    }
    if (rows >= maxRows && save !== settling) return { taken, parts, more: saved.length > i };
    const path = join(dir, takenName(name));
    // The rest of a file this process split and still holds the first part of: taking it now would
    // rename it onto that part, whose rows may not be written yet. It waits (and, to keep the
    // order they were queued in, the files after it too) until that part is written and deleted.
    if (held.includes(path)) return { taken, parts, more: true };
    try {
      renameSync(join(dir, name), path);
    } catch {
      busy.add(save); // another process took it
      continue;
    }
    let part: UnwrittenUsage;
    try {
      part = JSON.parse(readFileSync(path, 'utf8')) as UnwrittenUsage;
    } catch (error) {
      onUnreadable(name, error);
      try {
        renameSync(path, join(dir, `${name}.unreadable`));
      } catch {
        // Left taken: the next process takes it back, and sets it aside then. Its save's other
        // files wait with it, as for any file of a save not taken by this take's rename.
        busy.add(save);
      }
      continue;
    }
    // None within a save whose settlements this take has begun (past the room): its files hold no usage rows.
    const room = Math.max(0, maxRows - rows);
    if (part.usage.length > room) {
      // What does not fit goes back under the file's name (written whole first: every write in it
      // is idempotent, so rows in both files after a crash here are written once); the rest is taken.
      try {
        writeWhole(join(dir, name), { usage: part.usage.slice(room), settlements: [], windowSettlements: [], blockReleases: [] });
      } catch {
        // Not written back (the file system refuses): the file is taken whole, past the room.
        parts.push(part);
        taken.push(path);
        return { taken, parts, more: true };
      }
      parts.push({ ...part, usage: part.usage.slice(0, room) });
      taken.push(path);
      return { taken, parts, more: true };
    }
    parts.push(part);
    taken.push(path);
    rows += records(part);
    if (records(part) > part.usage.length) settling = save;
  }
  // A busy save's files are its holder's to take (or, once it is gone, anyone's: its files taken back).
  return { taken, parts, more: false };
}

/** The names in `dir`; none when there is no such directory (nothing saved). */
function listed(dir: string): string[] {
  try {
    return readdirSync(dir);
  } catch {
    return [];
  }
}

/**
 * Whether the save `save` is still being written: its mark is there and its process alive, or not
 * to be checked from here (another pid namespace, kernel or host) and the save younger than
 * SAVE_MAX_MS. A mark whose process is gone (or older than that) was left by a save cut short:
 * removed, and its files are taken as they are.
 */
function saveInProgress(dir: string, save: string): boolean {
  const path = join(dir, `${save}.saving`);
  let identity = '';
  try {
    identity = readFileSync(path, 'utf8');
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') return false;
  }
  const [, began, pid] = /^(\d+)-(\d+)-/.exec(save) ?? [];
  if (Date.now() - Number(began) < SAVE_MAX_MS && recordedProcess(hostname(), Number(pid), identity) !== 'gone') return true;
  try {
    rmSync(path, { force: true });
  } catch {
    // Left: judged so again by the next take.
  }
  return false;
}

/** Deletes taken files whose contents are written, or saved again. */
export function forgetUnwritten(files: readonly string[]): void {
  for (const file of files) rmSync(file, { force: true });
}

/** Touches the taken files this process holds, so that a process that cannot check it (TAKEN_STALE_MS) leaves them to it. */
export function refreshTaken(files: readonly string[]): void {
  const now = new Date();
  for (const file of files) {
    try {
      utimesSync(file, now, now);
    } catch {
      // Gone (written and deleted meanwhile), or the file system refuses: judged stale in time, then taken back and written again (idempotent).
    }
  }
}

/**
 * Whether the process that took `path` (its name TAKEN's `match`) holds it still: alive by its
 * identity, or by its pid alone for a name without one; not checkable from here (another pid
 * namespace or kernel) and the file touched within TAKEN_STALE_MS. None of this process's own
 * files not `held` is: an earlier process's with its pid, or its own left taken by a take that failed.
 */
function takerHolds(path: string, [, , pid, boot, inode, start]: RegExpExecArray): boolean {
  if (!boot) return Number(pid) !== process.pid && processAlive(Number(pid));
  const identity = `${boot} pid:[${inode}] ${start}`;
  if (Number(pid) === process.pid && identity === processIdentity()) return false;
  const taker = recordedProcess(hostname(), Number(pid), identity);
  if (taker !== 'unknown') return taker === 'alive';
  try {
    return Date.now() - statSync(path).mtimeMs < TAKEN_STALE_MS;
  } catch {
    return true; // gone since the listing: taken back by another process, whose take has the save
  }
}

/** Whether a process of this id runs (in this pid namespace). */
function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (error) {
    return (error as NodeJS.ErrnoException).code === 'EPERM';
  }
}
