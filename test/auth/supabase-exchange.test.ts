import type { FastifyInstance } from 'fastify';
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from 'vitest';
import { signingUnavailable } from '../../src/modules/signing-keys/signing-keys.service.js';
import { buildTestApp, uniqueEmail } from '../support/app.js';
import { createAdmin, PASSWORD, registerUser } from '../support/factories.js';
import { type FakeGoTrue, projectClient, startFakeGoTrue, supabaseEnv } from '../support/fake-gotrue.js';
import { bearer } from '../support/http.js';

/**
 * POST /v1/auth/exchange against the fake GoTrue, for what a Supabase access token proves and for
 * how long: the token outlives the sign-in that opened its Supabase session (supabase-js refreshes
 * it for days), and it outlives the account here when an administrator deletes it.
 */
describe('exchanging a Supabase access token', () => {
  let gotrue: FakeGoTrue;
  let app: FastifyInstance;

  const outsideClient = () => projectClient(gotrue);

  const exchange = (accessToken: string) =>
    app.inject({ method: 'POST', url: '/v1/auth/exchange', payload: { access_token: accessToken } });

  /** A user of the project signed in at Supabase (a frontend of another app, a social login). */
  async function signedInAtSupabase(tag: string) {
    const email = uniqueEmail(tag);
    const client = outsideClient();
    expect((await client.auth.signUp({ email, password: PASSWORD })).error).toBeNull();
    const signIn = await client.auth.signInWithPassword({ email, password: PASSWORD });
    expect(signIn.error).toBeNull();
    return { email, client, id: signIn.data.user!.id, session: signIn.data.session! };
  }

  beforeAll(async () => {
    gotrue = await startFakeGoTrue();
    app = await buildTestApp({
      env: {
        ...supabaseEnv(gotrue),
        SUPABASE_TIMEOUT_MS: '2000',
      },
    });
  });

  afterEach(() => {
    gotrue.setAnswerDelayMs(0);
  });

  afterAll(async () => {
    await gotrue?.close();
  });

  it('a session exchanged from a Supabase sign-in of long ago stands in for no password: a stolen token sets up no app', async () => {
    const { id, client, session } = await signedInAtSupabase('sb-stale-signin');
    const enrol = (accessToken: string) =>
      app.inject({ method: 'POST', url: '/v1/auth/mfa/totp', headers: bearer(accessToken), payload: {} });

    // The frontend signed in an hour ago and supabase-js has kept the session alive since: a refreshed
    // access token, minted a moment ago, of a sign-in an hour old (its amr says when).
    gotrue.backdateSignIns(id, 3600);
    const refreshed = await client.auth.refreshSession({ refresh_token: session.refresh_token });
    expect(refreshed.error).toBeNull();
    const exchanged = await exchange(refreshed.data.session!.access_token);
    // Signing in with it still works, as before.
    expect(exchanged.statusCode, exchanged.body).toBe(200);
    const stale = await enrol(exchanged.json().session.access_token);
    expect(stale.statusCode, stale.body).toBe(400);
    expect(stale.json().errors).toEqual([
      { field: 'body.password', message: expect.stringContaining('5 minutes') },
    ]);
    // Exchanged again and again, it is still that sign-in of an hour ago.
    const again = await exchange(refreshed.data.session!.access_token);
    expect((await enrol(again.json().session.access_token)).statusCode).toBe(400);

    // The window runs from the sign-in at Supabase: four minutes ago still counts, six do not.
    const recent = await client.auth.signInWithPassword({
      email: refreshed.data.user!.email!,
      password: PASSWORD,
    });
    gotrue.backdateSignIns(id, 4 * 60);
    const fourMinutes = await client.auth.refreshSession({
      refresh_token: recent.data.session!.refresh_token,
    });
    const withinWindow = await exchange(fourMinutes.data.session!.access_token);
    expect(withinWindow.statusCode, withinWindow.body).toBe(200);
    const fresh = await enrol(withinWindow.json().session.access_token);
    expect(fresh.statusCode, fresh.body).toBe(201);
    gotrue.backdateSignIns(id, 2 * 60);
    const sixMinutes = await client.auth.refreshSession({
      refresh_token: fourMinutes.data.session!.refresh_token,
    });
    const pastWindow = await exchange(sixMinutes.data.session!.access_token);
    expect(pastWindow.statusCode, pastWindow.body).toBe(200);
    expect((await enrol(pastWindow.json().session.access_token)).statusCode).toBe(400);
  });

  it('with no key that can sign, an exchange answers 503 before it opens a session; it opens one once a key signs', async () => {
    const { id, session } = await signedInAtSupabase('sb-exchange-no-key');
    expect((await exchange(session.access_token)).statusCode).toBe(200);
    const live = async () => (await app.services.sessions.listLive(id, { limit: 10 })).page.map((s) => s.id);
    const before = await live();
    // What the signing keys answer while none can sign (an operator retired the active one).
    const { keys } = app.services;
    const spies = [
      vi.spyOn(keys, 'signingKeyNow').mockReturnValue(undefined),
      vi.spyOn(keys, 'signingKey').mockRejectedValue(signingUnavailable(5)),
    ];
    try {
      const refused = await exchange(session.access_token);
      expect(refused.statusCode, refused.body).toBe(503);
      expect(refused.headers['retry-after']).toBe('5');
    } finally {
      for (const spy of spies) spy.mockRestore();
    }
    expect(await live()).toEqual(before);
    const exchanged = await exchange(session.access_token);
    expect(exchanged.statusCode, exchanged.body).toBe(200);
    expect(await live()).toHaveLength(before.length + 1);
  });

  it('a disabled account’s exchange is refused and audited, as its password sign-in is', async () => {
    const admin = await createAdmin(app);
    const { id, email, session } = await signedInAtSupabase('sb-exchange-disabled');
    expect((await exchange(session.access_token)).statusCode).toBe(200);
    const disabled = await app.inject({
      method: 'PATCH',
      url: `/v1/users/${id}`,
      headers: bearer(admin.accessToken),
      payload: { status: 'disabled' },
    });
    expect(disabled.statusCode, disabled.body).toBe(200);

    // Supabase still vouches for the token (a ban ends no session there): refused here.
    const res = await exchange(session.access_token);
    expect(res.statusCode, res.body).toBe(401);
    expect(res.json()).toMatchObject({ code: 'invalid_token', detail: 'The account is disabled' });
    // What a disabled account's password sign-in leaves (auth.login), under the exchange's own type.
    const refusal = {
      outcome: 'failure',
      subjectId: id,
      data: { reason: 'disabled', email_domain: email.split('@')[1] },
    };
    const exchanges = await app.services.audit.list({ type: 'auth.exchange', subjectId: id, limit: 10 });
    expect(exchanges.filter((e) => e.outcome === 'failure')).toEqual([expect.objectContaining(refusal)]);
  });

  it('a token of a user banned in Supabase alone, which GoTrue still verifies, is refused as a disabled account’s', async () => {
    const banUntil = new Date(Date.now() + 86400_000).toISOString();
    // Known here (exchanged before), then banned in Supabase's dashboard; its token still verifies there.
    const known = await signedInAtSupabase('sb-exchange-banned');
    expect((await exchange(known.session.access_token)).statusCode).toBe(200);
    gotrue.users.get(known.id)!.bannedUntil = banUntil;
    expect((await known.client.auth.getUser(known.session.access_token)).error).toBeNull();
    const res = await exchange(known.session.access_token);
    expect(res.statusCode, res.body).toBe(401);
    expect(res.json()).toMatchObject({ code: 'invalid_token', detail: 'The account is disabled' });
    const exchanges = await app.services.audit.list({
      type: 'auth.exchange',
      subjectId: known.id,
      limit: 10,
    });
    expect(exchanges.filter((e) => e.outcome === 'failure')).toEqual([
      expect.objectContaining({ data: { reason: 'disabled', email_domain: known.email.split('@')[1] } }),
    ]);
    expect((await app.services.repos.users.findById(known.id))?.status).toBe('active');

    // Never seen here: refused the same, and no account is made for it.
    const stranger = await signedInAtSupabase('sb-exchange-banned-new');
    gotrue.users.get(stranger.id)!.bannedUntil = banUntil;
    const refused = await exchange(stranger.session.access_token);
    expect(refused.statusCode, refused.body).toBe(401);
    expect(refused.json()).toMatchObject({ code: 'invalid_token', detail: 'The account is disabled' });
    expect(await app.services.repos.users.findById(stranger.id)).toBeUndefined();

    // The ban lifted (or run out): exchanged again.
    gotrue.users.get(known.id)!.bannedUntil = null;
    expect((await exchange(known.session.access_token)).statusCode).toBe(200);
  });

  it('an account conflict met by an exchange is audited as a failed auth.exchange, as its other refusals are', async () => {
    const old = await registerUser(app, 'sb-exchange-conflict');
    // Deleted and made again in Supabase's dashboard: a new Supabase id for an email an account here holds.
    gotrue.users.delete(old.id);
    const client = outsideClient();
    expect((await client.auth.signUp({ email: old.email, password: PASSWORD })).error).toBeNull();
    const signIn = await client.auth.signInWithPassword({ email: old.email, password: PASSWORD });
    const newId = signIn.data.user!.id;

    const res = await exchange(signIn.data.session!.access_token);
    expect(res.statusCode, res.body).toBe(409);
    expect(res.json()).toMatchObject({ code: 'account_conflict' });
    const mine = (e: { data: Record<string, unknown> }) => e.data.provider_user_id === newId;
    const exchanges = await app.services.audit.list({
      type: 'auth.exchange',
      outcome: 'failure',
      limit: 200,
    });
    expect(exchanges.filter(mine)).toEqual([
      expect.objectContaining({
        subjectId: null,
        data: { reason: 'account_conflict', provider_user_id: newId, email_domain: old.email.split('@')[1] },
      }),
    ]);
    const logins = await app.services.audit.list({ type: 'auth.login', outcome: 'failure', limit: 200 });
    expect(logins.filter(mine)).toEqual([]);
  });

  it('a token Supabase vouched for while an administrator deleted the account does not bring the account back', async () => {
    const admin = await createAdmin(app);
    const { id, session } = await signedInAtSupabase('sb-deleted-meanwhile');
    expect((await exchange(session.access_token)).statusCode).toBe(200);

    // Supabase has looked the token up (its user still there) and its answer is on the way when the
    // deletion goes through: Supabase's user first, then the account here.
    const picks = (method: string, path: string) => method === 'GET' && path === '/auth/v1/user';
    gotrue.setAnswerDelayMs(800, picks);
    const before = gotrue.requests.length;
    const pending = exchange(session.access_token);
    while (!gotrue.requests.slice(before).some((r) => picks(r.method, r.path)))
      await new Promise((resolve) => setTimeout(resolve, 10));
    const deleted = await app.inject({
      method: 'DELETE',
      url: `/v1/users/${id}`,
      headers: bearer(admin.accessToken),
    });
    expect(deleted.statusCode, deleted.body).toBe(204);
    expect(gotrue.users.has(id)).toBe(false);

    const res = await pending;
    expect(res.statusCode, res.body).toBe(401);
    expect(res.json().code).toBe('invalid_token');
    expect(await app.services.repos.users.findById(id)).toBeUndefined();
  });

  it('nor does a password sign-in Supabase answered as the account was deleted', async () => {
    const admin = await createAdmin(app);
    const { id, email, session } = await signedInAtSupabase('sb-login-deleted-meanwhile');
    expect((await exchange(session.access_token)).statusCode).toBe(200);

    const picks = (method: string, path: string) => method === 'POST' && path === '/auth/v1/token';
    gotrue.setAnswerDelayMs(800, picks);
    const before = gotrue.requests.length;
    const pending = app.inject({
      method: 'POST',
      url: '/v1/auth/login',
      payload: { email, password: PASSWORD },
    });
    while (!gotrue.requests.slice(before).some((r) => picks(r.method, r.path)))
      await new Promise((resolve) => setTimeout(resolve, 10));
    const deleted = await app.inject({
      method: 'DELETE',
      url: `/v1/users/${id}`,
      headers: bearer(admin.accessToken),
    });
    expect(deleted.statusCode, deleted.body).toBe(204);

    const res = await pending;
    expect(res.statusCode, res.body).toBe(401);
    expect(res.json().code).toBe('invalid_credentials');
    expect(await app.services.repos.users.findById(id)).toBeUndefined();
  });
});
