/**
 * Keel as its own model provider: a provider record whose base_url is this deployment's /v1 (with
 * one of its API keys) made one call recurse without bound, each nested request a new call of the
 * same model. So every request Keel sends a provider (chat, stream, embeddings; the SDK's paths and
 * the wire) carries HOP_HEADER with this deployment's mark (providers.ts), and a request that comes
 * in carrying it is refused before authentication, metering or a model call (app.ts).
 *
 * Two deployments that are each other's provider loop the same way, each request carrying only the
 * other's mark. So a /v1 call sends on the marks its request came with before its own (`hops`):
 * A's request reaches B with A's mark, B's reaches A with both, and A refuses it. A chain of
 * MAX_HOPS marks is refused too, whoever is in it: a longer loop, or one through something that
 * drops the header, ends there.
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

/** The most marks a request may carry (its own included, were it sent on): a deeper chain is refused as a loop. */
export const MAX_HOPS = 8;

/** What a mark looks like (hopMark's are 22 characters): anything else in the header is not sent on. */
const MARK = /^[\w-]{1,64}$/;

/**
 * The marks a request's HOP_HEADER holds, each once, in order (undefined: none); Node joins a
 * repeated header's values with commas, as a proxy may. `loop`: `self` when it holds `own` alone
 * (a provider record points at this deployment), `chain` when it holds `own` among others or
 * MAX_HOPS marks.
 */
export function hopsOf(value: string | string[] | undefined, own: string): { hops: string[]; loop?: 'self' | 'chain' } | undefined {
  if (value === undefined) return undefined;
  const hops: string[] = [];
  let ownSeen = false;
  scan: for (const joined of Array.isArray(value) ? value : [value]) {
    for (const part of joined.split(',')) {
      const mark = part.trim();
      if (mark === own) ownSeen = true;
      else if (MARK.test(mark) && !hops.includes(mark)) hops.push(mark);
      if (hops.length + (ownSeen ? 1 : 0) >= MAX_HOPS) break scan;
    }
  }
  if (ownSeen) return { hops, loop: hops.length ? 'chain' : 'self' };
  if (!hops.length) return undefined;
  return hops.length >= MAX_HOPS ? { hops, loop: 'chain' } : { hops };
}
