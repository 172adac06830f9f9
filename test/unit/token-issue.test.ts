import { generateKeyPairSync } from 'node:crypto';
import type { FastifyRequest } from 'fastify';
import pino from 'pino';
import { describe, expect, it } from 'vitest';
import type { Signer } from '../../src/lib/signer.js';
import type {
  ActiveSigningKey,
  SigningKeysService,
} from '../../src/modules/signing-keys/signing-keys.service.js';
import type { RevocationList } from '../../src/modules/tokens/revocations.service.js';
import { createTokenService } from '../../src/modules/tokens/tokens.service.js';
import { toAppError } from '../../src/plugins/error-handler.js';
import { createTestClock } from '../support/clock.js';

const request = { log: pino({ level: 'silent' }), url: '/oauth/token' } as unknown as FastifyRequest;

describe('tokens.issue', () => {
  it('answers 503 with Retry-After, not a 500, when the key is revoked during each of its three signatures', async () => {
    const signingKey = (): ActiveSigningKey => {
      const { privateKey, publicKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
      return { kid: crypto.randomUUID(), alg: 'ES256', key: publicKey, privateKey };
    };
    let signatures = 0;
    // Every key it signs with is revoked (gone from the verification keys) before its signature ends.
    const keys = {
      onKeyRemoved: () => undefined,
      signingKeyNow: signingKey,
      signingKey: async () => signingKey(),
      verificationKey: () => undefined,
    } as unknown as SigningKeysService;
    const signer = {
      sign: async () => {
        signatures++;
        return 'c2lnbmF0dXJl';
      },
    } as unknown as Signer;
    const tokens = createTokenService({
      keys,
      signer,
      revocations: { seen: () => 0 } as unknown as RevocationList,
      clock: createTestClock(),
      issuer: 'https://auth.example.test',
      audience: 'https://api.example.test',
      maxTtl: 3600,
    });

    const refused = await tokens
      .issue({
        sub: 'client',
        audience: 'https://api.example.test',
        ttlSeconds: 60,
        clientId: 'client',
        permissions: [],
      })
      .then(
        () => undefined,
        (err: unknown) => err,
      );
    expect(signatures).toBe(3);
    const answered = toAppError(refused, request);
    expect(answered).toMatchObject({ status: 503, code: 'service_unavailable' });
    expect(Number(answered.headers['retry-after'])).toBeGreaterThanOrEqual(1);
  });
});
