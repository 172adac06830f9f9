import { sql } from 'drizzle-orm';
import {
  type AnyPgColumn,
  boolean,
  index,
  integer,
  pgTable,
  text,
  timestamp,
  uuid,
} from 'drizzle-orm/pg-core';
import { users } from './users.js';

export const apiKeys = pgTable(
  'api_keys',
  {
    id: uuid('id').primaryKey().defaultRandom(),
    lookupId: text('lookup_id').notNull().unique(),
    ownerId: uuid('owner_id')
      .notNull()
      .references(() => users.id, { onDelete: 'cascade' }),
    name: text('name').notNull(),
    /** HMAC-SHA-256 of the secret under the server pepper. */
    secretHash: text('secret_hash').notNull(),
    previousSecretHash: text('previous_secret_hash'),
    previousSecretExpiresAt: timestamp('previous_secret_expires_at', { withTimezone: true, precision: 3 }),
    /**
     * When the current secret was issued: the key's creation, or its last rotation. Null for a key
     * made before it was recorded (its creation, unless it was rotated then).
     */
    secretIssuedAt: timestamp('secret_issued_at', { withTimezone: true, precision: 3 }),
    /** When the secret the last rotation replaced was issued (null: not recorded). */
    previousSecretIssuedAt: timestamp('previous_secret_issued_at', { withTimezone: true, precision: 3 }),
    prefix: text('prefix').notNull(),
    lastFour: text('last_four').notNull(),
    scopes: text('scopes').array().notNull().default(sql`'{}'::text[]`),
    expiresAt: timestamp('expires_at', { withTimezone: true, precision: 3 }),
    revokedAt: timestamp('revoked_at', { withTimezone: true, precision: 3 }),
    lastUsedAt: timestamp('last_used_at', { withTimezone: true, precision: 3 }),
    createdAt: timestamp('created_at', { withTimezone: true, precision: 3 }).notNull().defaultNow(),
    updatedAt: timestamp('updated_at', { withTimezone: true, precision: 3 }).notNull().defaultNow(),
    /** The key that created this one (a request authenticated by an API key); revoking it revokes this. */
    parentId: uuid('parent_id').references((): AnyPgColumn => apiKeys.id, { onDelete: 'set null' }),
  },
  (t) => [index('api_keys_owner_idx').on(t.ownerId), index('api_keys_parent_idx').on(t.parentId)],
);

export const clients = pgTable(
  'clients',
  {
    id: uuid('id').primaryKey().defaultRandom(),
    clientId: text('client_id').notNull().unique(),
    name: text('name').notNull(),
    description: text('description').notNull().default(''),
    secretHash: text('secret_hash').notNull(),
    previousSecretHash: text('previous_secret_hash'),
    previousSecretExpiresAt: timestamp('previous_secret_expires_at', { withTimezone: true, precision: 3 }),
    scopes: text('scopes').array().notNull().default(sql`'{}'::text[]`),
    audiences: text('audiences').array().notNull().default(sql`'{}'::text[]`),
    accessTokenTtl: integer('access_token_ttl'),
    status: text('status', { enum: ['active', 'disabled'] })
      .notNull()
      .default('active'),
    createdBy: uuid('created_by').references(() => users.id, { onDelete: 'set null' }),
    /**
     * Registered by a user who is not an administrator: the client acts within its creator's current
     * permissions (nothing once the creator is disabled or deleted), as an API key does.
     */
    actsForCreator: boolean('acts_for_creator').notNull().default(false),
    /**
     * Disabled by an administrator (a holder of `*`): only an administrator turns it back on. False
     * while active, and for a client its creator (or the service, for a creator deleted) disabled.
     */
    disabledByAdministrator: boolean('disabled_by_administrator').notNull().default(false),
    createdAt: timestamp('created_at', { withTimezone: true, precision: 3 }).notNull().defaultNow(),
    updatedAt: timestamp('updated_at', { withTimezone: true, precision: 3 }).notNull().defaultNow(),
  },
  // One creator's clients: counted against MAX_CLIENTS_PER_USER, listed oldest first (the keyset of
  // `list`), those acting for them, and those a user's deletion sets to no creator (ON DELETE SET NULL).
  (t) => [index('clients_created_by_idx').on(t.createdBy, t.createdAt, t.id)],
);
