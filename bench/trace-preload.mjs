/* global process, performance, setInterval */
// Loaded into Keel's processes by bench/runs-trace.mjs (node --import): timestamps (µs, wall
// clock, comparable across processes on one machine) of every PostgreSQL query (PGlite's too), Redis command,
// incoming HTTP request and SSE write, buffered and written to TRACE_FILE. Bench only.
import { openSync, writeSync } from 'node:fs';
import http from 'node:http';
import { createRequire } from 'node:module';

import { hookStatements } from './statement-hooks.mjs';

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

// PostgreSQL (pg) and embedded PGlite (Keel's wire-protocol client, the module instance the app loads).
await hookStatements(require, (kind, text) => {
  const what = short(text);
  log(`${kind}> ${what}`);
  return (failed) => log(`${kind}${failed ? '!' : '<'} ${what}`);
});

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
