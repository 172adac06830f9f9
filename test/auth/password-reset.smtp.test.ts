import type { AddressInfo } from 'node:net';
import type { FastifyInstance } from 'fastify';
import { SMTPServer } from 'smtp-server';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildTestApp } from '../support/app.js';
import { login, registerUser } from '../support/factories.js';

interface Received {
  from: string | undefined;
  to: string[];
  raw: string;
}

/** An SMTP server on a free loopback port that keeps every message it accepts. */
async function startMailServer() {
  const received: Received[] = [];
  const server = new SMTPServer({
    disabledCommands: ['STARTTLS', 'AUTH'],
    authOptional: true,
    logger: false,
    onData(stream, session, callback) {
      const chunks: Buffer[] = [];
      stream.on('data', (c: Buffer) => chunks.push(c));
      stream.on('end', () => {
        received.push({
          from: session.envelope.mailFrom ? session.envelope.mailFrom.address : undefined,
          to: session.envelope.rcptTo.map((r) => r.address),
          raw: Buffer.concat(chunks).toString('utf8'),
        });
        callback();
      });
    },
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.server.address() as AddressInfo;
  return {
    received,
    port,
    close: () => new Promise<void>((resolve) => server.close(() => resolve())),
  };
}

describe('password reset mail through SMTP_URL', () => {
  let app: FastifyInstance;
  let mail: Awaited<ReturnType<typeof startMailServer>>;

  beforeAll(async () => {
    mail = await startMailServer();
    app = await buildTestApp({
      env: {
        SMTP_URL: `smtp://127.0.0.1:${mail.port}`,
        MAIL_FROM: 'Paservices <no-reply@paservices.test>',
        SMTP_TIMEOUT_MS: '2000',
        PASSWORD_RESET_URL: 'https://app.example.test/reset',
      },
    });
  });
  afterAll(async () => {
    await mail.close().catch(() => undefined);
  });

  it('hands the reset mail to the SMTP server, and its link resets the password', async () => {
    const user = await registerUser(app, 'smtp-reset');
    const res = await app.inject({
      method: 'POST',
      url: '/v1/auth/password/forgot',
      payload: { email: user.email },
    });
    expect(res.statusCode, res.body).toBe(204);
    const message = mail.received.find(
      (m) => m.to.includes(user.email) && /^Subject: Reset your password\r?$/m.test(m.raw),
    );
    expect(message).toBeDefined();
    expect(message!.from).toBe('no-reply@paservices.test');
    expect(message!.raw).toMatch(/^Subject: Reset your password\r?$/m);
    expect(message!.raw).toMatch(/^From: Paservices <no-reply@paservices\.test>\r?$/m);
    // The text may be quoted-printable: join soft line breaks before reading the link.
    const text = message!.raw.replace(/=\r?\n/g, '').replace(/=3D/g, '=');
    const token = /https:\/\/app\.example\.test\/reset#token=(prs_[0-9A-Za-z_]+)/.exec(text)?.[1];
    expect(token).toBeDefined();
    const done = await app.inject({
      method: 'POST',
      url: '/v1/auth/password/reset',
      payload: { token, new_password: 'mailed and reset passphrase' },
    });
    expect(done.statusCode, done.body).toBe(204);
    await login(app, user.email, 'mailed and reset passphrase');
  });

  it('answers 503 with Retry-After when the SMTP server is gone, and keeps no token', async () => {
    const user = await registerUser(app, 'smtp-down');
    await mail.close();
    const res = await app.inject({
      method: 'POST',
      url: '/v1/auth/password/forgot',
      payload: { email: user.email },
    });
    expect(res.statusCode, res.body).toBe(503);
    expect(res.headers['content-type']).toContain('application/problem+json');
    expect(res.headers['retry-after']).toBe('30');
    expect(res.json().detail).toBe('The mail server is unavailable; try again later');
    expect(await app.services.repos.emailTokens.latestFor(user.id, 'password_reset')).toBeUndefined();
  });
});
