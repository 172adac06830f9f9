import { z } from 'zod';

export { ProfileSchema } from '../auth/auth.schema.js';

const TIMEZONES = new Set(Intl.supportedValuesOf('timeZone').concat(['UTC', 'Etc/UTC']));

function isBcp47(tag: string): boolean {
  try {
    return Intl.getCanonicalLocales(tag).length === 1;
  } catch {
    return false;
  }
}

const MAX_METADATA_BYTES = 4096;
const MAX_METADATA_DEPTH = 4;

function depth(value: unknown): number {
  if (value === null || typeof value !== 'object') return 0;
  const children = Array.isArray(value) ? value : Object.values(value);
  return 1 + Math.max(0, ...children.map(depth));
}

export const PatchProfileBodySchema = z
  .object({
    display_name: z.string().trim().min(1).max(100).nullable().optional().meta({ example: 'Ada Lovelace' }),
    avatar_url: z
      .url({ protocol: /^https$/, message: 'must be an https URL' })
      .max(2048)
      .nullable()
      .optional()
      .describe('An https URL')
      .meta({ example: 'https://example.com/ada.png' }),
    bio: z.string().max(1000).nullable().optional(),
    locale: z
      .string()
      .max(35)
      .refine(isBcp47, 'must be a BCP 47 language tag, e.g. en-GB')
      .nullable()
      .optional()
      .meta({ example: 'en-GB' }),
    timezone: z
      .string()
      .max(64)
      .refine((tz) => TIMEZONES.has(tz), 'must be an IANA time zone, e.g. Europe/Paris')
      .nullable()
      .optional()
      .meta({ example: 'Europe/London' }),
    metadata: z
      .record(z.string().max(100), z.unknown())
      .refine(
        (m) => Buffer.byteLength(JSON.stringify(m)) <= MAX_METADATA_BYTES,
        `must be at most ${MAX_METADATA_BYTES} bytes of JSON`,
      )
      .refine((m) => depth(m) <= MAX_METADATA_DEPTH, `must nest at most ${MAX_METADATA_DEPTH} levels`)
      .optional()
      .describe('A JSON object (≤ 4 KiB, ≤ 4 levels) for the frontend’s own use'),
  })
  .strict()
  .describe('Only these fields; `id`, `user_id`, `roles`, `status` and the like are refused (closed schema)');

export const ProfileParamsSchema = z.object({ user_id: z.uuid() });
