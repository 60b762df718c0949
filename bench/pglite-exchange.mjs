/* global process, console, performance, global */
// One PGlite exchange, the two ways to make it: execProtocolRawSync (PGlite's default output
// handler, which also parses each reply and keeps the parsed messages) against
// execProtocolRawStream without syncToFs (the raw bytes only: src/core/pglite-client.ts rawExchange).
//   node --expose-gc bench/pglite-exchange.mjs   (QUERIES=50000)
// Prints µs per query and the heap left after a GC: the kept messages show as heap that grows.
import { PGlite } from '@electric-sql/pglite';
import { serialize } from 'pg-protocol';

const QUERIES = Number(process.env.QUERIES ?? 50_000);
const message = serialize.query('select 1 as a, 2 as b');

for (const mode of ['sync', 'stream']) {
  const pg = await PGlite.create();
  const began = performance.now();
  for (let i = 0; i < QUERIES; i++) {
    if (mode === 'sync') pg.execProtocolRawSync(message);
    else await pg.execProtocolRawStream(message, { syncToFs: false, onRawData: (bytes) => void bytes.slice() });
  }
  const elapsed = performance.now() - began;
  global.gc?.();
  console.log(`${mode.padEnd(6)} ${((elapsed / QUERIES) * 1000).toFixed(1)} µs/query, heap after GC ${(process.memoryUsage().heapUsed / 1e6).toFixed(1)} MB`);
  await pg.close();
}
