/* global process */
// What scripts/build.mjs and bin/keel.js agree on about the builds in dist/builds/: the record of
// the published one (dist/.built) and the marks of the processes that run one.
import { readFileSync, statSync } from 'node:fs';
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
