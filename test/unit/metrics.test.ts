/**
 * KeyedCounter and KeyedHistogram add to the series prom-client made for a key: /metrics must read
 * exactly as with prom-client's own inc/observe for every call.
 */
import { Counter, Histogram, Registry } from 'prom-client';
import { describe, expect, it } from 'vitest';

import { createMetrics, KeyedCounter, KeyedHistogram } from '../../src/core/metrics.js';

const BUCKETS = [0.05, 0.1, 0.25, 0.5, 1, 2.5];

function pair() {
  const plain = new Registry();
  const keyed = new Registry();
  const labelNames = ['model', 'provider', 'status'] as const;
  return {
    plain,
    keyed,
    counters: [
      new Counter({ name: 'calls_total', help: 'Calls', labelNames, registers: [plain] }),
      new KeyedCounter({ name: 'calls_total', help: 'Calls', labelNames, registers: [keyed] }),
    ] as const,
    histograms: [
      new Histogram({ name: 'latency_seconds', help: 'Latency', labelNames, buckets: BUCKETS, registers: [plain] }),
      new KeyedHistogram({ name: 'latency_seconds', help: 'Latency', labelNames, buckets: BUCKETS, registers: [keyed] }),
    ] as const,
  };
}

/** A call's labels and values, the same for both registries; some series again and again, values on and past the bounds. */
const CALLS: [model: string, provider: string, status: string, seconds: number, cost: number][] = [];
for (let i = 0; i < 200; i++) {
  const model = ['gpt-4.1', 'org/"quoted"\\model', 'ünï-cödé'][i % 3]!;
  const status = i % 7 === 0 ? 'error' : 'success';
  const seconds = [0, 0.05, 0.0500001, 0.1, 0.3, 1, 2.5, 2.6, 99, 0.012345][i % 10]!;
  CALLS.push([model, 'openai', status, seconds, i % 5 === 0 ? 0 : 0.000123 * i]);
}

describe('KeyedCounter and KeyedHistogram', () => {
  it('write the same /metrics text and JSON as prom-client\'s inc and observe', async () => {
    const { plain, keyed, counters, histograms } = pair();
    for (const [model, provider, status, seconds, cost] of CALLS) {
      const key = `${model}\n${provider}\n${status}`;
      counters[0].inc({ model, provider, status });
      counters[1].incKeyed(key, { model, provider, status });
      counters[0].inc({ model, provider, status: 'cost' }, cost);
      counters[1].incKeyed(`${key}\ncost`, { model, provider, status: 'cost' }, cost);
      histograms[0].observe({ model, provider, status }, seconds);
      histograms[1].observeKeyed(key, { model, provider, status }, seconds);
    }
    const text = await keyed.metrics();
    expect(text).toBe(await plain.metrics());
    expect(text).toMatch(/latency_seconds_bucket\{le="\+Inf",model="gpt-4.1",provider="openai",status="success"\} \d+/);
    expect(await keyed.getMetricsAsJSON()).toEqual(await plain.getMetricsAsJSON());
  });

  it('keep prom-client\'s refusals, and start again after reset()', async () => {
    const { plain, keyed, counters, histograms } = pair();
    const labels = { model: 'm', provider: 'p', status: 'success' };
    counters[1].incKeyed('k', labels, 2);
    expect(() => counters[1].incKeyed('k', labels, -1)).toThrow(/decrease/);
    histograms[1].observeKeyed('k', labels, 0.2);
    expect(() => histograms[1].observeKeyed('k', labels, Number.NaN)).toThrow(/not a valid number/);
    counters[0].inc(labels, 2);
    counters[0].reset();
    counters[1].reset();
    histograms[0].reset();
    histograms[1].reset();
    for (const value of [3, 1]) {
      counters[0].inc(labels, value);
      counters[1].incKeyed('k', labels, value);
      histograms[0].observe(labels, value / 10);
      histograms[1].observeKeyed('k', labels, value / 10);
    }
    expect(await keyed.metrics()).toBe(await plain.metrics());
    expect(await keyed.metrics()).toContain('calls_total{model="m",provider="p",status="success"} 4');
  });

  it('make the series again after remove()', async () => {
    const { plain, keyed, counters, histograms } = pair();
    const labels = { model: 'm', provider: 'p', status: 'success' };
    for (const [counter, histogram] of [[counters[0], histograms[0]], [counters[1], histograms[1]]] as const) {
      const inc = (value: number) => (counter instanceof KeyedCounter ? counter.incKeyed('k', labels, value) : counter.inc(labels, value));
      const observe = (value: number) => (histogram instanceof KeyedHistogram ? histogram.observeKeyed('k', labels, value) : histogram.observe(labels, value));
      inc(5);
      observe(0.3);
      counter.remove(labels);
      histogram.remove(labels);
      inc(2);
      inc(1);
      observe(0.07);
    }
    expect(await keyed.metrics()).toBe(await plain.metrics());
    expect(await keyed.metrics()).toContain('calls_total{model="m",provider="p",status="success"} 3');
  });
});

describe('the metrics of several apps in one process (tests build one per file)', () => {
  it("serve each app's own metrics with the process's, whose monitors (event-loop delay, GC) are started once, not once an app", async () => {
    const [a, b] = [createMetrics(), createMetrics()];
    a.httpDuration.observe({ method: 'GET', route: '/a', status_code: '200' }, 0.01);
    const [servedA, servedB] = [a.served(), b.served()];
    for (const name of ['process_cpu_user_seconds_total', 'nodejs_eventloop_lag_seconds', 'nodejs_gc_duration_seconds']) {
      expect(servedA.getSingleMetric(name), name).toBeDefined();
      expect(servedA.getSingleMetric(name), name).toBe(servedB.getSingleMetric(name));
    }
    expect(await servedA.metrics()).toContain('route="/a"');
    expect(await servedB.metrics()).not.toContain('route="/a"');
    // The app's own registry holds no process metrics: a second collection there would start their monitors again.
    expect(a.registry.getSingleMetric('nodejs_eventloop_lag_seconds')).toBeUndefined();
  });
});
