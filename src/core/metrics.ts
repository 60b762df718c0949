import { collectDefaultMetrics, Counter, Gauge, Histogram, type LabelValues, Registry } from 'prom-client';

// ==================== Series cached by key ====================

/** A series as prom-client keeps it in a metric's `hashMap` (15.x): mutated in place by inc/observe. */
interface CounterSeries {
  labels: object;
  value: number;
}
interface HistogramSeries {
  labels: object;
  bucketValues: Record<number, number>;
  sum: number;
  count: number;
}

/**
 * The series prom-client made, by a key of the caller's (its label values joined). prom-client
 * keeps the labels object it was given, so the series is found by identity once; reset() gives the
 * metric a new hashMap, which empties the cache at its next look-up.
 */
class SeriesCache<S extends { labels: object }> {
  private readonly byKey = new Map<string, S>();
  private source: object | undefined;

  constructor(private readonly metric: object) {}

  private get hashMap(): Record<string, S> {
    return (this.metric as { hashMap?: Record<string, S> }).hashMap ?? {};
  }

  get(key: string): S | undefined {
    if (this.hashMap !== this.source) {
      this.byKey.clear();
      return undefined;
    }
    return this.byKey.get(key);
  }

  /** After prom-client's own inc/observe made (or found) the series for `labels`. */
  remember(key: string, labels: object): void {
    const map = this.hashMap;
    for (const hash in map) {
      if (map[hash]!.labels !== labels) continue;
      if (map !== this.source) this.byKey.clear();
      this.source = map;
      this.byKey.set(key, map[hash]!);
      return;
    }
  }

  clear(): void {
    this.byKey.clear();
  }
}

/**
 * A Counter whose hot callers name a series by a key of their own: prom-client's inc(labels)
 * validates the labels and builds a hash string on every call, several per model call; here the
 * first call per key goes through inc() and later ones add to the series it made. The output of
 * /metrics is prom-client's, unchanged (test/unit/metrics.test.ts).
 */
export class KeyedCounter<T extends string> extends Counter<T> {
  private readonly series = new SeriesCache<CounterSeries>(this);

  /** inc(labels, value) for the series `key` stands for (the same labels, always). */
  incKeyed(key: string, labels: LabelValues<T>, value = 1): void {
    const series = this.series.get(key);
    // prom-client's refusals (negative, not a number) stay its own.
    if (series && Number.isFinite(value) && value >= 0) series.value += value;
    else {
      this.inc(labels, value);
      this.series.remember(key, labels);
    }
  }

  override remove(...args: string[] | [LabelValues<T>]): void {
    this.series.clear();
    (super.remove as (...values: unknown[]) => void).apply(this, args);
  }
}

/** A Histogram with KeyedCounter's per-key series (see there). */
export class KeyedHistogram<T extends string> extends Histogram<T> {
  private readonly series = new SeriesCache<HistogramSeries>(this);
  private readonly bounds: readonly number[];

  constructor(configuration: ConstructorParameters<typeof Histogram<T>>[0] & { buckets: number[] }) {
    super(configuration);
    this.bounds = [...configuration.buckets];
  }

  /** observe(labels, value) for the series `key` stands for (the same labels, always). */
  observeKeyed(key: string, labels: LabelValues<T>, value: number): void {
    const series = this.series.get(key);
    if (!series || !Number.isFinite(value)) {
      this.observe(labels, value);
      this.series.remember(key, labels);
      return;
    }
    series.sum += value;
    series.count += 1;
    // As prom-client: the first bound at or above the value; above every bound only +Inf (count) moves.
    const bounds = this.bounds;
    for (let i = 0; i < bounds.length; i++) {
      if (value <= bounds[i]!) {
        series.bucketValues[bounds[i]!]! += 1;
        break;
      }
    }
  }

  override remove(...args: string[] | [LabelValues<T>]): void {
    this.series.clear();
    (super.remove as (...values: unknown[]) => void).apply(this, args);
  }
}

// ==================== The app's metrics ====================

/** Model calls through the model manager, by model and provider (see services/usage-meter.ts). */
export interface ModelMetrics {
  calls: KeyedCounter<'model' | 'provider' | 'operation' | 'status'>;
  tokens: KeyedCounter<'model' | 'provider' | 'kind'>;
  /** Credits (= USD at catalog prices); a float here, exact in the database. */
  cost: KeyedCounter<'model' | 'provider'>;
  latency: KeyedHistogram<'model' | 'provider' | 'operation' | 'status'>;
  timeToFirstToken: KeyedHistogram<'model' | 'provider'>;
}

/** The run-event streams of this process (services/event-streams.ts): what they hold, and the cap's and the stall cut-off's effect. */
export interface EventStreamMetrics {
  open: Gauge;
  refused: Counter;
  stalled: Counter;
}

/** The streamed /v1 chat completions of catalog models (an `agent:` one is a run event stream): the stall cut-off's effect. */
export interface ChatCompletionStreamMetrics {
  stalled: Counter;
}

export interface Metrics {
  /** This app's metrics. */
  registry: Registry;
  /** What `/metrics` shows: this app's metrics and the process's own. */
  served: () => Registry;
  httpDuration: KeyedHistogram<'method' | 'route' | 'status_code'>;
  models: ModelMetrics;
  eventStreams: EventStreamMetrics;
  chatCompletionStreams: ChatCompletionStreamMetrics;
}

const MODEL_SECONDS = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300];

function createModelMetrics(registry: Registry): ModelMetrics {
  const registers = [registry];
  return {
    calls: new KeyedCounter({
      name: 'keel_model_calls_total',
      help: 'Model calls by model, provider, operation and final status (success, error, aborted)',
      labelNames: ['model', 'provider', 'operation', 'status'] as const,
      registers,
    }),
    tokens: new KeyedCounter({
      name: 'keel_model_tokens_total',
      help: 'Tokens by model, provider and kind (input, cached_input, cache_write, output, reasoning)',
      labelNames: ['model', 'provider', 'kind'] as const,
      registers,
    }),
    cost: new KeyedCounter({
      name: 'keel_model_cost_credits_total',
      help: 'Cost of model calls in credits at catalog prices',
      labelNames: ['model', 'provider'] as const,
      registers,
    }),
    latency: new KeyedHistogram({
      name: 'keel_model_call_duration_seconds',
      help: 'Model call latency (all attempts) by model, provider, operation and status',
      labelNames: ['model', 'provider', 'operation', 'status'] as const,
      buckets: MODEL_SECONDS,
      registers,
    }),
    timeToFirstToken: new KeyedHistogram({
      name: 'keel_model_time_to_first_token_seconds',
      help: 'Time to the first streamed token by model and provider',
      labelNames: ['model', 'provider'] as const,
      buckets: MODEL_SECONDS,
      registers,
    }),
  };
}

function createEventStreamMetrics(registry: Registry): EventStreamMetrics {
  const registers = [registry];
  return {
    open: new Gauge({
      name: 'keel_run_event_streams_open',
      help: 'Run event streams (GET /runs/{id}/events, streamed agent: completions on /v1) open on this process, as RUN_EVENTS_MAX_STREAMS_PER_USER counts them',
      registers,
    }),
    refused: new Counter({
      name: 'keel_run_event_streams_refused_total',
      help: 'Run event streams refused (429) because their user held RUN_EVENTS_MAX_STREAMS_PER_USER on this process',
      registers,
    }),
    stalled: new Counter({
      name: 'keel_run_event_streams_stalled_total',
      help: 'Run event streams cut off because their reader took nothing for four keep-alive intervals',
      registers,
    }),
  };
}

function createChatCompletionStreamMetrics(registry: Registry): ChatCompletionStreamMetrics {
  return {
    stalled: new Counter({
      name: 'keel_chat_completion_streams_stalled_total',
      help: 'Streamed /v1 chat completions of catalog models cut off because their reader took nothing for four keep-alive intervals (an agent: completion counts as a run event stream)',
      registers: [registry],
    }),
  };
}

/**
 * The model metrics of a process that serves no `/metrics` (`keel worker`): counted into a registry
 * of their own, without the default process metrics, whose event-loop delay monitor (prom-client's,
 * at 10 ms resolution) wakes the process 100 times a second — about 1 % of a core on an idle worker,
 * per worker — for figures nothing can read.
 */
export function unservedModelMetrics(): ModelMetrics {
  return createModelMetrics(new Registry());
}

/**
 * The process's own metrics (prom-client's defaults: CPU, memory, event-loop delay, GC), collected
 * once per process however many apps it builds: they describe the process, not an app, and each
 * collection starts monitors that nothing stops (an event-loop delay histogram at 10 ms resolution,
 * a GC observer), which a test process building an app per file piled up.
 */
let processRegistry: Registry | undefined;

function processMetrics(): Registry {
  if (!processRegistry) {
    processRegistry = new Registry();
    collectDefaultMetrics({ register: processRegistry });
  }
  return processRegistry;
}

/** One registry per app instance, so several apps (tests) never share or clash; `/metrics` shows it with the process's own (`processMetrics`). */
export function createMetrics(): Metrics {
  const registry = new Registry();
  const httpDuration = new KeyedHistogram({
    name: 'http_request_duration_seconds',
    help: 'HTTP request latency by route',
    labelNames: ['method', 'route', 'status_code'] as const,
    buckets: [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10],
    registers: [registry],
  });
  // At each scrape: a merged registry holds the metrics registered when it was made.
  return { registry, served: () => Registry.merge([registry, processMetrics()]), httpDuration, models: createModelMetrics(registry), eventStreams: createEventStreamMetrics(registry), chatCompletionStreams: createChatCompletionStreamMetrics(registry) };
}
