import { createClient, type WebSocketLikeConstructor } from '@supabase/supabase-js';
import type { FastifyInstance } from 'fastify';
import ws from 'ws';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { buildTestApp, uniqueEmail } from '../support/app.js';
import { createAdmin, PASSWORD } from '../support/factories.js';
import { type FakeGoTrue, startFakeGoTrue } from '../support/fake-gotrue.js';
import { bearer } from '../support/http.js';

/**
 * POST /v1/auth/exchange against the fake GoTrue, for what a Supabase access token proves and for
 * how long: the token outlives the sign-in that opened its Supabase session (supabase-js refreshes
 * it for days), and it outlives the account here when an administrator deletes it.
 */
describe('exchanging a Supabase access token', () => {
  let gotrue: FakeGoTrue;
  let app: FastifyInstance;

  const outsideClient = () =>
    createClient(gotrue.url, gotrue.anonKey, {
      auth: { persistSession: false, autoRefreshToken: false, detectSessionInUrl: false },
      realtime: { transport: ws as unknown as WebSocketLikeConstructor },
    });

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
        AUTH_PROVIDER: 'supabase',
        SUPABASE_URL: gotrue.url,
        SUPABASE_ANON_KEY: gotrue.anonKey,
        SUPABASE_SERVICE_ROLE_KEY: gotrue.serviceRoleKey,
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
