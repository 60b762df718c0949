/* global process, performance */
// Loaded into Keel by bench/gateway-tail.mjs (node --import): in-process events with wall-clock
// timestamps (µs), independent of machine load in what they name — each HTTP request's time in the
// server (request event → response finished), every garbage collection (kind, duration), every
// database statement (pg or PGlite: start, end) and the event loop's delay histogram — written to
// TAIL_FILE as tab-separated lines at exit. Bench only.
import diagnostics from 'node:diagnostics_channel';
import { writeFileSync } from 'node:fs';
import http from 'node:http';
import { createRequire } from 'node:module';
import { constants, monitorEventLoopDelay, PerformanceObserver } from 'node:perf_hooks';

import { hookStatements } from './statement-hooks.mjs';

const require = createRequire(`${process.cwd()}/`);
const lines = [];
const wall = (t = performance.now()) => Math.round((performance.timeOrigin + t) * 1000);
const short = (text) => String(text).replace(/\s+/g, " ").slice(0, 200);

const GC_KINDS = { [constants.NODE_PERFORMANCE_GC_MINOR]: 'minor', [constants.NODE_PERFORMANCE_GC_MAJOR]: 'major', [constants.NODE_PERFORMANCE_GC_INCREMENTAL]: 'incremental', [constants.NODE_PERFORMANCE_GC_WEAKCB]: 'weakcb' };
new PerformanceObserver((list) => {
  for (const entry of list.getEntries()) lines.push(`gc\t${wall(entry.startTime)}\t${wall(entry.startTime + entry.duration)}\t${GC_KINDS[entry.detail?.kind] ?? entry.detail?.kind}`);
}).observe({ entryTypes: ['gc'] });

const delay = monitorEventLoopDelay({ resolution: 1 });
delay.enable();


await hookStatements(require, (kind, text) => {
  const started = wall();
  const what = short(text);
  const elu = performance.eventLoopUtilization();
  // How long this thread ran while the statement was out (a held statement blocks it).
  return () => lines.push(`db\t${started}\t${wall()}\t${kind} ${what}\t${Math.round(performance.eventLoopUtilization(elu).active * 1000)}`);
});

// Each upstream request (undici, fetch's too): created, its response's headers, its end.
const upstream = new WeakMap();
diagnostics.subscribe('undici:request:create', ({ request }) => upstream.set(request, { s: wall(), elu: performance.eventLoopUtilization() }));
diagnostics.subscribe('undici:request:headers', ({ request }) => {
  const entry = upstream.get(request);
  if (entry) entry.h = wall();
});
diagnostics.subscribe('undici:request:trailers', ({ request }) => {
  const entry = upstream.get(request);
  // How long this thread ran JavaScript (or native work on it) while the call was out: the event loop's active time.
  if (entry) lines.push(`up\t${entry.s}\t${wall()}\t${entry.h ?? ''}\t${Math.round(performance.eventLoopUtilization(entry.elu).active * 1000)}`);
});

const serverEmit = http.Server.prototype.emit;
http.Server.prototype.emit = function (name, req, res, ...rest) {
  if (name === 'request' && req.url.startsWith('/v1/chat')) {
    const started = wall();
    res.once('finish', () => lines.push(`req\t${started}\t${wall()}\t${res.statusCode}`));
  }
  return serverEmit.call(this, name, req, res, ...rest);
};

process.on('exit', () => {
  const p = (q) => (delay.percentile(q) / 1e6).toFixed(2);
  lines.push(`loop\t${delay.count}\tp50 ${p(50)} p99 ${p(99)} p99.9 ${p(99.9)} max ${(delay.max / 1e6).toFixed(2)} ms`);
  writeFileSync(process.env.TAIL_FILE, `${lines.join('\n')}\n`);
});
