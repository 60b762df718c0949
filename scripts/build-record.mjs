/* global process */
// What scripts/build.mjs and bin/keel.js agree on about the builds in dist/builds/: the record of
// the published one (dist/.built) and the marks of the processes that run one.
import { readFileSync, readlinkSync, statSync } from 'node:fs';
import { hostname } from 'node:os';
import { join } from 'node:path';

/** dist/.built's text for the build `name` begun at `began`: one line, replaced whole. */
export const publishedText = (began, name) => `${began.toISOString()} ${name}\n`;

/** The build dist/.built (under `dist`) names, and when it began (ms); null when there is none. */
export function readPublished(dist) {
  try {
    const [time, name] = readFileSync(join(dist, '.built'), 'utf8').trim().split(' ');
    return name ? { began: Date.parse(time), name } : null;
  } catch {
    return null;
  }
}

/** The mark a process of this host leaves in the directory of the build it runs. */
export const runningMark = (pid = process.pid) => `.running-${hostname()}-${pid}`;

/**
 * What a mark holds besides its name: who its process is beyond its pid, on Linux — the kernel's
 * boot, the pid namespace, and when the process started. A pid alone is reused once its process
 * ends (pid 1 in every container: a mark left by a container's kill -9 held its build for ever),
 * and names another process in another pid namespace (containers sharing a hostname and a dist/).
 * Empty where /proc does not tell (not Linux): the pid alone is checked.
 */
export function processIdentity(pid = process.pid) {
  const start = startTime(pid);
  if (start === null) return '';
  try {
    return `${readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim()} ${readlinkSync('/proc/self/ns/pid')} ${start}`;
  } catch {
    return '';
  }
}

/** When process `pid` (of this pid namespace) started, in clock ticks after boot; null when there is none, or no /proc. */
function startTime(pid) {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    // Fields after the command's name (in parentheses, which may hold spaces): state is the 3rd, starttime the 22nd.
    return stat.slice(stat.lastIndexOf(')') + 2).split(' ')[19] ?? null;
  } catch {
    return null;
  }
}

/** How long a mark whose process cannot be checked from here (another host, kernel or pid namespace) holds its build. */
export const UNCHECKABLE_MARK_MS = 7 * 24 * 3600_000;

/**
 * Whether the process that left the mark `name` in the build directory `dir` may still run that
 * build: one of this host, kernel and pid namespace whose pid is alive and started when the mark
 * says (not a later process given the same pid), or one that cannot be checked from here whose
 * mark is less than a week old. A mark gone meanwhile (its process exiting) is not in use.
 */
export function markInUse(dir, name) {
  const mark = parseRunningMark(name);
  if (!mark) return false;
  let recorded;
  try {
    recorded = readFileSync(join(dir, name), 'utf8').trim();
  } catch (error) {
    if (error.code === 'ENOENT') return false;
    throw error;
  }
  const [boot, namespace, start] = recorded.split(' ');
  const here = processIdentity().split(' ');
  if (mark.host !== hostname() || (recorded && (boot !== here[0] || namespace !== here[1]))) return Date.now() - modified(join(dir, name)) < UNCHECKABLE_MARK_MS;
  // A pid hidden from this user (/proc mounted with hidepid) is checked as a mark without its start.
  const now = recorded ? startTime(mark.pid) : null;
  if (now !== null) return now === start;
  // A mark written before marks held the process's identity, or where /proc does not tell.
  try {
    process.kill(mark.pid, 0);
    return true;
  } catch (error) {
    return error.code === 'EPERM'; // alive, another user's
  }
}

/** The host and pid of a mark (`runningMark`), or null when `name` is none. */
export function parseRunningMark(name) {
  if (!name.startsWith('.running-')) return null;
  const last = name.lastIndexOf('-');
  return { host: name.slice('.running-'.length, last), pid: Number(name.slice(last + 1)) };
}

/** The modification time of `path`; 0 when there is none (or it went meanwhile). */
export function modified(path) {
  try {
    return statSync(path).mtimeMs;
  } catch (error) {
    if (error.code === 'ENOENT' || error.code === 'ENOTDIR') return 0;
    throw error;
  }
}
