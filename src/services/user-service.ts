import type { Settings } from '../core/config.js';
import { type Db, deadlockRetried, transaction } from '../core/db.js';
import { BadRequestError, ConflictError, ForbiddenError, NotFoundError, UnprocessableError } from '../core/errors.js';
import type { Logger } from '../core/logger.js';
import { emailBinding, hashPassword, type TokenService, verifyPassword } from '../core/security.js';

import type { NewUser, User } from '../models/index.js';

import { Email } from '../schemas/common.js';
import type { UserCreate, UserRegister, UserUpdate, UserUpdateMe } from '../schemas/user.js';

import { lockBillingRows } from '../crud/billing.js';
import { lockOwnerCountingBusy } from '../crud/thread.js';
import * as userCrud from '../crud/user.js';
import type { RunDeps } from '../modules/agents/run-lifecycle.js';
import { forbidApiKeyOnSuperuser, type Principal } from '../utils/authentication.js';
import type { Mailer } from './email/mailer.js';
import { newAccountEmail, resetPasswordEmail } from './email/templates.js';
import * as runService from './run-service.js';

// ==================== Authentication ====================

/** The user with these credentials, or null; unknown emails cost the same time as wrong passwords. */
export async function authenticate(db: Db, email: string, password: string): Promise<User | null> {
  const user = await userCrud.getByEmail(db, email);
  const ok = await verifyPassword(password, user?.hashed_password ?? null);
  return ok && user ? user : null;
}

export async function login(db: Db, tokens: TokenService, email: string, password: string): Promise<string> {
  const user = await authenticate(db, email, password);
  if (!user) throw new BadRequestError('Incorrect email or password');
  if (!user.is_active) throw new BadRequestError('Inactive user');
  return tokens.create(user.id, user.token_version, 'access');
}

// ==================== Accounts ====================

async function ensureEmailFree(db: Db, email: string, exceptUserId: string | null = null): Promise<void> {
  const existing = await userCrud.getByEmail(db, email);
  if (existing && existing.id !== exceptUserId) {
    throw new ConflictError('The user with this email already exists in the system');
  }
}

export async function createUser(db: Db, input: UserCreate | UserRegister): Promise<User> {
  await ensureEmailFree(db, input.email);
  const { password, ...fields } = input;
  // The unique index still guards the race between the check and the insert (→ 409).
  return userCrud.create(db, { ...fields, hashed_password: await hashPassword(password) });
}

export async function signup(db: Db, settings: Settings, input: UserRegister): Promise<User> {
  if (!settings.USERS_OPEN_REGISTRATION) throw new ForbiddenError('Open user registration is forbidden on this server');
  return createUser(db, { email: input.email, password: input.password, full_name: input.full_name ?? null });
}

/** An administrator's new account; the user is told by email when SMTP is set. */
export async function createByAdmin(db: Db, settings: Settings, mailer: Mailer, logger: Logger, principal: Principal, input: UserCreate): Promise<User> {
  forbidApiKeyOnSuperuser(principal, null, input.is_superuser === true);
  const user = await createUser(db, input);
  const email = newAccountEmail({ projectName: settings.PROJECT_NAME, email: user.email, link: settings.FRONTEND_HOST });
  mailer.send(user.email, email, logger);
  return user;
}

export async function getById(db: Db, id: string): Promise<User> {
  const user = await userCrud.getById(db, id);
  if (!user) throw new NotFoundError('User not found');
  return user;
}

/**
 * The caller's own profile. A change of email (other than of its case, which accounts ignore) needs
 * the current password: otherwise a stolen access token could move the account to the thief's mailbox,
 * and password recovery would then hand them the account. A given `current_password` is always checked.
 * The change ends every session, as a password change does: sessions signed in under the old address
 * (one of them possibly a thief's) must not outlive the identity they were granted for.
 */
export async function updateMe(db: Db, user: User, input: UserUpdateMe): Promise<User> {
  const { current_password: current, ...fields } = input;
  const movesEmail = emailMoves(user, fields.email);
  if (movesEmail && current === undefined) {
    throw new UnprocessableError({ loc: ['body', 'current_password'], msg: 'Field required: a change of email needs the current password', type: 'missing' });
  }
  if (current !== undefined && !(await verifyPassword(current, user.hashed_password))) throw new BadRequestError('Incorrect password');
  if (fields.email !== undefined) await ensureEmailFree(db, fields.email, user.id);
  const updated = movesEmail ? await userCrud.updateRevokingTokens(db, user.id, fields) : await userCrud.update(db, user.id, fields);
  return updated ?? user;
}

/** Whether `email` (if given) moves `user` to another address: a change of case alone does not (accounts ignore it). */
function emailMoves(user: User, email: string | undefined): boolean {
  return email !== undefined && email.trim().toLowerCase() !== user.email.trim().toLowerCase();
}

export async function changePassword(db: Db, user: User, current: string, next: string): Promise<void> {
  if (!(await verifyPassword(current, user.hashed_password))) throw new BadRequestError('Incorrect password');
  if (current === next) throw new BadRequestError('New password cannot be the same as the current one');
  await userCrud.updateRevokingTokens(db, user.id, { hashed_password: await hashPassword(next) });
}

/** Whether `user` is the only active superuser left, whom nobody may remove or demote. */
async function isLastSuperuser(db: Db, user: User): Promise<boolean> {
  return user.is_superuser && user.is_active && (await userCrud.countActiveSuperusers(db)) <= 1;
}

export async function deleteMe(db: Db, user: User): Promise<void> {
  await deadlockRetried(db, async (tx) => {
    // Before any users row (see lockBillingRows): a hold or settlement of theirs in progress would deadlock with the cascade.
    await lockBillingRows(tx, { userId: user.id });
    // Superuser changes one at a time (see crud/user.ts); then their row FOR UPDATE, the delete's lock, as the first on it.
    // Whoever they are: `user` is the row read when the request was authenticated, and a promotion
    // committed since would leave a superuser's delete unserialized and unchecked.
    await userCrud.lockSuperusers(tx);
    await userCrud.lockUserForDelete(tx, user.id);
    if (await isLastSuperuser(tx, await getById(tx, user.id))) throw new ForbiddenError('The last superuser cannot delete their account');
    if (await lockOwnerCountingBusy(tx, user.id)) throw new ConflictError('You have runs in progress: cancel them (POST /runs/{id}/cancel) or wait for them to end, then delete your account');
    await userCrud.remove(tx, user.id);
  });
}

/** `runs`: a deactivated user's queued and running runs are cancelled (their model calls aborted). */
export async function updateByAdmin(db: Db, runs: RunDeps, principal: Principal, id: string, input: UserUpdate): Promise<User> {
  const losesSuperuser = input.is_superuser === false || input.is_active === false;
  const { password, ...fields } = input;
  const values: Partial<NewUser> = { ...fields };
  if (password !== undefined) values.hashed_password = await hashPassword(password);
  const user = await transaction(db, async (tx) => {
    // Taken first, so that two concurrent demotions cannot both pass the check below (no superuser's
    // row is locked: their model calls and run starts go on meanwhile; see crud/user.ts).
    if (losesSuperuser) await userCrud.lockSuperusers(tx);
    const target = await getById(tx, id);
    forbidApiKeyOnSuperuser(principal, target, input.is_superuser === true);
    if (input.email !== undefined) await ensureEmailFree(tx, input.email, target.id);
    if (losesSuperuser && (await isLastSuperuser(tx, target))) {
      throw new ForbiddenError('The last superuser cannot be demoted or deactivated');
    }
    // An email moved by a superuser ends the user's sessions too, as the user's own change does (updateMe).
    const revokes = password !== undefined || input.is_active === false || emailMoves(target, input.email);
    const updated = revokes ? await userCrud.updateRevokingTokens(tx, id, values) : await userCrud.update(tx, id, values);
    if (!updated) throw new NotFoundError('User not found');
    return updated;
  });
  // After the commit: from then on the user's tokens and keys do not authenticate, so no run starts after these.
  if (input.is_active === false) await runService.cancelActiveOf(runs, { owner_id: user.id }, 'User deactivated');
  return user;
}

export async function deleteByAdmin(db: Db, principal: Principal, id: string): Promise<void> {
  if (principal.user.id === id) throw new ForbiddenError('Super users are not allowed to delete themselves');
  await deadlockRetried(db, async (tx) => {
    // Before any users row, the target's among the superusers (see lockBillingRows).
    await lockBillingRows(tx, { userId: id });
    // Two superusers deleting each other at once must not leave none (see crud/user.ts); then the
    // target's row FOR UPDATE, the delete's lock, as the first on it.
    await userCrud.lockSuperusers(tx);
    await userCrud.lockUserForDelete(tx, id);
    const target = await getById(tx, id);
    forbidApiKeyOnSuperuser(principal, target, false);
    if (await isLastSuperuser(tx, target)) throw new ForbiddenError('The last superuser cannot be deleted');
    // The user's runs would go on with their rows gone (see lockOwnerCountingBusy); deactivating cancels them.
    if (await lockOwnerCountingBusy(tx, id)) throw new ConflictError('The user has runs in progress: deactivate the user (which cancels them) or wait for them to end, then delete');
    await userCrud.remove(tx, id);
  });
}

// ==================== Password recovery ====================

/** Mails a reset link when the account exists and is active; the caller learns nothing either way. */
export async function requestPasswordRecovery(
  db: Db,
  settings: Settings,
  tokens: TokenService,
  mailer: Mailer,
  logger: Logger,
  email: string,
): Promise<void> {
  // Not an address, so no account's: the same answer as for an unknown one, and nothing looked up.
  if (!Email.safeParse(email).success) return;
  const user = await userCrud.getByEmail(db, email);
  if (!user || !user.is_active) return;
  // Signed and mailed after the answer has gone, so that it takes as long as for an unknown email.
  const mailLink = async () => {
    const token = await tokens.create(user.id, user.token_version, 'reset', { eml: emailBinding(user.email) });
    const link = `${settings.FRONTEND_HOST.replace(/\/$/, '')}/reset-password?token=${encodeURIComponent(token)}`;
    const validHours = settings.EMAIL_RESET_TOKEN_EXPIRE_HOURS;
    mailer.send(user.email, resetPasswordEmail({ projectName: settings.PROJECT_NAME, email: user.email, link, validHours }), logger);
    logger.info({ userId: user.id }, 'password recovery requested');
  };
  setImmediate(() => {
    mailLink().catch((error: unknown) => logger.error({ err: error, userId: user.id }, 'password recovery mail failed'));
  });
}

/** Sets a new password from a reset token; the token dies with it, as do all earlier tokens. */
export async function resetPassword(db: Db, tokens: TokenService, token: string, newPassword: string): Promise<void> {
  const claims = await tokens.verify(token, 'reset');
  const user = claims ? await userCrud.getById(db, claims.sub) : undefined;
  // A token is dead once the password changed (version) or the email it was mailed to did.
  if (!claims || !user || user.token_version !== claims.ver || claims.eml !== emailBinding(user.email)) {
    throw new BadRequestError('Invalid token');
  }
  if (!user.is_active) throw new BadRequestError('Inactive user');
  const hashed = await hashPassword(newPassword);
  // Conditional on the version the token carries: of two concurrent uses, only the first succeeds.
  if (!(await userCrud.updateRevokingTokens(db, user.id, { hashed_password: hashed }, claims.ver))) {
    throw new BadRequestError('Invalid token');
  }
}

// ==================== First superuser ====================

/** Makes sure the configured superuser exists; an existing account is left as it is. */
export async function ensureFirstSuperuser(db: Db, settings: Settings, logger: Logger): Promise<void> {
  if (await userCrud.getByEmail(db, settings.FIRST_SUPERUSER)) return;
  try {
    await userCrud.create(db, {
      email: settings.FIRST_SUPERUSER,
      hashed_password: await hashPassword(settings.FIRST_SUPERUSER_PASSWORD),
      is_superuser: true,
      full_name: null,
    });
    logger.info({ email: settings.FIRST_SUPERUSER }, 'first superuser created');
  } catch (error) {
    // Another node created it between our check and insert.
    if ((await userCrud.getByEmail(db, settings.FIRST_SUPERUSER)) === undefined) throw error;
  }
}

export async function list(db: Db, page: { limit: number; offset: number }) {
  return userCrud.list(db, page);
}
