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
      models.set(override.id, merged);
    }
    const aliases = new Map<string, string>();
    const variants = new Map<string, ModelInfo>();
    const builtinAliases = new Map(this.builtins.map((m) => [m.id, new Set(m.aliases)]));
    for (const model of models.values()) {
      for (const alias of model.aliases) {
        if (models.has(alias) || aliases.has(alias)) continue;
        aliases.set(alias, model.id);
        if (builtinAliases.get(model.id)?.has(alias) && alias.startsWith(`${model.id}-`)) variants.set(alias, { ...model, id: alias, aliases: [], recommended: false });
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
   * The model a call to `idOrAlias` makes, as `getModel` finds it, but for a built-in alias that
   * extends its model's id (`gpt-4o-2024-11-20`, `gpt-5-chat-latest`, `gpt-5.1-codex-max`): the
   * price data lists these under one price, yet each is a model of its own at the provider (a
   * pinned snapshot, a variant that behaves otherwise), so it is called as asked, with its entry's
   * price, capabilities and settings. Other aliases (another spelling, a superuser's own name)
   * call the entry's id.
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
