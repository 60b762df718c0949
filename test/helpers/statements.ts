import type { Db } from '../../src/core/db.js';

type Query = (statement: string | { text: string }, params?: unknown[], ...rest: unknown[]) => Promise<unknown>;

/**
 * Runs `work` with `hook` seeing every statement `db` sends outside a transaction (its SQL text
 * and parameters) before it goes, or (`afterwards`) once it has run: a throw then is a reply lost
 * after the commit. Seen where the driver sends them (`$client.query`: the pool's on PostgreSQL,
 * the PGlite client's), so statements prepared under a name (the usage flush's) are seen too.
 */
export async function intercepting(db: Db, hook: (text: string, params: unknown[]) => void | Promise<void>, work: () => Promise<unknown>, afterwards = false): Promise<void> {
  const client = (db as unknown as { $client: { query: Query } }).$client;
  const query = client.query;
  client.query = async function (this: unknown, statement, params = [], ...rest) {
    const text = typeof statement === 'string' ? statement : statement.text;
    if (!afterwards) await hook(text, params);
    const result = await query.call(this, statement, params, ...rest);
    if (afterwards) await hook(text, params);
    return result;
  };
  try {
    await work();
  } finally {
    client.query = query;
  }
}
