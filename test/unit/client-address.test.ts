import { describe, expect, it } from 'vitest';
import { limitedAddress } from '../../src/lib/client-address.js';

describe('the address a per-address limit counts under', () => {
  it('is an IPv4 address as it is, and an IPv4-mapped IPv6 address as the IPv4 one', () => {
    expect(limitedAddress('203.0.113.7')).toBe('203.0.113.7');
    expect(limitedAddress('::ffff:203.0.113.7')).toBe('203.0.113.7');
    expect(limitedAddress('::FFFF:cb00:7107')).toBe('203.0.113.7');
  });

  it('is an IPv6 address’s /64, however it is written', () => {
    const block = limitedAddress('2001:db8:1:2::1');
    expect(block).toBe('2001:db8:1:2::/64');
    for (const ip of ['2001:db8:1:2:ffff:ffff:ffff:ffff', '2001:0DB8:0001:0002:0:0:0:5a', '2001:db8:1:2::'])
      expect(limitedAddress(ip), ip).toBe(block);
    expect(limitedAddress('2001:db8:1:3::1')).not.toBe(block);
    expect(limitedAddress('::1')).toBe('0:0:0:0::/64');
  });

  it('is anything else as written, and "unknown" for none', () => {
    expect(limitedAddress('not an address')).toBe('not an address');
    expect(limitedAddress(null)).toBe('unknown');
    expect(limitedAddress(undefined)).toBe('unknown');
  });
});
