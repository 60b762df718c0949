/* global process, console, setImmediate */
// CPU per access-log line through Keel's JSON logger (createLogger, LOG_FORMAT=json) of a built
// checkout, e.g. an A/B:  for c in /tmp/base-main .; do node bench/log-line.mjs $c > /tmp/lines; done
// (stdout is where the lines go: send it to a file). It yields to the event loop every 64 lines,
// as a server does between requests, so SonicBoom's asynchronous writes complete in between.
import { resolve } from 'node:path';

import { importBuilt } from './built.mjs';

const checkout = resolve(process.argv[2] ?? '.');
const [{ createLogger }] = await importBuilt(checkout, 'core/logger');
// As core/access-log.ts logs: a child without redaction.
const logger = createLogger({ LOG_LEVEL: 'info', LOG_FORMAT: 'json' }).child({}, { redact: [] });
const N = Number(process.env.LINES ?? 200_000);
const before = process.cpuUsage();
for (let i = 0; i < N; i++) {
  logger.info({ reqId: `0fd6a965-d228-4224-9ba4-${String(i).padStart(12, '0')}`, method: 'POST', route: '/v1/chat/completions', status: 200, ms: 1.3, userId: '5c1e7f3a-0000-4000-8000-000000000001' }, 'request completed');
  if (i % 64 === 63) await new Promise((done) => setImmediate(done));
}
const used = process.cpuUsage(before);
console.error(`${checkout}: ${((used.user + used.system) / N).toFixed(2)} µs CPU per line (${N} lines)`);
process.exit(0);
