/**
 * A worker without email settings still takes `send-email` from the emails' queue (a lane of its
 * own: a process works a lane only when it has a handler for its jobs) and fails it saying why,
 * rather than leaving the messages an API node with SMTP queued waiting there unseen.
 */
import pino from 'pino';
import { expect, it } from 'vitest';

import { emailJobs } from '../../src/services/email/mailer.js';
import { testSettings } from '../helpers/app.js';

it('fails send-email on a process without email settings, naming them', async () => {
  const handlers = emailJobs(testSettings({ SMTP_HOST: '', EMAILS_FROM_EMAIL: '', EMAIL_BACKEND: 'smtp' }), pino({ level: 'silent' }));
  const send = handlers['send-email'];
  expect(send).toBeTypeOf('function');
  await expect(send!({ to: 'someone@keel.test', subject: 's', html: '', text: '' })).rejects.toThrow(/email is off on this worker.*SMTP_HOST/);
});
