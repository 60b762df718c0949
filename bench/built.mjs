// Benchmarks time the JavaScript `npm run build` makes, not src/ through a TypeScript loader.
// dist/ is one bundle (scripts/bundle.mjs) that exports none of Keel's modules, so a benchmark that
// calls some bundles them the same way into <checkout>/bench/out/modules-<pid>/ (shared modules
// in chunks there, so two of them share one instance; removed when the process exits), with the
// document parser's worker beside them as in dist/. A checkout built before the bundle (an A/B's base) has each module compiled in
// dist/, used as it is.
/* global process */
import { existsSync, rmSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { pathToFileURL } from 'node:url';

/** The modules `paths` (under src/, without extension: 'core/logger') of the checkout at `checkout`, as built. */
export async function importBuilt(checkout, ...paths) {
  const root = resolve(checkout);
  const compiled = paths.map((path) => join(root, 'dist', `${path}.js`));
  if (compiled.every((file) => existsSync(file))) return Promise.all(compiled.map((file) => import(pathToFileURL(file).href)));
  const out = join(root, `bench/out/modules-${process.pid}`);
  process.on('exit', () => rmSync(out, { recursive: true, force: true }));
  const name = (path) => path.replaceAll('/', '-');
  const { bundle, ENTRY_POINTS } = await import(pathToFileURL(join(root, 'scripts/bundle.mjs')).href);
  const entries = { 'extract-worker': ENTRY_POINTS['extract-worker'] };
  for (const path of paths) entries[name(path)] = `src/${path}.ts`;
  await bundle(root, out, entries);
  return Promise.all(paths.map((path) => import(pathToFileURL(join(out, `${name(path)}.js`)).href)));
}
