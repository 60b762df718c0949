import { randomBytes } from 'node:crypto';
import { chmodSync, constants, copyFileSync, existsSync, linkSync, mkdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { parseEnv } from 'node:util';

import { z } from 'zod';

import { isDiskFullCode } from '../utils/error-chain.js';

// ==================== Schema ====================

export const DEFAULT_SUPERUSER_PASSWORD = 'changethis';
const DEFAULT_SECRET_KEYS = new Set(['changethis', 'secret', 'changeme']);

const bool = z
  .enum(['true', 'false', '1', '0', 'yes', 'no'])
  .transform((v) => v === 'true' || v === '1' || v === 'yes');
const int = (min: number, max: number) => z.coerce.number().int().min(min).max(max);
const emptyAsUndefined = (v: unknown) => (v === '' ? undefined : v);
const optionalString = z.preprocess(emptyAsUndefined, z.string().optional());

/**
 * A model provider's base URL (OPENAI_BASE_URL, a provider record's `base_url`). The SDKs and the
 * wire append the API's paths (`/chat/completions`) to it as text: a query or a fragment would
 * swallow them (`/v1?x=1/chat/completions`, `/v1#f` calls `/v1`). `user:pass@` is dropped by the
 * wire and refused by fetch (the SDKs' path), whose error quotes the URL with the password. Any of
 * these would fail every call.
 */
export const providerBaseUrl = () =>
  z
    .url({ protocol: /^https?$/ })
    .max(2048)
    .refine((url) => !/[?#]/.test(url), { error: 'A base URL has no query or fragment: the API paths are appended to it' })
    .refine((url) => !URL.canParse(url) || !(new URL(url).username || new URL(url).password), { error: 'A base URL holds no user:password@; set the API key instead' });

/** Every setting Keel reads. `.env.example` documents each one; keep the two in step. */
/** PostgreSQL's built-in text-search configurations (`select cfgname from pg_ts_config`), on 15 and 18 alike. */
export const SEARCH_LANGUAGES = [
  'simple', 'arabic', 'armenian', 'basque', 'catalan', 'danish', 'dutch', 'english', 'finnish', 'french', 'german', 'greek', 'hindi',
  'hungarian', 'indonesian', 'irish', 'italian', 'lithuanian', 'nepali', 'norwegian', 'portuguese', 'romanian', 'russian', 'serbian',
  'spanish', 'swedish', 'tamil', 'turkish', 'yiddish',
] as const;

/** The days a usage summary covers when the client names no `from`: BILLING_SUMMARY_MAX_DAYS may not be less. */
export const DEFAULT_SUMMARY_DAYS = 30;

/** The longest a credit window's block serves calls (services/credit-window.ts): part of what a reservation must outlast. */
export const CREDIT_BLOCK_MAX_AGE_MS = 30_000;

/** The shortest GATEWAY_STREAM_HEARTBEAT_MS but 0: the wait within which a stream's failure still answers its own status. */
export const GATEWAY_HEARTBEAT_MIN_MS = 1_000;

/** The most HTTP_REQUEST_TIMEOUT_MS can be: what a node may give a request, whatever this node's own setting. */
export const HTTP_REQUEST_TIMEOUT_MAX_MS = 3_600_000;

export const SettingsSchema = z.object({
  ENVIRONMENT: z.enum(['local', 'staging', 'production']).default('local'),
  PROJECT_NAME: z.string().min(1).default('Keel'),
  HOST: z.string().min(1).default('127.0.0.1'),
  PORT: int(0, 65535).default(8000),
  DATA_DIR: z.string().min(1).default('./data'),
  /** PGlite's directory; `memory://` keeps the database in memory (tests). */
  PGLITE_DATA_DIR: optionalString,
  /** Also compile PGlite's busiest functions with V8's optimizing compiler (see openPglite in db.ts). */
  PGLITE_WASM_TIER_UP: bool.default(false),
  /** Run PGlite on a worker thread of its own, beside the main thread (see openPgliteLink in db.ts); false: on the main thread. */
  PGLITE_THREAD: bool.default(true),
  /** PGLITE_THREAD's thread runs at this nice value (Linux): statements yield a busy core to the threads that answer requests. */
  PGLITE_THREAD_NICE: int(0, 19).default(10),
  /**
   * PGLITE_THREAD's thread runs under SCHED_IDLE (Linux, util-linux `chrt`): it never delays a
   * request's wake-ups, and it waits for as long as anything else keeps the cores busy.
   */
  PGLITE_THREAD_SCHED_IDLE: bool.default(false),
  /**
   * Embedded maintenance (core/maintenance.ts): PGlite has no autovacuum, so Keel VACUUMs and
   * ANALYZEs the tables past autovacuum's thresholds itself, one at a time, every
   * PGLITE_MAINTENANCE_INTERVAL_SECONDS, once the database has had nothing to do for
   * PGLITE_MAINTENANCE_IDLE_MS; a table whose oldest unfrozen transaction is older than
   * PGLITE_MAINTENANCE_FREEZE_AGE is vacuumed too (past twice that, whether idle or not).
   */
  PGLITE_MAINTENANCE: bool.default(true),
  PGLITE_MAINTENANCE_INTERVAL_SECONDS: int(1, 86_400).default(300),
  PGLITE_MAINTENANCE_IDLE_MS: int(0, 600_000).default(1_000),
  PGLITE_MAINTENANCE_FREEZE_AGE: int(1_000, 1_000_000_000).default(200_000_000),
  DATABASE_URL: z.preprocess(
    emptyAsUndefined,
    z.url({ protocol: /^postgres(ql)?$/, error: 'must be a postgres:// or postgresql:// URL (only PostgreSQL is supported); leave it unset for the embedded database' }).optional(),
  ),
  DATABASE_POOL_SIZE: int(1, 1000).default(10),
  DATABASE_POOL_IDLE_TIMEOUT_MS: int(0, 3_600_000).default(30_000),
  DATABASE_CONNECT_TIMEOUT_MS: int(100, 600_000).default(5_000),
  DATABASE_STATEMENT_TIMEOUT_MS: int(0, 3_600_000).default(30_000),
  REDIS_URL: z.preprocess(emptyAsUndefined, z.url({ protocol: /^rediss?$/ }).optional()),
  /** Prefix of every Redis key Keel writes, so deployments (or test runs) can share one Redis. */
  REDIS_KEY_PREFIX: z.string().max(64).regex(/^[\w:.-]*$/).default('keel:'),
  SECRET_KEY: optionalString,
  ACCESS_TOKEN_EXPIRE_MINUTES: int(1, 525_600).default(11_520),
  EMAIL_RESET_TOKEN_EXPIRE_HOURS: int(1, 720).default(48),
  FIRST_SUPERUSER: z.email().default('admin@example.com'),
  FIRST_SUPERUSER_PASSWORD: z.string().min(8).max(128).default(DEFAULT_SUPERUSER_PASSWORD),
  USERS_OPEN_REGISTRATION: bool.default(true),
  FRONTEND_HOST: z.url().default('http://localhost:5173'),
  BACKEND_CORS_ORIGINS: z
    .string()
    .default('')
    .transform((v) =>
      v
        .split(',')
        .map((s) => s.trim())
        .filter(Boolean),
    ),
  /**
   * Proxies in front of Keel whose X-Forwarded-For is believed: `false`, a number of hops, or
   * comma-separated addresses/CIDRs. `true` is refused: it would let any client pick its own IP.
   */
  TRUST_PROXY: z
    .string()
    .default('false')
    .transform((v, ctx) => {
      const value = v.trim();
      if (value === 'false' || value === '' || value === '0') return false as const;
      if (/^\d+$/.test(value)) return Number(value);
      if (value === 'true') {
        ctx.addIssue({ code: 'custom', message: 'give a hop count (e.g. 1) or the proxies\' addresses, not true' });
        return z.NEVER;
      }
      return value.split(',').map((s) => s.trim()).filter(Boolean);
    }),
  BODY_LIMIT_BYTES: int(1024, 100 * 1024 * 1024).default(1024 * 1024),
  HTTP_HEADERS_TIMEOUT_MS: int(1_000, 600_000).default(20_000),
  HTTP_REQUEST_TIMEOUT_MS: int(1_000, HTTP_REQUEST_TIMEOUT_MAX_MS).default(30_000),
  HTTP_KEEP_ALIVE_TIMEOUT_MS: int(1_000, 3_600_000).default(72_000),
  /** When set, `/metrics` needs `Authorization: Bearer <METRICS_TOKEN>`. */
  METRICS_TOKEN: z.preprocess(emptyAsUndefined, z.string().min(16).max(512).optional()),
  LOG_LEVEL: z.enum(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent']).default('info'),
  LOG_FORMAT: z.preprocess(emptyAsUndefined, z.enum(['pretty', 'json']).optional()),
  RATE_LIMIT_LOGIN_PER_IP: int(1, 1_000_000).default(30),
  RATE_LIMIT_LOGIN_PER_ACCOUNT: int(1, 1_000_000).default(10),
  RATE_LIMIT_LOGIN_ACCOUNT_CEILING: int(1, 1_000_000).default(100),
  RATE_LIMIT_SIGNUP_PER_IP: int(1, 1_000_000).default(10),
  RATE_LIMIT_SIGNUP_PER_ACCOUNT: int(1, 1_000_000).default(3),
  RATE_LIMIT_RECOVERY_PER_IP: int(1, 1_000_000).default(10),
  RATE_LIMIT_RECOVERY_PER_ACCOUNT: int(1, 1_000_000).default(3),
  RATE_LIMIT_WINDOW_SECONDS: int(1, 86_400).default(60),
  MAX_PROJECTS_PER_USER: int(1, 1_000_000).default(100),
  MAX_API_KEYS_PER_USER: int(1, 1_000_000).default(100),
  /**
   * API keys a user may keep, revoked and expired ones included (MAX_API_KEYS_PER_USER counts only
   * working ones): beyond it creating a key answers 409 until the user deletes some. Without it,
   * creating and revoking keys added rows without bound. Unset: ten times MAX_API_KEYS_PER_USER.
   */
  MAX_API_KEYS_KEPT_PER_USER: z.preprocess(emptyAsUndefined, int(1, 10_000_000).optional()),
  MAX_AGENTS_PER_USER: int(1, 1_000_000).default(100),
  /**
   * An agent's newest versions kept: a change that makes one more deletes the oldest past it that
   * no run names (a run's version stays readable). Without it every change of a 100,000-character
   * prompt added a row for good.
   */
  AGENT_VERSIONS_KEPT: int(1, 1_000_000).default(100),
  MAX_THREADS_PER_USER: int(1, 10_000_000).default(10_000),
  /** Knowledge folders a user may have (one more: 409): ten a project at MAX_PROJECTS_PER_USER's default. */
  MAX_KNOWLEDGE_FOLDERS_PER_USER: int(1, 1_000_000).default(1_000),
  /** Runs queued or running at once per user; one more answers 429. */
  MAX_ACTIVE_RUNS_PER_USER: int(1, 1_000_000).default(10),
  /** Model calls a run may make (each answer or round of tool calls is one); beyond it the run fails. */
  MAX_RUN_STEPS: int(1, 1_000).default(10),
  /**
   * Tool calls one step runs (in parallel); the model's calls past it are not run and answer it with
   * an error result, so a model (or a prompt injection) asking for hundreds cannot fan out that many
   * searches, embedding calls and queries at once.
   */
  MAX_TOOL_CALLS_PER_STEP: int(1, 1_000).default(32),
  /** A run's deadline from its start, in seconds: past it the model call is aborted and the run fails. */
  RUN_TIMEOUT_SECONDS: int(1, 86_400).default(600),
  /** How long a worker's hold on a running run lasts unless renewed (renewed every third of it). */
  RUN_LEASE_SECONDS: int(1, 3_600).default(30),
  /** Times a run is taken up again after its worker died before it fails for good. */
  RUN_MAX_ATTEMPTS: int(1, 100).default(3),
  /** How often queued runs without a job and runs with an expired lease are looked for. */
  RUN_SWEEP_INTERVAL_SECONDS: int(1, 3_600).default(10),
  /** How long a finished run's events stay replayable (GET /runs/{id}/events). */
  RUN_EVENTS_TTL_SECONDS: int(60, 31_536_000).default(3_600),
  /**
   * Longest silence on a run's event stream before a keep-alive comment. 10, not SPEC §5's 15: a
   * timer set to 15 s fires a little after it, and a proxy or client that gives up at 15 s of
   * silence would see one gap too long now and then.
   */
  RUN_EVENTS_KEEPALIVE_SECONDS: int(1, 15).default(10),
  /** Streamed text (`message.delta`) is written to the embedded event log at most this often (live readers get it at once). */
  RUN_EVENTS_FLUSH_MS: int(1, 10_000).default(50),
  /**
   * Run-event streams one user may hold open at once on each process (`GET /runs/{id}/events` and
   * streamed `agent:` completions on /v1; one more answers 429 naming this setting). Each holds a
   * socket, a keep-alive timer and a reader of the run's log (buffering up to ~2,000 events).
   * Counted per node, not across a cluster: behind a load balancer a user may hold this many on each.
   */
  RUN_EVENTS_MAX_STREAMS_PER_USER: int(1, 100_000).default(32),
  /** Longest `content` of a message a client posts or edits, in characters (UTF-16 code units). */
  MAX_MESSAGE_CHARS: int(1, 100_000_000).default(100_000),
  /**
   * Messages a thread may hold: a client message (posted, a run's input, an `agent:` completion's
   * history) that would take it past this answers 409. A run's own messages count but are not
   * refused (a run adds at most MAX_RUN_STEPS × (1 + MAX_TOOL_CALLS_PER_STEP)). The default is
   * above the longest conversation a model's context takes (1M tokens at ~20 a short turn) and the
   * history an `agent:` completion may resubmit, but bounds what every run step reads and sends.
   */
  MAX_MESSAGES_PER_THREAD: int(1, 10_000_000).default(50_000),
  SHUTDOWN_TIMEOUT_MS: int(0, 600_000).default(10_000),
  /** Unset: 5000 outside `local`, 0 in it (see drainMs in server.ts). */
  SHUTDOWN_DRAIN_MS: z.preprocess(emptyAsUndefined, int(0, 600_000).optional()),
  JOB_ATTEMPTS: int(1, 100).default(5),
  JOB_BACKOFF_MS: int(1, 3_600_000).default(2_000),
  JOB_CONCURRENCY: int(1, 1_000).default(4),
  /** Agent runs one `keel worker` executes at once (their own queue: runs mostly wait on a model). */
  RUN_CONCURRENCY: int(1, 10_000).default(32),
  /**
   * Emails one worker sends at once (their own queue: a password-recovery email does not wait behind
   * document ingestions, which keep JOB_CONCURRENCY).
   */
  EMAIL_CONCURRENCY: int(1, 1_000).default(4),
  /** `smtp` sends through SMTP_* (off while they are unset); `console` logs each email instead (local only). */
  EMAIL_BACKEND: z.enum(['smtp', 'console']).default('smtp'),
  SMTP_HOST: optionalString,
  SMTP_PORT: int(1, 65535).default(587),
  SMTP_TLS: bool.default(true),
  SMTP_SSL: bool.default(false),
  SMTP_USER: optionalString,
  SMTP_PASSWORD: optionalString,
  EMAILS_FROM_EMAIL: z.preprocess(emptyAsUndefined, z.email().optional()),
  EMAILS_FROM_NAME: optionalString,
  OPENAI_API_KEY: optionalString,
  OPENAI_BASE_URL: z.preprocess(emptyAsUndefined, providerBaseUrl().optional()),
  ANTHROPIC_API_KEY: optionalString,
  GOOGLE_GENERATIVE_AI_API_KEY: optionalString,
  MODEL_TIMEOUT_MS: int(100, 3_600_000).default(120_000),
  /** A streamed model call's total time, retries and fallbacks included: then it ends with an error and its upstream request is closed. */
  MODEL_STREAM_TIMEOUT_MS: int(1_000, 86_400_000).default(600_000),
  /**
   * The most an answer may carry: a streamed answer's text, reasoning and tool-call input together
   * (characters); a non-streamed body, chat or embeddings, of any provider (bytes) and each stream
   * event. An embeddings answer may carry 128 KiB a vector asked for when that is more, a chat
   * answer with log probabilities 160 bytes more an entry asked for (answer-limit.ts: max_tokens, or
   * the model's max_output_tokens when smaller, × (1 + top_logprobs)), at most 8 times this more.
   * Past it the answer is not read further: an upstream error (502) naming the limit.
   */
  MODEL_MAX_RESPONSE_BYTES: int(1_024, 1_073_741_824).default(16_777_216),
  /**
   * The most Keel downloads of one image (or file) a prompt names by URL, for a provider that takes
   * none by URL: past it the call is refused (400). The SDK's own limit is 2 GiB, held in memory.
   */
  MODEL_MAX_DOWNLOAD_BYTES: int(1_024, 1_073_741_824).default(20_971_520),
  /**
   * The most images and files one call downloads (distinct URLs; 0: none, a prompt naming one is
   * refused), and their bytes together, each file within MODEL_MAX_DOWNLOAD_BYTES: a request of a
   * few KB could name hundreds of URLs (downloads.ts). Past either, the call is refused (400).
   */
  MODEL_MAX_DOWNLOADS: int(0, 10_000).default(50),
  MODEL_MAX_DOWNLOAD_TOTAL_BYTES: int(1_024, 10_737_418_240).default(52_428_800),
  MODEL_MAX_RETRIES: int(0, 10).default(2),
  MODEL_RETRY_MAX_WAIT_MS: int(0, 300_000).default(20_000),
  /**
   * The output maximum a call that sets none is held for (its credit reservation, a key budget's
   * hold, a run's start check), and then sent upstream as its maximum, so its output cannot cost
   * more than was held. A call that holds nothing by it (billing off and no key budget, a free model) is sent
   * none by an OpenAI-style provider, which lets the answer run to the model's own limit as OpenAI
   * does; an Anthropic or Google model is sent it always (Anthropic requires one). A model's own
   * smaller `max_output_tokens` wins.
   */
  MODEL_DEFAULT_MAX_OUTPUT_TOKENS: int(1, 10_000_000).default(4_096),
  /** Largest body of a /v1 chat or embeddings request (images travel inline as base64). */
  GATEWAY_BODY_LIMIT_BYTES: int(1024, 100 * 1024 * 1024).default(20 * 1024 * 1024),
  /**
   * A streamed /v1 chat completion whose model has sent nothing for this long (a model that thinks
   * before its first token) gets an SSE comment (`: keep-alive`, which OpenAI's clients skip), and
   * again after each such silence, so that a proxy's or load balancer's idle timeout (often 60 s)
   * does not cut it. The first one commits the answer to 200: a failure before it still answers its
   * own status, one after it is the stream's error event. 0: none; otherwise at least 1000 ms
   * (GATEWAY_HEARTBEAT_MIN_MS): a shorter wait sent even a fast 402, 429 or 502 down the 200 path,
   * as an error event, for no proxy's sake (idle timeouts are tens of seconds).
   */
  GATEWAY_STREAM_HEARTBEAT_MS: int(0, 600_000)
    .refine((ms) => ms === 0 || ms >= GATEWAY_HEARTBEAT_MIN_MS, { error: `must be 0 (off) or at least ${GATEWAY_HEARTBEAT_MIN_MS} ms` })
    .default(15_000),

  /** On: a model call reserves its worst-case cost from the user's credits first (402 when short). Off: usage is recorded, balances untouched. */
  BILLING_ENABLED: bool.default(false),
  /** A credit reservation not settled within this time (its process crashed) is released by the sweep. */
  BILLING_RESERVATION_TTL_SECONDS: int(10, 604_800).default(900),
  /**
   * Credit windows: each process takes a user's credit in blocks of this many calls' worst case
   * (more for a busy user: twice their calls in flight, or a second's worth at their pace, up to
   * 16 × this) and holds calls from the block in memory (no database statement per call); 0 holds
   * every call in the database. Never overdraws either way (see src/services/credit-window.ts).
   */
  BILLING_CREDIT_WINDOW_CALLS: int(0, 100_000).default(32),
  /**
   * The most days a usage summary grouped by `day` may span (422 on `from` past it): its groups are
   * days × models × keys, and a range of years answered one per day (tens of MB for a busy account,
   * built while PGlite's one thread waits). A summary not grouped by day takes any range.
   */
  BILLING_SUMMARY_MAX_DAYS: int(DEFAULT_SUMMARY_DAYS, 36_500).default(366),
  /** Usage records are written in batches: at most this long after the call, or at USAGE_FLUSH_MAX_ROWS rows. */
  USAGE_FLUSH_INTERVAL_MS: int(10, 600_000).default(1_000),
  /**
   * Also the most rows one statement writes. Embedded, a statement runs on the server's thread
   * (PGlite): 128 rows cost about as little per row as 500 and hold the event loop a quarter as long.
   */
  USAGE_FLUSH_MAX_ROWS: int(1, 10_000).default(128),
  /**
   * The most unwritten records (usage records and credit settlements, a
   * billed call's usage record and settlement counting as one, so that the limit counts calls, not
   * how many statements a call needs: queued, kept for a retry, or in the statement being written;
   * settlements taken back from saved files aside while writes succeed; credit releases, which
   * carry no usage and no charge, never counted) a process
   * holds while the database does not take them; at this many it refuses model calls with 503 until
   * the database takes them again: a call it could not record is not served, and no record is
   * dropped. Each takes ~0.5–1 KB of memory (a billed call's two, ~1 KB).
   */
  USAGE_MAX_PENDING_ROWS: int(100, 10_000_000).default(1_000_000),

  /** Where stored files (knowledge-base uploads) live: `local` under DATA_DIR/storage, or `s3` in S3_BUCKET. */
  STORAGE_BACKEND: z.enum(['local', 's3']).default('local'),
  S3_BUCKET: optionalString,
  /** An S3-compatible server's URL (MinIO, R2, …); unset for AWS S3. */
  S3_ENDPOINT: z.preprocess(emptyAsUndefined, z.url({ protocol: /^https?$/ }).optional()),
  S3_REGION: z.string().min(1).default('us-east-1'),
  /** Unset: the AWS SDK's own chain (environment, profile, instance role). */
  S3_ACCESS_KEY_ID: optionalString,
  S3_SECRET_ACCESS_KEY: optionalString,
  /** `bucket` in the path rather than the host name; most S3-compatible servers need it. */
  S3_FORCE_PATH_STYLE: bool.default(false),
  /**
   * A connection to the bucket that carries nothing for this long is given up, and its request
   * fails (503) after the SDK's three tries of it: a server that stops answering holds no upload,
   * download or ingestion job for ever (a download cut half-way is not tried again). Also the
   * longest a connection may take to open (at most 10 s). A download whose client reads nothing
   * for this long is cut as well.
   */
  S3_TIMEOUT_SECONDS: int(1, 3600).default(60),

  /** Catalog id of the model that embeds knowledge-base chunks; unset: knowledge search is full-text only. */
  EMBEDDING_MODEL: optionalString,
  /** Largest file one upload may hold (413 beyond it, answered before the rest is read). */
  KB_MAX_FILE_BYTES: int(1, 10 * 1024 ** 3).default(20 * 1024 * 1024),
  /**
   * Total one user's entries may count for (the guide's 50 MB): each the larger of its file and the
   * text its chunks hold, at least 4 KiB (crud/knowledge.ts chargedBytes). An upload past it is
   * refused (413); an ingestion whose text would pass it fails the entry.
   */
  KB_MAX_BYTES_PER_USER: int(1, 1024 ** 4).default(50 * 1024 * 1024),
  /**
   * Uploads one user may have in progress at once (one more: 429). Each may write up to
   * KB_MAX_FILE_BYTES to storage before the quota is counted again at its end, so this bounds the
   * disk one user's concurrent uploads can fill meanwhile.
   */
  KB_MAX_UPLOADS_IN_FLIGHT_PER_USER: int(1, 10_000).default(8),
  /** PostgreSQL text-search configuration chunks are indexed and queries parsed with. Changing it needs a reindex. */
  KB_SEARCH_LANGUAGE: z.enum(SEARCH_LANGUAGES).default('english'),
  /** Chunks per embeddings request. */
  KB_EMBED_BATCH: int(1, 2_048).default(64),
  /** How long an ingestion may go without renewing its claim before the sweeper hands the entry to another worker. */
  KB_INGEST_LEASE_MS: int(1_000, 3_600_000).default(300_000),
  /** Ingestions of one entry that may die (a worker killed, a lease lost) before it is failed rather than retried. */
  KB_INGEST_MAX_ATTEMPTS: int(1, 100).default(3),
  /** How often a worker looks for entries left pending or with a stale claim. */
  KB_SWEEP_INTERVAL_MS: int(1_000, 3_600_000).default(60_000),
  /** Most tokens (o200k) in one indexed passage of a knowledge-base document, overlap included. */
  KB_CHUNK_TOKENS: int(32, 8192).default(400),
  /** Tokens of a passage's end repeated at the start of the next one (at most half of KB_CHUNK_TOKENS). */
  KB_CHUNK_OVERLAP_TOKENS: int(0, 4096).default(60),
  /** Time to parse one document before it is abandoned and its entry marked failed. */
  KB_EXTRACT_TIMEOUT_SECONDS: int(1, 3600).default(120),
  /** Heap of the thread that parses one PDF, DOCX, HTML, CSV or JSON document. */
  KB_EXTRACT_MAX_MEMORY_MB: int(32, 16_384).default(256),
  /**
   * All the memory reading one document may add to the process: the parsing thread's heap and what
   * the parsers unpack outside it (typed arrays, which the heap limit does not cover).
   */
  KB_EXTRACT_MAX_TOTAL_MEMORY_MB: int(64, 65_536).default(512),
  /** Most characters of text extracted from one document; a longer one fails with a message saying so. */
  KB_MAX_TEXT_CHARS: int(1_000, 1_000_000_000).default(20_000_000),
});

export type RawSettings = z.infer<typeof SettingsSchema>;
export type Settings = Readonly<
  Omit<RawSettings, 'SECRET_KEY' | 'LOG_FORMAT' | 'MAX_API_KEYS_KEPT_PER_USER'> & {
    SECRET_KEY: string;
    LOG_FORMAT: 'pretty' | 'json';
    MAX_API_KEYS_KEPT_PER_USER: number;
    /** Absolute data directory. */
    dataDir: string;
    emailsEnabled: boolean;
  }
>;

export class ConfigError extends Error {}

/** Names Keel reads from the environment besides the settings (a `.env` may hold them too). */
const OTHER_KNOWN_NAMES = new Set(['KEEL_SUPERUSER_PASSWORD', 'NODE_ENV']);

// ==================== Loading ====================

/** Reads `.env` (when present) under the real environment, which wins. */
export function readEnvironment(envFile = '.env', env: NodeJS.ProcessEnv = process.env): Record<string, string | undefined> {
  const fromFile = existsSync(envFile) ? parseEnv(readFileSync(envFile, 'utf8')) : {};
  return { ...fromFile, ...env };
}

/** Validates settings once; a bad value throws a ConfigError naming the variable. */
export function loadSettings(source: Record<string, string | undefined> = readEnvironment()): Settings {
  const keys = Object.keys(SettingsSchema.shape);
  // An empty value means "use the default", for every setting alike.
  const picked = Object.fromEntries(keys.map((k) => [k, source[k] === '' ? undefined : source[k]]));
  const parsed = SettingsSchema.safeParse(picked);
  if (!parsed.success) {
    const lines = parsed.error.issues.map((issue) => `${issue.path.join('.')}: ${issue.message}`);
    throw new ConfigError(lines.length === 1 ? lines[0]! : `Invalid settings:\n  ${lines.join('\n  ')}`);
  }
  const raw = parsed.data;
  const dataDir = resolve(raw.DATA_DIR);
  // Named here, before anything opens a file under it: what fails later says "EEXIST" or "ENOTDIR" of a path inside it.
  if (isFile(dataDir)) {
    throw new ConfigError(`DATA_DIR: ${dataDir} is a file, not a directory: set DATA_DIR to a directory (it is created if missing), or move the file away`);
  }
  const local = raw.ENVIRONMENT === 'local';

  if (!local) {
    if (!raw.SECRET_KEY || DEFAULT_SECRET_KEYS.has(raw.SECRET_KEY)) {
      throw new ConfigError(`SECRET_KEY: must be set to a random value when ENVIRONMENT=${raw.ENVIRONMENT}`);
    }
    if (raw.FIRST_SUPERUSER_PASSWORD === DEFAULT_SUPERUSER_PASSWORD) {
      throw new ConfigError(`FIRST_SUPERUSER_PASSWORD: the default is refused when ENVIRONMENT=${raw.ENVIRONMENT}`);
    }
  }
  if (raw.SECRET_KEY !== undefined && raw.SECRET_KEY.length < 32) {
    throw new ConfigError('SECRET_KEY: must be at least 32 characters');
  }
  if (raw.EMAIL_BACKEND === 'console' && !local) {
    throw new ConfigError(`EMAIL_BACKEND: console logs every email (reset links included) and is refused when ENVIRONMENT=${raw.ENVIRONMENT}`);
  }

  if (raw.PGLITE_MAINTENANCE && raw.PGLITE_MAINTENANCE_IDLE_MS >= raw.PGLITE_MAINTENANCE_INTERVAL_SECONDS * 1000) {
    // A round waits for the idle time until the next is due: it would never find it, and do nothing but the urgent.
    throw new ConfigError('PGLITE_MAINTENANCE_IDLE_MS: must be less than PGLITE_MAINTENANCE_INTERVAL_SECONDS (in ms)');
  }

  if (raw.PGLITE_THREAD_SCHED_IDLE && !raw.PGLITE_THREAD) {
    throw new ConfigError('PGLITE_THREAD_SCHED_IDLE: schedules the embedded database\'s own thread, so it needs PGLITE_THREAD=true');
  }

  if (raw.STORAGE_BACKEND === 's3' && !raw.S3_BUCKET) {
    throw new ConfigError('S3_BUCKET: must be set when STORAGE_BACKEND=s3');
  }
  if (Boolean(raw.S3_ACCESS_KEY_ID) !== Boolean(raw.S3_SECRET_ACCESS_KEY)) {
    throw new ConfigError('S3_ACCESS_KEY_ID and S3_SECRET_ACCESS_KEY: set both or neither');
  }

  if (raw.KB_CHUNK_OVERLAP_TOKENS * 2 > raw.KB_CHUNK_TOKENS) {
    throw new ConfigError(`KB_CHUNK_OVERLAP_TOKENS: at most half of KB_CHUNK_TOKENS (${raw.KB_CHUNK_TOKENS}), got ${raw.KB_CHUNK_OVERLAP_TOKENS}`);
  }
  if (raw.KB_EXTRACT_MAX_TOTAL_MEMORY_MB <= raw.KB_EXTRACT_MAX_MEMORY_MB) {
    throw new ConfigError(`KB_EXTRACT_MAX_TOTAL_MEMORY_MB: must exceed KB_EXTRACT_MAX_MEMORY_MB (${raw.KB_EXTRACT_MAX_MEMORY_MB}), the heap alone, got ${raw.KB_EXTRACT_MAX_TOTAL_MEMORY_MB}`);
  }
  if (raw.MAX_API_KEYS_KEPT_PER_USER !== undefined && raw.MAX_API_KEYS_KEPT_PER_USER < raw.MAX_API_KEYS_PER_USER) {
    throw new ConfigError(`MAX_API_KEYS_KEPT_PER_USER: must be at least MAX_API_KEYS_PER_USER (${raw.MAX_API_KEYS_PER_USER}): revoked and expired keys count toward it too; got ${raw.MAX_API_KEYS_KEPT_PER_USER}`);
  }
  if (raw.KB_MAX_FILE_BYTES > raw.KB_MAX_BYTES_PER_USER) {
    throw new ConfigError('KB_MAX_FILE_BYTES: must not exceed KB_MAX_BYTES_PER_USER');
  }

  // The sweep releases a reservation older than the TTL as one whose process died: a call still
  // running then has lost its hold, and other calls may hold the credit it is about to be charged.
  // A call holds from its reservation until it ends: a stream at most MODEL_STREAM_TIMEOUT_MS, any
  // other call its attempts and the waits between them; a credit window's block serves calls for
  // up to 30 s after it was taken (credit-window.ts).
  const longestCallMs = Math.max(
    raw.MODEL_STREAM_TIMEOUT_MS,
    raw.MODEL_TIMEOUT_MS * (raw.MODEL_MAX_RETRIES + 1) + raw.MODEL_RETRY_MAX_WAIT_MS * raw.MODEL_MAX_RETRIES,
  );
  const heldSeconds = Math.ceil((longestCallMs + CREDIT_BLOCK_MAX_AGE_MS) / 1000);
  if (raw.BILLING_RESERVATION_TTL_SECONDS <= heldSeconds) {
    throw new ConfigError(
      `BILLING_RESERVATION_TTL_SECONDS: must be more than ${heldSeconds} s, the longest a model call holds its reservation (MODEL_STREAM_TIMEOUT_MS, or MODEL_TIMEOUT_MS × (MODEL_MAX_RETRIES + 1) + MODEL_RETRY_MAX_WAIT_MS × MODEL_MAX_RETRIES, and 30 s of a credit window block's age); got ${raw.BILLING_RESERVATION_TTL_SECONDS}`,
    );
  }

  return Object.freeze({
    ...raw,
    SECRET_KEY: raw.SECRET_KEY ?? localSecretKey(dataDir),
    LOG_FORMAT: raw.LOG_FORMAT ?? (local ? 'pretty' : 'json'),
    MAX_API_KEYS_KEPT_PER_USER: raw.MAX_API_KEYS_KEPT_PER_USER ?? 10 * raw.MAX_API_KEYS_PER_USER,
    dataDir,
    emailsEnabled: raw.EMAIL_BACKEND === 'console' || Boolean(raw.SMTP_HOST && raw.EMAILS_FROM_EMAIL),
  });
}

/** Whether `path` exists and is something other than a directory (a path through a file is left to what opens it). */
function isFile(path: string): boolean {
  try {
    return statSync(path, { throwIfNoEntry: false })?.isDirectory() === false;
  } catch {
    return false;
  }
}

/** In `local`, a random key kept beside the data, so tokens survive restarts without configuration. */
function localSecretKey(dataDir: string): string {
  const file = join(dataDir, '.secret_key');
  try {
    if (existsSync(file)) return checkedKeyFile(file);
    mkdirSync(dataDir, { recursive: true, mode: 0o700 });
    const key = randomBytes(48).toString('base64url');
    // Written whole under a name of its own, then linked in place. A link never replaces a file, so
    // of processes starting together on a fresh data dir exactly one key wins, and none can read a
    // key file half written: created and then written in place, a second process read it empty and
    // stopped ("holds 0 characters"). A file not written (a full disk) is a draft, never the key.
    const draft = `${file}.${process.pid}-${randomBytes(6).toString('hex')}.tmp`;
    try {
      // A Buffer: `flush` (fsync before the link, so a power cut cannot leave the key empty) is
      // skipped by Node 20's fast path for strings.
      writeFileSync(draft, Buffer.from(key), { mode: 0o600, flag: 'wx', flush: true });
      if (!linkedExclusively(draft, file)) return checkedKeyFile(file);
    } finally {
      rmSync(draft, { force: true });
    }
    // Apart: a key written whole stays, even where the mode cannot be set (some network mounts).
    chmodSync(file, 0o600);
    return key;
  } catch (error) {
    if (error instanceof ConfigError) throw error;
    const code = (error as NodeJS.ErrnoException).code ?? 'error';
    const remedy = isDiskFullCode(code) ? `free space on the disk holding ${dataDir}` : `make ${dataDir} writable by this user or set DATA_DIR`;
    throw new ConfigError(`DATA_DIR: cannot keep the local secret key in ${file} (${code}); ${remedy}`);
  }
}

/** Links `from` at `to` unless something is there already (then false: another process's file won). */
function linkedExclusively(from: string, to: string): boolean {
  try {
    linkSync(from, to);
    return true;
  } catch (error) {
    const { code } = error as NodeJS.ErrnoException;
    if (code === 'EEXIST') return false;
    // A file system without hard links (SMB/CIFS, many FUSE mounts): copied under an exclusive
    // create instead, which still lets one process win; a racing reader may then, in the copy's
    // instant, find the key short and stop, as before links were used.
    if (code !== 'EPERM' && code !== 'ENOTSUP' && code !== 'EOPNOTSUPP' && code !== 'ENOSYS') throw error;
  }
  try {
    copyFileSync(from, to, constants.COPYFILE_EXCL);
    return true;
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'EEXIST') return false;
    throw error;
  }
}

function checkedKeyFile(file: string): string {
  const key = readFileSync(file, 'utf8').trim();
  if (key.length < 32) {
    throw new ConfigError(`SECRET_KEY: ${file} holds ${key.length} characters, at least 32 are needed; delete the file to have a new key generated (signed-in users must log in again)`);
  }
  return key;
}

/** Damerau–Levenshtein distance (optimal string alignment): typos, including swapped letters. */
function editDistance(a: string, b: string): number {
  const d = Array.from({ length: a.length + 1 }, (_, i) => Array.from({ length: b.length + 1 }, (_, j) => (i === 0 ? j : j === 0 ? i : 0)));
  for (let i = 1; i <= a.length; i++) {
    for (let j = 1; j <= b.length; j++) {
      const cost = a[i - 1] === b[j - 1] ? 0 : 1;
      d[i]![j] = Math.min(d[i - 1]![j]! + 1, d[i]![j - 1]! + 1, d[i - 1]![j - 1]! + cost);
      if (i > 1 && j > 1 && a[i - 1] === b[j - 2] && a[i - 2] === b[j - 1]) d[i]![j] = Math.min(d[i]![j]!, d[i - 2]![j - 2]! + 1);
    }
  }
  return d[a.length]![b.length]!;
}

/**
 * One warning for each name in `.env` that is not a setting (a typo there is otherwise silently
 * ignored), with the closest setting when one is near. The environment itself is not checked: it
 * holds many variables that are not Keel's.
 */
export function envFileWarnings(envFile = '.env'): string[] {
  if (!existsSync(envFile)) return [];
  const settings = Object.keys(SettingsSchema.shape);
  const known = new Set([...settings, ...OTHER_KNOWN_NAMES]);
  return Object.keys(parseEnv(readFileSync(envFile, 'utf8')))
    .filter((name) => !known.has(name))
    .map((name) => {
      const [best] = settings
        .map((setting) => ({ setting, distance: editDistance(name.toUpperCase(), setting) }))
        .sort((x, y) => x.distance - y.distance);
      const hint = best && best.distance <= Math.max(2, Math.floor(name.length / 4)) ? ` (did you mean ${best.setting}?)` : '';
      return `${envFile}: ${name} is not a Keel setting and is ignored${hint}`;
    });
}
