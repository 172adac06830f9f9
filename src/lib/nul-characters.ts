import { type AppError, invalidFields } from './errors.js';

/*
 * PostgreSQL text cannot hold U+0000: a NUL that reaches a query fails it (SQLSTATE 22021), so a
 * client could turn any free-text field or filter into a 500. No field of this API means anything
 * with a NUL in it, so the service refuses it where input enters, as a 400 naming the field, before
 * any handler runs. The raw text is scanned first (a substring search, nothing on the hot paths
 * otherwise); only on a hit is the parsed value walked, which is the authoritative check: `\\u0000`
 * in JSON or `%2500` in a form is not a NUL and passes.
 */

const NUL = '\u0000';

/** Dotted paths (under `root`) of every string, or object key, holding a NUL. */
export function nulFields(value: unknown, root: string): string[] {
  const found: string[] = [];
  const walk = (v: unknown, path: string, depth: number) => {
    if (typeof v === 'string') {
      if (v.includes(NUL)) found.push(path);
    } else if (v !== null && typeof v === 'object' && depth < 64) {
      for (const [key, child] of Object.entries(v)) {
        const childPath = `${path}.${key}`;
        if (key.includes(NUL)) found.push(childPath);
        walk(child, childPath, depth + 1);
      }
    }
  };
  walk(value, root, 0);
  return found;
}

export function nulError(fields: string[]): AppError {
  return invalidFields(
    fields.map((field) => ({
      field: field.replaceAll(NUL, '\\u0000'),
      message: 'must not contain NUL (U+0000) characters',
    })),
  );
}

/** Could this JSON text hold a NUL? (Only as the escape `\u0000`: a raw control character is invalid JSON.) */
export const jsonMayHoldNul = (text: string) => text.includes('\\u0000');

/** Could this form body, query string or path hold a NUL once decoded? */
export const urlEncodedMayHoldNul = (text: string) => text.includes('%00') || text.includes(NUL);
