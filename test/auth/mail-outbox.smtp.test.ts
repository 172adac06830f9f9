import type { AddressInfo } from 'node:net';
import type { FastifyInstance } from 'fastify';
import { SMTPServer } from 'smtp-server';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { buildTestApp, uniqueEmail } from '../support/app.js';
import { createTestClock } from '../support/clock.js';
import { ownDatabase } from '../support/database.js';
import { PASSWORD } from '../support/factories.js';

const CONFIRM_URL = 'https://app.example.test/confirm-email';

/** An SMTP error reply: `code` and its text, as smtp-server sends it. */
const reply = (code: number, text: string) => Object.assign(new Error(text), { responseCode: code });

/**
 * An SMTP server on a loopback port that answers by the recipient's local part: `bounce-…` is refused
 * at RCPT TO for good (550), `defer-…` for now (451), `spam-…` has its message refused for good after
 * DATA (554), `relay-…` and `bare-…` get a 550 that refuses the server's use, not the address (5.7.1
 * "Relaying denied", or no enhanced code); anything else is taken.
 */
async function startRefusingServer() {
  const taken: string[] = [];
  const server = new SMTPServer({
    disabledCommands: ['STARTTLS', 'AUTH'],
    authOptional: true,
    logger: false,
    onRcptTo(address, _session, callback) {
      if (address.address.startsWith('bounce-')) return callback(reply(550, '5.1.1 No such mailbox here'));
      if (address.address.startsWith('defer-')) return callback(reply(451, '4.3.0 Try again later'));
      if (address.address.startsWith('relay-')) return callback(reply(550, '5.7.1 Relaying denied'));
      if (address.address.startsWith('bare-')) return callback(reply(550, 'Not allowed'));
      callback();
    },
    onData(stream, session, callback) {
      stream.resume();
      stream.on('end', () => {
        const to = session.envelope.rcptTo.map((r) => r.address);
        if (to.some((a) => a.startsWith('spam-')))
          return callback(reply(554, '5.7.1 Message refused as spam'));
        taken.push(...to);
        callback();
      });
    },
  });
  server.on('error', () => undefined);
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.server.address() as AddressInfo;
  return {
    url: `smtp://127.0.0.1:${port}`,
    taken,
    close: () => new Promise<void>((resolve) => server.close(() => resolve())),
  };
}

/*
 * On a database of its own: the mail server refuses or takes what this file's app sends, and a retry
 * here would send other files' queued mail through it.
 */
describe('a mail the mail server refuses for good (a 5xx to RCPT TO or DATA)', () => {
  let app: FastifyInstance;
  let server: Awaited<ReturnType<typeof startRefusingServer>>;
  let own: Awaited<ReturnType<typeof ownDatabase>>;
  const clock = createTestClock();

  beforeAll(async () => {
    server = await startRefusingServer();
    own = await ownDatabase('auth_smtp_refused');
    app = await buildTestApp({
      deps: { database: own.database, clock },
      env: {
        SMTP_URL: server.url,
        MAIL_FROM: 'Paservices <no-reply@paservices.test>',
        SMTP_TIMEOUT_MS: '2000',
        EMAIL_CONFIRMATION_URL: CONFIRM_URL,
      },
    });
  });
  afterAll(async () => {
    await app.close();
    await own.dispose();
    await server.close().catch(() => undefined);
  });

  /** Registers `email` through HTTP (its confirmation mail is tried once the answer is in); its id. */
  const register = async (email: string) => {
    const res = await app.inject({
      method: 'POST',
      url: '/v1/auth/register',
      payload: { email, password: PASSWORD },
    });
    expect(res.statusCode, res.body).toBe(201);
    return res.json().user.id as string;
  };
  const droppedCount = async () => {
    const metrics = await app.inject({ method: 'GET', url: '/metrics' });
    const found = /auth_mail_total\{kind="email_confirmation",outcome="dropped"\} (\d+)/.exec(metrics.body);
    return Number(found?.[1] ?? 0);
  };

  it.each([
    { refused: 'the recipient (550 to RCPT TO)', tag: 'bounce', code: 550, command: 'RCPT TO' },
    { refused: 'the message (554 after DATA)', tag: 'spam', code: 554, command: 'DATA' },
  ])(
    'drops a mail whose $refused at once: counted and logged with the reply, never retried',
    async ({ tag, code, command }) => {
      const before = await droppedCount();
      const warned = vi.spyOn(app.services.logger, 'warn');
      let userId: string;
      let logged: unknown[][];
      try {
        userId = await register(uniqueEmail(tag));
        logged = warned.mock.calls.filter((call) => String(call[1]).includes('refused a mail for good'));
      } finally {
        warned.mockRestore();
      }
      // Gone from the outbox after the one try: no retry will meet the same answer again.
      expect(await app.services.outbox!.pending(userId)).toEqual([]);
      expect(await droppedCount()).toBe(before + 1);
      expect(logged).toHaveLength(1);
      expect(logged[0]![0]).toMatchObject({
        mail: { kind: 'email_confirmation', userId, attempts: 1 },
        smtp: {
          code,
          command: expect.stringContaining(command),
          reply: expect.stringMatching(new RegExp(`^${code} `)),
        },
      });
      clock.advance(3600);
      expect(await app.services.outbox!.deliverDue()).toMatchObject({ sent: 0, failed: 0 });
    },
  );

  it.each(['relay', 'bare'])(
    'keeps a mail whose 550 to RCPT TO does not name the address (%s) for its retry: a server that will not relay refuses every mail',
    async (tag) => {
      const userId = await register(uniqueEmail(tag));
      expect(await app.services.outbox!.pending(userId)).toMatchObject([
        { kind: 'email_confirmation', attempts: 1, lastError: expect.stringContaining('550') },
      ]);
    },
  );

  it('keeps a mail refused for now (451) for its retry', async () => {
    const userId = await register(uniqueEmail('defer'));
    expect(await app.services.outbox!.pending(userId)).toMatchObject([
      { kind: 'email_confirmation', attempts: 1, lastError: expect.stringContaining('451') },
    ]);
  });

  it('sends what the server takes', async () => {
    const email = uniqueEmail('taken');
    const userId = await register(email);
    expect(server.taken).toContain(email);
    expect(await app.services.outbox!.pending(userId)).toEqual([]);
  });
});
