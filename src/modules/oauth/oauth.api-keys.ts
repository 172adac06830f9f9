import { limitedAddress } from '../../lib/client-address.js';
import { isAppError } from '../../lib/errors.js';
import type { RequestContext } from '../audit/audit.service.js';
import {
  type ApiKeysService,
  presentedExpiresAt,
  presentedIssuedAt,
  type Verification,
} from '../api-keys/api-keys.service.js';
import type { ApiKeyTokenPort } from './oauth.service.js';

type Inspected = NonNullable<Awaited<ReturnType<ApiKeyTokenPort['inspect']>>>;

/** API keys as introspection and revocation see them, over the API-keys module's own verification. */
export function apiKeysForOAuth(
  apiKeys: Pick<ApiKeysService, 'verify' | 'verifyPresented' | 'revoke'>,
): ApiKeyTokenPort {
  // The service hands back the same frozen verification while the key's rows and owner stay cached:
  // what introspection reads of it is made once per verification, as the key's principal is.
  const inspected = new WeakMap<Verification, Inspected>();
  return {
    async inspect(key: string) {
      const verified = await apiKeys.verify(key);
      if (!verified.valid) return undefined;
      let made = inspected.get(verified);
      if (!made) {
        made = Object.freeze({
          keyId: verified.key.id,
          ownerId: verified.key.ownerId,
          // What the key may do now: its scopes within its owner's current permissions.
          scopes: verified.scopes,
          // When this string stops working (RFC 7662 §2.2 `exp`): a secret a rotation replaced ends with
          // its grace, or with the key if that comes first; a resource server caches no longer than that.
          expiresAt: presentedExpiresAt(verified.key, verified.previous),
          // When this string was issued (`iat`): the key's creation, or the rotation that made it.
          issuedAt: presentedIssuedAt(verified.key, verified.previous),
        });
        inspected.set(verified, made);
      }
      return made;
    },
    async revokeOwned(key: string, ownerId: string, context: RequestContext) {
      // Its holder presents it (not a service for its clients, as in `inspect`): one that names no key
      // counts against the caller's address, as a request's credential does.
      const verified = await apiKeys.verifyPresented(key, limitedAddress(context.ip));
      if (!verified.valid) return 'done' as const;
      if (verified.key.ownerId !== ownerId) return 'not_owned' as const;
      try {
        await apiKeys.revoke(
          { userId: ownerId, grantor: { kind: 'user', userId: ownerId, permissions: [] } },
          verified.key.id,
          context,
        );
      } catch (err) {
        // Revoked meanwhile by another request: RFC 7009 answers 200 all the same.
        if (isAppError(err) && err.code === 'not_found') return 'done' as const;
        throw err;
      }
      return 'done' as const;
    },
  };
}
