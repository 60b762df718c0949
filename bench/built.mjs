// Benchmarks time the JavaScript `npm run build` makes, not src/ through a TypeScript loader.
// dist/ is one bundle (scripts/bundle.mjs) that exports none of Keel's modules, so a benchmark that
// calls some bundles them the same way into <checkout>/bench/out/modules/ (shared modules in
// chunks there, so two of them share one instance), with the document parser's worker beside them
// as in dist/. A checkout built before the bundle (an A/B's base) has each module compiled in
// dist/, used as it is.
import { existsSync } from 'node:fs';
import { join, resolve } from 'node:path';

/** The modules `paths` (under src/, without extension: 'core/logger') of the checkout at `checkout`, as built. */
export async function importBuilt(checkout, ...paths) {
  const root = resolve(checkout);
  const compiled = paths.map((path) => join(root, 'dist', `${path}.js`));
  if (compiled.every((file) => existsSync(file))) return Promise.all(compiled.map((file) => import(file)));
  const out = join(root, 'bench/out/modules');
  const name = (path) => path.replaceAll('/', '-');
  const { bundle, ENTRY_POINTS } = await import(join(root, 'scripts/bundle.mjs'));
  const entries = { 'extract-worker': ENTRY_POINTS['extract-worker'] };
  for (const path of paths) entries[name(path)] = `src/${path}.ts`;
  await bundle(root, out, entries);
  return Promise.all(paths.map((path) => import(join(out, `${name(path)}.js`))));
}
