import { sql } from 'drizzle-orm';
import { bigint, index, integer, pgTable, text, timestamp, uniqueIndex, uuid } from 'drizzle-orm/pg-core';
import { sessions } from './sessions.js';
import { users } from './users.js';

/**
 * A user's second factor: a TOTP secret (RFC 6238), AES-256-GCM-encrypted under KEY_ENCRYPTION_KEY
 * since a code can only be checked with the secret itself. One per user; `verified_at` null while it
 * is being set up (no sign-in asks for it until a code from the app has proven the enrolment).
 */
export const mfaFactors = pgTable(
  'mfa_factors',
  {
    id: uuid('id').primaryKey().defaultRandom(),
    userId: uuid('user_id')
      .notNull()
      .references(() => users.id, { onDelete: 'cascade' }),
    type: text('type', { enum: ['totp'] }).notNull(),
    secretEncrypted: text('secret_encrypted').notNull(),
    createdAt: timestamp('created_at', { withTimezone: true, precision: 3 }).notNull().defaultNow(),
    verifiedAt: timestamp('verified_at', { withTimezone: true, precision: 3 }),
    lastUsedAt: timestamp('last_used_at', { withTimezone: true, precision: 3 }),
    /** The newest TOTP time step accepted: a code is good once (RFC 6238 §5.2). */
    lastUsedStep: bigint('last_used_step', { mode: 'number' }),
    /** Wrong codes in a row (sign-in and management alike); each past the fifth locks for longer. */
    failedAttempts: integer('failed_attempts').notNull().default(0),
    /** The last wrong code: a count a day older starts again. */
    lastFailedAt: timestamp('last_failed_at', { withTimezone: true, precision: 3 }),
    lockedUntil: timestamp('locked_until', { withTimezone: true, precision: 3 }),
    /** The last notice to the user of a code sent again (ASVS 2.8.5): at most one in a window. */
    reuseNoticedAt: timestamp('reuse_noticed_at', { withTimezone: true, precision: 3 }),
  },
  (t) => [
    uniqueIndex('mfa_factors_user_key').on(t.userId),
    // Set-ups never confirmed, by age: what the hourly retention purge deletes past MFA_SETUP_TTL
    // (src/modules/housekeeping/retention.ts), without a scan of every factor turned on.
    index('mfa_factors_pending_idx').on(t.createdAt).where(sql`${t.verifiedAt} is null`),
  ],
);

/**
 * One-use recovery codes for a lost authenticator, kept as HMACs under the pepper. A code is 50
 * bits, under the 112 that ASVS 2.6.2 lets go unsalted: each has its own random salt, hashed with it.
 */
export const mfaRecoveryCodes = pgTable(
  'mfa_recovery_codes',
  {
    id: uuid('id').primaryKey().defaultRandom(),
    userId: uuid('user_id')
      .notNull()
      .references(() => users.id, { onDelete: 'cascade' }),
    /** HMAC-SHA-256 under the pepper of the salt and the code (of the code alone with no salt). */
    codeHash: text('code_hash').notNull(),
    /**
     * The code's own random salt (128 bits, base64url). Null for a code made before 0022 (or by that
     * release, side by side), whose hash is of the code alone: checked so until used or replaced.
     */
    salt: text('salt'),
    createdAt: timestamp('created_at', { withTimezone: true, precision: 3 }).notNull().defaultNow(),
    usedAt: timestamp('used_at', { withTimezone: true, precision: 3 }),
  },
  (t) => [uniqueIndex('mfa_recovery_codes_user_code_key').on(t.userId, t.codeHash)],
);

/**
 * A sign-in that passed its password (or provider token) and waits for the second factor: the
 * `mfa_token` handed out, kept as an HMAC; used once, within minutes.
 */
export const mfaChallenges = pgTable(
  'mfa_challenges',
  {
    id: uuid('id').primaryKey().defaultRandom(),
    userId: uuid('user_id')
      .notNull()
      .references(() => users.id, { onDelete: 'cascade' }),
    tokenHash: text('token_hash').notNull().unique(),
    /** How the first factor was given: `auth.login` (password) or `auth.exchange` (provider token). */
    via: text('via', { enum: ['auth.login', 'auth.exchange', 'auth.magic_link'] }).notNull(),
    ip: text('ip'),
    userAgent: text('user_agent'),
    createdAt: timestamp('created_at', { withTimezone: true, precision: 3 }).notNull().defaultNow(),
    expiresAt: timestamp('expires_at', { withTimezone: true, precision: 3 }).notNull(),
    usedAt: timestamp('used_at', { withTimezone: true, precision: 3 }),
    /** The session the challenge opened. */
    sessionId: uuid('session_id').references(() => sessions.id, { onDelete: 'set null' }),
  },
  (t) => [
    index('mfa_challenges_expires_idx').on(t.expiresAt),
    index('mfa_challenges_user_idx').on(t.userId),
    // What a deleted session's ON DELETE SET NULL looks its challenges up by: without it each session
    // the retention purge deletes (2,000 a batch) scanned the table, past the statement timeout.
    index('mfa_challenges_session_idx').on(t.sessionId),
  ],
);
