import { jsonb, pgTable, text, timestamp } from 'drizzle-orm/pg-core';

/**
 * Token signing keys. Lifecycle: next (published, not yet signing) → active (signs) → retiring
 * (published, no longer signs) → retired (unpublished once every token it signed has expired + 10 min).
 */
export const signingKeys = pgTable('signing_keys', {
  kid: text('kid').primaryKey(),
  alg: text('alg', { enum: ['ES256', 'EdDSA'] }).notNull(),
  state: text('state', { enum: ['next', 'active', 'retiring', 'retired'] }).notNull(),
  publicJwk: jsonb('public_jwk').$type<Record<string, unknown>>().notNull(),
  /** AES-256-GCM under KEY_ENCRYPTION_KEY: base64(iv | tag | ciphertext of the PKCS#8 PEM). */
  privateKeyEncrypted: text('private_key_encrypted').notNull(),
  createdAt: timestamp('created_at', { withTimezone: true, precision: 3 }).notNull().defaultNow(),
  activatedAt: timestamp('activated_at', { withTimezone: true, precision: 3 }),
  retiringAt: timestamp('retiring_at', { withTimezone: true, precision: 3 }),
  /** While retiring: published until this moment (last possible token expiry + 10 minutes). */
  publishUntil: timestamp('publish_until', { withTimezone: true, precision: 3 }),
});
