/**
 * Review: PATCH /users/me/password checks `current_password` with no rate limit, so whoever holds
 * an access token (a stolen one) can guess the account's password there at full speed, while
 * POST /login/access-token refuses the same guesses after RATE_LIMIT_LOGIN_PER_ACCOUNT failures.
 * Expected: wrong current passwords are limited as login failures are (429 with Retry-After).
 */
import { expect, it } from 'vitest';

import { useTestApp } from '../helpers/app.js';
import { createUser, loginStatus } from '../helpers/factories.js';
import { call } from '../helpers/http.js';

const ctx = useTestApp({ RATE_LIMIT_LOGIN_PER_IP: '5', RATE_LIMIT_LOGIN_PER_ACCOUNT: '5', RATE_LIMIT_LOGIN_ACCOUNT_CEILING: '5' });

it('wrong current passwords on PATCH /users/me/password are rate limited like failed logins', async () => {
  const user = await createUser(ctx.app, { password: 'the-real-password' });
  const logins: number[] = [];
  for (let i = 0; i < 8; i++) logins.push(await loginStatus(ctx.app, user.email, `guess-${i}-password`));
  expect(logins.slice(5)).toEqual([429, 429, 429]); // login: limited after 5 failures

  const guesses: number[] = [];
  for (let i = 0; i < 20; i++) {
    const response = await call(ctx.app, 'PATCH', '/users/me/password', user.headers, { current_password: `guess-${i}-password`, new_password: 'another-password' });
    guesses.push(response.statusCode);
  }
  console.log('PATCH /users/me/password with wrong current passwords:', guesses.join(','));
  expect(guesses).toContain(429);
});
