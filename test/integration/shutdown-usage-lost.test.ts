/**
 * `keel api` stopped (SIGTERM) while its usage records are still in memory, the database gone and
 * DATA_DIR unable to hold them (usage-unwritten cannot be made there): the records are lost, and
 * the process says so — its last log line how many and why — and exits 1. It exited 0 after a
 * line in the middle of the shutdown's, as if nothing had been lost.
 */
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { afterAll, describe, expect, inject, it } from 'vitest';

import { FakeModelServer } from '../helpers/fake-model-server.js';
import { adminQuery, databaseUrl } from '../helpers/postgres.js';
import { freePort, healthy, keel, killLeftovers } from '../helpers/process.js';
import { userWithAgent } from '../helpers/runs.js';

const adminUrl = process.env.DATABASE_URL;
const MODEL = 'gpt-4.1';
const PASSWORD = 'usage-lost-password';

describe.runIf(Boolean(adminUrl))('usage neither written nor saved at shutdown', () => {
  const scratch = mkdtempSync(join(tmpdir(), 'keel-usage-lost-'));
  const dbName = `${inject('runPrefix')}_usage_lost_${randomBytes(4).toString('hex')}`;
  afterAll(async () => {
    killLeftovers();
    await adminQuery(adminUrl!, `drop database if exists "${dbName}" with (force)`);
    rmSync(scratch, { recursive: true, force: true });
  });

  it('exits 1, its last line saying how many records were lost and why', { timeout: 120_000 }, async () => {
    const fake = await FakeModelServer.start();
    try {
      await adminQuery(adminUrl!, `create database "${dbName}" template "${inject('templateDatabase')!}"`);
      const port = await freePort();
      const child = keel(['api'], {
        ENVIRONMENT: 'local',
        DATA_DIR: scratch,
        DATABASE_URL: databaseUrl(adminUrl!, dbName),
        SECRET_KEY: randomBytes(32).toString('hex'),
        HOST: '127.0.0.1',
        PORT: String(port),
        LOG_FORMAT: 'json',
        LOG_LEVEL: 'info',
        FIRST_SUPERUSER: 'admin@usage-lost.test',
        FIRST_SUPERUSER_PASSWORD: PASSWORD,
        OPENAI_API_KEY: 'sk-fake',
        OPENAI_BASE_URL: fake.url,
        // The records stay in memory until the shutdown.
        USAGE_FLUSH_INTERVAL_MS: '600000',
      });
      const base = `http://127.0.0.1:${port}`;
      await healthy(child, base, 60_000);
      const headers = await userWithAgent(base, 'user@usage-lost.test', PASSWORD, MODEL);
      for (let i = 0; i < 3; i++) {
        const answered = await fetch(`${base}/v1/chat/completions`, { method: 'POST', headers: { ...headers, 'content-type': 'application/json' }, body: JSON.stringify({ model: MODEL, messages: [{ role: 'user', content: 'hi' }] }) });
        expect(answered.status).toBe(200);
      }
      // No room for the save: a file where its directory would be (as a full disk, it refuses the save).
      writeFileSync(join(scratch, 'usage-unwritten'), '');
      await adminQuery(adminUrl!, `alter database "${dbName}" allow_connections false`);
      await adminQuery(adminUrl!, 'select pg_terminate_backend(pid) from pg_stat_activity where datname = $1', [dbName]);

      child.process.kill('SIGTERM');
      const { code } = await child.ended;
      const lines = child
        .out()
        .trim()
        .split('\n')
        .map((line) => JSON.parse(line) as { msg: string });
      expect(code, child.out()).toBe(1);
      expect(lines.at(-1)!.msg).toMatch(
        new RegExp(`^shutdown lost usage: 3 usage records, \\d+ charges and \\d+ credit block releases are lost: the database would not take them and they could not be saved under ${join(scratch, 'usage-unwritten')}: EEXIST$`),
      );
    } finally {
      await fake.close();
    }
  });
});
