import type { FastifyRequest } from 'fastify';
import type { FastifyPluginAsyncZod } from 'fastify-type-provider-zod';

import { authErrors, ErrorBody, listOf, Message, Pagination, ValidationError } from '../schemas/common.js';
import { UpdatePassword, UserCreate, UserIdParams, UserPublic, UserRegister, UserUpdate, UserUpdateMe } from '../schemas/user.js';

import * as userService from '../services/user-service.js';
import { ensureSuperuser, forbidApiKey, ownAccount, requireSuperuser, requireUser } from '../utils/authentication.js';
import { bodyField, byAccount, byIp, rateLimit, refundOnSuccess } from '../utils/rate-limit.js';

const tags = ['users'];

/** The per-account counter of wrong current passwords, shared by the routes that check one. */
const CURRENT_PASSWORD_LIMIT = 'password-change-account';

/**
 * Whose current password the request may check: the signed-in user's. An API key is refused (403)
 * before any check, so it counts nothing: a leaked key must not spend its owner's tries and lock
 * them out of changing their password or email.
 */
const passwordCheckOf = (request: FastifyRequest) => (request.principal.apiKeyId === null ? request.principal.user.id : null);

/** Whether a PATCH /users/me checks the current password: it carries one (a change of email without it is a 422, no guess). */
const checksPassword = (request: FastifyRequest) => bodyField(request, 'current_password') !== null;

/**
 * Only a wrong current password (400) keeps its hit on the counter: a 422 answered before the check
 * or a 409 (the email taken) after a right password is no guess, and must not lock the owner out.
 */
const WRONG_PASSWORD = { failuresOnly: true, failureStatus: 400 };

export const usersRouter: FastifyPluginAsyncZod = async (app) => {
  const { db, settings } = app;
  const userLocation = (id: string) => `${app.prefix}/users/${id}`;

  // ==================== Administration ====================

  app.get(
    '/users',
    {
      schema: {
        operationId: 'read_users',
        summary: 'Read Users',
        tags,
        querystring: Pagination,
        response: { 200: listOf(UserPublic), ...authErrors },
      },
      onRequest: requireSuperuser,
    },
    async (request) => userService.list(db, request.query),
  );

  app.post(
    '/users',
    {
      schema: {
        operationId: 'create_user',
        summary: 'Create User',
        description: 'Through an API key, only regular users are created: `is_superuser: true` needs a signed-in superuser (403).',
        tags,
        body: UserCreate,
        response: { 200: UserPublic, 409: ErrorBody, ...authErrors },
      },
      onRequest: requireSuperuser,
    },
    async (request, reply) => {
      const user = await userService.createByAdmin(db, settings, app.mailer, request.log, request.principal, request.body);
      return reply.header('location', userLocation(user.id)).send(user);
    },
  );

  // ==================== Own account ====================

  app.get(
    '/users/me',
    {
      schema: { operationId: 'read_user_me', summary: 'Read User Me', tags, response: { 200: UserPublic, ...authErrors } },
      onRequest: requireUser,
    },
    async (request) => ownAccount(request.principal),
  );

  app.patch(
    '/users/me',
    {
      schema: {
        operationId: 'update_user_me',
        summary: 'Update User Me',
        tags,
        description:
          'A change of `email` needs `current_password` (422 without it, 400 when wrong) and a signed-in user (403 for an API key, which may change `full_name` only; a project-scoped key nothing): a token alone does not move the account to another mailbox. Wrong current passwords count as on `PATCH /users/me/password`. A change of email signs the user out everywhere, as a password change does: every token issued before it stops working, this one included (sign in again with the new email); API keys go on working. Re-casing the email changes nothing of that.',
        body: UserUpdateMe,
        response: { 200: UserPublic, 400: ErrorBody, 409: ErrorBody, 429: ErrorBody, ...authErrors },
      },
      onRequest: requireUser,
      // The password check is the same door as the password change's: the same counter, so a token
      // holder gets RATE_LIMIT_LOGIN_PER_ACCOUNT guesses per window over both routes, not twice that.
      // A request without current_password checks nothing and counts nothing.
      preValidation: rateLimit(app, CURRENT_PASSWORD_LIMIT, settings.RATE_LIMIT_LOGIN_PER_ACCOUNT, (req) => (checksPassword(req) ? passwordCheckOf(req) : null), WRONG_PASSWORD),
      onSend: refundOnSuccess,
    },
    async (request) => {
      // The name is no credential: a program's key may change it (SPEC §3: every authenticated route
      // takes a key), as it reads the profile. The email, and the password that goes with its change, only a signed-in user.
      if (request.body.email !== undefined || request.body.current_password !== undefined) forbidApiKey(request.principal);
      return userService.updateMe(db, ownAccount(request.principal), request.body);
    },
  );

  app.patch(
    '/users/me/password',
    {
      schema: {
        operationId: 'update_password_me',
        summary: 'Update Password Me',
        description: 'Every token issued before the change stops working, this one included.',
        tags,
        body: UpdatePassword,
        response: { 200: Message, 400: ErrorBody, 429: ErrorBody, ...authErrors },
      },
      onRequest: requireUser,
      // A wrong current password is a failed login by another door: limited per account as login is
      // (RATE_LIMIT_LOGIN_PER_ACCOUNT), so a token holder cannot guess the password here at full speed.
      preValidation: rateLimit(app, CURRENT_PASSWORD_LIMIT, settings.RATE_LIMIT_LOGIN_PER_ACCOUNT, passwordCheckOf, WRONG_PASSWORD),
      onSend: refundOnSuccess,
    },
    async (request) => {
      forbidApiKey(request.principal);
      await userService.changePassword(db, request.principal.user, request.body.current_password, request.body.new_password);
      return { message: 'Password updated successfully' };
    },
  );

  app.delete(
    '/users/me',
    {
      schema: { operationId: 'delete_user_me', summary: 'Delete User Me', tags, response: { 200: Message, 409: ErrorBody, ...authErrors } },
      onRequest: requireUser,
    },
    async (request) => {
      forbidApiKey(request.principal);
      await userService.deleteMe(db, request.principal.user);
      return { message: 'User deleted successfully' };
    },
  );

  app.post(
    '/users/signup',
    {
      schema: {
        operationId: 'register_user',
        summary: 'Register User',
        tags,
        security: [],
        body: UserRegister,
        response: { 200: UserPublic, 403: ErrorBody, 409: ErrorBody, 422: ValidationError, 429: ErrorBody },
      },
      onRequest: rateLimit(app, 'signup-ip', settings.RATE_LIMIT_SIGNUP_PER_IP, byIp),
      preValidation: rateLimit(app, 'signup-account', settings.RATE_LIMIT_SIGNUP_PER_ACCOUNT, (req) => byAccount(bodyField(req, 'email'))),
    },
    async (request, reply) => {
      const user = await userService.signup(db, settings, request.body);
      return reply.header('location', userLocation(user.id)).send(user);
    },
  );

  // ==================== One user ====================

  app.get(
    '/users/:user_id',
    {
      schema: {
        operationId: 'read_user_by_id',
        summary: 'Read User By Id',
        tags,
        params: UserIdParams,
        response: { 200: UserPublic, 404: ErrorBody, ...authErrors },
      },
      onRequest: requireUser,
    },
    async (request) => {
      // A project-scoped key reaches no account resource (SPEC §3), its own user by id no more than /users/me.
      if (request.params.user_id === request.principal.user.id) return ownAccount(request.principal);
      ensureSuperuser(request.principal);
      return userService.getById(db, request.params.user_id);
    },
  );

  app.patch(
    '/users/:user_id',
    {
      schema: {
        operationId: 'update_user',
        summary: 'Update User',
        description:
          "`is_active: false` signs the user out everywhere (tokens and API keys stop authenticating) and cancels the user's queued and running runs. `is_active: true` again lets the user's API keys authenticate again (a suspension, not a revocation: revoke keys that may have leaked); the tokens issued before stay dead. A new `password`, or an `email` other than the current one but for its case, ends the user's sessions too (their API keys work on). Through an API key, superusers are not changed nor made (403): a leaked key must not be a way to set a superuser's password; sign in for that.",
        tags,
        params: UserIdParams,
        body: UserUpdate,
        response: { 200: UserPublic, 404: ErrorBody, 409: ErrorBody, ...authErrors },
      },
      onRequest: requireSuperuser,
    },
    async (request) => userService.updateByAdmin(db, app.runs, request.principal, request.params.user_id, request.body),
  );

  app.delete(
    '/users/:user_id',
    {
      schema: {
        operationId: 'delete_user',
        summary: 'Delete User',
        description: 'Through an API key, only regular users are deleted: a superuser needs a signed-in superuser (403).',
        tags,
        params: UserIdParams,
        response: { 200: Message, 404: ErrorBody, 409: ErrorBody, ...authErrors },
      },
      onRequest: requireSuperuser,
    },
    async (request) => {
      await userService.deleteByAdmin(db, request.principal, request.params.user_id);
      return { message: 'User deleted successfully' };
    },
  );
};
