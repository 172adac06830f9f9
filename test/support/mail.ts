import { AppError } from '../../src/lib/errors.js';
import type { MailMessage, Mailer } from '../../src/lib/mailer.js';

/** A mailer that keeps every message instead of sending it; `failing` makes sends throw as a dead server does. */
export function capturingMailer(): Mailer & { sent: MailMessage[]; failing: boolean } {
  const sent: MailMessage[] = [];
  return {
    kind: 'smtp',
    sent,
    failing: false,
    async send(message) {
      if (this.failing)
        throw new AppError('service_unavailable', {
          detail: 'The mail server is unavailable; try again later',
        });
      sent.push(message);
    },
    close() {},
  };
}
