import { hostname } from 'node:os';
import { inspect } from 'node:util';

import { ConfigError, envFileWarnings, loadSettings, readEnvironment, type Settings } from './core/config.js';
import { DataDirLockedError } from './core/data-dir-lock.js';
import type { Database } from './core/db.js';
import { createLogger } from './core/logger.js';
import { type DownTarget, migrateDown, migrateUp, MigrationError, pendingMigrations, planDown, readMigrations, requireMigrated } from './core/migrate.js';
import { sslModeWarning } from './core/pg-sslmode.js';
import { checkRedis, databaseProblem, listenProblem, openCheckedDatabase } from './core/preflight.js';

import { Email, Password } from './schemas/common.js';

import { commandHelp, type CommandSpec, parseCommand, UsageError } from './cli/args.js';
import { askHidden, confirm, interactive, readFirstLine } from './cli/prompt.js';

// The server (Fastify, every route and service), the user crud and Argon2 are imported by the
// commands that use them: help, usage errors and migrations start without loading them.
const server = () => import('./server.js');

// ==================== Commands ====================

const listen = {
  host: { type: 'string', usage: '--host HOST', help: 'listen on HOST (overrides the HOST setting)' },
  port: { type: 'string', usage: '--port PORT', help: 'listen on PORT (overrides the PORT setting)' },
} as const;

/** Every command; `keel --help`, each `--help` and the README's command table say the same. */
const COMMANDS = {
  start: {
    name: 'start',
    synopsis: 'start [--host HOST] [--port PORT]',
    summary: 'migrate, ensure the first superuser, serve the API and run background jobs (the embedded default)',
    options: listen,
  },
  api: {
    name: 'api',
    synopsis: 'api [--host HOST] [--port PORT]',
    summary: 'ensure the first superuser and serve the API; refuses while migrations are pending (scaled mode: run `keel migrate` first); with REDIS_URL, `keel worker` runs the jobs',
    options: listen,
  },
  worker: {
    name: 'worker',
    synopsis: 'worker',
    summary: 'run background jobs from Redis, agent runs among them, and sweep runs whose worker died (scaled mode: needs REDIS_URL and the migrated database); SIGTERM hands running runs back',
    options: {},
  },
  'migrate up': {
    name: 'migrate up',
    synopsis: 'migrate [up]',
    summary: 'apply pending migrations, each in a transaction, under a database lock; stops at the first error',
    options: {},
  },
  'migrate down': {
    name: 'migrate down',
    synopsis: 'migrate down [--to TAG | --all] [--yes]',
    summary: 'revert the newest migration; --to TAG reverts every one after TAG, --all every one; asks first (--yes in scripts)',
    options: {
      to: { type: 'string', usage: '--to TAG', help: 'revert the migrations after TAG (TAG itself stays)' },
      all: { type: 'boolean', usage: '--all', help: 'revert every migration (drops every Keel table)' },
      yes: { type: 'boolean', short: 'y', usage: '-y, --yes', help: 'do not ask (needed when standard input is not a terminal)' },
    },
  },
  'migrate status': {
    name: 'migrate status',
    synopsis: 'migrate status',
    summary: 'list applied and pending migrations',
    options: {},
  },
  'create-superuser': {
    name: 'create-superuser',
    synopsis: 'create-superuser --email EMAIL [--reset-password]',
    summary:
      'create a superuser, or promote an existing account (its password is kept unless --reset-password); the password comes from KEEL_SUPERUSER_PASSWORD, a terminal prompt (asked twice) or the first line of standard input',
    options: {
      email: { type: 'string', usage: '--email EMAIL', help: 'the account (required)' },
      'reset-password': { type: 'boolean', usage: '--reset-password', help: 'also set a new password on an existing account' },
    },
  },
} satisfies Record<string, CommandSpec>;

const USAGE = `Usage: keel <command> [options]

Commands:
${Object.values(COMMANDS)
  .map((c) => `  ${c.synopsis}\n      ${c.summary}`)
  .join('\n')}
  help [COMMAND]
      this help, or a command's (also: keel COMMAND --help)

Settings come from the environment and .env (see .env.example).
`;

const MIGRATE_HELP = [COMMANDS['migrate up'], COMMANDS['migrate down'], COMMANDS['migrate status']].map(commandHelp).join('\n');

// ==================== Helpers ====================

function settingsFor(overrides: Record<string, string | undefined> = {}): Settings {
  const defined = Object.fromEntries(Object.entries(overrides).filter(([, v]) => v !== undefined));
  return loadSettings({ ...readEnvironment(), ...defined });
}

function startLogger(settings: Settings): ReturnType<typeof createLogger> {
  const logger = createLogger(settings);
  for (const warning of envFileWarnings()) logger.warn(warning);
  const sslMode = sslModeWarning(settings.DATABASE_URL);
  if (sslMode) logger.warn(sslMode);
  activeLogger = logger;
  return logger;
}

async function withDatabase<T>(settings: Settings, work: (database: Database) => Promise<T>): Promise<T> {
  const database = await openCheckedDatabase(settings);
  try {
    return await work(database);
  } finally {
    await database.close();
  }
}

// ==================== start / api / worker ====================

async function serveCommand(spec: CommandSpec, args: string[]): Promise<number> {
  const parsed = parseCommand(spec, args);
  if (parsed.help) return printHelp(commandHelp(spec));
  const { host, port } = parsed.values as { host?: string; port?: string };
  if (port !== undefined && !/^\d{1,5}$/.test(port)) throw new UsageError(`keel ${spec.name}: --port takes a number from 0 to 65535`);
  if (host !== undefined && !host.trim()) throw new UsageError(`keel ${spec.name}: --host needs a value`);
  const settings = settingsFor({ HOST: host, PORT: port });
  const logger = startLogger(settings);
  const { closeOnSignals, startServer } = await server();
  try {
    const app = await startServer(settings, logger, { migrate: spec.name === 'start' });
    closeOnSignals(app, settings, logger, app.meter);
  } catch (error) {
    throw listenProblem(error, settings) ?? error;
  }
  return 0;
}

async function workerCommand(args: string[]): Promise<number> {
  if (parseCommand(COMMANDS.worker, args).help) return printHelp(commandHelp(COMMANDS.worker));
  const settings = settingsFor();
  const logger = startLogger(settings);
  await checkRedis(settings);
  const { closeOnSignals, startWorker } = await server();
  const worker = await startWorker(settings, logger);
  closeOnSignals(worker, settings, logger, worker.usage);
  return 0;
}

// ==================== migrate ====================

async function migrateCommand(args: string[]): Promise<number> {
  const [first] = args;
  if (first === '--help' || first === '-h') return printHelp(MIGRATE_HELP);
  const action = first === undefined || first.startsWith('-') ? 'up' : first;
  const rest = action === first ? args.slice(1) : args;
  switch (action) {
    case 'up':
      return migrateUpCommand(rest);
    case 'down':
      return migrateDownCommand(rest);
    case 'status':
      return migrateStatusCommand(rest);
    default:
      throw new UsageError(`keel migrate: unknown action "${action}"; use up, down or status (see keel migrate --help)`);
  }
}

async function migrateUpCommand(args: string[]): Promise<number> {
  if (parseCommand(COMMANDS['migrate up'], args).help) return printHelp(commandHelp(COMMANDS['migrate up']));
  const settings = settingsFor();
  const logger = startLogger(settings);
  await withDatabase(settings, async (database) => {
    const applied = await migrateUp(database, logger);
    logger.info({ applied: applied.length }, applied.length ? 'migrations applied' : 'database is up to date');
  });
  return 0;
}

async function migrateStatusCommand(args: string[]): Promise<number> {
  if (parseCommand(COMMANDS['migrate status'], args).help) return printHelp(commandHelp(COMMANDS['migrate status']));
  const settings = settingsFor();
  startLogger(settings);
  await withDatabase(settings, async (database) => {
    const pending = new Set(await pendingMigrations(database));
    for (const { tag } of readMigrations()) process.stdout.write(`${pending.has(tag) ? 'pending' : 'applied'}  ${tag}\n`);
  });
  return 0;
}

async function migrateDownCommand(args: string[]): Promise<number> {
  const spec = COMMANDS['migrate down'];
  const parsed = parseCommand(spec, args);
  if (parsed.help) return printHelp(commandHelp(spec));
  const { to, all, yes } = parsed.values as { to?: string; all?: boolean; yes?: boolean };
  if (to !== undefined && all) throw new UsageError('keel migrate down: give --to TAG or --all, not both');
  const tags = readMigrations().map((m) => m.tag);
  if (to !== undefined && !tags.includes(to)) {
    throw new UsageError(`keel migrate down: unknown migration "${to}"; the migrations are: ${tags.join(', ')}`);
  }
  const target: DownTarget = all ? { all: true } : to !== undefined ? { to } : { newest: true };
  const settings = settingsFor();
  const logger = startLogger(settings);
  await withDatabase(settings, async (database) => {
    const plan = await planDown(database, target);
    if (!plan.revert.length) {
      process.stdout.write('nothing to revert\n');
      return;
    }
    const what = `revert ${plan.revert.join(', ')} (their tables and data are dropped)`;
    if (!yes) {
      if (!interactive()) throw new UsageError(`keel migrate down: would ${what}; standard input is not a terminal, so pass --yes to confirm`);
      if (!(await confirm(`This will ${what}. Continue?`))) throw new UsageError('keel migrate down: cancelled, nothing reverted');
    }
    const reverted = await migrateDown(database, logger, plan.to);
    logger.info({ reverted: reverted.length }, 'migrations reverted');
    process.stdout.write(`reverted ${reverted.join(', ')}\n`);
  });
  return 0;
}

// ==================== create-superuser ====================

async function newPassword(): Promise<string> {
  const fromEnv = process.env.KEEL_SUPERUSER_PASSWORD;
  let password: string;
  if (fromEnv) {
    password = fromEnv;
  } else if (interactive()) {
    password = await askHidden('Password: ');
    if (Password.safeParse(password).success && (await askHidden('Password (again): ')) !== password) {
      throw new UsageError('keel create-superuser: the passwords do not match; nothing changed');
    }
  } else {
    password = await readFirstLine();
  }
  const checked = Password.safeParse(password);
  if (!checked.success) throw new UsageError('keel create-superuser: the password must be 8 to 128 characters; nothing changed');
  return checked.data;
}

async function createSuperuserCommand(args: string[]): Promise<number> {
  const spec = COMMANDS['create-superuser'];
  const parsed = parseCommand(spec, args);
  if (parsed.help) return printHelp(commandHelp(spec));
  const { email: given, 'reset-password': reset } = parsed.values as { email?: string; 'reset-password'?: boolean };
  if (given === undefined) throw new UsageError('keel create-superuser: --email is required (see keel create-superuser --help)');
  const email = Email.safeParse(given);
  if (!email.success) throw new UsageError(`keel create-superuser: --email "${given}" is not a valid email address`);
  const settings = settingsFor();
  startLogger(settings);
  const [userCrud, { hashPassword }] = await Promise.all([import('./crud/user.js'), import('./core/security.js')]);
  await withDatabase(settings, async (database) => {
    await requireMigrated(database);
    const existing = await userCrud.getByEmail(database.db, email.data);
    if (!existing) {
      const hashed = await hashPassword(await newPassword());
      await userCrud.create(database.db, { email: email.data, hashed_password: hashed, is_superuser: true, full_name: null });
      process.stdout.write(`${email.data}: superuser created\n`);
      return;
    }
    const changes: string[] = [];
    if (!existing.is_superuser) changes.push('promoted to superuser');
    if (!existing.is_active) changes.push('activated');
    if (reset) {
      const hashed = await hashPassword(await newPassword());
      // A new password signs every session of the account out.
      await userCrud.updateRevokingTokens(database.db, existing.id, { is_superuser: true, is_active: true, hashed_password: hashed });
      changes.push('password reset');
    } else if (changes.length) {
      await userCrud.update(database.db, existing.id, { is_superuser: true, is_active: true });
    }
    const kept = reset ? '' : ' (password unchanged; --reset-password sets a new one)';
    process.stdout.write(`${email.data}: ${changes.length ? changes.join(', ') : 'already an active superuser, nothing changed'}${kept}\n`);
  }).catch((error: unknown) => {
    if (!(error instanceof DataDirLockedError)) throw error;
    // A holder on another host may be a replaced container's: the lock's own message says what to remove.
    if (error.host !== hostname()) throw new ConfigError(`create-superuser: ${error.message}`);
    throw new ConfigError(
      `create-superuser cannot open ${error.directory}: a running Keel server (pid ${error.holder}) holds it. ` +
        'Stop the server first, or sign in as a superuser and create the account through the API (POST /api/v1/users)',
    );
  });
  return 0;
}

// ==================== Entry point ====================

function printHelp(text: string): number {
  process.stdout.write(text);
  return 0;
}

async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  switch (command) {
    case undefined:
      process.stderr.write(USAGE);
      return 2;
    case 'help':
    case '--help':
    case '-h':
      return helpCommand(rest[0]);
    case 'start':
    case 'api':
      return serveCommand(COMMANDS[command], rest);
    case 'worker':
      return workerCommand(rest);
    case 'migrate':
      return migrateCommand(rest);
    case 'create-superuser':
      return createSuperuserCommand(rest);
    default:
      throw new UsageError(`keel: unknown command "${command}" (see keel --help)`);
  }
}

function helpCommand(topic: string | undefined): number {
  if (topic === undefined) return printHelp(USAGE);
  if (topic === 'migrate') return printHelp(MIGRATE_HELP);
  const spec = (COMMANDS as Record<string, CommandSpec>)[topic];
  if (!spec) throw new UsageError(`keel help: unknown command "${topic}" (see keel --help)`);
  return printHelp(commandHelp(spec));
}

let activeLogger: ReturnType<typeof createLogger> | undefined;

/**
 * What the operator sees when a command fails: one line for everything they can fix (usage,
 * settings, migrations, an unreachable dependency); a stack only for what looks like a bug.
 */
function describeFailure(error: unknown): { text: string; status: number } {
  if (error instanceof UsageError) return { text: error.message, status: 2 };
  if (error instanceof ConfigError || error instanceof MigrationError) return { text: `keel: ${error.message}`, status: 1 };
  if (!(error instanceof Error)) return { text: `keel: ${inspect(error, { breakLength: Infinity, depth: 2 })}`, status: 1 };
  let settings: Settings | undefined;
  try {
    settings = settingsFor();
  } catch {
    // The settings were the problem; the error says so already.
  }
  const known = settings && databaseProblem(error, settings);
  if (known) return { text: `keel: ${known.message}`, status: 1 };
  // System and database errors carry a code: their message is the operator's part.
  if (typeof (error as { code?: unknown }).code === 'string') return { text: `keel: ${error.message}`, status: 1 };
  return { text: `keel: ${error.stack ?? error.message}`, status: 1 };
}

main(process.argv.slice(2)).then(
  (status) => {
    if (status) process.exitCode = status;
  },
  (error: unknown) => {
    const { text, status } = describeFailure(error);
    activeLogger?.flush();
    process.stderr.write(`${text}\n`);
    process.exit(status);
  },
);
