/**
 * Feeds the database's catalog overrides and provider records into the app's one ModelManager:
 * at start, after every admin write in this process, and on every node when a trigger (migration
 * 0003) announces a change over LISTEN/NOTIFY. Provider secrets are sealed here and opened only on
 * their way into the manager.
 */
import type { Settings } from '../core/config.js';
import type { Database, Db } from '../core/db.js';
import { JobSealer } from '../core/job-crypto.js';
import type { Logger } from '../core/logger.js';

import type { ProviderRow } from '../models/index.js';

import { sendableHeaders } from '../schemas/provider.js';

import * as overrideCrud from '../crud/model-override.js';
import * as providerCrud from '../crud/provider.js';
import { isBuiltinModel } from '../modules/ai-models/builtin-ids.js';
import { createModelManager, type ModelManager, type ModelOverride, type ProviderRecord, type UsageMeter } from '../modules/ai-models/index.js';
import { type UsageMeterOptions, UsageMeterService } from './usage-meter.js';

// ==================== Secrets ====================

const sealers = new Map<string, JobSealer>();

/** AES-256-GCM under a key derived from SECRET_KEY for provider secrets only; each secret is bound to its row and field. */
function sealerFor(secretKey: string): JobSealer {
  let sealer = sealers.get(secretKey);
  if (!sealer) {
    sealer = new JobSealer(secretKey, 'keel:provider-secrets');
    sealers.set(secretKey, sealer);
  }
  return sealer;
}

export type SecretField = 'api_key' | 'headers';

export function sealSecret(secretKey: string, providerId: string, field: SecretField, value: unknown): string {
  return sealerFor(secretKey).seal(`provider:${providerId}:${field}`, value);
}

export function openSecret(secretKey: string, providerId: string, field: SecretField, sealed: string): unknown {
  return sealerFor(secretKey).open(`provider:${providerId}:${field}`, sealed);
}

// ==================== Rows → manager ====================

function toOverride(row: overrideCrud.CatalogRow): ModelOverride {
  const override: ModelOverride = { id: row.model_id, deleted: row.deleted };
  for (const [key, value] of Object.entries(row)) {
    if (key in overrideKeys && value !== null) (override as Record<string, unknown>)[key] = value;
  }
  return override;
}

const overrideKeys = Object.fromEntries(Object.keys(overrideCrud.NO_OVERRIDE).map((key) => [key, true]));

/** Rows the catalog can use: a custom model (no built-in id) needs its provider and prices — a built-in dropped by a data update leaves a partial row behind. */
export function usableOverrides(rows: readonly overrideCrud.CatalogRow[], log: Logger): ModelOverride[] {
  return rows.flatMap((row) => {
    if (!row.deleted && !isBuiltinModel(row.model_id) && (row.provider === null || row.pricing === null)) {
      log.warn({ model: row.model_id }, 'Model override skipped: not a built-in model and no provider or pricing of its own');
      return [];
    }
    return [toOverride(row)];
  });
}

/**
 * A record with its secrets opened; one that cannot be opened (SECRET_KEY changed) is kept
 * without them, named `unreadable`: its provider is unavailable, saying why (ProviderRegistry.status).
 */
function toRecord(row: ProviderRow, secretKey: string, log: Logger): ProviderRecord {
  const unreadable: SecretField[] = [];
  const open = (field: SecretField, sealed: string | null): unknown => {
    if (sealed === null) return null;
    try {
      return openSecret(secretKey, row.id, field, sealed);
    } catch {
      log.error({ provider: row.name, field }, 'Provider secret cannot be opened (was SECRET_KEY changed?); set it again');
      unreadable.push(field);
      return null;
    }
  };
  const sendable = (headers: Record<string, string> | null) => {
    if (headers === null) return null;
    const kept = sendableHeaders(headers);
    if (kept.dropped.length) log.warn({ provider: row.name, dropped: kept.dropped }, 'Provider headers left out of its calls (framing headers, or a name given twice but for its case); set its headers again');
    return kept.headers;
  };
  return {
    id: row.name,
    kind: row.kind,
    name: row.name,
    base_url: row.base_url,
    api_key: open('api_key', row.api_key_sealed) as string | null,
    headers: sendable(open('headers', row.headers_sealed) as Record<string, string> | null),
    enabled: row.enabled,
    unreadable,
  };
}

async function loadState(db: Db, settings: Settings, log: Logger) {
  const [rows, providerRows] = await Promise.all([overrideCrud.listAll(db), providerCrud.listAll(db)]);
  return { overrides: usableOverrides(rows, log), records: providerRows.map((row) => toRecord(row, settings.SECRET_KEY, log)) };
}

/** How long a process that started without the database waits before reading the rows again. */
export const MODEL_RELOAD_RETRY_MS = 5_000;

/**
 * The app's ModelManager, built from the settings and the database's rows. When the database
 * cannot be read at start (an outage), the process starts with the built-in catalog and the
 * environment's providers, and reads the rows again every few seconds until it can.
 */
export async function loadModelManager(db: Db, settings: Settings, log: Logger, meter?: UsageMeter): Promise<{ models: ModelManager; stop: () => void }> {
  let timer: NodeJS.Timeout | undefined;
  let stopped = false;
  // Every call through the manager is metered (usage records, credits, key limits): services/usage-meter.ts.
  const metering = {
    meter,
    onMeterError: (error: unknown, record: { model: string }) => log.error({ err: error, model: record.model }, 'usage meter failed to settle a call'),
    onSdkLoadError: (error: unknown, provider: string, kind: string) => log.error({ err: error, provider, kind }, "a provider's SDK package could not be loaded: its calls answer 503 until it can"),
  };
  try {
    const { overrides, records } = await loadState(db, settings, log);
    return { models: createModelManager(settings, { overrides, providers: records, ...metering }), stop: () => undefined };
  } catch (error) {
    log.warn({ err: error }, 'Model overrides and providers could not be read; starting with the built-in catalog and retrying');
  }
  const models = createModelManager(settings, metering);
  const retry = () => {
    timer = setTimeout(() => {
      refreshModels(models, db, settings, log).then(
        () => log.info('Model overrides and providers loaded'),
        () => !stopped && retry(),
      );
    }, MODEL_RELOAD_RETRY_MS).unref();
  };
  retry();
  return {
    models,
    stop: () => {
      stopped = true;
      clearTimeout(timer);
    },
  };
}

const pending = new WeakMap<ModelManager, Promise<unknown>>();

/**
 * Reloads the manager from the database. Refreshes run one after another, each reading after the
 * write that asked for it, so the last one applied holds every committed change.
 */
export function refreshModels(manager: ModelManager, db: Db, settings: Settings, log: Logger): Promise<void> {
  const next = (pending.get(manager) ?? Promise.resolve()).then(async () => {
    const { overrides, records } = await loadState(db, settings, log);
    manager.reload(overrides, records);
  });
  pending.set(
    manager,
    next.catch(() => undefined),
  );
  return next;
}

/** The channel the model_overrides and providers triggers (migration 0005) notify on. */
export const MODELS_CHANGED_CHANNEL = 'keel_models_changed';

/**
 * Reloads the manager whenever another node (or any connection) changes the catalog or the
 * providers, and once more whenever the notification connection comes back after a loss (changes
 * made meanwhile were not heard). Notifications arriving while a reload waits to start share it.
 * Returns a function that stops following.
 */
export async function followModelChanges(database: Database, manager: ModelManager, settings: Settings, log: Logger): Promise<() => void> {
  let stopped = false;
  let queued = false;
  // On PostgreSQL another node may change the catalog between the caller's load and the LISTEN:
  // the first connection reloads once, like a reconnection (on PGlite this process is the only one).
  let lost = database.kind === 'postgres';
  const reload = () => {
    if (stopped || queued) return;
    queued = true;
    // Queued behind a running reload: it starts after it, and reads after every change heard so far.
    const run = (pending.get(manager) ?? Promise.resolve()).then(() => {
      queued = false;
    });
    void run.then(() => (stopped ? undefined : refreshModels(manager, database.db, settings, log))).catch((error: unknown) => {
      log.warn({ err: error }, 'Model catalog reload after a change on another node failed; it is retried at the next change');
    });
  };
  await database.listen(MODELS_CHANGED_CHANNEL, {
    message: reload,
    status: (reliable) => {
      if (!reliable) lost = true;
      else if (lost) {
        lost = false;
        reload();
      }
    },
  });
  return () => {
    stopped = true;
  };
}

// ==================== Runtime ====================

export interface ModelRuntime {
  models: ModelManager;
  meter: UsageMeterService;
  /** Stops following changes and writes what the meter still holds. */
  close(): Promise<void>;
}

/**
 * The metered ModelManager of a process (an API node or a worker): the usage meter, the manager
 * fed from the database, and the subscription to catalog changes made on other nodes.
 */
export async function startModelRuntime(options: UsageMeterOptions & { database: Database }): Promise<ModelRuntime> {
  const { database, settings, log } = options;
  const meter = new UsageMeterService(options);
  meter.start();
  const loaded = await loadModelManager(database.db, settings, log, meter);
  const unfollow = await followModelChanges(database, loaded.models, settings, log);
  return {
    models: loaded.models,
    meter,
    close: async () => {
      loaded.stop();
      unfollow();
      // Usage records and settlements still in memory are written before the database closes;
      // calls are refused from here on.
      await meter.close();
      // Then the upstream connection pool (the direct Chat Completions path), which waits for the
      // calls still in flight: what they add is written too.
      await loaded.models.close();
      await meter.idle();
    },
  };
}
