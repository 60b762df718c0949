/**
 * What one usage flush costs on the event loop: `insertUsage` and `settleMany` statements, and
 * `writeUsage` (both in one statement), of
 * BATCHES rows (default "8 32 128") on a file-backed PGlite on this thread (as `keel start` runs
 * it), or DATABASE_URL's PostgreSQL; this process's CPU time per statement and per row (on
 * PGlite: how long the event loop is held), and on PostgreSQL also the server's (its backends'
 * CPU time from /proc/<pid>/schedstat, when the server runs on this machine), medians of ROUNDS.
 *   npx tsx bench/flush-cost.ts
 */
import { randomBytes, randomUUID } from 'node:crypto';
import { mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import pino from 'pino';

import { loadSettings } from '../src/core/config.js';
import { openDatabase } from '../src/core/db.js';
import { migrateUp } from '../src/core/migrate.js';

import * as billing from '../src/crud/billing.js';
import { createUser } from '../src/services/user-service.js';

const BATCHES = (process.env.BATCHES ?? '8 32 128').split(/\s+/).filter(Boolean).map(Number);
const ROUNDS = Number(process.env.ROUNDS ?? 30);
const settings = loadSettings({ ENVIRONMENT: 'local', SECRET_KEY: randomBytes(32).toString('hex'), DATA_DIR: mkdtempSync(join(tmpdir(), 'keel-flush-')), DATABASE_URL: process.env.DATABASE_URL ?? '', LOG_LEVEL: 'silent' });
const database = await openDatabase(settings);
await migrateUp(database, pino({ level: 'silent' }));
const { db } = database;
const user = await createUser(db, { email: `flush-${randomBytes(4).toString('hex')}@keel.test`, password: 'bench-password', full_name: null, is_active: true, is_superuser: false });
await billing.changeBalance(db, { userId: user.id, type: 'grant', amount: '1000000', description: 'bench', createdBy: user.id });
const block = randomUUID();
await billing.hold(db, { id: block, userId: user.id, apiKeyId: null, accountAmount: '100', keyAmount: null, ttlSeconds: 900 });

const row = () => {
  const now = new Date().toISOString();
  return billing.usageRowJson({ id: randomUUID(), created_at: now, owner_id: user.id, api_key_id: null, project_id: null, agent_id: null, run_id: null, model: 'bench-model', provider: 'bench', operation: 'chat', input_tokens: 12, cached_input_tokens: 0, cache_write_tokens: 0, output_tokens: 5, reasoning_tokens: 0, cost: '0.0000128', latency_ms: 1, time_to_first_token_ms: null, status: 'success', error: null, estimated: false, attempts: 1, started_at: now, charge_key: true });
};
const settlement = (): billing.Settlement => {
  const s: billing.Settlement = { reservationId: block, release: '0.0000128', userId: user.id, apiKeyId: null, projectId: null, cost: '0.0000128', chargeAccount: true, chargeKey: false, usageRecordId: randomUUID(), description: 'chat bench-model' };
  s.json = billing.settlementJson(s);
  return s;
};
// The server's backends for this database (the pool's connections, opened by the statements above).
const backends =
  database.kind === 'postgres'
    ? (await database.withSession((s) => s.query<{ pid: number }>(`select pid from pg_stat_activity where datname = current_database() and application_name = 'keel'`))).map((r) => r.pid)
    : [];
/** CPU time the server's backends have used, ms (0 where /proc does not show them: another machine). */
const serverMs = () =>
  backends.reduce((sum, pid) => {
    try {
      return sum + Number(readFileSync(`/proc/${pid}/schedstat`, 'utf8').split(' ')[0]) / 1e6;
    } catch {
      return sum;
    }
  }, 0);
const cpuMs = (since: NodeJS.CpuUsage) => {
  const { user, system } = process.cpuUsage(since);
  return (user + system) / 1000;
};
const median = (v: number[]) => v.sort((a, b) => a - b)[Math.floor(v.length / 2)]!;
/** Runs `work`, adding this process's CPU ms to `client` and the server's to `server`. */
const measure = async (work: () => Promise<unknown>, client: number[], server: number[]) => {
  // CPU time of this process (PGlite runs on this thread): what the event loop is held for, whatever the machine's load.
  const [t, s] = [process.cpuUsage(), serverMs()];
  await work();
  client.push(cpuMs(t));
  server.push(serverMs() - s);
};
const onServer = backends.length > 0;
console.log(`${database.kind}; ${ROUNDS} rounds${onServer ? '; CPU ms as this process + the server' : ''}`);
console.log('| rows | insertUsage CPU ms | µs/row | settleMany CPU ms | µs/row | writeUsage (both, one statement) CPU ms | µs/row |');
console.log('| --- | --- | --- | --- | --- | --- | --- |');
const cell = (client: number[], server: number[], n: number) => {
  const [c, s] = [median(client), median(server)];
  return `${onServer ? `${c.toFixed(2)} + ${s.toFixed(2)}` : c.toFixed(2)} | ${(((c + s) * 1000) / n).toFixed(0)}`;
};
for (const n of BATCHES) {
  const m = Array.from({ length: 6 }, (): number[] => []);
  for (let r = 0; r < ROUNDS; r++) {
    const rows = Array.from({ length: n }, row);
    const settlements = Array.from({ length: n }, settlement);
    await measure(() => billing.insertUsage(db, rows), m[0]!, m[1]!);
    await measure(() => billing.settleMany(db, settlements), m[2]!, m[3]!);
    const [more, moreSettlements] = [Array.from({ length: n }, row), Array.from({ length: n }, settlement)];
    await measure(() => billing.writeUsage(db, more, moreSettlements), m[4]!, m[5]!);
  }
  console.log(`| ${n} | ${cell(m[0]!, m[1]!, n)} | ${cell(m[2]!, m[3]!, n)} | ${cell(m[4]!, m[5]!, n)} |`);
}
await database.close();
