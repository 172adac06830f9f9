import type { Database } from '../../db/client.js';
import { AppError, notFound, notYours } from '../../lib/errors.js';
import { type EventBus, inTransaction } from '../../lib/events.js';
import { hasPermission } from '../../lib/permissions.js';
import type { GuessCounter } from '../../lib/throttle.js';
import {
  type AuditService,
  changedFields,
  effectivePatch,
  type RequestContext,
} from '../audit/audit.service.js';
import type { ProfilePatch, ProfileRow, ProfilesRepository } from './profiles.repository.js';

/**
 * Profile changes a user may make in a minute (with RATE_LIMIT_ENABLED): each writes an audit event and
 * tells every instance to drop its cached view of the user, so one token sending PATCHes in a loop
 * would fill the audit log and keep every instance busy. A frontend saving as the user types (debounced)
 * stays well under it.
 */
export const PROFILE_CHANGES_PER_MINUTE = 30;

export function createProfilesService(deps: {
  db: Database;
  repo: ProfilesRepository;
  audit: AuditService;
  events: EventBus;
  /** Profile changes per user in the current minute; none counted without it (limits off). */
  changes?: GuessCounter | undefined;
}) {
  return {
    async getOwn(userId: string): Promise<ProfileRow> {
      const profile = await deps.repo.findByUserId(userId);
      if (!profile) throw notFound('profile');
      return profile;
    },

    /**
     * Another user's profile needs profiles:read; without it, it does not exist (no IDOR oracle),
     * and the attempt is audited (`notYours`). Nothing is looked up for it, so whether that user
     * exists changes neither the answer nor the work: an id of nobody's is recorded all the same.
     */
    async getFor(
      viewer: { userId: string | undefined; permissions: string[] },
      userId: string,
    ): Promise<ProfileRow> {
      if (viewer.userId !== userId && !hasPermission(viewer.permissions, 'profiles:read'))
        throw notYours('profile', { action: 'profile.read', subjectId: userId });
      const profile = await deps.repo.findByUserId(userId);
      if (!profile) throw notFound('profile');
      return profile;
    },

    async update(userId: string, patch: ProfilePatch, context: RequestContext): Promise<ProfileRow> {
      // Counted before the transaction (requests at once, on any instance, see each other's), and
      // given back when nothing was written: a change that is no change, or one that failed.
      const slot = await deps.changes?.reserve(userId);
      if (slot && slot.retryAfter > 0)
        throw new AppError('rate_limited', {
          detail: `At most ${PROFILE_CHANGES_PER_MINUTE} profile changes a minute; retry in ${slot.retryAfter} s`,
          headers: { 'retry-after': String(slot.retryAfter) },
        });
      let changed = false;
      const applied = inTransaction(deps.db, deps.events, async (tx, emit) => {
        const current = await deps.repo.findByUserIdForUpdate(userId, tx);
        if (!current) throw notFound('profile');
        // What is already so is no change: nothing written, no event.
        const effective = effectivePatch(patch, current);
        if (changedFields(effective).length === 0) return current;
        changed = true;
        const profile = await deps.repo.update(userId, effective, tx);
        if (!profile) throw notFound('profile');
        // Every instance's cached /v1/auth/me view shows the profile.
        emit({ type: 'user_changed', userId });
        await deps.audit.record(tx, context, {
          type: 'profile.updated',
          subjectId: userId,
          data: { fields: changedFields(effective) },
        });
        return profile;
      });
      try {
        const profile = await applied;
        if (!changed) await slot?.release();
        return profile;
      } catch (err) {
        await slot?.release();
        throw err;
      }
    },
  };
}

export type ProfilesService = ReturnType<typeof createProfilesService>;
