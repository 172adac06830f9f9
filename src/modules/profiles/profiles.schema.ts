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

/**
 * Whether a value nests objects or arrays deeper than `levels`. It looks no further than that, so it
 * cannot overflow the stack whatever it is given (the JSON parser bounds bodies too: lib/json-body.ts).
 */
function nestsDeeperThan(value: unknown, levels: number): boolean {
  if (value === null || typeof value !== 'object') return false;
  if (levels === 0) return true;
  for (const child of Array.isArray(value) ? value : Object.values(value))
    if (nestsDeeperThan(child, levels - 1)) return true;
  return false;
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
      // The depth first: only a value known to be shallow is written out to measure it.
      .superRefine((m, ctx) => {
        if (nestsDeeperThan(m, MAX_METADATA_DEPTH))
          ctx.addIssue({ code: 'custom', message: `must nest at most ${MAX_METADATA_DEPTH} levels` });
        else if (Buffer.byteLength(JSON.stringify(m)) > MAX_METADATA_BYTES)
          ctx.addIssue({ code: 'custom', message: `must be at most ${MAX_METADATA_BYTES} bytes of JSON` });
      })
      .optional()
      .describe('A JSON object (≤ 4 KiB, ≤ 4 levels) for the frontend’s own use'),
  })
  .strict()
  .describe('Only these fields; `id`, `user_id`, `roles`, `status` and the like are refused (closed schema)');

export const ProfileParamsSchema = z.object({ user_id: z.uuid() });
