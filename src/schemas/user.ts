import { z } from 'zod';

import { Email, Id, Password, Text, Timestamp } from './common.js';

const UserFields = {
  email: Email,
  full_name: Text.max(255).nullable().optional(),
};

export const UserPublic = z
  .object({
    id: Id,
    email: z.string(),
    full_name: z.string().nullable(),
    is_active: z.boolean(),
    is_superuser: z.boolean(),
    created_at: Timestamp,
    updated_at: Timestamp,
  })
  .meta({ id: 'UserPublic' });

/** What an administrator may set on a new account. */
export const UserCreate = z
  .strictObject({
    ...UserFields,
    password: Password,
    is_active: z.boolean().default(true),
    is_superuser: z.boolean().default(false),
  })
  .meta({ id: 'UserCreate' });
export type UserCreate = z.infer<typeof UserCreate>;

export const UserRegister = z.strictObject({ ...UserFields, password: Password }).meta({ id: 'UserRegister' });
export type UserRegister = z.infer<typeof UserRegister>;

export const UserUpdate = z
  .strictObject({
    email: Email.optional(),
    full_name: UserFields.full_name,
    password: Password.optional(),
    is_active: z.boolean().optional(),
    is_superuser: z.boolean().optional(),
  })
  .meta({ id: 'UserUpdate' });
export type UserUpdate = z.infer<typeof UserUpdate>;

/** The account's current password, as a check (never stored, never echoed). */
const CurrentPassword = z.string().min(1).max(128);

export const UserUpdateMe = z
  .strictObject({
    email: Email.optional(),
    full_name: UserFields.full_name,
    // An access token alone must not move the account to another mailbox (whose owner would then take
    // it through password recovery): a change of email needs the password too. Checked when given.
    current_password: CurrentPassword.optional().describe('The current password: required with a change of `email`'),
  })
  .meta({ id: 'UserUpdateMe' });
export type UserUpdateMe = z.infer<typeof UserUpdateMe>;

export const UpdatePassword = z
  .strictObject({ current_password: CurrentPassword, new_password: Password })
  .meta({ id: 'UpdatePassword' });

export const UserIdParams = z.object({ user_id: Id });
