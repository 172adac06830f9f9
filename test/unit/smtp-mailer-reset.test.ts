import type { AddressInfo } from 'node:net';
import { SMTPServer } from 'smtp-server';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createSmtpMailer } from '../../src/lib/mailer.js';

/**
 * A mail server that takes the message's data and never answers it, as one trickling its reply does
 * (no socket timeout notices either): `reset()` must close the connection in the middle of that
 * delivery, or the server could still take the mail after the outbox gave it up and sent it again.
 */
describe('the SMTP mailer’s reset', () => {
  let server: SMTPServer;
  let port: number;
  beforeAll(async () => {
    server = new SMTPServer({
      disabledCommands: ['STARTTLS', 'AUTH'],
      authOptional: true,
      logger: false,
      onData(stream) {
        stream.resume(); // read it all, answer never
      },
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    port = (server.server.address() as AddressInfo).port;
  });
  afterAll(async () => {
    await new Promise<void>((resolve) => server.close(() => resolve()));
  });

  it('ends a delivery the server holds, at once', async () => {
    const mailer = createSmtpMailer({ url: `smtp://127.0.0.1:${port}`, from: 'a@x.test', timeoutMs: 60_000 });
    const sending = mailer.send({ to: 'b@x.test', subject: 'held', text: 'held' });
    const outcome = sending.then(
      () => 'taken',
      () => 'ended',
    );
    await new Promise((resolve) => setTimeout(resolve, 300));
    mailer.reset?.();
    const settled = await Promise.race([
      outcome,
      new Promise((resolve) => setTimeout(() => resolve('still held'), 3000)),
    ]);
    expect(settled).toBe('ended');
    mailer.close();
  });
});
