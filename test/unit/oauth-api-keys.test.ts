import { describe, expect, it } from 'vitest';
import type { ApiKeyRow } from '../../src/modules/api-keys/api-keys.repository.js';
import type { Verification } from '../../src/modules/api-keys/api-keys.service.js';
import { apiKeysForOAuth } from '../../src/modules/oauth/oauth.api-keys.js';

describe('API keys as introspection sees them', () => {
  const created = new Date('2026-01-01T00:00:00.000Z');
  const rotated = new Date('2026-02-01T00:00:00.000Z');
  const row = {
    id: 'key-1',
    ownerId: 'user-1',
    createdAt: created,
    expiresAt: null,
    secretIssuedAt: rotated,
    previousSecretIssuedAt: null,
    previousSecretExpiresAt: new Date('2026-02-02T00:00:00.000Z'),
  } as ApiKeyRow;
  const current: Verification = Object.freeze({ valid: true, key: row, scopes: ['a:b'], previous: false });
  const previous: Verification = Object.freeze({ valid: true, key: row, scopes: ['a:b'], previous: true });

  it('answers with the presented secret’s issue time, made once per verification', async () => {
    let answer = current;
    const verifications: string[] = [];
    const port = apiKeysForOAuth({
      verify: async (key: string) => {
        verifications.push(key);
        return answer;
      },
      verifyPresented: async () => {
        throw new Error('introspection verifies for the caller’s clients, not as their holder');
      },
      revoke: async () => undefined as never,
    });
    const first = await port.inspect('pak_current');
    expect(first).toMatchObject({ keyId: 'key-1', issuedAt: rotated, expiresAt: null });
    // The same verification (its rows and owner still cached): the same frozen answer, nothing made anew.
    expect(await port.inspect('pak_current')).toBe(first);
    expect(Object.isFrozen(first)).toBe(true);
    // The secret the rotation replaced, issued before it was recorded: the key's creation.
    answer = previous;
    expect(await port.inspect('pak_previous')).toMatchObject({
      issuedAt: created,
      expiresAt: row.previousSecretExpiresAt,
    });
    expect(verifications).toEqual(['pak_current', 'pak_current', 'pak_previous']);
  });
});
