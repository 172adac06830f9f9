import { z } from 'zod';
import { PERMISSION_PATTERN } from '../../lib/permissions.js';

export const ProblemSchema = z
  .object({
    type: z.string().describe('A URI naming the problem type'),
    title: z.string(),
    status: z.number().int().meta({ example: 400 }),
    detail: z.string(),
    code: z.string().describe('Stable machine-readable code, e.g. `invalid_credentials`'),
    instance: z
      .string()
      .optional()
      .describe('The path of the request, under PUBLIC_URL’s path when it has one (`/auth/v1/…`)'),
    request_id: z.string().optional(),
    errors: z.array(z.object({ field: z.string(), message: z.string() })).optional(),
  })
  .meta({ id: 'Problem', description: 'RFC 9457 problem details' });

const problem = (description: string) => ProblemSchema.describe(description);

/** Shared error responses, spread into every route's `response`. */
export const problemResponses = {
  400: problem('The request is malformed or fails validation'),
  401: problem('Missing, invalid or expired credentials'),
  403: problem('Authenticated, but lacking the permission this route needs'),
  404: problem('Not found (or not visible to the caller)'),
  409: problem('Conflicts with the current state'),
  413: problem('Body over the size limit'),
  415: problem('Unsupported content type'),
  422: problem('Understood but refused'),
  429: problem('Too many requests'),
  503: problem('A dependency is unavailable; retry later'),
} as const;

/** Picks the listed statuses out of problemResponses. */
export function problems<K extends keyof typeof problemResponses>(...codes: K[]) {
  return Object.fromEntries(codes.map((c) => [c, problemResponses[c]])) as Pick<typeof problemResponses, K>;
}

/**
 * A UUID a client sends (a path, a query, a body): any case, lower-cased (RFC 9562 §4: UUIDs are read
 * case-insensitively), so it compares equal to the ids the service stores and answers. Any 8-4-4-4-12
 * hex, as PostgreSQL's `uuid` takes, not only RFC 9562's versions and variant: a user's id is the
 * provider's, and Supabase keeps the ids of users imported with their own.
 */
export const uuidInput = () => z.guid().toLowerCase();

export const UuidParamSchema = z.object({ id: uuidInput() });

export const isoDate = (d: Date | null | undefined) => (d ? d.toISOString() : null);

/**
 * An instant in an answer: ISO 8601 in UTC, as `Date.toISOString()` writes it (`isoDate`). Declared
 * `format: date-time`, so a client generated from the document reads a date-time (a `Date`, not a bare
 * string); not checked on the way out (answers are written by their shape, lib/serializer.ts).
 */
export const timestamp = () => z.string().meta({ format: 'date-time' });

/** An account's address in an answer (as EmailSchema took it): declared `format: email`. */
export const emailAddress = () => z.string().meta({ format: 'email' });

/** OpenAPI security of routes that take an access token or an API key. */
export const bearerOrApiKey: Array<Record<string, string[]>> = [{ bearerAuth: [] }, { apiKey: [] }];

/**
 * A permission string: `resource:action`, `resource:*` or `*`. Beyond the service's own catalogue
 * (GET /v1/permissions), other services' permissions (`orders:read`) may be put in roles, keys and
 * clients, so their tokens carry them; nobody grants what they do not hold still applies.
 */
export const PermissionSchema = z
  .string()
  .max(100)
  .regex(PERMISSION_PATTERN, { message: 'not a permission (resource:action, resource:* or *)' })
  .describe('A permission: `resource:action`, `resource:*` or `*`');

/**
 * Characters that change how the text around them is shown rather than being shown: the bidi
 * embeddings, overrides and isolates and the implicit marks (`abc\u202Egnp.exe` reads `abcexe.png`).
 */
const BIDI_CONTROLS = /[\u061C\u200E\u200F\u202A-\u202E\u2066-\u2069]/;
/** C0 and C1 control characters other than tab, line feed and carriage return. */
const CONTROLS_BUT_LINES = /(?![\t\n\r])\p{Cc}/u;
/**
 * A character that shows: not a space, a control or a format character (zero-width, joiners), nor
 * one of the letters that render as nothing (the Hangul fillers, the blank Braille pattern, the
 * combining grapheme joiner).
 */
const VISIBLE = /(?!\u034F)[^\s\p{Cc}\p{Cf}\u115F\u1160\u2800\u3164\uFFA0]/u;
/** Control characters and the line and paragraph separators: a label is one line. */
const LINE_BREAKING = /[\p{Cc}\p{Zl}\p{Zp}]/u;

/**
 * Free text people read (a bio, a description), up to `max` characters: lines are kept, but not
 * control characters, nor bidi controls that would make an administrator's screen say other than
 * what was stored.
 */
export const plainText = (max: number, { trim = false } = {}) =>
  (trim ? z.string().trim() : z.string())
    .max(max)
    .refine((s) => !CONTROLS_BUT_LINES.test(s), { message: 'must not hold control characters' })
    .refine((s) => !BIDI_CONTROLS.test(s), { message: 'must not hold bidirectional control characters' });

/**
 * A label people read (a name, a display name): trimmed, 1 to `max` characters, on one line, with
 * something that shows (not only zero-width or format characters), and no control characters or bidi
 * controls. The pattern says in the document what the trim enforces, so a client validating against
 * it refuses spaces alone too.
 */
export const nonBlank = (max: number) =>
  z
    .string()
    .trim()
    .min(1, { message: 'must not be blank', abort: true })
    .max(max)
    .regex(/\S/, { message: 'must not be blank' })
    .refine((s) => !LINE_BREAKING.test(s), { message: 'must not hold control characters or line breaks' })
    .refine((s) => !BIDI_CONTROLS.test(s), { message: 'must not hold bidirectional control characters' })
    .refine((s) => VISIBLE.test(s), { message: 'must hold a visible character' });
