/**
 * Embedded maintenance: autovacuum's job, for PGlite, which has none. Without it the embedded
 * database never VACUUMs or ANALYZEs: the rows billing rewrites all day (a credit reservation
 * inserted and deleted per hold, the accounts and API keys every usage flush updates) leave dead
 * tuples and index bloat nothing reclaims, the planner never has statistics, and after ~2 billion
 * write transactions the rows never frozen would read as written in the future (PostgreSQL's
 * wraparound). The freeze covers this database's tables; the cluster's oldest transaction id stays
 * that of template0 and template1 (frozen by initdb, never vacuumed here: PGlite's one session
 * cannot connect to them), which only PostgreSQL's wraparound warnings and pg_xact's truncation read.
 *
 * Every PGLITE_MAINTENANCE_INTERVAL_SECONDS (an unref'd timer) a round reads each table's counters
 * (pg_stat_all_tables: PGlite keeps them while it runs, and loses them at every close, measured in
 * bench/RESULTS.md) and its transaction age, and VACUUMs and/or ANALYZEs the tables past
 * autovacuum's default thresholds, one statement at a time, each once the session has had nothing
 * in flight for PGLITE_MAINTENANCE_IDLE_MS: the one session runs every statement, so a VACUUM
 * delays every request that comes while it runs. A table whose transaction age is past twice
 * PGLITE_MAINTENANCE_FREEZE_AGE does not wait for that. A failure is logged and the round goes on;
 * the next round tries again. On a PostgreSQL server autovacuum does all this: nothing runs there.
 *
 * It starts with the app (app.ts), after `keel start` has migrated (and migrations hold the
 * session while they run); it stops at the app's close before anything else closes, waiting only
 * for the statement in flight, which every other statement would wait for anyway.
 */
import type { Settings } from './config.js';
import type { Database } from './db.js';
import type { Logger } from './logger.js';

// PostgreSQL's autovacuum defaults (autovacuum_vacuum_threshold, _scale_factor, _insert_*, analyze_*).
const VACUUM_THRESHOLD = 50;
const VACUUM_SCALE = 0.2;
const INSERT_VACUUM_THRESHOLD = 1_000;
const INSERT_VACUUM_SCALE = 0.2;
const ANALYZE_THRESHOLD = 50;
const ANALYZE_SCALE = 0.1;
/** A table this much larger (in pages) than at its last VACUUM or ANALYZE is analyzed: the counters since were lost at a restart. */
const GROWTH_SCALE = 0.2;
const GROWTH_PAGES = 16;
/** How often a round looks again whether the database has become idle. */
const IDLE_POLL_MS = 100;

/** What a round reads about a table (pg_class and pg_stat_all_tables). */
export interface TableState {
  /** Quoted as needed (`oid::regclass`): safe to put in a statement. */
  table: string;
  /** pg_class.reltuples: rows at the last VACUUM or ANALYZE; -1 if there was none. */
  tuples: number;
  dead: number;
  modified: number;
  inserted: number;
  /** Oldest unfrozen transaction id's age (the table's or its TOAST table's), or multixact age, whichever is larger. */
  xidAge: number;
  /** Whether pg_statistic has rows for it. */
  analyzed: boolean;
  /** Pages now, and at the last VACUUM or ANALYZE (pg_class.relpages). */
  pages: number;
  lastPages: number;
  system: boolean;
}

export interface MaintenanceTask {
  table: string;
  vacuum: boolean;
  analyze: boolean;
  /** Past the freeze age: VACUUM (FREEZE), so the table's age starts again from 0. */
  freeze: boolean;
  /** Past twice the freeze age: runs whether the database is idle or not. */
  urgent: boolean;
  reasons: string[];
}

/** Which of VACUUM and ANALYZE `state` needs, and why; null when neither. */
export function taskFor(state: TableState, freezeAge: number): MaintenanceTask | null {
  const tuples = Math.max(0, state.tuples);
  const reasons: string[] = [];
  let vacuum = false;
  let analyze = false;
  if (state.dead > VACUUM_THRESHOLD + VACUUM_SCALE * tuples) {
    vacuum = true;
    reasons.push('dead tuples');
  }
  if (state.inserted > INSERT_VACUUM_THRESHOLD + INSERT_VACUUM_SCALE * tuples) {
    vacuum = true;
    reasons.push('inserted since vacuum');
  }
  if (state.xidAge > freezeAge) {
    vacuum = true;
    reasons.push('transaction age');
  }
  if (state.modified > ANALYZE_THRESHOLD + ANALYZE_SCALE * tuples) {
    analyze = true;
    reasons.push('modified since analyze');
  } else if (!state.system && state.pages > 0 && (state.tuples < 0 || (state.tuples > 0 && !state.analyzed))) {
    // Never analyzed (PGlite's counters start at 0 at each open: a table filled before never reaches the threshold).
    analyze = true;
    reasons.push('never analyzed');
  } else if (!state.system && state.lastPages > 0 && state.pages > state.lastPages * (1 + GROWTH_SCALE) + GROWTH_PAGES) {
    analyze = true;
    reasons.push('grown since analyze');
  }
  if (!vacuum && !analyze) return null;
  return { table: state.table, vacuum, analyze, freeze: state.xidAge > freezeAge, urgent: state.xidAge > 2 * freezeAge, reasons };
}

const TABLES_SQL = `
  select c.oid::regclass::text as table, c.reltuples::float8 as tuples, c.relpages as last_pages,
    (pg_relation_size(c.oid) / current_setting('block_size')::int)::int as pages,
    coalesce(s.n_dead_tup, 0)::float8 as dead, coalesce(s.n_mod_since_analyze, 0)::float8 as modified,
    coalesce(s.n_ins_since_vacuum, 0)::float8 as inserted,
    greatest(age(c.relfrozenxid), coalesce(age(t.relfrozenxid), 0), mxid_age(c.relminmxid))::float8 as xid_age,
    exists (select 1 from pg_statistic where starelid = c.oid) as analyzed,
    n.nspname in ('pg_catalog', 'information_schema') as system
  from pg_class c
  join pg_namespace n on n.oid = c.relnamespace
  left join pg_class t on t.oid = c.reltoastrelid
  left join pg_stat_all_tables s on s.relid = c.oid
  where c.relkind in ('r', 'm') and c.relpersistence = 'p'`;

interface TableRow extends Record<string, unknown> {
  table: string;
  tuples: number;
  last_pages: number;
  pages: number;
  dead: number;
  modified: number;
  inserted: number;
  xid_age: number;
  analyzed: boolean;
  system: boolean;
}

/** What one round did (its log lines say the same). */
export interface RoundReport {
  vacuumed: string[];
  analyzed: string[];
  failed: string[];
  /** Tasks left for the next round: the database did not become idle in time, or maintenance stopped. */
  deferred: string[];
}

export class EmbeddedMaintenance {
  private readonly log: Logger;
  private timer: NodeJS.Timeout | undefined;
  private running: Promise<RoundReport> | null = null;
  private stopped = false;
  /** Wakes a round waiting for the database to become idle (stop). */
  private wake: (() => void) | null = null;

  constructor(
    private readonly database: Database,
    private readonly settings: Settings,
    log: Logger,
  ) {
    this.log = log.child({ component: 'embedded-maintenance' });
  }

  /** A round every PGLITE_MAINTENANCE_INTERVAL_SECONDS until `stop`. */
  start(): void {
    this.timer = setInterval(() => void this.round(), this.settings.PGLITE_MAINTENANCE_INTERVAL_SECONDS * 1000);
    this.timer.unref();
  }

  /** Stops the rounds; resolves once the statement in flight (if any) has ended. */
  async stop(): Promise<void> {
    this.stopped = true;
    clearInterval(this.timer);
    this.wake?.();
    await this.running;
  }

  /** One round (or the one running); never throws: its failures are logged. */
  round(): Promise<RoundReport> {
    this.running ??= this.maintain()
      .catch((error: unknown): RoundReport => {
        this.log.error({ err: error }, 'embedded maintenance round failed; will try again next round');
        return { vacuumed: [], analyzed: [], failed: [], deferred: [] };
      })
      .finally(() => (this.running = null));
    return this.running;
  }

  private async maintain(): Promise<RoundReport> {
    const report: RoundReport = { vacuumed: [], analyzed: [], failed: [], deferred: [] };
    if (this.stopped) return report;
    const freezeAge = this.settings.PGLITE_MAINTENANCE_FREEZE_AGE;
    const rows = await this.database.withSession(async (session) => {
      // A session sends its counters to the shared statistics at most once a second, at a
      // transaction's end: this one's end sends them, so the query after it reads them all.
      await session.exec('select pg_stat_force_next_flush()');
      return session.query<TableRow>(TABLES_SQL);
    });
    const tasks = rows
      .map((row) => ({ row, task: taskFor(stateOf(row), freezeAge) }))
      .filter((t): t is { row: TableRow; task: MaintenanceTask } => t.task !== null)
      // The oldest transactions first, then the most dead tuples.
      .sort((a, b) => b.row.xid_age - a.row.xid_age || b.row.dead - a.row.dead);
    // Waits for idleness until the next round is due; what is left then waits for that round.
    const until = performance.now() + this.settings.PGLITE_MAINTENANCE_INTERVAL_SECONDS * 1000;
    for (const [i, { row, task }] of tasks.entries()) {
      if (this.stopped || (!task.urgent && !(await this.idle(until)))) {
        report.deferred.push(...tasks.slice(i).map((t) => t.task.table));
        break;
      }
      const statement = statementFor(task);
      const started = performance.now();
      try {
        await this.database.withSession((session) => session.exec(statement));
      } catch (error) {
        report.failed.push(task.table);
        this.log.error({ err: error, table: task.table, statement }, 'embedded maintenance: statement failed; will try again next round');
        continue;
      }
      if (task.vacuum) report.vacuumed.push(task.table);
      if (task.analyze) report.analyzed.push(task.table);
      this.log.info(
        {
          table: task.table,
          statement,
          reasons: task.reasons,
          deadTuples: row.dead,
          modifiedSinceAnalyze: row.modified,
          insertedSinceVacuum: row.inserted,
          xidAge: row.xid_age,
          ms: Math.round(performance.now() - started),
        },
        'embedded maintenance: table maintained',
      );
    }
    if (report.deferred.length) this.log.info({ deferred: report.deferred }, 'embedded maintenance: the database was busy; tables left for the next round');
    return report;
  }

  /** Whether the session has had nothing in flight for PGLITE_MAINTENANCE_IDLE_MS, waiting for that until `until` (false once stopped). */
  private async idle(until: number): Promise<boolean> {
    const wanted = this.settings.PGLITE_MAINTENANCE_IDLE_MS;
    for (;;) {
      if (this.stopped) return false;
      const idle = this.database.idleMs?.() ?? 0;
      if (idle >= wanted) return true;
      const wait = Math.max(wanted - idle, IDLE_POLL_MS);
      if (performance.now() + wait > until) return false;
      await new Promise<void>((resolve) => {
        const timer = setTimeout(() => {
          this.wake = null;
          resolve();
        }, wait);
        timer.unref();
        this.wake = () => {
          clearTimeout(timer);
          this.wake = null;
          resolve();
        };
      });
    }
  }
}

/**
 * The statement for `task`. Past the freeze age, VACUUM (FREEZE): a plain VACUUM freezes only rows
 * older than vacuum_freeze_min_age (50 million transactions) and reads every page only past
 * vacuum_freeze_table_age (150 million), so below those the table's age would not drop and it
 * would be vacuumed again every round.
 */
function statementFor(task: MaintenanceTask): string {
  if (!task.vacuum) return `analyze ${task.table}`;
  const options = [...(task.freeze ? ['freeze'] : []), ...(task.analyze ? ['analyze'] : [])];
  return `vacuum ${options.length ? `(${options.join(', ')}) ` : ''}${task.table}`;
}

function stateOf(row: TableRow): TableState {
  return {
    table: row.table,
    tuples: Number(row.tuples),
    dead: Number(row.dead),
    modified: Number(row.modified),
    inserted: Number(row.inserted),
    xidAge: Number(row.xid_age),
    analyzed: row.analyzed,
    pages: Number(row.pages),
    lastPages: Number(row.last_pages),
    system: row.system,
  };
}

/** The embedded database's maintenance, started; null on a PostgreSQL server (autovacuum's job there) or with PGLITE_MAINTENANCE=false. */
export function startEmbeddedMaintenance(database: Database, settings: Settings, log: Logger): EmbeddedMaintenance | null {
  if (database.kind !== 'pglite' || !settings.PGLITE_MAINTENANCE) return null;
  const maintenance = new EmbeddedMaintenance(database, settings, log);
  maintenance.start();
  return maintenance;
}
