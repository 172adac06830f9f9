import { eq } from 'drizzle-orm';
import type { Executor } from '../../db/client.js';
import { profiles } from '../../db/schema/index.js';

export type ProfileRow = typeof profiles.$inferSelect;
export type ProfilePatch = Partial<
  Pick<ProfileRow, 'displayName' | 'avatarUrl' | 'bio' | 'locale' | 'timezone' | 'metadata'>
>;

export function createProfilesRepository(db: Executor) {
  return {
    async findByUserId(userId: string, tx: Executor = db): Promise<ProfileRow | undefined> {
      const [row] = await tx.select().from(profiles).where(eq(profiles.userId, userId)).limit(1);
      return row;
    },
    /** The profile, locked until the transaction ends (a change decided on what it was). */
    async findByUserIdForUpdate(userId: string, tx: Executor): Promise<ProfileRow | undefined> {
      const [row] = await tx
        .select()
        .from(profiles)
        .where(eq(profiles.userId, userId))
        .limit(1)
        .for('update');
      return row;
    },
    async update(userId: string, patch: ProfilePatch, tx: Executor = db): Promise<ProfileRow | undefined> {
      const [row] = await tx
        .update(profiles)
        .set({ ...patch, updatedAt: new Date() })
        .where(eq(profiles.userId, userId))
        .returning();
      return row;
    },
  };
}

export type ProfilesRepository = ReturnType<typeof createProfilesRepository>;

export function toProfileDto(p: ProfileRow) {
  return {
    user_id: p.userId,
    display_name: p.displayName,
    avatar_url: p.avatarUrl,
    bio: p.bio,
    locale: p.locale,
    timezone: p.timezone,
    metadata: p.metadata,
    updated_at: p.updatedAt.toISOString(),
  };
}
