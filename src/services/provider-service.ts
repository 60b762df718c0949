import { randomUUID } from 'node:crypto';

import { transaction } from '../core/db.js';
import { ConflictError, NotFoundError, UnprocessableError, type ValidationIssue } from '../core/errors.js';

import type { ProviderRow } from '../models/index.js';

import { BASE_URL_NEEDED, type ProviderCreate, type ProviderPublic, type ProviderUpdate } from '../schemas/provider.js';

import * as overrideCrud from '../crud/model-override.js';
import type { Page } from '../crud/page.js';
import { lockByName, providerCrud } from '../crud/provider.js';
import { isBuiltinModel } from '../modules/ai-models/builtin-ids.js';
import { builtinProviderKey, type ModelManager } from '../modules/ai-models/index.js';
import { ensureSuperuser } from '../utils/authentication.js';
import { firstNames } from '../utils/text.js';
import type { ServiceContext } from './context.js';
import { openSecret, refreshModels, sealSecret } from './model-sync.js';

/** What a superuser sees of a record: whether it has a key and which headers, never their values. */
function toPublic(ctx: ServiceContext, row: ProviderRow): ProviderPublic {
  let headerNames: string[] = [];
  if (row.headers_sealed !== null) {
    try {
      headerNames = Object.keys(openSecret(ctx.settings.SECRET_KEY, row.id, 'headers', row.headers_sealed) as Record<string, string>);
    } catch {
      headerNames = []; // sealed under another SECRET_KEY: shown as none, to be set again
    }
  }
  const { id, name, kind, base_url, enabled, created_at, updated_at } = row;
  return { id, name, kind, base_url, enabled, created_at, updated_at, has_api_key: row.api_key_sealed !== null, header_names: headerNames };
}

/** The columns of a change: secrets sealed for this row, `null` clears them, absent leaves them. */
function sealed(ctx: ServiceContext, id: string, input: ProviderUpdate) {
  const { api_key, headers, ...plain } = input;
  const seal = (field: 'api_key' | 'headers', value: unknown) =>
    value === undefined ? undefined : value === null ? null : sealSecret(ctx.settings.SECRET_KEY, id, field, value);
  return { ...plain, api_key_sealed: seal('api_key', api_key), headers_sealed: seal('headers', headers) };
}

/**
 * What a change that moves a record's calls elsewhere (another base_url, or another kind: another
 * API, another default host) must give again: its stored key and headers, which would otherwise go
 * to the new host, there to be read by whoever changed it (any superuser, who never saw them).
 * Given again or given as null (dropped), they are the change's own. Refused rather than dropped:
 * a record left without its key would fail every call with nothing but `has_api_key: false` to say
 * why, and a mistaken PATCH would have lost a key no one can read back.
 */
function secretsToGiveAgain(current: ProviderRow, input: ProviderUpdate): ValidationIssue[] {
  const moved = (input.base_url !== undefined && input.base_url !== current.base_url) || (input.kind !== undefined && input.kind !== current.kind);
  if (!moved) return [];
  const stored = { api_key: current.api_key_sealed, headers: current.headers_sealed };
  return (['api_key', 'headers'] as const)
    .filter((field) => stored[field] !== null && input[field] === undefined)
    .map((field) => ({ loc: ['body', field], msg: `A change of base_url or kind does not keep the stored ${field} (it would go to the new host): send ${field} again in the same request, or null to drop it`, type: 'missing' }));
}

/** The `/providers` service: superusers only; every write reloads the app's model manager. */
export function providerService(models: ModelManager) {
  const reload = (ctx: ServiceContext) => refreshModels(models, ctx.db, ctx.settings, ctx.log);
  return {
    async list(ctx: ServiceContext, page: Page) {
      ensureSuperuser(ctx.principal);
      const { data, count } = await providerCrud.list(ctx.db, ctx.principal, page);
      return { data: data.map((row) => toPublic(ctx, row)), count };
    },

    async get(ctx: ServiceContext, id: string) {
      ensureSuperuser(ctx.principal);
      return toPublic(ctx, await providerCrud.getVisible(ctx.db, ctx.principal, id));
    },

    async create(ctx: ServiceContext, input: ProviderCreate) {
      ensureSuperuser(ctx.principal);
      const id = randomUUID();
      const { name, kind, ...change } = input;
      const row = await providerCrud.create(ctx.db, { ...sealed(ctx, id, change), id, name, kind, owner_id: ctx.principal.user.id });
      ctx.log.info({ provider: name, kind: row.kind }, 'Provider created');
      await reload(ctx);
      return toPublic(ctx, row);
    },

    async update(ctx: ServiceContext, id: string, input: ProviderUpdate) {
      ensureSuperuser(ctx.principal);
      const row = await transaction(ctx.db, async (tx) => {
        // What ProviderCreate refuses, checked on the record as a change of its kind or URL leaves it
        // (its models would all answer 503); other changes pass on a record left so before this check.
        const current = await providerCrud.lockVisible(tx, ctx.principal, id, 'write', 'update');
        const baseUrl = input.base_url === undefined ? current.base_url : input.base_url;
        if ((input.kind !== undefined || input.base_url !== undefined) && (input.kind ?? current.kind) === 'openai-compatible' && !baseUrl) {
          throw new UnprocessableError([{ loc: ['body', 'base_url'], msg: BASE_URL_NEEDED, type: 'value_error' }]);
        }
        const giveAgain = secretsToGiveAgain(current, input);
        if (giveAgain.length) throw new UnprocessableError(giveAgain);
        return providerCrud.update(tx, ctx.principal, id, sealed(ctx, id, input));
      });
      ctx.log.info({ provider: row.name, fields: Object.keys(input) }, 'Provider updated');
      await reload(ctx);
      return toPublic(ctx, row);
    },

    /**
     * 409 while models name it (custom models, built-in ones moved to it): they would answer 503
     * from then on, as its name cannot be changed for them to follow. A record named like a built-in
     * provider (`openai`...) leaves that provider, its credentials from the settings again: its
     * built-in models go home, and custom ones stay only when that is the same kind of provider with
     * a key set (a record `openai` of kind openai-compatible sent them to a local server: deleted,
     * their prompts would have gone to api.openai.com).
     */
    async remove(ctx: ServiceContext, id: string) {
      ensureSuperuser(ctx.principal);
      await transaction(ctx.db, async (tx) => {
        const visible = await providerCrud.getVisible(tx, ctx.principal, id);
        // Locked first: a model write naming it (which shares the lock) has committed, or waits and then finds it gone.
        const row = await lockByName(tx, visible.name, 'update');
        if (!row) throw new NotFoundError('Provider not found');
        const settingsKey = builtinProviderKey(row.name);
        const sameInSettings = settingsKey !== undefined && row.kind === row.name && Boolean(ctx.settings[settingsKey]);
        const used = sameInSettings ? [] : (await overrideCrud.modelIdsOfProvider(tx, row.name)).filter((model) => settingsKey === undefined || !isBuiltinModel(model));
        if (used.length) {
          throw new ConflictError(`Provider ${row.name} is used by ${used.length === 1 ? 'model' : 'models'} ${firstNames(used)}: delete them or move them to another provider first`);
        }
        await providerCrud.remove(tx, ctx.principal, id);
      });
      ctx.log.info({ provider_id: id }, 'Provider deleted');
      await reload(ctx);
    },
  };
}
