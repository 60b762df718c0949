/**
 * The billing reads on an account with a long history: what their statements cost must not grow
 * with the whole history when the answer does not (a page of the ledger), and what grows with the
 * request (a summary's groups) is bounded. Plans are read with EXPLAIN, on PGlite and PostgreSQL.
 */
import { sql } from 'drizzle-orm';
import { beforeAll, describe, expect, it } from 'vitest';

import { queryRows } from '../../src/crud/owned.js';
import { useTestApp } from '../helpers/app.js';
import { createUser, type TestUser } from '../helpers/factories.js';
import { apiOf, expectValidationError } from '../helpers/http.js';
import { intercepting } from '../helpers/statements.js';

const ctx = useTestApp();
const api = apiOf(ctx);

const ENTRIES = 20_000;
let user: TestUser;

/** `n` usage entries of `ownerId`'s, one a minute back from now, straight into the ledger. */
async function seedLedger(ownerId: string, n: number): Promise<void> {
  await queryRows(
    ctx.database.db,
    sql`insert into credit_transactions (owner_id, type, amount, balance_after, description, created_at, updated_at)
        select ${ownerId}::uuid, 'usage', -0.001, 1000 - i * 0.001, 'call ' || i, now() - i * interval '1 minute', now() - i * interval '1 minute'
        from generate_series(1, ${n}) i`,
  );
}

beforeAll(async () => {
  user = await createUser(ctx.app);
  const other = await createUser(ctx.app);
  await seedLedger(user.user.id, ENTRIES);
  await seedLedger(other.user.id, ENTRIES);
});

interface PlanNode {
  'Node Type': string;
  'Index Name'?: string;
  Plans?: PlanNode[];
}

type Client = { query: (text: string, params?: unknown[]) => Promise<{ rows: Record<string, unknown>[] }>; connect?: () => Promise<Client>; release?: () => void };

/**
 * The statements `url` sends that read the ledger, each with its plan (EXPLAIN, as JSON) when the
 * planner avoids sorts and sequential scans wherever it can: what serves the page on a table large
 * enough for it to matter, without making one (on a test's small table, a scan and a sort cost the
 * planner less than an index, with or without one that serves the order).
 */
async function ledgerPlans(url: string): Promise<PlanNode[]> {
  const statements: [string, unknown[]][] = [];
  await intercepting(
    ctx.database.db,
    (text, params) => void (/from "credit_transactions"/.test(text) && statements.push([text, params])),
    async () => expect((await api('GET', url, user.headers)).statusCode).toBe(200),
  );
  expect(statements.length).toBeGreaterThan(0);
  // One connection for the settings and the EXPLAIN (PostgreSQL: the pool's; PGlite has one).
  const pool = (ctx.database.db as unknown as { $client: Client }).$client;
  const client = pool.connect ? await pool.connect() : pool;
  const plans: PlanNode[] = [];
  try {
    await client.query('begin');
    await client.query('set local enable_sort = off');
    await client.query('set local enable_seqscan = off');
    for (const [text, params] of statements) {
      const { rows } = await client.query(`explain (format json) ${text}`, params);
      const json = Object.values(rows[0]!)[0];
      plans.push(((typeof json === 'string' ? JSON.parse(json) : json) as { Plan: PlanNode }[])[0]!.Plan);
    }
  } finally {
    await client.query('rollback');
    client.release?.();
  }
  return plans;
}

const nodes = (plan: PlanNode): PlanNode[] => [plan, ...(plan.Plans ?? []).flatMap(nodes)];

/** Whether a Limit in `plan` takes its rows straight off an index scan of `index`: nothing sorted or windowed between. */
function limitReadsIndex(plan: PlanNode, index: string): boolean {
  const straight = (node: PlanNode): boolean =>
    node['Index Name'] === index || (!/Sort|WindowAgg|Aggregate|Hash/.test(node['Node Type']) && (node.Plans ?? []).some(straight));
  return nodes(plan).some((node) => node['Node Type'] === 'Limit' && (node.Plans ?? []).some(straight));
}

describe('the ledger of a long history', () => {
  it('pages through every entry, newest first, with the total on each page and past the end', async () => {
    const first = (await api('GET', '/billing/transactions?limit=3', user.headers)).json<{ data: { description: string }[]; count: number }>();
    expect(first).toMatchObject({ count: ENTRIES, data: [{ description: 'call 1' }, { description: 'call 2' }, { description: 'call 3' }] });
    const last = (await api('GET', `/billing/transactions?limit=5&offset=${ENTRIES - 2}`, user.headers)).json<{ data: { description: string }[]; count: number }>();
    expect(last).toMatchObject({ count: ENTRIES, data: [{ description: `call ${ENTRIES - 1}` }, { description: `call ${ENTRIES}` }] });
    expect((await api('GET', `/billing/transactions?offset=${ENTRIES}`, user.headers)).json()).toEqual({ data: [], count: ENTRIES });
  });

  it("takes a whole account's total from the count its account keeps: no page counts the history, past the end neither", async () => {
    for (const url of ['/billing/transactions', `/billing/transactions?offset=${ENTRIES + 5}`]) {
      const statements: string[] = [];
      await intercepting(
        ctx.database.db,
        (text) => void statements.push(text),
        async () => expect((await api('GET', url, user.headers)).json<{ count: number }>().count).toBe(ENTRIES),
      );
      expect(statements.filter((text) => /count\(/i.test(text)), url).toEqual([]);
    }
  });

  /** `url`'s statements read the ledger's page straight off its index, with no window over the whole history. */
  async function expectPageOffIndex(url: string) {
    const plans = await ledgerPlans(url);
    expect(plans.flatMap(nodes).map((n) => n['Node Type']), url).not.toContain('WindowAgg');
    expect(plans.some((plan) => limitReadsIndex(plan, 'ix_credit_transactions_owner_id_created_at_id')), `${url}: ${JSON.stringify(plans)}`).toBe(true);
  }

  it('reads a page off the ledger-order index, however deep: no sort or window over the whole history', async () => {
    await expectPageOffIndex('/billing/transactions');
    await expectPageOffIndex('/billing/transactions?limit=100&offset=15000');
  });
});

describe('a usage summary by day', () => {
  const summary = (query: string) => api('GET', `/billing/summary?${query}`, user.headers);

  it('spans at most BILLING_SUMMARY_MAX_DAYS (366) days: a longer range is refused on `from`, saying why', async () => {
    for (const query of ['from=2024-01-01&to=2025-01-01&group_by=day', 'from=0001-01-01&to=9999-12-31', 'from=2020-01-01&group_by=model,api_key,day']) {
      const body = expectValidationError(await summary(query), ['query', 'from'], 'value_error');
      expect(body.detail[0]!.msg, query).toMatch(/grouped by day spans at most 366 days \(BILLING_SUMMARY_MAX_DAYS\)/);
    }
  });

  it("answers another user's summary with 403 before it judges the range", async () => {
    const someone = await createUser(ctx.app);
    const other = await api('GET', `/billing/summary?user_id=${someone.user.id}&from=2020-01-01&group_by=day`, user.headers);
    expect(other.statusCode, other.body).toBe(403);
  });

  it('takes a year by day (366 days: a leap year), and any range not grouped by day', async () => {
    for (const query of [
      // A bare-date `to` takes in its whole day: 2024 through its last day.
      'from=2024-01-01&to=2024-12-31&group_by=day',
      'from=2025-06-01T12:00:00Z&to=2026-06-01T12:00:00Z',
      // 366 days from an instant that is no UTC midnight: the range's length is what is capped, not the UTC days it touches (367).
      'from=2025-06-01T12:00:00Z&to=2026-06-02T12:00:00Z&group_by=day',
      'from=2024-01-01T00:00:00%2B02:00&to=2025-01-01T00:00:00%2B02:00&group_by=day',
      'from=0001-01-01&to=9999-12-31&group_by=model,api_key',
      '',
    ]) {
      expect((await summary(query)).statusCode, query).toBe(200);
    }
  });
});
