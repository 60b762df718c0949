/**
 * The billing and usage read routes on an account with a lot of history: one user with USAGE rows
 * (default 300,000) of usage and as many ledger entries over a year, and 20 others with a tenth of
 * that each, seeded with SQL (generate_series) into a fresh database. Times each route through the
 * app (median of ROUNDS calls after one warm-up) and prints EXPLAIN ANALYZE of its statements.
 *
 *   DATABASE_URL=postgres://…/keel_bench_x npx tsx bench/billing-reads.ts   (an empty database)
 *   PGLITE_DATA_DIR=$(mktemp -d) npx tsx bench/billing-reads.ts
 */
import { randomBytes } from 'node:crypto';

import { sql } from 'drizzle-orm';
import pino from 'pino';

import { loadSettings } from '../src/core/config.js';
import { openDatabase } from '../src/core/db.js';
import { migrateUp } from '../src/core/migrate.js';
import { TokenService } from '../src/core/security.js';

import { buildApp } from '../src/app.js';
import { queryRows } from '../src/crud/owned.js';
import { cacheUsers } from '../src/crud/user.js';
import { intercepting } from '../test/helpers/statements.js';

const USAGE = Number(process.env.USAGE ?? 300_000);
const OTHERS = 20;
const ROUNDS = Number(process.env.ROUNDS ?? 7);
const PLANS = process.env.PLANS !== '0';

const where = process.env.DATABASE_URL ? { DATABASE_URL: process.env.DATABASE_URL } : { PGLITE_DATA_DIR: process.env.PGLITE_DATA_DIR! };
const settings = loadSettings({ ENVIRONMENT: 'local', SECRET_KEY: randomBytes(32).toString('hex'), LOG_LEVEL: 'silent', ...where });
const logger = pino({ level: 'silent' });
const database = await openDatabase(settings);
await migrateUp(database, logger);
const db = database.db;

const seeded = Date.now();
// A database seeded by an earlier run (the same DATABASE_URL or PGLITE_DATA_DIR) is used as it is.
let [heavy] = await queryRows<{ id: string }>(db, sql`select id from users where email = 'heavy@bench'`);
if (!heavy) [heavy] = await seed();
if (process.env.ANALYZE) await queryRows(db, sql`analyze`);
async function seed() {
const [heavy] = await queryRows<{ id: string }>(
  db,
  sql`insert into users (email, hashed_password, full_name, is_superuser) values ('heavy@bench', 'x', 'Heavy', false) returning id`,
);
await queryRows(db, sql`insert into users (email, hashed_password) select 'other' || i || '@bench', 'x' from generate_series(1, ${OTHERS}) i`);
// Usage: one row per call, spread evenly over the year before now, 8 models, 5 keys, 2 projects (half of it unassigned).
const usage = (owner: SQL, n: number, offset: number) => sql`
  insert into usage_records (id, created_at, updated_at, owner_id, api_key_id, project_id, model, provider, operation,
    input_tokens, cached_input_tokens, cache_write_tokens, output_tokens, reasoning_tokens, cost, latency_ms, status, estimated, attempts, started_at)
  select gen_random_uuid(), t, t, ${owner}, ('00000000-0000-4000-8000-00000000000' || (i % 5))::uuid,
    case when i % 2 = 0 then ('00000000-0000-4000-9000-00000000000' || (i % 4 / 2))::uuid end,
    'model-' || (i % 8), 'openai', 'chat', 100 + i % 900, i % 50, 0, 20 + i % 300, 0, ((100 + i % 900) * 0.000002 + (20 + i % 300) * 0.000008)::numeric,
    200 + i % 800, 'ok', false, 1, t
  from generate_series(1, ${n}) i, lateral (select now() - (i + ${offset}) * (interval '365 days' / ${n})) as at(t)`;
type SQL = ReturnType<typeof sql>;
await queryRows(db, usage(sql`${heavy!.id}::uuid`, USAGE, 0));
const others = await queryRows<{ id: string }>(db, sql`select id from users where email like 'other%'`);
for (const [n, other] of others.entries()) await queryRows(db, usage(sql`${other.id}::uuid`, USAGE / 10, n));
// The ledger: a usage entry per call, each with the balance after it, and a grant at the start.
await queryRows(
  db,
  sql`insert into credit_transactions (owner_id, type, amount, balance_after, description, usage_record_id, api_key_id, project_id, created_at, updated_at)
      select owner_id, 'usage', -cost, 1000000 - sum(cost) over (partition by owner_id order by created_at, id), 'Chat ' || model, id, api_key_id, project_id, created_at, created_at
      from usage_records`,
);
await queryRows(
  db,
  sql`insert into credit_transactions (owner_id, type, amount, balance_after, description, created_at, updated_at)
      select id, 'grant', 1000000, 1000000, 'start', now() - interval '366 days', now() - interval '366 days' from users`,
);
await queryRows(
  db,
  sql`insert into credit_accounts (user_id, balance) select owner_id, sum(amount) from credit_transactions group by owner_id
      on conflict (user_id) do update set balance = excluded.balance`,
);
// PGlite has no autovacuum: NO_ANALYZE=1 leaves the tables as a PGlite deployment has them (never analyzed).
if (!process.env.NO_ANALYZE) await queryRows(db, sql`analyze`);
return [heavy];
}
const [sizes] = await queryRows<{ usage: number; ledger: number }>(
  db,
  sql`select (select count(*) from usage_records)::int as usage, (select count(*) from credit_transactions)::int as ledger`,
);
console.log(`${database.kind}: seeded ${sizes!.usage} usage records, ${sizes!.ledger} ledger entries in ${((Date.now() - seeded) / 1000).toFixed(0)} s`);

await cacheUsers(database);
const app = await buildApp({ settings, database, logger, vectorSearch: false, runJobs: false });
await app.ready();
const token = await new TokenService(settings).create(heavy!.id, 0, 'access');
const headers = { authorization: `Bearer ${token}` };
// A year back from the start of the day 365 days ago: 366 days touched, the most a summary by day may span.
const year = new Date(Date.now() - 365 * 86_400_000).toISOString().slice(0, 10);
const decade = '2020-01-01';

const routes: [string, string][] = [
  ['balance', '/billing/balance'],
  ['transactions (first page)', '/billing/transactions'],
  ['transactions limit=100', '/billing/transactions?limit=100'],
  ['transactions offset=150000', '/billing/transactions?offset=150000'],
  ['transactions offset=299990', '/billing/transactions?offset=299990'],
  ['transactions past the end', '/billing/transactions?offset=1000000'],
  ['summary (default: 30 days, model,day)', '/billing/summary'],
  ['summary year model,day', `/billing/summary?from=${year}`],
  ['summary year model', `/billing/summary?from=${year}&group_by=model`],
  ['summary year day,model,api_key', `/billing/summary?from=${year}&group_by=day,model,api_key`],
  ['summary year api_key', `/billing/summary?from=${year}&group_by=api_key`],
  ['summary 0001-9999 day', `/billing/summary?from=0001-01-01&to=9999-12-31&group_by=day`],
  ['summary since 2020 model,day', `/billing/summary?from=${decade}`],
];
const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
for (const [name, path] of routes) {
  const url = `/api/v1${path}`;
  const first = await app.inject({ method: 'GET', url, headers });
  const times: number[] = [];
  for (let i = 0; i < ROUNDS; i++) {
    const started = performance.now();
    const res = await app.inject({ method: 'GET', url, headers });
    times.push(performance.now() - started);
    if (res.statusCode !== first.statusCode) throw new Error(`${url}: ${res.statusCode} ${res.body}`);
  }
  if (first.statusCode !== 200) {
    console.log(`${name.padEnd(42)} p50 ${median(times).toFixed(1).padStart(8)} ms  (${first.statusCode}: ${first.body.slice(0, 120)})`);
    continue;
  }
  const body = first.json<{ count?: number; data?: unknown[] }>();
  const shape = body.data ? `${body.data.length} rows${body.count !== undefined ? `, count ${body.count}` : ''}, ${first.body.length} B` : `${first.body.length} B`;
  console.log(`${name.padEnd(42)} p50 ${median(times).toFixed(1).padStart(8)} ms  min ${Math.min(...times).toFixed(1).padStart(8)}  (${shape})`);
  if (!PLANS) continue;
  const statements: [string, unknown[]][] = [];
  await intercepting(db, (text, params) => void statements.push([text, params]), () => app.inject({ method: 'GET', url, headers }));
  const client = (db as unknown as { $client: { query: (text: string, params: unknown[]) => Promise<{ rows: Record<string, string>[] }> } }).$client;
  for (const [text, params] of statements) {
    if (!/^\s*select/i.test(text)) continue;
    const plan = await client.query(`explain (analyze, buffers) ${text}`, params);
    console.log(`    ${text.replace(/\s+/g, ' ').slice(0, 160)}\n${plan.rows.map((r) => `      ${Object.values(r)[0]}`).join('\n')}`);
  }
}
await app.close();
await database.close();
