import { closeSync, linkSync, openSync, readFileSync, renameSync, rmSync, unlinkSync, writeFileSync } from 'node:fs';
import { hostname } from 'node:os';
import { join } from 'node:path';

import { isDiskFullCode } from '../utils/error-chain.js';
import { ConfigError } from './config.js';
import { startTime } from './process-identity.mjs';

/** The lock file inside the directory it locks (PGlite's data directory). */
export const LOCK_FILE = 'keel.lock';

/**
 * Another live process holds the lock; `holder` is its pid. One on another host (a shared
 * filesystem, or a container since replaced: each has a hostname of its own) cannot be checked
 * from here and counts as live: the message names the host and the lock file, so that an operator
 * whose container was replaced after a crash (kill -9, out of memory) knows what to remove.
 */
export class DataDirLockedError extends ConfigError {
  constructor(
    readonly directory: string,
    readonly holder: number,
    readonly host: string = hostname(),
    lockFile = join(directory, LOCK_FILE),
  ) {
    super(
      host === hostname()
        ? `the embedded database ${directory} is in use by another Keel process (pid ${holder}); stop it first`
        : `the embedded database ${directory} is in use by a Keel process on host ${host} (pid ${holder}), which cannot be checked from here; stop it first, or, if no Keel runs there any more (a container replaced after a crash), remove ${lockFile}`,
    );
  }
}

/** The lock could not be taken or judged: a file this user cannot create or read. The message names the file and the cause. */
export class DataDirLockError extends ConfigError {}

interface Holder {
  pid: number;
  /** Kernel start time of the process (Linux), so a pid reused after a crash is not taken for the holder. */
  started: string | null;
  host: string;
}

function alive(holder: Holder): boolean {
  // On another machine (a shared filesystem) there is no way to tell: assume it runs.
  if (holder.host !== hostname()) return true;
  try {
    process.kill(holder.pid, 0);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code !== 'EPERM') return false;
  }
  const started = startTime(holder.pid);
  return holder.started === null || started === null || started === holder.started;
}

const codeOf = (error: unknown): string | undefined => (error as NodeJS.ErrnoException | undefined)?.code;

const whoAmI = (): string => (typeof process.getuid === 'function' ? `this user (uid ${process.getuid()})` : 'this user');

/** What the operator does about a file that could not be made in `directory`: a full disk (or quota) is no permission to grant. */
export function remedyIn(directory: string, code: string | undefined): string {
  return isDiskFullCode(code) ? `free space on the disk holding ${directory}` : `make ${directory} writable by ${whoAmI()}`;
}

/**
 * The lock's holder; null when nobody holds it (half-written by a process killed between create and
 * write). Throws ENOENT when there is no lock (released meanwhile), and DataDirLockError when this
 * user cannot read it: another user's Keel may hold it, and a lock that cannot be read is never
 * taken for stale (a process of another uid on the same directory would be joined, not excluded).
 */
function readHolder(path: string): Holder | null {
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (error) {
    if (codeOf(error) === 'ENOENT') throw error;
    throw new DataDirLockError(
      `cannot read the lock file ${path} (${codeOf(error) ?? String(error)}): another user's Keel process may hold it; if no Keel process runs on this directory, remove the file`,
    );
  }
  try {
    const parsed = JSON.parse(text) as Partial<Holder>;
    if (typeof parsed.pid !== 'number') return null;
    return { pid: parsed.pid, started: parsed.started ?? null, host: parsed.host ?? hostname() };
  } catch {
    return null;
  }
}

/** The lock file could not be created (not EEXIST) or a dead holder's moved aside: `reason` is the error. */
class CannotCreate extends Error {
  constructor(readonly reason: NodeJS.ErrnoException) {
    super(reason.message);
  }
}

/**
 * An exclusive lock on a directory for this process's life: `<directory>/keel.lock`, created with
 * O_EXCL and holding this process's pid. It is removed on close and on exit; after a crash (or
 * kill -9) the next process finds the pid gone (or reused by another program) and takes it over.
 * Returns the release function; throws DataDirLockedError naming the holder's pid, and
 * DataDirLockError (naming the file and the cause) when the lock cannot be taken.
 *
 * A pid file rather than an OS lock (flock): Node has no flock of its own, and a lock file needs no
 * native add-on, works on every platform Node runs on and lets the message name the holder.
 *
 * Inside the directory, not beside it (`<directory>.lock`, where earlier versions put it):
 * - A data directory that is a mount point (a container volume at /data) or a symlink to one has a
 *   parent the process often cannot write (/, or /app owned by root while Keel runs as another
 *   user): the lock beside it stopped Keel from starting on a directory it can write. The directory
 *   itself must be writable for PGlite anyway, so the lock inside can always be taken when the
 *   database can be opened at all.
 * - One place for every process, whoever runs it: a fallback to the inside only where the parent
 *   is not writable would have a root process lock beside and a non-root one inside, i.e. two
 *   files for one directory, unless each also checked the other's (a race between the two checks).
 * - The directory's own entry is the same however it is reached (a symlink, a trailing slash, a
 *   relative path, a second bind mount of the same volume at another path).
 * - PGlite (0.5.14) accepts it: its initdb runs on a directory that already holds other files
 *   (tried with keel.lock, .secret_key and lost+found: initdb and the second open both succeed and
 *   leave them untouched); PostgreSQL ignores unknown files at the top of its data directory, and
 *   PGlite writes no postmaster.pid there. Nothing in Keel lists or empties PGlite's directory: the
 *   other files under DATA_DIR (storage/, usage-unwritten/, .secret_key) are beside it, and
 *   `tighten` (db.ts) leaves the lock's 0600 as it is.
 * - A copy of the directory taken while it is in use brings the lock along, as a copy of DATA_DIR
 *   did with DATA_DIR/pglite.lock: it is refused, naming the live process (3d7dd8c).
 *
 * Upgrades: a process of an older Keel holds `<directory>.lock` and knows nothing of the lock
 * inside. So the lock beside is taken too where the parent can be written (an older version
 * started later is refused by it), and where it cannot, a live holder found there still refuses
 * this process, as does one this user cannot read (an older version run as root leaves it 0600); a
 * stale one there is left (it cannot be removed). The one gap: an older version started afterwards
 * as a user that can write the parent (root) while this one cannot.
 */
export function lockDirectory(directory: string): () => void {
  const inside = join(directory, LOCK_FILE);
  let releaseInside: () => void;
  try {
    releaseInside = takeLock(inside, directory);
  } catch (error) {
    if (!(error instanceof CannotCreate)) throw error;
    throw new DataDirLockError(
      `cannot take the lock file ${inside} (${error.reason.code ?? error.reason.message}): ${remedyIn(directory, error.reason.code)}`,
    );
  }
  try {
    const releaseBeside = takeOlderVersionsLock(`${directory}.lock`, directory);
    return () => {
      releaseBeside();
      releaseInside();
    };
  } catch (error) {
    releaseInside();
    throw error;
  }
}

/** The older versions' lock beside the directory: taken where the parent can be written, else only checked. */
function takeOlderVersionsLock(path: string, directory: string): () => void {
  try {
    return takeLock(path, directory);
  } catch (error) {
    if (!(error instanceof CannotCreate)) throw error;
  }
  let holder: Holder | null;
  try {
    holder = readHolder(path);
  } catch (error) {
    if (codeOf(error) === 'ENOENT') return () => undefined;
    throw error;
  }
  if (holder && alive(holder)) throw new DataDirLockedError(directory, holder.pid, holder.host, path);
  return () => undefined;
}

/** Creates the lock file `path` for `directory` or takes it over from a dead holder; throws CannotCreate when it cannot be created. */
function takeLock(path: string, directory: string): () => void {
  const mine: Holder = { pid: process.pid, started: startTime(process.pid), host: hostname() };
  for (let attempt = 0; attempt < 5; attempt++) {
    if (!createLock(path, mine)) {
      let holder: Holder | null;
      try {
        holder = readHolder(path);
      } catch (error) {
        if (codeOf(error) === 'ENOENT') continue; // released meanwhile: try again
        throw error;
      }
      if (holder && alive(holder)) throw new DataDirLockedError(directory, holder.pid, holder.host, path);
      takeOverStale(path, holder);
      continue;
    }
    let released = false;
    const release = () => {
      if (released) return;
      released = true;
      process.removeListener('exit', release);
      try {
        if (readHolder(path)?.pid === process.pid) unlinkSync(path);
      } catch {
        // already gone
      }
    };
    process.on('exit', release);
    return release;
  }
  throw new DataDirLockError(`could not take the lock ${path}: it keeps changing hands`);
}

/** Link errors of a filesystem without hard links (FAT, some FUSE and SMB mounts). */
const NO_HARD_LINKS = new Set(['EPERM', 'ENOTSUP', 'EOPNOTSUPP', 'ENOSYS', 'EXDEV']);

/**
 * Creates the lock file `path` holding `mine`, whole: written under a name of this process's, then
 * linked into place (EEXIST: it is taken; false). Never half-written where another starter can see
 * it: created empty with O_EXCL and written after, it could be read in between as nobody's and
 * taken over as stale, and both processes would open the database. A filesystem without hard links
 * gets O_EXCL and the write. Throws CannotCreate when the file cannot be made.
 */
function createLock(path: string, mine: Holder): boolean {
  const text = JSON.stringify(mine);
  const draft = `${path}.${process.pid}.new`;
  try {
    writeFileSync(draft, text, { mode: 0o600 });
  } catch (error) {
    throw new CannotCreate(error as NodeJS.ErrnoException);
  }
  try {
    linkSync(draft, path);
    return true;
  } catch (error) {
    if (codeOf(error) === 'EEXIST') return false;
    if (!NO_HARD_LINKS.has(codeOf(error) ?? '')) throw new CannotCreate(error as NodeJS.ErrnoException);
  } finally {
    unlinkSync(draft);
  }
  let fd: number;
  try {
    fd = openSync(path, 'wx', 0o600);
  } catch (error) {
    if (codeOf(error) === 'EEXIST') return false;
    throw new CannotCreate(error as NodeJS.ErrnoException);
  }
  try {
    // writeFileSync writes on until all of it is in (one writeSync may write part of it on a disk
    // filling up, without an error: a half lock reads as nobody's and is taken over).
    writeFileSync(fd, text);
  } catch (error) {
    // Not left empty or half-written: every later start would find it in its way.
    closeSync(fd);
    rmSync(path, { force: true });
    throw new CannotCreate(error as NodeJS.ErrnoException);
  }
  closeSync(fd);
  return true;
}

/**
 * Removes a lock whose holder is gone. Moving it aside first and checking what was moved keeps a
 * process that took the lock over in the meantime from losing it: that lock is put back. Throws
 * CannotCreate when its directory does not let this user move it (not writable, or sticky).
 */
function takeOverStale(path: string, stale: Holder | null): void {
  const aside = `${path}.stale-${process.pid}`;
  try {
    renameSync(path, aside);
  } catch (error) {
    if (codeOf(error) === 'ENOENT') return; // someone else moved or released it: start over
    throw new CannotCreate(error as NodeJS.ErrnoException);
  }
  const moved = (() => {
    try {
      return readHolder(aside);
    } catch {
      return null;
    }
  })();
  if (moved && (stale === null || moved.pid !== stale.pid) && alive(moved)) {
    try {
      linkSync(aside, path);
    } catch {
      // a third process took the free lock: the loop finds it
    }
  }
  unlinkSync(aside);
}
