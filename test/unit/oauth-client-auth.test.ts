import { describe, expect, it } from 'vitest';
import {
  basicAuthorization,
  formUrlDecode,
  formUrlEncode,
  isBasicAuthorization,
  parseBasicCredentials,
} from '../../src/modules/oauth/oauth.client-auth.js';

const header = (raw: string) => `Basic ${Buffer.from(raw).toString('base64')}`;

describe('client_secret_basic decoding (RFC 6749 §2.3.1)', () => {
  it('form-urlencoded-decodes id and secret: + is a space, %XX an octet, : only separates', () => {
    expect(parseBasicCredentials(header('my%20client:s%2B%2F%3A%25+x'))).toEqual({
      clientId: 'my client',
      secret: 's+/:% x',
    });
    // A raw ':' in the secret (a client that did not encode) still splits at the first colon.
    expect(parseBasicCredentials(header('id:a:b'))).toEqual({ clientId: 'id', secret: 'a:b' });
    expect(parseBasicCredentials(header('pci%5Fabc:pcs%5Fabc%5Fdef'))).toEqual({
      clientId: 'pci_abc',
      secret: 'pcs_abc_def',
    });
  });

  it('round-trips every character through the encoding clients apply', () => {
    const secret = "a+b/c:d%e f~g*h(i)j!k'l.m_n-oé€";
    const clientId = 'client:with+odd/chars%';
    expect(formUrlEncode(secret)).toMatch(/^[A-Za-z0-9%+]+$/);
    expect(parseBasicCredentials(basicAuthorization(clientId, secret))).toEqual({ clientId, secret });
  });

  it('refuses malformed headers', () => {
    for (const bad of [
      'Basic',
      'Basic ',
      'Basic !!!',
      header('no-colon'),
      header(':secret'),
      header('id:'),
      header('id:%ZZ'),
      header('%E0%A4%A:secret'),
      `Basic ${'A'.repeat(2000)}`,
      'Bearer abc',
    ]) {
      expect(parseBasicCredentials(bad), bad).toBeUndefined();
    }
  });

  it('tells Basic from other schemes, case-insensitively', () => {
    expect(isBasicAuthorization('basic abc')).toBe(true);
    expect(isBasicAuthorization('Basic')).toBe(true);
    expect(isBasicAuthorization('Bearer abc')).toBe(false);
    expect(isBasicAuthorization('Basically')).toBe(false);
    expect(isBasicAuthorization(undefined)).toBe(false);
    expect(formUrlDecode('%')).toBeUndefined();
  });
});
