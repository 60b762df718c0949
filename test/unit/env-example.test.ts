import { readFileSync } from 'node:fs';
import { parseEnv } from 'node:util';

import { describe, expect, it } from 'vitest';

import { loadSettings, SettingsSchema } from '../../src/core/config.js';

const example = parseEnv(readFileSync(new URL('../../.env.example', import.meta.url), 'utf8'));
const readme = readFileSync(new URL('../../README.md', import.meta.url), 'utf8');

describe('.env.example', () => {
  it('documents every setting and nothing else', () => {
    expect(Object.keys(example).sort()).toEqual(Object.keys(SettingsSchema.shape).sort());
  });

  it('is a valid configuration as it stands (copying it to .env must just work)', () => {
    const settings = loadSettings({ ...example, DATA_DIR: '/tmp/keel-env-example' });
    expect(settings.PORT).toBe(8000);
    expect(settings.DATABASE_URL).toBeUndefined();
    expect(settings.emailsEnabled).toBe(false);
  });

  it("every setting has a row in the README's configuration table", () => {
    const table = readme.slice(readme.indexOf('## Configuration'), readme.indexOf('## API conventions'));
    const named = new Set([...table.matchAll(/^\| (.+?) \|/gm)].flatMap(([, cell]) => [...cell!.matchAll(/`([A-Z][A-Z0-9_]+)`/g)].map(([, name]) => name)));
    expect(Object.keys(SettingsSchema.shape).filter((name) => !named.has(name))).toEqual([]);
  });
});
