import type { FastifyInstance } from 'fastify';
import { Secret, TOTP } from 'otpauth';
import { expect } from 'vitest';
import { PASSWORD } from './factories.js';
import { bearer } from './http.js';

export interface TurnedOn {
  /** The base32 secret the user's app holds. */
  secret: string;
  recoveryCodes: string[];
  /** The code the app shows at `now()` plus `steps` periods of 30 s. */
  code(steps?: number): string;
}

/** The code an authenticator app with this base32 secret shows at `timestamp` (ms). */
export const totpAt = (secret: string, timestamp: number) =>
  new TOTP({ secret: Secret.fromBase32(secret) }).generate({ timestamp });

/**
 * Starts setting up an authenticator app for the session of `accessToken` (201), not yet confirmed:
 * the base32 secret the app would hold.
 */
export async function startMfaSetUp(
  app: FastifyInstance,
  accessToken: string,
  password = PASSWORD,
): Promise<string> {
  const enrol = await app.inject({
    method: 'POST',
    url: '/v1/auth/mfa/totp',
    headers: bearer(accessToken),
    payload: { password },
  });
  expect(enrol.statusCode, enrol.body).toBe(201);
  return enrol.json().secret as string;
}

/**
 * Turns two-step verification on for the session of `accessToken`, through the API (set-up, then a
 * code from the app at `now()`, the app's clock: the test's, or the wall clock).
 */
export async function turnOnMfa(
  app: FastifyInstance,
  accessToken: string,
  now: () => number = Date.now,
  password = PASSWORD,
): Promise<TurnedOn> {
  const secret = await startMfaSetUp(app, accessToken, password);
  const code = (steps = 0) => totpAt(secret, now() + steps * 30_000);
  const on = await app.inject({
    method: 'POST',
    url: '/v1/auth/mfa/totp/activate',
    headers: bearer(accessToken),
    payload: { code: code() },
  });
  expect(on.statusCode, on.body).toBe(200);
  return { secret, recoveryCodes: on.json().recovery_codes, code };
}
