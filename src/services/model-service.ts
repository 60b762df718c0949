import { type Db, transaction } from '../core/db.js';
import { ConflictError, NotFoundError, UnprocessableError, type ValidationIssue } from '../core/errors.js';

import type { ModelCreate, ModelUpdate } from '../schemas/model.js';

import * as overrideCrud from '../crud/model-override.js';
import * as providerCrud from '../crud/provider.js';
import { builtinModel, isBuiltinModel } from '../modules/ai-models/builtin-ids.js';
import { builtinProviderKey, type ModelCatalog, type ModelManager, type ModelView } from '../modules/ai-models/index.js';
import type { Capability, ModelInfo } from '../modules/ai-models/types.js';
import { ensureSuperuser } from '../utils/authentication.js';
import { firstNames } from '../utils/text.js';
import type { ServiceContext } from './context.js';
import { refreshModels, usableOverrides } from './model-sync.js';


const notFound = (id: string) => new NotFoundError(`Model ${id} not found`);

export function list(models: ModelManager, query: { include_disabled: boolean; limit: number; offset: number }) {
  const all = models.listAvailableModels({ includeDisabled: query.include_disabled });
  return { data: all.slice(query.offset, query.offset + query.limit), count: all.length };
}

/** By id or alias; disabled models too (they are listed with include_disabled). */
export function get(models: ModelManager, idOrAlias: string): ModelView {
  const model = models.getModel(idOrAlias);
  if (!model) throw notFound(idOrAlias);
  return model;
}

/**
 * A model refers to a built-in provider or to a provider record (by name), which stays until the
 * model's write commits (`tx`): a delete of it meanwhile waits, then sees the model and refuses.
 */
async function checkProvider(tx: Db, provider: string | undefined): Promise<void> {
  // A built-in provider exists without a record: its credentials come from the settings.
  if (provider === undefined || builtinProviderKey(provider) !== undefined) return;
  if (!(await providerCrud.lockByName(tx, provider, 'share'))) throw new NotFoundError(`Provider ${provider} not found`);
}

/** What a fallback must do when its model does: the operations a call makes. */
const STAND_IN_FOR: readonly Capability[] = ['chat', 'embedding'];

/**
 * Each fallback must be a model that can stand in for `id` when its calls fail: one the catalog
 * knows, not the model itself, able to do what the model does (chat, embeddings). The call path
 * skips any other without a word; a mistake here would only show when the model fails. 422 naming each.
 */
function checkFallbacks(catalog: ModelCatalog, id: string, capabilities: readonly Capability[], fallbacks: readonly string[] | undefined): void {
  const issues: ValidationIssue[] = [];
  fallbacks?.forEach((name, i) => {
    const issue = (msg: string) => issues.push({ loc: ['body', 'fallbacks', i], msg, type: 'value_error' });
    const fallback = catalog.modelAsCalled(name);
    if (name === id || fallback?.id === id) return issue('A model cannot be its own fallback');
    if (!fallback) return issue(`Unknown model ${JSON.stringify(name)}; GET /models lists the catalog`);
    const missing = STAND_IN_FOR.filter((can) => capabilities.includes(can) && !fallback.capabilities.includes(can));
    if (missing.length) issue(`Model ${JSON.stringify(fallback.id)} cannot stand in: it lacks ${missing.join(' and ')}`);
  });
  if (issues.length) throw new UnprocessableError(issues);
}

/** Whose `name` is, when another model's (its id or an alias), in words. */
function heldBy(catalog: ModelCatalog, id: string, name: string): string | undefined {
  const holder = catalog.getModel(name);
  if (!holder || holder.id === id) return undefined;
  return holder.id === name ? `${JSON.stringify(name)} is the id of model ${JSON.stringify(holder.id)}` : `${JSON.stringify(name)} is already an alias of model ${JSON.stringify(holder.id)}`;
}

/** An issue at `loc(i)` for each of `names` that another model holds (see heldBy). */
function heldNames(catalog: ModelCatalog, id: string, names: readonly string[], loc: (i: number) => (string | number)[], say = (msg: string) => msg): ValidationIssue[] {
  return names.flatMap((name, i) => {
    const msg = heldBy(catalog, id, name);
    return msg ? [{ loc: loc(i), msg: say(msg), type: 'value_error' }] : [];
  });
}

/**
 * Each alias must name this model alone: the catalog resolves an id before any alias and the first
 * model to claim an alias before the others (the oldest row), so an alias that is another model's
 * id or alias would be listed here yet call the other model. 422 naming the model that holds each.
 * A new model's id too (an id wins over an alias, so another model's alias would quietly start
 * calling it), and a hidden built-in brought back without aliases of its own takes back its
 * catalog's aliases.
 */
function checkNames(catalog: ModelCatalog, id: string, aliases: readonly string[] | undefined, created = false): void {
  const issues = created ? heldNames(catalog, id, [id], () => ['body', 'id']) : [];
  if (aliases !== undefined) issues.push(...heldNames(catalog, id, aliases, (i) => ['body', 'aliases', i]));
  else if (created) issues.push(...heldNames(catalog, id, builtinModel(id)?.aliases ?? [], () => ['body', 'id'], (msg) => `Its built-in alias ${msg}`));
  if (issues.length) throw new UnprocessableError(issues);
}

/** A model of `catalog` by id or alias, or 404. */
function found(catalog: ModelCatalog, idOrAlias: string): ModelInfo {
  const model = catalog.getModel(idOrAlias);
  if (!model) throw notFound(idOrAlias);
  return model;
}

/**
 * Runs a catalog write in a transaction holding the catalog's write lock (every node's writes
 * take it), with the catalog as the database holds it then: the write's checks read that, not the
 * node's catalog, which another superuser's write may not have reached yet (in flight here, or on
 * another node). Two writes that would conflict therefore never both pass.
 */
async function catalogWrite<T>(ctx: ServiceContext, models: ModelManager, work: (tx: Db, catalog: ModelCatalog) => Promise<T>): Promise<T> {
  return transaction(ctx.db, async (tx) => {
    await overrideCrud.lockCatalogWrites(tx);
    const catalog = models.catalogWith(usableOverrides(await overrideCrud.listAll(tx), ctx.log));
    return work(tx, catalog);
  });
}

async function changed(ctx: ServiceContext, models: ModelManager, id: string): Promise<ModelView> {
  await refreshModels(models, ctx.db, ctx.settings, ctx.log);
  return get(models, id);
}

/**
 * A custom model, or an override of a built-in one. 409 when the model already has a row; a
 * hidden (deleted) built-in is brought back with the given changes.
 */
export async function create(ctx: ServiceContext, models: ModelManager, input: ModelCreate): Promise<ModelView> {
  ensureSuperuser(ctx.principal);
  const { id, ...fields } = input;
  const row = { ...overrideCrud.NO_OVERRIDE, ...fields, deleted: false };
  await catalogWrite(ctx, models, async (tx, catalog) => {
    // A built-in's own (a hidden one is not in the catalog), else a custom model's default.
    checkFallbacks(catalog, id, fields.capabilities ?? builtinModel(id)?.capabilities ?? ['chat'], fields.fallbacks);
    checkNames(catalog, id, fields.aliases, true);
    await checkProvider(tx, fields.provider);
    const existing = await overrideCrud.getByModelId(tx, id);
    if (existing?.deleted) await overrideCrud.upsert(tx, id, row);
    else await overrideCrud.insert(tx, id, row);
  });
  ctx.log.info({ model: id, builtin: isBuiltinModel(id) }, 'Model created');
  return changed(ctx, models, id);
}

/** Changes the given fields of a model (by id or alias); a built-in one gets its override row. */
export async function update(ctx: ServiceContext, models: ModelManager, idOrAlias: string, input: ModelUpdate): Promise<ModelView> {
  ensureSuperuser(ctx.principal);
  const id = await catalogWrite(ctx, models, async (tx, catalog) => {
    const { id, capabilities, fallbacks } = found(catalog, idOrAlias);
    // New capabilities are checked against the fallbacks the model keeps, too.
    checkFallbacks(catalog, id, input.capabilities ?? capabilities, input.fallbacks ?? (input.capabilities ? fallbacks : undefined));
    checkNames(catalog, id, input.aliases);
    await checkProvider(tx, input.provider);
    await overrideCrud.upsert(tx, id, input);
    return id;
  });
  ctx.log.info({ model: id, fields: Object.keys(input) }, 'Model updated');
  return changed(ctx, models, id);
}

/**
 * A custom model is removed; a built-in one is hidden (its overrides dropped) until it is created
 * again. 409 while other models name it as a fallback: their calls would skip it without a word
 * while they still list it, and a change of their capabilities would be refused for it.
 */
export async function remove(ctx: ServiceContext, models: ModelManager, idOrAlias: string): Promise<void> {
  ensureSuperuser(ctx.principal);
  const id = await catalogWrite(ctx, models, async (tx, catalog) => {
    const { id } = found(catalog, idOrAlias);
    const dependents = catalog
      .listModels({ includeDisabled: true })
      .filter((model) => model.id !== id && model.fallbacks.some((name) => catalog.getModel(name)?.id === id))
      .map((model) => model.id);
    if (dependents.length) {
      throw new ConflictError(`Model ${id} is a fallback of ${dependents.length === 1 ? 'model' : 'models'} ${firstNames(dependents)}: remove it from their fallbacks first`);
    }
    if (isBuiltinModel(id)) await overrideCrud.upsert(tx, id, { ...overrideCrud.NO_OVERRIDE, deleted: true });
    else await overrideCrud.removeByModelId(tx, id);
    return id;
  });
  ctx.log.info({ model: id }, 'Model deleted');
  await refreshModels(models, ctx.db, ctx.settings, ctx.log);
}
