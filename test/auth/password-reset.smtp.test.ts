import type { AddressInfo } from 'node:net';
import type { FastifyInstance } from 'fastify';
import { SMTPServer } from 'smtp-server';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildTestApp } from '../support/app.js';
import { createTestClock } from '../support/clock.js';
import { ownDatabase } from '../support/database.js';
import { login, registerUser } from '../support/factories.js';

interface Received {
  from: string | undefined;
  to: string[];
  raw: string;
}

/** An SMTP server on a loopback port (a free one by default) that keeps every message it accepts. */
async function startMailServer(port = 0) {
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
  await new Promise<void>((resolve) => server.listen(port, '127.0.0.1', resolve));
  const address = server.server.address() as AddressInfo;
  return {
    received,
    port: address.port,
    close: () => new Promise<void>((resolve) => server.close(() => resolve())),
  };
}

/** The reset link in a message as the SMTP server received it. */
function resetTokenIn(message: Received | undefined): string | undefined {
  // The text may be quoted-printable: join soft line breaks before reading the link.
  const text = message?.raw.replace(/=\r?\n/g, '').replace(/=3D/g, '=') ?? '';
  return /https:\/\/app\.example\.test\/reset#token=(prs_[0-9A-Za-z_]+)/.exec(text)?.[1];
}

/*
 * On a database of its own: the retry below sends every queued mail of its database that is due by
 * this file's clock, which runs ahead.
 */
describe('password reset mail through SMTP_URL', () => {
  let app: FastifyInstance;
  let mail: Awaited<ReturnType<typeof startMailServer>>;
  let own: Awaited<ReturnType<typeof ownDatabase>>;
  const clock = createTestClock();

  beforeAll(async () => {
    mail = await startMailServer();
    own = await ownDatabase('auth_smtp');
    app = await buildTestApp({
      deps: { database: own.database, clock },
      env: {
        SMTP_URL: `smtp://127.0.0.1:${mail.port}`,
        MAIL_FROM: 'Paservices <no-reply@paservices.test>',
        SMTP_TIMEOUT_MS: '2000',
        PASSWORD_RESET_URL: 'https://app.example.test/reset',
      },
    });
  });
  afterAll(async () => {
    await app.close();
    await own.dispose();
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
    const token = resetTokenIn(message);
    expect(token).toBeDefined();
    const done = await app.inject({
      method: 'POST',
      url: '/v1/auth/password/reset',
      payload: { token, new_password: 'mailed and reset passphrase' },
    });
    expect(done.statusCode, done.body).toBe(204);
    await login(app, user.email, 'mailed and reset passphrase');
  });

  it('keeps the mail while the SMTP server is gone, answering as for an unknown address, and hands it over once it is back', async () => {
    const user = await registerUser(app, 'smtp-down');
    // The registration's confirmation mail goes after the answer: let it arrive first.
    await expect.poll(() => mail.received.some((m) => m.to.includes(user.email))).toBe(true);
    const port = mail.port;
    await mail.close();
    const forgot = (email: string) =>
      app.inject({ method: 'POST', url: '/v1/auth/password/forgot', payload: { email } });
    const res = await forgot(user.email);
    expect(res.statusCode, res.body).toBe(204);
    expect(res.body).toBe((await forgot('nobody-smtp-down@example.test')).body);
    expect(await app.services.outbox!.pending(user.id)).toMatchObject([
      { kind: 'password_reset', attempts: 1 },
    ]);

    mail = await startMailServer(port);
    clock.advance(31);
    expect(await app.services.outbox!.deliverDue()).toMatchObject({ sent: 1, failed: 0 });
    const message = mail.received.find(
      (m) => m.to.includes(user.email) && /^Subject: Reset your password\r?$/m.test(m.raw),
    );
    const token = resetTokenIn(message);
    expect(token).toBeDefined();
    const done = await app.inject({
      method: 'POST',
      url: '/v1/auth/password/reset',
      payload: { token, new_password: 'mailed late and reset' },
    });
    expect(done.statusCode, done.body).toBe(204);
  });
});
