import type { SendMailOptions, SentMessageInfo, Transporter } from 'nodemailer';

import type { Settings } from '../../core/config.js';
import type { Logger } from '../../core/logger.js';
import type { JobHandlers, JobQueue } from '../../core/queue.js';

import type { RenderedEmail } from './templates.js';

/**
 * Email goes through the job queue: a request never waits on (or reveals, by its timing) the mail
 * server, a message survives a failing server through retries, and on Redis it survives the node.
 */
export class Mailer {
  constructor(
    private readonly settings: Settings,
    private readonly queue: JobQueue,
  ) {}

  get enabled(): boolean {
    return this.settings.emailsEnabled;
  }

  /** Queues a message (nothing when SMTP is not configured); failures are logged, never thrown. */
  send(to: string, email: RenderedEmail, logger: Logger): void {
    if (!this.enabled) return;
    this.queue
      .add('send-email', { to, subject: email.subject, html: email.html, text: email.text })
      .then(
        // Subjects name the recipient's address: they stay out of the logs.
        () => logger.info('email queued'),
        (error: unknown) => logger.error({ err: error }, 'email could not be queued'),
      );
  }
}

/**
 * The job that talks SMTP; run by whichever process works the queue. A worker without email
 * settings still takes the job, and fails it saying why: without a handler it would not work the
 * emails' queue at all (a lane of its own), and messages an API node with SMTP queued would wait
 * there unseen.
 */
export function emailJobs(settings: Settings, logger: Logger): JobHandlers {
  if (!settings.emailsEnabled) {
    return {
      'send-email': () => Promise.reject(new Error('email is off on this worker (SMTP_HOST or EMAILS_FROM_EMAIL unset): give it the same email settings as the API nodes')),
    };
  }
  const transport = settings.EMAIL_BACKEND === 'console' ? consoleTransport(logger) : smtpTransport(settings);
  const address = settings.EMAILS_FROM_EMAIL ?? 'keel@localhost';
  const from = settings.EMAILS_FROM_NAME ? { name: settings.EMAILS_FROM_NAME, address } : address;
  return {
    'send-email': async ({ to, subject, html, text }) => {
      await transport.sendMail({ from, to, subject, html, text });
      logger.info('email sent');
    },
  };
}

/**
 * The SMTP transport, made when the first message goes out: nodemailer is loaded then rather than
 * at start-up (most processes never send one). It connects per message, as before.
 */
function smtpTransport(settings: Settings): Pick<Transporter, 'sendMail'> {
  let transport: Promise<Transporter> | undefined;
  const options = {
    host: settings.SMTP_HOST,
    port: settings.SMTP_PORT,
    secure: settings.SMTP_SSL,
    requireTLS: settings.SMTP_TLS && !settings.SMTP_SSL,
    ignoreTLS: !settings.SMTP_TLS && !settings.SMTP_SSL,
    auth: settings.SMTP_USER ? { user: settings.SMTP_USER, pass: settings.SMTP_PASSWORD ?? '' } : undefined,
    connectionTimeout: 10_000,
    greetingTimeout: 10_000,
    socketTimeout: 20_000,
  };
  return {
    sendMail: async (message: SendMailOptions) => {
      transport ??= import('nodemailer').then(({ default: nodemailer }) => nodemailer.createTransport(options));
      return (await transport).sendMail(message);
    },
  };
}

/** EMAIL_BACKEND=console (local only): the rendered text goes to the log instead of a mail server. */
function consoleTransport(logger: Logger): Pick<Transporter, 'sendMail'> {
  return {
    sendMail: async ({ to, subject, text }: SendMailOptions) => {
      logger.info({ to, subject }, `email not sent (EMAIL_BACKEND=console):\n${typeof text === 'string' ? text : ''}`);
      return {} as SentMessageInfo;
    },
  };
}
