/* global process */
// Who a process is beyond its pid (Linux), for the files that name the process holding them: the
// build marks (scripts/build-record.mjs, bin/keel.js, which run before any build), the embedded
// database's lock (data-dir-lock.ts) and a usage save in progress (unwritten-usage.ts). Plain
// JavaScript, so that bin/keel.js and the build scripts load it as it is.
import { readFileSync, readlinkSync } from 'node:fs';
import { hostname } from 'node:os';

/** Field 22 of /proc/<pid>/stat: when process `pid` (of this pid namespace) started, in clock ticks after boot; null when there is none, or no /proc. */
export function startTime(pid) {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    // The command's name (field 2, in parentheses) may hold spaces and parentheses: count from the last ')'.
    return stat.slice(stat.lastIndexOf(')') + 2).split(' ')[19] ?? null;
  } catch {
    return null;
  }
}

/** processIdentity's, read once: it does not change while the process lives, and marks are judged against it one by one. */
let own;

/**
 * This process beyond its pid: the kernel's boot, its pid namespace and when it started. A pid
 * alone is reused once its process ends (pid 1 in every container), and names another process in
 * another pid namespace (containers sharing a host name and a directory); the three together are
 * this process. '' where /proc does not tell (not Linux).
 */
export function processIdentity() {
  own ??= ownIdentity();
  return own;
}

function ownIdentity() {
  const start = startTime(process.pid);
  const namespace = pidNamespace();
  if (start === null || !namespace) return '';
  try {
    return `${readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim()} ${namespace} ${start}`;
  } catch {
    return '';
  }
}

/** This process's pid namespace (`pid:[<inode>]`); '' where /proc does not tell. */
export function pidNamespace() {
  try {
    return readlinkSync('/proc/self/ns/pid');
  } catch {
    return '';
  }
}

/**
 * What can be told from here of the process that recorded `host`, `pid` and `identity` (its
 * `processIdentity()`, or '' for a record without one): 'alive' or 'gone', or 'unknown' when it ran
 * on another host, kernel or pid namespace, where its pid means nothing here. Without an identity
 * (a record from before them, or from where /proc does not tell), the pid alone decides.
 */
export function recordedProcess(host, pid, identity) {
  if (host !== hostname()) return 'unknown';
  const fields = identity.split(' ');
  if (fields.length === 3) {
    const here = processIdentity().split(' ');
    if (fields[0] !== here[0] || fields[1] !== here[1]) return 'unknown';
    const start = startTime(pid);
    // A process this user cannot see (/proc mounted with hidepid) is asked by signal, as one without an identity.
    if (start !== null) return start === fields[2] ? 'alive' : 'gone';
  }
  try {
    process.kill(pid, 0);
    return 'alive';
  } catch (error) {
    return error.code === 'EPERM' ? 'alive' : 'gone'; // EPERM: alive, another user's
  }
}
