import { describe, expect, it } from 'vitest';

import { type HttpError, PaymentRequiredError, ServiceUnavailableError, TooManyRequestsError } from '../../src/core/errors.js';

import { ModelCallAbortedError, ModelTimeoutError, ProviderUnavailableError, UpstreamError } from '../../src/modules/ai-models/index.js';
import { openAIErrorFrom, openAIErrorOf } from '../../src/services/openai-gateway.js';

/** What the /v1 surface answers for an error the app's handler mapped to `status` and `detail`. */
const answer = (error: HttpError) => openAIErrorFrom(error.statusCode, error.detail, error);

describe('OpenAI error objects', () => {
  it('answers credits with 402 insufficient_quota (the SDK does not retry it) and limits with 429 rate_limit_exceeded', () => {
    expect(answer(new PaymentRequiredError('Not enough credits: balance 0.10, this call may cost 0.50'))).toEqual({
      status: 402,
      body: { error: { message: 'Not enough credits: balance 0.10, this call may cost 0.50', type: 'insufficient_quota', param: null, code: 'insufficient_quota' } },
    });
    expect(answer(new TooManyRequestsError(3, 'API key rate limit of 60 requests per minute reached'))).toEqual({
      status: 429,
      body: { error: { message: 'API key rate limit of 60 requests per minute reached', type: 'requests', param: null, code: 'rate_limit_exceeded' } },
    });
  });

  it('tells the client\'s upstream refusals (400) from upstream failures (502) and timeouts (504)', () => {
    expect(answer(new UpstreamError('Upstream 400 error: bad schema', 400))).toMatchObject({ status: 400, body: { error: { type: 'invalid_request_error', code: 'upstream_rejected' } } });
    expect(answer(new UpstreamError('Upstream 401 error: bad key', 401))).toMatchObject({ status: 502, body: { error: { type: 'server_error', code: 'upstream_error' } } });
    expect(answer(new UpstreamError('Upstream connection error'))).toMatchObject({ status: 502 });
    expect(answer(new UpstreamError('Upstream 429 error: slow down', 429, 2_500))).toEqual({
      status: 429,
      body: { error: { message: 'The model provider refused the request (status 429)', type: 'requests', param: null, code: 'rate_limit_exceeded' } },
      headers: { 'retry-after': '3' },
    });
    expect(answer(new UpstreamError('Upstream 429 error: slow down', 429))).not.toHaveProperty('headers');
    expect(answer(new ModelTimeoutError(1000))).toMatchObject({ status: 504, body: { error: { type: 'server_error', code: 'timeout' } } });
    expect(answer(new ProviderUnavailableError('openai', 'OPENAI_API_KEY is not set', 'OPENAI_API_KEY'))).toMatchObject({
      status: 503,
      body: { error: { message: 'OPENAI_API_KEY is not set', code: 'provider_unavailable', param: 'model' } },
    });
    expect(answer(new ServiceUnavailableError())).toMatchObject({ status: 503, body: { error: { type: 'server_error' } } });
  });

  it('gives the provider\'s words only for refusals that are the request\'s fault; the diagnosis stays in the message', () => {
    const cases: [UpstreamError, string][] = [
      [new UpstreamError('Upstream 400 error: context too long', 400), 'Upstream 400 error: context too long'],
      [new UpstreamError('Upstream 413 error: body too big', 413), 'Upstream 413 error: body too big'],
      [new UpstreamError('Upstream 422 error: bad schema', 422), 'Upstream 422 error: bad schema'],
      [new UpstreamError('Upstream 401 error: Incorrect API key provided: sk-secr****1234', 401), 'The model provider refused the request (status 401)'],
      [new UpstreamError('Upstream 404 error: no model at http://10.0.0.7/v1', 404), 'The model provider refused the request (status 404)'],
      [new UpstreamError('Upstream 500 error: db at 10.0.0.9 down', 500), 'The model provider refused the request (status 500)'],
      [new UpstreamError('Upstream connection error: Cannot connect to API: connect ECONNREFUSED 127.0.0.1:1'), 'The model provider could not be reached'],
      [new UpstreamError('Upstream 200 error: Invalid JSON response: <html>proxy at 10.0.0.8</html>', 200), 'The model provider sent an answer that could not be read'],
    ];
    for (const [error, told] of cases) {
      expect(error.detail).toBe(told);
      expect(openAIErrorOf(error).body.error.message).toBe(told);
      expect(error.message).toMatch(/^Upstream/);
    }
  });

  it('gives validation issues as 400 with OpenAI\'s param path, and unknown errors as a bare 500', () => {
    const issues = [{ loc: ['body', 'messages', '3', 'content'], msg: 'Input should be a string', type: 'string_type' }];
    expect(openAIErrorFrom(422, issues, undefined)).toEqual({
      status: 400,
      body: { error: { message: 'Invalid value for messages[3].content: Input should be a string', type: 'invalid_request_error', param: 'messages[3].content', code: null } },
    });
    // An issue of the whole body that is not its shape (a value the database refused) says what it is.
    expect(openAIErrorFrom(422, [{ loc: ['body'], msg: 'Text contains a character that cannot be stored', type: 'value_error' }], undefined).body.error.message).toBe(
      'Invalid value for body: Text contains a character that cannot be stored',
    );
    expect(openAIErrorFrom(422, [{ loc: ['body'], msg: 'Input should be an object', type: 'object_type' }], undefined).body.error.message).toBe(
      "The request body must be a JSON object with the request's fields.",
    );
    expect(openAIErrorOf(new Error('secret internals'))).toEqual({ status: 500, body: { error: { message: 'Internal server error', type: 'server_error', param: null, code: null } } });
    expect(openAIErrorOf(new ModelCallAbortedError()).status).toBe(499);
  });
});
