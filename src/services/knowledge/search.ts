import { and, desc, eq, inArray, or, type SQL, sql } from 'drizzle-orm';

import type { Settings } from '../../core/config.js';
import type { Db } from '../../core/db.js';
import type { Logger } from '../../core/logger.js';

import { knowledgeChunks, knowledgeEntries } from '../../models/index.js';

import { ownRows } from '../../crud/knowledge.js';
import type { CallContext, ModelManager } from '../../modules/ai-models/index.js';
import type { Principal } from '../../utils/authentication.js';
import { anyEmbedded, hasVectorTable, nearestChunks } from './embeddings.js';

/** What a search needs: a ServiceContext has it all. */
export interface KnowledgeSearchDeps {
  db: Db;
  settings: Settings;
  models: ModelManager;
  log: Logger;
}

export interface KnowledgeQuery {
  query: string;
  /**
   * Where to search: the entries of these folders plus these entries. Both left out: all of the
   * caller's documents; either given (even empty): only what they name (`[]` and `[]`: nothing).
   */
  folderIds?: string[];
  entryIds?: string[];
  /** Passages to return (default 5). */
  topK?: number;
  /** Who the query's embedding call is for, beyond the principal (a run, an agent). */
  context?: CallContext;
}

export interface KnowledgeHit {
  entry_id: string;
  filename: string;
  chunk_index: number;
  text: string;
  /** Higher is better: ts_rank_cd in full-text mode; the fused reciprocal-rank score in hybrid mode. */
  score: number;
  heading_path: string[];
}

export interface KnowledgeSearchResult {
  data: KnowledgeHit[];
  mode: 'full_text' | 'hybrid';
}

/** Reciprocal rank fusion's constant: ranks deep in a list count little, the first few dominate. */
const RRF_K = 60;

/** Candidates taken from each list before fusing: several times what is asked, so fusion has room. */
const candidatesFor = (topK: number) => Math.max(20, topK * 4);

/** The chunks the caller may search, narrowed by the query's folders and entries. */
function scopeOf(principal: Principal, query: KnowledgeQuery): SQL {
  const own = ownRows(principal, knowledgeChunks.owner_id, knowledgeEntries.project_id);
  if (query.folderIds === undefined && query.entryIds === undefined) return own;
  const folderIds = query.folderIds ?? [];
  const entryIds = query.entryIds ?? [];
  const named = or(
    folderIds.length ? inArray(knowledgeEntries.folder_id, folderIds) : undefined,
    entryIds.length ? inArray(knowledgeChunks.entry_id, entryIds) : undefined,
  );
  return and(own, named ?? sql`false`)!;
}

interface Passage extends Omit<KnowledgeHit, 'score'> {
  id: string;
}

const passageColumns = {
  id: knowledgeChunks.id,
  entry_id: knowledgeChunks.entry_id,
  filename: knowledgeEntries.filename,
  chunk_index: knowledgeChunks.chunk_index,
  text: knowledgeChunks.text,
  heading_path: knowledgeChunks.heading_path,
};

/**
 * Chunks ranked per tsquery at most. A common word matches a large share of a one-topic knowledge
 * base (23k of 100k chunks in bench/kb.ts) and `ts_rank_cd` detoasts and scores every match before
 * the top-k sort (~19 µs a row: 0.4–1.6 s). Ranking only a LIMITed set of GIN matches bounds that
 * at ~20 ms; the price is that, past the cap, which matches get ranked is up to the index order.
 */
const RANKED_CANDIDATES = 1_000;

/** Matches of `match` in scope, at most RANKED_CANDIDATES of them, as a subquery of chunk ids. */
function candidateIds(db: Db, match: SQL, scope: SQL, cap: number) {
  return db
    .select({ id: knowledgeChunks.id })
    .from(knowledgeChunks)
    .innerJoin(knowledgeEntries, eq(knowledgeEntries.id, knowledgeChunks.entry_id))
    .where(and(match, scope))
    .limit(cap);
}

async function ranked(db: Db, query: SQL, candidates: SQL, limit: number): Promise<(Passage & { score: number })[]> {
  const rank = sql<number>`ts_rank_cd(${knowledgeChunks.tsv}, ${query})`.mapWith(Number);
  return db
    .select({ ...passageColumns, score: rank })
    .from(knowledgeChunks)
    .innerJoin(knowledgeEntries, eq(knowledgeEntries.id, knowledgeChunks.entry_id))
    .where(candidates)
    // Ties (common among partial matches) in document order: the earlier upload, then its earlier chunk — the same answer every time.
    .orderBy(desc(rank), knowledgeEntries.created_at, knowledgeChunks.entry_id, knowledgeChunks.chunk_index)
    .limit(limit);
}

/**
 * Full text: `websearch_to_tsquery` (quotes, `or`, `-word`) ranked by cover density (`ts_rank_cd`).
 * It ANDs every word, which a natural-language question rarely meets in one chunk; when it yields
 * fewer than `limit` chunks, the rest come from an OR of the question's lexemes, ranked below every
 * AND match (their score is scaled under the lowest AND score, so scores keep the order).
 */
async function fullText(db: Db, language: string, text: string, scope: SQL, limit: number): Promise<(Passage & { score: number })[]> {
  const allWords = sql`websearch_to_tsquery(${language}::regconfig, ${text})`;
  const andHits = await ranked(db, allWords, inArray(knowledgeChunks.id, candidateIds(db, sql`${knowledgeChunks.tsv} @@ ${allWords}`, scope, RANKED_CANDIDATES)), limit);
  if (andHits.length >= limit) return andHits;

  // The question's lexemes as the stored tsvectors hold them (stemmed, stop words gone). Each is
  // made a query with the 'simple' configuration, which only lowercases (no re-stemming), and its
  // tsquery text (quoted, escaped by PostgreSQL) is OR-ed: no user text is parsed as tsquery syntax.
  // A query that excludes a word (`-word`) gets no fallback: an OR of lexemes cannot honour the
  // exclusion. Quotes are not honoured either, but the phrase matches come first (AND).
  // (`!` only appears in tsquery text as the NOT operator: the parser never puts it in a lexeme.)
  const lexemes = sql`unnest(tsvector_to_array(to_tsvector(${language}::regconfig, ${text})))`;
  const anyWord = sql`(select string_agg('(' || plainto_tsquery('simple', lexeme)::text || ')', ' | ')::tsquery from ${lexemes} as lexemes(lexeme) where plainto_tsquery('simple', lexeme)::text <> '')`;
  // Candidates per lexeme, each capped: a rare lexeme (the question's point) keeps all its chunks
  // however many the common ones match, and the set ranked stays under RANKED_CANDIDATES.
  const perLexeme = Math.max(limit, Math.floor(RANKED_CANDIDATES / 8));
  const candidates = sql`${knowledgeChunks.id} in (
    select distinct matches.id from ${lexemes} as lexemes(lexeme)
    cross join lateral (${candidateIds(db, sql`${knowledgeChunks.tsv} @@ plainto_tsquery('simple', lexemes.lexeme)`, scope, perLexeme)}) as matches
    limit ${RANKED_CANDIDATES})
    and not (${knowledgeChunks.tsv} @@ ${allWords})
    and position('!' in ${allWords}::text) = 0`;
  const orHits = await ranked(db, anyWord, candidates, limit - andHits.length);
  const floor = andHits.length ? andHits[andHits.length - 1]!.score : 1;
  // rank / (rank + 1) maps [0, ∞) into [0, 1) in the same order; times the floor: below every AND hit.
  return [...andHits, ...orHits.map((hit) => ({ ...hit, score: (floor * hit.score) / (hit.score + 1) }))];
}

async function passagesByIds(db: Db, ids: string[]): Promise<Passage[]> {
  if (!ids.length) return [];
  return db
    .select(passageColumns)
    .from(knowledgeChunks)
    .innerJoin(knowledgeEntries, eq(knowledgeEntries.id, knowledgeChunks.entry_id))
    .where(inArray(knowledgeChunks.id, ids));
}

/** The query's embedding, or null when there is nothing to compare it with (or the model fails: full text answers alone). */
async function queryEmbedding(deps: KnowledgeSearchDeps, principal: Principal, query: KnowledgeQuery, scope: SQL): Promise<number[] | null> {
  const model = deps.settings.EMBEDDING_MODEL;
  if (!model || !(await hasVectorTable(deps.db)) || !(await anyEmbedded(deps.db, model, scope))) return null;
  try {
    const result = await deps.models.embed({
      model,
      values: [query.query],
      context: {
        user_id: principal.user.id,
        api_key_id: principal.apiKeyId,
        api_key_limits: principal.apiKeyLimits,
        project_id: principal.scopeProjectId,
        ...query.context,
      },
    });
    return result.embeddings[0] ?? null;
  } catch (error) {
    deps.log.warn({ err: error, model }, 'query embedding failed; knowledge search answers with full text alone');
    return null;
  }
}

/**
 * Searches the caller's documents (a project-scoped key: its project's): full text alone, or —
 * when EMBEDDING_MODEL is set and the documents have embeddings (pgvector) — full text and vector
 * similarity fused by reciprocal rank. What `POST /knowledge-base/search` and the runner's
 * `knowledge_search` tool call.
 */
export async function searchKnowledge(deps: KnowledgeSearchDeps, principal: Principal, query: KnowledgeQuery): Promise<KnowledgeSearchResult> {
  const topK = query.topK ?? 5;
  const scope = scopeOf(principal, query);
  const language = deps.settings.KB_SEARCH_LANGUAGE;
  const vector = await queryEmbedding(deps, principal, query, scope);
  if (!vector) {
    const hits = await fullText(deps.db, language, query.query, scope, topK);
    return { data: hits.map(({ id: _id, ...hit }) => hit), mode: 'full_text' };
  }
  const limit = candidatesFor(topK);
  const [textHits, nearest] = await Promise.all([
    fullText(deps.db, language, query.query, scope, limit),
    nearestChunks(deps.db, deps.settings.EMBEDDING_MODEL!, vector, scope, limit),
  ]);
  const fused = new Map<string, number>();
  const add = (id: string, rank: number) => fused.set(id, (fused.get(id) ?? 0) + 1 / (RRF_K + rank + 1));
  textHits.forEach((hit, rank) => add(hit.id, rank));
  nearest.forEach((match, rank) => add(match.chunk_id, rank));
  // A stable sort: ties keep the order they were added in (full-text rank first), not the chunks' random ids.
  const best = [...fused.entries()].sort((a, b) => b[1] - a[1]).slice(0, topK);
  const known = new Map<string, Passage>(textHits.map((hit) => [hit.id, hit]));
  const missing = best.map(([id]) => id).filter((id) => !known.has(id));
  for (const passage of await passagesByIds(deps.db, missing)) known.set(passage.id, passage);
  const data = best.flatMap(([id, score]) => {
    const passage = known.get(id);
    if (!passage) return []; // deleted between the two queries
    const { id: _id, ...hit } = passage;
    return [{ ...hit, score }];
  });
  return { data, mode: 'hybrid' };
}
