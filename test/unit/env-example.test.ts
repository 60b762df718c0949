import { readFileSync } from 'node:fs';
import { parseEnv } from 'node:util';

import { describe, expect, it } from 'vitest';

import { loadSettings, SettingsSchema } from '../../src/core/config.js';

const example = parseEnv(readFileSync(new URL('../../.env.example', import.meta.url), 'utf8'));

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
});
