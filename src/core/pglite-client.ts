import { tracingChannel } from 'node:diagnostics_channel';

import { type PGlite, type QueryOptions, type Results, type Transaction, types } from '@electric-sql/pglite';
import { type DatabaseError, serialize } from 'pg-protocol';
import type { BackendMessage, CommandCompleteMessage, DataRowMessage, ParameterDescriptionMessage, RowDescriptionMessage } from 'pg-protocol/dist/messages.js';
import { Parser } from 'pg-protocol/dist/parser.js';

/**
 * Where PGlite runs: protocol messages in, the backend's raw reply out, in the order sent. PGlite
 * has one session; the client keeps every caller's messages in turn (see PgliteStatementClient).
 */
export interface PgliteLink {
  send(message: Uint8Array): Promise<Uint8Array>;
  /**
   * An exchange while the session is held (a transaction's statements): nothing else goes out until
   * it answers, so a link to another thread may wait for the answer on this one rather than leave
   * the session idle until this thread's event loop comes round to it. `send` when absent.
   */
  sendHeld?(message: Uint8Array): Promise<Uint8Array>;
  close(): Promise<void>;
}

/**
 * PGlite on this thread, the link's alone: after rawExchange, PGlite's own query API on the same
 * instance would find the raw output handler still set. No syncToFs: on a directory (NODEFS) PostgreSQL's writes already reach
 * the files, the sync is a no-op there; memory:// has nothing to sync.
 */
export function inProcessLink(pg: PGlite): PgliteLink {
  let closed = false;
  return {
    send: (message) => {
      if (closed) return Promise.reject(new Error('database is closed'));
      return rawExchange(pg, message);
    },
    close: async () => {
      closed = true;
      await pg.close();
    },
  };
}

/**
 * One exchange with PGlite: the backend's reply bytes as it wrote them. Through
 * execProtocolRawStream, not execProtocolRawSync: the latter's default output handler also parses
 * every reply message with PGlite's own protocol parser and keeps the parsed messages in an array
 * that nothing empties outside PGlite's own query API — work this client does once itself, and
 * memory that grows with every query (measured: ~3× the time per statement, ~0.5 KB kept per
 * query). Without syncToFs the call does all its work before it returns.
 */
export async function rawExchange(pg: Pick<PGlite, 'execProtocolRawStream'>, message: Uint8Array): Promise<Uint8Array> {
  const chunks: Uint8Array[] = [];
  // Each chunk is a view of PGlite's WebAssembly memory, which its next write reuses: copied.
  await pg.execProtocolRawStream(message, { syncToFs: false, onRawData: (bytes) => void chunks.push(bytes.slice()) });
  return chunks.length === 1 ? chunks[0]! : Buffer.concat(chunks);
}

type Exchange = (message: Uint8Array) => Promise<Uint8Array>;
type Parsers = Record<number, (value: string, typeId?: number) => unknown>;
type Serializers = Record<number, (value: unknown) => string>;

interface Statement {
  name: string;
  paramTypes: number[];
  fields: { name: string; dataTypeID: number }[];
}

/** What a query runs in: a transaction or a held session (`exclusive`: it owns the session), or neither. */
interface Scope {
  send: Exchange;
  exclusive: boolean;
  /** Sends a statement's execution (a transaction's last one may carry its COMMIT); `send` when absent. */
  execute?: Exchange;
}

/** A caller waiting for the session: a whole transaction, or one exchange. */
type Waiter = { start: () => void } | { message: Uint8Array; resolve: (reply: Uint8Array) => void; reject: (error: unknown) => void };

/** Plenty for Keel's query shapes; beyond it queries use a statement of their own, closed after use. */
const MAX_STATEMENTS = 1_000;

const BEGIN = serialize.query('BEGIN');
const COMMIT = serialize.query('COMMIT');

/**
 * A transaction as Drizzle's PGlite driver uses it (`query`; `exec` and `closed` as PGlite's), and
 * `commitWithNext`: the next statement executed is the transaction's last, and its COMMIT travels
 * with it (one round trip fewer); anything sent after it fails as on a closed transaction.
 */
export type PgliteTransaction = Pick<Transaction, 'query' | 'exec' | 'closed'> & { commitWithNext(): void };

/**
 * Every statement the client runs, on a diagnostics tracing channel (`start` as it goes, then
 * `asyncEnd` or `error`; the context is `{ text }`) while something subscribes — an APM agent, or
 * the benchmarks' statement hooks, which cannot reach this class inside the bundle — and at the
 * cost of one check otherwise.
 */
export const statementChannel = tracingChannel<unknown, { text: string }>('keel:pglite:statement');

/**
 * PGlite's session, spoken to in the wire protocol, with a statement cache. PGlite's `query()` runs
 * Parse, Describe, Bind, Describe, Execute and Sync as six separate calls into WebAssembly and
 * re-plans every query (~230 µs for a primary-key lookup here); this prepares each distinct SQL text
 * once as a named statement and then sends Bind + Execute + Sync as one message (~45 µs), and
 * parses the reply here. It is handed to Drizzle in place of the PGlite instance, so every query
 * profits, in a transaction too (named statements belong to the session, so one prepared in a
 * transaction outlives its rollback).
 *
 * The link may run PGlite on another thread (pglite-thread.ts), so the session's turns are kept
 * here: a transaction (or `session`) holds the session from BEGIN to COMMIT and single exchanges
 * wait for it; single exchanges between transactions go out at once, several in flight together
 * (each is a whole Bind…Sync, and the link answers in order).
 */
export class PgliteStatementClient {
  private readonly statements = new Map<string, Promise<Statement>>();
  /** The statements whose preparation has finished. */
  private readonly ready = new Map<string, Statement>();
  private prepared = 0;
  private held = false;
  private readonly waiters: Waiter[] = [];
  private readonly parser = new Parser();
  private readonly outside: Scope = { send: (message) => this.shared(message), exclusive: false };
  readonly parsers: Parsers = { ...types.parsers };
  readonly serializers: Serializers = { ...types.serializers };

  /** How a scope that holds the session sends. */
  private readonly sendWhileHeld: Exchange;

  constructor(private readonly link: PgliteLink) {
    this.sendWhileHeld = link.sendHeld ? (message) => link.sendHeld!(message) : (message) => link.send(message);
  }

  /** A client on `link`, with PGlite's parsers and serializers for every array type, as PGlite sets them up at open. */
  static async open(link: PgliteLink): Promise<PgliteStatementClient> {
    const client = new PgliteStatementClient(link);
    const { rows } = await client.query<{ oid: number; typarray: number }>(
      `select b.oid, b.typarray from pg_catalog.pg_type a left join pg_catalog.pg_type b on b.oid = a.typelem
       where a.typcategory = 'A' group by b.oid, b.typarray order by b.oid`,
    );
    for (const { oid, typarray } of rows) {
      client.serializers[typarray] = (value) => types.arraySerializer(value, client.serializers[oid], typarray);
      client.parsers[typarray] = (value) => types.arrayParser(value, client.parsers[oid]!, typarray) as unknown;
    }
    return client;
  }

  query<T>(text: string, params: unknown[] = [], options: QueryOptions = {}): Promise<Results<T>> {
    return this.run<T>(this.outside, text, params, options);
  }

  /** Runs one or more statements without parameters (the simple query protocol), as PGlite's `exec`. */
  exec = (text: string, options: QueryOptions = {}): Promise<Results[]> => this.simple(this.outside, text, options);

  /** Runs `work` holding the session: nothing else runs until it ends (session settings, advisory locks, migrations). */
  session<T>(work: (session: { query: PgliteStatementClient['query']; exec: PgliteStatementClient['exec'] }) => Promise<T>): Promise<T> {
    return this.exclusive(async (send) => {
      const scope: Scope = { send, exclusive: true };
      return work({
        query: <R>(text: string, params: unknown[] = [], options: QueryOptions = {}) => this.run<R>(scope, text, params, options),
        exec: (text: string, options: QueryOptions = {}) => this.simple(scope, text, options),
      });
    });
  }

  /**
   * BEGIN … COMMIT holding the session (ROLLBACK when `callback` throws). BEGIN travels with the
   * transaction's first statement, so a transaction of n statements is n + 1 round trips, or n when
   * the caller says which statement is the last (`commitWithNext`): COMMIT travels with it.
   */
  transaction = <T>(callback: (tx: PgliteTransaction) => Promise<T>): Promise<T> =>
    this.exclusive(async (send) => {
      let begin = true;
      let closed = false;
      let commitNext = false;
      /** COMMIT went with a statement: the transaction is over (committed, or rolled back if the statement failed). */
      let ended = false;
      const scope: Scope = {
        exclusive: true,
        send: async (message) => {
          if (closed || ended) throw new Error('Transaction is closed');
          if (!begin) return send(message);
          begin = false;
          return this.afterBegin(await send(Buffer.concat([BEGIN, message])));
        },
        execute: async (message) => {
          if (!commitNext) return scope.send(message);
          commitNext = false;
          const reply = await scope.send(Buffer.concat([message, COMMIT]));
          ended = true;
          return this.beforeCommit(reply);
        },
      };
      const tx: PgliteTransaction = {
        query: <R>(text: string, params?: unknown[], options?: QueryOptions) => this.run<R>(scope, text, params, options),
        exec: (text: string, options?: QueryOptions) => this.simple(scope, text, options),
        commitWithNext: () => {
          commitNext = true;
        },
        get closed() {
          return closed || ended;
        },
      };
      try {
        const result = await callback(tx);
        // Nothing sent: no transaction was opened. Ended: its COMMIT went with its last statement.
        if (!begin && !ended) await this.simple({ send, exclusive: true }, 'COMMIT');
        return result;
      } catch (error) {
        if (!begin && !ended) await this.simple({ send, exclusive: true }, 'ROLLBACK').catch(() => undefined);
        throw error;
      } finally {
        closed = true;
      }
    });

  /** Stops the session once every caller before this one is done. */
  close(): Promise<void> {
    return this.exclusive(() => this.link.close());
  }

  // ==================== The session's turns ====================

  /** Whether the session is held (a transaction or a session open, between its statements too) or awaited. */
  get busy(): boolean {
    return this.held || this.waiters.length > 0;
  }

  private shared(message: Uint8Array): Promise<Uint8Array> {
    if (!this.held && this.waiters.length === 0) return this.link.send(message);
    return new Promise((resolve, reject) => this.waiters.push({ message, resolve, reject }));
  }

  private async exclusive<T>(work: (send: Exchange) => Promise<T>): Promise<T> {
    if (this.held || this.waiters.length > 0) await new Promise<void>((start) => this.waiters.push({ start }));
    else this.held = true;
    try {
      return await work(this.sendWhileHeld);
    } finally {
      this.release();
    }
  }

  private release(): void {
    this.held = false;
    while (this.waiters.length > 0) {
      const next = this.waiters.shift()!;
      if ('start' in next) {
        this.held = true;
        next.start();
        return;
      }
      this.link.send(next.message).then(next.resolve, next.reject);
    }
  }

  // ==================== Queries ====================

  private run<T>(scope: Scope, text: string, params: unknown[] = [], options: QueryOptions = {}): Promise<Results<T>> {
    if (!statementChannel.hasSubscribers) return this.runStatement<T>(scope, text, params, options);
    return statementChannel.tracePromise(() => this.runStatement<T>(scope, text, params, options), { text });
  }

  private async runStatement<T>(scope: Scope, text: string, params: unknown[], options: QueryOptions): Promise<Results<T>> {
    let statement = this.ready.get(text);
    if (!statement) {
      const preparing = this.statement(scope, text);
      if (!preparing) return this.once<T>(scope, text, params, options);
      statement = await preparing;
    }
    const reply = await (scope.execute ?? scope.send)(this.execute(statement, params, options));
    try {
      return this.results<T>(statement, reply, options);
    } catch (error) {
      // A plan invalidated by a schema change: forget it and run this once on a fresh one.
      if ((error as { code?: string }).code === '0A000') {
        this.statements.delete(text);
        this.ready.delete(text);
        return this.once<T>(scope, text, params, options);
      }
      throw error;
    }
  }

  /** The cached statement for `text` being prepared, or null when the query should use one of its own. */
  private statement(scope: Scope, text: string): Promise<Statement> | null {
    const known = this.statements.get(text);
    // One still being prepared outside may be waiting for the session this scope holds: waiting for it would deadlock.
    if (known) return scope.exclusive ? null : known;
    if (this.statements.size >= MAX_STATEMENTS) return null;
    const name = `keel_${this.prepared++}`;
    const preparing = this.prepare(scope, name, text).then((statement) => {
      this.ready.set(text, statement);
      return statement;
    });
    this.statements.set(text, preparing);
    // A statement that fails to prepare (bad SQL) is not kept: the caller sees the error, and a retry prepares anew.
    preparing.catch(() => this.statements.delete(text));
    return preparing;
  }

  /** A statement of its own for one query, closed with its execution. */
  private async once<T>(scope: Scope, text: string, params: unknown[], options: QueryOptions): Promise<Results<T>> {
    const statement = await this.prepare(scope, `keel_once_${this.prepared++}`, text);
    const reply = await (scope.execute ?? scope.send)(this.execute(statement, params, options, true));
    return this.results<T>(statement, reply, options);
  }

  private async prepare(scope: Scope, name: string, text: string): Promise<Statement> {
    const message = Buffer.concat([serialize.parse({ name, text, types: [] }), serialize.describe({ type: 'S', name }), serialize.sync()]);
    let paramTypes: number[] = [];
    let fields: Statement['fields'] = [];
    for (const m of this.messages(await scope.send(message))) {
      if (m.name === 'error') throw m as DatabaseError;
      if (m.name === 'parameterDescription') paramTypes = (m as ParameterDescriptionMessage).dataTypeIDs;
      if (m.name === 'rowDescription') fields = (m as RowDescriptionMessage).fields.map((f) => ({ name: f.name, dataTypeID: f.dataTypeID }));
    }
    return { name, paramTypes, fields };
  }

  private execute(statement: Statement, params: unknown[], options: QueryOptions, close = false): Uint8Array {
    const parts = [serialize.bind({ statement: statement.name, values: this.serializeParams(statement, params, options) }), serialize.execute({})];
    if (close) parts.push(serialize.close({ type: 'S', name: statement.name }));
    parts.push(serialize.sync());
    return Buffer.concat(parts);
  }

  private simple(scope: Scope, text: string, options: QueryOptions = {}): Promise<Results[]> {
    if (!statementChannel.hasSubscribers) return this.runSimple(scope, text, options);
    return statementChannel.tracePromise(() => this.runSimple(scope, text, options), { text });
  }

  private async runSimple(scope: Scope, text: string, options: QueryOptions): Promise<Results[]> {
    const results: Results[] = [];
    let fields: Statement['fields'] = [];
    let rows: unknown[] = [];
    for (const m of this.messages(await scope.send(serialize.query(text)))) {
      if (m.name === 'error') throw m as DatabaseError;
      if (m.name === 'rowDescription') {
        fields = (m as RowDescriptionMessage).fields.map((f) => ({ name: f.name, dataTypeID: f.dataTypeID }));
        rows = [];
      } else if (m.name === 'dataRow') {
        rows.push(this.row(fields, (m as DataRowMessage).fields as (string | null)[], options));
      } else if (m.name === 'commandComplete') {
        results.push({ rows: rows as Results['rows'], fields, affectedRows: affected(m as CommandCompleteMessage) });
        fields = [];
        rows = [];
      }
    }
    return results;
  }

  private serializeParams(statement: Statement, params: unknown[], options: QueryOptions): (string | null)[] {
    return params.map((value, i) => {
      if (value === null || value === undefined) return null;
      const type = statement.paramTypes[i] ?? 0;
      const serializer = (options.serializers?.[type] as Serializers[number] | undefined) ?? this.serializers[type];
      if (serializer) return serializer(value);
      return typeof value === 'object' ? JSON.stringify(value) : `${value as string | number | boolean | bigint}`;
    });
  }

  private results<T>(statement: Statement, reply: Uint8Array, options: QueryOptions): Results<T> {
    const rows: unknown[] = [];
    let affectedRows = 0;
    for (const m of this.messages(reply)) {
      if (m.name === 'error') throw m as DatabaseError;
      if (m.name === 'dataRow') rows.push(this.row(statement.fields, (m as DataRowMessage).fields as (string | null)[], options));
      else if (m.name === 'commandComplete') affectedRows = affected(m as CommandCompleteMessage);
    }
    return { rows: rows as T[], fields: statement.fields, affectedRows };
  }

  private row(fields: Statement['fields'], raw: (string | null)[], options: QueryOptions): unknown {
    const values = raw.map((value, i): unknown => {
      if (value === null) return null;
      const type = fields[i]!.dataTypeID;
      const parser = (options.parsers?.[type] as Parsers[number] | undefined) ?? this.parsers[type];
      return parser ? parser(value, type) : value;
    });
    if (options.rowMode === 'array') return values;
    const row: Record<string, unknown> = {};
    for (let i = 0; i < fields.length; i++) row[fields[i]!.name] = values[i];
    return row;
  }

  private messages(reply: Uint8Array): BackendMessage[] {
    const messages: BackendMessage[] = [];
    this.parser.parse(Buffer.from(reply.buffer, reply.byteOffset, reply.byteLength), (m) => messages.push(m));
    return messages;
  }

  /**
   * The reply of a statement + COMMIT, as the statement's alone (its error is the caller's to
   * throw; COMMIT then only ends the failed transaction): COMMIT's failure is thrown.
   */
  private beforeCommit(reply: Uint8Array): Uint8Array {
    const view = Buffer.from(reply.buffer, reply.byteOffset, reply.byteLength);
    for (let at = 0; at + 5 <= view.length; at += 1 + view.readUInt32BE(at + 1)) {
      if (view[at] !== 0x5a /* Z: ready for query, the statement's end */) continue;
      const end = at + 1 + view.readUInt32BE(at + 1);
      for (const m of this.messages(view.subarray(end))) if (m.name === 'error') throw m as DatabaseError;
      return view.subarray(0, end);
    }
    throw new Error('the embedded database did not answer the statement');
  }

  /** The reply of BEGIN + a statement, as the statement's alone: BEGIN's failure is thrown. */
  private afterBegin(reply: Uint8Array): Uint8Array {
    const view = Buffer.from(reply.buffer, reply.byteOffset, reply.byteLength);
    for (let at = 0; at + 5 <= view.length; at += 1 + view.readUInt32BE(at + 1)) {
      const type = view[at];
      if (type === 0x45 /* E */) for (const m of this.messages(view.subarray(at))) if (m.name === 'error') throw m as DatabaseError;
      if (type === 0x5a /* Z: ready for query, BEGIN's end */) return view.subarray(at + 1 + view.readUInt32BE(at + 1));
    }
    throw new Error('the embedded database did not answer BEGIN');
  }
}

function affected(m: CommandCompleteMessage): number {
  const count = /(\d+)$/.exec(m.text);
  return count ? Number(count[1]) : 0;
}
