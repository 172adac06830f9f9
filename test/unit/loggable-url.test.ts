import { describe, expect, it } from 'vitest';
import { loggableUrl } from '../../src/lib/logger.js';

describe('loggableUrl', () => {
  it('redacts the mailed links’ and sign-ins’ tokens in the query, whatever the parameter is called', () => {
    for (const prefix of ['prs', 'pec', 'pce', 'pml', 'pmf', 'pak', 'prt', 'pcs']) {
      const token = `${prefix}_abcdefghijkl_secretsecretsecret`;
      expect(loggableUrl(`/v1/auth/magic-link/verify?next=${token}&page=2`), prefix).toBe(
        '/v1/auth/magic-link/verify?next=[redacted]&page=2',
      );
    }
    // Not a secret's look: kept.
    expect(loggableUrl('/v1/users?role=pretty_name')).toBe('/v1/users?role=pretty_name');
  });

  it('redacts parameters named like credentials: as part of the name, or short names as a word of it', () => {
    for (const name of [
      'pwd',
      'pass',
      'pin',
      'otp',
      'bearer',
      'passphrase',
      'user_pin',
      'userPin',
      'SIG',
      'totp',
    ])
      expect(loggableUrl(`/v1/auth/me?${name}=S3cret&page=2`), name).toBe(
        `/v1/auth/me?${name}=[redacted]&page=2`,
      );
    // Words that merely hold those letters are kept.
    for (const name of ['shipping', 'footprint', 'compass', 'design'])
      expect(loggableUrl(`/v1/users?${name}=1`), name).toBe(`/v1/users?${name}=1`);
  });

  it('redacts a JWT or a secret of the service anywhere in a value, once decoded, and a bare parameter that is one', () => {
    const jwt = 'eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl';
    for (const value of [
      `Bearer%20${jwt}`,
      `Bearer+${jwt}`,
      `bearer%20opaque-token`,
      encodeURIComponent(JSON.stringify({ t: jwt })),
      `%2565yJhbGciOiJFUzI1NiJ9`,
      `x%20prt_abcdefghijkl_secret`,
    ])
      expect(loggableUrl(`/v1/users?x=${value}&page=2`), value).toBe('/v1/users?x=[redacted]&page=2');
    expect(loggableUrl(`/v1/users?${jwt}&page=2`)).toBe('/v1/users?[redacted]&page=2');
    expect(loggableUrl(`/v1/users?page=2;pak_abcdefghijkl_secret`)).toBe('/v1/users?page=2;[redacted]');
    expect(loggableUrl(`/v1/users?${jwt}=1`)).toBe('/v1/users?[redacted]');
    // Harmless bare parameters and words holding the letters are kept.
    expect(loggableUrl('/v1/users?debug&sort=MoneyJar&role=keypak_x')).toBe(
      '/v1/users?debug&sort=MoneyJar&role=keypak_x',
    );
  });

  it('redacts personal data: parameters named like a search, an address, a login or a name, and any @', () => {
    for (const name of [
      'query',
      'q',
      'search',
      'search_term',
      'filter',
      'email',
      'E-Mail',
      'userEmail',
      'mail_to',
      'login',
      'username',
      'displayName',
      'name',
      'phone',
    ])
      expect(loggableUrl(`/v1/users?${name}=alice&limit=2`), name).toBe(
        `/v1/users?${name}=[redacted]&limit=2`,
      );
    // An address, or a part of one, in any value, raw or percent-encoded (twice), or as a bare parameter.
    for (const value of ['alice@example.com', 'alice%40example.com', '%2540example.com', 'alice@'])
      expect(loggableUrl(`/v1/users?x=${value}&limit=2`), value).toBe('/v1/users?x=[redacted]&limit=2');
    expect(loggableUrl('/v1/users?alice@example.com&limit=2')).toBe('/v1/users?[redacted]&limit=2');
    expect(loggableUrl('/v1/users?alice%40example.com=1&limit=2')).toBe('/v1/users?[redacted]&limit=2');
    // Words that merely hold those letters, and the list filters that name no one, are kept.
    expect(
      loggableUrl('/v1/users?status=active&role=admin&limit=5&cursor=abc&filename=a&technique=b&frequency=c'),
    ).toBe('/v1/users?status=active&role=admin&limit=5&cursor=abc&filename=a&technique=b&frequency=c');
  });
});
