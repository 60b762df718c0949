import { z } from 'zod';

import { PositiveMoneyInput } from './billing.js';
import { Id, Text, Timestamp } from './common.js';

/** `expired`: an active key past its `expires_at` (shown, not stored: it no longer authenticates). */
export const ApiKeyStatus = z.enum(['active', 'revoked', 'expired']);

/** Per-key limits, as gateways offer them; null removes one. */
const limits = {
  max_budget: PositiveMoneyInput.nullable()
    .optional()
    .meta({ description: 'Spend cap in credits (decimal string) over every metered call made with the key: past it, calls answer 402. null: none' }),
  rpm: z.number().int().min(1).max(1_000_000).nullable().optional().meta({ description: 'Model calls per minute with the key: past it, calls answer 429 with Retry-After. null: no limit' }),
};

export const ApiKeyCreate = z
  .strictObject({
    name: Text.trim().min(1).max(255),
    project_id: Id.nullable().optional(),
    expires_at: Timestamp.nullable().optional(),
    ...limits,
  })
  .meta({ id: 'ApiKeyCreate' });
export type ApiKeyCreate = z.infer<typeof ApiKeyCreate>;

export const ApiKeyUpdate = z
  .strictObject({
    name: Text.trim().min(1).max(255).optional(),
    // Revocation is final: a revoked key cannot be made active again.
    status: z.literal('revoked').optional(),
    ...limits,
  })
  .meta({ id: 'ApiKeyUpdate' });
export type ApiKeyUpdate = z.infer<typeof ApiKeyUpdate>;

export const ApiKeyPublic = z
  .object({
    id: Id,
    owner_id: Id.meta({ description: "The key's user: a superuser lists and manages every user's keys" }),
    name: z.string(),
    prefix: z.string(),
    project_id: Id.nullable(),
    status: ApiKeyStatus,
    expires_at: Timestamp.nullable(),
    last_used_at: Timestamp.nullable(),
    max_budget: z.string().nullable().meta({ description: 'Spend cap in credits (decimal string); null: none' }),
    spent: z.string().meta({ description: 'Credits spent through the key (decimal string)' }),
    rpm: z.number().int().nullable().meta({ description: 'Model calls per minute; null: no limit' }),
    created_at: Timestamp,
    updated_at: Timestamp,
  })
  .meta({ id: 'ApiKeyPublic' });

/** The creation answer: the only time the secret is shown. */
export const ApiKeyCreated = ApiKeyPublic.extend({ key: z.string() }).meta({ id: 'ApiKeyCreated' });
