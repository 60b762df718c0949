import type { FastifyInstance } from 'fastify';

/** The router ignores trailing slashes, so `/reset-password/` and `/reset-password` are one route. */
export const routePath = (path: string) => (path.length > 1 ? path.replace(/\/$/, '') : path);

/** Every route the app serves, as `METHOD /path/:param` (HEAD and the CORS plugin's `OPTIONS *` included). */
export function servedRoutes(app: FastifyInstance): string[] {
  // printRoutes draws a tree: each line is one path segment (relative to its parent) and its methods.
  const served: string[] = [];
  const stack: { depth: number; path: string }[] = [];
  for (const line of app.printRoutes({ commonPrefix: false }).split('\n')) {
    const match = /^([│ ]*)[├└]── (\S+)(?: \(([^)]+)\))?/.exec(line);
    if (!match) continue;
    const depth = match[1]!.length;
    while (stack.length && stack[stack.length - 1]!.depth >= depth) stack.pop();
    const path = (stack.length ? stack[stack.length - 1]!.path : '') + match[2]!;
    stack.push({ depth, path });
    for (const method of (match[3] ?? '').split(', ').filter(Boolean)) served.push(`${method} ${routePath(path)}`);
  }
  return served;
}

export interface OpenApiOperation {
  operationId: string;
  summary: string;
  tags: string[];
  security?: unknown[];
  requestBody?: { content: Record<string, { schema: unknown }> };
  responses: Record<string, { description?: string; content?: Record<string, { schema?: unknown }> }>;
}

export interface OpenApiDocument {
  openapi: string;
  servers?: { url: string }[];
  security?: unknown[];
  paths: Record<string, Record<string, OpenApiOperation>>;
  components: { schemas: Record<string, { properties?: Record<string, unknown> }> };
}

/** Every operation of the document, with its path and (lower-case) method. */
export function operationsOf(document: OpenApiDocument): { path: string; method: string; operation: OpenApiOperation }[] {
  return Object.entries(document.paths).flatMap(([path, item]) => Object.entries(item).map(([method, operation]) => ({ path, method, operation })));
}

/** What a JSON pointer such as `#/components/schemas/X` points at in the document (undefined: nothing). */
export function resolvePointer(document: unknown, ref: string): unknown {
  if (!ref.startsWith('#/')) return undefined;
  let node: unknown = document;
  for (const part of ref.slice(2).split('/')) {
    const key = part.replace(/~1/g, '/').replace(/~0/g, '~');
    if (node === null || typeof node !== 'object' || !(key in node)) return undefined;
    node = (node as Record<string, unknown>)[key];
  }
  return node;
}
