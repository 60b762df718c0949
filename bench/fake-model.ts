/**
 * The tests' fake model server (test/helpers/fake-model-server.ts) in a process of its own, for
 * benchmarks that stand it in for a remote provider: its work (parsing requests, computing
 * embeddings, writing JSON) then runs beside Keel, as a real provider's would, not on Keel's
 * event loop. Prints its base URL as the first line of stdout; stops when stdin closes.
 *   npx tsx bench/fake-model.ts
 */
import { FakeModelServer } from '../test/helpers/fake-model-server.js';

const fake = await FakeModelServer.start();
process.stdout.write(`${fake.url}\n`);
process.stdin.resume();
process.stdin.on('close', () => void fake.close().then(() => process.exit(0)));
