import { and, asc, eq, inArray, isNotNull, isNull, lt, or, type SQL, sql } from 'drizzle-orm';

import type { Db } from '../core/db.js';
import { constraintAnswers } from '../core/error-mapping.js';

import { ACTIVE_RUN_STATUSES, FINAL_RUN_STATUSES, type NewRun, type Run, runs, threads } from '../models/index.js';

import { definePolicy } from '../utils/access.js';
import { ownedCrud } from './owned.js';

/** Runs: their owner's (or any superuser's); a project-scoped key reads and starts its project's. */
export const runPolicy = definePolicy<Run>({
  noun: 'Run',
  owner: runs.owner_id,
  project: runs.project_id,
  scopedKey: 'write',
  superuserSeesAll: true,
});

export const runCrud = ownedCrud<Run, NewRun>(runs, runPolicy);

constraintAnswers({
  // Two starts raced past the thread's lock (which cannot happen through the service): the index decides.
  ux_runs_thread_id_active: { status: 409, detail: 'Thread is busy: another run is active on it' },
});

const active = inArray(runs.status, [...ACTIVE_RUN_STATUSES]);
const leaseSeconds = (seconds: number) => sql`now() + make_interval(secs => ${seconds})`;

/** Runs of the caller that are queued or running (`where`: the access policy's condition). */
export const activeFilter = active;

/** The thread's run that holds it (queued or running, not waiting), locked. */
export async function lockActiveOnThread(tx: Db, threadId: string): Promise<Run | undefined> {
  const [row] = await tx
    .select()
    .from(runs)
    .where(and(eq(runs.thread_id, threadId), active, eq(runs.waiting, false)))
    .for('update');
  return row;
}

/** Queued or running runs of a user, up to `upTo` (the per-user limit). */
export async function countActiveOwnedBy(db: Db, ownerId: string, upTo: number): Promise<number> {
  return runCrud.countOwnedBy(db, ownerId, active, upTo);
}

export function insertRun(tx: Db, values: NewRun): Promise<Run> {
  return runCrud.create(tx, values);
}

/**
 * A worker takes a run: a queued one that holds its thread, or a running one whose worker is gone
 * (lease expired, or handed back). One conditional UPDATE, so two workers never both get it.
 */
export async function claim(db: Db, runId: string, workerId: string, lease: number): Promise<Run | undefined> {
  const [row] = await db
    .update(runs)
    .set({
      status: 'running',
      lease_owner: workerId,
      lease_expires_at: leaseSeconds(lease),
      attempts: sql`${runs.attempts} + 1`,
      started_at: sql`coalesce(${runs.started_at}, now())`,
    })
    .where(
      and(
        eq(runs.id, runId),
        or(
          and(eq(runs.status, 'queued'), eq(runs.waiting, false)),
          and(eq(runs.status, 'running'), or(isNull(runs.lease_owner), lt(runs.lease_expires_at, sql`now()`))),
        ),
      ),
    )
    .returning();
  return row;
}

/** Extends the worker's hold; false when the run is no longer its own (cancelled, ended, taken over). */
export async function renewLease(db: Db, runId: string, workerId: string, lease: number): Promise<boolean> {
  const rows = await db
    .update(runs)
    .set({ lease_expires_at: leaseSeconds(lease) })
    .where(and(eq(runs.id, runId), eq(runs.status, 'running'), eq(runs.lease_owner, workerId)))
    .returning({ id: runs.id });
  return rows.length === 1;
}

/** Inside a step's transaction: the run, locked, if `workerId` still holds it running (the fence of every write). */
export async function lockHeld(tx: Db, runId: string, workerId: string): Promise<Run | undefined> {
  const [row] = await tx
    .select()
    .from(runs)
    .where(and(eq(runs.id, runId), eq(runs.status, 'running'), eq(runs.lease_owner, workerId)))
    .for('update');
  return row;
}

export async function updateRun(tx: Db, runId: string, values: Partial<NewRun>): Promise<Run> {
  const [row] = await tx.update(runs).set(values).where(eq(runs.id, runId)).returning();
  return row!;
}

/** Who may end a run: its worker (by lease), the sweeper (lease expired), or anyone (a cancel). */
export type EndGuard = { leaseOwner: string } | { leaseExpired: true } | null;

/**
 * Ends an active run with a final status (and its worker's last totals), if the guard holds: one
 * conditional UPDATE, so a final status is never changed. The lease stays on a run its worker
 * ends (or that a cancel ends under it): the worker lets go once the final event is stored, so a
 * worker that dies in between leaves an ended run with an expiring lease, whose final event the
 * sweep writes (endedWithExpiredLease) — readers are never left waiting. The sweep's own end of
 * an orphaned run clears it.
 */
export async function endRun(tx: Db, runId: string, values: Pick<NewRun, 'status' | 'error'> & Partial<Pick<NewRun, 'steps' | 'usage' | 'cost'>>, guard: EndGuard): Promise<Run | undefined> {
  const conditions: (SQL | undefined)[] = [eq(runs.id, runId), active];
  if (guard && 'leaseOwner' in guard) conditions.push(eq(runs.lease_owner, guard.leaseOwner));
  if (guard && 'leaseExpired' in guard) conditions.push(eq(runs.status, 'running'), or(isNull(runs.lease_owner), lt(runs.lease_expires_at, sql`now()`)));
  const clearLease = guard !== null && 'leaseExpired' in guard;
  const [row] = await tx
    .update(runs)
    .set({
      ...values,
      waiting: false,
      ended_at: sql`now()`,
      ...(clearLease ? { lease_owner: null, lease_expires_at: null } : {}),
    })
    .where(and(...conditions))
    .returning();
  return row;
}

/** The oldest run waiting behind the thread's active run, locked. */
export async function lockNextWaiting(tx: Db, threadId: string): Promise<Run | undefined> {
  const [row] = await tx
    .select()
    .from(runs)
    .where(and(eq(runs.thread_id, threadId), eq(runs.status, 'queued'), eq(runs.waiting, true)))
    .orderBy(asc(runs.created_at), asc(runs.id))
    .limit(1)
    .for('update');
  return row;
}

export async function setThreadStatus(tx: Db, threadId: string, status: 'idle' | 'busy'): Promise<void> {
  await tx.update(threads).set({ status }).where(eq(threads.id, threadId));
}

/** Clears a worker's hold without ending the run; `handBack` also returns the attempt (a shutdown is not a crash). */
export async function releaseLease(db: Db, runId: string, workerId: string, handBack: boolean): Promise<boolean> {
  const rows = await db
    .update(runs)
    .set({ lease_owner: null, lease_expires_at: null, ...(handBack ? { attempts: sql`greatest(${runs.attempts} - 1, 0)` } : {}) })
    .where(and(eq(runs.id, runId), eq(runs.lease_owner, workerId)))
    .returning({ id: runs.id });
  return rows.length === 1;
}

// ==================== What the sweeper looks for ====================

/** Queued runs holding their thread, created before `olderThanSeconds` ago: their job may be lost. */
export function queuedWithoutWorker(db: Db, olderThanSeconds: number, limit: number): Promise<Pick<Run, 'id'>[]> {
  return db
    .select({ id: runs.id })
    .from(runs)
    .where(and(eq(runs.status, 'queued'), eq(runs.waiting, false), lt(runs.created_at, sql`now() - make_interval(secs => ${olderThanSeconds})`)))
    .orderBy(asc(runs.created_at))
    .limit(limit);
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

/** Clears the hold of an ended run (its final event is written). */
export async function clearEndedLease(db: Db, runId: string): Promise<void> {
  await db
    .update(runs)
    .set({ lease_owner: null, lease_expires_at: null })
    .where(and(eq(runs.id, runId), inArray(runs.status, [...FINAL_RUN_STATUSES])));
}
