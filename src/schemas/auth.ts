import { z } from 'zod';

import { Password } from './common.js';

/** OAuth2 password grant, as a form (what OAuth2 clients and FastAPI's template send). */
export const LoginForm = z
  .strictObject({
    username: z.string().min(1).max(255),
    password: z.string().min(1).max(128),
    grant_type: z.literal('password').optional(),
    scope: z.string().max(1024).optional(),
    client_id: z.string().max(255).optional(),
    client_secret: z.string().max(255).optional(),
  })
  .meta({ id: 'LoginForm' });

export const Token = z.object({ access_token: z.string(), token_type: z.literal('bearer') }).meta({ id: 'Token' });

export const NewPassword = z.strictObject({ token: z.string().min(1).max(2048), new_password: Password }).meta({ id: 'NewPassword' });

/**
 * Any string: SPEC §3 answers recovery with 200 and the same message whatever is asked, so a
 * malformed address gets the answer an unknown one does (and no mail). The router caps its length
 * (MAX_PARAM_LENGTH, room for any address an account can have).
 */
export const RecoveryParams = z.object({ email: z.string() });
