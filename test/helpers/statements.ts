import type { SQL } from 'drizzle-orm';
import { PgDialect } from 'drizzle-orm/pg-core';

import type { Db } from '../../src/core/db.js';

/**
 * Runs `work` with `hook` seeing every statement `db` sends (its SQL text and parameters) before
 * it goes, or (`afterwards`) once it has run: a throw then is a reply lost after the commit.
 */
export async function intercepting(db: Db, hook: (text: string, params: unknown[]) => void | Promise<void>, work: () => Promise<unknown>, afterwards = false): Promise<void> {
  const dialect = new PgDialect();
  const execute = db.execute.bind(db);
  db.execute = (async (query: SQL) => {
    const { sql: text, params } = dialect.sqlToQuery(query);
    if (!afterwards) await hook(text, params);
    const result: unknown = await execute(query);
    if (afterwards) await hook(text, params);
    return result;
  }) as typeof db.execute;
  try {
    await work();
  } finally {
    db.execute = execute;
  }
}
