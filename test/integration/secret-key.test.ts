import { spawnSync } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { afterAll, afterEach, describe, expect, it } from 'vitest';

import { loadSettings } from '../../src/core/config.js';

import { killLeftovers, launch } from '../helpers/process.js';

const scratch = mkdtempSync(join(tmpdir(), 'keel-secret-key-'));
afterAll(() => rmSync(scratch, { recursive: true, force: true }));
afterEach(killLeftovers);

/** Node arguments that run `script` (an ES module) with src/ loaded through tsx. */
const node = (script: string, ...args: string[]) => ['--import', 'tsx', '--input-type=module', '-e', `import { loadSettings } from './src/core/config.ts'; ${script}`, ...args];

// strace can hold a chosen write back, which opens the moment between a key file's creation and its
// content at will; where it is missing (or ptrace is not allowed) only the free race below runs.
const strace = spawnSync('strace', ['-qq', '-o', '/dev/null', 'true']).status === 0;

describe('the local .secret_key of a fresh data dir, with two processes starting together', () => {
  it.skipIf(!strace)('is never read before it is written: a process starting while the first one writes the key uses that key or wins with its own, which the first then uses', async () => {
    for (let round = 0; round < 3; round++) {
      const dataDir = join(scratch, `held-${round}`);
      const file = join(dataDir, '.secret_key');
      // Every write to the key file itself waits 1.5 s; the first process's key is written elsewhere first,
      // or this held write is the moment the second process reads it.
      const first = launch(
        'strace',
        ['-f', '-qq', '-o', '/dev/null', '-P', file, '-e', 'trace=write', '-e', 'inject=write:delay_enter=1500ms', process.execPath, ...node('process.stdout.write(loadSettings({ DATA_DIR: process.argv[1] }).SECRET_KEY);', dataDir)],
        {},
      );
      // The second starts once the first has begun writing into the directory.
      while (!readdirSync(scratch).includes(`held-${round}`) || readdirSync(dataDir).length === 0) {
        if (first.done()) throw new Error(`the first process ended early: ${first.err()}`);
        await new Promise((done) => setTimeout(done, 2));
      }
      const second = loadSettings({ DATA_DIR: dataDir }).SECRET_KEY;
      expect((await first.ended).code, first.err()).toBe(0);
      expect(second.length).toBeGreaterThanOrEqual(32);
      expect(first.out()).toBe(second);
      expect(readFileSync(file, 'utf8')).toBe(second);
      // No draft is left beside it.
      expect(readdirSync(dataDir)).toEqual(['.secret_key']);
    }
  }, 60_000);

  it('gives both the same key, many times over', async () => {
    const rounds = 300;
    // Each process takes the fresh data dirs one by one at the same wall-clock moments (2 ms apart after a
    // common start), spinning rather than sleeping to be there on time.
    const race = `
      import { join } from 'node:path';
      const [base, start, rounds] = process.argv.slice(1);
      const keys = [];
      for (let i = 0; i < Number(rounds); i++) {
        while (performance.timeOrigin + performance.now() < Number(start) + i * 2);
        try { keys.push(loadSettings({ DATA_DIR: join(base, String(i)) }).SECRET_KEY); } catch (error) { keys.push(error.message); }
      }
      process.stdout.write(JSON.stringify(keys));`;
    const base = join(scratch, 'raced');
    // Time enough for both to load the code first.
    const start = String(Date.now() + 5_000);
    const racers = [0, 1].map(() => launch(process.execPath, node(race, base, start, String(rounds)), {}));
    for (const racer of racers) expect((await racer.ended).code, racer.err()).toBe(0);
    const [a, b] = racers.map((racer) => JSON.parse(racer.out()) as string[]);
    const differing = a!.flatMap((key, i) => (key === b![i] && key.length >= 32 ? [] : [`${i}: ${key} / ${b![i]}`]));
    expect(differing).toEqual([]);
  }, 60_000);
});
