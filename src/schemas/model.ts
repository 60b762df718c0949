import { z } from 'zod';

import { isBuiltinModel } from '../modules/ai-models/builtin-ids.js';
import { CAPABILITIES } from '../modules/ai-models/types.js';
import { booleanParam, Pagination } from './common.js';
import { AGENT_MODEL_PREFIX } from './openai.js';

/** A price per million tokens: a decimal string (never a binary float), up to 12 decimal places. */
const Price = z.string().regex(/^\d{1,9}(\.\d{1,12})?$/, { error: 'A price is a decimal string such as "2.5", up to 12 decimal places' });

/**
 * A model id as the provider knows it (`gpt-4.1`, `llama3.2:3b`, `meta-llama/llama-3-70b`): no
 * spaces, nor characters no provider's id holds that would show one name and be another (control
 * and format characters: a right-to-left override, a zero-width space; half of a surrogate pair).
 */
export const ModelId = z
  .string()
  .trim()
  .min(1)
  .max(200)
  .regex(/^[^\s\p{Cc}\p{Cf}\p{Cs}]+$/u, { error: 'A model id has no spaces, control or invisible formatting characters' })
  // `agent:` names a Keel agent on /v1: such a model could not be called here (the name is this
  // deployment's agents'), and sent to another Keel it would start that deployment's agent run, whose
  // own model calls do not carry the request's hop marks (core/hop.ts): two deployments whose
  // catalogs named each other's agents looped without end.
  .refine((id) => !id.startsWith(AGENT_MODEL_PREFIX), { error: `A model id cannot begin with "${AGENT_MODEL_PREFIX}": that names a Keel agent` });

export const ModelPricingInput = z
  .strictObject({
    input_cost_per_million_tokens: Price,
    output_cost_per_million_tokens: Price,
    cached_input_cost_per_million_tokens: Price.optional(),
    cache_write_cost_per_million_tokens: Price.optional(),
    reasoning_cost_per_million_tokens: Price.optional(),
  })
  .meta({ id: 'ModelPricingInput' });

const ModelFields = {
  /** One line of text: no control characters (a line break in a listing, a NUL the database refuses). */
  name: z.string().trim().min(1).max(200).regex(/^[^\p{Cc}\p{Cs}]*$/u, { error: 'A name has no control characters' }),
  /** `openai`, `anthropic`, `google` or a provider record's name. */
  provider: z.string().min(1).max(64),
  aliases: z.array(ModelId).max(20).describe('Other names a call may give the model, each once: neither its own id nor another model\'s id or alias (422).'),
  context_window: z.number().int().positive().max(100_000_000).nullable(),
  /** The model's own output limit: calls without a maximum send no more than it. */
  max_output_tokens: z.number().int().positive().max(10_000_000).nullable(),
  capabilities: z.array(z.enum(CAPABILITIES)).min(1).max(CAPABILITIES.length),
  pricing: ModelPricingInput,
  enabled: z.boolean(),
  recommended: z.boolean(),
  priority: z.number().int().min(-1000).max(1000),
  fallbacks: z.array(ModelId).max(10),
};

/**
 * A built-in id creates an override of that model (every field optional); any other id a custom
 * model, which needs its `provider` and `pricing`.
 */
export const ModelCreate = z
  .strictObject({ id: ModelId, ...ModelFields })
  .partial()
  .required({ id: true })
  .superRefine((value, ctx) => {
    if (isBuiltinModel(value.id)) return;
    for (const field of ['provider', 'pricing'] as const) {
      if (value[field] === undefined) ctx.addIssue({ code: 'custom', path: [field], message: `A custom model needs ${field}` });
    }
  })
  .meta({ id: 'ModelCreate' });
export type ModelCreate = z.infer<typeof ModelCreate>;

export const ModelUpdate = z.strictObject(ModelFields).partial().meta({ id: 'ModelUpdate' });
export type ModelUpdate = z.infer<typeof ModelUpdate>;

/** Prices per million tokens as decimal strings: a model's, and each of its long-context tiers'. */
const FlatPricesPublic = {
  input_cost_per_million_tokens: z.string(),
  output_cost_per_million_tokens: z.string(),
  cached_input_cost_per_million_tokens: z.string().optional(),
  cache_write_cost_per_million_tokens: z.string().optional(),
  reasoning_cost_per_million_tokens: z.string().optional(),
};

export const ModelPublic = z
  .object({
    id: z.string(),
    name: z.string(),
    provider: z.string(),
    aliases: z.array(z.string()),
    context_window: z.number().int().nullable(),
    max_output_tokens: z.number().int().nullable(),
    capabilities: z.array(z.enum(CAPABILITIES)),
    pricing: z.object({
      ...FlatPricesPublic,
      tiers: z
        .array(z.object({ above_input_tokens: z.number().int(), ...FlatPricesPublic }))
        .readonly()
        .optional()
        .describe(
          "Long-context prices, ascending: a call whose input tokens exceed a tier's `above_input_tokens` is priced whole at that tier's prices (the provider's rule). Absent when the model has one price; a superuser's `pricing` replaces them.",
        ),
    }),
    enabled: z.boolean(),
    recommended: z.boolean(),
    priority: z.number().int(),
    fallbacks: z.array(z.string()),
    /** Whether its provider has what a call needs (credentials, base URL). */
    available: z.boolean(),
    /** Why not, naming the setting to fill in; null when available. */
    unavailable_reason: z.string().nullable(),
    /**
     * The fallbacks its calls skip as things stand (no such model, disabled, lacking what the model
     * does, a provider without credentials or disabled), each with why; empty when all can stand in.
     */
    unavailable_fallbacks: z
      .array(z.object({ name: z.string(), reason: z.string() }))
      .describe('The fallbacks its calls skip as things stand (no such model, disabled, lacking what the model does, a provider without credentials or disabled), each with why; empty when all can stand in.'),
    answered_by: z
      .string()
      .nullable()
      .describe(
        'The model its calls go to as things stand: itself when available, else its first fallback that can take them (its provider disabled or without credentials), else null (they fail with `unavailable_reason`; a disabled model is refused with 404).',
      ),
  })
  .meta({ id: 'ModelPublic' });

export const ModelIdParams = z.object({ model_id: z.string().min(1).max(200) });

/** `?include_disabled=&limit=&offset=`, paged as every list (SPEC §2: 1–100, default 20). */
export const ModelListQuery = Pagination.extend({ include_disabled: booleanParam(false) });
