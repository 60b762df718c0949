#!/usr/bin/env node
/* global process */
// Runs Keel in this process (so signals such as SIGTERM reach the server directly): the compiled
// JavaScript in dist/ when `npm run build` (run by `npm ci` / `npm install` as `prepare`) made it
// from the src/ there is now, else the TypeScript in src/ through tsx, so an edit or a checkout
// never runs stale code and `npx keel ...` needs no build step. The compiled start is the faster
// and lighter one: tsx adds a loader thread and compiles every module at each start
// (bench/RESULTS.md).
import { readdirSync, statSync } from 'node:fs';
import { join, resolve } from 'node:path';

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

/** Whether dist/ was built from src/ as it is: its mark (the time the build began) is newer than every source. */
function built() {
  let mark;
  try {
    mark = statSync(join(root, 'dist', '.built')).mtimeMs;
  } catch {
    return false;
  }
  if (newest(join(root, 'src')) < mark) return true;
  if (process.stderr.isTTY) process.stderr.write('keel: src/ changed since the last build, running it through tsx (`npm run build` makes the start faster)\n');
  return false;
}

if (built()) {
  await import('../dist/main.js');
} else {
  const { register } = await import('tsx/esm/api');
  register();
  await import('../src/main.ts');
}
