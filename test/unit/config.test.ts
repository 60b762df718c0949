import { mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';

import { afterAll, describe, expect, it } from 'vitest';

import { ConfigError, envFileWarnings, loadSettings, readEnvironment, SettingsSchema } from '../../src/core/config.js';

const GOOD_KEY = 'k'.repeat(48);
const temporary: string[] = [];

function tempDir(): string {
  const dir = mkdtempSync(join(tmpdir(), 'keel-config-test-'));
  temporary.push(dir);
  return dir;
}

afterAll(() => {
  for (const dir of temporary) rmSync(dir, { recursive: true, force: true });
});

/** The ConfigError `loadSettings` throws for `source` (fails the test when it does not throw one). */
function configError(source: Record<string, string | undefined>): ConfigError {
  try {
    loadSettings(source);
  } catch (error) {
    expect(error).toBeInstanceOf(ConfigError);
    return error as ConfigError;
  }
  throw new Error(`loadSettings accepted ${JSON.stringify(source)}`);
}

describe('loadSettings defaults', () => {
  it('gives the documented defaults when nothing is set', () => {
    const settings = loadSettings({ SECRET_KEY: GOOD_KEY });
    expect(settings).toMatchObject({
      ENVIRONMENT: 'local',
      PROJECT_NAME: 'Keel',
      HOST: '127.0.0.1',
      PORT: 8000,
      DATA_DIR: './data',
      ACCESS_TOKEN_EXPIRE_MINUTES: 11_520,
      FIRST_SUPERUSER: 'admin@example.com',
      FIRST_SUPERUSER_PASSWORD: 'changethis',
      USERS_OPEN_REGISTRATION: true,
      BACKEND_CORS_ORIGINS: [],
      LOG_FORMAT: 'pretty',
      SECRET_KEY: GOOD_KEY,
      emailsEnabled: false,
    });
    expect(settings.DATABASE_URL).toBeUndefined();
    expect(settings.REDIS_URL).toBeUndefined();
    expect(settings.dataDir).toBe(resolve('data'));
    // SPEC §5: keep-alive comments at least every 15 s; a 15 s timer fires a little after 15 s.
    expect(settings.RUN_EVENTS_KEEPALIVE_SECONDS).toBeLessThanOrEqual(10);
  });

  it('treats empty values as unset and ignores unknown variables', () => {
    const settings = loadSettings({ SECRET_KEY: GOOD_KEY, DATABASE_URL: '', REDIS_URL: '', SMTP_HOST: '', NOT_A_SETTING: 'x' });
    expect(settings.DATABASE_URL).toBeUndefined();
    expect(settings.REDIS_URL).toBeUndefined();
    expect(settings.SMTP_HOST).toBeUndefined();
    expect(settings).not.toHaveProperty('NOT_A_SETTING');
  });

  it('coerces numbers, booleans and lists from their text', () => {
    const settings = loadSettings({
      SECRET_KEY: GOOD_KEY,
      PORT: '9123',
      USERS_OPEN_REGISTRATION: 'false',
      BACKEND_CORS_ORIGINS: 'http://a.example, http://b.example ,',
      DATABASE_URL: 'postgresql://u:p@db.example:5433/keel',
      REDIS_URL: 'rediss://cache.example:6380',
    });
    expect(settings.PORT).toBe(9123);
    expect(settings.USERS_OPEN_REGISTRATION).toBe(false);
    expect(settings.BACKEND_CORS_ORIGINS).toEqual(['http://a.example', 'http://b.example']);
    expect(settings.DATABASE_URL).toBe('postgresql://u:p@db.example:5433/keel');
    expect(settings.REDIS_URL).toBe('rediss://cache.example:6380');
  });

  it('logs JSON by default outside local', () => {
    const settings = loadSettings({ ENVIRONMENT: 'production', SECRET_KEY: GOOD_KEY, FIRST_SUPERUSER_PASSWORD: 'a-real-password' });
    expect(settings.LOG_FORMAT).toBe('json');
  });

  it('returns a frozen object', () => {
    const settings = loadSettings({ SECRET_KEY: GOOD_KEY });
    expect(Object.isFrozen(settings)).toBe(true);
    expect(() => {
      (settings as { PORT: number }).PORT = 1;
    }).toThrow(TypeError);
    expect(settings.PORT).toBe(8000);
  });
});

describe('loadSettings refuses bad values, naming the variable', () => {
  it.each([
    ['PORT', 'abc'],
    ['PORT', '70000'],
    ['PORT', '-1'],
    ['PORT', '80.5'],
    ['ENVIRONMENT', 'prod'],
    ['DATABASE_URL', 'not a url'],
    ['DATABASE_URL', 'mysql://root@localhost/keel'],
    ['REDIS_URL', 'http://localhost:6379'],
    ['FIRST_SUPERUSER', 'not-an-email'],
    ['USERS_OPEN_REGISTRATION', 'maybe'],
    ['LOG_LEVEL', 'loud'],
    ['TRUST_PROXY', 'true'],
  ])('%s=%s', (name, value) => {
    const error = configError({ SECRET_KEY: GOOD_KEY, [name]: value });
    expect(error.message).toMatch(new RegExp(`^\\s*${name}: `, 'm'));
    // Only the bad variable is named.
    const named = [...error.message.matchAll(/^\s*([A-Z_]+): /gm)].map((m) => m[1]);
    expect(named).toEqual([name]);
  });

  it('reads TRUST_PROXY as off, a hop count or a list of proxy addresses', () => {
    const settings = (value: string) => loadSettings({ SECRET_KEY: GOOD_KEY, DATA_DIR: tempDir(), TRUST_PROXY: value }).TRUST_PROXY;
    expect(settings('false')).toBe(false);
    expect(settings('1')).toBe(1);
    expect(settings('10.0.0.1, 192.168.0.0/16')).toEqual(['10.0.0.1', '192.168.0.0/16']);
  });

  it('names every bad variable at once', () => {
    const error = configError({ SECRET_KEY: GOOD_KEY, PORT: 'abc', ENVIRONMENT: 'prod', DATABASE_URL: 'nope' });
    for (const name of ['PORT', 'ENVIRONMENT', 'DATABASE_URL']) expect(error.message).toMatch(new RegExp(`^\\s*${name}: `, 'm'));
  });

  it('refuses a SECRET_KEY shorter than 32 characters, even in local', () => {
    expect(configError({ SECRET_KEY: 'short' }).message).toMatch(/SECRET_KEY/);
  });

  it('refuses a maintenance idle wait as long as its interval (a round would never find it)', () => {
    expect(configError({ SECRET_KEY: GOOD_KEY, PGLITE_MAINTENANCE_INTERVAL_SECONDS: '2', PGLITE_MAINTENANCE_IDLE_MS: '2000' }).message).toBe('PGLITE_MAINTENANCE_IDLE_MS: must be less than PGLITE_MAINTENANCE_INTERVAL_SECONDS (in ms)');
    expect(loadSettings({ SECRET_KEY: GOOD_KEY, PGLITE_MAINTENANCE: 'false', PGLITE_MAINTENANCE_INTERVAL_SECONDS: '2', PGLITE_MAINTENANCE_IDLE_MS: '2000' }).PGLITE_MAINTENANCE).toBe(false);
  });

  it('takes GATEWAY_STREAM_HEARTBEAT_MS of 0 (off) or at least 1000 ms, and refuses a shorter one (it sent even a fast 402 as a 200 stream\'s error event)', () => {
    expect(loadSettings({ SECRET_KEY: GOOD_KEY, GATEWAY_STREAM_HEARTBEAT_MS: '0' }).GATEWAY_STREAM_HEARTBEAT_MS).toBe(0);
    expect(loadSettings({ SECRET_KEY: GOOD_KEY, GATEWAY_STREAM_HEARTBEAT_MS: '1000' }).GATEWAY_STREAM_HEARTBEAT_MS).toBe(1000);
    for (const ms of ['1', '999']) {
      expect(configError({ SECRET_KEY: GOOD_KEY, GATEWAY_STREAM_HEARTBEAT_MS: ms }).message).toBe('GATEWAY_STREAM_HEARTBEAT_MS: must be 0 (off) or at least 1000 ms');
    }
  });

  it('keeps ten times MAX_API_KEYS_PER_USER keys by default, and refuses a MAX_API_KEYS_KEPT_PER_USER below it', () => {
    expect(loadSettings({ SECRET_KEY: GOOD_KEY }).MAX_API_KEYS_KEPT_PER_USER).toBe(1_000);
    expect(loadSettings({ SECRET_KEY: GOOD_KEY, MAX_API_KEYS_PER_USER: '7' }).MAX_API_KEYS_KEPT_PER_USER).toBe(70);
    expect(loadSettings({ SECRET_KEY: GOOD_KEY, MAX_API_KEYS_PER_USER: '7', MAX_API_KEYS_KEPT_PER_USER: '7' }).MAX_API_KEYS_KEPT_PER_USER).toBe(7);
    expect(configError({ SECRET_KEY: GOOD_KEY, MAX_API_KEYS_PER_USER: '7', MAX_API_KEYS_KEPT_PER_USER: '6' }).message).toMatch(/^MAX_API_KEYS_KEPT_PER_USER: must be at least MAX_API_KEYS_PER_USER \(7\)/);
  });

  it('refuses a BILLING_SUMMARY_MAX_DAYS shorter than the summary\'s default range (30 days), which would refuse a request naming no range', () => {
    expect(configError({ SECRET_KEY: GOOD_KEY, BILLING_SUMMARY_MAX_DAYS: '7' }).message).toMatch(/^BILLING_SUMMARY_MAX_DAYS: /);
    expect(loadSettings({ SECRET_KEY: GOOD_KEY, BILLING_SUMMARY_MAX_DAYS: '30' }).BILLING_SUMMARY_MAX_DAYS).toBe(30);
  });
});

describe('knowledge-base settings', () => {
  const base = { SECRET_KEY: GOOD_KEY, DATA_DIR: '/tmp/keel-config-kb' };

  it('defaults to 50 MB per user, 20 MB per file, English full text and no embedding model', () => {
    const settings = loadSettings(base);
    expect(settings).toMatchObject({ KB_MAX_BYTES_PER_USER: 50 * 1024 * 1024, KB_MAX_FILE_BYTES: 20 * 1024 * 1024, KB_SEARCH_LANGUAGE: 'english', EMBEDDING_MODEL: undefined });
  });

  it('takes a built-in PostgreSQL text-search configuration only', () => {
    expect(loadSettings({ ...base, KB_SEARCH_LANGUAGE: 'german' }).KB_SEARCH_LANGUAGE).toBe('german');
    expect(configError({ ...base, KB_SEARCH_LANGUAGE: "english'; drop table users; --" }).message).toMatch(/^KB_SEARCH_LANGUAGE: /);
  });

  it('refuses a per-file limit over the per-user total', () => {
    expect(configError({ ...base, KB_MAX_FILE_BYTES: '2000', KB_MAX_BYTES_PER_USER: '1000' }).message).toBe('KB_MAX_FILE_BYTES: must not exceed KB_MAX_BYTES_PER_USER');
  });

  it('bounds all the memory one document may take, above its parsing heap', () => {
    expect(loadSettings(base).KB_EXTRACT_MAX_TOTAL_MEMORY_MB).toBe(512);
    expect(configError({ ...base, KB_EXTRACT_MAX_MEMORY_MB: '512' }).message).toBe('KB_EXTRACT_MAX_TOTAL_MEMORY_MB: must exceed KB_EXTRACT_MAX_MEMORY_MB (512), the heap alone, got 512');
  });
});

describe('PGLITE_THREAD_SCHED_IDLE', () => {
  const base = { SECRET_KEY: GOOD_KEY, DATA_DIR: '/tmp/keel-config-pglite' };

  it('is off by default, and refused without the thread it schedules', () => {
    expect(loadSettings(base).PGLITE_THREAD_SCHED_IDLE).toBe(false);
    expect(loadSettings({ ...base, PGLITE_THREAD_SCHED_IDLE: 'true' }).PGLITE_THREAD_SCHED_IDLE).toBe(true);
    expect(configError({ ...base, PGLITE_THREAD: 'false', PGLITE_THREAD_SCHED_IDLE: 'true' }).message).toBe(
      "PGLITE_THREAD_SCHED_IDLE: schedules the embedded database's own thread, so it needs PGLITE_THREAD=true",
    );
  });
});

describe('BILLING_RESERVATION_TTL_SECONDS', () => {
  const base = { SECRET_KEY: GOOD_KEY, DATA_DIR: '/tmp/keel-config-billing' };

  // The sweep releases a hold older than the TTL as a crashed process's: a call still running then
  // loses it, and other calls may take the credit it will be charged (an overdraft).
  it('must outlast the longest model call, a credit window block\'s 30 s included', () => {
    // Defaults: a stream's 600 s; a call's 3 attempts of 120 s and 2 waits of 20 s, 400 s.
    expect(loadSettings(base).BILLING_RESERVATION_TTL_SECONDS).toBe(900);
    expect(loadSettings({ ...base, BILLING_RESERVATION_TTL_SECONDS: '631' }).BILLING_RESERVATION_TTL_SECONDS).toBe(631);
    expect(configError({ ...base, BILLING_RESERVATION_TTL_SECONDS: '630' }).message).toBe(
      'BILLING_RESERVATION_TTL_SECONDS: must be more than 630 s, the longest a model call holds its reservation (MODEL_STREAM_TIMEOUT_MS, or MODEL_TIMEOUT_MS × (MODEL_MAX_RETRIES + 1) + MODEL_RETRY_MAX_WAIT_MS × MODEL_MAX_RETRIES, and 30 s of a credit window block\'s age); got 630',
    );
    expect(configError({ ...base, MODEL_TIMEOUT_MS: '1200000', MODEL_MAX_RETRIES: '0' }).message).toMatch(/^BILLING_RESERVATION_TTL_SECONDS: must be more than 1230 s/);
    expect(configError({ ...base, MODEL_STREAM_TIMEOUT_MS: '3600000' }).message).toMatch(/^BILLING_RESERVATION_TTL_SECONDS: must be more than 3630 s/);
    expect(loadSettings({ ...base, MODEL_STREAM_TIMEOUT_MS: '3600000', BILLING_RESERVATION_TTL_SECONDS: '3700' }).MODEL_STREAM_TIMEOUT_MS).toBe(3_600_000);
  });
});

describe.each(['staging', 'production'])('ENVIRONMENT=%s refuses default secrets', (environment) => {
  const base = { ENVIRONMENT: environment, FIRST_SUPERUSER_PASSWORD: 'a-real-superuser-password' };

  it('refuses a missing SECRET_KEY', () => {
    const dataDir = tempDir();
    expect(configError({ ...base, DATA_DIR: dataDir }).message).toMatch(/SECRET_KEY/);
    expect(configError({ ...base, DATA_DIR: dataDir, SECRET_KEY: '' }).message).toMatch(/SECRET_KEY/);
  });

  it.each(['changethis', 'secret', 'changeme'])('refuses the default SECRET_KEY %s', (key) => {
    expect(configError({ ...base, SECRET_KEY: key }).message).toMatch(/SECRET_KEY/);
  });

  it('refuses the default FIRST_SUPERUSER_PASSWORD, given or implied', () => {
    expect(configError({ ENVIRONMENT: environment, SECRET_KEY: GOOD_KEY }).message).toMatch(/FIRST_SUPERUSER_PASSWORD/);
    expect(configError({ ENVIRONMENT: environment, SECRET_KEY: GOOD_KEY, FIRST_SUPERUSER_PASSWORD: 'changethis' }).message).toMatch(
      /FIRST_SUPERUSER_PASSWORD/,
    );
  });

  it('accepts real secrets and never writes a key file', () => {
    const dataDir = tempDir();
    const settings = loadSettings({ ...base, SECRET_KEY: GOOD_KEY, DATA_DIR: dataDir });
    expect(settings.ENVIRONMENT).toBe(environment);
    expect(settings.SECRET_KEY).toBe(GOOD_KEY);
    expect(() => statSync(join(dataDir, '.secret_key'))).toThrow();
  });
});

describe('readEnvironment', () => {
  it('reads .env, with the real environment winning', () => {
    const dir = tempDir();
    const file = join(dir, '.env');
    writeFileSync(
      file,
      ['# a comment', 'PORT=9001', 'PROJECT_NAME="From File"', 'HOST=0.0.0.0', `SECRET_KEY=${GOOD_KEY}`, ''].join('\n'),
    );
    const source = readEnvironment(file, { PORT: '9002', LOG_LEVEL: 'warn' });
    expect(source).toMatchObject({ PORT: '9002', PROJECT_NAME: 'From File', HOST: '0.0.0.0', LOG_LEVEL: 'warn', SECRET_KEY: GOOD_KEY });

    const settings = loadSettings(source);
    expect(settings.PORT).toBe(9002);
    expect(settings.PROJECT_NAME).toBe('From File');
    expect(settings.HOST).toBe('0.0.0.0');
    expect(settings.LOG_LEVEL).toBe('warn');
  });

  it('a bad value in .env is named like any other', () => {
    const dir = tempDir();
    const file = join(dir, '.env');
    writeFileSync(file, `PORT=eighty\nSECRET_KEY=${GOOD_KEY}\n`);
    expect(configError(readEnvironment(file, {})).message).toMatch(/^\s*PORT: /m);
  });

  it('works without a .env file', () => {
    const source = readEnvironment(join(tempDir(), 'missing.env'), { PORT: '8100' });
    expect(source).toEqual({ PORT: '8100' });
  });
});

describe('the local SECRET_KEY', () => {
  it('is generated once per data dir, kept with mode 0600 and reused', () => {
    const dataDir = join(tempDir(), 'nested', 'data');
    const first = loadSettings({ DATA_DIR: dataDir });
    expect(first.SECRET_KEY.length).toBeGreaterThanOrEqual(32);

    const file = join(dataDir, '.secret_key');
    expect(readFileSync(file, 'utf8').trim()).toBe(first.SECRET_KEY);
    expect(statSync(file).mode & 0o777).toBe(0o600);

    const second = loadSettings({ DATA_DIR: dataDir });
    expect(second.SECRET_KEY).toBe(first.SECRET_KEY);

    const elsewhere = loadSettings({ DATA_DIR: tempDir() });
    expect(elsewhere.SECRET_KEY).not.toBe(first.SECRET_KEY);
  });

  it('is not generated when SECRET_KEY is given', () => {
    const dataDir = tempDir();
    expect(loadSettings({ DATA_DIR: dataDir, SECRET_KEY: GOOD_KEY }).SECRET_KEY).toBe(GOOD_KEY);
    expect(() => statSync(join(dataDir, '.secret_key'))).toThrow();
  });
});

describe('an empty value means the default, for every setting', () => {
  it('PORT=, SHUTDOWN_TIMEOUT_MS= and every other setting left empty give the defaults', () => {
    const empty = Object.fromEntries(Object.keys(SettingsSchema.shape).map((name) => [name, '']));
    const settings = loadSettings({ ...empty, SECRET_KEY: GOOD_KEY, DATA_DIR: tempDir() });
    const defaults = loadSettings({ SECRET_KEY: GOOD_KEY, DATA_DIR: settings.DATA_DIR });
    expect(settings).toEqual(defaults);
    expect(settings.PORT).toBe(8000);
    expect(settings.SHUTDOWN_TIMEOUT_MS).toBe(10_000);
    expect(settings.SMTP_TLS).toBe(true);
    expect(settings.REDIS_KEY_PREFIX).toBe('keel:');
  });

  it('one bad setting is one line naming it', () => {
    const error = configError({ SECRET_KEY: GOOD_KEY, DATABASE_URL: 'mysql://root@localhost/keel' });
    expect(error.message).not.toContain('\n');
    expect(error.message).toMatch(/^DATABASE_URL: must be a postgres:\/\/ or postgresql:\/\/ URL/);
  });
});

describe('the local .secret_key file', () => {
  it('is refused when shorter than 32 characters, naming the file', () => {
    const dataDir = tempDir();
    writeFileSync(join(dataDir, '.secret_key'), 'too-short\n');
    const error = configError({ DATA_DIR: dataDir });
    expect(error.message).toMatch(/^SECRET_KEY: /);
    expect(error.message).toContain(join(dataDir, '.secret_key'));
    expect(error.message).toMatch(/9 characters, at least 32/);
  });

  it('a data directory where none can be made is named as DATA_DIR, in one line', () => {
    const file = join(tempDir(), 'a-file');
    writeFileSync(file, 'not a directory');
    const error = configError({ DATA_DIR: file });
    expect(error.message).toMatch(/^DATA_DIR: /);
    expect(error.message).not.toContain('\n');
  });
});

describe('EMAIL_BACKEND', () => {
  it('console turns email on in local without SMTP', () => {
    const settings = loadSettings({ SECRET_KEY: GOOD_KEY, EMAIL_BACKEND: 'console' });
    expect(settings.EMAIL_BACKEND).toBe('console');
    expect(settings.emailsEnabled).toBe(true);
  });

  it.each(['staging', 'production'])('console is refused when ENVIRONMENT=%s', (environment) => {
    const error = configError({ ENVIRONMENT: environment, SECRET_KEY: GOOD_KEY, FIRST_SUPERUSER_PASSWORD: 'a-real-password', EMAIL_BACKEND: 'console' });
    expect(error.message).toMatch(/^EMAIL_BACKEND: /);
  });

  it('defaults to smtp, off without SMTP_HOST', () => {
    expect(loadSettings({ SECRET_KEY: GOOD_KEY })).toMatchObject({ EMAIL_BACKEND: 'smtp', emailsEnabled: false });
  });
});

describe('envFileWarnings', () => {
  it('names the .env entries that are not settings, suggesting the closest one', () => {
    const file = join(tempDir(), '.env');
    writeFileSync(file, ['DATABSE_URL=postgres://x@y/z', 'PROT=9000', 'PORT=8001', 'KEEL_SUPERUSER_PASSWORD=fine-here', 'ZZZ_SOMETHING=1', ''].join('\n'));
    const warnings = envFileWarnings(file);
    expect(warnings).toHaveLength(3);
    expect(warnings[0]).toMatch(/DATABSE_URL is not a Keel setting.*did you mean DATABASE_URL\?/);
    expect(warnings[1]).toMatch(/PROT is not a Keel setting.*did you mean PORT\?/);
    expect(warnings[2]).toMatch(/ZZZ_SOMETHING is not a Keel setting and is ignored$/);
    for (const warning of warnings) expect(warning.startsWith(`${file}: `)).toBe(true);
  });

  it('is silent for a .env of settings only, and without a .env', () => {
    const file = join(tempDir(), '.env');
    writeFileSync(file, `PORT=8001\nSECRET_KEY=${GOOD_KEY}\n`);
    expect(envFileWarnings(file)).toEqual([]);
    expect(envFileWarnings(join(tempDir(), 'missing.env'))).toEqual([]);
  });
});
