#!/usr/bin/env node
/* global process, console */
// `npm run build` (and `prepare`, which npm runs after `npm ci` / `npm install` in a checkout):
// bundles src/ with esbuild (scripts/bundle.mjs: what goes in, and why a bundle) into a directory
// of its own, dist/builds/<time>-<pid>/, then writes dist/.built: the build's start time and name in
// one file, replaced whole, which bin/keel.js reads to run that build's JavaScript instead of
// loading the TypeScript through tsx (a faster, lighter start).
//
// Each build keeps its own directory because a server loads parts of its build after it started
// (the chunks of modules loaded on first use, the document parser's worker file): a rebuild under a
// running server (`git pull && npm ci`, then the restart) must not take them from it, nor hand it
// those of another build. bin/keel.js marks the build each process runs from (`.running-<host>-<pid>-ns<pid
// namespace>-b<boot id>` in its directory, holding the process's identity: build-record.mjs); a build is removed once KEEP newer ones exist, it is not the one dist/.built
// names, and no live process has marked it (`inUse`).
//
// A failed build (a syntax error in any module under src/, imported or not) leaves dist/ as it was: nothing is pointed at or marked, and
// bin/keel.js then runs src/ through tsx. Types are not checked here (esbuild only strips them;
// with isolatedModules each file's JavaScript is the same either way): `npm run typecheck` checks
// them, as CI does right after `npm ci`, and tsx runs src/ unchecked too.
import { existsSync, mkdirSync, readdirSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';

import { markInUse, modified, publishedText, readPublished } from './build-record.mjs';
import { bundle, checkSyntax } from './bundle.mjs';

const KEEP = 3;
const root = resolve(import.meta.dirname, '..');
const dist = join(root, 'dist');
const builds = join(dist, 'builds');

const began = new Date();
// Names sort in the order the builds began (to the millisecond; the pid parts two begun together).
const id = `${began.toISOString().replace(/[-:.]/g, '')}-${process.pid}`;
const scratch = join(builds, `.building-${id}`);
mkdirSync(builds, { recursive: true });
try {
  await checkSyntax(root);
  await bundle(root, scratch);
} catch (error) {
  rmSync(scratch, { recursive: true, force: true });
  if (error?.code === 'ERR_MODULE_NOT_FOUND' || error?.code === 'MODULE_NOT_FOUND') {
    // An install without tsx and its esbuild: nothing to build with.
    console.error('keel: esbuild is not installed (npm install includes it); cannot build');
    process.exit(process.env.npm_lifecycle_event === 'prepare' ? 0 : 1);
  }
  if (!error?.errors) console.error(error);
  console.error('keel: the build failed; dist/ is left as it was');
  process.exit(1);
}
if (!existsSync(join(scratch, 'main.js'))) {
  rmSync(scratch, { recursive: true, force: true });
  console.error('keel: the build wrote no main.js; dist/ is left as it was');
  process.exit(1);
}
renameSync(scratch, join(builds, id));

// Published unless a build begun later was meanwhile (two builds at once): the mark always names the
// newest, and its time is when that build began reading src/, so an edit made during it counts as newer.
if ((readPublished(dist)?.began ?? -Infinity) <= began.getTime()) {
  const draft = join(builds, `.built-${id}`);
  writeFileSync(draft, publishedText(began, id));
  renameSync(draft, join(dist, '.built'));
}
// What the layout before builds/ left in dist/ (modules compiled file by file, then one bundle) goes.
for (const name of readdirSync(dist)) if (name !== 'builds' && name !== '.built') rmSync(join(dist, name), { recursive: true, force: true });

/** Whether a process that marked the build at `dir` as its own (`runningMark`) may still run it (`markInUse`). */
const inUse = (dir) => readdirSync(dir).some((name) => markInUse(dir, name));

const current = readPublished(dist)?.name;
const done = readdirSync(builds)
  .filter((name) => !name.startsWith('.'))
  .sort();
for (const name of done.slice(0, -KEEP)) if (name !== current && !inUse(join(builds, name))) rmSync(join(builds, name), { recursive: true, force: true });
// Scratch directories of builds that died half-way (a kill), never published; not one another build is writing now.
for (const name of readdirSync(builds)) {
  if (name.startsWith('.') && Date.now() - modified(join(builds, name)) > 10 * 60_000) rmSync(join(builds, name), { recursive: true, force: true });
}
