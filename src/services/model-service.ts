import { type Db, transaction } from '../core/db.js';
import { ConflictError, NotFoundError, UnprocessableError, type ValidationIssue } from '../core/errors.js';

import type { ModelCreate, ModelUpdate } from '../schemas/model.js';

import type { CatalogRow } from '../crud/model-override.js';
import * as overrideCrud from '../crud/model-override.js';
import * as providerCrud from '../crud/provider.js';
import { builtinModel, isBuiltinModel } from '../modules/ai-models/builtin-ids.js';
import { builtinProviderKey, type ModelCatalog, type ModelManager, type ModelPublicView } from '../modules/ai-models/index.js';
import { type Capability, type ModelInfo, STAND_IN_FOR } from '../modules/ai-models/types.js';
import { ensureSuperuser } from '../utils/authentication.js';
import { firstNames } from '../utils/text.js';
import type { ServiceContext } from './context.js';
import { refreshModels, usableOverrides } from './model-sync.js';


const notFound = (id: string) => new NotFoundError(`Model ${id} not found`);

export function list(models: ModelManager, query: { include_disabled: boolean; limit: number; offset: number }) {
  const all = models.listAvailableModels({ includeDisabled: query.include_disabled });
  return { data: all.slice(query.offset, query.offset + query.limit).map((model) => models.publicView(model)), count: all.length };
}

/** By id or alias; disabled models too (they are listed with include_disabled). */
export function get(models: ModelManager, idOrAlias: string): ModelPublicView {
  const model = models.getModel(idOrAlias);
  if (!model) throw notFound(idOrAlias);
  return models.publicView(model);
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

/** Why a fallback cannot stand in for a model: it is the model, the catalog has no such model, or it cannot do what the model does. */
type FallbackFault = { kind: 'self' } | { kind: 'unknown' } | { kind: 'lacks'; model: string; missing: Capability[] };

/** Why `name` cannot stand in for the model `id` (which can do `capabilities`) in `catalog`; undefined when it can. */
function fallbackFault(catalog: ModelCatalog, id: string, capabilities: readonly Capability[], name: string): FallbackFault | undefined {
  const fallback = catalog.modelAsCalled(name);
  if (name === id || fallback?.id === id) return { kind: 'self' };
  if (!fallback) return { kind: 'unknown' };
  const missing = STAND_IN_FOR.filter((can) => capabilities.includes(can) && !fallback.capabilities.includes(can));
  return missing.length ? { kind: 'lacks', model: fallback.id, missing } : undefined;
}

/**
 * Each fallback must be a model that can stand in for `id` when its calls fail: one the catalog
 * knows, not the model itself nor one named before, able to do what the model does (chat, embeddings). The call path
 * skips any other without a word; a mistake here would only show when the model fails. 422 naming
 * each. Two models may name each other: a call tries its model's own fallbacks, not theirs.
 */
function checkFallbacks(catalog: ModelCatalog, id: string, capabilities: readonly Capability[], fallbacks: readonly string[] | undefined): void {
  const issues: ValidationIssue[] = [];
  // The models named so far, by id: a model named twice (by id and alias, say) would be tried twice.
  const named = new Map<string, string>();
  fallbacks?.forEach((name, i) => {
    const fault = fallbackFault(catalog, id, capabilities, name);
    if (!fault) {
      const model = catalog.modelAsCalled(name)!.id;
      const earlier = named.get(model);
      if (earlier === undefined) named.set(model, name);
      else issues.push({ loc: ['body', 'fallbacks', i], msg: `Model ${JSON.stringify(model)} is already a fallback (as ${JSON.stringify(earlier)})`, type: 'value_error' });
      return;
    }
    const msg =
      fault.kind === 'self'
        ? 'A model cannot be its own fallback'
        : fault.kind === 'unknown'
          ? `Unknown model ${JSON.stringify(name)}; GET /models lists the catalog`
          : `Model ${JSON.stringify(fault.model)} cannot stand in: it lacks ${fault.missing.join(' and ')}`;
    issues.push({ loc: ['body', 'fallbacks', i], msg, type: 'value_error' });
  });
  if (issues.length) throw new UnprocessableError(issues);
}

/**
 * What a change of `id` (`before` → `after`) does to the other models' fallbacks: each name that
 * called a model before and afterwards calls none or another, or no longer one that can stand in,
 * in words. Names that called nothing before (rows from before fallbacks were checked) are not
 * this change's doing.
 */
function brokenFallbacks(before: ModelCatalog, after: ModelCatalog, id: string): { dependents: string[]; reasons: string[] } {
  const dependents: string[] = [];
  const reasons = new Set<string>();
  for (const model of before.listModels({ includeDisabled: true })) {
    if (model.id === id) continue;
    let broken = false;
    for (const name of model.fallbacks) {
      const was = before.modelAsCalled(name);
      if (!was) continue;
      const now = after.modelAsCalled(name);
      const fault = fallbackFault(after, model.id, model.capabilities, name);
      if (!now) reasons.add(`${JSON.stringify(name)} would name no model`);
      else if (now.id !== was.id) reasons.add(`${JSON.stringify(name)} would name model ${JSON.stringify(now.id)}`);
      else if (fault?.kind === 'lacks' && !fallbackFault(before, model.id, model.capabilities, name)) reasons.add(`it would lack ${fault.missing.join(' and ')}`);
      else continue;
      broken = true;
    }
    if (broken) dependents.push(model.id);
  }
  return { dependents, reasons: [...reasons] };
}

/**
 * 409 when a change of `id` would break other models' fallbacks (see brokenFallbacks): their calls
 * would skip it without a word while they still list it. A delete needs no reasons: it is one.
 */
function checkDependents(before: ModelCatalog, after: ModelCatalog, id: string, explain: boolean): void {
  const { dependents, reasons } = brokenFallbacks(before, after, id);
  if (!dependents.length) return;
  const why = explain ? `after this change ${firstNames(reasons)}; ` : '';
  throw new ConflictError(`Model ${id} is a fallback of ${dependents.length === 1 ? 'model' : 'models'} ${firstNames(dependents)}: ${why}remove it from their fallbacks first`);
}

/** The models (ids) whose fallbacks name `id` (by its id or an alias). */
function namedAsFallbackBy(catalog: ModelCatalog, id: string): string[] {
  return catalog
    .listModels({ includeDisabled: true })
    .filter((model) => model.id !== id && model.fallbacks.some((name) => catalog.getModel(name)?.id === id))
    .map((model) => model.id);
}

/** Whose `name` is, when another model's (its id or an alias), in words. */
function heldBy(catalog: ModelCatalog, id: string, name: string): string | undefined {
  const holder = catalog.getModel(name);
  if (!holder || holder.id === id) return undefined;
  return holder.id === name ? `${JSON.stringify(name)} is the id of model ${JSON.stringify(holder.id)}` : `${JSON.stringify(name)} is already an alias of model ${JSON.stringify(holder.id)}`;
}

/** An issue at `loc(i)` for each of `names` with a fault (`fault(name, i)`, in words). */
function nameIssues(names: readonly string[], loc: (i: number) => (string | number)[], fault: (name: string, i: number) => string | undefined): ValidationIssue[] {
  return names.flatMap((name, i) => {
    const msg = fault(name, i);
    return msg ? [{ loc: loc(i), msg, type: 'value_error' }] : [];
  });
}

/**
 * Why the `i`th of a model's `aliases` adds no name of its own: the model's id, or an alias listed
 * before it (as ModelId left it: trimmed; names are matched as written, case too). Harmless to
 * calls, yet `GET /models` would list the model under a name twice.
 */
function repeatedName(id: string, aliases: readonly string[], alias: string, i: number): string | undefined {
  if (alias === id) return `${JSON.stringify(alias)} is this model's id`;
  return aliases.indexOf(alias) < i ? `${JSON.stringify(alias)} is listed twice` : undefined;
}

/**
 * Each alias must name this model alone: the catalog resolves an id before any alias and the first
 * model to claim an alias before the others (the oldest row), so an alias that is another model's
 * id or alias would be listed here yet call the other model. 422 naming the model that holds each.
 * A new model's id too (an id wins over an alias, so another model's alias would quietly start
 * calling it), and a hidden built-in brought back without aliases of its own takes back its
 * catalog's aliases. An alias that repeats the model's id or another of its aliases is 422 too
 * (see repeatedName); a built-in's catalog aliases never do (`aliasesOf` lists each once, without
 * the entry's id), so they are not checked for it.
 */
function checkNames(catalog: ModelCatalog, id: string, aliases: readonly string[] | undefined, created = false): void {
  const held = (name: string) => heldBy(catalog, id, name);
  const issues = created ? nameIssues([id], () => ['body', 'id'], held) : [];
  if (aliases !== undefined) issues.push(...nameIssues(aliases, (i) => ['body', 'aliases', i], (alias, i) => repeatedName(id, aliases, alias, i) ?? held(alias)));
  else if (created) issues.push(...nameIssues(builtinModel(id)?.aliases ?? [], () => ['body', 'id'], (alias) => {
    const msg = held(alias);
    return msg && `Its built-in alias ${msg}`;
  }));
  if (issues.length) throw new UnprocessableError(issues);
}

/** A model of `catalog` by id or alias, or 404. */
function found(catalog: ModelCatalog, idOrAlias: string): ModelInfo {
  const model = catalog.getModel(idOrAlias);
  if (!model) throw notFound(idOrAlias);
  return model;
}

/** The catalog as the database holds it, under the write lock, and what a write would make of it. */
interface LockedCatalog {
  catalog: ModelCatalog;
  /** The catalog once the row of `id` is what `change` makes of it (its row, or undefined when it has none): undefined removes it. */
  after: (id: string, change: (row: CatalogRow | undefined) => CatalogRow | undefined) => ModelCatalog;
}

/**
 * Runs a catalog write in a transaction holding the catalog's write lock (every node's writes
 * take it), with the catalog as the database holds it then: the write's checks read that, not the
 * node's catalog, which another superuser's write may not have reached yet (in flight here, or on
 * another node). Two writes that would conflict therefore never both pass.
 */
async function catalogWrite<T>(ctx: ServiceContext, models: ModelManager, work: (tx: Db, locked: LockedCatalog) => Promise<T>): Promise<T> {
  return transaction(ctx.db, async (tx) => {
    await overrideCrud.lockCatalogWrites(tx);
    const rows: CatalogRow[] = await overrideCrud.listAll(tx);
    const catalogOf = (list: readonly CatalogRow[]) => models.catalogWith(usableOverrides(list, ctx.log));
    const after: LockedCatalog['after'] = (id, change) => {
      const at = rows.findIndex((row) => row.model_id === id);
      const next = change(at < 0 ? undefined : rows[at]);
      // A row's place is kept (the oldest row's claim to an alias wins); a new one is the newest.
      if (at < 0) return catalogOf(next ? [...rows, next] : rows);
      return catalogOf(next ? rows.map((row, i) => (i === at ? next : row)) : rows.filter((_, i) => i !== at));
    };
    return work(tx, { catalog: catalogOf(rows), after });
  });
}

async function changed(ctx: ServiceContext, models: ModelManager, id: string): Promise<ModelPublicView> {
  await refreshModels(models, ctx.db, ctx.settings, ctx.log);
  return get(models, id);
}

/**
 * A custom model, or an override of a built-in one. 409 when the model already has a row; a
 * hidden (deleted) built-in is brought back with the given changes.
 */
export async function create(ctx: ServiceContext, models: ModelManager, input: ModelCreate): Promise<ModelPublicView> {
  ensureSuperuser(ctx.principal);
  const { id, ...fields } = input;
  const row = { ...overrideCrud.NO_OVERRIDE, ...fields, deleted: false };
  await catalogWrite(ctx, models, async (tx, { catalog }) => {
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

/**
 * Changes the given fields of a model (by id or alias); a built-in one gets its override row. 409
 * when the change would break other models' fallbacks (see checkDependents). Disabling a model
 * that others name as a fallback is the operator's choice: their calls skip it until it is enabled
 * again, which is logged as a warning naming them.
 */
export async function update(ctx: ServiceContext, models: ModelManager, idOrAlias: string, input: ModelUpdate): Promise<ModelPublicView> {
  ensureSuperuser(ctx.principal);
  const { id, dependents } = await catalogWrite(ctx, models, async (tx, { catalog, after }) => {
    const { id, capabilities, fallbacks, enabled } = found(catalog, idOrAlias);
    // New capabilities are checked against the fallbacks the model keeps, too.
    checkFallbacks(catalog, id, input.capabilities ?? capabilities, input.fallbacks ?? (input.capabilities ? fallbacks : undefined));
    checkNames(catalog, id, input.aliases);
    checkDependents(catalog, after(id, (row) => ({ ...(row ?? { ...overrideCrud.NO_OVERRIDE, model_id: id, deleted: false }), ...input })), id, true);
    await checkProvider(tx, input.provider);
    await overrideCrud.upsert(tx, id, input);
    return { id, dependents: enabled && input.enabled === false ? namedAsFallbackBy(catalog, id) : [] };
  });
  ctx.log.info({ model: id, fields: Object.keys(input) }, 'Model updated');
  if (dependents.length) ctx.log.warn({ model: id, dependents }, 'Model disabled while other models name it as a fallback: their calls skip it until it is enabled again');
  return changed(ctx, models, id);
}

/**
 * A custom model is removed; a built-in one is hidden (its overrides dropped) until it is created
 * again. 409 while other models name it as a fallback (see checkDependents): their calls would
 * skip it without a word while they still list it.
 */
export async function remove(ctx: ServiceContext, models: ModelManager, idOrAlias: string): Promise<void> {
  ensureSuperuser(ctx.principal);
  const id = await catalogWrite(ctx, models, async (tx, { catalog, after }) => {
    const { id } = found(catalog, idOrAlias);
    const hidden = isBuiltinModel(id);
    checkDependents(catalog, after(id, (row) => (hidden ? { ...row, ...overrideCrud.NO_OVERRIDE, model_id: id, deleted: true } : undefined)), id, false);
    if (hidden) await overrideCrud.upsert(tx, id, { ...overrideCrud.NO_OVERRIDE, deleted: true });
    else await overrideCrud.removeByModelId(tx, id);
    return id;
  });
  ctx.log.info({ model: id }, 'Model deleted');
  await refreshModels(models, ctx.db, ctx.settings, ctx.log);
}
