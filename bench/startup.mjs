#!/usr/bin/env node
/* global process, console, setTimeout, performance */
// Start-up and memory of `npm start` as a new user runs it (defaults: ENVIRONMENT=local, pretty
// logs, embedded PGlite), for one or more checkouts, interleaved run by run so that a busy machine
// hits each alike.
//
//   node bench/startup.mjs [RUNS] [label=checkout-dir ...]     (default: 5 runs of this checkout)
//
// Per run and checkout: a fresh DATA_DIR; `npm start`; time until GET /health answers 200 (first
// start: initdb + migrations + first superuser); after IDLE_MS (10 s) at rest, the RSS of the server
// process (the node process that listens; npm itself is not counted) and of the whole process group;
// SIGTERM to the process group; then `npm start` again on the same DATA_DIR (restart) and the same
// measures. Also the CPU time (user + system) the server process and the whole group (npm too) had
// used when /health first answered: on a busy machine it varies far less than the wall-clock time. Prints one line per measure and the medians; add them to bench/RESULTS.md.
import { execFileSync,spawn } from 'node:child_process';
import { mkdtempSync, openSync, readFileSync, rmSync } from 'node:fs';
import { get } from 'node:http';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';

const args = process.argv.slice(2);
const runs = /^\d+$/.test(args[0] ?? '') ? Number(args.shift()) : 5;
const checkouts = args.length
  ? args.map((a) => {
      const [label, dir] = a.split('=');
      return { label, dir: resolve(dir) };
    })
  : [{ label: 'this', dir: resolve(import.meta.dirname, '..') }];
const IDLE_MS = Number(process.env.IDLE_MS ?? 10_000);
const TIMEOUT_MS = 120_000;

const sleep = (ms) => new Promise((done) => setTimeout(done, ms));

async function freePort() {
  const server = createServer();
  await new Promise((done) => server.listen(0, '127.0.0.1', done));
  const { port } = server.address();
  await new Promise((done) => server.close(done));
  return port;
}

function health(port) {
  return new Promise((done) => {
    const req = get({ host: '127.0.0.1', port, path: '/health', timeout: 1000 }, (res) => {
      res.resume();
      done(res.statusCode === 200);
    });
    req.on('error', () => done(false));
    req.on('timeout', () => req.destroy());
  });
}

/** RSS in MB of each process in the group: [{ pid, rss, command }]. */
function group(pgid) {
  const out = execFileSync('ps', ['-o', 'pid=,rss=,args=', '-g', String(pgid)], { encoding: 'utf8' });
  return out
    .trim()
    .split('\n')
    .filter(Boolean)
    .map((line) => {
      const [, pid, rss, command] = /^\s*(\d+)\s+(\d+)\s+(.*)$/.exec(line);
      return { pid: Number(pid), rss: Number(rss) / 1024, command };
    })
    .filter((p) => !p.command.startsWith('ps '));
}

/** The server: the node process running Keel's main or its launcher (not npm, not the shell npm runs it through). */
function serverProcess(processes) {
  return processes.find((p) => /^\S*node\s.*(main\.(ts|js)|bin\/keel\.js)\b/.test(p.command));
}

const TICKS_PER_SECOND = Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim());

/** CPU time (user + system) of a process so far, in ms; 0 once it is gone. */
function cpuMs(pid) {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return ((Number(fields[11]) + Number(fields[12])) * 1000) / TICKS_PER_SECOND;
  } catch {
    return 0;
  }
}

async function startOnce(dir, dataDir, port) {
  const started = performance.now();
  const log = openSync(`${dataDir}.log`, 'a');
  const child = spawn('npm', ['start'], {
    cwd: dir,
    detached: true,
    stdio: ['ignore', log, log],
    env: { PATH: process.env.PATH, HOME: process.env.HOME, DATA_DIR: dataDir, PORT: String(port), HOST: '127.0.0.1' },
  });
  let exited = false;
  child.on('exit', () => (exited = true));
  while (!(await health(port))) {
    if (exited) throw new Error(`npm start exited early in ${dir}:\n${readFileSync(`${dataDir}.log`, 'utf8').slice(-2000)}`);
    if (performance.now() - started > TIMEOUT_MS) throw new Error('no /health within the timeout');
    await sleep(25);
  }
  const ms = performance.now() - started;
  const atHealth = group(child.pid);
  const cpu = cpuMs(serverProcess(atHealth)?.pid ?? 0);
  const groupCpu = atHealth.reduce((sum, p) => sum + cpuMs(p.pid), 0);
  await sleep(IDLE_MS);
  const processes = group(child.pid);
  const server = serverProcess(processes);
  const total = processes.reduce((sum, p) => sum + p.rss, 0);
  process.kill(-child.pid, 'SIGTERM');
  const deadline = Date.now() + 30_000;
  while (Date.now() < deadline) {
    try {
      process.kill(-child.pid, 0);
    } catch {
      break;
    }
    await sleep(50);
  }
  try {
    process.kill(-child.pid, 'SIGKILL');
  } catch {
    // already gone
  }
  return { ms, cpu, groupCpu, rss: server?.rss ?? NaN, total };
}

const median = (values) => {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  return sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
};

const results = new Map(checkouts.map((c) => [c.label, { first: [], restart: [], cpuFirst: [], cpuRestart: [], groupCpuRestart: [], rssFirst: [], rssRestart: [], total: [] }]));
for (let run = 1; run <= runs; run++) {
  for (const { label, dir } of checkouts) {
    const dataDir = mkdtempSync(join(tmpdir(), 'keel-startup-'));
    try {
      const r = results.get(label);
      const first = await startOnce(dir, join(dataDir, 'data'), await freePort());
      const again = await startOnce(dir, join(dataDir, 'data'), await freePort());
      r.first.push(first.ms);
      r.restart.push(again.ms);
      r.cpuFirst.push(first.cpu);
      r.cpuRestart.push(again.cpu);
      r.groupCpuRestart.push(again.groupCpu);
      r.rssFirst.push(first.rss);
      r.rssRestart.push(again.rss);
      r.total.push(again.total);
      console.log(
        `run ${run} ${label}: first ${first.ms.toFixed(0)} ms (cpu ${first.cpu.toFixed(0)} ms, rss ${first.rss.toFixed(0)} MB), restart ${again.ms.toFixed(0)} ms (cpu ${again.cpu.toFixed(0)} ms, group cpu ${again.groupCpu.toFixed(0)} ms, rss ${again.rss.toFixed(0)} MB, group ${again.total.toFixed(0)} MB)`,
      );
    } finally {
      rmSync(dataDir, { recursive: true, force: true });
    }
  }
}
console.log(`\nmedians of ${runs} runs (load average now: ${readFileSync('/proc/loadavg', 'utf8').split(' ').slice(0, 3).join(' ')})`);
console.log('| checkout | first start to /health | restart to /health | CPU to /health, first start | CPU to /health, restart (server / with npm) | idle RSS after first start | idle RSS after restart | process group RSS |');
console.log('| --- | --- | --- | --- | --- | --- | --- | --- |');
for (const [label, r] of results) {
  console.log(
    `| ${label} | ${(median(r.first) / 1000).toFixed(2)} s | ${(median(r.restart) / 1000).toFixed(2)} s | ${(median(r.cpuFirst) / 1000).toFixed(2)} s | ${(median(r.cpuRestart) / 1000).toFixed(2)} / ${(median(r.groupCpuRestart) / 1000).toFixed(2)} s | ${median(r.rssFirst).toFixed(0)} MB | ${median(r.rssRestart).toFixed(0)} MB | ${median(r.total).toFixed(0)} MB |`,
  );
}
