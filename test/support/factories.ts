import { eq } from 'drizzle-orm';
import type { FastifyInstance } from 'fastify';
import { decodeJwt } from 'jose';
import { expect } from 'vitest';
import { sessions } from '../../src/db/schema/index.js';
import { uniqueEmail } from './app.js';

export const PASSWORD = 'correct horse battery staple';

export interface TestUser {
  id: string;
  email: string;
  password: string;
  accessToken: string;
  refreshToken: string;
}

/** Registers a user through HTTP and returns their tokens. */
export async function registerUser(
  app: FastifyInstance,
  tag = 'user',
  password = PASSWORD,
): Promise<TestUser> {
  const email = uniqueEmail(tag);
  const res = await app.inject({ method: 'POST', url: '/v1/auth/register', payload: { email, password } });
  expect(res.statusCode, res.body).toBe(201);
  const body = res.json();
  return {
    id: body.user.id,
    email,
    password,
    accessToken: body.session.access_token,
    refreshToken: body.session.refresh_token,
  };
}

export async function login(app: FastifyInstance, email: string, password = PASSWORD) {
  const res = await app.inject({ method: 'POST', url: '/v1/auth/login', payload: { email, password } });
  expect(res.statusCode, res.body).toBe(200);
  return res.json() as { user: { id: string }; session: { access_token: string; refresh_token: string } };
}

/** An administrator disables or enables a user through the API; the answer, for its status. */
export function setUserStatus(
  app: FastifyInstance,
  adminToken: string,
  userId: string,
  status: 'active' | 'disabled',
) {
  return app.inject({
    method: 'PATCH',
    url: `/v1/users/${userId}`,
    headers: { authorization: `Bearer ${adminToken}` },
    payload: { status },
  });
}

/** A user holding the admin role: registered, granted directly in the database, logged in again. */
export async function createAdmin(app: FastifyInstance): Promise<TestUser> {
  const user = await registerUser(app, 'admin');
  await app.services.repos.users.assignRole(user.id, 'admin', null);
  const session = await login(app, user.email, user.password);
  return { ...user, accessToken: session.session.access_token, refreshToken: session.session.refresh_token };
}

/**
 * Two new sessions of the user, signed in and then set past their end: the first past its absolute
 * end, the second past its idle end (neither revoked). Their ids, in that order.
 */
export async function expiredSessions(app: FastifyInstance, email: string): Promise<[string, string]> {
  const past = new Date(Date.now() - 1000);
  const sidOf = async () => decodeJwt((await login(app, email)).session.access_token).sid as string;
  const absolute = await sidOf();
  const idle = await sidOf();
  await app.services.db
    .update(sessions)
    .set({ expiresAt: past, idleExpiresAt: past })
    .where(eq(sessions.id, absolute));
  await app.services.db.update(sessions).set({ idleExpiresAt: past }).where(eq(sessions.id, idle));
  return [absolute, idle];
}
