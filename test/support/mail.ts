import type { FastifyInstance } from 'fastify';
import { expect } from 'vitest';
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

/**
 * Signs `email`'s account in without its password, through HTTP: a confirmation link asked for again
 * (`/v1/auth/email/resend`) and opened, then a sign-in link asked for and opened, each token read from
 * the newest mail of its kind `mailer` kept (a link or a bare code). The session's access token.
 */
export async function signInByLinks(
  app: FastifyInstance,
  mailer: { sent: MailMessage[] },
  email: string,
): Promise<string> {
  const newest = (subject: string, pattern: RegExp) => {
    const mail = mailer.sent.filter((m) => m.to === email && m.subject === subject).at(-1);
    expect(mail, `a mail "${subject}" to ${email}`).toBeDefined();
    const token = pattern.exec(mail!.text)?.[1];
    expect(token, mail!.text).toBeDefined();
    return token!;
  };
  const post = (url: string, payload: Record<string, string>) => app.inject({ method: 'POST', url, payload });
  expect((await post('/v1/auth/email/resend', { email })).statusCode).toBe(204);
  const confirmed = await post('/v1/auth/email/confirm', {
    token: newest('Confirm your email address', /(pec_[0-9A-Za-z_]+)/),
  });
  expect(confirmed.statusCode, confirmed.body).toBe(200);
  expect((await post('/v1/auth/magic-link', { email })).statusCode).toBe(204);
  const signedIn = await post('/v1/auth/magic-link/verify', {
    token: newest('Your sign-in link', /(pml_[0-9A-Za-z_]+)/),
  });
  expect(signedIn.statusCode, signedIn.body).toBe(200);
  return signedIn.json().session.access_token;
}
