import { DEFAULT_SUPERUSER_PASSWORD, type Settings } from '../core/config.js';
import type { Db } from '../core/db.js';
import type { Logger } from '../core/logger.js';
import { verifyPassword } from '../core/security.js';

import * as userCrud from '../crud/user.js';

/**
 * What an operator should hear once at start-up: an account still on the default password (the
 * stored hash is checked, so changing the password through the API silences it) and email that
 * will not be sent.
 */
export async function logStartupNotices(db: Db, settings: Settings, logger: Logger): Promise<void> {
  const account = await userCrud.getByEmail(db, settings.FIRST_SUPERUSER);
  if (account?.is_active && (await verifyPassword(DEFAULT_SUPERUSER_PASSWORD, account.hashed_password))) {
    logger.warn(
      `the superuser ${account.email} still has the default password "${DEFAULT_SUPERUSER_PASSWORD}": change it (PATCH /api/v1/users/me/password) before anyone else can reach this server`,
    );
  }
  if (settings.EMAIL_BACKEND === 'console') {
    logger.warn('EMAIL_BACKEND=console: emails are written to this log (reset links included), never sent');
  } else if (!settings.emailsEnabled) {
    const missing = [settings.SMTP_HOST ? null : 'SMTP_HOST', settings.EMAILS_FROM_EMAIL ? null : 'EMAILS_FROM_EMAIL'].filter(Boolean);
    logger.warn(
      `email is off (${missing.join(' and ')} unset): password-recovery and new-account emails are not sent, though recovery still answers as if they were; set SMTP_* or, in local, EMAIL_BACKEND=console to read them in this log`,
    );
  }
}
