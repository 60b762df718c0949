import type { FastifyPluginAsyncZod } from 'fastify-type-provider-zod';

import { ForbiddenError } from '../core/errors.js';

import { authErrors, HTTPError, listOf, Message, Pagination, ValidationError } from '../schemas/common.js';
import { UpdatePassword, UserCreate, UserIdParams, UserPublic, UserRegister, UserUpdate, UserUpdateMe } from '../schemas/user.js';

import * as userService from '../services/user-service.js';
import { forbidApiKey, forbidScopedKey, requireSuperuser, requireUser } from '../utils/authentication.js';
import { byAccount, byIp, rateLimit } from '../utils/rate-limit.js';

const tags = ['users'];

export const usersRouter: FastifyPluginAsyncZod = async (app) => {
  const { db, settings } = app;

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
    async (request) => {
      forbidScopedKey(request.principal);
      return userService.list(db, request.query);
    },
  );

  app.post(
    '/users',
    {
      schema: {
        operationId: 'create_user',
        summary: 'Create User',
        tags,
        body: UserCreate,
        response: { 200: UserPublic, 409: HTTPError, ...authErrors },
      },
      onRequest: requireSuperuser,
    },
    async (request) => {
      forbidScopedKey(request.principal);
      return userService.createByAdmin(db, settings, app.mailer, request.log, request.body);
    },
  );

  // ==================== Own account ====================

  app.get(
    '/users/me',
    {
      schema: { operationId: 'read_user_me', summary: 'Read User Me', tags, response: { 200: UserPublic, ...authErrors } },
      onRequest: requireUser,
    },
    async (request) => request.principal.user,
  );

  app.patch(
    '/users/me',
    {
      schema: {
        operationId: 'update_user_me',
        summary: 'Update User Me',
        tags,
        body: UserUpdateMe,
        response: { 200: UserPublic, 409: HTTPError, ...authErrors },
      },
      onRequest: requireUser,
    },
    async (request) => {
      forbidApiKey(request.principal);
      return userService.updateMe(db, request.principal.user, request.body);
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
        response: { 200: Message, 400: HTTPError, ...authErrors },
      },
      onRequest: requireUser,
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
      schema: { operationId: 'delete_user_me', summary: 'Delete User Me', tags, response: { 200: Message, ...authErrors } },
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
        response: { 200: UserPublic, 403: HTTPError, 409: HTTPError, 422: ValidationError, 429: HTTPError },
      },
      preHandler: [
        rateLimit(app, 'signup-ip', settings.RATE_LIMIT_SIGNUP_PER_IP, byIp),
        rateLimit(app, 'signup-account', settings.RATE_LIMIT_SIGNUP_PER_ACCOUNT, (req) => byAccount((req.body as { email: string }).email)),
      ],
    },
    async (request) => userService.signup(db, settings, request.body),
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
        response: { 200: UserPublic, 404: HTTPError, ...authErrors },
      },
      onRequest: requireUser,
    },
    async (request) => {
      const { user } = request.principal;
      if (request.params.user_id === user.id) return user;
      forbidScopedKey(request.principal);
      if (!user.is_superuser) throw new ForbiddenError("The user doesn't have enough privileges");
      return userService.getById(db, request.params.user_id);
    },
  );

  app.patch(
    '/users/:user_id',
    {
      schema: {
        operationId: 'update_user',
        summary: 'Update User',
        tags,
        params: UserIdParams,
        body: UserUpdate,
        response: { 200: UserPublic, 404: HTTPError, 409: HTTPError, ...authErrors },
      },
      onRequest: requireSuperuser,
    },
    async (request) => {
      forbidScopedKey(request.principal);
      return userService.updateByAdmin(db, request.params.user_id, request.body);
    },
  );

  app.delete(
    '/users/:user_id',
    {
      schema: {
        operationId: 'delete_user',
        summary: 'Delete User',
        tags,
        params: UserIdParams,
        response: { 200: Message, 404: HTTPError, ...authErrors },
      },
      onRequest: requireSuperuser,
    },
    async (request) => {
      forbidScopedKey(request.principal);
      await userService.deleteByAdmin(db, request.principal.user, request.params.user_id);
      return { message: 'User deleted successfully' };
    },
  );
};
