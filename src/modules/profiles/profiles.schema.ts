import { isIP } from 'node:net';
import { z } from 'zod';
import { nonBlank, plainText, uuidInput } from '../shared/shared.schema.js';

export { ProfileSchema } from '../auth/auth.schema.js';

/** The zone names this Node's ICU lists, by their lower case: to spell a name given in any case. */
const KNOWN_ZONES = new Map(
  Intl.supportedValuesOf('timeZone')
    .concat(['UTC', 'Etc/UTC'])
    .map((tz) => [tz.toLowerCase(), tz]),
);
/** What a zone name of the IANA database looks like: `Area/Location`, `UTC`, `Etc/GMT+5`, `EST5EDT`. */
const ZONE_NAME = /^[A-Za-z][A-Za-z0-9_+-]*(\/[A-Za-z0-9_+-]+){0,2}$/;

/**
 * Any name of the IANA time zone database, its links included (`Asia/Kolkata`, `Europe/Kyiv`,
 * `US/Pacific`): what ICU resolves, not only the names it lists (on Node 20 the list has the older
 * spellings, `Asia/Calcutta`, while browsers report the newer). Offsets (`+05:30`) are not zone names.
 */
function isTimeZone(name: string): boolean {
  if (!ZONE_NAME.test(name)) return false;
  try {
    new Intl.DateTimeFormat('en', { timeZone: name });
    return true;
  } catch {
    return false;
  }
}

function isBcp47(tag: string): boolean {
  try {
    return Intl.getCanonicalLocales(tag).length === 1;
  } catch {
    return false;
  }
}

/** `URL.parse` (Node ≥ 20.18), for the Node 20 releases before it. */
function parseUrl(text: string): URL | undefined {
  try {
    return new URL(text);
  } catch {
    return undefined;
  }
}

/**
 * Domains no public host is under: the special-use `localhost`, `local` (multicast DNS, RFC 6762),
 * `test`, `invalid` and `example` (RFC 2606), `onion` (Tor, RFC 7686) and `home.arpa` (home networks,
 * RFC 8375), `internal` (reserved by ICANN for private use), `alt` (RFC 9476, for names outside
 * the DNS), and `lan`, `intranet`, `private`, `corp`, `home` and `mail`, the names networks
 * conventionally give themselves (RFC 6762 appendix G lists all but `mail`; ICANN withholds `corp`,
 * `home` and `mail` from the root for that reason, name collisions, board resolution of February
 * 2018; none of the six is delegated), so refusing them refuses no public site.
 */
const NON_PUBLIC_DOMAINS = [
  'localhost',
  'local',
  'test',
  'invalid',
  'example',
  'onion',
  'home.arpa',
  'internal',
  'alt',
  'lan',
  'intranet',
  'private',
  'corp',
  'home',
  'mail',
];

/**
 * Public wildcard-DNS services, whose names answer with an address of whoever writes the name, a
 * private one as readily as any: under `addressInName`, with the IPv4 address the labels in front
 * spell in dots or dashes (`app.10.0.0.1.nip.io`, `app-10-0-0-1.sslip.io`) or in 8 hex digits
 * (`app-c0a80101.nip.io`), or the IPv6 address they spell with dashes for colons (`--1.sslip.io`;
 * every spelling is judged under each of these, though not each reads them all, the simpler rule and
 * the safer side); under `loopback`, every
 * name with 127.0.0.1. A known-list defence, not a resolver: this service never resolves or fetches
 * an avatar URL (it stores it and hands it out), so it refuses the names it knows to answer so, and a
 * name of another such service, or of one's own DNS, can still point anywhere.
 */
const WILDCARD_DNS = {
  addressInName: ['nip.io', 'sslip.io', 'xip.io', 'traefik.me'],
  loopback: ['localtest.me', 'lvh.me', 'vcap.me', 'localho.st'],
} as const;

/** Whether `name` is `domain` or a name under it. */
const isUnder = (name: string, domain: string) => name === domain || name.endsWith(`.${domain}`);

/**
 * Whether `labels` spell an IP address as wildcard DNS reads them (any address: none is a public host
 * name, as a literal is none): four numbers of 0 to 255 in a row, separated by dots or dashes, anywhere
 * (`app.127.0.0.1`, `magic-10-0-0-1`), leading zeros allowed; a label, or a dash-separated part of one,
 * of exactly 8 hex digits, the address's four bytes (`c0a80101`, `app-7f000001`: nip.io's hex
 * notation); or a label, or a run of its dash-separated parts, that reads as an IPv6 address once its
 * dashes are colons (`--1` is ::1, `fe80--1`, `app-2001-db8--1`: sslip.io's), so a name like `cafe--1`
 * is one too while `my-app` is none. A run is of 2 to 9 parts (eight groups and the empty one of `::`
 * at most), so a long label costs little.
 */
function spellsAnAddress(labels: string): boolean {
  const parts = labels.split(/[.-]/);
  const octet = (o: string) => /^\d{1,3}$/.test(o) && Number(o) <= 255;
  for (let i = 0; i + 4 <= parts.length; i++) if (parts.slice(i, i + 4).every(octet)) return true;
  if (parts.some((part) => /^[0-9a-f]{8}$/.test(part))) return true;
  return labels.split('.').some((label) => {
    const pieces = label.split('-');
    for (let i = 0; i < pieces.length; i++)
      for (let j = i + 2; j <= Math.min(pieces.length, i + 9); j++)
        if (isIP(pieces.slice(i, j).join(':')) === 6) return true;
    return false;
  });
}

/**
 * Whether a URL's host, as the URL parser writes it out, is a public host name: two or more labels,
 * not an IP address, not under a domain of NON_PUBLIC_DOMAINS or WILDCARD_DNS.loopback, and, under a
 * wildcard-DNS service that answers with the address a name spells, spelling none (an address is no
 * public host name: `127.0.0.1.nip.io` is judged as `127.0.0.1`). The parser has already
 * written the other spellings of an address as the address (`2130706433` and `0x7f.1` as
 * `127.0.0.1`, full-width digits too; v6 in brackets) and the name in lower case, full-width letters
 * and ideographic full stops as ASCII; a trailing dot (`printer.local.`) is the same name. What a name
 * resolves to is the DNS's, not checked here.
 */
function isPublicHostName(hostname: string): boolean {
  const name = hostname.replace(/\.+$/, '');
  const labels = name.split('.');
  if (name.startsWith('[') || isIP(name) !== 0 || labels.length < 2 || labels.includes('')) return false;
  if ([...NON_PUBLIC_DOMAINS, ...WILDCARD_DNS.loopback].some((domain) => isUnder(name, domain))) return false;
  const wildcard = WILDCARD_DNS.addressInName.find((domain) => isUnder(name, domain));
  return !wildcard || !spellsAnAddress(name.slice(0, -wildcard.length));
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
    display_name: nonBlank(100).nullable().optional().meta({ example: 'Ada Lovelace' }),
    avatar_url: z
      .string()
      .max(2048)
      // What the document says of the https rule the URL check below enforces (a pattern zod does not
      // check: the refusal stays that check's one `must be an https URL`).
      .meta({ pattern: '^[Hh][Tt][Tt][Pp][Ss]:' })
      .pipe(z.url({ protocol: /^https$/, message: 'must be an https URL' }))
      // Zod runs these after a failed check too: a string that is no URL must not throw in them.
      .refine((v) => {
        const url = parseUrl(v);
        return !url || (url.username === '' && url.password === '');
      }, 'must not carry a user name or password')
      // Frontends and other services fetch it: never an address of their own network. Judged of an
      // https URL only (any other is refused above, once).
      .refine((v) => {
        const url = parseUrl(v);
        return url?.protocol !== 'https:' || isPublicHostName(url.hostname);
      }, 'must be a public host name')
      // Stored as the URL parser writes it out (`https:example.com` → `https://example.com/`, spaces
      // and quotes percent-encoded), so a frontend may put it in an attribute as it comes.
      .overwrite((v) => parseUrl(v)?.href ?? v)
      // The limit holds for what is stored (percent-encoding can triple a length), so a profile read
      // back is always accepted again.
      .refine((v) => v.length <= 2048, 'must be at most 2048 characters once percent-encoded')
      .nullable()
      .optional()
      .describe(
        'An https URL (`https://…`; any other scheme is refused) whose host is a public host name (not an ' +
          'IP address in any spelling, nor a wildcard-DNS name spelling one, `10-0-0-1.nip.io`, ' +
          '`app-c0a80101.nip.io`, `fe80--1.sslip.io`; not `localhost`, a special-use or private-use ' +
          'name, `printer.local`, `metadata.google.internal`, `cdn.test`, or a name under ' +
          '`localtest.me`, `lvh.me`, `vcap.me` or `localho.st`; not a name without a dot), ' +
          'without a user name or password, at most 2048 characters once percent-encoded; stored as the ' +
          'URL parser writes it out. null clears it',
      )
      .meta({ example: 'https://example.com/ada.png' }),
    bio: plainText(1000).nullable().optional(),
    locale: z
      .string()
      .max(35, { abort: true })
      .refine(isBcp47, { message: 'must be a BCP 47 language tag, e.g. en-GB', abort: true })
      // Stored in its canonical form (`EN-gb` → `en-GB`), which must fit too: what is read back is
      // accepted back (`islamicc` becomes `islamic-civil`, five characters longer).
      .overwrite((tag) => Intl.getCanonicalLocales(tag)[0]!)
      .max(35, 'is over 35 characters in its canonical form')
      .nullable()
      .optional()
      .meta({ example: 'en-GB' }),
    timezone: z
      .string()
      .max(64)
      .refine(isTimeZone, 'must be an IANA time zone, e.g. Europe/Paris')
      // A listed name in its own spelling (`europe/paris` → `Europe/Paris`); another as it was sent.
      .overwrite((tz) => KNOWN_ZONES.get(tz.toLowerCase()) ?? tz)
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
      .nullable()
      .optional()
      .describe(
        'A JSON object (≤ 4 KiB, ≤ 4 levels) for the frontend’s own use. Replaced whole, not merged (this ' +
          'PATCH is no RFC 7396 merge patch): the object sent becomes the metadata, so a key left out is ' +
          'gone, and a key set to null is kept as null. To change one key, read the profile and send all of ' +
          'it back. null clears it to {}',
      ),
  })
  .strict()
  .describe('Only these fields; `id`, `user_id`, `roles`, `status` and the like are refused (closed schema)');

export const ProfileParamsSchema = z.object({ user_id: uuidInput() });
