#!/usr/bin/env node
/* global process, console */
// `npm run build` (and `prepare`, which npm runs after `npm ci` / `npm install` in a checkout):
// compiles src/ to dist/ with tsc, then writes dist/.built, the mark bin/keel.js reads to run the
// compiled JavaScript instead of loading the TypeScript through tsx (a faster, lighter start).
//
// The output goes to a scratch directory first and replaces dist/ whole, so removed sources leave
// no stale modules behind and a failed build leaves no half-written dist/ marked as built.
// A syntax error fails the build (nothing is marked): bin/keel.js then runs src/ through tsx.
// tsc emits without checking types (--noCheck; with isolatedModules each file's JavaScript is the
// same either way): `npm run typecheck` checks them, as CI does right after `npm ci`, and tsx
// runs src/ unchecked too. Checking them here as well took the build from 10 to 33 s of CPU.
import { spawnSync } from 'node:child_process';
import { existsSync, renameSync, rmSync, utimesSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { join, resolve } from 'node:path';

const root = resolve(import.meta.dirname, '..');
const dist = join(root, 'dist');
const scratch = join(root, `dist.building-${process.pid}`);

let tsc;
try {
  tsc = createRequire(join(root, 'package.json')).resolve('typescript/bin/tsc');
} catch {
  // An install without devDependencies (npm ci --omit=dev): nothing to build with; Keel runs
  // its TypeScript through tsx, a dependency.
  if (process.env.npm_lifecycle_event === 'prepare') {
    console.error('keel: typescript is not installed; skipping the build (Keel will run src/ through tsx)');
    process.exit(0);
  }
  console.error('keel: typescript is not installed (npm install includes it); cannot build');
  process.exit(1);
}

const began = new Date();
const result = spawnSync(process.execPath, [tsc, '-p', 'tsconfig.build.json', '--noCheck', '--outDir', scratch], { cwd: root, stdio: 'inherit' });
if (result.status !== 0) {
  rmSync(scratch, { recursive: true, force: true });
  console.error('keel: the build failed; dist/ is left as it was');
  process.exit(result.status ?? 1);
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
