import type { FastifyInstance } from 'fastify';
import pino from 'pino';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { openMemoryDatabase } from '../../src/db/client.js';
import { createSigningKeysService } from '../../src/modules/signing-keys/signing-keys.service.js';
import { matchesEtag } from '../../src/modules/discovery/discovery.routes.js';
import type { RequestContext } from '../../src/modules/audit/audit.service.js';
import { buildTestApp } from '../support/app.js';

const SYSTEM: RequestContext = {
  actorType: 'system',
  actorId: null,
  ip: null,
  userAgent: null,
  requestId: null,
};

describe('the JWKS: an ETag, and 304 to a verifier whose copy is current', () => {
  let app: FastifyInstance;
  const jwks = (headers: Record<string, string> = {}) =>
    app.inject({ method: 'GET', url: '/.well-known/jwks.json', headers });

  // Its own database: the rotations here would end the shared database's tokens.
  beforeAll(async () => {
    app = await buildTestApp({ deps: { database: await openMemoryDatabase(pino({ level: 'silent' })) } });
  });
  afterAll(() => app.close());

  it('answers If-None-Match naming its ETag (strong, weak, in a list, or *) with 304 and no body', async () => {
    const first = await jwks();
    expect(first.statusCode).toBe(200);
    const etag = first.headers.etag as string;
    expect(etag).toMatch(/^"[A-Za-z0-9_-]{22}"$/);
    expect((await jwks()).headers.etag).toBe(etag);
    for (const ifNoneMatch of [etag, `W/${etag}`, `"other", ${etag}`, '*']) {
      const res = await jwks({ 'if-none-match': ifNoneMatch });
      expect(res.statusCode, ifNoneMatch).toBe(304);
      expect(res.body, ifNoneMatch).toBe('');
      expect(res.headers.etag, ifNoneMatch).toBe(etag);
      expect(res.headers['cache-control'], ifNoneMatch).toMatch(/^public, max-age=\d+/);
    }
    for (const ifNoneMatch of ['"other"', etag.slice(1, -1), `W/"${etag}"`]) {
      const res = await jwks({ 'if-none-match': ifNoneMatch });
      expect(res.statusCode, ifNoneMatch).toBe(200);
      expect(res.body).toBe(first.body);
    }
  });

  it('changes its ETag with the key set: the copy from before a rotation gets the new keys', async () => {
    const before = await jwks();
    const rotated = await app.services.keys.rotate(SYSTEM, { revokePrevious: true });
    const after = await jwks({ 'if-none-match': before.headers.etag as string });
    expect(after.statusCode).toBe(200);
    expect(after.headers.etag).not.toBe(before.headers.etag);
    expect(after.json().keys.map((k: { kid: string }) => k.kid)).toContain(rotated.kid);
    expect((await jwks({ 'if-none-match': after.headers.etag as string })).statusCode).toBe(304);
  });

  it('answers a failure after its ETag was set without that ETag, never stored', async () => {
    const good = await jwks();
    // The ETag is set before the key set is read: a read that throws then is a 500 about no document.
    const failing = vi.spyOn(app.services.keys, 'jwks').mockImplementation(() => {
      throw new Error('the key set cannot be read');
    });
    try {
      for (const headers of [{}, { 'if-none-match': '"other"' }] as Array<Record<string, string>>) {
        const res = await jwks(headers);
        expect(res.statusCode, res.body).toBe(500);
        expect(res.headers['content-type']).toMatch(/^application\/problem\+json/);
        expect(res.headers.etag, res.body).toBeUndefined();
        expect(res.headers['cache-control']).toBe('no-store');
      }
      expect(failing).toHaveBeenCalledTimes(2);
    } finally {
      failing.mockRestore();
    }
    // The same ETag as before once the keys read again.
    expect((await jwks()).headers.etag).toBe(good.headers.etag);
  });

  it('never lets a slow read of the keys land after a newer one (a revoked key would come back)', async () => {
    const s = app.services;
    let hold: Promise<void> | undefined;
    const keys = createSigningKeysService({
      db: s.db,
      audit: s.audit,
      events: s.events,
      clock: s.clock,
      logger: s.logger,
      keyEncryptionKey: s.config.keyEncryptionKey,
      alg: s.config.signingAlg,
      maxAccessTtl: s.config.tokens.maxAccessTtl,
      repo: {
        ...s.repos.signingKeys,
        // A read outside a transaction (a reload) answers what it read, held back when told to.
        async listPublished(now, tx) {
          const rows = await s.repos.signingKeys.listPublished(now, tx);
          const held = tx === undefined ? hold : undefined;
          if (held) {
            hold = undefined;
            await held;
          }
          return rows;
        },
      },
    });
    await keys.reload();
    const leaked = keys.activeKey().kid;
    let release!: () => void;
    hold = new Promise((resolve) => {
      release = resolve;
    });
    const slow = keys.reload(); // reads the key set with `leaked` in it, and waits
    await new Promise((resolve) => setTimeout(resolve, 50));
    const rotation = keys.rotate(SYSTEM, { revokePrevious: true }); // reloads after it commits
    await new Promise((resolve) => setTimeout(resolve, 200));
    release();
    await Promise.all([slow, rotation]);
    expect(keys.verificationKey(leaked)).toBeUndefined();
    expect(keys.activeKey().kid).toBe((await rotation).kid);
    expect(JSON.parse(keys.jwks()).keys.map((k: { kid: string }) => k.kid)).not.toContain(leaked);
  });
});

describe('matchesEtag (RFC 9110 §13.1.2, weak comparison)', () => {
  it('matches the tag, its weak form, a list holding it, and *; nothing else', () => {
    expect(matchesEtag('"a"', '"a"')).toBe(true);
    expect(matchesEtag('W/"a"', '"a"')).toBe(true);
    expect(matchesEtag(' "b" ,  W/"a" ', '"a"')).toBe(true);
    expect(matchesEtag('*', '"a"')).toBe(true);
    expect(matchesEtag(undefined, '"a"')).toBe(false);
    expect(matchesEtag('"b"', '"a"')).toBe(false);
    expect(matchesEtag('a', '"a"')).toBe(false);
    expect(matchesEtag('', '"a"')).toBe(false);
  });
});
