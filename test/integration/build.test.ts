import { execFile } from 'node:child_process';
import { cpSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, symlinkSync, utimesSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { promisify } from 'node:util';

import { afterAll, beforeAll, describe, expect, it, onTestFinished } from 'vitest';

import { processIdentity, startTime } from '../../src/core/process-identity.mjs';

import { runningMark } from '../../scripts/build-record.mjs';
import { ENTRY_POINTS } from '../../scripts/bundle.mjs';
import { freePort, healthy, launch, ROOT } from '../helpers/process.js';

const run = promisify(execFile);

/**
 * A checkout of its own for `npm run build` and bin/keel.js: scripts, bin and the package files
 * copied, migrations/ linked, and node_modules a directory of links to the packages with an install
 * record (.package-lock.json) of its own, so a test can make it newer than the build without
 * touching the repository's. Its src/ is Keel's, linked (`'linked'`) or copied (`'copied'`), or
 * (`'small'`) the bundle's entry modules alone, each a line (and the module the build script imports): for the tests of what a build does with
 * dist/ (which builds it keeps, what a failure leaves), where what it bundles does not matter, it
 * builds in a fraction of a second where Keel's src/ takes seconds (under load ~3.5 s a build).
 * `dist` (a path) makes its dist/ a link to that directory: builds of it then share another
 * checkout's builds.
 */
function checkout({ src = 'linked', dist }: { src?: 'linked' | 'copied' | 'small'; dist?: string } = {}): string {
  const dir = mkdtempSync(join(tmpdir(), 'keel-build-'));
  for (const name of ['bin', 'scripts', ...(src === 'copied' ? ['src'] : [])]) cpSync(join(ROOT, name), join(dir, name), { recursive: true });
  for (const name of ['package.json', 'package-lock.json']) cpSync(join(ROOT, name), join(dir, name));
  for (const name of [...(src === 'linked' ? ['src'] : []), 'migrations']) symlinkSync(join(ROOT, name), join(dir, name));
  if (src === 'small') {
    for (const [name, path] of Object.entries(ENTRY_POINTS)) {
      mkdirSync(dirname(join(dir, path)), { recursive: true });
      writeFileSync(join(dir, path), `export const entry = '${name}';\n`);
    }
    // What the build script itself imports from src/ (scripts/build-record.mjs).
    cpSync(join(ROOT, 'src', 'core', 'process-identity.mjs'), join(dir, 'src', 'core', 'process-identity.mjs'));
  }
  if (dist) symlinkSync(dist, join(dir, 'dist'));
  mkdirSync(join(dir, 'node_modules'));
  for (const name of readdirSync(join(ROOT, 'node_modules'))) {
    if (name !== '.package-lock.json') symlinkSync(join(ROOT, 'node_modules', name), join(dir, 'node_modules', name));
  }
  writeFileSync(join(dir, 'node_modules', '.package-lock.json'), '{}');
  const past = new Date(Date.now() - 60_000);
  for (const name of ['package.json', 'package-lock.json', 'node_modules/.package-lock.json']) utimesSync(join(dir, name), past, past);
  return dir;
}

const build = (dir: string) => run(process.execPath, ['scripts/build.mjs'], { cwd: dir });
const builds = (dir: string) => readdirSync(join(dir, 'dist', 'builds')).filter((name) => !name.startsWith('.'));
const filesOf = (dir: string) => readdirSync(dir, { recursive: true }).map(String).sort();

describe('npm run build', () => {
  /** Keel's src/, built once here: the server and bin/keel.js below run a build of it. */
  let dir: string;
  beforeAll(async () => {
    dir = checkout();
    await build(dir);
  }, 120_000);
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it("keeps each build's files while it is among the three newest or a live process runs it, and names the newest in dist/.built", async () => {
    const own = checkout({ src: 'small' });
    onTestFinished(() => rmSync(own, { recursive: true, force: true }));
    await build(own);
    const [first] = builds(own);
    const firstFiles = filesOf(join(own, 'dist', 'builds', first!));
    expect(firstFiles).toEqual(expect.arrayContaining(['main.js', 'extract-worker.js']));
    expect(readFileSync(join(own, 'dist', '.built'), 'utf8')).toMatch(new RegExp(`^\\S+ ${first}\\n$`));
    // A process runs it (as bin/keel.js marks it): this test's own, alive.
    writeFileSync(join(own, 'dist', 'builds', first!, runningMark()), '');
    for (let i = 0; i < 3; i++) await build(own);
    expect(builds(own)).toHaveLength(4);
    expect(filesOf(join(own, 'dist', 'builds', first!))).toEqual([...firstFiles, runningMark()].sort());
    expect(readFileSync(join(own, 'dist', '.built'), 'utf8')).toContain(` ${builds(own).at(-1)}`);
    // Once no live process runs it (a killed one's mark left behind), the next build removes it.
    rmSync(join(own, 'dist', 'builds', first!, runningMark()));
    writeFileSync(join(own, 'dist', 'builds', first!, runningMark(2 ** 22 + 1)), '');
    await build(own);
    expect(builds(own)).toHaveLength(3);
    expect(builds(own)).not.toContain(first);
  }, 120_000);

  it('lets a server started from a build serve what it loads on first use after three rebuilds, and unmarks the build when it exits', async () => {
    // The rebuilds are of another src/ into the same dist/ (a `git pull` and a build): what they
    // bundle does not matter to what they remove, and a small one builds in a fraction of the time.
    const rebuilder = checkout({ src: 'small', dist: join(dir, 'dist') });
    onTestFinished(() => rmSync(rebuilder, { recursive: true, force: true }));
    const running = builds(dir).at(-1)!;
    const port = await freePort();
    const base = `http://127.0.0.1:${port}`;
    const server = launch(process.execPath, [join(dir, 'bin/keel.js'), 'start'], { DATA_DIR: join(dir, 'data'), PORT: String(port), LOG_LEVEL: 'warn' });
    try {
      await healthy(server, base);
      // The mark names the process beyond its pid (a reused pid is not it): scripts/build-record.mjs.
      const [boot, namespace] = processIdentity().split(' ');
      expect(readFileSync(join(dir, 'dist', 'builds', running, runningMark(server.pid)), 'utf8')).toBe(`${boot} ${namespace} ${startTime(server.pid)}`);
      for (let i = 0; i < 3; i++) await build(rebuilder);
      // /docs loads its page's modules on its first request: from the server's own build, still there.
      expect(builds(dir)).toContain(running);
      expect((await fetch(`${base}/docs/`)).status).toBe(200);
    } finally {
      server.process.kill('SIGTERM');
      await server.ended;
    }
    expect(readdirSync(join(dir, 'dist', 'builds', running))).not.toContain(runningMark(server.pid));
  }, 180_000);

  it('is not run by bin/keel.js once src/ or the installed packages are newer than it: src/ is, through tsx', async () => {
    // A bundle that cannot run: bin/keel.js fails while it takes the bundle, and answers once it takes src/.
    const newest = builds(dir).at(-1)!;
    writeFileSync(join(dir, 'dist', 'builds', newest, 'main.js'), 'throw new Error("the bundle ran");\n');
    const help = () => run(process.execPath, ['bin/keel.js', '--help'], { cwd: dir });
    await expect(help()).rejects.toThrow('the bundle ran');
    // A package installed since (`npm install <package>` does not rebuild): npm rewrites its install record.
    writeFileSync(join(dir, 'node_modules', '.package-lock.json'), '{"installed": "since"}');
    expect((await help()).stdout).toContain('Usage: keel');
    // Built again: the bundle is taken again.
    await build(dir);
    expect((await help()).stdout).toContain('Usage: keel');
    writeFileSync(join(dir, 'dist', 'builds', builds(dir).at(-1)!, 'main.js'), 'throw new Error("the bundle ran");\n');
    await expect(help()).rejects.toThrow('the bundle ran');
  }, 120_000);

  it('fails on a syntax error in a module nothing imports, and leaves dist/ as it was', async () => {
    const own = checkout({ src: 'small' });
    try {
      await build(own);
      const before = { built: readFileSync(join(own, 'dist', '.built'), 'utf8'), builds: builds(own) };
      writeFileSync(join(own, 'src', 'modules', 'not-imported-yet.ts'), 'export const half = ;\n');
      const failed: unknown = await build(own).catch((error: unknown) => error);
      expect(String((failed as { stderr?: string }).stderr)).toContain('src/modules/not-imported-yet.ts');
      expect({ built: readFileSync(join(own, 'dist', '.built'), 'utf8'), builds: builds(own) }).toEqual(before);
      expect(readdirSync(join(own, 'dist', 'builds')).filter((name) => name.startsWith('.building-'))).toEqual([]);
    } finally {
      rmSync(own, { recursive: true, force: true });
    }
  }, 120_000);
});
