/** The model subsystem: build one ModelManager from the settings and hand it to every caller. */
import type { Settings } from '../../core/config.js';

import { ModelCatalog } from './catalog.js';
import { ModelManager, type UsageMeter, type UsageRecord } from './model-manager.js';
import { type ProviderRecord, ProviderRegistry } from './providers.js';
import type { ModelOverride } from './types.js';

export interface CreateModelManagerOptions {
  meter?: UsageMeter;
  /** Provider records (secrets decrypted) and catalog overrides, e.g. from the database. */
  providers?: readonly ProviderRecord[];
  overrides?: readonly ModelOverride[];
  onMeterError?: (error: unknown, record: UsageRecord) => void;
  /** Why an Anthropic or Google SDK package could not be loaded on first use (provider-sdks.ts). */
  onSdkLoadError?: (error: unknown, providerId: string, kind: string) => void;
}

export function createModelManager(settings: Settings, options: CreateModelManagerOptions = {}): ModelManager {
  return new ModelManager({
    catalog: new ModelCatalog(undefined, options.overrides),
    providers: new ProviderRegistry(settings, options.providers, undefined, options.onSdkLoadError),
    meter: options.meter,
    onMeterError: options.onMeterError,
    timeoutMs: settings.MODEL_TIMEOUT_MS,
    streamTimeoutMs: settings.MODEL_STREAM_TIMEOUT_MS,
    maxResponseBytes: settings.MODEL_MAX_RESPONSE_BYTES,
    maxDownloadBytes: settings.MODEL_MAX_DOWNLOAD_BYTES,
    maxDownloads: settings.MODEL_MAX_DOWNLOADS,
    maxDownloadTotalBytes: settings.MODEL_MAX_DOWNLOAD_TOTAL_BYTES,
    maxRetries: settings.MODEL_MAX_RETRIES,
    retryMaxWaitMs: settings.MODEL_RETRY_MAX_WAIT_MS,
    defaultMaxOutputTokens: settings.MODEL_DEFAULT_MAX_OUTPUT_TOKENS,
  });
}

export * from './abort.js';
export { ModelCatalog } from './catalog.js';
export * from './cost.js';
export * from './errors.js';
export * from './model-manager.js';
export * from './providers.js';
export * from './token-estimate.js';
export * from './types.js';
