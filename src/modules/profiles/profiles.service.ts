import type { Database } from '../../db/client.js';
import { notFound, notYours } from '../../lib/errors.js';
import { type EventBus, inTransaction } from '../../lib/events.js';
import { hasPermission } from '../../lib/permissions.js';
import {
  type AuditService,
  changedFields,
  effectivePatch,
  type RequestContext,
} from '../audit/audit.service.js';
import type { ProfilePatch, ProfileRow, ProfilesRepository } from './profiles.repository.js';

export function createProfilesService(deps: {
  db: Database;
  repo: ProfilesRepository;
  audit: AuditService;
  events: EventBus;
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
      return inTransaction(deps.db, deps.events, async (tx, emit) => {
        const current = await deps.repo.findByUserIdForUpdate(userId, tx);
        if (!current) throw notFound('profile');
        // What is already so is no change: nothing written, no event.
        const effective = effectivePatch(patch, current);
        if (changedFields(effective).length === 0) return current;
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
    },
  };
}

export type ProfilesService = ReturnType<typeof createProfilesService>;
