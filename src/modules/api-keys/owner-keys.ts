import type { Executor } from '../../db/client.js';
import type { AuthEvent } from '../../lib/events.js';
import type { AuditService, RequestContext } from '../audit/audit.service.js';
import type { ApiKeysRepository } from './api-keys.repository.js';

/**
 * One pass revoking every key of `ownerId` not yet revoked, on `tx`: each audited as `api_key.revoked`
 * with `reason`, and dropped from every instance's caches once `tx` commits. The number revoked.
 * Callers run passes until one finds none: a statement that waited for a concurrent creation's lock
 * (a key minted by a key holds its parent) does not see the row that creation inserted; the next
 * pass does, and a creation that comes later finds its parent revoked.
 */
export async function revokeKeysOfOwner(
  deps: { apiKeys: Pick<ApiKeysRepository, 'revokeAllOfOwner'>; audit: AuditService },
  tx: Executor,
  ownerId: string,
  at: Date,
  context: RequestContext,
  reason: string,
  emit: (event: AuthEvent) => void,
): Promise<number> {
  const keys = await deps.apiKeys.revokeAllOfOwner(ownerId, at, tx);
  await deps.audit.record(
    tx,
    context,
    keys.map((key) => ({
      type: 'api_key.revoked',
      subjectId: key.id,
      data: { owner_id: ownerId, prefix: key.prefix, reason },
    })),
  );
  for (const key of keys) emit({ type: 'api_key_changed', lookupId: key.lookupId });
  return keys.length;
}
