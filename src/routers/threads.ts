import type { FastifyPluginAsyncZod } from 'fastify-type-provider-zod';

import { MessageCreate, MessageListQuery, MessagePublic, MessageUpdate, ThreadCreate, ThreadListQuery, ThreadPublic, ThreadUpdate } from '../schemas/thread.js';

import * as threadService from '../services/thread-service.js';
import { requireUser } from '../utils/authentication.js';
import { registerOwnedRoutes } from './owned-routes.js';

/** Threads and their messages (nested: a message is reached through its thread). */
export const threadsRouter: FastifyPluginAsyncZod = async (app) => {
  app.addHook('onRequest', requireUser);

  registerOwnedRoutes(app, {
    noun: 'Thread',
    path: '/threads',
    idParam: 'thread_id',
    tags: ['threads'],
    schemas: { create: ThreadCreate, update: ThreadUpdate, public: ThreadPublic },
    service: threadService,
    listQuery: ThreadListQuery,
    createErrors: [404, 409],
    errors: { update: [409], delete: [409] },
    descriptions: {
      list: 'Newest first; `?project_id=` and `?status=` narrow the list.',
      update: 'Title, project and metadata. Moving it to another project (`project_id`) takes its runs along (their `project_id`; their usage stays booked where it was spent); 409 while a run works on it.',
      delete: 'Deletes the thread and its messages; 409 while a run works on it.',
    },
  });

  registerOwnedRoutes(app, {
    noun: 'Message',
    path: '/threads/:thread_id/messages',
    idParam: 'message_id',
    tags: ['threads'],
    schemas: { create: MessageCreate, update: MessageUpdate, public: MessagePublic },
    service: threadService.messageService,
    listQuery: MessageListQuery,
    createErrors: [409],
    errors: { update: [409], delete: [409] },
    descriptions: {
      list: 'Oldest first (creation order). `?after=<message id>` continues after that message; `count` is the total after the cursor.',
      create: 'Appends a `user` message (clients post user messages only; assistant and tool messages come from runs). 409 while a run works on the thread, and when the thread is full: it holds, or its `enqueue` runs\' inputs will take it to, MAX_MESSAGES_PER_THREAD messages (start a new thread).',
      update: 'Any message\'s metadata; the content of user messages only. 409 while a run works on the thread.',
      delete: "409 while a run works on the thread. Deleting a `tool` message, or the `assistant` message whose tool call it answers, leaves the other in the thread: later runs tell the model such a call's result is missing and leave out a result whose call is gone (providers refuse either).",
    },
  });
};
