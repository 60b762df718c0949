import { z } from 'zod';

import { Id, Timestamp } from './common.js';

/** `expired`: an active key past its `expires_at` (shown, not stored: it no longer authenticates). */
export const ApiKeyStatus = z.enum(['active', 'revoked', 'expired']);

export const ApiKeyCreate = z
  .strictObject({
    name: z.string().trim().min(1).max(255),
    project_id: Id.nullable().optional(),
    expires_at: Timestamp.nullable().optional(),
  })
  .meta({ id: 'ApiKeyCreate' });
export type ApiKeyCreate = z.infer<typeof ApiKeyCreate>;

export const ApiKeyUpdate = z
  .strictObject({
    name: z.string().trim().min(1).max(255).optional(),
    // Revocation is final: a revoked key cannot be made active again.
    status: z.literal('revoked').optional(),
  })
  .meta({ id: 'ApiKeyUpdate' });
export type ApiKeyUpdate = z.infer<typeof ApiKeyUpdate>;

export const ApiKeyPublic = z
  .object({
    id: Id,
    name: z.string(),
    prefix: z.string(),
    project_id: Id.nullable(),
    status: ApiKeyStatus,
    expires_at: Timestamp.nullable(),
    last_used_at: Timestamp.nullable(),
    created_at: Timestamp,
    updated_at: Timestamp,
  })
  .meta({ id: 'ApiKeyPublic' });

/** The creation answer: the only time the secret is shown. */
export const ApiKeyCreated = ApiKeyPublic.extend({ key: z.string() }).meta({ id: 'ApiKeyCreated' });
