import type { AddressInfo } from 'node:net';
import { SMTPServer } from 'smtp-server';

/** A message the server took: its recipients, and when (performance.now()). */
export interface ReceivedMail {
  to: string[];
  at: number;
}

/**
 * An SMTP server of the fault suite's own on a free port of 127.0.0.1, keeping the envelope of every
 * message it takes. `delayMs` holds each answer to a message's data that long: a slow mail server,
 * so that mail queues in the service's outbox.
 */
export async function startMailServer() {
  const received: ReceivedMail[] = [];
  const settings = { delayMs: 0 };
  const server = new SMTPServer({
    disabledCommands: ['STARTTLS', 'AUTH'],
    authOptional: true,
    logger: false,
    // A stop does not wait half a minute for the connections a killed service left.
    closeTimeout: 500,
    onData(stream, session, callback) {
      stream.resume();
      stream.on('end', () => {
        const take = () => {
          received.push({ to: session.envelope.rcptTo.map((r) => r.address), at: performance.now() });
          callback();
        };
        if (settings.delayMs > 0) setTimeout(take, settings.delayMs);
        else take();
      });
    },
  });
  // A connection the killed service dropped mid-message is no failure of the test.
  server.on('error', () => undefined);
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.server.address() as AddressInfo;
  return {
    url: `smtp://127.0.0.1:${port}`,
    received,
    settings,
    close: () => new Promise<void>((resolve) => server.close(() => resolve())),
  };
}
