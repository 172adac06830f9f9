import { parse as parseEncoded } from 'fast-querystring';
import { AppError } from './errors.js';
import { declaredCharset } from './json-body.js';
import { nulError, nulFields, urlEncodedMayHoldNul } from './nul-characters.js';

/** A parsed `application/x-www-form-urlencoded` body: a repeated name holds every value in order. */
export type FormFields = Record<string, string | string[]>;

/**
 * Fields inherit from an object with no prototype, so a name like `constructor` or `__proto__` is a
 * plain field; made with `new` rather than `Object.create(null)`, which V8 keeps in dictionary mode
 * (every lookup and `for…in` over the fields — the OAuth routes' checks — is then slower).
 */
const Fields = function (this: FormFields) {} as unknown as new () => FormFields;
Fields.prototype = Object.create(null);

/**
 * `application/x-www-form-urlencoded` (the OAuth endpoints' bodies), as fast-querystring parses it,
 * with one shortcut: a body with nothing to decode — no `%` and no `+`, which is what a token, a
 * client id or a grant type is made of — is split with `indexOf` and `slice` instead of being read
 * one character at a time. fast-querystring's loop over a 700-character access token was ~1.5 µs of
 * every introspection (5% of its time on the event loop); two native searches and two slices take a
 * tenth of that. Anything to decode goes to fast-querystring, which stays the one definition of the
 * format: the shortcut gives the same fields for every input (test/unit/form.test.ts compares the
 * two on generated bodies).
 */
export function parseForm(text: string): FormFields {
  if (text.includes('%') || text.includes('+')) return parseEncoded(text) as FormFields;
  const fields = new Fields();
  const length = text.length;
  let start = 0;
  while (start <= length) {
    let end = text.indexOf('&', start);
    if (end === -1) end = length;
    // Empty pairs (`a=1&&b=2`, a trailing `&`) are skipped; `=v` is the empty name.
    if (end > start) {
      const equals = text.indexOf('=', start);
      const named = equals !== -1 && equals < end;
      add(fields, text.slice(start, named ? equals : end), named ? text.slice(equals + 1, end) : '');
    }
    start = end + 1;
  }
  return fields;
}

function add(fields: FormFields, name: string, value: string) {
  const current = fields[name];
  if (current === undefined) fields[name] = value;
  else if (Array.isArray(current)) current.push(value);
  else fields[name] = [current, value];
}

/**
 * True when a %-escape is malformed (`%zz`, a lone `%`) or escapes bytes that are not UTF-8 (`%FF`):
 * fast-querystring keeps such text as it is, so `scope=%FF` would be read as the three characters.
 */
export function hasMalformedEscapes(text: string): boolean {
  if (!text.includes('%')) return false;
  try {
    decodeURIComponent(text);
    return false;
  } catch {
    return true;
  }
}

/** The 400 for text `hasMalformedEscapes` refuses: `what` names it (`The form body`, `The query string`). */
export function malformedEscapesError(what: string): AppError {
  return new AppError('bad_request', {
    detail: `${what} has a malformed %-escape, or one of bytes that are not UTF-8`,
  });
}

/** The charsets a form body may declare: what it is read as (US-ASCII is within UTF-8). */
const FORM_CHARSETS = new Set(['utf-8', 'utf8', 'us-ascii']);

/**
 * The fields of an `application/x-www-form-urlencoded` body (the /oauth endpoints'), or the AppError
 * that refuses it: another declared charset is a 415 (a client id or secret in Latin-1 would be read
 * as UTF-8 and mean something else), and text that is not UTF-8, a malformed %-escape or a NUL a 400.
 */
export function parseFormBody(contentType: string | undefined, body: Buffer): FormFields {
  const charset = declaredCharset(contentType);
  if (charset !== undefined && !FORM_CHARSETS.has(charset))
    throw new AppError('unsupported_media_type', {
      detail: 'Form bodies are UTF-8: send charset=utf-8, or no charset',
    });
  const text = body.toString();
  // Bytes that are not UTF-8 were decoded to U+FFFD: refused, as in a JSON body, rather than read as
  // a value they were not (and no OAuth parameter holds U+FFFD).
  if (text.includes('\uFFFD'))
    throw new AppError('bad_request', { detail: 'The form body is not valid UTF-8' });
  // Nor escaped so: `%FF` (not UTF-8) or `%zz` (no escape at all) is not taken as itself.
  if (hasMalformedEscapes(text)) throw malformedEscapesError('The form body');
  const value = parseForm(text);
  const fields = urlEncodedMayHoldNul(text) ? nulFields(value, 'body') : [];
  if (fields.length > 0) throw nulError(fields);
  return value;
}
