import { and, inArray, or, type SQL, sql } from 'drizzle-orm';

import type { Settings } from '../../core/config.js';
import { type Db, rootOf } from '../../core/db.js';
import { CredentialsGoneError } from '../../core/errors.js';
import type { Logger } from '../../core/logger.js';

import { knowledgeChunks, knowledgeEntries } from '../../models/index.js';

import { ownRows } from '../../crud/knowledge.js';
import { queryRows } from '../../crud/owned.js';
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
  /** Aborts the query's embedding call (a run's cancel, deadline or shutdown: the knowledge_search tool's). */
  signal?: AbortSignal;
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
const candidatesFor = (topK: number) => Math.max(15, topK * 3);

/**
 * The chunks the caller may search, narrowed by the query's folders and entries, and whether that
 * condition reads the chunk's entry (a project-scoped key, a folder filter): only then do the
 * statements that look for matching chunks join knowledge_entries (planning and probing it cost
 * on every search).
 */
export interface Scope {
  where: SQL;
  readsEntries: boolean;
}

/**
 * Not the chunks of the caller's entries marked `chunks_hidden`: a failed indexing keeps what it
 * embedded (paid for; the entry's next indexing resumes from it), but those chunks are shown
 * neither while the entry is failed nor while its reindex is pending or processing — until then
 * nothing has checked them against the document as it is cut now (and it may fail again) — only
 * once an indexing ends `ready` (ingestion.ts, `fail` and `finishEntry`). Where the statements join
 * knowledge_entries anyway (`readsEntries`), that is the joined entry's flag. Otherwise the ids
 * come from a look-up of the owner's entries with hidden chunks (an InitPlan, read off the partial
 * index ix_knowledge_entries_owner_id_chunks_hidden: a few rows, not every entry the owner has),
 * compared on the chunk's own column: no join to knowledge_entries in the statements that find
 * candidates, and with an array the planner cannot see, `<> all` is estimated to keep nearly every
 * row, so the plans stay those without it. The look-up runs once per place the scope appears in a
 * statement (the probe, the AND query, each one-word query of the fallback and each ask choosing
 * them; anyEmbedded and nearestChunks once each), not once per statement: without the index, each
 * one read all of an owner's entries (50,000 of them: a search 10–60 ms slower).
 */
function hiddenChunks(ownerId: string, readsEntries: boolean): SQL {
  if (readsEntries) return sql`not ${knowledgeEntries.chunks_hidden}`;
  return sql`${knowledgeChunks.entry_id} <> all (array(select hidden.id from ${knowledgeEntries} as hidden where hidden.owner_id = ${ownerId} and hidden.chunks_hidden))`;
}

function scopeOf(principal: Principal, query: KnowledgeQuery): Scope {
  const projectScoped = principal.scopeProjectId !== null;
  const owned = ownRows(principal, knowledgeChunks.owner_id, knowledgeEntries.project_id);
  if (query.folderIds === undefined && query.entryIds === undefined) {
    return { where: and(owned, hiddenChunks(principal.user.id, projectScoped))!, readsEntries: projectScoped };
  }
  const folderIds = query.folderIds ?? [];
  const entryIds = query.entryIds ?? [];
  const named = or(
    folderIds.length ? inArray(knowledgeEntries.folder_id, folderIds) : undefined,
    entryIds.length ? inArray(knowledgeChunks.entry_id, entryIds) : undefined,
  );
  const readsEntries = projectScoped || folderIds.length > 0;
  return { where: and(owned, hiddenChunks(principal.user.id, readsEntries), named ?? sql`false`)!, readsEntries };
}

interface Passage extends Omit<KnowledgeHit, 'score'> {
  id: string;
}

/**
 * Chunks ranked at most, for the AND query and for the OR fallback each. `ts_rank_cd` detoasts and
 * scores a whole ~400-token tsvector per row (~20 µs on PostgreSQL, several times that on PGlite),
 * and a common word matches a large share of a one-topic knowledge base (a quarter of the 100k
 * chunks in bench/kb.ts), so the ranked set is bounded: past the cap, which AND matches get ranked
 * is up to the index order (they all hold every word of the question).
 */
const rankedFor = (limit: number) => Math.max(60, limit * 4);
/** The rarest lexemes of a question that feed the OR fallback's candidates (long questions' common words add nothing). */
const OR_LEXEMES = 8;
/**
 * A lexeme in more than this share of all chunks is not looked up in the GIN index: its bitmap
 * holds every match (tens of thousands) however few are wanted, while a scan testing the tsvectors
 * (in line in the row, migration 0008) finds the N wanted after ~N / share rows.
 */
const COMMON = 0.1;
/**
 * When even the question's rarest lexeme is in this share of the chunks, its AND matches are first
 * looked for by testing the first rows in scope (ts_match_vq, no index): intersecting the GIN
 * posting lists of words that common reads every entry of each (a question of four such words:
 * ~17k matches, 15 ms on PGlite at 100k chunks), while the rows that hold one such word usually
 * hold the others (a one-topic knowledge base), so the first few hundred rows have the matches
 * wanted. The probe reads twice the rows the wanted matches need if every row holding the rarest
 * word held them all, at most PROBE_MAX_ROWS (~3 µs a row on PGlite); when it finds fewer, the
 * GIN index answers as without it.
 */
const PROBE_FROM = 0.15;
const PROBE_MAX_ROWS = 1_000;

/** The share of chunks holding each of the most common lexemes (PostgreSQL's statistics); a lexeme not in it is rarer. */
export type LexemeFrequencies = Record<string, number>;

/** How long the statistics' frequencies are reused before they are read again. */
const FREQUENCIES_TTL_MS = 60_000;
const frequencyCache = new WeakMap<object, { at: number; frequencies: Promise<LexemeFrequencies> }>();

/**
 * The lexeme frequencies that ANALYZE gathered for knowledge_chunks.tsv (`most_common_elems`, up
 * to ~1,000 lexemes), read at most once a minute per database: reading them through `pg_stats` in
 * every search cost ~50 ms on PGlite.
 */
export function lexemeFrequencies(db: Db): Promise<LexemeFrequencies> {
  const root = rootOf(db);
  const cached = frequencyCache.get(root);
  if (cached && performance.now() - cached.at < FREQUENCIES_TTL_MS) return cached.frequencies;
  const frequencies = queryRows<{ lexemes: string[] | null; frequencies: number[] | null }>(
    root,
    sql`select most_common_elems::text::text[] as lexemes, most_common_elem_freqs as frequencies
        from pg_stats where schemaname = current_schema() and tablename = 'knowledge_chunks' and attname = 'tsv'`,
  ).then(([row]) => Object.fromEntries((row?.lexemes ?? []).map((lexeme, i) => [lexeme, Number(row!.frequencies![i])])));
  frequencyCache.set(root, { at: performance.now(), frequencies });
  frequencies.catch(() => frequencyCache.delete(root));
  return frequencies;
}

/** One lexeme of a question: how often it occurs, and its tsquery text as PostgreSQL wrote it (quoted and escaped there). */
export interface QuestionLexeme {
  lexeme: string;
  query: string;
  frequency: number;
}

/**
 * The question's lexemes as the stored tsvectors hold them (stemmed, stop words gone), rarest
 * first (their frequencies from the planner's statistics; a lexeme missing there is rarer than any
 * listed; ties in code-point order). Each is made a query with the 'simple' configuration, which
 * only lowercases (no re-stemming), and only PostgreSQL's text of that query is used later: no
 * user text is parsed as tsquery syntax. Asked in a statement of its own so that the search
 * statement is written for these lexemes, with no table of frequencies sent along and joined in it.
 */
export async function questionLexemes(db: Db, language: string, text: string): Promise<QuestionLexeme[]> {
  const [words, frequencies] = await Promise.all([
    queryRows<{ lexeme: string; query: string }>(
      db,
      sql`select lexeme, query from (
            select words.lexeme, plainto_tsquery('simple', words.lexeme)::text as query
            from unnest(tsvector_to_array(to_tsvector(${language}::regconfig, ${text}))) as words(lexeme)
          ) as lexemes where query <> ''`,
    ),
    lexemeFrequencies(db),
  ]);
  return words
    .map(({ lexeme, query }) => ({ lexeme, query, frequency: frequencies[lexeme] ?? 0 }))
    .sort((a, b) => a.frequency - b.frequency || (a.lexeme < b.lexeme ? -1 : a.lexeme > b.lexeme ? 1 : 0));
}

const entriesOf = (scope: Scope) => (scope.readsEntries ? sql`join ${knowledgeEntries} on ${knowledgeEntries.id} = ${knowledgeChunks.entry_id}` : sql``);

/** The chunks in scope whose tsvector matches `match`, at most `cap` of them (GIN, in index order), or all of them. */
function matching(match: SQL, scope: Scope, cap?: number): SQL {
  return sql`select ${knowledgeChunks.id} from ${knowledgeChunks} ${entriesOf(scope)} where ${match} and ${scope.where}${cap === undefined ? sql`` : sql` limit ${cap}`}`;
}

/**
 * The chunks matching every word (`allWords`), at most `cap`: through the GIN index, or — when
 * every lexeme is common (PROBE_FROM) — among the first rows in scope first, the index only when
 * those hold fewer than `cap` (a one-time filter). Both take the matches in the table's order.
 * The probe's query is a scalar subquery, parsed once: a custom plan folds it anyway, but a
 * generic one (a named prepared statement, or plan_cache_mode = force_generic_plan) parsed the
 * question for every row it tested (up to PROBE_MAX_ROWS). The index's look-up keeps the query
 * written out: the planner estimates its matches from it, and an index condition is computed once.
 */
function allWordsMatching(allWords: SQL, lexemes: QuestionLexeme[], scope: Scope, cap: number): SQL {
  const chunk = knowledgeChunks;
  const viaIndex = matching(sql`${chunk.tsv} @@ ${allWords}`, scope, cap);
  const rarest = lexemes[0]?.frequency ?? 0;
  if (rarest < PROBE_FROM) return viaIndex;
  const rows = Math.min(PROBE_MAX_ROWS, Math.ceil((2 * cap) / rarest));
  return sql`with probed as (
      select probe.id from (select ${chunk.id}, ${chunk.tsv} from ${chunk} ${entriesOf(scope)} where ${scope.where} limit ${rows}) as probe
      where ts_match_vq(probe.tsv, (select ${allWords})) limit ${cap}
    )
    select id from probed where (select count(*) from probed) >= ${cap}
    union all
    select id from (${viaIndex}) as indexed where (select count(*) from probed) < ${cap}`;
}

/**
 * Words the statistics do not list that the OR fallback asks about at most (fallbackLexemes): each
 * is a GIN look-up, and a long question may have dozens of them (a run of nonsense, a pasted hash).
 */
const OR_ASKED = 16;

/**
 * The lexemes whose one-word queries may feed the OR fallback (`candidates`), and the query
 * picking those that do, by their places there (`held`; none: they all do). The fallback takes the
 * first OR_LEXEMES of the question's lexemes (rarest first) that some chunk in scope may hold. A
 * word the statistics do not list counts as rarer than any they list, so a question's words that
 * no chunk holds (typos, a pasted hash, a hostile run of nonsense) came first and could take every
 * place, leaving out the real words behind them. The first OR_ASKED of those words are asked
 * whether a chunk in scope holds them — an EXISTS each over the fallback's own one-word query (a
 * GIN look-up, which finds nothing at once for a word no chunk holds), in order,
 * stopping at the OR_LEXEMES-th word held (an Append runs its parts in order and stops at the
 * limit); a word the statistics list is in some chunk, and is taken unasked. Asked only when the
 * question has more lexemes than the fallback takes and its rarest is such a word, and within the
 * search statement, so only when the fallback runs (fullTextQuery): not when the AND part finds
 * enough, as it does for most long questions, nor when the question's start excludes a word.
 * The query is a MATERIALIZED CTE of the EXISTS, planned for all its rows: planned for its first
 * (a `limit 1`, or the EXISTS itself), a sequential scan that stops at the first match looked
 * cheaper than the index whenever the GIN index's pending list was long (inserts since the last
 * VACUUM), and for a word no chunk holds it read every chunk of every owner (PostgreSQL, 55,000
 * chunks: 37 ms an ask, 16 asks a question). The EXISTS still reads only its first row.
 */
function fallbackLexemes(lexemes: QuestionLexeme[], scope: Scope): { candidates: QuestionLexeme[]; held?: SQL } {
  if (lexemes.length <= OR_LEXEMES || lexemes[0]!.frequency > 0) return { candidates: lexemes.slice(0, OR_LEXEMES) };
  const listed = lexemes.filter((lexeme) => lexeme.frequency > 0);
  const candidates = [...lexemes.filter((lexeme) => lexeme.frequency === 0).slice(0, OR_ASKED), ...listed.slice(0, OR_LEXEMES)];
  const asked = candidates.map(({ query, frequency }, i) =>
    frequency > 0
      ? sql`(select ${i}::int as i)`
      : sql`(select ${i}::int as i where exists (with word as materialized (${matching(sql`${knowledgeChunks.tsv} @@ ${query}::tsquery`, scope)}) select from word))`,
  );
  return { candidates, held: sql`select i from (${sql.join(asked, sql` union all `)}) as held limit ${OR_LEXEMES}` };
}

/**
 * Full text in one statement: `websearch_to_tsquery` (quotes, `or`, `-word`; questionQuery) ranked by cover
 * density (`ts_rank_cd`). It ANDs every word, which a natural-language question rarely meets in one
 * chunk; when it yields fewer than `limit` chunks, the rest come from an OR of the question's
 * lexemes, ranked below every AND match (their score is scaled under the lowest AND score, so
 * scores keep the order). The OR part runs in the same statement, only when the AND part fell
 * short (a one-time filter), and takes its candidates from the question's rarest lexemes first
 * (the first OR_LEXEMES of `lexemes`, from questionLexemes, that some chunk in scope may hold:
 * fallbackLexemes), so a rare word, the question's point, keeps its chunks however many a common
 * word matches.
 */
export function fullTextQuery(language: string, question: BoundedQuestion, lexemes: QuestionLexeme[], scope: Scope, limit: number): SQL {
  // A start with no lexemes (stop words) matches nothing: ANDed onto it, the exclusions would make
  // it `!'word'`, every chunk without the word.
  const read = lexemes.length ? question : { start: question.start, exclusions: '' };
  // A start that excludes a word (`-word`) gets no fallback: an OR of its lexemes cannot honour
  // the exclusion, which may sit anywhere in its tree. Quotes are not honoured either, but the
  // phrase matches come first (AND). The exclusions past the cut are NOTs only, so the fallback
  // keeps them as a filter on its hits instead (orKept): a long pasted text with `ls -la` past its
  // cut kept its fallback. (`!` only appears in tsquery text as the NOT operator: the parser never
  // puts it in a lexeme.)
  const chunk = knowledgeChunks;
  const ranked = rankedFor(limit);
  // Written out where it is used (not a CTE's column): the planner estimates its matches from the
  // statistics and picks the GIN index or a scan that stops at the cap.
  const allWords = questionQuery(language, read);
  const orKept = fallbackKept(language, read.exclusions);
  // The rarest lexemes' matches one lexeme after the other (an Append runs its parts in order and
  // stops at the cap). A lexeme in a large share of the chunks is tested on the rows (ts_match_vq,
  // which the index cannot answer) instead of being looked up in the GIN index.
  const { candidates, held } = fallbackLexemes(lexemes, scope);
  const perLexeme = candidates.map(({ query, frequency }, i) => {
    const match = orKept(frequency < COMMON ? sql`${chunk.tsv} @@ ${query}::tsquery` : sql`ts_match_vq(${chunk.tsv}, ${query}::tsquery)`);
    // Only the words `held` picks: a one-time filter (no column in it), whose look-ups run, once,
    // only when a part of the fallback does.
    return matching(held ? sql`${match} and ${i}::int = any(array(select i from held))` : match, scope, ranked);
  });
  const orMatches = perLexeme.length ? sql.join(perLexeme.map((part) => sql`(${part})`), sql` union all `) : sql`select null::uuid as id where false`;
  const anyWords = lexemes.map(({ query }) => `(${query})`).join(' | ');
  // The score's queries are scalar subqueries: parsed once for the statement, where a generic plan
  // (PGlite's cached statements from their sixth run) parsed them again for every candidate.
  return sql`with ${held ? sql`held as (${held}), ` : sql``}and_hits as (
          ${allWordsMatching(allWords, lexemes, scope, ranked)}
        ), or_hits as (
          select distinct id from (
            select matches.id from (${orMatches}) as matches
            where (select count(*) from and_hits) < ${limit} and position('!' in ${websearchQuery(language, read.start)}::text) = 0
            limit ${ranked}
          ) as capped
          where id not in (select id from and_hits)
        ), candidates as (
          select id, true as all_words from and_hits
          union all
          select id, false from or_hits
        )
        select ${chunk.id} as id, ${chunk.entry_id} as entry_id, ${knowledgeEntries.filename} as filename,
          ${chunk.chunk_index} as chunk_index, ${chunk.text} as text, ${chunk.heading_path} as heading_path,
          candidates.all_words,
          ts_rank_cd(${chunk.tsv}, case when candidates.all_words then (select ${allWords}) else (select ${anyWords}::tsquery) end) as score
        from candidates
        join ${chunk} on ${chunk.id} = candidates.id
        join ${knowledgeEntries} on ${knowledgeEntries.id} = ${chunk.entry_id}
        -- Ties (common among partial matches) in document order: the earlier upload, then its earlier chunk — the same answer every time.
        order by candidates.all_words desc, score desc, ${knowledgeEntries.created_at}, ${chunk.entry_id}, ${chunk.chunk_index}
        limit ${limit}`;
}

/**
 * Words of a question that full text reads at most: distinct ones, and in all (repeats count). A
 * question's cost grows with its words — `websearch_to_tsquery` ANDs them all (a GIN look-up
 * each), and `ts_rank_cd` scores every candidate against every term (a 2,000-character question
 * of ~200 lexemes: 0.15–0.45 s on PGlite at 5,000 chunks, most of it ranking 60 candidates) — while
 * a question past a few dozen words finds its passages by them already. A word is a run of
 * letters, marks, decimal digits (any script's: `٣`, `１`) and letter numbers (`Ⅻ`) — what
 * PostgreSQL's text-search parser keeps together — counted whatever the case; stop words count
 * too. `_` and other numbers (`½`, `²`, `①`) split words, as the parser splits lexemes there:
 * `alpha_beta_gamma` is 3 words, as it is 3 lexemes (a phrase of them in `websearch_to_tsquery`),
 * not one word that is never cut (a 2,000-character `w1_w2_…` searched 340 lexemes as a phrase).
 * A word then gives at most ~1.5 lexemes (`a-b` is `a-b`, `a`, `b`).
 */
export const MAX_QUESTION_WORDS = 32;
export const MAX_QUESTION_WORD_TOKENS = 64;

/** A word of a question as boundedQuestion counts it (above). */
const QUESTION_WORD = /[\p{L}\p{M}\p{Nd}\p{Nl}]+/gu;

/**
 * Words of the exclusions past a question's cut that full text still honours, in all: a user's
 * `-word` past the first words was silently ignored with the rest. Each is a GIN look-up and a
 * term `ts_rank_cd` tests, so they are bounded too; an exclusion that would pass the cap is left out.
 */
export const MAX_EXCLUDED_WORDS = 16;

/**
 * A character of an exclusion's word: a printed one (a letter, mark, number, punctuation or
 * symbol: never a space, whatever the server's locale takes for one — C.UTF-8 reads an em space as
 * one, PGlite does not) that is no syntax to the query or tsvector parser (`-newt:ab` is
 * `!'newt' & 'ab'`, `-c|d` is `!'c' & 'd'`, `\` escapes).
 */
const EXCLUDED_CHAR = String.raw`(?:(?!["\\!&|()<>:*])[\p{L}\p{M}\p{N}\p{P}\p{S}])`;

/**
 * The parts of a question that boundedQuestion reads past its cut, left to right: a quoted part (to
 * its closing quote or the end, as `websearch_to_tsquery` pairs them: a backslash escapes nothing
 * there), whose `-` is no exclusion, or an exclusion of the simple forms only — `-word` or
 * `-"a phrase"` (no backslash in it) after ASCII whitespace (a space, tab, newline, vertical tab,
 * form feed or carriage return) and before it or the end, not after an `or` with nothing but
 * spaces and punctuation between (`x or, -y` is `x | !y`), nor `--word`.
 * Anything else is left out with the rest.
 */
const QUESTION_PARTS = new RegExp(
  String.raw`"[^"]*"?|(?<=[ \t\n\v\f\r])(?<!(?:^|[^\p{L}\p{M}\p{N}])or[^\p{L}\p{M}\p{N}]*)-(?:"[^"\\]*(?:"|$)|(?!-)${EXCLUDED_CHAR}+)(?=[ \t\n\v\f\r]|$)`,
  'giu',
);

/** A space to the query parser: ASCII whitespace in any locale; any Unicode space too where the server's locale says so (C.UTF-8 does, PGlite does not). */
const ASCII_SPACE = /[ \t\n\v\f\r]/;
const ANY_SPACE = /\s/u;

/**
 * Where a question's start cut at `cut` ends once a negated operand the cut falls in is dropped:
 * at the first `-` of the NOTs before that operand, or at `cut` when the cut falls in no such
 * operand (or at an operand's start: a NOT with nothing after it is dropped by the parser). Kept,
 * the operand's start was excluded in place of what the user wrote — `-"newt regenerates` or
 * `-newt-regenerates` cut after newt was `!'newt'`, every chunk holding newt, not those holding
 * both words as one — narrowing the results; dropped, it only widens them (a simple form is still
 * taken whole past the cut: QUESTION_PARTS). The operands are found as `websearch_to_tsquery`
 * reads them: waiting for an operand it takes `-` as a NOT, skips spaces and `!&|()<` (so
 * `-(x-y z)` negates `x-y` alone), and reads a quoted phrase to its closing quote or the end, or
 * a word up to a space, `!&|()<`, `"` or `:`; after an operand anything but a space (an `or`
 * too) starts the next one. `isSpace` is what the server takes for a space.
 */
function negationCut(text: string, cut: number, isSpace: RegExp): number {
  let waitingOperand = true;
  let negatedFrom = -1;
  let i = 0;
  while (i < cut) {
    const char = text[i]!;
    if (!waitingOperand) {
      if (isSpace.test(char)) i++;
      else waitingOperand = true;
      continue;
    }
    if (char === '-') {
      if (negatedFrom < 0) negatedFrom = i;
      i++;
      continue;
    }
    if (isSpace.test(char) || '!&|()<'.includes(char)) {
      i++;
      continue;
    }
    let end = i + 1;
    if (char === '"') {
      const closing = text.indexOf('"', end);
      end = closing < 0 ? text.length : closing + 1;
    } else {
      while (end < text.length && !isSpace.test(text[end]!) && !'!&|()<":'.includes(text[end]!)) end++;
    }
    if (end > cut) return negatedFrom < 0 ? cut : negatedFrom;
    negatedFrom = -1;
    waitingOperand = false;
    i = end;
  }
  return cut;
}

/**
 * A question as full text reads it: its start, and the exclusions past the start ('' when there
 * are none), to be read by `websearch_to_tsquery` apart from the start (questionQuery).
 */
export interface BoundedQuestion {
  start: string;
  exclusions: string;
}

/**
 * The start of `text` that full text searches for — up to the first word past MAX_QUESTION_WORDS
 * distinct words or MAX_QUESTION_WORD_TOKENS words in all (the rest is left out, its syntax — an
 * open quote, a trailing `or` — as `websearch_to_tsquery` takes it; a negated operand the cut
 * falls in is dropped, not shortened: negationCut) — and the exclusions of the
 * rest (QUESTION_PARTS; one the cut falls in is taken whole) while their words stay within
 * MAX_EXCLUDED_WORDS, joined by spaces. They are not added to the start's text: however that text
 * ends (`… or the`, `… or,`, `… or ""`), the query parser may read an `or` in it as an OR with
 * the first of them (every passage without the word). A normal question is whole.
 */
export function boundedQuestion(text: string): BoundedQuestion {
  const seen = new Set<string>();
  let words = 0;
  let cut = text.length;
  for (const match of text.matchAll(QUESTION_WORD)) {
    const word = match[0].toLowerCase();
    if ((!seen.has(word) && seen.size === MAX_QUESTION_WORDS) || words === MAX_QUESTION_WORD_TOKENS) {
      cut = match.index;
      break;
    }
    seen.add(word);
    words++;
  }
  if (cut === text.length) return { start: text, exclusions: '' };
  const excluded: string[] = [];
  let excludedWords = 0;
  // Read from the start, not from the cut: a quote the cut falls in holds the `-`s after the cut up to its end.
  for (const match of text.matchAll(QUESTION_PARTS)) {
    const [part] = match;
    // Quotes, and the exclusions the start holds whole (it reads them itself).
    if (!part.startsWith('-') || match.index + part.length <= cut) continue;
    const count = part.match(QUESTION_WORD)?.length ?? 0;
    if (count === 0 || excludedWords + count > MAX_EXCLUDED_WORDS) continue;
    excludedWords += count;
    excluded.push(part);
  }
  // A negated operand the cut falls in is dropped from the start (negationCut), as the server reads spaces or PGlite does.
  const start = text.slice(0, Math.min(negationCut(text, cut, ASCII_SPACE), negationCut(text, cut, ANY_SPACE)));
  return { start, exclusions: excluded.join(' ') };
}

/**
 * The tsquery of a bounded question: its start's, and — when exclusions past the cut were kept —
 * theirs ANDed on with `&&`, whatever the start reads as. Read apart, the exclusions give NOTs
 * only (or nothing: `&&` with an empty tsquery is the other one, on PostgreSQL and PGlite alike).
 * A question with none is read as it always was: the same SQL, the same parameters.
 */
export function questionQuery(language: string, question: BoundedQuestion): SQL {
  const start = websearchQuery(language, question.start);
  return question.exclusions ? sql`(${start} && ${websearchQuery(language, question.exclusions)})` : start;
}

function websearchQuery(language: string, text: string): SQL {
  return sql`websearch_to_tsquery(${language}::regconfig, ${text})`;
}

/**
 * What an OR fallback's match becomes with a bounded question's exclusions: that match, on chunks
 * their NOTs let through (tested on the row, ts_match_vq: a NOT-only query is no GIN look-up, it
 * would read the whole index). Exclusions of stop words give an empty tsquery, which matches no
 * chunk: `numnode(…) = 0` lets every one through. The query is a scalar subquery, computed once:
 * a custom plan folds the functions anyway, but a generic one (a named prepared statement, or
 * plan_cache_mode = force_generic_plan) parsed it twice a row (606 against 8 ms for 20,000
 * candidates in review). No exclusions: the match as it was, the same SQL.
 */
function fallbackKept(language: string, exclusions: string): (match: SQL) => SQL {
  if (!exclusions) return (match) => match;
  const excluded = sql`(select ${websearchQuery(language, exclusions)})`;
  return (match) => sql`${match} and (numnode(${excluded}) = 0 or ts_match_vq(${knowledgeChunks.tsv}, ${excluded}))`;
}

/** The full-text search statement for a question (its first words and later exclusions: boundedQuestion), written after its start's lexemes are looked up (questionLexemes). */
export async function fullTextStatement(db: Db, language: string, text: string, scope: Scope, limit: number): Promise<SQL> {
  const question = boundedQuestion(text);
  return fullTextQuery(language, question, await questionLexemes(db, language, question.start), scope, limit);
}

async function fullText(db: Db, language: string, text: string, scope: Scope, limit: number): Promise<(Passage & { score: number })[]> {
  const rows = await queryRows<Passage & { all_words: boolean; score: number }>(db, await fullTextStatement(db, language, text, scope, limit));
  const andHits = rows.filter((row) => row.all_words);
  const floor = andHits.length ? Number(andHits[andHits.length - 1]!.score) : 1;
  // rank / (rank + 1) maps [0, ∞) into [0, 1) in the same order; times the floor: below every AND hit.
  return rows.map(({ all_words, score, ...passage }) => {
    const rank = Number(score);
    return { ...passage, score: all_words ? rank : (floor * rank) / (rank + 1) };
  });
}

/** Chunks written since this process last analyzed knowledge_chunks, per database. */
const writtenSinceAnalyze = new WeakMap<object, number>();

/**
 * Keeps the planner's statistics of knowledge_chunks fresh enough for search (the lexeme
 * frequencies in `pg_stats` that rank a question's lexemes, and the estimates that choose between
 * the GIN index and a scan): ANALYZE once the chunks written since the last one pass 50 + 10 % of
 * the table, as autovacuum does on PostgreSQL. PGlite has no autovacuum: without this its tables
 * are never analyzed. Ingestion calls it after storing an entry's chunks.
 */
export async function refreshSearchStatistics(db: Db, chunksWritten: number): Promise<void> {
  const root = rootOf(db);
  const written = (writtenSinceAnalyze.get(root) ?? 0) + chunksWritten;
  // reltuples: the row count at the last ANALYZE (or VACUUM); -1 (0 before PostgreSQL 14) if never.
  const [table] = await queryRows<{ rows: number; analyzed: boolean }>(
    root,
    sql`select reltuples::float8 as rows, exists (select 1 from pg_stats where tablename = 'knowledge_chunks' and schemaname = current_schema()) as analyzed
        from pg_class where oid = 'knowledge_chunks'::regclass`,
  );
  if (table && table.analyzed && written <= 50 + 0.1 * Math.max(0, Number(table.rows))) {
    writtenSinceAnalyze.set(root, written);
    return;
  }
  writtenSinceAnalyze.set(root, 0);
  await root.execute(sql`analyze knowledge_chunks`);
  frequencyCache.delete(root);
}

/** The query's embedding, or null when the model fails (full text answers alone). */
async function queryEmbedding(deps: KnowledgeSearchDeps, model: string, principal: Principal, query: KnowledgeQuery): Promise<Float32Array | null> {
  try {
    const result = await deps.models.embed({
      model,
      values: [query.query],
      // Compared with the chunks' vectors by this model: a fallback's would rank by noise (full text answers instead).
      sameModel: true,
      signal: query.signal,
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
    // The caller's key or account went away after the request was authenticated (the meter's hold
    // found it so): answered as a request with those credentials now is (401), not with the
    // passages full text found meanwhile. Any other failure (the provider, the balance) leaves full text to answer.
    if (error instanceof CredentialsGoneError) throw error;
    // Stopped by its caller (a run cancelled): no full-text answer is wanted either.
    if (query.signal?.aborted) throw query.signal.reason;
    deps.log.warn({ err: error, model }, 'query embedding failed; knowledge search answers with full text alone');
    return null;
  }
}

const withoutIds = (hits: (Passage & { score: number })[]): KnowledgeHit[] => hits.map(({ id: _id, ...hit }) => hit);

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
  const model = deps.settings.EMBEDDING_MODEL;
  // Full text alone when there is nothing to compare the question's embedding with.
  const embedded = model && (await hasVectorTable(deps.db)) && (await anyEmbedded(deps.db, model, scope.where));
  if (!model || !embedded) return { data: withoutIds(await fullText(deps.db, language, query.query, scope, topK)), mode: 'full_text' };
  // The full-text candidates are looked up while the question is embedded (a provider's round
  // trip), not after: the request goes out first, and a turn of the event loop lets it reach the
  // socket before the full-text statement starts (on PGlite, statements run on this thread and
  // would hold it back until they end). When there is nothing to fuse, the candidates' first topK
  // answer: chunks holding only some of the words rank below all those holding every word
  // whatever the limit, and a larger limit only ranks more candidates.
  const limit = candidatesFor(topK);
  const nearestHits = queryEmbedding(deps, model, principal, query).then((vector) => vector && nearestChunks(deps.db, model, vector, scope.where, limit));
  const requestSent = new Promise(setImmediate);
  const [textHits, nearest] = await Promise.all([requestSent.then(() => fullText(deps.db, language, query.query, scope, limit)), nearestHits]);
  if (!nearest) return { data: withoutIds(textHits.slice(0, topK)), mode: 'full_text' };
  const fused = new Map<string, number>();
  const add = (id: string, rank: number) => fused.set(id, (fused.get(id) ?? 0) + 1 / (RRF_K + rank + 1));
  textHits.forEach((hit, rank) => add(hit.id, rank));
  nearest.forEach((match, rank) => add(match.chunk_id, rank));
  // A stable sort: ties keep the order they were added in (full-text rank first), not the chunks' random ids.
  const best = [...fused.entries()].sort((a, b) => b[1] - a[1]).slice(0, topK);
  const known = new Map<string, Passage>(textHits.map((hit) => [hit.id, hit]));
  for (const { chunk_id, distance: _distance, ...passage } of nearest) if (!known.has(chunk_id)) known.set(chunk_id, { id: chunk_id, ...passage });
  // Every fused id came with its passage from one list or the other.
  const data = best.map(([id, score]) => {
    const { id: _id, ...hit } = known.get(id)!;
    return { ...hit, score };
  });
  return { data, mode: 'hybrid' };
}
