import { loadBuiltinModels } from './builtin-models.js';
import type { ModelInfo } from './types.js';

let builtins: ReadonlyMap<string, Readonly<ModelInfo>> | null = null;
const byId = () => (builtins ??= new Map(loadBuiltinModels().map((model) => [model.id, model])));

/** Whether `id` is a model of the built-in catalog (the pinned data package), aliases aside. */
export function isBuiltinModel(id: string): boolean {
  return byId().has(id);
}

/** The built-in catalog's entry for `id` as the data package gives it (overrides aside; a hidden one too). */
export function builtinModel(id: string): Readonly<ModelInfo> | undefined {
  return byId().get(id);
}
