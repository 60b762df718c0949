#!/usr/bin/env node
/* global process, console */
// `npm run build` (and `prepare`, which npm runs after `npm ci` / `npm install` in a checkout):
// bundles src/ with esbuild (scripts/bundle.mjs: what goes in, and why a bundle) into a directory
// of its own, dist/builds/<time>-<pid>/, then points dist/main.js at it and writes dist/.built,
// the mark bin/keel.js reads to run the bundled JavaScript instead of loading the TypeScript
// through tsx (a faster, lighter start).
//
// Each build keeps its own directory because a server loads parts of its build after it started
// (the chunks of modules loaded on first use, the document parser's worker file): a rebuild under a
// running server (`git pull && npm ci`, then the restart) must not take them from it, nor hand it
// those of another build. The newest KEEP builds are kept; older ones are removed.
//
// A failed build (a syntax error) leaves dist/ as it was: nothing is pointed at or marked, and
// bin/keel.js then runs src/ through tsx. Types are not checked here (esbuild only strips them;
// with isolatedModules each file's JavaScript is the same either way): `npm run typecheck` checks
// them, as CI does right after `npm ci`, and tsx runs src/ unchecked too.
import { existsSync, mkdirSync, readdirSync, renameSync, rmSync, statSync, utimesSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';

import { bundle } from './bundle.mjs';

const KEEP = 3;
const root = resolve(import.meta.dirname, '..');
const dist = join(root, 'dist');
const builds = join(dist, 'builds');

const began = new Date();
const id = `${began.toISOString().replace(/[-:]/g, '').replace(/\.\d+Z$/, 'Z')}-${process.pid}`;
const scratch = join(builds, `.building-${id}`);
mkdirSync(builds, { recursive: true });
try {
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

/** Writes `text` to `path` whole or not at all (a process starting meanwhile reads the old file or the new one). */
function replace(path, text) {
  const draft = `${path}.${process.pid}`;
  writeFileSync(draft, text);
  renameSync(draft, path);
}

// What an earlier layout left directly in dist/ (modules compiled file by file) goes.
for (const name of readdirSync(dist)) if (!['builds', 'main.js', '.built'].includes(name)) rmSync(join(dist, name), { recursive: true, force: true });
replace(join(dist, 'main.js'), `// Written by scripts/build.mjs: the newest build.\nimport './builds/${id}/main.js';\n`);
// The mark holds when the build began reading src/: an edit made during the build counts as newer.
replace(join(dist, '.built'), `${began.toISOString()} ${id}\n`);
utimesSync(join(dist, '.built'), began, began);

const done = readdirSync(builds)
  .filter((name) => !name.startsWith('.'))
  .sort();
for (const name of done.slice(0, -KEEP)) rmSync(join(builds, name), { recursive: true, force: true });
// Scratch directories of builds that died half-way (a kill), never pointed at; not one another build is writing now.
for (const name of readdirSync(builds)) {
  if (name.startsWith('.building-') && Date.now() - statSync(join(builds, name)).mtimeMs > 10 * 60_000) rmSync(join(builds, name), { recursive: true, force: true });
}
