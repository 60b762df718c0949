/**
 * Keel as its own model provider: a provider record whose base_url is this deployment's /v1 (with
 * one of its API keys) made one call recurse without bound, each nested request a new call of the
 * same model. So every request Keel sends a provider (chat, stream, embeddings; the SDK's paths and
 * the wire) carries HOP_HEADER with this deployment's mark (providers.ts), and a request that comes
 * in carrying it is refused before authentication, metering or a model call (app.ts).
 */
import { createHmac } from 'node:crypto';

/** Reserved with every `x-keel-` name: a provider record cannot set it (schemas/provider.ts). */
export const HOP_HEADER = 'x-keel-hop';

/** The OpenAI error code of that refusal (UpstreamLoopError), by which the Keel that sent the request knows it. */
export const UPSTREAM_LOOP_CODE = 'upstream_loop';

/**
 * This deployment's mark: an HMAC of a constant under SECRET_KEY, which every node of a deployment
 * shares (a request through the load balancer to another node is the same loop) and another
 * deployment does not (one Keel may use another as its provider). It goes to every provider, so it
 * is a digest, truncated (128 bits), that says nothing of the key.
 */
export function hopMark(secretKey: string): string {
  return createHmac('sha256', secretKey).update('keel provider request hop').digest('base64url').slice(0, 22);
}

/** Whether a request's HOP_HEADER holds `mark`: Node joins a repeated header's values with commas, as a proxy may. */
export function carriesHop(value: string | string[] | undefined, mark: string): boolean {
  if (value === undefined) return false;
  return (Array.isArray(value) ? value : [value]).some((joined) => joined.split(',').some((one) => one.trim() === mark));
}
