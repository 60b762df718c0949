import { type Db, transaction } from '../core/db.js';
import { ConflictError, UnprocessableError, UNSTORABLE_CHARACTER_MESSAGE } from '../core/errors.js';

import { type Message, type Thread, threads } from '../models/index.js';

import type { MessageCreate, MessageListQuery, MessageUpdate, ThreadCreate, ThreadListQuery, ThreadUpdate } from '../schemas/thread.js';

import { matching } from '../crud/owned.js';
import { setThreadRunsProject } from '../crud/run.js';
import { appendMessage, messageCrud, messagesHeld, threadCrud, threadPolicy } from '../crud/thread.js';
import { isBlank } from '../utils/text.js';
import type { ServiceContext } from './context.js';
import { createWithinLimit } from './limits.js';
import { placeInProject } from './project-service.js';

const BUSY = 'Thread is busy: a run is working on it';
const busy = () => new ConflictError(`${BUSY}; wait for the run to end or cancel it`);
/** A working run's worker books its usage to the project the run started in: the thread moves once its runs have ended, and they move with it. */
const busyMove = () => new ConflictError(`${BUSY}, and its runs would stay in the thread's old project; wait for them to end or cancel them, then move the thread`);

// ==================== Threads ====================

export function get(ctx: ServiceContext, id: string): Promise<Thread> {
  return threadCrud.getVisible(ctx.db, ctx.principal, id);
}

export function list(ctx: ServiceContext, query: ThreadListQuery) {
  return threadCrud.list(ctx.db, ctx.principal, query, matching({ project_id: threads.project_id, status: threads.status }, query));
}

export function create(ctx: ServiceContext, input: ThreadCreate): Promise<Thread> {
  return createWithId(ctx, input, undefined);
}

/**
 * create with the id the caller chose (an `agent:` completion's, told before its start); undefined:
 * the database's default. Not a third argument of create: the owned routes pass it the path's parameters.
 */
export async function createWithId(ctx: ServiceContext, input: ThreadCreate, id: string | undefined): Promise<Thread> {
  const ownerId = ctx.principal.user.id;
  const projectId = await placeInProject(ctx, threadPolicy, ownerId, input.project_id);
  const max = ctx.settings.MAX_THREADS_PER_USER;
  const limit = { what: 'Thread', max, count: (tx: Db) => threadCrud.countOwnedBy(tx, ownerId, undefined, max) };
  return createWithinLimit(ctx.db, ownerId, limit, (tx) => threadCrud.create(tx, { ...input, id, project_id: projectId, owner_id: ownerId }));
}

/**
 * Title, project and metadata; `status` belongs to runs. Moved to another project with its runs;
 * not while a run works on it (409), as for a delete.
 */
export async function update(ctx: ServiceContext, id: string, input: ThreadUpdate): Promise<Thread> {
  const { principal } = ctx;
  if (input.project_id === undefined) return threadCrud.update(ctx.db, principal, id, input);
  const { owner_id } = await threadCrud.getVisible(ctx.db, principal, id, 'write');
  const projectId = await placeInProject(ctx, threadPolicy, owner_id, input.project_id);
  // Locked as a run's start locks it (which marks it busy), so no run starts between the check and the move.
  return transaction(ctx.db, async (tx) => {
    const thread = await threadCrud.lockVisible(tx, principal, id, 'write', 'no key update');
    const moving = thread.project_id !== projectId;
    if (moving && thread.status === 'busy') throw busyMove();
    const updated = await threadCrud.update(tx, principal, id, { ...input, project_id: projectId });
    // Its ended runs go with it: left in the old project, that project's keys still read them (and
    // their events), and the new project's did not.
    if (moving) await setThreadRunsProject(tx, id, projectId);
    return updated;
  });
}

/** A thread and its messages; not while a run works on it (409). */
export async function remove(ctx: ServiceContext, id: string): Promise<void> {
  await transaction(ctx.db, async (tx) => {
    const thread = await threadCrud.lockVisible(tx, ctx.principal, id, 'write', 'update');
    if (thread.status === 'busy') throw busy();
    await threadCrud.remove(tx, ctx.principal, id);
  });
}

// ==================== Messages ====================

interface InThread {
  thread_id: string;
}

/**
 * The content a client sends: at most MAX_MESSAGE_CHARS characters (422, in the schema's words),
 * and no NUL character, which PostgreSQL's text refuses: refused here, at its field, before a
 * start makes a thread for it (the database's refusal came after, and left that thread behind).
 * A user's text holds more than white space: every later run sends it to the model, and Anthropic
 * refuses a blank text block (each run of the thread failed); `blank: true` lets it through (an
 * agent completion's earlier assistant turn, which runs leave out when blank).
 */
export function checkContent(ctx: ServiceContext, content: string | undefined, loc: (string | number)[] = ['body', 'content'], { blank = false } = {}): void {
  if (content === undefined) return;
  const max = ctx.settings.MAX_MESSAGE_CHARS;
  if (content.length > max) throw new UnprocessableError({ loc, msg: `String should have at most ${max} characters`, type: 'string_too_long' });
  if (content.includes('\u0000')) throw new UnprocessableError({ loc, msg: UNSTORABLE_CHARACTER_MESSAGE, type: 'value_error' });
  if (!blank && isBlank(content)) throw new UnprocessableError({ loc, msg: 'Text should hold more than white space: it is sent to the model as a message', type: 'value_error' });
}

/**
 * Room in the thread for `adding` client messages: 409 when they would take it past
 * MAX_MESSAGES_PER_THREAD (as the per-user count limits answer). Every path that appends a
 * client's messages (a post, a run's input, an `agent:` completion's history) asks here, inside
 * its transaction after it has locked the thread, so concurrent appends are counted one after
 * another. `held`: what the thread holds (messagesHeld), when the caller's own statement read it.
 * The count the 409 tells includes waiting runs' inputs (appended when each takes the thread), so
 * it may pass what a client can list now: "holds or will hold".
 */
export async function checkThreadRoom(ctx: Pick<ServiceContext, 'settings'>, tx: Db, threadId: string, adding: number, held?: number): Promise<void> {
  if (adding <= 0) return;
  const max = ctx.settings.MAX_MESSAGES_PER_THREAD;
  const holds = held ?? (await messagesHeld(tx, threadId, max));
  if (holds + adding <= max) return;
  const asked = adding === 1 ? 'one more' : `${adding} more`;
  throw new ConflictError(`Thread message limit reached: a thread holds at most ${max} messages (MAX_MESSAGES_PER_THREAD); this one holds or will hold ${holds >= max ? `${max} or more` : holds}, and ${asked} would pass it. Start a new thread`);
}

/**
 * Runs `work` on the thread, locked (`strength`) so that no run starts on it meanwhile, if the
 * caller may write to it (404 otherwise) and no run works on it now (409).
 */
function withIdleThread<T>(ctx: ServiceContext, threadId: string, strength: 'no key update' | 'share', work: (tx: Db, thread: Thread) => Promise<T>): Promise<T> {
  return transaction(ctx.db, async (tx) => {
    const thread = await threadCrud.lockVisible(tx, ctx.principal, threadId, 'write', strength);
    if (thread.status === 'busy') throw busy();
    return work(tx, thread);
  });
}

export async function listMessages(ctx: ServiceContext, query: MessageListQuery, { thread_id }: InThread) {
  const thread = await get(ctx, thread_id);
  return messageCrud.list(ctx.db, thread.id, query);
}

export async function getMessage(ctx: ServiceContext, id: string, { thread_id }: InThread): Promise<Message> {
  const thread = await get(ctx, thread_id);
  return messageCrud.getIn(ctx.db, thread.id, id);
}

/** A user message at the end of the thread (clients post user messages only). */
export async function createMessage(ctx: ServiceContext, input: MessageCreate, { thread_id }: InThread): Promise<Message> {
  checkContent(ctx, input.content);
  // `no key update`: one writer appends at a time, so message numbers follow commit order.
  return withIdleThread(ctx, thread_id, 'no key update', async (tx, thread) => {
    await checkThreadRoom(ctx, tx, thread.id, 1);
    return appendMessage(tx, { ...input, thread_id: thread.id });
  });
}

/** Metadata of any message; content of user messages only (the others are what a run recorded). */
export async function updateMessage(ctx: ServiceContext, id: string, input: MessageUpdate, { thread_id }: InThread): Promise<Message> {
  checkContent(ctx, input.content);
  return withIdleThread(ctx, thread_id, 'share', async (tx, thread) => {
    if (input.content !== undefined && (await messageCrud.getIn(tx, thread.id, id)).role !== 'user') {
      throw new UnprocessableError({ loc: ['body', 'content'], msg: 'Only the content of user messages can be changed; assistant, system and tool messages are what a run recorded', type: 'value_error' });
    }
    return messageCrud.update(tx, thread.id, id, input);
  });
}

export function removeMessage(ctx: ServiceContext, id: string, { thread_id }: InThread): Promise<void> {
  return withIdleThread(ctx, thread_id, 'share', (tx, thread) => messageCrud.remove(tx, thread.id, id));
}

/** The five message operations, in the shape the route registrar takes. */
export const messageService = { list: listMessages, get: getMessage, create: createMessage, update: updateMessage, remove: removeMessage };
