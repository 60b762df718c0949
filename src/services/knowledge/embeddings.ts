/**
 * Chunk embeddings in `knowledge_chunk_embeddings`, the table the knowledge migration creates only
 * where pgvector is enabled. Its `embedding` column has no fixed dimension (that depends on
 * EMBEDDING_MODEL), so each dimension met gets its own partial HNSW index on
 * `embedding::vector(n)`, and queries name the same expression to use it.
 */
import { type SQL, sql } from 'drizzle-orm';

import { type Db, rootOf, transaction } from '../../core/db.js';
import { databaseError } from '../../core/errors.js';

import { queryRows } from '../../crud/owned.js';

const TABLE = sql.raw('knowledge_chunk_embeddings');
/** The chunk and entry of each embedding, so that conditions on their columns apply. */
const JOINS = sql.raw(
  'join knowledge_chunks on knowledge_chunks.id = knowledge_chunk_embeddings.chunk_id join knowledge_entries on knowledge_entries.id = knowledge_chunks.entry_id',
);

/** pgvector indexes (HNSW) vectors of at most this many dimensions; larger ones are searched exactly. */
const MAX_INDEXED_DIMENSIONS = 2_000;

/** A fact about the database asked once per database (the root, whatever transaction `db` is); a failed look is asked again next time. */
function askedOnce(cache: WeakMap<object, Promise<boolean>>, db: Db, ask: (root: Db) => Promise<boolean>): Promise<boolean> {
  const root = rootOf(db);
  let known = cache.get(root);
  if (!known) {
    known = ask(root);
    cache.set(root, known);
    known.catch(() => cache.delete(root));
  }
  return known;
}

const present = new WeakMap<object, Promise<boolean>>();

/** Whether this database has the embeddings table (pgvector was enabled when it was migrated). */
export function hasVectorTable(db: Db): Promise<boolean> {
  return askedOnce(present, db, (root) =>
    queryRows<{ present: boolean }>(root, sql`select to_regclass('public.knowledge_chunk_embeddings') is not null as present`).then(([row]) => row?.present === true),
  );
}

/** An embedding as a model's answer has it (float32), or as given (a benchmark's corpus). */
export type Vector = Float32Array | readonly number[];

/** `[0.1,0.2,…]`, pgvector's text form; every value is a finite number (a provider's NaN is refused). */
function vectorLiteral(values: Vector): string {
  if (!values.every(Number.isFinite)) throw new Error('embedding holds a value that is not a finite number');
  return `[${values.join(',')}]`;
}

/** The dimension as SQL (an integer checked here, never a client string). */
function dimensionSql(dimensions: number): SQL {
  if (!Number.isInteger(dimensions) || dimensions < 1 || dimensions > 16_000) throw new Error(`unsupported embedding dimension ${dimensions}`);
  return sql.raw(String(dimensions));
}

const indexed = new WeakMap<object, Set<number>>();

/**
 * The HNSW index for vectors of `dimensions` (cosine distance), made on first use. Building it
 * on a table that already holds many vectors takes a while, but happens once per dimension.
 */
export async function ensureVectorIndex(db: Db, dimensions: number): Promise<void> {
  if (dimensions > MAX_INDEXED_DIMENSIONS) return;
  const root = rootOf(db);
  const done = indexed.get(root) ?? new Set<number>();
  indexed.set(root, done);
  if (done.has(dimensions)) return;
  const n = dimensionSql(dimensions);
  try {
    await root.execute(
      sql`create index if not exists ${sql.raw(`ix_knowledge_chunk_embeddings_hnsw_${dimensions}`)} on ${TABLE} using hnsw ((embedding::vector(${n})) vector_cosine_ops) where vector_dims(embedding) = ${n}`,
    );
  } catch (error) {
    // Another worker made it at the same moment: the index is there all the same.
    const code = databaseError(error)?.code;
    if (code !== '42P07' && code !== '23505') throw error;
  }
  done.add(dimensions);
}

/** Stores the embeddings of chunks (their ids in the same order), replacing earlier ones. */
export async function writeEmbeddings(db: Db, model: string, chunkIds: string[], vectors: readonly Vector[]): Promise<void> {
  if (!chunkIds.length) return;
  const values = sql.join(
    chunkIds.map((id, i) => sql`(${id}::uuid, ${model}, ${vectorLiteral(vectors[i]!)}::vector)`),
    sql`, `,
  );
  await db.execute(
    sql`insert into ${TABLE} (chunk_id, model, embedding) values ${values} on conflict (chunk_id) do update set model = excluded.model, embedding = excluded.embedding, updated_at = now()`,
  );
}

/** A chunk near the query, with what search shows of it (so that no second statement fetches it). */
export interface VectorMatch {
  chunk_id: string;
  distance: number;
  entry_id: string;
  filename: string;
  chunk_index: number;
  text: string;
  heading_path: string[];
}

/**
 * The chunks nearest to `vector` by cosine distance among those `where` admits (a condition on
 * knowledge_chunks' and knowledge_entries' columns), embedded by `model`, with their passages.
 * pgvector's iterative index scan keeps looking when the filter removes the first candidates (a
 * user's chunks among everyone's), so a narrow filter still gets `limit` results.
 */
export async function nearestChunks(db: Db, model: string, vector: Vector, where: SQL, limit: number): Promise<VectorMatch[]> {
  const n = dimensionSql(vector.length);
  const query = sql`${vectorLiteral(vector)}::vector(${n})`;
  const distance = sql`(${TABLE}.embedding::vector(${n}) <=> ${query})`;
  const nearest = (on: Db) =>
    queryRows<VectorMatch>(
      on,
      sql`select ${TABLE}.chunk_id, ${distance} as distance, knowledge_chunks.entry_id, knowledge_entries.filename,
            knowledge_chunks.chunk_index, knowledge_chunks.text, knowledge_chunks.heading_path
          from ${TABLE} ${JOINS}
          where vector_dims(${TABLE}.embedding) = ${n} and ${TABLE}.model = ${model} and ${where}
          order by ${distance}
          limit ${limit}`,
    );
  const rows = (await iterativeScanSet(db))
    ? await nearest(db)
    : await transaction(db, async (tx) => {
        await tx.execute(sql`set local hnsw.iterative_scan = relaxed_order`);
        return nearest(tx);
      });
  // relaxed_order may return neighbours slightly out of order.
  return rows.map((r) => ({ ...r, distance: Number(r.distance) })).sort((a, b) => a.distance - b.distance);
}

const iterativeScan = new WeakMap<object, Promise<boolean>>();

/**
 * Whether every session of this database already runs with pgvector's iterative scan (the embedded
 * database sets it for its one session at open): then a search is one statement instead of four
 * (BEGIN, SET LOCAL, the query, COMMIT).
 */
function iterativeScanSet(db: Db): Promise<boolean> {
  return askedOnce(iterativeScan, db, (root) =>
    queryRows<{ value: string | null }>(root, sql`select current_setting('hnsw.iterative_scan', true) as value`).then(([row]) => row?.value === 'relaxed_order'),
  );
}

/**
 * Whether any chunk `where` admits has an embedding by `model`: only then is a query worth
 * embedding. The one-time filter asks first whether the model has any embedding at all, through
 * the (model, chunk_id) index (0011; ordering by chunk_id keeps the index in a generic plan, which
 * PGlite's prepared statements get after five runs and which, with one model in the table, scans
 * it): a model no row has (EMBEDDING_MODEL changed, documents not yet reindexed) read every
 * embedding in every search.
 */
export async function anyEmbedded(db: Db, model: string, where: SQL): Promise<boolean> {
  const rows = await queryRows<{ one: number }>(
    db,
    sql`select 1 as one from ${TABLE} ${JOINS}
        where (select known.model from ${TABLE} as known where known.model = ${model} order by known.chunk_id limit 1) is not null
          and ${TABLE}.model = ${model} and ${where}
        limit 1`,
  );
  return rows.length > 0;
}
