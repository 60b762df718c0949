import { describe, expect, it } from 'vitest';

import { pgConnectionString, sslModeWarning } from '../../src/core/pg-sslmode.js';

describe('DATABASE_URL sslmode as node-postgres reads it', () => {
  it.each(['prefer', 'require', 'verify-ca'])('sslmode=%s is handed over as the verify-full it means, the rest of the URL as given, with one warning', (mode) => {
    const url = `postgres://keel:p%40ss%2Fword@db.example:5433/keel?application_name=x&sslmode=${mode}&connect_timeout=5`;
    expect(pgConnectionString(url)).toBe('postgres://keel:p%40ss%2Fword@db.example:5433/keel?application_name=x&sslmode=verify-full&connect_timeout=5');
    const warning = sslModeWarning(url);
    expect(warning).toMatch(new RegExp(`^DATABASE_URL: sslmode=${mode} is taken as verify-full by node-postgres`));
    expect(warning).not.toContain('p%40ss');
  });

  it.each([
    'postgres://keel@db.example/keel',
    'postgres://keel@db.example/keel?sslmode=verify-full',
    'postgres://keel@db.example/keel?sslmode=disable',
    'postgres://keel@db.example/keel?sslmode=no-verify',
    'postgres://keel@db.example/keel?ssl=true',
    // libpq's meaning asked for: node-postgres does not warn, and require must stay require.
    'postgres://keel@db.example/keel?sslmode=require&uselibpqcompat=true',
  ])('%s is left as it is, without a warning', (url) => {
    expect(pgConnectionString(url)).toBe(url);
    expect(sslModeWarning(url)).toBeNull();
  });

  it('rewrites the query alone: a password that holds `&sslmode=` (legal before the @) stays as given', () => {
    const url = 'postgres://u:a&sslmode=x@db.example/keel?sslmode=require';
    expect(pgConnectionString(url)).toBe('postgres://u:a&sslmode=x@db.example/keel?sslmode=verify-full');
    expect(decodeURIComponent(new URL(pgConnectionString(url)).password)).toBe('a&sslmode=x');
  });

  it('no DATABASE_URL: no warning', () => {
    expect(sslModeWarning(undefined)).toBeNull();
  });
});
