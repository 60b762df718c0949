/**
 * The model catalog: the built-in models (from the pinned data package) layered with overrides
 * given as plain objects — superuser changes to built-in models and custom models, e.g. database
 * rows. The DB layer only feeds rows in through `setOverrides`.
 */
import { loadBuiltinModels } from './builtin-models.js';
import type { ModelInfo, ModelOverride } from './types.js';

export class ModelConfigError extends Error {}

export interface ListModelsOptions {
  includeDisabled?: boolean;
  provider?: string;
}

export class ModelCatalog {
  private models = new Map<string, ModelInfo>();
  private aliases = new Map<string, string>();
  /** Built-in aliases that name a model of their own at the provider (see `modelAsCalled`), as that model. */
  private variants = new Map<string, ModelInfo>();

  constructor(
    private readonly builtins: readonly ModelInfo[] = loadBuiltinModels(),
    overrides: readonly ModelOverride[] = [],
  ) {
    this.setOverrides(overrides);
  }

  /** Another catalog of the same built-in models with `overrides` (this one unchanged): what a write would make of it. */
  withOverrides(overrides: readonly ModelOverride[]): ModelCatalog {
    return new ModelCatalog(this.builtins, overrides);
  }

  /** Replaces every override at once (call again after a change in the database). */
  setOverrides(overrides: readonly ModelOverride[]): void {
    const models = new Map(this.builtins.map((m) => [m.id, structuredClone(m)]));
    for (const override of overrides) {
      if (override.deleted) {
        models.delete(override.id);
        continue;
      }
      const { deleted: _deleted, ...change } = override;
      const base = models.get(override.id);
      const merged = base ? { ...base, ...stripUndefined(change) } : completeCustomModel(change);
      // Rows written before the service refused them may repeat an alias or list the model's id:
      // it is listed once, without the id (calls are the same: an id wins, the first claim counts).
      if (change.aliases) merged.aliases = [...new Set(change.aliases)].filter((alias) => alias !== override.id);
      models.set(override.id, merged);
    }
    const aliases = new Map<string, string>();
    const variants = new Map<string, ModelInfo>();
    const builtinAliases = new Map(this.builtins.map((m) => [m.id, new Set(m.aliases)]));
    for (const model of models.values()) {
      for (const alias of model.aliases) {
        if (models.has(alias) || aliases.has(alias)) continue;
        aliases.set(alias, model.id);
        if (builtinAliases.get(model.id)?.has(alias) && isSnapshotOf(model.id, alias)) variants.set(alias, { ...model, id: alias, aliases: [], recommended: false });
      }
    }
    this.models = models;
    this.aliases = aliases;
    this.variants = variants;
  }

  /** A model by id or alias (disabled ones too: callers decide), or undefined. */
  getModel(idOrAlias: string): ModelInfo | undefined {
    return this.models.get(idOrAlias) ?? this.models.get(this.aliases.get(idOrAlias) ?? '');
  }

  /**
   * The model a call to `idOrAlias` makes, as `getModel` finds it, but for a built-in alias that is
   * a dated snapshot of its model (`gpt-4o-2024-11-20`, `gemini-2.5-flash-preview-09-2025`) or its
   * `-chat-latest`: the price data lists these under one price, yet each is a model of its own at
   * the provider (pinned, or one that behaves otherwise), so it is called as asked, with its
   * entry's price, capabilities and settings. Other aliases call the entry's id: another spelling
   * (`gpt-5-1`), a name that is no API model (`o4-mini-high`: o4-mini asked to reason hard), a
   * variant the catalog leaves out (`-search-preview`, `-codex`), a superuser's own name.
   */
  modelAsCalled(idOrAlias: string): ModelInfo | undefined {
    return this.models.get(idOrAlias) ?? this.variants.get(idOrAlias) ?? this.models.get(this.aliases.get(idOrAlias) ?? '');
  }

  /** Models by priority (highest first), then id; disabled ones only when asked. */
  listModels({ includeDisabled = false, provider }: ListModelsOptions = {}): ModelInfo[] {
    return [...this.models.values()]
      .filter((m) => (includeDisabled || m.enabled) && (!provider || m.provider === provider))
      .sort((a, b) => b.priority - a.priority || a.id.localeCompare(b.id));
  }
}

/** `alias` is `id` pinned at a date (OpenAI's `-2024-11-20`, Anthropic's `-20250514`, Google's `-preview-09-2025`), or its `-chat-latest`. */
const isSnapshotOf = (id: string, alias: string): boolean =>
  alias.startsWith(`${id}-`) && /^(?:(?:preview-)?(?:\d{4}-\d{2}-\d{2}|\d{8}|\d{2}-\d{4})|chat-latest)$/.test(alias.slice(id.length + 1));

function stripUndefined<T extends object>(value: T): Partial<T> {
  return Object.fromEntries(Object.entries(value).filter(([, v]) => v !== undefined)) as Partial<T>;
}

/** A custom model needs a provider and prices; the rest has defaults. */
function completeCustomModel(change: Omit<ModelOverride, 'deleted'>): ModelInfo {
  if (!change.provider) throw new ModelConfigError(`Custom model ${change.id} needs a provider`);
  if (!change.pricing) throw new ModelConfigError(`Custom model ${change.id} needs pricing`);
  return {
    name: change.id,
    aliases: [],
    context_window: null,
    max_output_tokens: null,
    capabilities: ['chat'],
    enabled: true,
    recommended: false,
    priority: 0,
    fallbacks: [],
    ...stripUndefined(change),
    id: change.id,
    provider: change.provider,
    pricing: change.pricing,
  };
}
