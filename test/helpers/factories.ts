import { randomBytes } from 'node:crypto';

import type { FastifyInstance, LightMyRequestResponse } from 'fastify';

import type { User } from '../../src/models/index.js';

import { createUser as createUserRow } from '../../src/services/user-service.js';
import { SUPERUSER_EMAIL, SUPERUSER_PASSWORD } from './app.js';

export interface TestUser {
  user: User;
  email: string;
  password: string;
  token: string;
  /** `{ authorization: 'Bearer <token>' }`, ready for inject(). */
  headers: Record<string, string>;
}

export const randomEmail = (label = 'user') => `${label}-${randomBytes(5).toString('hex')}@keel.test`;

export function bearer(token: string): Record<string, string> {
  return { authorization: `Bearer ${token}` };
}

/** A user made through the service (not the API) and a valid access token for them. */
export async function createUser(app: FastifyInstance, options: { superuser?: boolean; password?: string; email?: string } = {}): Promise<TestUser> {
  const email = options.email ?? randomEmail();
  const password = options.password ?? `pw-${randomBytes(6).toString('hex')}`;
  const user = await createUserRow(app.db, { email, password, full_name: null, is_active: true, is_superuser: options.superuser ?? false });
  const token = await app.tokens.create(user.id, user.token_version, 'access');
  return { user, email, password, token, headers: bearer(token) };
}

/** The fields of UserPublic, sorted: a response must show exactly these. */
export const USER_PUBLIC_KEYS = ['created_at', 'email', 'full_name', 'id', 'is_active', 'is_superuser', 'updated_at'];

export interface UserBody {
  id: string;
  email: string;
  full_name: string | null;
  is_active: boolean;
  is_superuser: boolean;
  created_at: string;
  updated_at: string;
}

/** POST /login/access-token with the OAuth2 password form. */
export function loginRequest(app: FastifyInstance, email: string, password: string): Promise<LightMyRequestResponse> {
  return app.inject({
    method: 'POST',
    url: '/api/v1/login/access-token',
    payload: new URLSearchParams({ username: email, password }).toString(),
    headers: { 'content-type': 'application/x-www-form-urlencoded' },
  });
}

export async function loginStatus(app: FastifyInstance, email: string, password: string): Promise<number> {
  return (await loginRequest(app, email, password)).statusCode;
}

/** Logs in through the API and returns the access token (throws on failure). */
export async function login(app: FastifyInstance, email: string, password: string): Promise<string> {
  const response = await loginRequest(app, email, password);
  if (response.statusCode !== 200) throw new Error(`login failed: ${response.statusCode} ${response.body}`);
  return response.json<{ access_token: string }>().access_token;
}

export async function superuserHeaders(app: FastifyInstance): Promise<Record<string, string>> {
  return bearer(await login(app, SUPERUSER_EMAIL, SUPERUSER_PASSWORD));
}

export async function createProject(app: FastifyInstance, headers: Record<string, string>, name = 'Project'): Promise<{ id: string; owner_id: string; name: string }> {
  const response = await app.inject({ method: 'POST', url: '/api/v1/projects', headers, payload: { name } });
  if (response.statusCode !== 200) throw new Error(`create project failed: ${response.statusCode} ${response.body}`);
  return response.json();
}
