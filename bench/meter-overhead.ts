/**
 * What metering adds to a model call: the same chat call through `app.models` (meter wired in, as
 * every Keel caller uses it) and through a ModelManager without a meter, interleaved, against a
 * zero-latency fake upstream. Billing off (no I/O in reserve), then on (one conditional UPDATE,
 * then a settlement statement after the answer). Embedded PGlite, or DATABASE_URL's PostgreSQL.
 *
 *   npx tsx bench/meter-overhead.ts [CALLS]        (DATABASE_URL=postgres://... for the server)
 */
import { randomBytes } from 'node:crypto';
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import pino from 'pino';

import { loadSettings } from '../src/core/config.js';
import { openDatabase } from '../src/core/db.js';
import { migrateUp } from '../src/core/migrate.js';

import { buildApp } from '../src/app.js';
import { changeBalance } from '../src/crud/billing.js';
import { createModelManager, type ModelManager } from '../src/modules/ai-models/index.js';
import { createUser } from '../src/services/user-service.js';
import { FakeModelServer } from '../test/helpers/fake-model-server.js';

const CALLS = Number(process.argv[2] ?? 2000);
const logger = pino({ level: 'silent' });
const fake = await FakeModelServer.start();
fake.defaultReply = { text: 'ok', usage: { prompt_tokens: 10, completion_tokens: 2 } };
const overrides = [{ id: 'bench-model', provider: 'fake', capabilities: ['chat' as const], pricing: { input_cost_per_million_tokens: '1', output_cost_per_million_tokens: '2' } }];
const providers = [{ id: 'fake', kind: 'openai-compatible' as const, base_url: fake.url, api_key: 'k' }];

function quantile(sorted: number[], q: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))]!;
}

async function measure(billing: boolean): Promise<void> {
  const dataDir = mkdtempSync(join(tmpdir(), 'keel-bench-meter-'));
  const settings = loadSettings({
    ENVIRONMENT: 'local',
    SECRET_KEY: randomBytes(32).toString('hex'),
    DATA_DIR: dataDir,
    PGLITE_DATA_DIR: process.env.DATABASE_URL ? '' : 'memory://',
    DATABASE_URL: process.env.DATABASE_URL ?? '',
    LOG_LEVEL: 'silent',
    BILLING_ENABLED: String(billing),
  });
  const database = await openDatabase(settings);
  await migrateUp(database, logger);
  const app = await buildApp({ settings, database, logger, vectorSearch: false, runJobs: false, closeDatabase: true });
  app.models.reload(overrides, providers);
  const bare: ModelManager = createModelManager(settings, { overrides, providers });
  const user = await createUser(app.db, { email: `bench-${randomBytes(4).toString('hex')}@keel.test`, password: 'bench-password', full_name: null, is_active: true, is_superuser: false });
  await changeBalance(app.db, { userId: user.id, type: 'grant', amount: '1000000', description: 'bench', createdBy: user.id });
  const request = { model: 'bench-model', messages: [{ role: 'user' as const, content: 'Hello' }], maxOutputTokens: 16 };
  const metered: number[] = [];
  const plain: number[] = [];
  for (let i = 0; i < 200; i++) {
    await app.models.chat({ ...request, context: { user_id: user.id } });
    await bare.chat(request);
  }
  for (let i = 0; i < CALLS; i++) {
    let t = performance.now();
    await app.models.chat({ ...request, context: { user_id: user.id } });
    metered.push(performance.now() - t);
    t = performance.now();
    await bare.chat(request);
    plain.push(performance.now() - t);
  }
  // The meter alone, as the caller's path sees it: `await reserve()` (settle runs after, untimed).
  const reserveTimes: number[] = [];
  const estimate = { operation: 'chat' as const, model: 'bench-model', provider: 'fake', input_tokens: 10, max_output_tokens: 16, cost: '0.000042', context: { user_id: user.id } };
  const record = { operation: 'chat' as const, model: 'bench-model', provider: 'fake', tokens: { input: 10, cached_input: 0, cache_write: 0, output: 2, reasoning: 0 }, estimated: false, cost: '0.000014', latency_ms: 1, time_to_first_token_ms: null, status: 'success' as const, error: null, attempts: 1, started_at: new Date(), context: { user_id: user.id } };
  for (let i = 0; i < CALLS; i++) {
    const t = performance.now();
    const reservation = await app.meter.reserve(estimate);
    reserveTimes.push(performance.now() - t);
    void reservation.settle(record);
    if (i % 100 === 99) await app.meter.idle();
  }
  reserveTimes.sort((a, b) => a - b);
  metered.sort((a, b) => a - b);
  plain.sort((a, b) => a - b);
  const row = (q: number) => (quantile(metered, q) - quantile(plain, q)).toFixed(3);
  console.log(
    `| ${database.kind} | billing ${billing ? 'on ' : 'off'} | ${quantile(reserveTimes, 0.5).toFixed(3)} | ${quantile(reserveTimes, 0.99).toFixed(3)} | ${quantile(plain, 0.5).toFixed(3)} | ${quantile(metered, 0.5).toFixed(3)} | ${row(0.5)} | ${row(0.99)} |`,
  );
  await app.close();
}

console.log(`${CALLS} sequential chat calls each way, interleaved (ms)\n`);
console.log('| database | billing | reserve p50 | reserve p99 | call p50 without meter | call p50 metered | added p50 | added p99 |');
console.log('| --- | --- | --- | --- | --- | --- | --- | --- |');
await measure(false);
await measure(true);
await fake.close();
