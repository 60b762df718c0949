import { type Db, deadlockRetried } from '../core/db.js';
import { UnprocessableError } from '../core/errors.js';
import { generateApiKey } from '../core/security.js';

import type { ApiKey } from '../models/index.js';

import type { ApiKeyCreate, ApiKeyUpdate } from '../schemas/api-key.js';

import { apiKeyCrud, apiKeyPolicy, countActiveByOwner, countKeptByOwner } from '../crud/api-key.js';
import { lockBillingRows } from '../crud/billing.js';
import type { Page } from '../crud/page.js';
import { requireOwnProject } from '../crud/project.js';
import { forbidApiKey } from '../utils/authentication.js';
import type { ServiceContext } from './context.js';
import { createWithinLimit } from './limits.js';
import { formatMoney } from './money.js';
import * as runService from './run-service.js';

export type ApiKeyView = Omit<ApiKey, 'status'> & { status: ApiKey['status'] | 'expired' };

/** The key as clients see it: an active key past its expiry shows `expired` (it no longer works); money as plain decimals. */
export function present(key: ApiKey, now = Date.now()): ApiKeyView {
  const expired = key.status === 'active' && key.expires_at !== null && key.expires_at.getTime() <= now;
  const money = { max_budget: key.max_budget === null ? null : formatMoney(key.max_budget), spent: formatMoney(key.spent) };
  return { ...key, ...money, status: expired ? 'expired' : key.status };
}

export async function get(ctx: ServiceContext, id: string): Promise<ApiKeyView> {
  return present(await apiKeyCrud.getVisible(ctx.db, ctx.principal, id));
}

export async function list(ctx: ServiceContext, page: Page) {
  const { data, count } = await apiKeyCrud.list(ctx.db, ctx.principal, page);
  const now = Date.now();
  return { data: data.map((key) => present(key, now)), count };
}

/** Creating, changing and deleting keys needs a signed-in user (403 for an API key: `forbidApiKey`). */
const MANAGE_KEYS = 'create, change or delete API keys';

export async function create(ctx: ServiceContext, input: ApiKeyCreate): Promise<ApiKeyView & { key: string }> {
  const { principal, settings } = ctx;
  forbidApiKey(principal, MANAGE_KEYS);
  apiKeyPolicy.checkCreate(principal, input.project_id ?? null);
  const ownerId = principal.user.id;
  // Keys are personal: only a project of the caller's own, even for a superuser.
  if (input.project_id) await requireOwnProject(ctx.db, ownerId, input.project_id);
  if (input.expires_at && input.expires_at.getTime() <= Date.now()) {
    throw new UnprocessableError({ loc: ['body', 'expires_at'], msg: 'expires_at must be in the future', type: 'value_error' });
  }
  const secret = generateApiKey();
  const working = { what: 'API key', max: settings.MAX_API_KEYS_PER_USER, count: (tx: Db) => countActiveByOwner(tx, ownerId) };
  // Revoking or letting a key expire frees its place among the working keys (a rotation at the limit
  // works), but its row stays (its usage and spend stay attributed, its status shown): all of them
  // are bounded too, and deleting the ones no longer needed makes room.
  const maxKept = settings.MAX_API_KEYS_KEPT_PER_USER;
  const kept = {
    what: 'API key',
    max: maxKept,
    count: (tx: Db) => countKeptByOwner(tx, ownerId, maxKept),
    detail: `API key limit reached (${maxKept} kept per user, revoked and expired keys included): delete keys you no longer use (DELETE /api-keys/{id})`,
  };
  const created = await createWithinLimit(ctx.db, ownerId, [working, kept], (tx) =>
    apiKeyCrud.create(tx, {
      owner_id: ownerId,
      project_id: input.project_id ?? null,
      name: input.name,
      expires_at: input.expires_at ?? null,
      max_budget: input.max_budget ?? null,
      rpm: input.rpm ?? null,
      prefix: secret.prefix,
      key_hash: secret.hash,
    }),
  );
  ctx.log.info({ apiKeyId: created.id, projectId: created.project_id }, 'api key created');
  return { ...present(created), key: secret.key };
}

export async function update(ctx: ServiceContext, id: string, input: ApiKeyUpdate): Promise<ApiKeyView> {
  forbidApiKey(ctx.principal, MANAGE_KEYS);
  // The key cache forgets the key (here at once, other nodes by NOTIFY): the next request sees its new limits.
  const key = await apiKeyCrud.update(ctx.db, ctx.principal, id, input);
  // A revoked key's work stops with it: a leaked key's runs must not go on spending.
  if (input.status === 'revoked') await runService.cancelActiveOf(ctx.runs, { api_key_id: id }, 'API key revoked');
  return present(key);
}

export async function remove(ctx: ServiceContext, id: string): Promise<void> {
  forbidApiKey(ctx.principal, MANAGE_KEYS);
  // Revoked first (the ownership check, and no request through it starts a run from then on), so
  // that its runs are all found before the deletion clears their key.
  await apiKeyCrud.update(ctx.db, ctx.principal, id, { status: 'revoked' });
  await runService.cancelActiveOf(ctx.runs, { api_key_id: id }, 'API key deleted');
  await deadlockRetried(ctx.db, async (tx) => {
    // Its reservations first, as a settlement locks them before the key's row (see lockBillingRows).
    await lockBillingRows(tx, { apiKeyId: id });
    await apiKeyCrud.remove(tx, ctx.principal, id);
  });
}
