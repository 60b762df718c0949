import { loadBuiltinModels } from './builtin-models.js';

let ids: ReadonlySet<string> | null = null;

/** Whether `id` is a model of the built-in catalog (the pinned data package), aliases aside. */
export function isBuiltinModel(id: string): boolean {
  ids ??= new Set(loadBuiltinModels().map((model) => model.id));
  return ids.has(id);
}
