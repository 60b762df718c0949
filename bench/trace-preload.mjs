/* global process, performance, setInterval */
// Loaded into Keel's processes by bench/runs-trace.mjs (node --import): timestamps (µs, wall
// clock, comparable across processes on one machine) of every PostgreSQL query (PGlite's too), Redis command,
// incoming HTTP request and SSE write, buffered and written to TRACE_FILE. Bench only.
import { openSync, writeSync } from 'node:fs';
import http from 'node:http';
import { createRequire } from 'node:module';

const require = createRequire(`${process.cwd()}/`);
const fd = openSync(process.env.TRACE_FILE, 'a');
const role = process.env.TRACE_ROLE ?? String(process.pid);
const lines = [];
const t = () => Math.round((performance.timeOrigin + performance.now()) * 1000);
const log = (what) => lines.push(`${t()}\t${role}\t${what}\n`);
const flush = () => {
  if (lines.length) writeSync(fd, lines.splice(0).join(''));
};
setInterval(flush, 100).unref();
process.on('exit', flush);

const short = (text) => String(text).replace(/\s+/g, ' ').slice(0, 70);

try {
  const pg = require('pg');
  const query = pg.Client.prototype.query;
  pg.Client.prototype.query = function (config, values, callback) {
    const text = short(typeof config === 'string' ? config : config?.text ?? config?.name);
    log(`pg> ${text}`);
    if (typeof callback === 'function') return query.call(this, config, values, (...a) => (log(`pg< ${text}`), callback(...a)));
    if (typeof values === 'function') return query.call(this, config, (...a) => (log(`pg< ${text}`), values(...a)));
    const result = query.call(this, config, values);
    if (result && typeof result.then === 'function') result.then(() => log(`pg< ${text}`), () => log(`pg! ${text}`));
    return result;
  };
} catch {
  // not loaded here
}

// Embedded: PGlite through Keel's wire-protocol client (the same module instance the app loads).
try {
  const { PgliteStatementClient } = await import(`${process.cwd()}/dist/core/pglite-client.js`);
  for (const method of ['run', 'simple']) {
    const original = PgliteStatementClient.prototype[method];
    PgliteStatementClient.prototype[method] = function (scope, text, ...rest) {
      const what = short(text);
      log(`pglite> ${what}`);
      const result = original.call(this, scope, text, ...rest);
      result.then(() => log(`pglite< ${what}`), () => log(`pglite! ${what}`));
      return result;
    };
  }
} catch {
  // another checkout's layout, or not built
}

try {
  const { Redis } = require('ioredis');
  const send = Redis.prototype.sendCommand;
  Redis.prototype.sendCommand = function (command, stream) {
    const what = `${command.name} ${short(command.args?.[0] ?? '').slice(0, 40)}`;
    log(`redis> ${what}`);
    command.promise?.then(() => log(`redis< ${what}`), () => log(`redis! ${what}`));
    return send.call(this, command, stream);
  };
  const emit = Redis.prototype.emit;
  Redis.prototype.emit = function (name, ...args) {
    if (name === 'message') log(`redis message ${short(args[0]).slice(-30)}`);
    return emit.call(this, name, ...args);
  };
} catch {
  // not loaded here
}

const serverEmit = http.Server.prototype.emit;
http.Server.prototype.emit = function (name, req, ...rest) {
  if (name === 'request') {
    log(`http< ${req.method} ${req.url.replace(/[0-9a-f-]{36}/g, ':id')}`);
    const res = rest[0];
    const write = res.write;
    res.write = function (chunk, ...a) {
      const text = String(chunk);
      const events = [...text.matchAll(/event: (\S+)/g)].map((m) => m[1]);
      log(`http> write ${events.join(',') || short(text).slice(0, 20)}`);
      return write.call(this, chunk, ...a);
    };
    const end = res.end;
    res.end = function (...a) {
      log(`http> end ${req.method} ${req.url.replace(/[0-9a-f-]{36}/g, ':id')} ${res.statusCode}`);
      return end.apply(this, a);
    };
  }
  return serverEmit.call(this, name, req, ...rest);
};
