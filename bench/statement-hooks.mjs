/* global process */
// Bench only: wraps the database clients Keel loads (pg, and Keel's PGlite client) so that
// a preload sees every statement. `observe(kind, text)` is called as a statement starts and returns
// what to call when it ends (`failed` true on an error). Shared by trace-preload.mjs and tail-preload.mjs.
import { tracingChannel } from 'node:diagnostics_channel';

export async function hookStatements(require, observe) {
  try {
    const pg = require('pg');
    const query = pg.Client.prototype.query;
    pg.Client.prototype.query = function (config, values, callback) {
      const ended = observe('pg', typeof config === 'string' ? config : (config?.text ?? config?.name));
      // pg.Pool's query passes a callback (values may be left out).
      if (typeof values === 'function') [values, callback] = [undefined, values];
      if (typeof callback === 'function') return query.call(this, config, values, (error, ...rest) => (ended(Boolean(error)), callback(error, ...rest)));
      const result = query.call(this, config, values);
      result?.then?.(() => ended(false), () => ended(true));
      return result;
    };
  } catch {
    // not loaded here
  }
  // Keel's PGlite client publishes its statements on a tracing channel (src/core/pglite-client.ts)…
  const pglite = tracingChannel('keel:pglite:statement');
  pglite.subscribe({
    start: (context) => (context.ended = observe('pglite', context.text)),
    error: (context) => (context.failed = true),
    asyncEnd: (context) => context.ended?.(Boolean(context.failed)),
  });
  // …which builds from before stop 54 (compiled file by file to dist/, no channel) lack: there the class is patched.
  try {
    const { PgliteStatementClient } = await import(`${process.cwd()}/dist/core/pglite-client.js`);
    for (const method of ['run', 'simple']) {
      const original = PgliteStatementClient.prototype[method];
      PgliteStatementClient.prototype[method] = function (scope, text, ...rest) {
        // PGlite may run the statement before returning (on this thread): observed first.
        const ended = observe('pglite', text);
        const result = original.call(this, scope, text, ...rest);
        result.then(() => ended(false), () => ended(true));
        return result;
      };
    }
  } catch {
    // another checkout's layout, or not built
  }
}
