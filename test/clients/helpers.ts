import { randomUUID } from 'node:crypto';
import type { FastifyInstance } from 'fastify';
import type { InjectOptions } from 'light-my-request';
import { expect } from 'vitest';
import { roles } from '../../src/db/schema/index.js';
import { basicAuthorization } from '../../src/modules/oauth/oauth.client-auth.js';
import { login, registerUser, type TestUser } from '../support/factories.js';
import { bearer } from '../support/http.js';

export { createTestClock } from '../support/clock.js';

/** A registered user who also holds a fresh role with exactly these permissions (logged in again). */
export async function userWith(
  app: FastifyInstance,
  permissions: string[],
  tag = 'clients',
): Promise<TestUser> {
  const user = await registerUser(app, tag);
  const name = `test-${randomUUID().slice(0, 12)}`;
  await app.services.db.insert(roles).values({ name, description: 'test role', permissions });
  await app.services.repos.users.assignRole(user.id, name, null);
  const session = await login(app, user.email, user.password);
  return { ...user, accessToken: session.session.access_token, refreshToken: session.session.refresh_token };
}

export interface CreatedClient {
  id: string;
  client_id: string;
  client_secret: string;
  name: string;
  description: string;
  scopes: string[];
  audiences: string[];
  access_token_ttl: number | null;
  status: 'active' | 'disabled';
  created_by: string | null;
  acts_for_creator: boolean;
  created_at: string;
  updated_at: string;
  previous_secret_expires_at: string | null;
}

export async function createClient(
  app: FastifyInstance,
  token: string,
  body: {
    name?: string;
    description?: string;
    scopes: string[];
    audiences?: string[];
    access_token_ttl?: number;
  },
): Promise<CreatedClient> {
  const res = await app.inject({
    method: 'POST',
    url: '/v1/clients',
    headers: bearer(token),
    payload: { name: body.name ?? `client-${randomUUID().slice(0, 8)}`, ...body },
  });
  expect(res.statusCode, res.body).toBe(201);
  return res.json() as CreatedClient;
}

export const basic = (clientId: string, secret: string) => ({
  authorization: basicAuthorization(clientId, secret),
});

/** A form-encoded POST, as OAuth clients send. */
export function form(
  app: FastifyInstance,
  url: string,
  params: Record<string, string | string[]>,
  headers: Record<string, string> = {},
) {
  const body = new URLSearchParams();
  for (const [k, v] of Object.entries(params))
    for (const one of Array.isArray(v) ? v : [v]) body.append(k, one);
  return app.inject({
    method: 'POST',
    url,
    headers: { 'content-type': 'application/x-www-form-urlencoded', ...headers },
    payload: body.toString(),
  } satisfies InjectOptions);
}

/** client_credentials with HTTP Basic; expects success and returns the token response. */
export async function clientToken(
  app: FastifyInstance,
  client: { client_id: string; client_secret: string },
  params: Record<string, string | string[]> = {},
) {
  const res = await form(
    app,
    '/oauth/token',
    { grant_type: 'client_credentials', ...params },
    basic(client.client_id, client.client_secret),
  );
  expect(res.statusCode, res.body).toBe(200);
  return res.json() as { access_token: string; token_type: string; expires_in: number; scope: string };
}

export async function introspect(
  app: FastifyInstance,
  token: string,
  caller: Record<string, string>,
  extra: Record<string, string> = {},
) {
  const res = await form(app, '/oauth/introspect', { token, ...extra }, caller);
  expect(res.statusCode, res.body).toBe(200);
  return res.json() as Record<string, unknown>;
}

/**
 * A client acting for a creator who holds none of its scopes now gets no token (an empty one would
 * still say "this is that service").
 */
export async function expectNoClientToken(
  app: FastifyInstance,
  client: { client_id: string; client_secret: string },
) {
  const res = await form(
    app,
    '/oauth/token',
    { grant_type: 'client_credentials' },
    basic(client.client_id, client.client_secret),
  );
  expect(res.statusCode, res.body).toBe(400);
  expect(res.json()).toMatchObject({
    error: 'invalid_scope',
    error_description: 'The user this client acts for holds none of its scopes now',
  });
}
