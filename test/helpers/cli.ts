import { type ChildProcess, spawn } from 'node:child_process';

import { expect } from 'vitest';

import { freePort, KEEL, ROOT } from './process.js';

export const ADMIN_EMAIL = 'cli-admin@keel.test';
export const ADMIN_PASSWORD = 'cli-admin-password';

export interface Exited {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

export interface Keel {
  child: ChildProcess;
  exited: Promise<Exited>;
  output: () => { stdout: string; stderr: string };
}

export interface Server extends Keel {
  base: string;
}

/**
 * The `keel` command line on one data directory (cli*.test.ts): every child runs with an
 * environment of nothing inherited but PATH and HOME, so the run's DATABASE_URL and REDIS_URL
 * never leak in, and runs embedded on `dataDir` unless a test says otherwise.
 */
export function cliOn(dataDir: string) {
  const children = new Set<ChildProcess>();

  const environment = (overrides: Record<string, string>): NodeJS.ProcessEnv => ({
    PATH: process.env.PATH,
    HOME: process.env.HOME,
    ENVIRONMENT: 'local',
    DATA_DIR: dataDir,
    DATABASE_URL: '',
    REDIS_URL: '',
    HOST: '127.0.0.1',
    LOG_FORMAT: 'json',
    LOG_LEVEL: 'info',
    FIRST_SUPERUSER: ADMIN_EMAIL,
    FIRST_SUPERUSER_PASSWORD: ADMIN_PASSWORD,
    SHUTDOWN_TIMEOUT_MS: '20000',
    ...overrides,
  });

  const keel = (args: string[], env: Record<string, string> = {}, stdin?: string): Keel => {
    const child = spawn(process.execPath, [KEEL, ...args], {
      cwd: ROOT,
      env: environment(env),
      stdio: [stdin === undefined ? 'ignore' : 'pipe', 'pipe', 'pipe'],
    });
    if (stdin !== undefined) child.stdin!.end(stdin);
    children.add(child);
    let stdout = '';
    let stderr = '';
    child.stdout!.on('data', (chunk: Buffer) => (stdout += chunk.toString('utf8')));
    child.stderr!.on('data', (chunk: Buffer) => (stderr += chunk.toString('utf8')));
    const exited = new Promise<Exited>((done) => {
      child.on('close', (code, signal) => {
        children.delete(child);
        done({ code, signal, stdout, stderr });
      });
    });
    return { child, exited, output: () => ({ stdout, stderr }) };
  };

  /** Runs a CLI command to its end. */
  const run = (args: string[], env: Record<string, string> = {}, stdin?: string): Promise<Exited> => keel(args, env, stdin).exited;

  /**
   * Runs a command at a terminal (a pseudo-terminal from `script`), typing each answer once the
   * output ends with its prompt; resolves with everything the terminal showed.
   */
  const atTerminal = async (args: string[], env: Record<string, string>, answers: [RegExp, string][]): Promise<{ code: number | null; screen: string }> => {
    const quoted = [process.execPath, KEEL, ...args].map((a) => `'${a.replace(/'/g, `'\\''`)}'`).join(' ');
    const child = spawn('script', ['-qfec', quoted, '/dev/null'], { cwd: ROOT, env: environment(env), stdio: ['pipe', 'pipe', 'pipe'] });
    children.add(child);
    let screen = '';
    const pending = [...answers];
    child.stdout.on('data', (chunk: Buffer) => {
      screen += chunk.toString('utf8');
      const next = pending[0];
      if (next && next[0].test(screen)) {
        pending.shift();
        screen += '\u0000';
        child.stdin.write(`${next[1]}\r`);
      }
    });
    const code = await new Promise<number | null>((done) => child.on('close', (exit) => done(exit)));
    children.delete(child);
    return { code, screen };
  };

  /** `keel start` (or `keel ...args`) on a free port; resolves once /health answers. */
  const start = async (env: Record<string, string> = {}, args: (port: number) => string[] = () => ['start']): Promise<Server> => {
    const port = await freePort();
    const server = keel(args(port), { PORT: String(port), ...env });
    const base = `http://127.0.0.1:${port}`;
    let exited: Exited | null = null;
    void server.exited.then((result) => (exited = result));
    const deadline = Date.now() + 150_000;
    for (;;) {
      if (exited) throw new Error(`keel start exited early: ${JSON.stringify(exited)}`);
      try {
        const response = await fetch(`${base}/health`);
        if (response.status === 200) return { ...server, base };
      } catch {
        // Not listening yet.
      }
      if (Date.now() > deadline) {
        // Not left behind holding the data directory's lock for the next test.
        server.child.kill('SIGKILL');
        throw new Error(`keel start did not answer /health: ${JSON.stringify(server.output())}`);
      }
      await new Promise((done) => setTimeout(done, 100));
    }
  };

  /** SIGKILLs what a test left running (for afterAll). */
  const killLeftovers = () => {
    for (const child of children) if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  };

  return { keel, run, atTerminal, start, killLeftovers };
}

export async function stop(server: Keel): Promise<Exited> {
  server.child.kill('SIGTERM');
  return server.exited;
}

export async function login(base: string, username: string, password: string): Promise<Response> {
  return fetch(`${base}/api/v1/login/access-token`, {
    method: 'POST',
    headers: { 'content-type': 'application/x-www-form-urlencoded' },
    body: new URLSearchParams({ username, password }),
  });
}

export async function token(base: string, username = ADMIN_EMAIL, password = ADMIN_PASSWORD): Promise<string> {
  const response = await login(base, username, password);
  expect(response.status).toBe(200);
  return ((await response.json()) as { access_token: string }).access_token;
}

/** Whether `email` logs in with `password` and is a superuser. */
export async function isSuperuser(base: string, email: string, password: string): Promise<boolean> {
  const response = await fetch(`${base}/api/v1/users/me`, { headers: { authorization: `Bearer ${await token(base, email, password)}` } });
  return ((await response.json()) as { is_superuser: boolean }).is_superuser;
}

export function jsonLines(stdout: string): Record<string, unknown>[] {
  return stdout
    .split('\n')
    .filter(Boolean)
    .map((line) => JSON.parse(line) as Record<string, unknown>);
}
