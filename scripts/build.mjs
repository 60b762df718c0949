#!/usr/bin/env node
/* global process, console */
// `npm run build` (and `prepare`, which npm runs after `npm ci` / `npm install` in a checkout):
// bundles src/ into dist/ with esbuild (scripts/bundle.mjs: what goes in, and why a bundle), then
// writes dist/.built, the mark bin/keel.js reads to run the bundled JavaScript instead of loading
// the TypeScript through tsx (a faster, lighter start).
//
// The output goes to a scratch directory first and replaces dist/ whole, so removed sources leave
// no stale modules behind and a failed build leaves no half-written dist/ marked as built.
// A syntax error fails the build (nothing is marked): bin/keel.js then runs src/ through tsx.
// Types are not checked here (esbuild only strips them; with isolatedModules each file's
// JavaScript is the same either way): `npm run typecheck` checks them, as CI does right after
// `npm ci`, and tsx runs src/ unchecked too.
import { existsSync, renameSync, rmSync, utimesSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';

import { bundle } from './bundle.mjs';

const root = resolve(import.meta.dirname, '..');
const dist = join(root, 'dist');
const scratch = join(root, `dist.building-${process.pid}`);

const began = new Date();
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
// The mark holds when the build began reading src/: an edit made during the build counts as newer.
writeFileSync(join(scratch, '.built'), `${began.toISOString()}\n`);
utimesSync(join(scratch, '.built'), began, began);
rmSync(dist, { recursive: true, force: true });
renameSync(scratch, dist);
if (!existsSync(join(dist, 'main.js'))) {
  console.error('keel: the build wrote no dist/main.js');
  process.exit(1);
}
