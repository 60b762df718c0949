/* global process */
// What scripts/build.mjs and bin/keel.js agree on about the builds in dist/builds/: the record of
// the published one (dist/.built) and the marks of the processes that run one.
import { readFileSync, statSync } from 'node:fs';
import { hostname } from 'node:os';
import { join } from 'node:path';

import { recordedProcess } from '../src/core/process-identity.mjs';

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
  const state = recordedProcess(mark.host, mark.pid, identity);
  return state === 'unknown' ? Date.now() - modified(join(dir, name)) < UNCHECKABLE_MARK_MS : state === 'alive';
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
