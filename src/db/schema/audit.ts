import { index, jsonb, pgTable, text, timestamp, uuid } from 'drizzle-orm/pg-core';

/** Append-only: rows outlive the users they mention, so ids here are not foreign keys. */
export const auditEvents = pgTable(
  'audit_events',
  {
    id: uuid('id').primaryKey().defaultRandom(),
    type: text('type').notNull(),
    actorType: text('actor_type', { enum: ['user', 'service', 'api_key', 'anonymous', 'system'] }).notNull(),
    actorId: text('actor_id'),
    /** Which of the actor's credentials acted: the session of a user's token, or the API key. */
    credentialId: text('credential_id'),
    subjectId: text('subject_id'),
    outcome: text('outcome', { enum: ['success', 'failure'] })
      .notNull()
      .default('success'),
    ip: text('ip'),
    userAgent: text('user_agent'),
    requestId: text('request_id'),
    data: jsonb('data').$type<Record<string, unknown>>().notNull().default({}),
    createdAt: timestamp('created_at', { withTimezone: true, precision: 3 }).notNull().defaultNow(),
  },
  (t) => [
    index('audit_events_created_idx').on(t.createdAt, t.id),
    index('audit_events_actor_idx').on(t.actorId, t.createdAt),
    index('audit_events_type_idx').on(t.type, t.createdAt),
    // "What happened to this user, key or client": the subject's events, newest first.
    index('audit_events_subject_idx').on(t.subjectId, t.createdAt),
  ],
);
