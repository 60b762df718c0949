/* global process */
// How `npm run build` bundles Keel (scripts/build.mjs runs it; a test bundles parts of it the same way).
//
// One bundle rather than src/ compiled file by file: Node then reads, resolves and compiles a few
// dozen files at start-up rather than ~1,500 (Keel's modules and those of the packages it loads),
// and V8 keeps each module's source in memory for its lazy compilation, so whitespace and
// comments left out are memory saved for as long as the process runs (bench/RESULTS.md, stop 54:
// restart and idle memory, bundled against compiled file by file).
import { readdirSync } from 'node:fs';
import { createRequire } from 'node:module';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';

/**
 * Each entry is a file of its own in the output: the server, and the document parser's worker
 * thread, which extract.ts starts from the file beside its own module (`extract-worker.js`).
 * Modules that both share go into chunks beside them (the bundle's `splitting`).
 */
export const ENTRY_POINTS = { main: 'src/main.ts', 'extract-worker': 'src/modules/knowledge/extract-worker.ts' };

/**
 * Packages Node loads from node_modules at run time, as before, rather than bundled: those that
 * read files of their own beside their modules (PGlite's WebAssembly and data, BullMQ's Lua
 * scripts, the tokenizer's ranks, the /docs page's assets, @fastify/swagger's package.json,
 * pino's transport threads), native addons (argon2's), tsx (bin/keel.js's fallback), and those
 * loaded only when first used, which the bundle would only make longer to build (Redis, S3,
 * PostgreSQL's driver, the document parsers, mail).
 */
export const EXTERNAL = [
  '@electric-sql/*',
  '@node-rs/*',
  'bullmq',
  'ioredis',
  'pg',
  '@aws-sdk/*',
  'gpt-tokenizer',
  '@scalar/*',
  '@fastify/swagger',
  'pino',
  'pino-pretty',
  'tsx',
  'unpdf',
  'mammoth',
  'yauzl',
  'nodemailer',
];

/**
 * Bundles `entryPoints` (paths relative to `root`) into `outdir`. Identifiers are not minified, so
 * stack traces and logs name Keel's functions; only whitespace and comments go (the source maps
 * beside each file map lines back to src/ under `node --enable-source-maps`). Not `keepNames`
 * either: it wraps every function as it is made, the closures made for each request included, in
 * a call that redefines its name (the gateway served ~10 % fewer calls at 64 clients with it). A
 * failure (a syntax error) throws, with esbuild's messages printed.
 */
export async function bundle(root, outdir, entryPoints = ENTRY_POINTS) {
  const { build } = await esbuild(root);
  return build({
    absWorkingDir: root,
    entryPoints,
    outdir,
    bundle: true,
    splitting: true,
    format: 'esm',
    platform: 'node',
    target: 'node20.19',
    external: EXTERNAL,
    minifyWhitespace: process.env.KEEL_BUNDLE_MINIFY !== '0',
    minifySyntax: process.env.KEEL_BUNDLE_MINIFY !== '0',
    minifyIdentifiers: process.env.KEEL_BUNDLE_MINIFY === 'all',
    sourcemap: 'linked',
    legalComments: 'none',
    logLevel: 'error',
    // Packages bundled from CommonJS call require() for Node's built-ins and the external
    // packages above: an ES module has none, so each output file makes its own.
    banner: { js: "import { createRequire as __keelCreateRequire } from 'node:module'; const require = __keelCreateRequire(import.meta.url);" },
  });
}

/**
 * Parses every module under src/, whether an entry point imports it or not, and writes nothing: a
 * bundle reads only what its entry points import, so a syntax error in a module nothing imports yet
 * passed the build, where compiling src/ file by file failed it. Throws as `bundle` does.
 */
export async function checkSyntax(root) {
  const { build } = await esbuild(root);
  const modules = readdirSync(join(root, 'src'), { recursive: true })
    .map(String)
    .filter((name) => /\.[cm]?[jt]s$/.test(name) && !/\.d\.[cm]?ts$/.test(name));
  await build({ absWorkingDir: root, entryPoints: modules.map((name) => join('src', name)), outdir: 'unwritten', write: false, platform: 'node', format: 'esm', logLevel: 'error' });
}

/** esbuild comes with tsx (a dependency), so it is there without devDependencies too. */
const esbuild = (root) => import(pathToFileURL(createRequire(join(root, 'package.json')).resolve('esbuild')).href);
