import type { PGlite, QueryOptions, Results, Transaction } from '@electric-sql/pglite';
import { type DatabaseError, serialize } from 'pg-protocol';
import type { BackendMessage, DataRowMessage, ParameterDescriptionMessage, RowDescriptionMessage } from 'pg-protocol/dist/messages.js';

interface Statement {
  name: string;
  paramTypes: number[];
  fields: { name: string; dataTypeID: number }[];
}

/** Plenty for Keel's query shapes; beyond it queries simply take PGlite's ordinary path. */
const MAX_STATEMENTS = 1_000;

/**
 * Runs protocol messages against PGlite (outside a transaction under its lock, inside one as part
 * of it) and answers the backend's messages, as PGlite parses them anyway while it runs them
 * (`execProtocolStream`: no copy of the raw reply and no second parse here); an error is one of
 * them, not thrown.
 */
type Exchange = (message: Uint8Array) => Promise<BackendMessage[]>;

const exchangeOptions = { syncToFs: false, throwOnError: false } as const;

/**
 * PGlite with a statement cache. PGlite's `query()` runs Parse, Describe, Bind, Describe, Execute
 * and Sync as six separate calls into WebAssembly and re-plans every query (~230 µs for a
 * primary-key lookup here); this prepares each distinct SQL text once as a named statement and then
 * sends Bind + Execute + Sync in one call (~45 µs). It is handed to Drizzle in place of the PGlite
 * instance, so every query profits, in a transaction too (a run's start, step and end are each one;
 * named statements belong to the session, so one prepared in a transaction outlives its rollback).
 */
export class PgliteStatementClient {
  private readonly statements = new Map<string, Promise<Statement>>();
  /** The statements whose preparation has finished. */
  private readonly ready = new Map<string, Statement>();
  private prepared = 0;

  constructor(readonly pg: PGlite) {}

  // Drizzle also calls this; it keeps PGlite's behaviour.
  exec: PGlite['exec'] = (sqlText, options) => this.pg.exec(sqlText, options);

  /**
   * The transaction holds PGlite's transaction lock from BEGIN to COMMIT; its queries run on the
   * statement cache under the query lock, as PGlite's own `tx.query` does.
   */
  transaction: PGlite['transaction'] = (callback) =>
    this.pg.transaction((tx) => {
      const exchange: Exchange = (message) => this.pg.runExclusive(() => this.answers(message));
      const query = async <T>(text: string, params?: unknown[], options?: QueryOptions): Promise<Results<T>> => {
        if (tx.closed) throw new Error('Transaction is closed');
        // A statement still being prepared outside waits for this transaction's lock: waiting for it here would deadlock.
        if (this.statements.has(text) && !this.ready.has(text)) return tx.query<T>(text, params, options);
        return this.run<T>(exchange, text, params, options, () => tx.query<T>(text, params, options));
      };
      // PGlite's transaction with this query; the rest (exec, rollback, closed, …) is its own.
      return callback(Object.assign(Object.create(tx) as Transaction, { query }));
    });

  /** Outside a transaction: the transaction lock keeps these messages out of another caller's open transaction. */
  private readonly exchange: Exchange = (message) => this.pg._runExclusiveTransaction(() => this.answers(message));

  private async answers(message: Uint8Array): Promise<BackendMessage[]> {
    return await this.pg.execProtocolStream(message, exchangeOptions);
  }

  query<T>(text: string, params: unknown[] = [], options: QueryOptions = {}): Promise<Results<T>> {
    return this.run<T>(this.exchange, text, params, options, () => this.pg.query<T>(text, params, options));
  }

  private async run<T>(exchange: Exchange, text: string, params: unknown[] = [], options: QueryOptions = {}, plain: () => Promise<Results<T>>): Promise<Results<T>> {
    const statement = this.statement(exchange, text);
    if (!statement) return plain();
    const prepared = await statement;
    const message = Buffer.concat([
      serialize.bind({ statement: prepared.name, values: this.serializeParams(prepared, params, options) }),
      serialize.execute({}),
      serialize.sync(),
    ]);
    // No syncToFs: on a directory (NODEFS) PostgreSQL's writes already reach the files, the sync
    // is a no-op there; memory:// has nothing to sync.
    const reply = await exchange(message);
    try {
      return this.results<T>(prepared, reply, options);
    } catch (error) {
      // A plan invalidated by a schema change: forget it and run this once the ordinary way.
      if ((error as { code?: string }).code === '0A000') {
        this.statements.delete(text);
        this.ready.delete(text);
        return plain();
      }
      throw error;
    }
  }

  private statement(exchange: Exchange, text: string): Promise<Statement> | null {
    const known = this.statements.get(text);
    if (known) return known;
    if (this.statements.size >= MAX_STATEMENTS) return null;
    const preparing = this.prepare(exchange, `keel_${this.prepared++}`, text);
    this.statements.set(text, preparing);
    // A statement that fails to prepare (bad SQL) is not kept: the caller sees the error, and a retry prepares anew.
    preparing.catch(() => this.statements.delete(text));
    return preparing;
  }

  private async prepare(exchange: Exchange, name: string, text: string): Promise<Statement> {
    const message = Buffer.concat([
      serialize.parse({ name, text, types: [] }),
      serialize.describe({ type: 'S', name }),
      serialize.sync(),
    ]);
    const reply = await exchange(message);
    let paramTypes: number[] = [];
    let fields: Statement['fields'] = [];
    for (const m of reply) {
      if (m.name === 'error') throw m as DatabaseError;
      if (m.name === 'parameterDescription') paramTypes = (m as ParameterDescriptionMessage).dataTypeIDs;
      if (m.name === 'rowDescription') {
        fields = (m as RowDescriptionMessage).fields.map((f) => ({ name: f.name, dataTypeID: f.dataTypeID }));
      }
    }
    const statement = { name, paramTypes, fields };
    this.ready.set(text, statement);
    return statement;
  }

  private serializeParams(statement: Statement, params: unknown[], options: QueryOptions): (string | null)[] {
    return params.map((value, i) => {
      if (value === null || value === undefined) return null;
      const type = statement.paramTypes[i] ?? 0;
      const serializer = options.serializers?.[type] ?? this.pg.serializers[type];
      if (serializer) return serializer(value);
      return typeof value === 'object' ? JSON.stringify(value) : `${value as string | number | boolean | bigint}`;
    });
  }

  private results<T>(statement: Statement, messages: BackendMessage[], options: QueryOptions): Results<T> {
    const parsers = statement.fields.map((f) => options.parsers?.[f.dataTypeID] ?? this.pg.parsers[f.dataTypeID]);
    const rows: unknown[] = [];
    let affectedRows = 0;
    for (const m of messages) {
      if (m.name === 'error') throw m as DatabaseError;
      if (m.name === 'dataRow') {
        const values = (m as DataRowMessage).fields.map((raw: string | null, i): unknown => {
          const parser = parsers[i];
          return raw === null || !parser ? raw : (parser(raw, statement.fields[i]!.dataTypeID) as unknown);
        });
        rows.push(options.rowMode === 'array' ? values : Object.fromEntries(statement.fields.map((f, i) => [f.name, values[i]])));
      } else if (m.name === 'commandComplete') {
        const count = /(\d+)$/.exec((m as unknown as { text: string }).text);
        if (count) affectedRows = Number(count[1]);
      }
    }
    return { rows: rows as T[], fields: statement.fields, affectedRows };
  }
}
