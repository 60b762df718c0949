import type { FastifyReply, FastifyRequest } from 'fastify';

import { ForbiddenError, UnauthorizedError } from '../core/errors.js';
import { hashApiKey, looksLikeApiKey } from '../core/security.js';

import type { User } from '../models/index.js';

import * as apiKeyCrud from '../crud/api-key.js';
import * as userCrud from '../crud/user.js';
import type { KeyLimits } from '../services/key-limits.js';
import { refuseScopedKey } from './access.js';

/** Who is calling: the user, and the project an API key is limited to (null: all the user's). */
export interface Principal {
  user: User;
  apiKeyId: string | null;
  /** The API key's spend cap and rate (null: an access token), for the model meter. */
  apiKeyLimits: KeyLimits | null;
  scopeProjectId: string | null;
}

const API_KEY_TOUCH_INTERVAL_MS = 60_000;

/** A request's credential, and whether its header takes API keys only (X-API-Key, SPEC §3). */
interface Credential {
  secret: string;
  apiKeyOnly: boolean;
}

/**
 * The credential of a request: a bearer token (JWT or API key), else an `X-API-Key` header. An
 * Authorization header without a bearer credential (empty, `Bearer` alone, another scheme such as a
 * proxy's `Basic`) names no credential of Keel's, so it does not hide an X-API-Key sent with it (it
 * did: the key's request was answered 401 as if it had none). A bearer credential is the one
 * checked, valid or not: a bad one is refused, never passed over for the other header.
 */
function credentialOf(request: FastifyRequest): Credential | null {
  const header = request.headers.authorization;
  if (header !== undefined) {
    const space = header.indexOf(' ');
    const token = space < 0 || header.slice(0, space).toLowerCase() !== 'bearer' ? '' : header.slice(space + 1).trim();
    if (token) return { secret: token, apiKeyOnly: false };
  }
  const apiKey = request.headers['x-api-key'];
  return typeof apiKey === 'string' && apiKey ? { secret: apiKey, apiKeyOnly: true } : null;
}

/** The key and its owner from the in-memory caches (exact: see cacheApiKeys and cacheUsers). */
async function principalFromApiKey(request: FastifyRequest, key: string): Promise<Principal | null> {
  const db = request.server.db;
  const apiKey = await apiKeyCrud.getByHashCached(db, hashApiKey(key));
  if (!apiKey) return null;
  const now = Date.now();
  if (apiKey.status !== 'active') return null;
  if (apiKey.expires_at !== null && apiKey.expires_at.getTime() <= now) return null;
  const owner = await userCrud.getByIdCached(db, apiKey.owner_id);
  if (!owner || !owner.is_active) return null;
  if (apiKey.last_used_at === null || now - apiKey.last_used_at.getTime() > API_KEY_TOUCH_INTERVAL_MS) {
    await apiKeyCrud.touchLastUsed(db, apiKey);
  }
  // The model meter enforces the key's limits on this request's calls without reading the row again.
  return { user: owner, apiKeyId: apiKey.id, apiKeyLimits: { max_budget: apiKey.max_budget, rpm: apiKey.rpm }, scopeProjectId: apiKey.project_id };
}

async function principalFromToken(request: FastifyRequest, token: string): Promise<Principal | null> {
  const claims = await request.server.tokens.verify(token, 'access');
  if (!claims) return null;
  const user = await userCrud.getByIdCached(request.server.db, claims.sub);
  // A password change or deactivation moves token_version on and so kills older tokens.
  if (!user || !user.is_active || user.token_version !== claims.ver) return null;
  return { user, apiKeyId: null, apiKeyLimits: null, scopeProjectId: null };
}

function principalOf(request: FastifyRequest, { secret, apiKeyOnly }: Credential): Promise<Principal | null> {
  // A JWT can never start with the key prefix (its first segment is base64url JSON, "eyJ").
  if (looksLikeApiKey(secret)) return principalFromApiKey(request, secret);
  // X-API-Key takes API keys only: an access token sent there is refused as any bad key is (the
  // same 401, which does not say it was a token), not read; it belongs in Authorization.
  return apiKeyOnly ? Promise.resolve(null) : principalFromToken(request, secret);
}

/** onRequest hook: the caller must be an active user (by access token or API key). */
export async function requireUser(request: FastifyRequest, _reply: FastifyReply): Promise<void> {
  const credential = credentialOf(request);
  if (credential === null) throw new UnauthorizedError('Not authenticated');
  const principal = await principalOf(request, credential);
  if (!principal) throw new UnauthorizedError();
  request.principal = principal;
}

/**
 * Whether the request's credential still authenticates the caller it did (its key not revoked,
 * deleted or expired, its token not outdated, its user active), through the same caches as every
 * request: what an answer that outlives its request's check (an event stream) asks now and then.
 */
export async function stillAuthenticated(request: FastifyRequest): Promise<boolean> {
  const credential = credentialOf(request);
  const now = credential === null ? null : await principalOf(request, credential);
  return now !== null && now.user.id === request.principal.user.id && now.apiKeyId === request.principal.apiKeyId;
}

/** The caller must be a superuser acting for the whole account (administration refuses scoped keys). */
export function ensureSuperuser(principal: Principal): void {
  refuseScopedKey(principal);
  if (!principal.user.is_superuser) throw new ForbiddenError("The user doesn't have enough privileges");
}

/** onRequest hook: the caller must be an active superuser, not through a project-scoped key. */
export async function requireSuperuser(request: FastifyRequest, reply: FastifyReply): Promise<void> {
  await requireUser(request, reply);
  ensureSuperuser(request.principal);
}

/** The signed-in account, to show it: not to a project-scoped key, whose project it is no resource of (403). */
export function ownAccount(principal: Principal): User {
  refuseScopedKey(principal);
  return principal.user;
}

/**
 * Through an API key, a superuser administers regular users only: creating a superuser, making one,
 * or changing, deactivating or deleting one needs a signed-in superuser. Otherwise a leaked key of
 * a superuser would be a way round forbidApiKey: it could set another superuser's password (or its
 * own account's, through /users/{id}), or create a superuser with a password of its choosing, and
 * sign in as it. `target` is the user changed (none for a creation); `makesSuperuser`, whether the
 * write sets `is_superuser: true`.
 */
export function forbidApiKeyOnSuperuser(principal: Principal, target: Pick<User, 'is_superuser'> | null, makesSuperuser: boolean): void {
  if (principal.apiKeyId !== null && (makesSuperuser || target?.is_superuser)) {
    throw new ForbiddenError('API keys cannot administer superusers; sign in instead');
  }
}

/**
 * The account's own credentials (email, password, the account itself, its API keys) change only
 * for a signed-in user: a leaked API key must not be enough to take the account over — nor to lift
 * its own limits, or mint keys that outlive its revocation. `what` names the change refused.
 */
export function forbidApiKey(principal: Principal, what = 'change the account'): void {
  refuseScopedKey(principal);
  if (principal.apiKeyId !== null) throw new ForbiddenError(`API keys cannot ${what}; sign in instead`);
}
