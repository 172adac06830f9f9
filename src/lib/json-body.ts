import { isUtf8 } from 'node:buffer';
import { AppError, invalidFields } from './errors.js';

/*
 * What a JSON body must be beyond valid JSON, checked once where it is parsed (app.ts), before any
 * schema or handler sees it: an object, not too deep, with finite numbers. V8's JSON.parse builds a
 * value of any depth without recursion, but nearly everything after it recurses (JSON.stringify, zod,
 * a walk over the value), so a body of [[[[…]]]] nested 10 000 deep — 20 KB, well under BODY_LIMIT —
 * overflowed the stack wherever it was next read and answered 500. Numbers too large for a double
 * (`1e400`) parse as Infinity, which no field means and JSON.stringify writes back as null.
 */

/** The deepest a body may nest objects and arrays (the body itself is level 1); no field needs 10. */
export const MAX_JSON_DEPTH = 32;

interface Found {
  /** Keys from the bad value up to the body (reversed once, on failure only). */
  path: string[];
  message: string;
}

const TOO_DEEP = `must nest objects and arrays at most ${MAX_JSON_DEPTH} levels deep`;
const NOT_FINITE = 'must be a finite number';
const NOT_AN_OBJECT = 'must be a JSON object';
/**
 * A JSON escape can carry half a surrogate pair (`"\ud800"`), which no UTF-8 text holds: stored, it
 * would come back as U+FFFD, and two different values would be one.
 */
const NOT_WELL_FORMED = 'must be well-formed Unicode (a lone surrogate is not)';
const KEY_NOT_WELL_FORMED = 'has a key that is not well-formed Unicode (a lone surrogate is not)';
const LONE_SURROGATE = /\p{Cs}/u; // in u-mode a surrogate pair is one code point: only lone halves match
const illFormed = (item: unknown) => typeof item === 'string' && LONE_SURROGATE.test(item);

/**
 * The first value breaking the rules. The recursion stops at MAX_JSON_DEPTH levels whatever the body
 * holds, so it cannot overflow the stack, and it allocates nothing unless it finds something.
 */
function find(value: unknown, level: number, strings: boolean): Found | undefined {
  if (typeof value === 'number')
    return Number.isFinite(value) ? undefined : { path: [], message: NOT_FINITE };
  if (value === null || typeof value !== 'object') return undefined;
  if (level > MAX_JSON_DEPTH) return { path: [], message: TOO_DEEP };
  if (Array.isArray(value)) {
    for (let i = 0; i < value.length; i++) {
      const item: unknown = value[i];
      if (strings && illFormed(item)) return { path: [String(i)], message: NOT_WELL_FORMED };
      if (item === null || (typeof item !== 'object' && typeof item !== 'number')) continue;
      const found = find(item, level + 1, strings);
      if (found) {
        found.path.push(String(i));
        return found;
      }
    }
  } else {
    for (const key in value) {
      // Named by the object holding it: the key itself cannot be written back as it was.
      if (strings && illFormed(key)) return { path: [], message: KEY_NOT_WELL_FORMED };
      const item: unknown = (value as Record<string, unknown>)[key];
      if (strings && illFormed(item)) return { path: [key], message: NOT_WELL_FORMED };
      if (item === null || (typeof item !== 'object' && typeof item !== 'number')) continue;
      const found = find(item, level + 1, strings);
      if (found) {
        found.path.push(key);
        return found;
      }
    }
  }
  return undefined;
}

/**
 * A 400 `validation_failed` for a parsed JSON body that is not an object (every body of this API is
 * one), nests deeper than MAX_JSON_DEPTH (both named as `body`) or holds a number that is not finite
 * (named by its path); else undefined. Fastify hands an absent body to the route as null, so the body
 * `null` must be refused here, where the two still differ: a route whose body is optional took it for
 * no body at all. A string holding half a surrogate pair is refused too; `text`, when given, is the
 * body the value was parsed from: such a string can only come from a `\u` escape (the bytes were
 * checked as UTF-8), so without one the strings are not searched.
 */
export function jsonBodyError(value: unknown, text?: string): AppError | undefined {
  const found =
    value === null || typeof value !== 'object' || Array.isArray(value)
      ? { path: [], message: NOT_AN_OBJECT }
      : find(value, 1, text === undefined || text.includes('\\u'));
  if (!found) return undefined;
  const field =
    found.message === TOO_DEEP || found.path.length === 0 ? 'body' : `body.${found.path.reverse().join('.')}`;
  return invalidFields([{ field, message: found.message }]);
}

const FORBIDDEN = 'is a forbidden key (it could pollute object prototypes)';

/** The first `__proto__` key, or `constructor` object with a `prototype` key: what secure-json-parse refuses. */
function findForbidden(value: unknown): Found | undefined {
  if (value === null || typeof value !== 'object') return undefined;
  if (!Array.isArray(value)) {
    if (Object.hasOwn(value, '__proto__')) return { path: ['__proto__'], message: FORBIDDEN };
    const ctor: unknown = Object.hasOwn(value, 'constructor')
      ? (value as Record<string, unknown>).constructor
      : undefined;
    if (ctor !== null && typeof ctor === 'object' && Object.hasOwn(ctor, 'prototype'))
      return { path: ['prototype', 'constructor'], message: FORBIDDEN };
  }
  for (const key in value) {
    const found = findForbidden((value as Record<string, unknown>)[key]);
    if (found) {
      found.path.push(key);
      return found;
    }
  }
  return undefined;
}

/**
 * Why Fastify's JSON parser refused a body that is valid JSON: a forbidden key (`onProtoPoisoning`,
 * `onConstructorPoisoning`), which its error calls "not valid JSON". A 400 `validation_failed` naming
 * the key (or jsonBodyError's, when the body breaks one of its rules first); undefined when the text
 * is not JSON after all. Only on that error path: the text is parsed again to find where.
 */
export function forbiddenKeyError(text: string): AppError | undefined {
  let value: unknown;
  try {
    value = JSON.parse(text.charCodeAt(0) === 0xfeff ? text.slice(1) : text);
  } catch {
    return undefined;
  }
  // Within MAX_JSON_DEPTH once this passes, so the walk below cannot overflow the stack.
  const invalid = jsonBodyError(value);
  if (invalid) return invalid;
  const found = findForbidden(value);
  if (!found) return undefined;
  return invalidFields([{ field: `body.${found.path.reverse().join('.')}`, message: found.message }]);
}

const CHARSET = /;\s*charset\s*=\s*"?([^";\s]*)/i;

/** The charset a Content-Type declares, lower-cased; undefined when it declares none. */
export const declaredCharset = (contentType: string | undefined): string | undefined =>
  contentType?.includes('charset') ? CHARSET.exec(contentType)?.[1]?.toLowerCase() : undefined;

/**
 * The text of a JSON body, or the error that refuses it. JSON between systems is UTF-8 (RFC 8259
 * §8.1): another declared charset is a 415, and bytes that are not UTF-8 a 400. Decoded leniently,
 * every invalid sequence became U+FFFD, so passwords differing only in such bytes (a Latin-1 ü and
 * é, or a stray 0xFF) hashed alike and matched one another.
 */
export function jsonBodyText(raw: Buffer, contentType: string | undefined): string | AppError {
  const charset = declaredCharset(contentType);
  if (charset !== undefined && charset !== 'utf-8' && charset !== 'utf8') {
    return new AppError('unsupported_media_type', {
      detail: 'JSON bodies are UTF-8 (RFC 8259 §8.1): send charset=utf-8, or no charset',
    });
  }
  if (!isUtf8(raw))
    return new AppError('invalid_json', { detail: 'The body is not valid UTF-8 (RFC 8259 §8.1)' });
  return raw.toString('utf8');
}

const DUPLICATE = 'appears more than once (each member once: RFC 8259 §4 leaves which one counts open)';

/** Members of every object in a value whose depth jsonBodyError has bounded. */
function countMembers(value: unknown): number {
  if (value === null || typeof value !== 'object') return 0;
  let n = 0;
  if (Array.isArray(value)) for (const item of value) n += countMembers(item);
  else
    for (const key in value) {
      n += 1 + countMembers((value as Record<string, unknown>)[key]);
    }
  return n;
}

/** The number of `:` in the text: one per member, plus those inside strings. */
function countColons(text: string): number {
  let n = 0;
  for (let at = text.indexOf(':'); at !== -1; at = text.indexOf(':', at + 1)) n++;
  return n;
}

interface Level {
  /** Keys seen in this object (undefined for an array). */
  keys: Set<string> | undefined;
  /** The current member's key, or the current item's index. */
  at: string;
}

/** The path of the first member whose key its object already had, walking the JSON text. */
function findDuplicate(text: string): string[] | undefined {
  const stack: Level[] = [];
  let lastString: string | undefined;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (c === 0x22) {
      // A string: to its closing quote, past escaped characters.
      let end = i + 1;
      let escaped = false;
      while (end < text.length) {
        const d = text.charCodeAt(end);
        if (d === 0x5c) escaped = true;
        else if (d === 0x22) break;
        end += d === 0x5c ? 2 : 1;
      }
      const raw = text.slice(i + 1, end);
      lastString = escaped ? (JSON.parse(`"${raw}"`) as string) : raw;
      i = end;
    } else if (c === 0x3a) {
      const level = stack[stack.length - 1];
      if (level?.keys && lastString !== undefined) {
        if (level.keys.has(lastString)) return [...stack.slice(0, -1).map((l) => l.at), lastString];
        level.keys.add(lastString);
        level.at = lastString;
      }
      lastString = undefined;
    } else if (c === 0x7b) {
      stack.push({ keys: new Set(), at: '' });
    } else if (c === 0x5b) {
      stack.push({ keys: undefined, at: '0' });
    } else if (c === 0x7d || c === 0x5d) {
      stack.pop();
    } else if (c === 0x2c) {
      const level = stack[stack.length - 1];
      if (level && !level.keys) level.at = String(Number(level.at) + 1);
    }
  }
  return undefined;
}

/**
 * A 400 `validation_failed` naming a member that appears twice in one object of a parsed, valid
 * body, or undefined. JSON.parse keeps the last, another parser (a proxy, a WAF) may keep the first:
 * `{"client_secret":"wrong","client_secret":"right"}` must not mean one thing to one of them and
 * another to the other. The text is walked only when it has more `:` than the value has members
 * (so, for most bodies, never).
 */
export function duplicateMemberError(value: unknown, text: string): AppError | undefined {
  if (countColons(text) <= countMembers(value)) return undefined;
  const path = findDuplicate(text);
  return path ? invalidFields([{ field: `body.${path.join('.')}`, message: DUPLICATE }]) : undefined;
}
