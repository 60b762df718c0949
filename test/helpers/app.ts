import { randomBytes } from 'node:crypto';
import { cpSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import type { FastifyInstance } from 'fastify';
import pino from 'pino';
import { afterAll, beforeAll, inject } from 'vitest';

import { loadSettings, type Settings } from '../../src/core/config.js';
import { type Database, openDatabase } from '../../src/core/db.js';

import { type AppOptions, buildApp } from '../../src/app.js';
import { cacheUsers } from '../../src/crud/user.js';
import { ensureFirstSuperuser } from '../../src/services/user-service.js';
import { adminQuery, databaseUrl } from './postgres.js';
import { redisRunPrefix } from './redis.js';
import { SmtpCapture } from './smtp.js';

export const SUPERUSER_EMAIL = 'admin@keel.test';
export const SUPERUSER_PASSWORD = 'superuser-password';

/** A Redis key prefix of its own under the run's: the run's teardown deletes every key under it. */
export function testRedisPrefix(): string {
  return `${redisRunPrefix(inject('runPrefix'))}${randomBytes(6).toString('hex')}:`;
}

/**
 * The test process's SECRET_KEY: every app of a test file is a node of one deployment, which shares
 * it (a second app over the same database opens the provider records the first sealed).
 */
const TEST_SECRET_KEY = randomBytes(32).toString('hex');

/** Settings for a test app: quiet logs, high rate limits, the run's Redis (when given) under its own prefix. */
export function testSettings(overrides: Record<string, string> = {}): Settings {
  // Under the run's own directory, which the global teardown removes (every app makes one).
  const dataDir = mkdtempSync(join(inject('dataDirRoot'), 'data-'));
  return loadSettings({
    ENVIRONMENT: 'local',
    SECRET_KEY: TEST_SECRET_KEY,
    DATA_DIR: dataDir,
    LOG_LEVEL: 'silent',
    LOG_FORMAT: 'json',
    FIRST_SUPERUSER: SUPERUSER_EMAIL,
    FIRST_SUPERUSER_PASSWORD: SUPERUSER_PASSWORD,
    REDIS_URL: process.env.REDIS_URL ?? '',
    REDIS_KEY_PREFIX: testRedisPrefix(),
    RATE_LIMIT_LOGIN_PER_IP: '100000',
    RATE_LIMIT_LOGIN_PER_ACCOUNT: '100000',
    RATE_LIMIT_SIGNUP_PER_IP: '100000',
    RATE_LIMIT_SIGNUP_PER_ACCOUNT: '100000',
    RATE_LIMIT_RECOVERY_PER_IP: '100000',
    RATE_LIMIT_RECOVERY_PER_ACCOUNT: '100000',
    ...overrides,
  });
}

/**
 * A fresh, migrated database of this test file's own: a clone of the run's template database on
 * the server (DATABASE_URL set) or a copy of the template PGlite directory.
 */
export async function openTestDatabase(overrides: Record<string, string> = {}): Promise<{ database: Database; url: string | null; destroy: () => Promise<void> }> {
  const adminUrl = process.env.DATABASE_URL;
  const template = inject('templateDatabase');
  if (adminUrl && template) {
    const name = `${inject('runPrefix')}_${randomBytes(4).toString('hex')}`;
    await adminQuery(adminUrl, `create database "${name}" template "${template}"`);
    const url = databaseUrl(adminUrl, name);
    const database = await openDatabase(testSettings({ ...overrides, DATABASE_URL: url }));
    await cacheUsers(database);
    return {
      database,
      url,
      destroy: async () => {
        await database.close();
        await adminQuery(adminUrl, `drop database if exists "${name}" with (force)`);
      },
    };
  }
  const dir = mkdtempSync(join(tmpdir(), 'keel-test-db-'));
  cpSync(inject('templatePgliteDir')!, dir, { recursive: true });
  const database = await openDatabase(testSettings({ ...overrides, PGLITE_DATA_DIR: dir }));
  await cacheUsers(database);
  return {
    database,
    url: null,
    destroy: async () => {
      await database.close();
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** What a test app is built with besides settings: the agents' tool implementations, a logger to read (helpers/logs.ts; silent by default), whether its close closes the database. */
export type TestAppOptions = Pick<AppOptions, 'tools' | 'closeDatabase'> & Partial<Pick<AppOptions, 'logger'>>;

export async function buildTestApp(database: Database, overrides: Record<string, string> = {}, { logger = pino({ level: 'silent' }), ...options }: TestAppOptions = {}): Promise<FastifyInstance> {
  const settings = testSettings(overrides);
  await ensureFirstSuperuser(database.db, settings, logger);
  const app = await buildApp({ settings, database, logger, vectorSearch: database.kind === 'pglite', runJobs: true, ...options });
  await app.ready();
  return app;
}

export interface TestContext {
  app: FastifyInstance;
  database: Database;
}

/**
 * Call at the top of a test file: one database and one app for the file, built before its tests
 * and torn down after them. `overrides` are settings (environment names).
 */
export function useTestApp(overrides: Record<string, string> = {}, options: TestAppOptions = {}): TestContext {
  const context = {} as TestContext;
  let destroy: (() => Promise<void>) | null = null;
  beforeAll(async () => {
    const opened = await openTestDatabase();
    destroy = opened.destroy;
    context.database = opened.database;
    context.app = await buildTestApp(opened.database, overrides, options);
  });
  afterAll(async () => {
    await context.app?.close();
    await destroy?.();
  });
  return context;
}

export interface MailingApp extends TestContext {
  capture: SmtpCapture;
  close(): Promise<void>;
}

/** A database and an app of the test file's own whose email goes to a fresh SMTP capture. */
export async function openMailingApp(overrides: Record<string, string> = {}): Promise<MailingApp> {
  const capture = new SmtpCapture();
  const port = await capture.start();
  const { database, destroy } = await openTestDatabase();
  const app = await buildTestApp(database, { ...capture.settings(port), ...overrides });
  return {
    app,
    database,
    capture,
    close: async () => {
      await app.close();
      await destroy();
      await capture.close();
    },
  };
}
