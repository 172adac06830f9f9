import { randomUUID } from 'node:crypto';
import net from 'node:net';
import { sql } from 'drizzle-orm';
import pino from 'pino';
import { afterAll, describe, expect, inject, it } from 'vitest';
import { type DatabaseHandle, openDatabase } from '../../src/db/client.js';
import { testDatabase } from '../support/database.js';

/**
 * A TCP proxy to PostgreSQL that can go silent on every connection open through it: bytes are
 * swallowed in both directions and nothing is closed, like a NAT entry or a failed-over host that
 * vanished without a RST. Connections opened afterwards pass.
 */
async function silenceableProxy(target: URL) {
  const open: { silent: boolean; sockets: net.Socket[] }[] = [];
  const server = net.createServer((inbound) => {
    const outbound = net.connect(Number(target.port || 5432), target.hostname);
    const pair = { silent: false, sockets: [inbound, outbound] };
    open.push(pair);
    inbound.on('data', (d) => pair.silent || outbound.write(d));
    outbound.on('data', (d) => pair.silent || inbound.write(d));
    for (const [a, b] of [
      [inbound, outbound],
      [outbound, inbound],
    ] as const) {
      a.on('error', () => b.destroy());
      a.on('close', () => b.destroy());
    }
  });
  await new Promise<void>((ready) => server.listen(0, '127.0.0.1', ready));
  const port = (server.address() as net.AddressInfo).port;
  const url = new URL(target);
  url.hostname = '127.0.0.1';
  url.port = String(port);
  return {
    url: url.toString(),
    silenceAll() {
      for (const pair of open) pair.silent = true;
    },
    async close() {
      for (const pair of open) for (const s of pair.sockets) s.destroy();
      await new Promise((done) => server.close(done));
    },
  };
}

const databaseUrl = inject('databaseUrl');

describe.skipIf(!databaseUrl)('the LISTEN connection proves it is alive (PostgreSQL)', () => {
  let handle: DatabaseHandle | undefined;
  let proxy: Awaited<ReturnType<typeof silenceableProxy>> | undefined;
  afterAll(async () => {
    await handle?.close();
    await proxy?.close();
  });

  it('replaces a connection that went silent without closing, resyncs, and hears notifications again', async () => {
    proxy = await silenceableProxy(new URL(databaseUrl!));
    handle = await openDatabase({
      url: proxy.url,
      dataDir: '.data/test',
      logger: pino({ level: 'silent' }),
      migrate: false,
      listenHeartbeatMs: 200,
    });
    const channel = `heartbeat_${randomUUID().replace(/-/g, '')}`;
    const heard: string[] = [];
    await handle.listen(channel, (payload) => heard.push(payload));
    const direct = (await testDatabase()).db;
    const notify = (payload: string) => direct.execute(sql`select pg_notify(${channel}, ${payload})`);
    const until = async (payload: string, ms: number) => {
      const deadline = Date.now() + ms;
      while (!heard.includes(payload) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
      return heard.includes(payload);
    };

    await notify('before');
    expect(await until('before', 2000)).toBe(true);

    proxy.silenceAll();
    await notify('while-silent');
    // Within a heartbeat, its timeout and the reconnect delay: a new connection and a resync, so the
    // caches drop whatever the silent one missed.
    expect(await until('{"type":"resync"}', 3000)).toBe(true);
    expect(heard).not.toContain('while-silent');
    await notify('after');
    expect(await until('after', 2000)).toBe(true);
  });
});
