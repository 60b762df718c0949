import type { FastifyInstance } from 'fastify';
import type { ZodTypeProvider } from 'fastify-type-provider-zod';
import { z } from 'zod';

import { authErrors, ErrorBody, Id, listOf, Message, Pagination } from '../schemas/common.js';

import type { Page, PageOf } from '../crud/page.js';
import { contextOf, type ServiceContext } from '../services/context.js';

/** The five operations of an owned resource, as its service implements them. */
export interface OwnedService<Row, Create, Update, Created = Row> {
  list(ctx: ServiceContext, page: Page): Promise<PageOf<Row>>;
  create(ctx: ServiceContext, input: Create): Promise<Created & { id: string }>;
  get(ctx: ServiceContext, id: string): Promise<Row>;
  update(ctx: ServiceContext, id: string, input: Update): Promise<Row>;
  remove(ctx: ServiceContext, id: string): Promise<void>;
}

type Operation = 'list' | 'create' | 'get' | 'update' | 'delete';

export interface OwnedRoutesOptions<Row, Create, Update, Created> {
  /** The resource's name in a sentence, singular: `Project`, `API key`. */
  noun: string;
  /** Plural of `noun` (default: noun + "s"). */
  plural?: string;
  /** The collection's path: `/projects`. */
  path: string;
  /** The id's path parameter: `project_id`. */
  idParam: string;
  tags: string[];
  schemas: { create: z.ZodType<Create>; update: z.ZodType<Update>; public: z.ZodType; created?: z.ZodType };
  service: OwnedService<Row, Create, Update, Created>;
  /** Error answers a creation may give besides 401/403/422 (default: 409, the per-user limit). */
  createErrors?: number[];
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
export function registerOwnedRoutes<Row, Create, Update, Created = Row>(
  app: FastifyInstance,
  options: OwnedRoutesOptions<Row, Create, Update, Created>,
): void {
  const api = app.withTypeProvider<ZodTypeProvider>();
  const { noun, path, idParam, tags, schemas, service, descriptions = {} } = options;
  const plural = options.plural ?? `${noun}s`;
  const [one, many] = [titleCase(noun), titleCase(plural)];
  const [oneId, manyId] = [snakeCase(noun), snakeCase(plural)];
  const itemPath = `${path}/:${idParam}`;
  const params = z.object({ [idParam]: Id });
  const idOf = (request: { params: unknown }) => (request.params as Record<string, string>)[idParam]!;
  const notFound = { 404: ErrorBody };
  const describe = (operation: Operation) => (descriptions[operation] ? { description: descriptions[operation] } : {});

  api.get(
    path,
    {
      schema: {
        operationId: `list_${manyId}`,
        summary: `List ${many}`,
        ...describe('list'),
        tags,
        querystring: Pagination,
        response: { 200: listOf(schemas.public), ...authErrors },
      },
    },
    async (request) => service.list(contextOf(request), request.query),
  );

  const createErrors = Object.fromEntries((options.createErrors ?? [409]).map((status) => [status, ErrorBody]));
  api.post(
    path,
    {
      schema: {
        operationId: `create_${oneId}`,
        summary: `Create ${one}`,
        ...describe('create'),
        tags,
        body: schemas.create,
        response: { 200: schemas.created ?? schemas.public, ...createErrors, ...authErrors },
      },
    },
    async (request, reply) => {
      const created = await service.create(contextOf(request), request.body as Create);
      void reply.header('location', `${app.prefix}${path}/${created.id}`);
      return created;
    },
  );

  api.get(
    itemPath,
    {
      schema: {
        operationId: `get_${oneId}`,
        summary: `Get ${one}`,
        ...describe('get'),
        tags,
        params,
        response: { 200: schemas.public, ...notFound, ...authErrors },
      },
    },
    async (request) => service.get(contextOf(request), idOf(request)),
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
        response: { 200: schemas.public, ...notFound, ...authErrors },
      },
    },
    async (request) => service.update(contextOf(request), idOf(request), request.body as Update),
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
        response: { 200: Message, ...notFound, ...authErrors },
      },
    },
    async (request) => {
      await service.remove(contextOf(request), idOf(request));
      return { message: `${noun} deleted successfully` };
    },
  );
}
