/**
 * What VACUUM and ANALYZE cost on the embedded database (PGlite has no autovacuum; Keel's
 * maintenance does its job, core/maintenance.ts): seeds the billing history of bench/billing-reads.ts
 * (USAGE usage records and ledger entries for one user, a tenth of that for each of 20 others),
 * churns the tables billing rewrites all day (CHURN credit reservations inserted and deleted, one
 * per statement in part; account and API-key updates), then prints what pg_stat_user_tables and
 * age(relfrozenxid) say, times VACUUM, ANALYZE and VACUUM (ANALYZE) of each table, and what a
 * statement sent while a VACUUM runs waits.
 *
 *   PGLITE_DATA_DIR=$(mktemp -d) npx tsx bench/maintenance.ts
 */
import { randomBytes } from 'node:crypto';

import pino from 'pino';

import { loadSettings } from '../src/core/config.js';
import { openDatabase } from '../src/core/db.js';
import { migrateUp } from '../src/core/migrate.js';

const USAGE = Number(process.env.USAGE ?? 300_000);
const CHURN = Number(process.env.CHURN ?? 200_000);
const SINGLE = Number(process.env.SINGLE ?? 20_000);

const settings = loadSettings({ ENVIRONMENT: 'local', SECRET_KEY: randomBytes(32).toString('hex'), LOG_LEVEL: 'silent', PGLITE_DATA_DIR: process.env.PGLITE_DATA_DIR! });
const database = await openDatabase(settings);
await migrateUp(database, pino({ level: 'silent' }));
const client = (database.db as unknown as { $client: { query: <T>(text: string, params?: unknown[]) => Promise<{ rows: T[] }> } }).$client;
const q = async <T = Record<string, unknown>>(text: string, params: unknown[] = []) => (await client.query<T>(text, params)).rows;
const timed = async (text: string) => {
  const started = performance.now();
  await q(text);
  return performance.now() - started;
};
const ms = (n: number) => `${n.toFixed(n < 10 ? 1 : 0)} ms`;

const seeded = performance.now();
if (!(await q(`select 1 from users where email = 'heavy@bench'`)).length) {
  await q(`insert into users (email, hashed_password) values ('heavy@bench', 'x')`);
  await q(`insert into users (email, hashed_password) select 'other' || i || '@bench', 'x' from generate_series(1, 20) i`);
  const users = await q<{ id: string; email: string }>(`select id, email from users where email like '%@bench'`);
  for (const user of users) {
    const n = user.email === 'heavy@bench' ? USAGE : USAGE / 10;
    await q(
      `insert into usage_records (owner_id, api_key_id, model, provider, operation, input_tokens, cached_input_tokens, cache_write_tokens, output_tokens,
         reasoning_tokens, cost, latency_ms, status, estimated, attempts, started_at, created_at, updated_at)
       select $1, null, 'model-' || (i % 8), 'openai', 'chat', 100 + i % 900, 0, 0, 20 + i % 300, 0, 0.001, 200, 'ok', false, 1, t, t, t
       from generate_series(1, $2::int) i, lateral (select now() - i * (interval '365 days' / $2::int)) as at(t)`,
      [user.id, n],
    );
  }
  await q(`insert into credit_transactions (owner_id, type, amount, balance_after, description, usage_record_id, created_at, updated_at)
           select owner_id, 'usage', -cost, 1000, 'Chat', id, created_at, created_at from usage_records`);
  await q(`insert into credit_accounts (user_id, balance) select id, 1000000 from users on conflict (user_id) do update set balance = excluded.balance`);
  await q(`insert into api_keys (owner_id, name, prefix, key_hash) select id, 'k', 'k', md5(id::text || g) || md5(g::text) from users, generate_series(1, 5) g`);
  console.log(`seeded in ${ms(performance.now() - seeded)}`);
}

// Churn: what billing does per call, as single statements (SINGLE of them) and in bulk (CHURN rows).
const users = await q<{ id: string }>(`select id from users where email like '%@bench'`);
const keys = await q<{ id: string }>(`select id from api_keys`);
const churned = performance.now();
for (let i = 0; i < SINGLE; i++) {
  const user = users[i % users.length]!.id;
  const [held] = await q<{ id: string }>(
    `insert into credit_reservations (expires_at, user_id, api_key_id, account_amount, key_amount) values (now() + interval '10 minutes', $1, $2, 0.01, 0) returning id`,
    [user, keys[i % keys.length]!.id],
  );
  await q(`update credit_accounts set reserved = reserved + 0.01 where user_id = $1`, [user]);
  await q(`delete from credit_reservations where id = $1`, [held!.id]);
  await q(`update credit_accounts set reserved = reserved - 0.01, balance = balance - 0.01, updated_at = now() where user_id = $1`, [user]);
  if (i % 10 === 0) await q(`update api_keys set spent = spent + 0.01, last_used_at = now() where id = $1`, [keys[i % keys.length]!.id]);
}
await q(`insert into credit_reservations (expires_at, user_id, account_amount, key_amount)
         select now() + interval '10 minutes', (select id from users order by id limit 1), 0.01, 0 from generate_series(1, $1::int)`, [CHURN]);
await q(`delete from credit_reservations`);
// A settled day's usage rewritten (a refund pass, say): dead tuples in a big table.
await q(`update usage_records set updated_at = now() where created_at > now() - interval '30 days'`);
console.log(`churned in ${ms(performance.now() - churned)}: ${SINGLE} holds one statement at a time, ${CHURN} reservations in bulk, usage of 30 days rewritten`);

const TABLES = ['credit_reservations', 'credit_accounts', 'api_keys', 'users', 'usage_records', 'credit_transactions'];
const stats = () =>
  q(`select s.relname as table, n_live_tup as live, n_dead_tup as dead, n_mod_since_analyze as mod_since_analyze,
            pg_size_pretty(pg_total_relation_size(s.relid)) as size, age(c.relfrozenxid) as xid_age, last_vacuum is not null as vacuumed, last_analyze is not null as analyzed
     from pg_stat_user_tables s join pg_class c on c.oid = s.relid where s.relname = any($1) order by s.relname`, [TABLES]);
console.table(await stats());
console.log(await q(`select age(datfrozenxid) as db_xid_age, txid_current() as xid from pg_database where datname = current_database()`));

// What a statement sent while a VACUUM runs waits: the one session answers it after the VACUUM.
const stall = async (text: string) => {
  const started = performance.now();
  const maintenance = q(text);
  await new Promise((resolve) => setTimeout(resolve, 5));
  const sent = performance.now();
  await q('select 1');
  const waited = performance.now() - sent;
  await maintenance;
  return { total: performance.now() - started, waited };
};
const first = await stall('vacuum usage_records');
console.log(`select 1 sent 5 ms into VACUUM usage_records (after churn: ${ms(first.total)}) answered after ${ms(first.waited)}`);

console.log('\ntable                   VACUUM (churned)  ANALYZE   VACUUM (clean)  VACUUM (ANALYZE)  VACUUM (FREEZE)');
for (const table of TABLES) {
  const vacuum = table === 'usage_records' ? first.total : await timed(`vacuum ${table}`);
  const analyze = await timed(`analyze ${table}`);
  const again = await timed(`vacuum ${table}`);
  const both = await timed(`vacuum (analyze) ${table}`);
  const freeze = await timed(`vacuum (freeze) ${table}`);
  console.log(`${table.padEnd(22)} ${ms(vacuum).padStart(12)} ${ms(analyze).padStart(12)} ${ms(again).padStart(12)} ${ms(both).padStart(14)} ${ms(freeze).padStart(14)}`);
}
console.table(await stats());
const second = await stall('vacuum (analyze) credit_transactions');
console.log(`select 1 sent 5 ms into VACUUM (ANALYZE) credit_transactions (${ms(second.total)}) answered after ${ms(second.waited)}`);
const whole = await timed('vacuum');
console.log(`VACUUM of the whole database (catalogs too): ${ms(whole)}`);
console.log(await q(`select age(datfrozenxid) as db_xid_age, txid_current() as xid from pg_database where datname = current_database()`));
await database.close();
