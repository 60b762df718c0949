/**
 * A scaled deployment made of real processes for the tests that run one: its own PostgreSQL
 * database (from the template), its own Redis key prefix, a fake model server, and the environment
 * every `keel api` and `keel worker` node of it shares; what starts, reads and stops those nodes.
 */
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { inject } from 'vitest';

import { testRedisPrefix } from './app.js';
import { FakeModelServer } from './fake-model-server.js';
import { eventually } from './http.js';
import { adminQuery, databaseUrl } from './postgres.js';
import { type Child, freePort, healthy, keel, killLeftovers } from './process.js';

export interface ApiNode {
  child: Child;
  base: string;
}

export interface ScaledDeployment {
  fake: FakeModelServer;
  dbUrl: string;
  keyPrefix: string;
  env: Record<string, string>;
  /** A `keel api` node, once it answers /health. */
  startApi(): Promise<ApiNode>;
  /** A `keel worker`, once it takes jobs. */
  startWorker(): Promise<Child>;
  /** A run's row as the database has it (who holds it). */
  runRow(runId: string): Promise<{ status: string; lease_owner: string | null; attempts: number }>;
  /** Stops the nodes still running (SIGTERM), the fake server, and drops the database. */
  close(nodes: Child[]): Promise<void>;
}

/** Sends `signal`; how the node exited. */
export function stopNode(child: Child, signal: NodeJS.Signals): Child['ended'] {
  child.process.kill(signal);
  return child.ended;
}

/** The deployment's parts (`name` names its database and scratch dir); `env` adds to or overrides the nodes' settings. */
export async function scaledDeployment(adminUrl: string, redisUrl: string, name: string, env: Record<string, string>): Promise<ScaledDeployment> {
  const scratch = mkdtempSync(join(tmpdir(), `keel-${name}-`));
  const fake = await FakeModelServer.start();
  const dbName = `${inject('runPrefix')}_${name}_${randomBytes(4).toString('hex')}`;
  await adminQuery(adminUrl, `create database "${dbName}" template "${inject('templateDatabase')!}"`);
  const dbUrl = databaseUrl(adminUrl, dbName);
  const keyPrefix = testRedisPrefix();
  const nodeEnv: Record<string, string> = {
    ENVIRONMENT: 'local',
    DATA_DIR: scratch,
    DATABASE_URL: dbUrl,
    REDIS_URL: redisUrl,
    REDIS_KEY_PREFIX: keyPrefix,
    // Every node seals and opens the same jobs.
    SECRET_KEY: randomBytes(32).toString('hex'),
    HOST: '127.0.0.1',
    LOG_FORMAT: 'json',
    LOG_LEVEL: 'info',
    OPENAI_API_KEY: 'sk-fake',
    OPENAI_BASE_URL: fake.url,
    // A dead worker's run is taken up within seconds: a 2 s lease, swept every second.
    RUN_LEASE_SECONDS: '2',
    RUN_SWEEP_INTERVAL_SECONDS: '1',
    SHUTDOWN_TIMEOUT_MS: '10000',
    ...env,
  };
  return {
    fake,
    dbUrl,
    keyPrefix,
    env: nodeEnv,
    async startApi() {
      const port = await freePort();
      const child = keel(['api'], { ...nodeEnv, PORT: String(port) });
      const base = `http://127.0.0.1:${port}`;
      await healthy(child, base, 60_000);
      return { child, base };
    },
    async startWorker() {
      const child = keel(['worker'], nodeEnv);
      await eventually(async () => {
        if (child.done()) throw new Error(`worker exited:\n${child.out()}\n${child.err()}`);
        return child.out().includes('worker started');
      }, 60_000);
      return child;
    },
    async runRow(runId) {
      const [row] = await adminQuery<{ status: string; lease_owner: string | null; attempts: number }>(dbUrl, 'select status, lease_owner, attempts from runs where id = $1', [runId]);
      return row!;
    },
    async close(nodes) {
      await Promise.all(nodes.filter((child) => !child.done()).map(async (child) => stopNode(child, 'SIGTERM')));
      killLeftovers();
      await fake.close();
      await adminQuery(adminUrl, `drop database if exists "${dbName}" with (force)`);
      rmSync(scratch, { recursive: true, force: true });
    },
  };
}
