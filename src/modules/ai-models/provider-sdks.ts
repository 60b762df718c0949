/**
 * The SDK packages of the providers with APIs of their own, Anthropic's and Google's, loaded when a
 * call to such a provider first needs one rather than at start: ~0.8 MB of source that a start
 * never runs and an installation calling neither never needs (start-up CPU and memory:
 * bench/RESULTS.md). OpenAI's and the OpenAI-compatible SDKs are loaded at start, as most calls
 * take them. A call awaits `load` before anything of the package is used (ModelManager.run), then
 * uses it through `get`, synchronously, as it used the package's exports before.
 */
import type { createAnthropic } from '@ai-sdk/anthropic';
import type { getModelCapabilities, supportsNativeStructuredOutputSchema } from '@ai-sdk/anthropic/internal';
import type { createGoogleGenerativeAI } from '@ai-sdk/google';

import type { ProviderKind } from './types.js';

/** What Keel uses of each package loaded on first use. */
export interface ProviderSdks {
  anthropic: {
    createAnthropic: typeof createAnthropic;
    getModelCapabilities: typeof getModelCapabilities;
    supportsNativeStructuredOutputSchema: typeof supportsNativeStructuredOutputSchema;
  };
  google: { createGoogleGenerativeAI: typeof createGoogleGenerativeAI };
}

/** The provider kinds whose SDK package is loaded on first use. */
export type LoadedOnUse = keyof ProviderSdks;

export type SdkImporters = { [K in LoadedOnUse]: () => Promise<ProviderSdks[K]> };

/** How each package is imported (a test wraps them to count or fail the imports). */
export const SDK_IMPORTERS: SdkImporters = {
  anthropic: async () => {
    const [{ createAnthropic }, { getModelCapabilities, supportsNativeStructuredOutputSchema }] = await Promise.all([import('@ai-sdk/anthropic'), import('@ai-sdk/anthropic/internal')]);
    return { createAnthropic, getModelCapabilities, supportsNativeStructuredOutputSchema };
  },
  google: async () => {
    const { createGoogleGenerativeAI } = await import('@ai-sdk/google');
    return { createGoogleGenerativeAI };
  },
};

export const loadedOnUse = (kind: ProviderKind | undefined): kind is LoadedOnUse => kind === 'anthropic' || kind === 'google';

/** The packages as loaded so far; one per process (providerSdks), tests make their own. */
export class SdkLoader {
  private readonly loaded: Partial<ProviderSdks> = {};
  private readonly loading = new Map<LoadedOnUse, Promise<void>>();

  constructor(private readonly importers: SdkImporters = SDK_IMPORTERS) {}

  /**
   * Loads `kind`'s package; undefined once it is loaded, so that a call need not wait a turn for
   * it. Calls meanwhile wait for the same load; a load that failed is not kept (the next call tries
   * again) and rejects with the import's error.
   */
  load(kind: LoadedOnUse): Promise<void> | undefined {
    if (this.loaded[kind]) return undefined;
    let loading = this.loading.get(kind);
    if (!loading) {
      loading = this.importers[kind]()
        .then((sdk) => {
          (this.loaded as Record<LoadedOnUse, unknown>)[kind] = sdk;
        })
        .finally(() => this.loading.delete(kind));
      this.loading.set(kind, loading);
    }
    return loading;
  }

  /** `kind`'s package, which `load` has loaded (a call awaits it first: ModelManager.run). */
  get<K extends LoadedOnUse>(kind: K): ProviderSdks[K] {
    const sdk = this.loaded[kind];
    if (!sdk) throw new Error(`The ${kind} provider's SDK package is used before it was loaded`);
    return sdk;
  }
}

/** The process's packages: what every ProviderRegistry uses unless given its own loader. */
export const providerSdks = new SdkLoader();
