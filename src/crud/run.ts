import { randomUUID } from 'node:crypto';

import { and, asc, desc, eq, inArray, isNotNull, isNull, lt, lte, ne, or, type SQL, sql } from 'drizzle-orm';

import type { Db } from '../core/db.js';
import { constraintAnswers } from '../core/error-mapping.js';

import { ACTIVE_RUN_STATUSES, FINAL_RUN_STATUSES, type Message, messages, type NewMessage, type NewRun, type Run, runs, type RunUsage, type Thread, threads, usageRecords, users } from '../models/index.js';

import { definePolicy } from '../utils/access.js';
import type { Principal } from '../utils/authentication.js';
import { usageTotalColumns } from './billing.js';
import { ownedCrud, pageOf, type SqlValued } from './owned.js';
import type { Page, PageOf } from './page.js';
import { preparedAnywhere } from './prepared.js';
import { appendedMessageValues, messagesHeldSql } from './thread.js';

const RUN_ACCESS = { noun: 'Run', owner: runs.owner_id, project: runs.project_id, scopedKey: 'write' } as const;

/** Runs: their owner's (or any superuser's); a project-scoped key reads and starts its project's. */
export const runPolicy = definePolicy<Run>({ ...RUN_ACCESS, superuserSeesAll: true });

export const runCrud = ownedCrud<Run, NewRun>(runs, runPolicy);

/**
 * The caller's own runs, a superuser's too: the personal view `GET /runs/active` ("your queued and
 * running runs"), which otherwise listed every user's to an operator. A superuser still reads any
 * run by id or by its thread (runPolicy).
 */
const ownRunPolicy = definePolicy<Run>({ ...RUN_ACCESS, superuserSeesAll: false });

constraintAnswers({
  // Two starts raced past the thread's lock (which cannot happen through the service): the index decides.
  ux_runs_thread_id_active: { status: 409, detail: 'Thread is busy: another run is active on it' },
});

const active = inArray(runs.status, [...ACTIVE_RUN_STATUSES]);
const leaseSeconds = (seconds: number | SQL.Aliased | ReturnType<typeof sql.placeholder>) => sql`now() + make_interval(secs => ${seconds})`;
/** A prepared query's parameter (a value given at each execution); typed as the column's value for Drizzle's builders. */
const slot = <T>(name: string) => sql.placeholder(name) as unknown as T;

// The statements of every run's start, step and end, prepared once (in transactions too): see preparedAnywhere.
/**
 * A user's queued and running runs, up to `up_to` (the per-user limit): how many, and which of
 * them holds a thread. Read under the thread's lock (a new snapshot after it), which every change
 * of a thread's active run takes, so the thread's active run among them is current.
 */
const activeOwnedQuery = (db: Db) =>
  db
    .select({ id: runs.id, thread_id: runs.thread_id, status: runs.status, waiting: runs.waiting })
    .from(runs)
    .where(and(eq(runs.owner_id, slot<string>('owner_id')), active))
    .limit(slot<number>('up_to'));
type OwnedRow = Pick<Run, 'id' | 'thread_id' | 'status' | 'waiting'>;
const activeOwned = preparedAnywhere('runs_active_owned', (db, name) => activeOwnedQuery(db).prepare(name));
/**
 * The columns a start gives; the rest take their defaults. The id too: chosen by the caller, it can
 * be told before the insert (an `agent:` stream's head may go out while the start still waits).
 */
const START_COLUMNS = ['id', 'owner_id', 'thread_id', 'project_id', 'api_key_id', 'scope_project_id', 'agent_id', 'agent_version', 'model', 'multitask_strategy', 'waiting', 'input', 'input_message_id'] as const;
export type NewStartedRun = Pick<NewRun, (typeof START_COLUMNS)[number]> & Pick<Run, 'id'>;
const startValues = () => Object.fromEntries(START_COLUMNS.map((column) => [column, sql.placeholder(column)])) as unknown as NewRun;
const insertStarted = preparedAnywhere('runs_insert_started', (db, name) => db.insert(runs).values(startValues()).returning().prepare(name));
/** The run's input appended to its thread as a user message (appendMessage's insert) and the run pointing at it: one statement. */
const insertStartedWithInput = preparedAnywhere('runs_insert_started_with_input', (db, name) => {
  // The message's id is `input_message_id` here: `id` is the run's.
  const input = db.$with('input').as(db.insert(messages).values(appendedMessageValues('input_message_id')).returning({ id: messages.id }));
  return db
    .with(input)
    .insert(runs)
    .values({ ...startValues(), input_message_id: sql`(select "id" from ${input})` })
    .returning()
    .prepare(name);
});

/** The thread's one active run (ux_runs_thread_id_active's predicate, unqualified as ON CONFLICT takes it). */
const HOLDS_THREAD = sql`"status" in ('queued', 'running') and not "waiting"`;

/**
 * activeOwned and insertStartedWithInput as one statement, for a start that refuses a busy thread
 * (`reject`): the run is inserted unless the thread has an active run (the one-active-run index,
 * ON CONFLICT DO NOTHING), and the owner's active runs come back as they were before it, for the
 * caller's checks (a refused start rolls the insert back). Under the same locks as the two
 * statements it replaces, read after them in a new snapshot.
 */
const insertedIfFree = preparedAnywhere('runs_insert_started_with_input_if_free', (db, name) => {
  const owned = db.$with('owned').as(activeOwnedQuery(db));
  const input = db.$with('input').as(db.insert(messages).values(appendedMessageValues('input_message_id')).returning({ id: messages.id }));
  const inserted = db.$with('inserted').as(
    db
      .insert(runs)
      .values({ ...startValues(), input_message_id: sql`(select "id" from ${input})` })
      .onConflictDoNothing({ target: runs.thread_id, where: HOLDS_THREAD })
      .returning(),
  );
  // The thread's messages before the input (this statement's snapshot does not see its own insert),
  // for MAX_MESSAGES_PER_THREAD. Without waiting runs' inputs: the count matters only when the run
  // is inserted, when the thread has no active run, and so no waiting run (messagesHeldSql).
  const held = messagesHeldSql(sql.placeholder('thread_id'), sql.placeholder('messages_up_to'), { waiting: false }).as('held');
  const ownedRows = db.$with('owned_rows').as(db.select({ owned: sql<OwnedRow[]>`coalesce(json_agg(${sql.identifier('owned')}), '[]'::json)`.as('owned'), held }).from(owned));
  return db.with(owned, input, inserted, ownedRows).select().from(ownedRows).leftJoin(inserted, sql`true`).prepare(name);
});

/**
 * The owner locked (the active-run limit), then the thread locked and marked busy: one statement, in
 * that lock order. The owner's lock is crud/user.ts lockUser's, FOR NO KEY UPDATE: it serializes
 * the owner's starts (and a delete's count of busy threads) without making the owner's model calls
 * wait for the start's transaction (their holds' and settlements' foreign keys take KEY SHARE).
 */
const threadHeldBusy = preparedAnywhere('threads_hold_busy_after_owner', (db, name) => {
  const owner = db.$with('owner').as(db.select({ id: users.id }).from(users).where(eq(users.id, slot<string>('owner_id'))).for('no key update'));
  return db
    .with(owner)
    .update(threads)
    .set({ status: 'busy' })
    .where(and(eq(threads.id, slot<string>('id')), sql`exists (select 1 from ${owner})`))
    .returning()
    .prepare(name);
});

/** The caller's own queued and running runs (a superuser's own too), newest first (ties by id), and their total. */
export function listOwnActive(db: Db, principal: Principal, page: Page): Promise<PageOf<Run>> {
  return pageOf<Run>(db, runs, and(ownRunPolicy.where(principal, 'read'), active), [desc(runs.created_at), desc(runs.id)], page);
}

/** What a start needs of the owner's active runs: how many (up to `upTo`), and the one that holds the thread. */
export interface OwnerActive {
  count: number;
  onThread: Pick<Run, 'id' | 'status'> | undefined;
}

/**
 * Inside a start's transaction, after holdThreadBusy (the owner's and the thread's locks): the
 * owner's queued or running runs up to `upTo`, and the thread's active run among them (a thread's
 * runs are its owner's). Beyond the limit the caller refuses the start, whichever thread is busy.
 */
export async function ownerActive(tx: Db, ownerId: string, threadId: string, upTo: number): Promise<OwnerActive> {
  return summarize(await activeOwned(tx).execute({ owner_id: ownerId, up_to: upTo }), threadId);
}

function summarize(rows: readonly OwnedRow[], threadId: string): OwnerActive {
  return { count: rows.length, onThread: rows.find((row) => row.thread_id === threadId && !row.waiting) };
}

/**
 * Inside a start's transaction, after holdThreadBusy, for a start that refuses a busy thread:
 * ownerActive and insertRunWithInput in one statement. `run` is undefined when the thread has an
 * active run (then `owned.onThread` is it); the caller refuses the start (rolling back what was
 * written) when `owned` says so, as after ownerActive, or when `held` (the thread's messages before
 * the input, up to `messagesUpTo`) leaves no room for it. `held` leaves waiting runs' inputs out:
 * it is for an inserted run only, and a thread free for one has no waiting runs.
 */
export async function insertRunWithInputIfFree(tx: Db, values: Omit<NewStartedRun, 'input' | 'input_message_id' | 'waiting'> & { input: string }, upTo: number, messagesUpTo: number): Promise<{ run: Run | undefined; owned: OwnerActive; held: number }> {
  const [row] = await insertedIfFree(tx).execute({ ...values, waiting: false, up_to: upTo, messages_up_to: messagesUpTo, input_message_id: randomUUID(), role: 'user', content: values.input, tool_calls: null, tool_call_id: null, run_id: null, metadata: {} });
  return { run: row!.inserted ?? undefined, owned: summarize(row!.owned_rows.owned, values.thread_id), held: Number(row!.owned_rows.held) };
}

export async function insertRun(tx: Db, values: NewStartedRun): Promise<Run> {
  const [row] = await insertStarted(tx).execute(values);
  return row!;
}

/**
 * Inside a start's transaction that holds the thread's lock (see appendMessage): appends the run's
 * `input` to the thread as a user message and inserts the run with it as `input_message_id`.
 */
export async function insertRunWithInput(tx: Db, values: Omit<NewStartedRun, 'input' | 'input_message_id'> & { input: string }): Promise<Run> {
  const [row] = await insertStartedWithInput(tx).execute({ ...values, input_message_id: randomUUID(), role: 'user', content: values.input, tool_calls: null, tool_call_id: null, run_id: null, metadata: {} });
  return row!;
}

/**
 * Inside a start's transaction: locks the thread's owner (the active-run limit), then the thread,
 * and marks the thread busy, in one statement (every start that succeeds leaves it busy: its run,
 * or the one it waits behind, holds it). Undefined when the thread is gone; the caller checks its
 * access to the row.
 */
export async function holdThreadBusy(tx: Db, ownerId: string, threadId: string): Promise<Thread | undefined> {
  const [row] = await threadHeldBusy(tx).execute({ owner_id: ownerId, id: threadId });
  return row;
}

/** A worker's take of a run (see claim): the run, and what its first step reads. */
export interface Claimed {
  run: Run;
  /** No worker had started the run before (its log holds only run.queued): the start to announce. */
  firstStart: boolean;
  /** The thread's messages in order, as the run's first step reads them. */
  history: Message[];
  /** The run's event_seq_ceiling before this claim raised it: how far its earlier writers may have numbered its events. */
  seqFloor: number;
}

/** A message as json_agg writes it: its timestamps as text. */
type MessageJson = Omit<Message, 'created_at' | 'updated_at'> & { created_at: string; updated_at: string };

/**
 * A worker takes a run: a queued one that holds its thread, or a running one whose worker is gone
 * (lease expired, or handed back). One conditional UPDATE, so two workers never both get it. The
 * same statement reads what the first step needs — the thread's messages, and whether the run had
 * been started before (`before`: the row as the statement's snapshot saw it) — so a run's first
 * statement is its only round trip before the model call. Where the run's log is in this database
 * (`seqRoom` 0), its commit does not wait for the WAL to reach the disk (synchronous_commit off, for
 * this transaction only): lost in a database crash, the claim is undone and the run's lease recovers
 * it like a dead worker's (docs/decisions.md). One that raises the run's seq ceiling commits durably.
 */
const claimed = preparedAnywhere('runs_claim_with_history', (db, name) => {
  const taken = db.$with('taken').as(
    db
      .update(runs)
      .set({
        status: 'running',
        lease_owner: slot<string>('worker_id'),
        lease_expires_at: leaseSeconds(sql.placeholder('lease')),
        attempts: sql`${runs.attempts} + 1`,
        started_at: sql`coalesce(${runs.started_at}, now())`,
        // The new writer's room (RUN_EVENT_SEQ_ROOM; 0 where the log is in this database), given with the take.
        event_seq_ceiling: sql`${runs.event_seq_ceiling} + ${sql.placeholder('seq_room')}::integer`,
      })
      .where(
        and(
          eq(runs.id, slot<string>('run_id')),
          or(
            and(eq(runs.status, 'queued'), eq(runs.waiting, false)),
            and(eq(runs.status, 'running'), or(isNull(runs.lease_owner), lt(runs.lease_expires_at, sql`now()`))),
          ),
        ),
      )
      .returning(),
  );
  const reads = db.$with('reads').as(
    db
      .select({
        // Both from the row the update took, not from a read beside it: that would see the statement's
        // snapshot, and another claim (and hand-back) or a worker whose lease lapsed may have changed
        // the row since (the update re-reads it). A first start is one whose started_at this
        // statement set: now() is its transaction's time, which no earlier claim's can be.
        first_start: sql<boolean>`${sql.identifier('taken')}.${sql.identifier('started_at')} = now()`.as('first_start'),
        seq_floor: sql<number>`${sql.identifier('taken')}.${sql.identifier('event_seq_ceiling')} - ${sql.placeholder('seq_room')}::integer`.as('seq_floor'),
        // Qualified by hand: inside the subquery, Drizzle's bare "thread_id" would be the message's own.
        history: sql<MessageJson[]>`(select coalesce(json_agg(m order by m.seq), '[]'::json) from ${messages} m where m.thread_id = ${sql.identifier('taken')}.${sql.identifier('thread_id')})`.as('history'),
        // set_config(..., true) is SET LOCAL: it holds until this statement's own transaction commits.
        // A claim that raises the seq ceiling (seq_room > 0: the log is in Redis) keeps the session's
        // durable commit: lost in a database crash, the raise would let the next writer number over
        // seqs clients saw, should Redis lose the stream too.
        commit_mode: sql<string>`set_config('synchronous_commit', case when ${sql.placeholder('seq_room')}::integer = 0 then 'off' else current_setting('synchronous_commit') end, true)`.as('commit_mode'),
      })
      .from(taken),
  );
  return db.with(taken, reads).select().from(taken).innerJoin(reads, sql`true`).prepare(name);
});

/** `seqRoom`: how far past the run's event_seq_ceiling the claim lets its worker number (raised with the take). */
export async function claim(db: Db, runId: string, workerId: string, lease: number, seqRoom = 0): Promise<Claimed | undefined> {
  const [row] = await claimed(db).execute({ run_id: runId, worker_id: workerId, lease, seq_room: seqRoom });
  if (!row) return undefined;
  const history = row.reads.history.map((message) => ({ ...message, created_at: new Date(message.created_at), updated_at: new Date(message.updated_at) }));
  return { run: row.taken, firstStart: row.reads.first_start, history, seqFloor: Number(row.reads.seq_floor) };
}

/**
 * Raises the run's event_seq_ceiling to `to` (never lowers it) while `workerId` holds it: before the
 * worker appends past it. Held, not only running: a run its worker ended (or a cancel ended under
 * it) keeps the worker's lease until its final batch is appended, which may need a raise too. The
 * sweep and a cancel of a run nobody held raise it under the hold they settle (a dead worker's
 * lease, FINAL_EVENT_PENDING) before their final batch (takeUpLog). False when the run is no longer
 * the worker's (or that hold's).
 */
export async function raiseEventSeqCeiling(db: Db, runId: string, workerId: string, to: number): Promise<boolean> {
  const rows = await db
    .update(runs)
    .set({ event_seq_ceiling: sql`greatest(${runs.event_seq_ceiling}, ${to}::integer)` })
    .where(and(eq(runs.id, runId), eq(runs.lease_owner, workerId)))
    .returning({ id: runs.id });
  return rows.length === 1;
}

/**
 * A lease `lease` seconds from now, until the run's `deadline`: from then on it is left as it is.
 * The deadline ends a run; one its worker cannot end (stuck past it) must not stay held by the
 * worker's renewals for good: its lease runs out, and the sweep takes the run up (its next worker
 * fails it at once, its deadline passed).
 */
export const renewedLease = (lease: number, deadline: Date): SQL => sql`case when now() < ${deadline.toISOString()}::timestamptz then ${leaseSeconds(lease)} else ${runs.lease_expires_at} end`;

/** Extends the worker's hold (until the run's deadline: renewedLease); false when the run is no longer its own (cancelled, ended, taken over). */
export async function renewLease(db: Db, runId: string, workerId: string, lease: number, deadline: Date): Promise<boolean> {
  const rows = await db
    .update(runs)
    .set({ lease_expires_at: renewedLease(lease, deadline) })
    .where(and(eq(runs.id, runId), eq(runs.status, 'running'), eq(runs.lease_owner, workerId)))
    .returning({ id: runs.id });
  return rows.length === 1;
}

/**
 * Inside a step's transaction: the run's thread locked, then the run, locked, if `workerId` still
 * holds it running (the fence of every write), in one statement and that lock order (thread, then run).
 */
const heldLocked = preparedAnywhere('runs_held_locked_with_thread', (db, name) => {
  const thread = db.$with('thread').as(db.select({ id: threads.id }).from(threads).where(eq(threads.id, slot<string>('thread_id'))).for('update'));
  return db
    .with(thread)
    .select()
    .from(runs)
    .where(and(eq(runs.id, slot<string>('run_id')), eq(runs.status, 'running'), eq(runs.lease_owner, slot<string>('worker_id')), sql`exists (select 1 from ${thread})`))
    .for('update', { of: runs })
    .prepare(name);
});

export async function lockHeld(tx: Db, run: Pick<Run, 'id' | 'thread_id'>, workerId: string): Promise<Run | undefined> {
  const [row] = await heldLocked(tx).execute({ run_id: run.id, thread_id: run.thread_id, worker_id: workerId });
  return row;
}

export async function updateRun(tx: Db, runId: string, values: SqlValued<Partial<NewRun>>): Promise<Run> {
  const [row] = await tx.update(runs).set(values).where(eq(runs.id, runId)).returning();
  return row!;
}

/**
 * The lease owner of an ended run whose final event is still to be written by what ended it — a
 * cancel or an interrupt of a run no worker held, or the sweep giving a run up — with a lease that
 * has already expired: should that write fail (the event store down), the sweep
 * (endedWithExpiredLease) writes the event; once it is stored the mark is cleared (clearEndedLease).
 * Without it such a run was final in the database with no final event, and its readers waited forever.
 */
export const FINAL_EVENT_PENDING = 'final-event-pending';

/**
 * The lease an end leaves (see FINAL_EVENT_PENDING): the sweep's end replaces the dead worker's
 * lease with the mark; a cancel leaves a worker's lease on the run (that worker writes the final
 * event) and marks a run nobody held.
 */
function finalEventPending(guard: EndGuard): Partial<Record<'lease_owner' | 'lease_expires_at', SQL>> {
  if (guard !== null && 'leaseExpired' in guard) return { lease_owner: sql`${FINAL_EVENT_PENDING}`, lease_expires_at: sql`now()` };
  if (guard !== null) return {};
  return {
    lease_owner: sql`coalesce(${runs.lease_owner}, ${FINAL_EVENT_PENDING})`,
    lease_expires_at: sql`case when ${runs.lease_owner} is null then now() else ${runs.lease_expires_at} end`,
  };
}

/** Who may end a run: its worker (by lease), the sweeper (lease expired), or anyone (a cancel). */
export type EndGuard = { leaseOwner: string } | { leaseExpired: true } | null;

/** A run's end: its status and error, its worker's last totals, or the totals its calls were charged (`paid`, raising the stored ones). */
export type EndValues = Pick<NewRun, 'status' | 'error'> & Partial<Pick<NewRun, 'steps' | 'usage' | 'cost'>> & { paid?: PaidTotals };

/**
 * Ends an active run with a final status (and its worker's last totals), if the guard holds: one
 * conditional UPDATE, so a final status is never changed. The lease stays on a run its worker
 * ends (or that a cancel ends under it): the worker lets go once the final event is stored, so a
 * worker that dies in between leaves an ended run with an expiring lease, whose final event the
 * sweep writes (endedWithExpiredLease) — readers are never left waiting. An end no worker will
 * write the final event of (the sweep's, or a cancel of a run nobody held) leaves FINAL_EVENT_PENDING.
 */
export async function endRun(tx: Db, runId: string, values: EndValues, guard: EndGuard, releaseLease = false): Promise<Run | undefined> {
  if (guard && 'leaseOwner' in guard && values.steps !== undefined && values.usage !== undefined && values.cost !== undefined && !values.paid) {
    // The runner's end of its run, with its totals: every run's last write, prepared.
    const [row] = await (releaseLease ? endedAndReleased : endedByWorker)(tx).execute({ run_id: runId, worker_id: guard.leaseOwner, status: values.status, error: values.error, steps: values.steps, usage: values.usage, cost: values.cost });
    return row;
  }
  const conditions: (SQL | undefined)[] = [eq(runs.id, runId), active];
  if (guard && 'leaseOwner' in guard) conditions.push(eq(runs.lease_owner, guard.leaseOwner));
  if (guard && 'leaseExpired' in guard) conditions.push(eq(runs.status, 'running'), or(isNull(runs.lease_owner), lt(runs.lease_expires_at, sql`now()`)));
  const { paid, ...own } = values;
  const [row] = await tx
    .update(runs)
    .set({
      ...own,
      // Its calls' usage records, where they show more than the steps did (a stopped run's last call).
      ...(paid && raisedTo(paid)),
      waiting: false,
      ended_at: sql`now()`,
      ...(releaseLease ? { lease_owner: null, lease_expires_at: null } : finalEventPending(guard)),
    })
    .where(and(...conditions))
    .returning();
  return row;
}

/** Its worker ends a run with its totals (and lets go of it, with `release`: its final event is in the same transaction). */
const workerEnd = (db: Db, release: boolean) =>
  db
    .update(runs)
    .set({
      status: slot<Run['status']>('status'),
      error: slot<string | null>('error'),
      steps: slot<number>('steps'),
      usage: slot<Run['usage']>('usage'),
      cost: slot<string>('cost'),
      waiting: false,
      ended_at: sql`now()`,
      ...(release ? { lease_owner: null, lease_expires_at: null } : {}),
    })
    .where(and(eq(runs.id, slot<string>('run_id')), active, eq(runs.lease_owner, slot<string>('worker_id'))))
    .returning();
const endByWorker = (release: boolean) => (db: Db, name: string) => workerEnd(db, release).prepare(name);
const endedByWorker = preparedAnywhere('runs_end_by_worker', endByWorker(false));
const endedAndReleased = preparedAnywhere('runs_end_by_worker_released', endByWorker(true));

/**
 * endByWorker and nextWaitingOrIdle as one statement, for a run that holds its thread (the caller's
 * transaction has locked the thread and the run): the end, the thread's oldest waiting run (locked),
 * or else the thread marked idle. Nothing is handed on when the end's guard fails. Every run's end.
 */
const endAndHandOn = (release: boolean) => (db: Db, name: string) => {
  const ended = db.$with('ended').as(workerEnd(db, release));
  const { next, idle } = nextOrIdle(db, sql`exists (select 1 from ${ended})`);
  return db.with(ended, next, idle).select().from(ended).leftJoin(next, sql`true`).prepare(name);
};
const endedAndHandedOn = preparedAnywhere('runs_end_by_worker_hand_on', endAndHandOn(false));
const endedReleasedAndHandedOn = preparedAnywhere('runs_end_by_worker_released_hand_on', endAndHandOn(true));

export type WorkerEnd = Pick<NewRun, 'status' | 'error'> & Pick<Run, 'steps' | 'usage' | 'cost'>;

/**
 * Its worker ends a run that holds its thread, with its totals, and hands the thread on: the
 * ended run and the waiting run that now holds the thread (null: the thread is idle), or
 * undefined when the run is no longer the worker's. `release`: as endRun's releaseLease.
 */
export async function endByWorkerAndHandOn(tx: Db, run: Pick<Run, 'id' | 'thread_id'>, values: WorkerEnd, workerId: string, release: boolean): Promise<{ run: Run; next: Run | null } | undefined> {
  const [row] = await (release ? endedReleasedAndHandedOn : endedAndHandedOn)(tx).execute({ run_id: run.id, thread_id: run.thread_id, worker_id: workerId, status: values.status, error: values.error ?? null, steps: values.steps, usage: values.usage, cost: values.cost });
  return row && { run: row.ended, next: row.next };
}


/**
 * endAndHandOn with the run's answer appended to the thread in the same statement (appendMessage's
 * insert, its seq the thread's last + 1: read after the step's thread lock, in this statement's
 * new snapshot). The answer is written even when the end's guard fails: the caller then rolls back.
 */
const endWithAnswer = (release: boolean) => (db: Db, name: string) => {
  const answer = db.$with('answer').as(db.insert(messages).values(appendedMessageValues()).returning());
  const ended = db.$with('ended').as(workerEnd(db, release));
  const { next, idle } = nextOrIdle(db, sql`exists (select 1 from ${ended})`);
  return db.with(answer, ended, next, idle).select().from(answer).leftJoin(ended, sql`true`).leftJoin(next, sql`true`).prepare(name);
};
const endedWithAnswer = preparedAnywhere('runs_end_by_worker_with_answer', endWithAnswer(false));
const endedReleasedWithAnswer = preparedAnywhere('runs_end_by_worker_released_with_answer', endWithAnswer(true));

/** The answer endWithAnswerAndHandOn appends: appendMessage's values, on the run's thread. */
export type RunAnswer = Pick<NewMessage, 'id' | 'content' | 'metadata'> & { tool_calls?: null };

/**
 * endByWorkerAndHandOn for the step that answers: the run's answer appended as an assistant message
 * (on its thread, whose lock the caller's transaction holds) in the same statement. Undefined when
 * the run is no longer the worker's (the caller rolls back: the answer must not stay).
 */
export async function endWithAnswerAndHandOn(tx: Db, run: Pick<Run, 'id' | 'thread_id'>, answer: RunAnswer, values: WorkerEnd, workerId: string, release: boolean): Promise<{ message: Message; run: Run; next: Run | null } | undefined> {
  const [row] = await (release ? endedReleasedWithAnswer : endedWithAnswer)(tx).execute({
    id: answer.id ?? randomUUID(),
    thread_id: run.thread_id,
    role: 'assistant',
    content: answer.content,
    tool_calls: null,
    tool_call_id: null,
    run_id: run.id,
    metadata: answer.metadata ?? {},
    worker_id: workerId,
    status: values.status,
    error: values.error ?? null,
    steps: values.steps,
    usage: values.usage,
    cost: values.cost,
  });
  return row?.ended ? { message: row.answer, run: row.ended, next: row.next } : undefined;
}

/**
 * The thread's oldest run waiting behind its active run (locked) and, when there is none, the
 * thread marked idle: the hand-over, as CTEs; `only` (e.g. that the end before it happened) guards both.
 */
function nextOrIdle(db: Db, only?: SQL) {
  const next = db.$with('next').as(
    db
      .select()
      .from(runs)
      .where(and(eq(runs.thread_id, slot<string>('thread_id')), eq(runs.status, 'queued'), eq(runs.waiting, true), only))
      .orderBy(asc(runs.created_at), asc(runs.id))
      .limit(1)
      .for('update'),
  );
  const idle = db.$with('idle').as(
    db
      .update(threads)
      .set({ status: 'idle' })
      .where(and(eq(threads.id, slot<string>('thread_id')), only, sql`not exists (select 1 from ${next})`))
      .returning({ id: threads.id }),
  );
  return { next, idle };
}

const waitingOrIdle = preparedAnywhere('runs_next_waiting_or_idle', (db, name) => {
  const { next, idle } = nextOrIdle(db);
  return db.with(next, idle).select().from(next).prepare(name);
});

/**
 * Under the thread's lock (the caller's transaction holds it): the oldest run waiting behind the
 * thread's active run, locked; when there is none, the thread is marked idle by the same statement.
 */
export async function nextWaitingOrIdle(tx: Db, threadId: string): Promise<Run | undefined> {
  const [row] = await waitingOrIdle(tx).execute({ thread_id: threadId });
  return row;
}

const leaseReleased = preparedAnywhere('runs_release_lease', (db, name) =>
  db
    .update(runs)
    .set({ lease_owner: null, lease_expires_at: null })
    .where(and(eq(runs.id, slot<string>('run_id')), eq(runs.lease_owner, slot<string>('worker_id'))))
    .returning({ id: runs.id })
    .prepare(name),
);

/**
 * Clears a worker's hold. `handBack` (a shutdown or an outage, not a crash): of a run still running
 * only; false when the run ended meanwhile (a cancel while the worker stopped), whose final event the
 * worker then still owes. A shutdown returns the attempt; an outage's hand-back keeps it counted:
 * each one redoes (and charges again) the step it cut, so a run bus that keeps failing ends the run
 * at RUN_MAX_ATTEMPTS rather than at its deadline. `lastSeq`: the seq of the run's last event, where the
 * worker knows it (all its appends answered): the run's event_seq_ceiling comes down to it.
 */
export async function releaseLease(db: Db, runId: string, workerId: string, handBack: false | 'shutdown' | 'outage', lastSeq?: number): Promise<boolean> {
  if (!handBack) return (await leaseReleased(db).execute({ run_id: runId, worker_id: workerId })).length === 1;
  const rows = await db
    .update(runs)
    .set({
      lease_owner: null,
      lease_expires_at: null,
      attempts: handBack === 'shutdown' ? sql`greatest(${runs.attempts} - 1, 0)` : runs.attempts,
      // Where the worker knows its log's exact end, the next one goes on right after it, without a gap.
      ...(lastSeq !== undefined ? { event_seq_ceiling: lastSeq } : {}),
    })
    .where(and(eq(runs.id, runId), eq(runs.lease_owner, workerId), eq(runs.status, 'running')))
    .returning({ id: runs.id });
  return rows.length === 1;
}

/**
 * The queued and running runs started through an API key or owned by a user (ended when the key
 * is revoked or deleted, the user deactivated), queued ones first: ending a running run first
 * would hand its thread to the next of them.
 */
export function activeOf(db: Db, of: { api_key_id: string } | { owner_id: string }): Promise<Pick<Run, 'id' | 'thread_id'>[]> {
  const whose = 'api_key_id' in of ? eq(runs.api_key_id, of.api_key_id) : eq(runs.owner_id, of.owner_id);
  return db
    .select({ id: runs.id, thread_id: runs.thread_id })
    .from(runs)
    .where(and(whose, inArray(runs.status, ACTIVE_RUN_STATUSES)))
    .orderBy(sql`${runs.status} = 'running'`, asc(runs.created_at));
}

// ==================== What the sweeper looks for ====================

/**
 * The sweep's pick of queued runs to queue again: those queued longer than `olderThanSeconds`, and
 * marked (`lease_expires_at`, which nothing reads on a queued run: lease_owner stays null, and the
 * claim takes a queued run regardless) so that no sweep, on any worker, picks them again within
 * `leaseSeconds`. Without the mark every sweep on every worker queued another job for each run of a
 * backlog (runs only waiting their turn behind RUN_CONCURRENCY), and the copies piled up, each a
 * claim statement when its turn came. One UPDATE over rows locked with SKIP LOCKED: two workers'
 * sweeps never both pick a run. `ignoreMarks`: an embedded process's start-up sweep, whose queue
 * lost every job, takes up its queued runs at once rather than after the last mark's lease.
 */
export function queuedWithoutWorker(db: Db, pick: { olderThanSeconds: number; leaseSeconds: number; ignoreMarks: boolean; limit: number }): Promise<Pick<Run, 'id'>[]> {
  const picked = db
    .select({ id: runs.id })
    .from(runs)
    .where(
      and(
        eq(runs.status, 'queued'),
        eq(runs.waiting, false),
        lt(runs.created_at, sql`now() - make_interval(secs => ${pick.olderThanSeconds})`),
        pick.ignoreMarks ? undefined : or(isNull(runs.lease_expires_at), lte(runs.lease_expires_at, sql`now()`)),
      ),
    )
    .orderBy(asc(runs.created_at))
    .limit(pick.limit)
    .for('update', { skipLocked: true });
  return db
    .update(runs)
    .set({ lease_expires_at: leaseSeconds(pick.leaseSeconds) })
    .where(and(inArray(runs.id, picked), eq(runs.status, 'queued')))
    .returning({ id: runs.id });
}

/** Running runs whose worker is gone: the lease expired, or it was handed back. */
export function orphanedRunning(db: Db, limit: number): Promise<Run[]> {
  return db
    .select()
    .from(runs)
    .where(and(eq(runs.status, 'running'), or(isNull(runs.lease_owner), lt(runs.lease_expires_at, sql`now()`))))
    .limit(limit);
}

/** Ended runs still marked as held by a worker that stopped before it wrote their final event. */
export function endedWithExpiredLease(db: Db, limit: number): Promise<Run[]> {
  return db
    .select()
    .from(runs)
    .where(and(inArray(runs.status, [...FINAL_RUN_STATUSES]), isNotNull(runs.lease_owner), lt(runs.lease_expires_at, sql`now()`)))
    .limit(limit);
}

/** The run's last assistant message: a completed run's answer. */
export async function lastAnswer(db: Db, runId: string): Promise<Message | undefined> {
  const [row] = await db
    .select()
    .from(messages)
    .where(and(eq(messages.run_id, runId), eq(messages.role, 'assistant')))
    .orderBy(desc(messages.seq))
    .limit(1);
  return row;
}

/** The run's messages in the thread, in order (a step's assistant message, then its tool messages). */
export function messagesOfRun(db: Db, runId: string): Promise<Message[]> {
  return db.select().from(messages).where(eq(messages.run_id, runId)).orderBy(asc(messages.seq));
}

/** Clears the hold of an ended run (its final event is written): any hold, or only `owner`'s. */
export async function clearEndedLease(db: Db, runId: string, owner?: string): Promise<void> {
  await db
    .update(runs)
    .set({ lease_owner: null, lease_expires_at: null })
    .where(and(eq(runs.id, runId), inArray(runs.status, [...FINAL_RUN_STATUSES]), owner === undefined ? undefined : eq(runs.lease_owner, owner)));
}

/**
 * How far before its run's first start a call's usage record may be stamped: its time is the
 * node's clock, the run's the database's.
 */
const CLOCK_SKEW = sql`interval '10 minutes'`;

/** What a run's model calls were charged, summed from their usage records (`paidTotals`). */
export type PaidTotals = Pick<Run, 'usage' | 'cost'>;

/**
 * What a stopped run's model calls were charged, summed from their usage records (every attempt's,
 * the stopped call's included: it never reaches a step's transaction; its knowledge searches'
 * embeddings left out, as a finished run's steps leave them). Read once its calls' usage is
 * written (`RunDeps.charged`). Found through the owner's records since the run first started
 * (their index), not an index of `run_id`, which every gateway call's row would pay for
 * (bench/RESULTS.md, stop 40).
 */
export async function paidTotals(db: Db, run: Pick<Run, 'id' | 'owner_id' | 'created_at' | 'started_at'>): Promise<PaidTotals> {
  const [paid] = await db
    .select(usageTotalColumns())
    .from(usageRecords)
    .where(
      and(
        eq(usageRecords.owner_id, run.owner_id),
        sql`${usageRecords.created_at} >= ${run.started_at ?? run.created_at}::timestamptz - ${CLOCK_SKEW}`,
        eq(usageRecords.run_id, run.id),
        ne(usageRecords.operation, 'embed'),
      ),
    );
  const { cost, input_tokens, output_tokens, cached_input_tokens, reasoning_tokens } = paid!;
  return { cost, usage: { input_tokens, output_tokens, cached_input_tokens, reasoning_tokens } };
}

/** A run's totals raised to `paid` where it is higher: each only rises (a record still unwritten does not lower the steps' own). */
function raisedTo(paid: PaidTotals) {
  const count = (name: keyof RunUsage) => sql`greatest(coalesce((${runs.usage}->>${name})::bigint, 0), ${paid.usage[name]}::bigint)`;
  return {
    cost: sql`greatest(${runs.cost}, ${paid.cost}::numeric)`,
    usage: sql`jsonb_build_object('input_tokens', ${count('input_tokens')}, 'output_tokens', ${count('output_tokens')}, 'cached_input_tokens', ${count('cached_input_tokens')}, 'reasoning_tokens', ${count('reasoning_tokens')})`,
  };
}

/**
 * A stopped run still held by `workerId` whose end came from elsewhere (a cancel), with its totals
 * raised to `paid`. Undefined when the worker no longer holds it.
 */
export async function raisePaidTotals(db: Db, runId: string, paid: PaidTotals, workerId: string): Promise<Run | undefined> {
  const [row] = await db
    .update(runs)
    .set(raisedTo(paid))
    .where(and(eq(runs.id, runId), eq(runs.lease_owner, workerId), inArray(runs.status, FINAL_RUN_STATUSES)))
    .returning();
  return row;
}

/**
 * Keeps the thread's runs in the thread's project (runs.project_id, what a project-scoped key's
 * access to a run reads), in the transaction that moves the thread and after it has locked the
 * thread's row: a run's step locks the thread, then the run, and so does this. Only an idle
 * thread moves, so its runs have ended: their `scope_project_id` (what limited a working run's
 * reads) goes too, as kept it made the old project's delete take the runs (cascade) from a thread
 * now elsewhere.
 */
export async function setThreadRunsProject(tx: Db, threadId: string, projectId: string | null): Promise<void> {
  await tx.update(runs).set({ project_id: projectId, scope_project_id: null }).where(eq(runs.thread_id, threadId));
}

/**
 * Deletes an ended run whose final event is written (no lease left on it: see endRun); false when
 * it is not such a run now. A run still held is ending: its worker (or the sweep) writes its final
 * event once it has stopped, which a deleted run would never get, and its readers would wait for ever.
 */
export async function removeEnded(db: Db, runId: string): Promise<boolean> {
  const rows = await db
    .delete(runs)
    .where(and(eq(runs.id, runId), inArray(runs.status, [...FINAL_RUN_STATUSES]), isNull(runs.lease_owner)))
    .returning({ id: runs.id });
  return rows.length === 1;
}
