/* global process, setInterval */
// What scripts/build.mjs and bin/keel.js agree on about the builds in dist/builds/: the record of
// the published one (dist/.built) and the marks of the processes that run one.
import { readFileSync, renameSync, rmSync, statSync, utimesSync, writeFileSync } from 'node:fs';
import { hostname } from 'node:os';
import { join } from 'node:path';

import { pidNamespace, processIdentity, recordedProcess } from '../src/core/process-identity.mjs';

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

/**
 * The mark a process of this host leaves in the directory of the build it runs: named by its host,
 * pid and (Linux) pid namespace and boot, so that processes of one host name and pid in two
 * namespaces or on two kernels (containers sharing dist/; a host's first pid namespace has the
 * same number on every kernel) mark apart, and one of the same name is this process's or was left
 * by an earlier one of its host, pid and namespace.
 */
export function runningMark(pid = process.pid) {
  const namespace = /\[(\d+)\]/.exec(pidNamespace())?.[1];
  const boot = processIdentity().split(' ')[0]?.slice(0, 8);
  return `.running-${hostname()}-${pid}${namespace ? `-ns${namespace}${boot ? `-b${boot}` : ''}` : ''}`;
}

/** How long a mark whose process cannot be checked from here (another host, kernel or pid namespace) holds its build; its process refreshes it daily. */
export const UNCHECKABLE_MARK_MS = 7 * 24 * 3600_000;

/**
 * Whether the process that left the mark `name` in the build directory `dir` may still run that
 * build. A mark holds its process's identity (src/core/process-identity.mjs: a later process given
 * the same pid, pid 1 of the next container, is not it); one whose process cannot be checked from
 * here (another host, kernel or pid namespace sharing dist/) holds its build while it is under a
 * week old. A mark gone meanwhile (its process exiting) is not in use; one this user cannot read,
 * or an older one without an identity, is judged by its pid.
 */
export function markInUse(dir, name) {
  const mark = parseRunningMark(name);
  if (!mark) return false;
  let identity = '';
  try {
    identity = readFileSync(join(dir, name), 'utf8').trim();
  } catch (error) {
    if (error.code === 'ENOENT') return false;
  }
  // Unread, a mark's name still tells another pid namespace or kernel, where its pid means nothing.
  const elsewhere = !identity && mark.namespace !== undefined && !namedHere(mark);
  const state = elsewhere ? 'unknown' : recordedProcess(mark.host, mark.pid, identity);
  return state === 'unknown' ? Date.now() - modified(join(dir, name)) < UNCHECKABLE_MARK_MS : state === 'alive';
}

/**
 * Marks the build at `dir` as run by this process until it exits, so that a rebuild keeps the
 * files it loads later (see markInUse). The mark holds this process's identity and is whole when it
 * appears (written aside, then renamed in): a build never reads it empty. One of its name already
 * there was left by an earlier process of this host, pid and pid namespace (killed): replaced. The
 * mark's time is refreshed daily (a mark whose process cannot be checked holds its build a week
 * from it). A dist/ this process cannot write to is left unmarked.
 */
export function markRunning(dir) {
  const name = runningMark();
  const mark = join(dir, name);
  const draft = join(dir, `.draft${name}`);
  try {
    // A draft an earlier process left (killed) may be another name for its mark: not written through.
    rmSync(draft, { force: true });
    writeFileSync(draft, processIdentity());
    renameSync(draft, mark);
  } catch {
    try {
      rmSync(draft, { force: true });
    } catch {
      // read-only: nothing was written
    }
    return;
  }
  process.on('exit', () => {
    try {
      rmSync(mark, { force: true });
    } catch {
      // dist/ made read-only since: the mark is judged gone by its identity.
    }
  });
  setInterval(() => {
    try {
      const now = new Date();
      utimesSync(mark, now, now);
    } catch {
      // Removed meanwhile, or the disk refuses: the next refresh tries again.
    }
  }, 24 * 3600_000).unref();
}

/** The host, pid and (where its name has them) pid namespace and boot id's first characters of a mark (`runningMark`), or null when `name` is none. */
export function parseRunningMark(name) {
  const parts = /^\.running-(.+)-(\d+)(?:-ns(\d+)(?:-b([0-9a-f]+))?)?$/.exec(name);
  if (!parts) return null;
  const [, host, pid, namespace, boot] = parts;
  return { host, pid: Number(pid), ...(namespace && { namespace }), ...(boot && { boot }) };
}

/** Whether a mark's name (parseRunningMark) is of this host, pid namespace and boot (a name without a boot: either). */
function namedHere({ host, namespace, boot }) {
  const [ownBoot = '', ownNamespace = ''] = processIdentity().split(' ');
  return host === hostname() && ownNamespace === `pid:[${namespace}]` && (!boot || ownBoot.startsWith(boot));
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
