import { boolean, index, integer, pgTable, text, timestamp, uuid } from 'drizzle-orm/pg-core';
import { emailTokens } from './sessions.js';
import { users } from './users.js';

/**
 * Mail on its way (src/modules/mail/mail-outbox.ts): written with what it is about, sent after the
 * commit, kept for retries while the mail server refuses it. The body is encrypted under
 * KEY_ENCRYPTION_KEY, since it may carry a link's token. A row goes once the mail is taken, once it
 * expires or its link is used, replaced or discarded (dropped, logged and counted), and with its user.
 */
export const mailOutbox = pgTable(
  'mail_outbox',
  {
    id: uuid('id').primaryKey().defaultRandom(),
    /** What the mail is (`password_reset`, `email_confirmation`, `notice`), for the log and the metrics. */
    kind: text('kind').notNull(),
    recipient: text('recipient').notNull(),
    subject: text('subject').notNull(),
    /** The text, AES-256-GCM under KEY_ENCRYPTION_KEY. */
    bodyEncrypted: text('body_encrypted').notNull(),
    userId: uuid('user_id').references(() => users.id, { onDelete: 'cascade' }),
    /** The mailed link the mail carries (null once it is gone: the mail is then dropped, not sent). */
    emailTokenId: uuid('email_token_id').references(() => emailTokens.id, { onDelete: 'set null' }),
    /** Whether the mail carries a link, so that one whose link went is told from a notice. */
    carriesLink: boolean('carries_link').notNull().default(false),
    /** Sends tried so far. */
    attempts: integer('attempts').notNull().default(0),
    nextAttemptAt: timestamp('next_attempt_at', { withTimezone: true, precision: 3 }).notNull(),
    expiresAt: timestamp('expires_at', { withTimezone: true, precision: 3 }).notNull(),
    createdAt: timestamp('created_at', { withTimezone: true, precision: 3 }).notNull().defaultNow(),
    lastError: text('last_error'),
  },
  (t) => [
    index('mail_outbox_due_idx').on(t.nextAttemptAt),
    index('mail_outbox_user_idx').on(t.userId),
    index('mail_outbox_token_idx').on(t.emailTokenId),
    // What the hourly retention purge looks for (src/modules/housekeeping/retention.ts), without a scan.
    index('mail_outbox_expires_idx').on(t.expiresAt),
  ],
);
