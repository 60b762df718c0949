import { closeSync, linkSync, openSync, readFileSync, renameSync, unlinkSync, writeSync } from 'node:fs';
import { hostname } from 'node:os';

import { ConfigError } from './config.js';

/** Another live process holds the lock; `holder` is its pid. */
export class DataDirLockedError extends ConfigError {
  constructor(
    readonly directory: string,
    readonly holder: number,
  ) {
    super(`the embedded database ${directory} is in use by another Keel process (pid ${holder}); stop it first`);
  }
}

interface Holder {
  pid: number;
  /** Kernel start time of the process (Linux), so a pid reused after a crash is not taken for the holder. */
  started: string | null;
  host: string;
}

/** Field 22 of /proc/<pid>/stat (start time in clock ticks since boot); null where there is no /proc. */
function startTime(pid: number): string | null {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    // The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    return stat.slice(stat.lastIndexOf(')') + 2).split(' ')[19] ?? null;
  } catch {
    return null;
  }
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

function readHolder(path: string): Holder | null {
  try {
    const parsed = JSON.parse(readFileSync(path, 'utf8')) as Partial<Holder>;
    if (typeof parsed.pid !== 'number') return null;
    return { pid: parsed.pid, started: parsed.started ?? null, host: parsed.host ?? hostname() };
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') throw error;
    // Half-written by a process killed between create and write: nobody holds it.
    return null;
  }
}

/**
 * An exclusive lock on a directory for this process's life: `<directory>.lock`, created with
 * O_EXCL and holding this process's pid. It is removed on close and on exit; after a crash (or
 * kill -9) the next process finds the pid gone (or reused by another program) and takes it over.
 * Returns the release function; throws DataDirLockedError naming the holder's pid.
 *
 * A pid file rather than an OS lock (flock): Node has no flock of its own, and a lock file needs no
 * native add-on, works on every platform Node runs on and lets the message name the holder.
 */
export function lockDirectory(directory: string): () => void {
  const path = `${directory}.lock`;
  const mine: Holder = { pid: process.pid, started: startTime(process.pid), host: hostname() };
  for (let attempt = 0; attempt < 5; attempt++) {
    let fd: number;
    try {
      fd = openSync(path, 'wx', 0o600);
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code !== 'EEXIST') throw error;
      let holder: Holder | null;
      try {
        holder = readHolder(path);
      } catch {
        continue; // released meanwhile: try again
      }
      if (holder && alive(holder)) throw new DataDirLockedError(directory, holder.pid);
      takeOverStale(path, holder);
      continue;
    }
    try {
      writeSync(fd, JSON.stringify(mine));
    } finally {
      closeSync(fd);
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
  throw new Error(`could not take the lock ${path}: it keeps changing hands`);
}

/**
 * Removes a lock whose holder is gone. Moving it aside first and checking what was moved keeps a
 * process that took the lock over in the meantime from losing it: that lock is put back.
 */
function takeOverStale(path: string, stale: Holder | null): void {
  const aside = `${path}.stale-${process.pid}`;
  try {
    renameSync(path, aside);
  } catch {
    return; // someone else moved or released it: start over
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
