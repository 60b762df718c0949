import pg from 'pg';

/** The same server URL with another database name. */
export function databaseUrl(url: string, database: string): string {
  const parsed = new URL(url);
  parsed.pathname = `/${database}`;
  return parsed.toString();
}

/** One statement on the server's maintenance connection (create/drop database can't run in a pool transaction). */
export async function adminQuery<T extends Record<string, unknown>>(url: string, sqlText: string, params: unknown[] = []): Promise<T[]> {
  const client = new pg.Client({ connectionString: url });
  await client.connect();
  try {
    return (await client.query<T>(sqlText, params)).rows;
  } finally {
    await client.end();
  }
}
