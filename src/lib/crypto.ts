import { createCipheriv, createDecipheriv, createHmac, randomBytes, timingSafeEqual } from 'node:crypto';
import { crc32 } from 'node:zlib';

const BASE62 = '0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz';

/** `length` base62 characters from a byte source, without modulo bias (rejection sampling). */
function base62From(length: number, more: (size: number) => Buffer): string {
  let out = '';
  while (out.length < length) {
    for (const b of more(Math.ceil((length - out.length) * 1.3) + 8)) {
      if (b < 248) out += BASE62[b % 62];
      if (out.length === length) break;
    }
  }
  return out;
}

/** `length` base62 characters from the CSPRNG. */
export const randomBase62 = (length: number): string => base62From(length, randomBytes);

export function base62FromNumber(n: number, width: number): string {
  let out = '';
  let v = n >>> 0;
  for (let i = 0; i < width; i++) {
    out = BASE62[v % 62] + out;
    v = Math.floor(v / 62);
  }
  return out;
}

/** CRC32 of the text as 6 base62 characters: a typo detector, not a security control. */
export function checksum(text: string): string {
  return base62FromNumber(crc32(text), 6);
}

/** HMAC-SHA-256 under the server pepper, base64url. Right for high-entropy secrets (ASVS 11.5.1). */
export function keyedHash(pepper: Buffer, value: string): string {
  return createHmac('sha256', pepper).update(value).digest('base64url');
}

/** What `constantTimeEqual` hashes both sides under: random, and this process's alone. */
const COMPARISON_KEY = randomBytes(32);

/**
 * Whether two strings are equal, in a time that tells neither where they differ nor whether their
 * lengths do: both are reduced to an HMAC-SHA-256 under a per-process random key, and the two 32-byte
 * digests compared with timingSafeEqual (a comparison of the strings themselves is only constant-time
 * for equal lengths). About two HMACs' cost: for two digests of one fixed length, `digestsEqual`.
 */
export function constantTimeEqual(a: string, b: string): boolean {
  return timingSafeEqual(
    createHmac('sha256', COMPARISON_KEY).update(a).digest(),
    createHmac('sha256', COMPARISON_KEY).update(b).digest(),
  );
}

/**
 * Two digests of one fixed length (keyedHash outputs, checksums), compared in constant time without
 * hashing them again: the secret and credential checks, where a key or a client is verified. Each
 * caller brings what was presented to that length first (an HMAC of it, a checksum of a token whose
 * length was checked), so lengths differ only for a malformed stored value, and the early `false` then
 * tells a caller nothing about what is compared.
 */
export function digestsEqual(a: string, b: string): boolean {
  const ab = Buffer.from(a);
  const bb = Buffer.from(b);
  return ab.length === bb.length && timingSafeEqual(ab, bb);
}

/** AES-256-GCM; the output is base64(iv | tag | ciphertext). */
export function encrypt(key: Buffer, plaintext: string): string {
  const iv = randomBytes(12);
  const cipher = createCipheriv('aes-256-gcm', key, iv);
  const body = Buffer.concat([cipher.update(plaintext, 'utf8'), cipher.final()]);
  return Buffer.concat([iv, cipher.getAuthTag(), body]).toString('base64');
}

/**
 * What is stored under KEY_ENCRYPTION_KEY (private signing keys, two-step verification secrets, queued
 * mail) cannot be decrypted: it is not the key that encrypted it (set for the first time after running
 * on a generated one, or changed). The message says so and what to do; the server and the scripts
 * print it without a stack trace.
 */
export class KeyEncryptionKeyMismatchError extends Error {
  override name = 'KeyEncryptionKeyMismatchError';
}

/** What else KEY_ENCRYPTION_KEY protects, for the messages that tell an operator it does not fit. */
export const KEY_ENCRYPTION_KEY_REMEDY =
  'Set KEY_ENCRYPTION_KEY to that key (a development setup generated one into ' +
  'DATA_DIR/secrets/key-encryption-key). It also encrypts the private signing keys, the secrets of ' +
  'two-step verification and queued mail: without it, starting over means deleting the rows of ' +
  'signing_keys (every token issued so far stops verifying) and of mfa_factors (two-step verification ' +
  'is off for those users until they set it up again)';

export function decrypt(key: Buffer, sealed: string): string {
  const raw = Buffer.from(sealed, 'base64');
  const decipher = createDecipheriv('aes-256-gcm', key, raw.subarray(0, 12));
  decipher.setAuthTag(raw.subarray(12, 28));
  return Buffer.concat([decipher.update(raw.subarray(28)), decipher.final()]).toString('utf8');
}

/**
 * Secrets with a readable type prefix, a public lookup id, a secret and a checksum:
 * `<prefix>_<lookup>_<secret><crc>`. Secret scanners match the prefix; a typo or a foreign string
 * fails the checksum before any database read.
 */
export interface SecretFormat {
  prefix: string;
  lookupLength: number;
  secretLength: number;
}

export interface ParsedSecret {
  lookupId: string;
  secret: string;
}

const CHECKSUM_LENGTH = 6;

export function generateSecret(format: SecretFormat, lookupId = randomBase62(format.lookupLength)) {
  const secret = randomBase62(format.secretLength);
  const body = `${format.prefix}_${lookupId}_${secret}`;
  return { token: body + checksum(body), lookupId, secret };
}

/**
 * A secret of `format` derived from `seed` under `key` (HMAC-SHA-512 blocks): the same seed gives the
 * same secret, and without the key nothing about it can be told from the seed.
 */
export function derivedSecret(format: SecretFormat, key: Buffer, seed: string): string {
  let block = 0;
  const text = base62From(format.lookupLength + format.secretLength, () =>
    createHmac('sha512', key).update(`${block++}:${seed}`).digest(),
  );
  const body = `${format.prefix}_${text.slice(0, format.lookupLength)}_${text.slice(format.lookupLength)}`;
  return body + checksum(body);
}

export function parseSecret(format: SecretFormat, token: string): ParsedSecret | undefined {
  const expectedLength =
    format.prefix.length + 2 + format.lookupLength + format.secretLength + CHECKSUM_LENGTH;
  if (token.length !== expectedLength || !token.startsWith(`${format.prefix}_`)) return undefined;
  const body = token.slice(0, -CHECKSUM_LENGTH);
  if (!/^[0-9A-Za-z]+$/.test(body.slice(format.prefix.length + 1).replace('_', ''))) return undefined;
  if (!digestsEqual(checksum(body), token.slice(-CHECKSUM_LENGTH))) return undefined;
  const lookupId = body.slice(format.prefix.length + 1, format.prefix.length + 1 + format.lookupLength);
  if (body[format.prefix.length + 1 + format.lookupLength] !== '_') return undefined;
  return { lookupId, secret: body.slice(format.prefix.length + 2 + format.lookupLength) };
}

/** 32 random bytes ≈ 43 base62 characters (≥ 256 bits; SECURITY.md asks ≥ 128). */
export const API_KEY_FORMAT: SecretFormat = { prefix: 'pak', lookupLength: 12, secretLength: 43 };
export const CLIENT_SECRET_FORMAT: SecretFormat = { prefix: 'pcs', lookupLength: 12, secretLength: 43 };
export const REFRESH_TOKEN_FORMAT: SecretFormat = { prefix: 'prt', lookupLength: 12, secretLength: 43 };
export const PASSWORD_RESET_FORMAT: SecretFormat = { prefix: 'prs', lookupLength: 12, secretLength: 43 };
export const EMAIL_CONFIRMATION_FORMAT: SecretFormat = { prefix: 'pec', lookupLength: 12, secretLength: 43 };
/** An email change's link, to the new address or to the current one. */
export const EMAIL_CHANGE_FORMAT: SecretFormat = { prefix: 'pce', lookupLength: 12, secretLength: 43 };
/** A mailed sign-in link (passwordless). */
export const MAGIC_LINK_FORMAT: SecretFormat = { prefix: 'pml', lookupLength: 12, secretLength: 43 };
/** A sign-in waiting for its second factor (`mfa_token`). */
export const MFA_TOKEN_FORMAT: SecretFormat = { prefix: 'pmf', lookupLength: 12, secretLength: 43 };

/**
 * A UUID version 7 (RFC 9562 §5.7): the millisecond `ms` in its first 48 bits, then random bits. An
 * access token's `jti`, so the token carries when it was issued to the millisecond, where `iat` has
 * whole seconds: a revocation at 12:00:00.400 then covers the tokens issued before it, and not one
 * issued at 12:00:00.600, after a user or client is re-enabled.
 */
export function uuidV7(ms: number): string {
  const bytes = randomBytes(16);
  bytes.writeUIntBE(ms, 0, 6);
  bytes[6] = (bytes[6]! & 0x0f) | 0x70;
  bytes[8] = (bytes[8]! & 0x3f) | 0x80;
  const hex = bytes.toString('hex');
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

/** The millisecond a UUID version 7 was made at; undefined for any other string (a v4 `jti`). */
export function uuidV7Ms(id: string): number | undefined {
  if (id.length !== 36 || id.charCodeAt(14) !== 55 /* '7' */ || id.charCodeAt(8) !== 45 /* '-' */)
    return undefined;
  const ms = Number.parseInt(id.slice(0, 8) + id.slice(9, 13), 16);
  return Number.isSafeInteger(ms) ? ms : undefined;
}
