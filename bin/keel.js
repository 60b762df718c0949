#!/usr/bin/env node
/* global process */
// Runs Keel in this process (so signals such as SIGTERM reach the server directly): the bundled
// JavaScript in dist/ when `npm run build` (run by `npm ci` / `npm install` as `prepare`) made it
// from the src/ and the packages there are now, else the TypeScript in src/ through tsx, so an
// edit, a checkout or an upgraded package never runs stale code and `npx keel ...` needs no build
// step. The bundled start is the faster and lighter one: tsx adds a loader thread and compiles
// every module at each start (bench/RESULTS.md).
import { readdirSync, statSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { pathToFileURL } from 'node:url';

import { markRunning, modified, readPublished } from '../scripts/build-record.mjs';

const root = resolve(import.meta.dirname, '..');

/** The newest modification time under `dir`, directories included (a removed file changes its directory's). */
function newest(dir) {
  let time = statSync(dir).mtimeMs;
  for (const entry of readdirSync(dir, { withFileTypes: true })) {
    const path = join(dir, entry.name);
    time = Math.max(time, entry.isDirectory() ? newest(path) : statSync(path).mtimeMs);
  }
  return time;
}

/**
 * What the bundle is made of besides src/: the packages it holds copies of (npm rewrites
 * node_modules/.package-lock.json at every install, `npm install <package>` too, which does not
 * run `prepare`) and how it is bundled.
 */
const INPUTS = ['package.json', 'package-lock.json', 'node_modules/.package-lock.json', 'scripts/bundle.mjs'];

/** Whether `build` is there and was made from src/ and the packages as they are: it began after the last change to any of them. */
function fresh(build) {
  if (!modified(join(build.dir, 'main.js'))) return false;
  if (newest(join(root, 'src')) < build.began && INPUTS.every((input) => modified(join(root, input)) < build.began)) return true;
  if (process.stderr.isTTY) process.stderr.write('keel: src/ or the installed packages changed since the last build, running src/ through tsx (`npm run build` makes the start faster)\n');
  return false;
}

const published = readPublished(join(root, 'dist'));
const build = published && { began: published.began, dir: join(root, 'dist', 'builds', published.name) };
if (build && fresh(build)) {
  // Marked as in use while this process runs, so that a rebuild keeps the files it loads later.
  markRunning(build.dir);
  await import(pathToFileURL(join(build.dir, 'main.js')).href);
} else {
  const { register } = await import('tsx/esm/api');
  register();
  await import('../src/main.ts');
}
