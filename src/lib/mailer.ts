import nodemailer from 'nodemailer';
import type { Logger } from 'pino';
import { AppError } from './errors.js';

/** A message the service sends: plain text, to one address. */
export interface MailMessage {
  to: string;
  subject: string;
  text: string;
}

export interface Mailer {
  /** `smtp` hands messages to a mail server; `log` writes them to the log (development only). */
  readonly kind: 'smtp' | 'log';
  /** Resolves once the mail server accepted the message; throws AppError `service_unavailable` otherwise. */
  send(message: MailMessage): Promise<void>;
  /** Drops the connections open to the server (one stuck in a send), and opens new ones on demand. */
  reset?(): void;
  close(): void;
}

/** A mail server's refusal of one mail for good: its reply code (5yz), and the reply as it came. */
export interface PermanentRefusal {
  code: number;
  /** The command refused: `RCPT TO` (the recipient) or `DATA` (the message). */
  command: string;
  reply: string;
}

/**
 * The permanent refusal (RFC 5321: a 5yz reply) of the recipient (RCPT TO) or of the message (DATA)
 * that `err`, a failed send, carries (nodemailer's error, the AppError's cause): sending that mail
 * again would meet the same answer. Undefined for anything else — a 4yz (try again later), a
 * connection or a timeout, a refused login or sender (MAIL FROM: the service's own settings, which
 * every mail would meet). At RCPT TO only a refusal of the address itself counts (an RFC 3463
 * enhanced code 5.1.x, addressing, or 5.2.x, the mailbox): a server that refuses to relay or wants a
 * login answers 550 too (5.7.1 "Relaying denied", or no enhanced code), to every mail, and a
 * misconfiguration must not drop the outbox at once: those wait for their retries, as before.
 */
export function permanentRefusal(err: unknown): PermanentRefusal | undefined {
  let cur: unknown = err;
  for (let depth = 0; cur && depth < 5; depth++) {
    const e = cur as { responseCode?: unknown; command?: unknown; response?: unknown; cause?: unknown };
    if (
      typeof e.responseCode === 'number' &&
      e.responseCode >= 500 &&
      e.responseCode < 600 &&
      typeof e.command === 'string' &&
      (e.command.startsWith('DATA') ||
        (/^RCPT TO\b/.test(e.command) && /^5\d\d[ -]5\.[12]\.\d{1,3}\b/.test(String(e.response ?? ''))))
    )
      return {
        code: e.responseCode,
        command: e.command,
        reply: String(e.response ?? e.responseCode).slice(0, 500),
      };
    cur = e.cause;
  }
  return undefined;
}

export interface SmtpMailerOptions {
  /** `smtp://` or `smtps://`, with the user and password in it when the server asks for them. */
  url: string;
  /** The From header, e.g. `Paservices <no-reply@example.com>`. */
  from: string;
  /** Bound on connecting, on the server's greeting and on each exchange with it. */
  timeoutMs: number;
}

/** Mail through an SMTP server (nodemailer), with pooled connections. */
export function createSmtpMailer(options: SmtpMailerOptions): Mailer {
  const connect = () =>
    nodemailer.createTransport({
      url: options.url,
      pool: true,
      maxConnections: 2,
      connectionTimeout: options.timeoutMs,
      greetingTimeout: options.timeoutMs,
      socketTimeout: options.timeoutMs,
    });
  let transport = connect();
  return {
    kind: 'smtp',
    async send(message) {
      try {
        await transport.sendMail({ from: options.from, ...message });
      } catch (err) {
        // The cause (the server's answer, a refused connection) is logged by the error handler with
        // the request id; the client learns only that mail cannot go out now.
        throw new AppError('service_unavailable', {
          detail: 'The mail server is unavailable; try again later',
          headers: { 'retry-after': '30' },
          cause: err,
        });
      }
    },
    reset() {
      const stuck = transport;
      transport = connect();
      // `force`: the connection in the middle of a delivery too (a plain close waits for it, and a
      // server trickling its answer could still take the given-up mail, which is then sent again).
      (stuck.close as (options?: { force?: boolean }) => void)({ force: true });
    },
    close: () => transport.close(),
  };
}

/**
 * Development without SMTP_URL: each message goes to the log instead, so a reset link can be
 * followed from the terminal. Never used in production (the message carries a secret).
 */
export function createLogMailer(logger: Logger): Mailer {
  return {
    kind: 'log',
    async send(message) {
      logger.warn(
        { mail: { to: message.to, subject: message.subject } },
        `mail not sent (no SMTP_URL; development only); its text follows\n${message.text}`,
      );
    },
    close() {},
  };
}
