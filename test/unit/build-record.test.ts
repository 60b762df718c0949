import { spawn } from 'node:child_process';
import { linkSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, utimesSync, writeFileSync } from 'node:fs';
import { hostname, tmpdir } from 'node:os';
import { join } from 'node:path';

import { afterEach, beforeEach, describe, expect, it } from 'vitest';

import { processIdentity } from '../../src/core/process-identity.mjs';

import { markInUse, markRunning, parseRunningMark, runningMark, UNCHECKABLE_MARK_MS } from '../../scripts/build-record.mjs';

// The marks bin/keel.js leaves in the build a process runs, as scripts/build.mjs reads them before it removes a build.
describe.runIf(process.platform === 'linux')('a build mark', () => {
  let dir: string;
  beforeEach(() => {
    dir = mkdtempSync(join(tmpdir(), 'keel-marks-'));
  });
  afterEach(() => rmSync(dir, { recursive: true, force: true }));

  const mark = (pid: number, text: string, ageMs = 0) => {
    const name = runningMark(pid);
    writeFileSync(join(dir, name), text);
    const at = new Date(Date.now() - ageMs);
    utimesSync(join(dir, name), at, at);
    return name;
  };
  const [boot, namespace, start] = processIdentity().split(' ');

  it("names this process's boot, pid namespace and start, which keep it in use while it lives", () => {
    expect(boot).toMatch(/^[0-9a-f-]{36}$/);
    expect(namespace).toMatch(/^pid:\[\d+\]$/);
    expect(Number(start)).toBeGreaterThan(0);
    expect(markInUse(dir, mark(process.pid, processIdentity()))).toBe(true);
  });

  it('does not keep a build for a later process given the same pid (pid 1 of the next container)', () => {
    expect(markInUse(dir, mark(process.pid, `${boot} ${namespace} ${Number(start) - 1}`))).toBe(false);
  });

  it('does not keep a build for a process that ended', async () => {
    const child = spawn(process.execPath, ['-e', '']);
    await new Promise((done) => child.on('exit', done));
    const identity = `${boot} ${namespace} ${start}`;
    expect(markInUse(dir, mark(child.pid!, identity))).toBe(false);
  });

  it('keeps a build a week for a process it cannot check: another pid namespace or boot (the same host name)', () => {
    const otherNamespace = `${boot} pid:[1] ${start}`;
    const otherBoot = `00000000-0000-0000-0000-000000000000 ${namespace} ${start}`;
    // A dead pid here, so only the mark's age can decide.
    for (const text of [otherNamespace, otherBoot]) {
      expect(markInUse(dir, mark(2 ** 22 + 1, text))).toBe(true);
      expect(markInUse(dir, mark(2 ** 22 + 1, text, UNCHECKABLE_MARK_MS + 60_000))).toBe(false);
    }
  });

  it('reads a mark without a whole identity (older, cut short, or where /proc tells none) by its pid alone', () => {
    for (const text of ['', `${boot} ${namespace}`]) {
      expect(markInUse(dir, mark(process.pid, text))).toBe(true);
      expect(markInUse(dir, mark(2 ** 22 + 1, text))).toBe(false);
    }
  });

  it("reads a mark it cannot read (another user's, a directory) by its pid alone, and does not fail; by its name's pid namespace and boot, one of elsewhere as one it cannot check", () => {
    mkdirSync(join(dir, runningMark(process.pid)));
    expect(markInUse(dir, runningMark(process.pid))).toBe(true);
    mkdirSync(join(dir, runningMark(2 ** 22 + 1)));
    expect(markInUse(dir, runningMark(2 ** 22 + 1))).toBe(false);
    // No process here has that pid; the name says the mark is another namespace's, or another kernel's: a week from its refresh.
    const elsewhere = [runningMark(2 ** 22 + 1).replace(/-ns\d+/, '-ns1'), runningMark(2 ** 22 + 1).replace(/-b[0-9a-f]+$/, '-b00000000')];
    for (const name of elsewhere) {
      mkdirSync(join(dir, name));
      expect(markInUse(dir, name)).toBe(true);
      utimesSync(join(dir, name), new Date(Date.now() - UNCHECKABLE_MARK_MS - 60_000), new Date(Date.now() - UNCHECKABLE_MARK_MS - 60_000));
      expect(markInUse(dir, name)).toBe(false);
    }
  });

  it("marks a build with this process's whole identity, apart from a process of its host name and pid in another pid namespace, and replaces a mark of its own name a process gone left", () => {
    const name = runningMark();
    expect(name).toMatch(new RegExp(`-${process.pid}-ns\\d+-b${boot!.slice(0, 8)}$`));
    expect(parseRunningMark(name)).toEqual({ host: hostname(), pid: process.pid, namespace: /\d+/.exec(namespace!)![0], boot: boot!.slice(0, 8) });
    // A process of this host name and pid in another pid namespace (a container sharing dist/) marked the build.
    const theirs = name.replace(/-ns\d+/, '-ns1');
    writeFileSync(join(dir, theirs), `${boot} pid:[1] ${start}`);
    markRunning(dir);
    expect(readFileSync(join(dir, name), 'utf8')).toBe(processIdentity());
    expect(readdirSync(dir).sort()).toEqual([name, theirs].sort());
    expect(markInUse(dir, theirs)).toBe(true);
    // A mark of this name an earlier process of this pid left (killed), and its draft, linked to it: replaced, not written through.
    rmSync(join(dir, theirs));
    writeFileSync(join(dir, name), `${boot} ${namespace} ${Number(start) - 1}`);
    linkSync(join(dir, name), join(dir, `.draft${name}`));
    markRunning(dir);
    expect(readFileSync(join(dir, name), 'utf8')).toBe(processIdentity());
    expect(readdirSync(dir)).toEqual([name]);
  });

  it('reads the names of older marks, without a pid namespace', () => {
    expect(parseRunningMark('.running-web-ns1-12')).toEqual({ host: 'web-ns1', pid: 12 });
    expect(parseRunningMark('.running-web-12-ns4026531836')).toEqual({ host: 'web', pid: 12, namespace: '4026531836' });
    expect(parseRunningMark('.running-web-2-12-ns4026531836-b0a1b2c3d')).toEqual({ host: 'web-2', pid: 12, namespace: '4026531836', boot: '0a1b2c3d' });
    expect(parseRunningMark('.draft.running-web-12')).toBeNull();
  });

  it('is not in use once gone, and is no mark unless named as one', () => {
    expect(markInUse(dir, runningMark(process.pid))).toBe(false);
    writeFileSync(join(dir, 'main.js'), '');
    expect(markInUse(dir, 'main.js')).toBe(false);
  });
});
