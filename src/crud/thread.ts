import { randomUUID } from 'node:crypto';

import { and, eq, isNotNull, ne, or, sql } from 'drizzle-orm';

import type { Db } from '../core/db.js';
import { constraintAnswers } from '../core/error-mapping.js';

import { type Message, messages, type NewMessage, type NewThread, runs, type Thread, threads } from '../models/index.js';

import { definePolicy } from '../utils/access.js';
import { childCrud } from './child.js';
import { ownedCrud } from './owned.js';
import { preparedAnywhere } from './prepared.js';
import { lockUser } from './user.js';

/** Threads: their owner's (or any superuser's); a project-scoped key reads and writes its project's. */
export const threadPolicy = definePolicy<Thread>({
  noun: 'Thread',
  owner: threads.owner_id,
  project: threads.project_id,
  scopedKey: 'write',
  superuserSeesAll: true,
});

export const threadCrud = ownedCrud<Thread, NewThread>(threads, threadPolicy);

/**
 * How many threads of `ownerId` (of their project `projectId`, when given) a run works on, asked by
 * what deletes them all: the owner's row is locked first (`lockUser`), as every run start and
 * thread creation of theirs locks it, so none starts between this count and the delete (a cascade
 * took runs from under their worker). A transaction that deletes the user has locked the row
 * FOR UPDATE before (`lockUserForDelete`).
 */
export async function lockOwnerCountingBusy(tx: Db, ownerId: string, projectId?: string): Promise<number> {
  await lockUser(tx, ownerId);
  const [row] = await tx
    .select({ busy: sql<number>`count(*)`.mapWith(Number) })
    .from(threads)
    .where(and(eq(threads.owner_id, ownerId), projectId === undefined ? undefined : eq(threads.project_id, projectId), eq(threads.status, 'busy')));
  return row?.busy ?? 0;
}

/** A thread's messages in creation order (`seq`), addressed by id; visibility is the thread's. */
export const messageCrud = childCrud<Message, NewMessage>(messages, {
  noun: 'Message',
  parent: messages.thread_id,
  order: messages.seq,
});

constraintAnswers({ threads_project_id_projects_id_fk: { status: 404, detail: 'Project not found' } });

/** Whether the thread still holds the message (a client may delete any message of an idle thread). */
/**
 * Whether message `messageId` is in the thread and still its last turn: nothing follows it but
 * messages of runs that answer it (its run, and retries of it, which keep it as their input) —
 * a retried run's input, after which another run may have answered since (an `interrupt`, or a
 * run started after a cancel).
 */
export async function isLastTurn(db: Db, threadId: string, messageId: string): Promise<boolean> {
  const [row] = await db
    .select({ id: messages.id })
    .from(messages)
    .where(
      and(
        eq(messages.thread_id, threadId),
        eq(messages.id, messageId),
        sql`not exists (select 1 from ${messages} later where later.thread_id = ${threadId} and later.seq > ${messages.seq}
          and (later.run_id is null or later.run_id not in (select r.id from runs r where r.thread_id = ${threadId} and r.input_message_id = ${messageId})))`,
      ),
    );
  return row !== undefined;
}

/**
 * Appends a message to a thread whose row the caller's transaction has locked (`no key update`):
 * the lock makes `seq` the next number of the thread, so creation order is the list order and a
 * cursor never skips a message committed late.
 */
export async function appendMessage(tx: Db, values: Omit<NewMessage, 'seq'>): Promise<Message> {
  const { id = randomUUID(), thread_id, role, content, tool_calls = null, tool_call_id = null, run_id = null, metadata } = values;
  const [message] = await oneAppended(tx).execute({ id, thread_id, role, content, tool_calls: tool_calls === null ? null : JSON.stringify(tool_calls), tool_call_id, run_id, metadata: metadata ?? {} });
  return message!;
}

const placeholder = <T>(name: string) => sql.placeholder(name) as unknown as T;
/**
 * One message's values as parameters (`id`, or `idParam` where the statement's `id` is another
 * row's; `thread_id`, `role`, `content`, `tool_calls` as JSON text or null, `tool_call_id`,
 * `run_id`, `metadata`), its seq the thread's last + 1: what appendMessage inserts, for statements
 * that insert a message with something else.
 */
export const appendedMessageValues = (idParam = 'id') => ({
  id: placeholder<string>(idParam),
  thread_id: placeholder<string>('thread_id'),
  seq: sql`(select coalesce(max(${messages.seq}), 0) + 1 from ${messages} where ${messages.thread_id} = ${sql.placeholder('thread_id')})` as unknown as number,
  role: placeholder<Message['role']>('role'),
  content: placeholder<string>('content'),
  // SQL null when there are none (a jsonb parameter would store JSON null).
  tool_calls: sql`${sql.placeholder('tool_calls')}::jsonb` as unknown as null,
  tool_call_id: placeholder<string | null>('tool_call_id'),
  run_id: placeholder<string | null>('run_id'),
  metadata: placeholder<Message['metadata']>('metadata'),
});

// A run's start and every step append one: prepared (the thread's last seq + 1, as appendMessages gives).
const oneAppended = preparedAnywhere('messages_append_one', (db, name) => db.insert(messages).values(appendedMessageValues()).returning().prepare(name));

/**
 * Rows of one appendMessages INSERT: a statement takes at most 65535 parameters (about six a row
 * here), and an agent completion's history may hold more turns than that.
 */
const APPEND_BATCH_ROWS = 1_000;

/** Appends messages in this order, in one statement per APPEND_BATCH_ROWS, under the same lock as `appendMessage`. */
export async function appendMessages(tx: Db, threadId: string, values: readonly Omit<NewMessage, 'seq' | 'thread_id'>[]): Promise<Message[]> {
  const written: Message[] = [];
  // The thread's last seq, read once: the caller's lock keeps it until the transaction ends, so
  // each row's seq is a plain number. A sub-select of it in every row made PostgreSQL plan one
  // subquery a row: ~250 ms a statement of 1,000 rows, ~3 s for a 12,000-turn history (~8 ms each now).
  const [top] = await tx
    .select({ last: sql<number>`coalesce(max(${messages.seq}), 0)`.mapWith(Number) })
    .from(messages)
    .where(eq(messages.thread_id, threadId));
  const last = top?.last ?? 0;
  for (let start = 0; start < values.length; start += APPEND_BATCH_ROWS) {
    const rows = values.slice(start, start + APPEND_BATCH_ROWS).map((row, i) => ({ ...row, thread_id: threadId, seq: last + start + i + 1 }));
    const batch = await tx.insert(messages).values(rows).returning();
    written.push(...batch.sort((a, b) => a.seq - b.seq));
  }
  return written;
}

/**
 * The messages a thread holds, counted up to `upTo`, and the inputs of its waiting runs (each
 * becomes a message when the run takes the thread): what MAX_MESSAGES_PER_THREAD bounds. Read in a
 * statement after the caller's transaction has locked the thread (as every append does), so two
 * appends never both count the thread before the other's message. As an expression, for a
 * statement that reads it with its own work (a run's start: crud/run.ts).
 *
 * `waiting: false` leaves the waiting runs out (no scan of the thread's runs), for a caller that
 * only uses the count when the thread has no active run: waiting runs exist only behind an active
 * run (an `enqueue` start makes one only then, and a run's end hands the thread to the oldest in
 * its own transaction, under the thread's lock), so there they are none.
 */
export const messagesHeldSql = (threadId: unknown, upTo: unknown, { waiting = true }: { waiting?: boolean } = {}) => {
  const held = sql`(select count(*) from (select 1 from ${messages} where ${messages.thread_id} = ${threadId} limit ${upTo}) as held)`;
  if (!waiting) return sql<number>`${held}::int`;
  return sql<number>`(${held}
    + (select count(*) from ${runs} where ${runs.thread_id} = ${threadId} and ${runs.status} = 'queued' and ${runs.waiting} and ${runs.input} is not null and ${runs.input_message_id} is null))::int`;
};

/** messagesHeldSql in a statement of its own. */
export async function messagesHeld(tx: Db, threadId: string, upTo: number): Promise<number> {
  const [row] = await tx
    .select({ held: messagesHeldSql(threadId, upTo).mapWith(Number) })
    .from(threads)
    .where(eq(threads.id, threadId));
  return row?.held ?? 0;
}

/**
 * A character that is not white space as JavaScript's `\s` has it (isBlank, which the runner
 * applies): PostgreSQL's `\s` leaves out the no-break and other Unicode spaces, so text of them
 * alone passed for something to read and the run failed at the provider.
 */
const NOT_JS_WHITE_SPACE = '[^\\s\\u00a0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000\\ufeff]';

/**
 * Whether the thread holds a message the model would read (toModelMessages' rule): one not a tool
 * result (a result is sent only after its call) with text that is more than white space or with
 * tool calls. Without one, a run with no input has nothing to send: providers refuse a call
 * without messages.
 */
export async function hasModelMessages(db: Db, threadId: string): Promise<boolean> {
  const [row] = await db
    .select({ id: messages.id })
    .from(messages)
    .where(and(eq(messages.thread_id, threadId), ne(messages.role, 'tool'), or(sql`${messages.content} ~ ${NOT_JS_WHITE_SPACE}`, isNotNull(messages.tool_calls))))
    .limit(1);
  return row !== undefined;
}

/**
 * The size of a thread's messages as a model call's prompt carries them (content and tool calls),
 * in characters and UTF-8 bytes, summed by the database: a run's start estimates the tokens of its
 * first step's prompt from it (estimateTokensOfSize) without reading the history.
 */
export async function historySize(db: Db, threadId: string): Promise<{ chars: number; bytes: number }> {
  const text = sql`(${messages.content} || coalesce(${messages.tool_calls}::text, ''))`;
  const [row] = await db
    .select({
      chars: sql<number>`coalesce(sum(char_length(${text})), 0)::float8`.mapWith(Number),
      bytes: sql<number>`coalesce(sum(octet_length(${text})), 0)::float8`.mapWith(Number),
    })
    .from(messages)
    .where(eq(messages.thread_id, threadId));
  return row ?? { chars: 0, bytes: 0 };
}
