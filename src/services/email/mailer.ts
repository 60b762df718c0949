import nodemailer, { type Transporter } from 'nodemailer';

import type { Settings } from '../../core/config.js';
import type { Logger } from '../../core/logger.js';

import type { RenderedEmail } from './templates.js';

/**
 * Sends email over SMTP in the background: a request never waits on (or reveals, by its timing)
 * the mail server. Pending sends are awaited on shutdown so none is lost.
 */
export class Mailer {
  private readonly transport: Transporter | null;
  private readonly pending = new Set<Promise<void>>();

  constructor(
    private readonly settings: Settings,
    private readonly logger: Logger,
  ) {
    this.transport = settings.emailsEnabled
      ? nodemailer.createTransport({
          host: settings.SMTP_HOST,
          port: settings.SMTP_PORT,
          secure: settings.SMTP_SSL,
          requireTLS: settings.SMTP_TLS && !settings.SMTP_SSL,
          ignoreTLS: !settings.SMTP_TLS && !settings.SMTP_SSL,
          auth: settings.SMTP_USER ? { user: settings.SMTP_USER, pass: settings.SMTP_PASSWORD ?? '' } : undefined,
          connectionTimeout: 10_000,
          greetingTimeout: 10_000,
          socketTimeout: 20_000,
        })
      : null;
  }

  get enabled(): boolean {
    return this.transport !== null;
  }

  /** Queues a message; failures are logged (through `logger`: a request's, to keep its id), never thrown. */
  send(to: string, email: RenderedEmail, logger: Logger = this.logger): void {
    const transport = this.transport;
    if (!transport) return;
    const from = this.settings.EMAILS_FROM_NAME
      ? { name: this.settings.EMAILS_FROM_NAME, address: this.settings.EMAILS_FROM_EMAIL! }
      : this.settings.EMAILS_FROM_EMAIL!;
    const sending = transport
      .sendMail({ from, to, subject: email.subject, html: email.html, text: email.text })
      .then(
        () => logger.info({ subject: email.subject }, 'email sent'),
        (error: unknown) => logger.error({ err: error, subject: email.subject }, 'email failed'),
      )
      .finally(() => this.pending.delete(sending));
    this.pending.add(sending);
  }

  async drain(): Promise<void> {
    await Promise.allSettled([...this.pending]);
    this.transport?.close();
  }
}
