/** Helpers for tests that call /v1 through the official `openai` package. */
import OpenAI from 'openai';
import { expect } from 'vitest';

/**
 * The APIError a call (or the reading of a stream) rejects with. `seen` tells, when it does not,
 * what else would explain it (e.g. what the upstream received).
 */
export async function apiError(call: Promise<unknown>, seen?: () => unknown): Promise<InstanceType<typeof OpenAI.APIError>> {
  const error = await call.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(error, seen && JSON.stringify(seen())).toBeInstanceOf(OpenAI.APIError);
  return error as InstanceType<typeof OpenAI.APIError>;
}
