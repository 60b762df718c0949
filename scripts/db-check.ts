/**
 * Fails when the models (src/models) and the committed migrations differ: drizzle-kit generates
 * into a scratch copy of migrations/, and any new file means a migration is missing. Also checks
 * that every migration has its reviewed down script.
 */
import { execFileSync } from 'node:child_process';
import { cpSync, existsSync, mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, relative } from 'node:path';

import { MIGRATIONS_DIR, readMigrations } from '../src/core/migrate.js';

const scratch = mkdtempSync(join(tmpdir(), 'keel-db-check-'));
const sqlFiles = (dir: string) => readdirSync(dir).filter((f) => f.endsWith('.sql'));
let failed = false;

try {
  cpSync(MIGRATIONS_DIR, scratch, { recursive: true });
  const before = sqlFiles(scratch).length;
  const output = execFileSync(
    'npx',
    ['drizzle-kit', 'generate', '--dialect=postgresql', '--schema=./src/models/index.ts', '--casing=snake_case', // drizzle-kit reads --out relative to the working directory, even when it is absolute.
      `--out=${relative(process.cwd(), scratch)}`, '--name=drift'],
    { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] },
  );
  if (!/No schema changes|Your SQL migration file/.test(output)) {
    console.error('drizzle-kit did not compare the models:\n');
    console.error(output);
    failed = true;
  } else if (sqlFiles(scratch).length !== before) {
    console.error('Models and migrations differ: run `npm run db:generate`, review the SQL, add its down script.\n');
    console.error(output);
    failed = true;
  }
  for (const migration of readMigrations()) {
    if (!existsSync(join(MIGRATIONS_DIR, 'down', `${migration.tag}.sql`))) {
      console.error(`Migration ${migration.tag} has no down script (migrations/down/${migration.tag}.sql).`);
      failed = true;
    }
  }
} finally {
  rmSync(scratch, { recursive: true, force: true });
}

if (failed) process.exit(1);
console.log(`db:check: models and ${readMigrations().length} migration(s) agree; every migration has a down script.`);
