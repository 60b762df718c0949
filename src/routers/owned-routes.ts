import type { FastifyInstance } from 'fastify';
import type { ZodTypeProvider } from 'fastify-type-provider-zod';
import { z } from 'zod';

import { authErrors, ErrorBody, Id, listOf, Message, Pagination } from '../schemas/common.js';

import type { Page, PageOf } from '../crud/page.js';
import { contextOf, type ServiceContext } from '../services/context.js';

/**
 * The five operations of an owned resource, as its service implements them. A nested resource
 * (`/threads/:thread_id/messages`) gets its parents' path parameters as `params`; a list gets its
 * whole query (paging and the resource's own filters).
 */
export interface OwnedService<Row, Create, Update, Created = Row, Query extends Page = Page, Params = Record<string, string>> {
  list(ctx: ServiceContext, query: Query, params: Params): Promise<PageOf<Row>>;
  /** Left out by a resource created some other way (knowledge entries: by upload): no POST route then. */
  create?(ctx: ServiceContext, input: Create, params: Params): Promise<Created & { id: string }>;
  get(ctx: ServiceContext, id: string, params: Params): Promise<Row>;
  update(ctx: ServiceContext, id: string, input: Update, params: Params): Promise<Row>;
  remove(ctx: ServiceContext, id: string, params: Params): Promise<void>;
}

type Operation = 'list' | 'create' | 'get' | 'update' | 'delete';

export interface OwnedRoutesOptions<Row, Create, Update, Created, Query extends Page, Params> {
  /** The resource's name in a sentence, singular: `Project`, `API key`. */
  noun: string;
  /** Plural of `noun` (default: noun + "s"). */
  plural?: string;
  /** The collection's path: `/projects`; nested under a parent: `/threads/:thread_id/messages`. */
  path: string;
  /** The id's path parameter: `project_id`. */
  idParam: string;
  tags: string[];
  /** `create` may be left out with the service's `create`. */
  schemas: { create?: z.ZodType<Create>; update: z.ZodType<Update>; public: z.ZodType; created?: z.ZodType };
  service: OwnedService<Row, Create, Update, Created, Query, Params>;
  /** The list's query: `Pagination` (the default) extended with the resource's filters or a cursor. */
  listQuery?: z.ZodType<Query>;
  /** Error answers a creation may give besides 401/403/422 (default: 409, the per-user limit). */
  createErrors?: number[];
  /** Error answers of the other operations besides 401/403/422 and (items, nested lists) 404, e.g. 409 for a busy parent. */
  errors?: Partial<Record<Exclude<Operation, 'create'>, number[]>>;
  descriptions?: Partial<Record<Operation, string>>;
}

/** `API key` → `API Key` (summaries), `api_key` (operation ids), as the guide writes them. */
const titleCase = (text: string) => text.replace(/(^|\s)(\S)/g, (_m, space: string, letter: string) => space + letter.toUpperCase());
const snakeCase = (text: string) => text.trim().toLowerCase().replace(/\s+/g, '_');

/**
 * Registers list, create, get, update and delete for an owned resource, with operation ids,
 * summaries, tags, parameters and error answers derived from its names and schemas. The routes
 * authenticate through the plugin's hook; the service enforces the access policy. A creation
 * answers 200 (as the template does) with a `Location` header naming the new resource.
 */
export function registerOwnedRoutes<Row, Create, Update, Created = Row, Query extends Page = Page, Params = Record<string, string>>(
  app: FastifyInstance,
  options: OwnedRoutesOptions<Row, Create, Update, Created, Query, Params>,
): void {
  const api = app.withTypeProvider<ZodTypeProvider>();
  const { noun, path, idParam, tags, schemas, service, descriptions = {}, errors = {} } = options;
  const plural = options.plural ?? `${noun}s`;
  const [one, many] = [titleCase(noun), titleCase(plural)];
  const [oneId, manyId] = [snakeCase(noun), snakeCase(plural)];
  const itemPath = `${path}/:${idParam}`;
  // A nested collection's path names its parents: each is an id, and a missing parent answers 404.
  const parentParams = [...path.matchAll(/:(\w+)/g)].map((match) => match[1]!);
  const collectionParams = parentParams.length ? { params: z.object(Object.fromEntries(parentParams.map((name) => [name, Id]))) } : {};
  const params = z.object(Object.fromEntries([...parentParams, idParam].map((name) => [name, Id])));
  const paramsOf = (request: { params: unknown }) => request.params as Params;
  const idOf = (request: { params: unknown }) => (request.params as Record<string, string>)[idParam]!;
  const answers = (operation: Exclude<Operation, 'create'>, item: boolean) =>
    Object.fromEntries([...(item || parentParams.length ? [404] : []), ...(errors[operation] ?? [])].map((status) => [status, ErrorBody]));
  const describe = (operation: Operation) => (descriptions[operation] ? { description: descriptions[operation] } : {});
  /** The created row's path: the collection's, its parameters filled in, and the id. */
  const locationOf = (request: { params: unknown }, id: string) =>
    `${app.prefix}${path.replace(/:(\w+)/g, (_match, name: string) => (request.params as Record<string, string>)[name]!)}/${id}`;

  api.get(
    path,
    {
      schema: {
        operationId: `list_${manyId}`,
        summary: `List ${many}`,
        ...describe('list'),
        tags,
        ...collectionParams,
        querystring: options.listQuery ?? Pagination,
        response: { 200: listOf(schemas.public), ...answers('list', false), ...authErrors },
      },
    },
    async (request) => service.list(contextOf(request), request.query as Query, paramsOf(request)),
  );

  const create = service.create?.bind(service);
  const createErrors = Object.fromEntries([...(parentParams.length ? [404] : []), ...(options.createErrors ?? [409])].map((status) => [status, ErrorBody]));
  if (create && schemas.create) {
    api.post(
      path,
      {
        schema: {
          operationId: `create_${oneId}`,
          summary: `Create ${one}`,
          ...describe('create'),
          tags,
          ...collectionParams,
          body: schemas.create,
          response: { 200: schemas.created ?? schemas.public, ...createErrors, ...authErrors },
        },
      },
      async (request, reply) => {
        const created = await create(contextOf(request), request.body as Create, paramsOf(request));
        void reply.header('location', locationOf(request, created.id));
        return created;
      },
    );
  }

  api.get(
    itemPath,
    {
      schema: {
        operationId: `get_${oneId}`,
        summary: `Get ${one}`,
        ...describe('get'),
        tags,
        params,
        response: { 200: schemas.public, ...answers('get', true), ...authErrors },
      },
    },
    async (request) => service.get(contextOf(request), idOf(request), paramsOf(request)),
  );

  api.patch(
    itemPath,
    {
      schema: {
        operationId: `update_${oneId}`,
        summary: `Update ${one}`,
        ...describe('update'),
        tags,
        params,
        body: schemas.update,
        response: { 200: schemas.public, ...answers('update', true), ...authErrors },
      },
    },
    async (request) => service.update(contextOf(request), idOf(request), request.body as Update, paramsOf(request)),
  );

  api.delete(
    itemPath,
    {
      schema: {
        operationId: `delete_${oneId}`,
        summary: `Delete ${one}`,
        ...describe('delete'),
        tags,
        params,
        response: { 200: Message, ...answers('delete', true), ...authErrors },
      },
    },
    async (request) => {
      await service.remove(contextOf(request), idOf(request), paramsOf(request));
      return { message: `${noun} deleted successfully` };
    },
  );
}
