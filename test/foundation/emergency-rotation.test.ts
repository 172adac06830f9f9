import { setTimeout as sleep } from 'node:timers/promises';
import type { FastifyInstance } from 'fastify';
import { decodeProtectedHeader } from 'jose';
import pino from 'pino';
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from 'vitest';
import { openMemoryDatabase } from '../../src/db/client.js';
import { basic, createClient, form } from '../clients/helpers.js';
import { buildTestApp } from '../support/app.js';
import { createAdmin } from '../support/factories.js';
import { bearer } from '../support/http.js';

/** How long a read of the signing keys outside a transaction (a reload) takes while `slowReads`. */
const SLOW_READ_MS = 300;

/**
 * An emergency rotation (`revoke_previous`) on the instance that makes it: from its commit on, no
 * token is handed out signed with a key it revoked, though the instance's read of the keys is slow.
 */
describe('an emergency rotation under constant issuance, on the instance that rotates', () => {
  let app: FastifyInstance;
  let slowReads = false;
  // Its own database: revoking the shared one's keys would end other files' tokens.
  beforeAll(async () => {
    app = await buildTestApp({ deps: { database: await openMemoryDatabase(pino({ level: 'silent' })) } });
    const repo = app.services.repos.signingKeys;
    const listPublished = repo.listPublished;
    repo.listPublished = async (now, tx) => {
      if (slowReads && tx === undefined) await sleep(SLOW_READ_MS);
      return listPublished(now, tx);
    };
  });
  afterEach(() => {
    slowReads = false;
    vi.restoreAllMocks();
  });
  afterAll(() => app.close());

  /** An administrator, and a client's Basic credentials, for tokens and their introspection. */
  async function setUp() {
    const admin = await createAdmin(app);
    const client = await createClient(app, admin.accessToken, { scopes: ['users:read'] });
    return { admin, auth: basic(client.client_id, client.client_secret) };
  }

  const tokenFor = async (auth: Record<string, string>) => {
    const res = await form(app, '/oauth/token', { grant_type: 'client_credentials' }, auth);
    expect(res.statusCode, res.body).toBe(200);
    return res.json().access_token as string;
  };

  const active = async (auth: Record<string, string>, token: string) => {
    const res = await form(app, '/oauth/introspect', { token }, auth);
    expect(res.statusCode, res.body).toBe(200);
    return res.json().active as boolean;
  };

  const rotate = (adminToken: string) =>
    app.inject({
      method: 'POST',
      url: '/v1/signing-keys/rotate',
      headers: bearer(adminToken),
      payload: { revoke_previous: true },
    });

  /** When each token's issuance ended (tokens.issue resolved), by token. */
  function recordIssuance(): Map<string, number> {
    const issuedAt = new Map<string, number>();
    const { tokens } = app.services;
    const issue = tokens.issue.bind(tokens);
    vi.spyOn(tokens, 'issue').mockImplementation(async (input) => {
      const issued = await issue(input);
      issuedAt.set(issued.token, performance.now());
      return issued;
    });
    return issuedAt;
  }

  /** When this instance learned that the rotation committed (its event, applied right after the commit). */
  function recordCommit(): () => number | undefined {
    let committedAt: number | undefined;
    app.services.events.subscribe((event) => {
      if (event.type === 'signing_keys_changed') committedAt ??= performance.now();
    });
    return () => committedAt;
  }

  it('every token whose issuance ended after the commit, or asked for after the rotation answered, verifies', async () => {
    const { admin, auth } = await setUp();
    const issuedAt = recordIssuance();
    const committedAt = recordCommit();
    /** Each token, and when it was asked for. */
    const answered: Array<{ token: string; askedAt: number }> = [];
    let stopAt = Number.POSITIVE_INFINITY;
    // Batches of concurrent client_credentials requests, until well past the instance's slow reload.
    const issuing = (async () => {
      while (performance.now() < stopAt) {
        await Promise.all(
          Array.from({ length: 8 }, async () => {
            const askedAt = performance.now();
            answered.push({ token: await tokenFor(auth), askedAt });
          }),
        );
      }
    })();
    // Tokens on both sides of the rotation: some are issued before it.
    while (answered.length < 16) await Promise.race([sleep(10), issuing]);
    slowReads = true;
    const rotated = await rotate(admin.accessToken);
    const rotatedAt = performance.now();
    expect(rotated.statusCode, rotated.body).toBe(200);
    const { active_kid: newKid, previous_kid: oldKid } = rotated.json();
    // Published here as it answers, though its read of the keys is still under way.
    const jwks = await app.inject({ method: 'GET', url: '/.well-known/jwks.json' });
    const published = jwks.json().keys.map((k: { kid: string }) => k.kid);
    expect(published).toContain(newKid);
    expect(published).not.toContain(oldKid);
    stopAt = rotatedAt + 2 * SLOW_READ_MS;
    await issuing;
    slowReads = false;

    const commit = committedAt();
    expect(commit).toBeDefined();
    const before = answered.filter(({ token }) => issuedAt.get(token)! < commit!);
    const after = answered.filter(({ token }) => issuedAt.get(token)! > commit!);
    // Tokens were issued on both sides of the commit: the ones before carry the revoked key.
    expect(before.length).toBeGreaterThan(0);
    expect(after.length).toBeGreaterThan(0);
    expect(before.length + after.length).toBe(answered.length);
    expect(decodeProtectedHeader(before[0]!.token).kid).toBe(oldKid);
    expect(await active(auth, before[0]!.token)).toBe(false);

    const askedAfterAnswer = answered.filter(({ askedAt }) => askedAt > rotatedAt);
    expect(askedAfterAnswer.length).toBeGreaterThan(0);
    const dead: string[] = [];
    for (const { token } of new Set([...after, ...askedAfterAnswer])) {
      if (decodeProtectedHeader(token).kid !== newKid || !(await active(auth, token))) dead.push(token);
    }
    expect(dead, `${dead.length} of ${after.length} tokens issued after the commit`).toEqual([]);
  });

  it('a token whose signature was under way as the revocation committed is signed again with the new key', async () => {
    const { admin, auth } = await setUp();
    const { signer } = app.services;
    const sign = signer.sign.bind(signer);
    let started!: () => void;
    const signing = new Promise<void>((resolve) => {
      started = resolve;
    });
    let release!: () => void;
    const held = new Promise<void>((resolve) => {
      release = resolve;
    });
    let holdNext = true;
    // The next signature is started (its key chosen), and held until the rotation has committed.
    vi.spyOn(signer, 'sign').mockImplementation(async (alg, key, input) => {
      if (holdNext) {
        holdNext = false;
        started();
        await held;
      }
      return sign(alg, key, input);
    });
    const pending = tokenFor(auth);
    await signing;
    const rotated = await rotate(admin.accessToken);
    expect(rotated.statusCode, rotated.body).toBe(200);
    release();
    const token = await pending;
    expect(decodeProtectedHeader(token).kid).toBe(rotated.json().active_kid);
    expect(await active(auth, token)).toBe(true);
  });
});
