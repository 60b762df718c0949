/**
 * Seeds the benchmark data set: users with projects, through Keel's own services, and writes
 * the request mix for the load generator (one "token project_id" line per project) and pgbench
 * scripts running the same primary-key SELECTs the authenticated read needs.
 *   tsx bench/seed.ts --users 200 --projects 5 --out bench/out
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { parseArgs } from 'node:util';

import pino from 'pino';

import { loadSettings } from '../src/core/config.js';
import { openDatabase } from '../src/core/db.js';
import { migrateUp } from '../src/core/migrate.js';
import { TokenService } from '../src/core/security.js';
import { hashPassword } from '../src/core/security.js';

import * as projectCrud from '../src/crud/project.js';
import * as userCrud from '../src/crud/user.js';

export const BENCH_PASSWORD = 'bench-password-1';

const { values } = parseArgs({
  options: { users: { type: 'string', default: '200' }, projects: { type: 'string', default: '5' }, out: { type: 'string', default: 'bench/out' } },
});
const userCount = Number(values.users);
const projectsPerUser = Number(values.projects);
const out = values.out;
mkdirSync(out, { recursive: true });

const settings = loadSettings();
const database = await openDatabase(settings);
await migrateUp(database, pino({ level: 'warn' }));
const tokens = new TokenService(settings);
// One hash for every bench user: seeding should not take minutes of Argon2.
const hashed = await hashPassword(BENCH_PASSWORD);

const lines: string[] = [];
const emails: string[] = [];
const pairs: { userId: string; projectId: string }[] = [];
const runId = Date.now().toString(36);
for (let u = 0; u < userCount; u++) {
  const email = `bench-${runId}-${u}@keel.bench`;
  const user = await userCrud.create(database.db, { email, hashed_password: hashed, full_name: `Bench ${u}` });
  const token = await tokens.create(user.id, user.token_version, 'access');
  emails.push(email);
  for (let p = 0; p < projectsPerUser; p++) {
    const project = await projectCrud.create(database.db, { owner_id: user.id, name: `Project ${u}.${p}`, description: 'A benchmark project' });
    lines.push(`${token} ${project.id}`);
    pairs.push({ userId: user.id, projectId: project.id });
  }
}
await database.close();

writeFileSync(join(out, 'requests.txt'), `${lines.join('\n')}\n`);
writeFileSync(join(out, 'logins.txt'), `${emails.map((e) => `username=${encodeURIComponent(e)}&password=${BENCH_PASSWORD}`).join('\n')}\n`);

// pgbench takes at most 128 scripts; 100 random pairs, each a fixed pair of PK lookups, chosen at random per transaction.
const pgbenchDir = join(out, 'pgbench');
mkdirSync(pgbenchDir, { recursive: true });
for (let i = 0; i < 100; i++) {
  const pair = pairs[Math.floor(Math.random() * pairs.length)]!;
  writeFileSync(
    join(pgbenchDir, `q${i}.sql`),
    `SELECT * FROM users WHERE id = '${pair.userId}';\nSELECT * FROM projects WHERE id = '${pair.projectId}';\n`,
  );
}
console.log(`seeded ${userCount} users, ${pairs.length} projects into ${out}`);
