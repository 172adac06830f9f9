/**
 * Client authentication as RFC 6749 §2.3.1 defines it for `client_secret_basic`: the client id and
 * secret are each encoded with application/x-www-form-urlencoded, joined by a colon, then base64 —
 * so a `:` inside the id or secret arrives as `%3A`, and `+` means a space.
 */

/** application/x-www-form-urlencoded decoding of one value; undefined when the escapes are malformed. */
export function formUrlDecode(value: string): string | undefined {
  // Generated ids and secrets are plain base62: nothing to decode.
  if (!value.includes('%') && !value.includes('+')) return value;
  try {
    return decodeURIComponent(value.replace(/\+/g, ' '));
  } catch {
    return undefined;
  }
}

/** The inverse, as clients are required to apply it (and as openid-client does). */
export function formUrlEncode(value: string): string {
  return encodeURIComponent(value)
    .replace(/[!'()*~._-]/g, (c) => `%${c.charCodeAt(0).toString(16).toUpperCase()}`)
    .replace(/%20/g, '+');
}

/** The challenge of a 401 invalid_client (RFC 6749 §5.2, RFC 7617). */
export const BASIC_CHALLENGE = 'Basic realm="paservices"';

export type BasicCredentials = { clientId: string; secret: string };

const BASIC = /^Basic[ \t]+([A-Za-z0-9+/]+={0,2})[ \t]*$/i;
/** Nothing legitimate comes close; the cap keeps decoding cheap. */
const MAX_BASIC_LENGTH = 1024;

/** True when the Authorization header uses the Basic scheme (well-formed or not). */
export const isBasicAuthorization = (header: string | undefined): header is string =>
  typeof header === 'string' && /^Basic(?:[ \t]|$)/i.test(header);

/** Parses `Authorization: Basic …` per §2.3.1; undefined when it is malformed in any way. */
export function parseBasicCredentials(header: string): BasicCredentials | undefined {
  if (header.length > MAX_BASIC_LENGTH) return undefined;
  const match = BASIC.exec(header);
  if (!match?.[1]) return undefined;
  const decoded = Buffer.from(match[1], 'base64').toString('utf8');
  const colon = decoded.indexOf(':');
  if (colon < 0) return undefined;
  const clientId = formUrlDecode(decoded.slice(0, colon));
  const secret = formUrlDecode(decoded.slice(colon + 1));
  if (!clientId || secret === undefined || secret.length === 0) return undefined;
  return { clientId, secret };
}

/** Builds the header a client sends (tests and documentation). */
export function basicAuthorization(clientId: string, secret: string): string {
  return `Basic ${Buffer.from(`${formUrlEncode(clientId)}:${formUrlEncode(secret)}`).toString('base64')}`;
}
