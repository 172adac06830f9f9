import { randomUUID } from 'node:crypto';
import type { FastifyInstance } from 'fastify';
import { expect } from 'vitest';
import { roles } from '../../src/db/schema/index.js';
import { bearer } from '../support/http.js';

export { createTestClock } from '../support/clock.js';

export interface CreatedKey {
  id: string;
  key: string;
  prefix: string;
  last_four: string;
  scopes: string[];
  owner_id: string;
  expires_at: string | null;
  created_at: string;
}

export async function createKey(
  app: FastifyInstance,
  token: string,
  body: { name?: string; scopes: string[]; expires_at?: string },
): Promise<CreatedKey> {
  const res = await app.inject({
    method: 'POST',
    url: '/v1/api-keys',
    headers: bearer(token),
    payload: { name: body.name ?? `key-${randomUUID().slice(0, 8)}`, ...body },
  });
  expect(res.statusCode, res.body).toBe(201);
  return res.json() as CreatedKey;
}

export const withKey = (key: string) => ({ 'x-api-key': key });

export async function verifyKey(app: FastifyInstance, verifierToken: string, key: string) {
  const res = await app.inject({
    method: 'POST',
    url: '/v1/api-keys/verify',
    headers: bearer(verifierToken),
    payload: { key },
  });
  expect(res.statusCode, res.body).toBe(200);
  return res.json() as Record<string, unknown>;
}

/**
 * Grants the user a new role holding `permissions`, as the authorization module will through HTTP:
 * the change, then the `user_changed` event every instance's caches listen for.
 */
export async function grantRole(
  app: FastifyInstance,
  userId: string,
  permissions: string[],
): Promise<string> {
  const name = `test-${randomUUID().slice(0, 12)}`;
  await app.services.db.insert(roles).values({ name, description: 'test role', permissions });
  await app.services.repos.users.assignRole(userId, name, null);
  app.services.events.applyLocally([{ type: 'user_changed', userId }]);
  return name;
}

export async function removeRole(app: FastifyInstance, userId: string, role: string, notify = true) {
  await app.services.repos.users.removeRole(userId, role);
  if (notify) app.services.events.applyLocally([{ type: 'user_changed', userId }]);
}

/** The key with one character of its secret changed (the checksum then no longer matches). */
export function withTypo(key: string, index = 30): string {
  const c = key[index]!;
  return key.slice(0, index) + (c === 'a' ? 'b' : 'a') + key.slice(index + 1);
}
