/** Helpers for tests that call /v1 through the official `openai` package. */
import OpenAI from 'openai';
import { expect } from 'vitest';

/** The APIError a call (or the reading of a stream) rejects with. */
export async function apiError(call: Promise<unknown>): Promise<InstanceType<typeof OpenAI.APIError>> {
  const error = await call.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(error).toBeInstanceOf(OpenAI.APIError);
  return error as InstanceType<typeof OpenAI.APIError>;
}
