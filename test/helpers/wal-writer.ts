// Spawned by test/integration/process.test.ts: opens the embedded database the way Keel does and
// makes PostgreSQL create files after the open (a table, new WAL segments), so their modes can be checked.
import { loadSettings } from '../../src/core/config.js';
import { openDatabase } from '../../src/core/db.js';

const database = await openDatabase(loadSettings());
await database.withSession(async (session) => {
  await session.exec('create table wal_writer (x int); insert into wal_writer select generate_series(1, 1000)');
  for (let i = 0; i < 2; i++) await session.query('select pg_switch_wal()');
});
await database.close();
