/* global process, performance */
// Loaded into Keel by bench/gateway-tail.mjs (node --import): in-process events with wall-clock
// timestamps (µs), independent of machine load in what they name — each HTTP request's time in the
// server (request event → response finished), every garbage collection (kind, duration), every
// database statement (pg or PGlite: start, end) and the event loop's delay histogram — written to
// TAIL_FILE as tab-separated lines at exit. Bench only.
import { writeFileSync } from 'node:fs';
import http from 'node:http';
import { createRequire } from 'node:module';
import { constants, monitorEventLoopDelay, PerformanceObserver } from 'node:perf_hooks';

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

const statement = (kind, text, started, promise) => {
  const what = short(text);
  const end = () => lines.push(`db\t${started}\t${wall()}\t${kind} ${what}`);
  promise?.then?.(end, end);
};

try {
  const pg = require('pg');
  const query = pg.Client.prototype.query;
  pg.Client.prototype.query = function (config, values, callback) {
    const text = typeof config === 'string' ? config : (config?.text ?? config?.name);
    const started = wall();
    // pg.Pool's query passes a callback (values may be left out).
    if (typeof values === 'function') [values, callback] = [undefined, values];
    if (typeof callback === 'function') {
      let end;
      statement('pg', text, started, new Promise((resolve) => (end = resolve)));
      return query.call(this, config, values, (...a) => (end(), callback(...a)));
    }
    const result = query.call(this, config, values);
    statement('pg', text, started, result);
    return result;
  };
} catch {
  // not loaded here
}
try {
  const { PgliteStatementClient } = await import(`${process.cwd()}/dist/core/pglite-client.js`);
  for (const method of ['run', 'simple']) {
    const original = PgliteStatementClient.prototype[method];
    PgliteStatementClient.prototype[method] = function (scope, text, ...rest) {
      // PGlite may run the statement before returning (on this thread): the start is taken first.
      const started = wall();
      const result = original.call(this, scope, text, ...rest);
      statement('pglite', text, started, result);
      return result;
    };
  }
} catch {
  // another layout, or not built
}

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
