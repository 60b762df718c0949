import formbody from '@fastify/formbody';
import type { FastifyPluginAsyncZod } from 'fastify-type-provider-zod';

import { FORM_CONTENT_TYPE } from '../core/json-body.js';

import { LoginForm, NewPassword, RecoveryParams, Token } from '../schemas/auth.js';
import { authErrors, ErrorBody, Message, ValidationError } from '../schemas/common.js';
import { UserPublic } from '../schemas/user.js';

import * as userService from '../services/user-service.js';
import { ownAccount, requireUser } from '../utils/authentication.js';
import { byAccount, byIp, loginLockout, rateLimit, refundOnSuccess } from '../utils/rate-limit.js';

const tags = ['login'];
const RECOVERY_MESSAGE = 'If that account exists, a password recovery email has been sent';

export const loginRouter: FastifyPluginAsyncZod = async (app) => {
  const { settings } = app;
  // The OAuth2 password form, for this router's routes only: everywhere else a body is JSON (415 otherwise).
  app.removeContentTypeParser(FORM_CONTENT_TYPE);
  await app.register(formbody, { bodyLimit: settings.BODY_LIMIT_BYTES });

  // ==================== Tokens ====================

  app.post(
    '/login/access-token',
    {
      schema: {
        operationId: 'login_access_token',
        summary: 'Login Access Token',
        description: 'OAuth2 password grant: `username` is the email. Returns a bearer access token.',
        tags,
        security: [],
        consumes: ['application/x-www-form-urlencoded'],
        body: LoginForm,
        response: { 200: Token, 400: ErrorBody, 422: ValidationError, 429: ErrorBody },
      },
      // Only failures count (wrong passwords, invalid requests): a success takes its hits back.
      // Per address before anything is parsed, per (account, address) once the body is.
      onRequest: rateLimit(app, 'login-ip', settings.RATE_LIMIT_LOGIN_PER_IP, byIp, { failuresOnly: true }),
      preValidation: loginLockout(app, settings.RATE_LIMIT_LOGIN_PER_ACCOUNT, settings.RATE_LIMIT_LOGIN_ACCOUNT_CEILING),
      onSend: refundOnSuccess,
    },
    async (request) => {
      const { username, password } = request.body;
      const accessToken = await userService.login(app.db, app.tokens, username, password);
      return { access_token: accessToken, token_type: 'bearer' as const };
    },
  );

  app.post(
    '/login/test-token',
    {
      schema: {
        operationId: 'login_test_token',
        summary: 'Test Token',
        tags,
        response: { 200: UserPublic, ...authErrors },
      },
      onRequest: requireUser,
    },
    async (request) => ownAccount(request.principal),
  );

  // ==================== Password recovery ====================

  app.post(
    '/password-recovery/:email',
    {
      schema: {
        operationId: 'recover_password',
        summary: 'Recover Password',
        description: 'Always answers the same, whether or not the account exists.',
        tags,
        security: [],
        params: RecoveryParams,
        response: { 200: Message, 429: ErrorBody },
      },
      // Before validation, so that invalid requests count too.
      onRequest: [
        rateLimit(app, 'recovery-ip', settings.RATE_LIMIT_RECOVERY_PER_IP, byIp),
        rateLimit(app, 'recovery-account', settings.RATE_LIMIT_RECOVERY_PER_ACCOUNT, (req) =>
          byAccount((req.params as { email?: string }).email ?? null),
        ),
      ],
    },
    async (request) => {
      await userService.requestPasswordRecovery(app.db, settings, app.tokens, app.mailer, request.log, request.params.email);
      return { message: RECOVERY_MESSAGE };
    },
  );

  app.post(
    '/reset-password/',
    {
      schema: {
        operationId: 'reset_password',
        summary: 'Reset Password',
        tags,
        security: [],
        body: NewPassword,
        response: { 200: Message, 400: ErrorBody, 422: ValidationError, 429: ErrorBody },
      },
      onRequest: rateLimit(app, 'reset-ip', settings.RATE_LIMIT_RECOVERY_PER_IP, byIp),
    },
    async (request) => {
      await userService.resetPassword(app.db, app.tokens, request.body.token, request.body.new_password);
      return { message: 'Password updated successfully' };
    },
  );
};
