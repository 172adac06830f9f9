import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import argon2 from 'argon2';
import { AppError } from '../lib/errors.js';
import { PROJECT_ROOT } from '../lib/paths.js';

/** OWASP Password Storage CS: argon2id, m=19 MiB, t=2, p=1 is the floor; we use it exactly. */
export const ARGON2_OPTIONS = {
  type: argon2.argon2id,
  memoryCost: 19_456,
  timeCost: 2,
  parallelism: 1,
} as const;

export const COMMON_PASSWORDS_FILE = join(PROJECT_ROOT, 'data/common-passwords.txt');
let commonPasswords: Set<string> | undefined;

/** The list of common passwords cannot be read: no password could be checked. */
export class CommonPasswordsError extends Error {
  override name = 'CommonPasswordsError';
}

/**
 * data/common-passwords.txt, read once. The start reads it (createServices, and the server before it
 * opens the database), so an install without data/ stops there naming the file, instead of starting
 * and answering every registration and password change 500.
 */
export function loadCommonPasswords(): Set<string> {
  if (!commonPasswords) {
    let text: string;
    try {
      text = readFileSync(COMMON_PASSWORDS_FILE, 'utf8');
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      throw new CommonPasswordsError(
        `cannot read the list of common passwords ${COMMON_PASSWORDS_FILE} (${code ?? (err as Error).message}): ` +
          'it is part of the service, beside drizzle/; install data/ with it (the image copies it)',
        { cause: err },
      );
    }
    commonPasswords = new Set(
      text
        .split('\n')
        .filter((l) => l && !l.startsWith('#'))
        .map((l) => normalizePassword(l.trim()).toLowerCase()),
    );
  }
  return commonPasswords;
}

/**
 * A password as it is hashed and checked: Unicode NFKC (NIST SP 800-63B 5.1.1.2, ASVS 2.1), so that
 * one typed as "é" (U+00E9) on one keyboard and as "e" + U+0301 on another is the same password, as
 * are a full-width "Ａ" and "A". The providers apply it to every password they are given; the
 * strength check measures the normalised form.
 */
export const normalizePassword = (password: string): string => password.normalize('NFKC');

/**
 * ASVS 6.2: 8..128 characters (code points of the NFKC form, no truncation), no composition rules,
 * not a common password. `field` names the password in the 422's `errors` (`body.new_password` for a
 * change).
 */
export function checkPasswordStrength(raw: string, email?: string, field = 'body.password'): void {
  // What is hashed is the normalised form: its length is the password's, and a common password
  // typed in other code points (full-width letters, say) is still that password.
  const password = normalizePassword(raw);
  // Over 256 UTF-16 units is over 128 code points: not counted one by one.
  const length = password.length > 256 ? password.length : [...password].length;
  if (length < 8 || length > 128) {
    throw new AppError('weak_password', {
      detail: 'The password must be 8 to 128 characters long',
      errors: [{ field, message: 'must be 8 to 128 characters' }],
    });
  }
  const lowered = password.toLowerCase();
  if (loadCommonPasswords().has(lowered) || (email && lowered === normalizePassword(email).toLowerCase())) {
    throw new AppError('weak_password', {
      detail: 'This password is too common; choose another',
      errors: [{ field, message: 'is a commonly used password' }],
    });
  }
}

/**
 * argon2id with bounded concurrency. argon2 runs on libuv's thread pool, never the event loop; the
 * bound keeps it from starving other work, and a full queue sheds load with 503 + Retry-After instead
 * of letting latency grow without limit.
 */
export function createPasswordHasher(options: { concurrency: number; queue: number }) {
  let running = 0;
  const waiting: Array<() => void> = [];

  async function slot<T>(work: () => Promise<T>): Promise<T> {
    if (running >= options.concurrency) {
      if (waiting.length >= options.queue) {
        throw new AppError('overloaded', {
          detail: 'Too many sign-ins at once; retry shortly',
          headers: { 'retry-after': '1' },
        });
      }
      await new Promise<void>((resolveFn) => waiting.push(resolveFn));
    } else running++;
    try {
      return await work();
    } finally {
      const next = waiting.shift();
      if (next) next();
      else running--;
    }
  }

  // A real hash of a random password: verifying against it costs what a real verification costs.
  const dummyHash = argon2.hash(`dummy-${Math.random()}`, ARGON2_OPTIONS);

  return {
    hash: (password: string) => slot(() => argon2.hash(password, ARGON2_OPTIONS)),
    verify: (hash: string, password: string) =>
      slot(async () => {
        try {
          return await argon2.verify(hash, password);
        } catch {
          return false;
        }
      }),
    /** Spends the time of a verification when there is no user, so timing does not reveal accounts. */
    verifyDummy: (password: string) =>
      slot(async () => {
        await argon2.verify(await dummyHash, password).catch(() => false);
        return false as const;
      }),
    stats: () => ({ running, waiting: waiting.length }),
  };
}

export type PasswordHasher = ReturnType<typeof createPasswordHasher>;
