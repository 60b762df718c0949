import { collectDefaultMetrics, Counter, Histogram, Registry } from 'prom-client';

/** Model calls through the model manager, by model and provider (see services/usage-meter.ts). */
export interface ModelMetrics {
  calls: Counter<'model' | 'provider' | 'operation' | 'status'>;
  tokens: Counter<'model' | 'provider' | 'kind'>;
  /** Credits (= USD at catalog prices); a float here, exact in the database. */
  cost: Counter<'model' | 'provider'>;
  latency: Histogram<'model' | 'provider' | 'operation' | 'status'>;
  timeToFirstToken: Histogram<'model' | 'provider'>;
}

export interface Metrics {
  registry: Registry;
  httpDuration: Histogram<'method' | 'route' | 'status_code'>;
  models: ModelMetrics;
}

const MODEL_SECONDS = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300];

function createModelMetrics(registry: Registry): ModelMetrics {
  const registers = [registry];
  return {
    calls: new Counter({
      name: 'keel_model_calls_total',
      help: 'Model calls by model, provider, operation and final status (success, error, aborted)',
      labelNames: ['model', 'provider', 'operation', 'status'] as const,
      registers,
    }),
    tokens: new Counter({
      name: 'keel_model_tokens_total',
      help: 'Tokens by model, provider and kind (input, cached_input, cache_write, output, reasoning)',
      labelNames: ['model', 'provider', 'kind'] as const,
      registers,
    }),
    cost: new Counter({
      name: 'keel_model_cost_credits_total',
      help: 'Cost of model calls in credits at catalog prices',
      labelNames: ['model', 'provider'] as const,
      registers,
    }),
    latency: new Histogram({
      name: 'keel_model_call_duration_seconds',
      help: 'Model call latency (all attempts) by model, provider, operation and status',
      labelNames: ['model', 'provider', 'operation', 'status'] as const,
      buckets: MODEL_SECONDS,
      registers,
    }),
    timeToFirstToken: new Histogram({
      name: 'keel_model_time_to_first_token_seconds',
      help: 'Time to the first streamed token by model and provider',
      labelNames: ['model', 'provider'] as const,
      buckets: MODEL_SECONDS,
      registers,
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

/** One registry per app instance, so several apps (tests) never share or clash. */
export function createMetrics(): Metrics {
  const registry = new Registry();
  collectDefaultMetrics({ register: registry });
  const httpDuration = new Histogram({
    name: 'http_request_duration_seconds',
    help: 'HTTP request latency by route',
    labelNames: ['method', 'route', 'status_code'] as const,
    buckets: [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10],
    registers: [registry],
  });
  return { registry, httpDuration, models: createModelMetrics(registry) };
}
