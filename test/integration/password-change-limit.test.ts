/**
 * PATCH /users/me/password checks `current_password`: a failed login by another door. Without a
 * limit, whoever holds an access token (a stolen one) could guess the account's password there at
 * full speed while login refuses the same guesses. Wrong current passwords count per account as
 * failed logins do (RATE_LIMIT_LOGIN_PER_ACCOUNT); a right one counts nothing (and ends every token, this one included).
 * PATCH /users/me checks it too (for a change of email), on the same counter: two doors give no more guesses than one.
 */
import { expect, it } from 'vitest';

import { useTestApp } from '../helpers/app.js';
import { bearer, createUser } from '../helpers/factories.js';
import { call, createKey } from '../helpers/http.js';

const ctx = useTestApp({ RATE_LIMIT_LOGIN_PER_ACCOUNT: '5', RATE_LIMIT_LOGIN_ACCOUNT_CEILING: '5' });

it('answers 429 with Retry-After after RATE_LIMIT_LOGIN_PER_ACCOUNT wrong current passwords, the right one included then, per account', async () => {
  const user = await createUser(ctx.app, { password: 'the-real-password' });
  const other = await createUser(ctx.app, { password: 'the-other-password' });
  const change = (who: typeof user, current: string) => call(ctx.app, 'PATCH', '/users/me/password', who.headers, { current_password: current, new_password: 'another-password' });
  const guesses: number[] = [];
  for (let i = 0; i < 7; i++) guesses.push((await change(user, `guess-${i}-password`)).statusCode);
  expect(guesses).toEqual([400, 400, 400, 400, 400, 429, 429]);
  const limited = await change(user, 'the-real-password');
  expect(limited.statusCode).toBe(429);
  expect(Number(limited.headers['retry-after'])).toBeGreaterThan(0);
  // Another account is not held by it.
  expect((await change(other, 'wrong-password-here')).statusCode).toBe(400);
});

it('counts wrong current passwords of PATCH /users/me (a change of email) on the same counter, and nothing for other updates', async () => {
  const user = await createUser(ctx.app, { password: 'the-real-password' });
  const moveEmail = (current: string) => call(ctx.app, 'PATCH', '/users/me', user.headers, { email: 'elsewhere@keel.test', current_password: current });
  const changePassword = (current: string) => call(ctx.app, 'PATCH', '/users/me/password', user.headers, { current_password: current, new_password: 'another-password' });
  // Updates that check no password count nothing, however many.
  for (let i = 0; i < 7; i++) expect((await call(ctx.app, 'PATCH', '/users/me', user.headers, { full_name: `Name ${i}` })).statusCode).toBe(200);
  const guesses: number[] = [];
  for (let i = 0; i < 3; i++) guesses.push((await moveEmail(`guess-${i}-password`)).statusCode);
  for (let i = 3; i < 5; i++) guesses.push((await changePassword(`guess-${i}-password`)).statusCode);
  guesses.push((await moveEmail('guess-5-password')).statusCode, (await changePassword('guess-6-password')).statusCode);
  expect(guesses).toEqual([400, 400, 400, 400, 400, 429, 429]);
  const limited = await moveEmail('the-real-password');
  expect(limited.statusCode).toBe(429);
  expect(Number(limited.headers['retry-after'])).toBeGreaterThan(0);
});

it("counts nothing for an API key, which is refused before any check: a leaked key cannot spend its owner's tries", async () => {
  const user = await createUser(ctx.app, { password: 'the-real-password' });
  const { key } = await createKey(ctx.app, user, { name: 'leaked' });
  for (let i = 0; i < 7; i++) {
    expect((await call(ctx.app, 'PATCH', '/users/me/password', bearer(key), { current_password: `guess-${i}-password`, new_password: 'another-password' })).statusCode).toBe(403);
    expect((await call(ctx.app, 'PATCH', '/users/me', bearer(key), { email: 'thief@keel.test', current_password: `guess-${i}-password` })).statusCode).toBe(403);
  }
  // The owner still has every try.
  expect((await call(ctx.app, 'PATCH', '/users/me/password', user.headers, { current_password: 'a-wrong-password', new_password: 'another-password' })).statusCode).toBe(400);
  expect((await call(ctx.app, 'PATCH', '/users/me', user.headers, { email: 'moved@keel.test', current_password: 'the-real-password' })).statusCode).toBe(200);
});

it('counts only wrong current passwords: a 422 before the check or a 409 after a right one spends no try', async () => {
  const user = await createUser(ctx.app, { password: 'the-real-password' });
  const taken = await createUser(ctx.app, { password: 'the-other-password' });
  for (let i = 0; i < 7; i++) {
    // An older client's email change without the password, a malformed one, a too-short new password, an email taken.
    expect((await call(ctx.app, 'PATCH', '/users/me', user.headers, { email: `moved-${i}@keel.test` })).statusCode).toBe(422);
    expect((await call(ctx.app, 'PATCH', '/users/me', user.headers, { email: 'not-an-email', current_password: 'the-real-password' })).statusCode).toBe(422);
    expect((await call(ctx.app, 'PATCH', '/users/me/password', user.headers, { current_password: 'the-real-password', new_password: 'x' })).statusCode).toBe(422);
    expect((await call(ctx.app, 'PATCH', '/users/me', user.headers, { email: taken.email, current_password: 'the-real-password' })).statusCode).toBe(409);
  }
  // Every try is still there: five wrong ones, then the limit.
  const guesses: number[] = [];
  for (let i = 0; i < 6; i++) guesses.push((await call(ctx.app, 'PATCH', '/users/me/password', user.headers, { current_password: `guess-${i}-password`, new_password: 'another-password' })).statusCode);
  expect(guesses).toEqual([400, 400, 400, 400, 400, 429]);
});
