import { createRequire } from 'node:module';

const require = createRequire(import.meta.url);

/**
 * A CommonJS package loaded on first use rather than at start-up: Redis's client and the job queue
 * cost tens of MB and a few hundred ms to load, and an embedded `keel start` never uses them.
 * Synchronous, so the callers' interfaces stay as they were; it is the same module instance an
 * `import` of the package gets (for a package that has only a CommonJS entry, as these do).
 */
export function lazyRequire<T>(id: string): () => T {
  let loaded: T | undefined;
  return () => (loaded ??= require(id) as T);
}
