/* global process, setTimeout, fetch */
// What the benchmark scripts share: child processes (cleaned up on exit), waiting for a port,
// Keel's environment, signing in and adding the fake upstream as a provider and model, a database
// of its own on PostgreSQL, /proc readings and percentiles.
import { execFileSync, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { openSync, readdirSync, readFileSync } from 'node:fs';
import { resolve } from 'node:path';

export const PG_ADMIN_URL = process.env.PG_ADMIN_URL ?? 'postgres://postgres@127.0.0.1:5432/postgres';
export const SUPERUSER = { email: 'admin@bench.test', password: 'bench-superuser-password' };

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
/** Milliseconds, monotonic, sub-millisecond resolution. */
export const now = () => Number(process.hrtime.bigint()) / 1e6;

// ==================== Processes ====================

const children = [];
const databases = [];

function cleanup() {
  for (const child of children) if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM');
  for (const name of databases.splice(0)) dropDatabase(name);
}
process.on('exit', cleanup);
for (const signal of ['SIGINT', 'SIGTERM']) process.on(signal, () => process.exit(130));

/**
 * Starts `node <args>` with `env` over this process's environment, output to `<logDir>/<name>.log`;
 * `nodeArgs` (e.g. KEEL_NODE_ARGS="--cpu-prof --cpu-prof-dir=bench/out/prof") go before the script.
 * Keel (`bin/keel.js`) starts as its checkout's npm scripts start it: their environment and node
 * flags first (keelScript), then `env` and `nodeArgs`.
 */
export function start(logDir, name, args, env, { cwd, nodeArgs = [] } = {}) {
  const log = openSync(`${logDir}/${name}.log`, 'w');
  const npm = /(^|\/)bin\/keel\.js$/.test(args[0] ?? '') ? keelScript(cwd) : { env: {}, flags: [] };
  const child = spawn(process.execPath, [...npm.flags, ...nodeArgs, ...args], { cwd, env: { ...process.env, ...npm.env, ...env }, stdio: ['ignore', log, log] });
  children.push(child);
  return child;
}

/** SIGTERM to the children given (all when none), resolved once they have exited. */
export async function stop(which = children) {
  const running = which.filter((child) => child.exitCode === null && child.signalCode === null);
  await Promise.all(running.map((child) => new Promise((resolve) => {
    child.once('exit', resolve);
    child.kill('SIGTERM');
  })));
}

/**
 * How `npm start` and `npm run keel` start Keel in `checkout` (default: this one), from its
 * package.json's `keel` script (`[NAME=value ...] exec node [--flag ...] bin/keel.js`): the
 * environment it sets and the node flags it passes, so that what a bench measures runs as the
 * README has operators run it.
 */
export function keelScript(checkout = '.') {
  const { scripts } = JSON.parse(readFileSync(resolve(checkout, 'package.json'), 'utf8'));
  const match = /^((?:\w+=\S+ )*)exec node ((?:--\S+ )*)bin\/keel\.js$/.exec(scripts.keel ?? '');
  if (!match) throw new Error(`package.json's keel script is not "[NAME=value ...] exec node [--flag ...] bin/keel.js": ${scripts.keel}`);
  return { env: envPairs(match[1]), flags: match[2].split(' ').filter(Boolean) };
}

/** "NAME=value NAME=value" (whitespace-separated; a value may hold `=`) as an object. */
function envPairs(text) {
  return Object.fromEntries(text.split(/\s+/).filter(Boolean).map((pair) => [pair.slice(0, pair.indexOf('=')), pair.slice(pair.indexOf('=') + 1)]));
}

/** Node flags for Keel's processes from KEEL_NODE_ARGS (space-separated), e.g. to profile them; `start` puts its npm flags before them. */
export const keelNodeArgs = () => (process.env.KEEL_NODE_ARGS ?? '').split(/\s+/).filter(Boolean);

/** Waits until the log file `file` (of a process started with `start`) contains `text`. */
export async function waitForLog(file, text, timeoutMs = 60_000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    let content = '';
    try {
      content = readFileSync(file, 'utf8');
    } catch {
      // not yet
    }
    if (content.includes(text)) return;
    if (Date.now() > deadline) throw new Error(`${file}: no "${text}" within ${timeoutMs} ms`);
    await sleep(100);
  }
}

export async function waitUp(port, path = '/health') {
  // 3 minutes: a start on a machine shared with other benchmarks can take more than one.
  for (let i = 0; i < 720; i++) {
    try {
      const response = await fetch(`http://127.0.0.1:${port}${path}`);
      if (response.status < 500) return;
    } catch {
      // not yet
    }
    await sleep(250);
  }
  throw new Error(`nothing answers on port ${port}`);
}

// ==================== Keel ====================

/** KEEL_ENV="NAME=value ..." (space-separated): settings every bench gives Keel over its own (keelEnv). */
export const keelEnvOverrides = () => envPairs(process.env.KEEL_ENV ?? '');

/**
 * BASE_KEEL_ENV="NAME=value ...": settings for the `-base` servers only (over KEEL_ENV), so an A/B of
 * settings runs both in the same rounds (BASE_CHECKOUT may be a copy of the same tree).
 */
export const baseKeelEnvOverrides = () => envPairs(process.env.BASE_KEEL_ENV ?? '');

/** Keel's environment as a user runs it (JSON logs at info, billing on), on `port`; then `extra`, KEEL_ENV and (`base`) BASE_KEEL_ENV. */
export const keelEnv = (port, extra, { base = false } = {}) => ({
  ENVIRONMENT: 'local',
  SECRET_KEY: randomBytes(32).toString('hex'),
  FIRST_SUPERUSER: SUPERUSER.email,
  FIRST_SUPERUSER_PASSWORD: SUPERUSER.password,
  LOG_FORMAT: 'json',
  LOG_LEVEL: 'info',
  HOST: '127.0.0.1',
  PORT: String(port),
  REDIS_URL: '',
  // Metered and paid for: credit holds and settlements on every model call.
  BILLING_ENABLED: 'true',
  ...extra,
  ...keelEnvOverrides(),
  ...(base ? baseKeelEnvOverrides() : {}),
});

/** fetch that throws with the answer on a non-2xx and parses JSON. */
export async function json(url, init) {
  const response = await fetch(url, init);
  const text = await response.text();
  if (!response.ok) throw new Error(`${init?.method ?? 'GET'} ${url}: ${response.status} ${text}`);
  return text ? JSON.parse(text) : null;
}

/** An API client of Keel on `port` for `token` (a JWT or an API key). */
export function client(port, token) {
  const base = `http://127.0.0.1:${port}/api/v1`;
  const headers = { authorization: `Bearer ${token}`, 'content-type': 'application/json' };
  const call = (method, path, body) => json(`${base}${path}`, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  return { base, token, headers, call };
}

export async function signIn(port, email, password) {
  const { access_token } = await json(`http://127.0.0.1:${port}/api/v1/login/access-token`, {
    method: 'POST',
    headers: { 'content-type': 'application/x-www-form-urlencoded' },
    body: `username=${encodeURIComponent(email)}&password=${encodeURIComponent(password)}`,
  });
  return client(port, access_token);
}

/** As the superuser: adds `upstream` (…/v1) as an openai-compatible provider and `model` on it; returns the superuser's client. */
export async function addUpstreamModel(port, upstream, model) {
  const admin = await signIn(port, SUPERUSER.email, SUPERUSER.password);
  await admin.call('POST', '/providers', { name: 'bench', kind: 'openai-compatible', base_url: upstream, api_key: 'sk-bench' });
  await admin.call('POST', '/models', { id: model, provider: 'bench', capabilities: ['chat'], pricing: { input_cost_per_million_tokens: '0.4', output_cost_per_million_tokens: '1.6' } });
  return admin;
}

/** As the superuser: gives `userId` credits (billing is on, every call holds and settles). */
export const addCredits = (admin, userId, amount = '1000000') => admin.call('POST', '/billing/credits', { user_id: userId, amount, description: 'bench' });

// ==================== PostgreSQL ====================

/**
 * Creates a database of the bench's own (dropped at exit), its name after BENCH_DB_PREFIX (benches
 * sharing a server keep to names of their own); returns its URL.
 */
export function createDatabase(base) {
  const name = `${process.env.BENCH_DB_PREFIX ?? ''}${base}`;
  execFileSync('psql', ['-w', PG_ADMIN_URL, '-qc', `create database "${name}"`]);
  databases.push(name);
  return `${PG_ADMIN_URL.replace(/\/[^/]*$/, '')}/${name}`;
}

export function dropDatabase(name) {
  try {
    execFileSync('psql', ['-w', PG_ADMIN_URL, '-qc', `drop database if exists "${name}" with (force)`], { stdio: 'ignore' });
  } catch {
    // best effort
  }
}

// ==================== Readings ====================

/** CPU time (user + system) a process has used, in ms; 0 once it is gone. */
export function cpuMs(pid, tid) {
  if (!pid) return 0;
  try {
    const stat = readFileSync(tid ? `/proc/${pid}/task/${tid}/stat` : `/proc/${pid}/stat`, 'utf8');
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return ((Number(fields[11]) + Number(fields[12])) * 1000) / 100; // utime + stime, 100 Hz ticks
  } catch {
    return 0;
  }
}

/** The machine's busy and total CPU time so far (all cores, /proc/stat's ticks). */
function machineTicks() {
  const [, ...fields] = readFileSync('/proc/stat', 'utf8').split('\n', 1)[0].trim().split(/\s+/).map(Number);
  const idle = fields[3] + fields[4]; // idle + iowait
  const total = fields.reduce((sum, n) => sum + n, 0);
  return { busy: total - idle, total };
}

/**
 * Waits until the machine is quiet: under `busyShare` of its CPU busy over `windowMs`, or
 * `maxMs` passed. Between two measurements, what the last target left running (PGlite flushing
 * the usage rows a 64-client burst queued, PostgreSQL's autovacuum after it) would otherwise run
 * during the next target's measurement, against whichever target follows it. Returns the ms waited.
 */
export async function settle({ busyShare = 0.15, windowMs = 250, maxMs = 15_000 } = {}) {
  const started = Date.now();
  for (;;) {
    const before = machineTicks();
    await sleep(windowMs);
    const after = machineTicks();
    const share = (after.busy - before.busy) / Math.max(1, after.total - before.total);
    if (share < busyShare || Date.now() - started >= maxMs) return Date.now() - started;
  }
}

/** CPU ms so far of a process's main thread (its JavaScript; not V8's helpers nor worker threads). */
export const mainThreadCpuMs = (pid) => cpuMs(pid, pid);

/**
 * Counters of a process's main thread (its event loop): `wakeups`, the times it blocked and was
 * woken (voluntary context switches), and `syscalls`, its read and write system calls (those of
 * /proc/<pid>/io, the whole process's). Zeros once it is gone.
 */
export function loopCounters(pid) {
  try {
    const status = readFileSync(`/proc/${pid}/task/${pid}/status`, 'utf8');
    const io = readFileSync(`/proc/${pid}/io`, 'utf8');
    const field = (text, name) => Number(new RegExp(`${name}:\\s+(\\d+)`).exec(text)?.[1] ?? 0);
    return { wakeups: field(status, 'voluntary_ctxt_switches'), syscalls: field(io, 'syscr') + field(io, 'syscw') };
  } catch {
    return { wakeups: 0, syscalls: 0 };
  }
}

/**
 * A process's threads' scheduler times in ms, from /proc/<pid>/task/<tid>/schedstat: `run`, on a
 * CPU, and `wait`, runnable but waiting for one (the run queue), summed over its threads; `main`
 * the same for its main thread alone. Zeros once it is gone.
 */
export function schedMs(pid) {
  const sum = { run: 0, wait: 0, main: { run: 0, wait: 0 } };
  let tids;
  try {
    tids = readdirSync(`/proc/${pid}/task`);
  } catch {
    return sum;
  }
  for (const tid of tids) {
    try {
      const [run, wait] = readFileSync(`/proc/${pid}/task/${tid}/schedstat`, 'utf8').split(' ').map((v) => Number(v) / 1e6);
      sum.run += run;
      sum.wait += wait;
      if (tid === String(pid)) sum.main = { run, wait };
    } catch {
      // the thread ended
    }
  }
  return sum;
}

/** Resident memory of a process in MB. */
export function rssMb(pid) {
  return Number(/VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))[1]) / 1024;
}

export const percentile = (sorted, p) => sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];

export const median = (values) => {
  const sorted = values.filter((v) => Number.isFinite(v)).sort((a, b) => a - b);
  if (!sorted.length) return NaN;
  const mid = Math.floor(sorted.length / 2);
  return sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
};

export const fmt = (v, digits = 2) => (Number.isFinite(v) ? v.toFixed(digits) : '–');
