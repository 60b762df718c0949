/**
 * What one usage flush costs on the event loop: `insertUsage` and `settleMany` statements, and
 * `writeUsage` (both in one statement), of
 * BATCHES rows (default "8 32 128") on a file-backed PGlite on this thread (as `keel start` runs
 * it), or DATABASE_URL's PostgreSQL (then only the client's part); this process's CPU time per
 * statement and per row (on PGlite: how long the event loop is held), medians of ROUNDS.
 *   npx tsx bench/flush-cost.ts
 */
import { randomBytes, randomUUID } from 'node:crypto';
import { mkdtempSync } from 'node:fs';
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
const cpuMs = (since: NodeJS.CpuUsage) => {
  const { user, system } = process.cpuUsage(since);
  return (user + system) / 1000;
};
const median = (v: number[]) => v.sort((a, b) => a - b)[Math.floor(v.length / 2)]!;
console.log(`${database.kind}; ${ROUNDS} rounds`);
console.log('| rows | insertUsage CPU ms | µs/row | settleMany CPU ms | µs/row | writeUsage (both, one statement) CPU ms | µs/row |');
console.log('| --- | --- | --- | --- | --- | --- | --- |');
for (const n of BATCHES) {
  const ins: number[] = [];
  const set: number[] = [];
  const both: number[] = [];
  for (let r = 0; r < ROUNDS; r++) {
    const rows = Array.from({ length: n }, row);
    const settlements = Array.from({ length: n }, settlement);
    // CPU time of this process (PGlite runs on this thread): what the event loop is held for, whatever the machine's load.
    let t = process.cpuUsage();
    await billing.insertUsage(db, rows);
    ins.push(cpuMs(t));
    t = process.cpuUsage();
    await billing.settleMany(db, settlements);
    set.push(cpuMs(t));
    const [more, moreSettlements] = [Array.from({ length: n }, row), Array.from({ length: n }, settlement)];
    t = process.cpuUsage();
    await billing.writeUsage(db, more, moreSettlements);
    both.push(cpuMs(t));
  }
  const [a, b, c] = [median(ins), median(set), median(both)];
  console.log(`| ${n} | ${a.toFixed(2)} | ${((a * 1000) / n).toFixed(0)} | ${b.toFixed(2)} | ${((b * 1000) / n).toFixed(0)} | ${c.toFixed(2)} | ${((c * 1000) / n).toFixed(0)} |`);
}
await database.close();
