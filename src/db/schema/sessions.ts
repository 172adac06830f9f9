import { sql } from 'drizzle-orm';
import { index, pgTable, primaryKey, text, timestamp, uuid } from 'drizzle-orm/pg-core';
import { users } from './users.js';

/** A session is one refresh-token family: every rotation stays in it, and reuse revokes all of it. */
export const sessions = pgTable(
  'sessions',
  {
    id: uuid('id').primaryKey().defaultRandom(),
    userId: uuid('user_id')
      .notNull()
      .references(() => users.id, { onDelete: 'cascade' }),
    clientId: text('client_id'),
    userAgent: text('user_agent'),
    ip: text('ip'),
    createdAt: timestamp('created_at', { withTimezone: true, precision: 3 }).notNull().defaultNow(),
    lastUsedAt: timestamp('last_used_at', { withTimezone: true, precision: 3 }).notNull().defaultNow(),
    idleExpiresAt: timestamp('idle_expires_at', { withTimezone: true, precision: 3 }).notNull(),
    expiresAt: timestamp('expires_at', { withTimezone: true, precision: 3 }).notNull(),
    revokedAt: timestamp('revoked_at', { withTimezone: true, precision: 3 }),
    revokedReason: text('revoked_reason'),
    /**
     * How the user authenticated when the session opened (RFC 8176 values: `pwd`, `otp`, `mfa`…),
     * carried as the `amr` claim of every access token the session issues.
     */
    amr: text('amr').array().notNull().default(sql`'{}'::text[]`),
    /**
     * A session opened by exchanging a Supabase access token: when the user signed in at Supabase
     * (the newest `amr` timestamp of that token, which Supabase's refreshes keep), what a recent
     * sign-in is measured from where it stands in for a password. Null for every other session, and
     * for a token that does not say.
     */
    authenticatedAt: timestamp('authenticated_at', { withTimezone: true, precision: 3 }),
  },
  (t) => [
    index('sessions_user_idx').on(t.userId),
    // A user's sessions not ended by a revocation, least recently used first: what a sign-in reads to
    // keep the user within MAX_SESSIONS_PER_USER (src/modules/auth/sessions.service.ts), without the
    // sessions it ended before (evicted, signed out), which stay until the retention purge.
    index('sessions_user_live_idx').on(t.userId, t.lastUsedAt).where(sql`${t.revokedAt} is null`),
    // When the session ended (the first of its revocation, idle expiry and absolute expiry): what the
    // hourly retention purge looks for (src/modules/housekeeping/retention.ts), without a scan.
    index('sessions_ended_idx').on(
      sql`least(coalesce(${t.revokedAt}, 'infinity'::timestamptz), ${t.idleExpiresAt}, ${t.expiresAt})`,
    ),
  ],
);

export const refreshTokens = pgTable(
  'refresh_tokens',
  {
    id: uuid('id').primaryKey().defaultRandom(),
    sessionId: uuid('session_id')
      .notNull()
      .references(() => sessions.id, { onDelete: 'cascade' }),
    /** HMAC-SHA-256 of the token under the server pepper; the token itself is never stored. */
    tokenHash: text('token_hash').notNull().unique(),
    createdAt: timestamp('created_at', { withTimezone: true, precision: 3 }).notNull().defaultNow(),
    rotatedAt: timestamp('rotated_at', { withTimezone: true, precision: 3 }),
  },
  (t) => [index('refresh_tokens_session_idx').on(t.sessionId)],
);

/**
 * Revocations every instance holds in memory until they expire: an access token's `jti`, a session
 * (`sid`: every token of it), or a subject (`sub`: every token issued before `revoked_at`, e.g. a
 * disabled or deleted user). A row is useless once `expires_at` (the longest token lifetime) passed.
 */
export const revocations = pgTable(
  'revocations',
  {
    kind: text('kind', { enum: ['jti', 'session', 'subject'] }).notNull(),
    value: text('value').notNull(),
    revokedAt: timestamp('revoked_at', { withTimezone: true, precision: 3 }).notNull().defaultNow(),
    expiresAt: timestamp('expires_at', { withTimezone: true, precision: 3 }).notNull(),
  },
  (t) => [primaryKey({ columns: [t.kind, t.value] }), index('revocations_expires_idx').on(t.expiresAt)],
);

/**
 * A token mailed to a user's address (built-in provider): a password reset link's, an email
 * confirmation link's, or an email change's. One live per user and purpose, since a new mail replaces
 * the previous one (an email change mails two at once, to the new address and the current one: both
 * live until the change applies); used once, then kept with `used_at` until the retention purge. Only
 * its HMAC under the server pepper is stored, as for refresh tokens; `email` is the address it was
 * mailed to, and `new_email` the address an email change moves the account to.
 */
export const emailTokens = pgTable(
  'email_tokens',
  {
    id: uuid('id').primaryKey().defaultRandom(),
    userId: uuid('user_id')
      .notNull()
      .references(() => users.id, { onDelete: 'cascade' }),
    purpose: text('purpose', {
      enum: ['password_reset', 'email_confirmation', 'email_change', 'magic_link'],
    }).notNull(),
    tokenHash: text('token_hash').notNull().unique(),
    email: text('email').notNull(),
    newEmail: text('new_email'),
    /**
     * An email change asked for by an administrator, not by the user: who (a user id, or a service's
     * client id).
     */
    requestedBy: text('requested_by'),
    createdAt: timestamp('created_at', { withTimezone: true, precision: 3 }).notNull().defaultNow(),
    expiresAt: timestamp('expires_at', { withTimezone: true, precision: 3 }).notNull(),
    usedAt: timestamp('used_at', { withTimezone: true, precision: 3 }),
  },
  (t) => [
    index('email_tokens_user_idx').on(t.userId, t.purpose),
    index('email_tokens_expires_idx').on(t.expiresAt),
  ],
);
