import { sql } from 'drizzle-orm';
import type { FastifyInstance } from 'fastify';
import { decodeProtectedHeader } from 'jose';
import pino from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildApp } from '../../src/app.js';
import { type DatabaseHandle, selectRows } from '../../src/db/client.js';
import { createKey } from '../api-keys/helpers.js';
import { basic, createClient, form } from '../clients/helpers.js';
import { testConfig, uniqueEmail } from '../support/app.js';
import { createTestClock } from '../support/clock.js';
import { openTestDatabase, scratchDatabase, testDatabase } from '../support/database.js';
import { createAdmin, PASSWORD, registerUser } from '../support/factories.js';
import { bearer } from '../support/http.js';
import { capturingMailer } from '../support/mail.js';
import { turnOnMfa } from '../support/mfa.js';

/** How long a key must have been published to sign when none is active (REPLACEMENT_PUBLISHED_SECONDS). */
const REPLACEMENT_PUBLISHED_SECONDS = 5;

/**
 * No active signing key left (an operator retired it in the database): issuance never answers 500.
 * The published next key signs at once; with none published long enough, 503 with Retry-After, and
 * nothing changes (no session opened, no refresh token rotated) until a key every instance has been
 * showing can sign.
 */
describe('no active signing key left', () => {
  const clock = createTestClock();
  const mailer = capturingMailer();
  let a: FastifyInstance;
  let b: FastifyInstance;
  const cleanups: Array<() => Promise<void>> = [];
  // Two instances on a database of their own (on PostgreSQL): the keys retired here would end other
  // files' tokens. A grace of 0: a refresh token rotated before a 503 would be a replay when retried.
  beforeAll(async () => {
    const scratch = await scratchDatabase('no_active_key');
    const handles: DatabaseHandle[] = scratch
      ? [await openTestDatabase(scratch.url), await openTestDatabase(scratch.url)]
      : [await testDatabase(), await testDatabase()];
    const apps: FastifyInstance[] = [];
    for (const database of handles) {
      const app = await buildApp({
        config: testConfig({
          REFRESH_REUSE_GRACE_SECONDS: '0',
          MAGIC_LINK_URL: 'https://app.example.test/sign-in',
        }),
        database,
        logger: pino({ level: 'silent' }),
        clock,
        mailer,
        mailRetryIntervalMs: 0,
      });
      await app.ready();
      apps.push(app);
    }
    [a, b] = apps as [FastifyInstance, FastifyInstance];
    cleanups.push(async () => {
      await Promise.all(apps.map((app) => app.close()));
      if (scratch) {
        await Promise.all(handles.map((h) => h.close()));
        await scratch.drop();
      }
    });
  });
  afterAll(async () => {
    for (const cleanup of cleanups.splice(0)) await cleanup();
  });

  const keyRows = () =>
    selectRows<{ kid: string; state: string }>(
      a.services.db,
      sql`SELECT kid, state FROM signing_keys WHERE state IN ('active', 'next') ORDER BY created_at, kid`,
    );
  const jwksKids = async (app: FastifyInstance) =>
    (
      (await app.inject({ method: 'GET', url: '/.well-known/jwks.json' })).json().keys as Array<{
        kid: string;
      }>
    ).map((k) => k.kid);
  /** What an operator does by hand: the keys in `states` retired, and both instances reading their keys. */
  async function retire(...states: string[]) {
    await a.services.db.execute(
      sql`UPDATE signing_keys SET state = 'retired', retiring_at = now(), publish_until = now()
          WHERE state IN (${sql.join(
            states.map((s) => sql`${s}`),
            sql`, `,
          )})`,
    );
    await a.services.keys.reload();
    await b.services.keys.reload();
  }
  const loginOn = (app: FastifyInstance, email: string, password: string) =>
    app.inject({ method: 'POST', url: '/v1/auth/login', payload: { email, password } });
  const refreshOn = (app: FastifyInstance, refreshToken: string) =>
    app.inject({ method: 'POST', url: '/v1/auth/refresh', payload: { refresh_token: refreshToken } });
  /** How many sessions the user has had opened, ended ones included. */
  const sessionsOf = async (userId: string) =>
    (
      await selectRows<{ n: number }>(
        a.services.db,
        sql`SELECT count(*)::int AS n FROM sessions WHERE user_id = ${userId}`,
      )
    )[0]!.n;

  it('the published next key signs at once: login, refresh and /oauth/token answer 200, and the tokens verify on both instances', async () => {
    const admin = await createAdmin(a);
    const client = await createClient(a, admin.accessToken, { scopes: ['users:read'] });
    const user = await registerUser(a, 'no-active');
    // The next key made at the start has been published for long enough.
    clock.advance(REPLACEMENT_PUBLISHED_SECONDS);
    const before = await keyRows();
    const next = before.find((r) => r.state === 'next')!.kid;
    await retire('active');

    const loggedIn = await loginOn(b, user.email, user.password);
    expect(loggedIn.statusCode, loggedIn.body).toBe(200);
    const access = loggedIn.json().session.access_token as string;
    expect(decodeProtectedHeader(access).kid).toBe(next);
    for (const app of [a, b]) {
      const me = await app.inject({ method: 'GET', url: '/v1/auth/me', headers: bearer(access) });
      expect(me.statusCode, me.body).toBe(200);
    }
    const refreshed = await refreshOn(a, user.refreshToken);
    expect(refreshed.statusCode, refreshed.body).toBe(200);
    expect(decodeProtectedHeader(refreshed.json().session.access_token).kid).toBe(next);
    const token = await form(
      a,
      '/oauth/token',
      { grant_type: 'client_credentials' },
      basic(client.client_id, client.client_secret),
    );
    expect(token.statusCode, token.body).toBe(200);
    expect(decodeProtectedHeader(token.json().access_token).kid).toBe(next);

    // The next key is active, a new next key is published, and it is audited.
    const after = await keyRows();
    expect(after.find((r) => r.state === 'active')?.kid).toBe(next);
    const made = after.find((r) => r.state === 'next')!.kid;
    expect(made).not.toBe(next);
    for (const app of [a, b]) expect(await jwksKids(app)).toEqual(expect.arrayContaining([next, made]));
    const [event] = await selectRows<{ data: Record<string, unknown> }>(
      a.services.db,
      sql`SELECT data FROM audit_events WHERE type = 'signing_key.rotated' AND subject_id = ${next}`,
    );
    expect(event?.data).toMatchObject({ previous: [], no_active_key: true });
  });

  it('with no next key published long enough: 503 problem+json with Retry-After, nothing changed, then the key made then signs', async () => {
    const admin = await createAdmin(a);
    const client = await createClient(a, admin.accessToken, { scopes: ['users:read'] });
    const user = await registerUser(a, 'no-key');
    const sessionsBefore = await sessionsOf(user.id);
    await retire('active', 'next');

    const refused = await loginOn(a, user.email, user.password);
    expect(refused.statusCode, refused.body).toBe(503);
    expect(refused.headers['content-type']).toMatch(/^application\/problem\+json/);
    expect(refused.json()).toMatchObject({ status: 503, code: 'service_unavailable' });
    const retryAfter = Number(refused.headers['retry-after']);
    expect(retryAfter).toBeGreaterThanOrEqual(1);
    expect(retryAfter).toBeLessThanOrEqual(REPLACEMENT_PUBLISHED_SECONDS);
    const refresh = await refreshOn(a, user.refreshToken);
    expect(refresh.statusCode, refresh.body).toBe(503);
    expect(refresh.headers['retry-after']).toBeDefined();
    const token = await form(
      a,
      '/oauth/token',
      { grant_type: 'client_credentials' },
      basic(client.client_id, client.client_secret),
    );
    expect(token.statusCode, token.body).toBe(503);
    expect(token.json().error).toBe('temporarily_unavailable');
    expect(token.headers['retry-after']).toBeDefined();
    const newcomer = uniqueEmail('no-key-newcomer');
    const register = () =>
      a.inject({
        method: 'POST',
        url: '/v1/auth/register',
        payload: { email: newcomer, password: PASSWORD },
      });
    expect((await register()).statusCode).toBe(503);
    // The other instance, answering from its own keys, says the same.
    expect((await loginOn(b, user.email, user.password)).statusCode).toBe(503);
    expect(await sessionsOf(user.id)).toBe(sessionsBefore);

    // The key made then is published, on both instances, before it signs anything.
    const [made] = await keyRows();
    expect(made?.state).toBe('next');
    for (const app of [a, b]) expect(await jwksKids(app)).toContain(made!.kid);

    clock.advance(REPLACEMENT_PUBLISHED_SECONDS);
    const loggedIn = await loginOn(b, user.email, user.password);
    expect(loggedIn.statusCode, loggedIn.body).toBe(200);
    const access = loggedIn.json().session.access_token as string;
    expect(decodeProtectedHeader(access).kid).toBe(made!.kid);
    expect((await a.inject({ method: 'GET', url: '/v1/auth/me', headers: bearer(access) })).statusCode).toBe(
      200,
    );
    // Nor was the account of the refused registration made: it registers now.
    const registered = await register();
    expect(registered.statusCode, registered.body).toBe(201);
    // The refresh token the 503 answered was not rotated: it is good now (a replay would be a 401).
    const refreshed = await refreshOn(a, user.refreshToken);
    expect(refreshed.statusCode, refreshed.body).toBe(200);
  });

  it('with a next key that cannot sign (its row altered): 503, not 500, until an emergency rotation replaces every key', async () => {
    const admin = await createAdmin(a);
    // An API key: the administrator's access tokens stop verifying with the keys that signed them.
    const { key: apiKey } = await createKey(a, admin.accessToken, { name: 'keys', scopes: ['keys:write'] });
    const user = await registerUser(a, 'no-key-altered');
    clock.advance(REPLACEMENT_PUBLISHED_SECONDS);
    // The next key's row holds the active key's ciphertext: it would sign tokens that verify nowhere.
    await a.services.db.execute(
      sql`UPDATE signing_keys SET private_key_encrypted =
            (SELECT private_key_encrypted FROM signing_keys WHERE state = 'active')
          WHERE state = 'next'`,
    );
    await retire('active');

    for (const app of [a, b]) {
      const refused = await loginOn(app, user.email, user.password);
      expect(refused.statusCode, refused.body).toBe(503);
      expect(refused.headers['content-type']).toMatch(/^application\/problem\+json/);
      expect(Number(refused.headers['retry-after'])).toBeGreaterThanOrEqual(1);
    }
    // Nothing was made active.
    expect((await keyRows()).map((r) => r.state)).toEqual(['next']);

    const rotated = await a.inject({
      method: 'POST',
      url: '/v1/signing-keys/rotate',
      headers: { 'x-api-key': apiKey },
      payload: { revoke_previous: true },
    });
    expect(rotated.statusCode, rotated.body).toBe(200);
    const kid = rotated.json().active_kid as string;
    for (const app of [a, b]) {
      // B hears of the rotation by its notification.
      for (let i = 0; i < 100 && app.services.keys.signingKeyNow()?.kid !== kid; i++)
        await new Promise((resolve) => setTimeout(resolve, 10));
      const loggedIn = await loginOn(app, user.email, user.password);
      expect(loggedIn.statusCode, loggedIn.body).toBe(200);
      expect(decodeProtectedHeader(loggedIn.json().session.access_token).kid).toBe(kid);
    }
  });

  it('a sign-in link and a second factor answered 503 are not spent and open no session: each signs in once a key signs', async () => {
    // A sign-in link mailed to a confirmed address.
    const linked = await registerUser(a, 'no-key-link');
    await a.services.repos.users.update(linked.id, { emailConfirmedAt: clock.now() });
    const asked = await a.inject({
      method: 'POST',
      url: '/v1/auth/magic-link',
      payload: { email: linked.email },
    });
    expect(asked.statusCode, asked.body).toBe(204);
    await a.services.outbox?.idle();
    const mail = mailer.sent.filter((m) => m.to === linked.email).at(-1);
    const link = /#token=(pml_[0-9A-Za-z_]+)/.exec(mail?.text ?? '')?.[1];
    expect(link, mail?.text).toBeDefined();
    // A password sign-in waiting for its second factor.
    const twoStep = await registerUser(a, 'no-key-mfa');
    await a.services.repos.users.update(twoStep.id, { emailConfirmedAt: clock.now() });
    const { code } = await turnOnMfa(a, twoStep.accessToken, clock.nowMs);
    clock.advance(30); // the activation's code is spent
    const challenged = await loginOn(a, twoStep.email, twoStep.password);
    expect(challenged.statusCode, challenged.body).toBe(403);
    const mfaToken = challenged.json().mfa_token as string;
    const sessionsBefore = [await sessionsOf(linked.id), await sessionsOf(twoStep.id)];
    await retire('active', 'next');

    const openLink = () =>
      a.inject({ method: 'POST', url: '/v1/auth/magic-link/verify', payload: { token: link } });
    const giveCode = () =>
      a.inject({
        method: 'POST',
        url: '/v1/auth/mfa/verify',
        payload: { mfa_token: mfaToken, code: code() },
      });
    for (const refused of [await openLink(), await giveCode()]) {
      expect(refused.statusCode, refused.body).toBe(503);
      expect(refused.json()).toMatchObject({ code: 'service_unavailable' });
      expect(Number(refused.headers['retry-after'])).toBeGreaterThanOrEqual(1);
    }
    expect([await sessionsOf(linked.id), await sessionsOf(twoStep.id)]).toEqual(sessionsBefore);

    // The link and the challenge are still good: each opens its session once a key signs.
    clock.advance(REPLACEMENT_PUBLISHED_SECONDS);
    const opened = await openLink();
    expect(opened.statusCode, opened.body).toBe(200);
    const verified = await giveCode();
    expect(verified.statusCode, verified.body).toBe(200);
    for (const signedIn of [opened, verified]) {
      const access = signedIn.json().session.access_token as string;
      expect(
        (await a.inject({ method: 'GET', url: '/v1/auth/me', headers: bearer(access) })).statusCode,
      ).toBe(200);
    }
  });
});
