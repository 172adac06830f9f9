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

/** Waits until the mail the app sends after answering (its outbox) has gone to its mailer. */
export async function mailSettled(app: { services: { outbox?: { idle(): Promise<void> } | undefined } }) {
  await app.services.outbox?.idle();
}
