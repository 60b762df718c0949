import { randomBytes } from 'node:crypto';
import { cpSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import pino from 'pino';
import type { TestProject } from 'vitest/node';

import { loadSettings } from '../../src/core/config.js';
import { openDatabase } from '../../src/core/db.js';
import { migrateUp } from '../../src/core/migrate.js';

import { adminQuery, databaseUrl } from './postgres.js';
import { deleteRunKeys } from './redis.js';

declare module 'vitest' {
  export interface ProvidedContext {
    /** Name prefix of every database this run creates (server mode). */
    runPrefix: string;
    /** A migrated database every test file clones (server mode), or a migrated PGlite directory. */
    templateDatabase: string | null;
    templatePgliteDir: string | null;
    /** An empty PGlite directory (created, not migrated) to copy where a test needs one: a copy opens in a fraction of initdb. */
    emptyPgliteDir: string | null;
    /** The directory test apps' DATA_DIRs are made in (testSettings), removed with what is in it at the run's end. */
    dataDirRoot: string;
  }
}

const silent = pino({ level: 'silent' });

/**
 * Migrates one database for the whole run; each test file then clones it, which takes a fraction
 * of initdb + migrate. With DATABASE_URL set the run uses that server, otherwise PGlite.
 */
export default async function setup(project: TestProject): Promise<() => Promise<void>> {
  const runPrefix = `keel_test_${randomBytes(4).toString('hex')}`;
  project.provide('runPrefix', runPrefix);
  const dataDirRoot = mkdtempSync(join(tmpdir(), 'keel-test-run-'));
  project.provide('dataDirRoot', dataDirRoot);
  const adminUrl = process.env.DATABASE_URL;
  const redisUrl = process.env.REDIS_URL;
  const removeDataDirs = () => rmSync(dataDirRoot, { recursive: true, force: true });

  if (adminUrl) {
    const template = `${runPrefix}_template`;
    await adminQuery(adminUrl, `create database "${template}"`);
    const settings = loadSettings({ ENVIRONMENT: 'local', SECRET_KEY: 'x'.repeat(40), DATABASE_URL: databaseUrl(adminUrl, template) });
    const database = await openDatabase(settings);
    await migrateUp(database, silent);
    await database.close();
    project.provide('templateDatabase', template);
    project.provide('templatePgliteDir', null);
    project.provide('emptyPgliteDir', null);
    return async () => {
      if (redisUrl) await deleteRunKeys(redisUrl, runPrefix);
      const rows = await adminQuery<{ datname: string }>(adminUrl, `select datname from pg_database where datname like $1`, [
        `${runPrefix}%`,
      ]);
      for (const { datname } of rows) await adminQuery(adminUrl, `drop database if exists "${datname}" with (force)`);
      removeDataDirs();
    };
  }

  // One initdb for the run: the empty directory is kept, and a copy of it is migrated.
  const pgliteSettings = (dataDir: string) => loadSettings({ ENVIRONMENT: 'local', SECRET_KEY: 'x'.repeat(40), PGLITE_DATA_DIR: dataDir });
  const emptyDir = mkdtempSync(join(tmpdir(), 'keel-test-empty-'));
  await (await openDatabase(pgliteSettings(emptyDir))).close();
  const dir = mkdtempSync(join(tmpdir(), 'keel-test-template-'));
  cpSync(emptyDir, dir, { recursive: true });
  const database = await openDatabase(pgliteSettings(dir));
  await migrateUp(database, silent);
  await database.close();
  project.provide('templateDatabase', null);
  project.provide('templatePgliteDir', dir);
  project.provide('emptyPgliteDir', emptyDir);
  return async () => {
    if (redisUrl) await deleteRunKeys(redisUrl, runPrefix);
    rmSync(dir, { recursive: true, force: true });
    rmSync(emptyDir, { recursive: true, force: true });
    removeDataDirs();
  };
}
