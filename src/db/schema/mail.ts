import { index, integer, pgTable, text, timestamp, uuid } from 'drizzle-orm/pg-core';
import { emailTokens } from './sessions.js';
import { users } from './users.js';

/**
 * Mail the mail server did not take when it was sent, kept for retries (src/modules/mail/mail-outbox.ts): the
 * body is encrypted under KEY_ENCRYPTION_KEY, since it may carry a link's token. A row goes once the
 * mail is taken, once it expires, with its user, and with the link it carries (by cascade; a link used
 * meanwhile is dropped before sending).
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
    /** The mailed link the mail carries: the mail is pointless once the link is used, replaced or gone. */
    emailTokenId: uuid('email_token_id').references(() => emailTokens.id, { onDelete: 'cascade' }),
    /** Sends tried so far, the first (the one that failed in the request) included. */
    attempts: integer('attempts').notNull().default(1),
    nextAttemptAt: timestamp('next_attempt_at', { withTimezone: true, precision: 3 }).notNull(),
    expiresAt: timestamp('expires_at', { withTimezone: true, precision: 3 }).notNull(),
    createdAt: timestamp('created_at', { withTimezone: true, precision: 3 }).notNull().defaultNow(),
    lastError: text('last_error'),
  },
  (t) => [
    index('mail_outbox_due_idx').on(t.nextAttemptAt),
    index('mail_outbox_user_idx').on(t.userId),
    index('mail_outbox_token_idx').on(t.emailTokenId),
  ],
);
