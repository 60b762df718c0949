import { createInterface } from 'node:readline/promises';
import { parseArgs } from 'node:util';

import { ConfigError, loadSettings, type Settings } from './core/config.js';
import { DataDirLockedError } from './core/data-dir-lock.js';
import { openDatabase } from './core/db.js';
import { createLogger, type Logger } from './core/logger.js';
import { migrateDown, migrateUp, pendingMigrations, readMigrations } from './core/migrate.js';
import { hashPassword } from './core/security.js';

import { Email, Password } from './schemas/common.js';

import * as userCrud from './crud/user.js';
import { closeOnSignals, startServer, startWorker } from './server.js';

const USAGE = `keel <command>

  start                      migrate, then serve the API (embedded default: one process does it all)
  api                        serve the API; the database must already be migrated (scaled mode)
  worker                     run background jobs from Redis (scaled mode; needs REDIS_URL)
  migrate [up]               apply pending migrations under a database lock
  migrate down [--to TAG]    revert migrations newest first, down to TAG (exclusive) or all of them
  migrate status             list applied and pending migrations
  create-superuser --email E create a superuser, or promote an existing account; the password is
                             read from KEEL_SUPERUSER_PASSWORD or standard input
`;

async function withDatabase<T>(settings: Settings, work: (db: Awaited<ReturnType<typeof openDatabase>>) => Promise<T>): Promise<T> {
  const database = await openDatabase(settings);
  try {
    return await work(database);
  } finally {
    await database.close();
  }
}

async function migrateCommand(settings: Settings, logger: Logger, args: string[]): Promise<void> {
  const { values, positionals } = parseArgs({ args, options: { to: { type: 'string' } }, allowPositionals: true });
  const action = positionals[0] ?? 'up';
  await withDatabase(settings, async (database) => {
    if (action === 'up') {
      const applied = await migrateUp(database, logger);
      logger.info({ applied: applied.length }, applied.length ? 'migrations applied' : 'database is up to date');
    } else if (action === 'down') {
      const reverted = await migrateDown(database, logger, values.to ?? null);
      logger.info({ reverted: reverted.length }, 'migrations reverted');
    } else if (action === 'status') {
      const pending = new Set(await pendingMigrations(database));
      for (const { tag } of readMigrations()) process.stdout.write(`${pending.has(tag) ? 'pending' : 'applied'}  ${tag}\n`);
    } else {
      throw new ConfigError(`unknown migrate action "${action}"\n\n${USAGE}`);
    }
  });
}

async function readPassword(): Promise<string> {
  const fromEnv = process.env.KEEL_SUPERUSER_PASSWORD;
  if (fromEnv) return fromEnv;
  const rl = createInterface({ input: process.stdin, output: process.stderr, terminal: false });
  try {
    if (process.stdin.isTTY) process.stderr.write('Password: ');
    for await (const line of rl) return line;
    return '';
  } finally {
    rl.close();
  }
}

async function createSuperuserCommand(settings: Settings, logger: Logger, args: string[]): Promise<void> {
  const { values } = parseArgs({ args, options: { email: { type: 'string' } } });
  const email = Email.safeParse(values.email);
  if (!email.success) throw new ConfigError('--email: a valid email address is required');
  const password = Password.safeParse(await readPassword());
  if (!password.success) throw new ConfigError('password: 8 to 128 characters are required');
  const hashed = await hashPassword(password.data);
  await withDatabase(settings, async (database) => {
    const existing = await userCrud.getByEmail(database.db, email.data);
    if (existing) {
      await userCrud.updateRevokingTokens(database.db, existing.id, { is_superuser: true, is_active: true, hashed_password: hashed });
      logger.info({ userId: existing.id }, 'existing account promoted to superuser');
    } else {
      const user = await userCrud.create(database.db, { email: email.data, hashed_password: hashed, is_superuser: true, full_name: null });
      logger.info({ userId: user.id }, 'superuser created');
    }
  }).catch((error: unknown) => {
    if (!(error instanceof DataDirLockedError)) throw error;
    throw new ConfigError(
      `keel: create-superuser cannot open ${error.directory}: a running Keel server (pid ${error.holder}) holds it. ` +
        'Stop the server first, or sign in as a superuser and create the account through the API (POST /api/v1/users)',
    );
  });
}

async function main(argv: string[]): Promise<void> {
  const [command, ...rest] = argv;
  if (!command || command === 'help' || command === '--help') {
    process.stdout.write(USAGE);
    return;
  }
  const settings = loadSettings();
  const logger = createLogger(settings);
  switch (command) {
    case 'start':
    case 'api': {
      const app = await startServer(settings, logger, { migrate: command === 'start' });
      closeOnSignals(app, settings, logger);
      return;
    }
    case 'worker':
      closeOnSignals(startWorker(settings, logger), settings, logger);
      return;
    case 'migrate':
      return migrateCommand(settings, logger, rest);
    case 'create-superuser':
      return createSuperuserCommand(settings, logger, rest);
    default:
      throw new ConfigError(`unknown command "${command}"\n\n${USAGE}`);
  }
}

main(process.argv.slice(2)).catch((error: unknown) => {
  // Configuration and usage errors are the operator's to fix: the message, no stack.
  process.stderr.write(error instanceof ConfigError ? `${error.message}\n` : `keel: ${(error as Error).stack ?? String(error)}\n`);
  process.exit(1);
});
