/* global process, console, performance */
// What a round trip to PGlite costs on its own thread (PGLITE_THREAD) against on the main thread:
// a primary-key SELECT one after another, 50 callers at once, and a two-statement transaction, with
// the CPU of the main thread and of each other thread per operation (/proc/self/task/*/schedstat).
//   npm run build && node --liftoff-only bench/pglite-link.mjs   (MODES="thread inproc" N=5000)
import { readdirSync, readFileSync } from 'node:fs';

import { PGlite } from '@electric-sql/pglite';

import { importBuilt } from './built.mjs';

const [{ inProcessLink, PgliteStatementClient }, { openPgliteThread }] = await importBuilt('.', 'core/pglite-client', 'core/pglite-thread');

const N = Number(process.env.N ?? 5000);
const MODES = (process.env.MODES ?? 'thread inproc').split(/\s+/).filter(Boolean);

/** CPU ns so far of each of this process's threads. */
function threads() {
  const out = new Map();
  for (const tid of readdirSync('/proc/self/task')) {
    try {
      out.set(Number(tid), Number(readFileSync(`/proc/self/task/${tid}/schedstat`, 'utf8').split(' ')[0]));
    } catch {
      // a thread that ended meanwhile
    }
  }
  return out;
}

async function measure(label, count, work) {
  const before = threads();
  const started = performance.now();
  await work();
  const wall = ((performance.now() - started) * 1000) / count;
  const after = threads();
  const per = (tid) => (after.get(tid) - (before.get(tid) ?? 0)) / 1000 / count;
  const main = per(process.pid);
  const others = [...after.keys()].filter((tid) => tid !== process.pid).map(per).filter((us) => us >= 1).sort((a, b) => b - a);
  const total = main + others.reduce((a, b) => a + b, 0);
  console.log(`${label.padEnd(24)} wall ${wall.toFixed(1).padStart(7)} µs   main thread ${main.toFixed(1).padStart(6)} µs   all threads ${total.toFixed(1).padStart(6)} µs   (busiest others: ${others.slice(0, 3).map((us) => us.toFixed(1)).join(', ')})`);
}

for (const mode of MODES) {
  const link = mode === 'thread' ? await openPgliteThread({ dataDir: 'memory://', startParams: [] }) : inProcessLink(await PGlite.create('memory://'));
  const client = await PgliteStatementClient.open(link);
  await client.exec('create table t (id int primary key, v text)');
  await client.query('insert into t (id, v) values ($1, $2)', [1, 'x']);
  const read = () => client.query('select v from t where id = $1', [1]);
  for (let round = 0; round < 2; round++) {
    await measure(`${mode} sequential`, N, async () => {
      for (let i = 0; i < N; i++) await read();
    });
    await measure(`${mode} 50 at once`, N, () => Promise.all(Array.from({ length: 50 }, async () => {
      for (let i = 0; i < N / 50; i++) await read();
    })));
    await measure(`${mode} transaction of 2`, N / 5, async () => {
      for (let i = 0; i < N / 5; i++) {
        await client.transaction(async (tx) => {
          await tx.query('select v from t where id = $1', [1]);
          await tx.query('update t set v = $2 where id = $1', [1, 'y']);
        });
      }
    });
  }
  await client.close();
}
console.log(`load average ${readFileSync('/proc/loadavg', 'utf8').split(' ').slice(0, 3).join(' ')}`);
