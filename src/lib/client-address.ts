import ipaddr from 'ipaddr.js';

/**
 * The client address a per-address limit counts under: an IPv4 address as it is (an IPv4-mapped IPv6
 * address, `::ffff:203.0.113.7`, as the IPv4 one it is), and an IPv6 address by its /64, the block a
 * single client is usually given whole (one counter per address would give it 2^64 allowances).
 * Anything unparsable is counted as written.
 */
export function limitedAddress(ip: string | null | undefined): string {
  if (!ip) return 'unknown';
  // An IPv4 address (no colon) is its own key: no parsing on the hot path (every client
  // authentication checks its address's throttle).
  if (!ip.includes(':') || !ipaddr.isValid(ip)) return ip;
  const parsed = ipaddr.parse(ip);
  if (parsed.kind() === 'ipv4') return parsed.toString();
  const v6 = parsed as ipaddr.IPv6;
  if (v6.isIPv4MappedAddress()) return v6.toIPv4Address().toString();
  return `${v6.parts
    .slice(0, 4)
    .map((p) => p.toString(16))
    .join(':')}::/64`;
}
