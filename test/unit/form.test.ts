import { parse as fastQuerystring } from 'fast-querystring';
import { describe, expect, it } from 'vitest';
import { parseForm } from '../../src/lib/form.js';

/** Both parsers' answers as plain objects, so prototypes do not count, only names, values and order. */
const plain = (fields: object) => JSON.parse(JSON.stringify({ ...fields })) as unknown;

/** A small deterministic generator (mulberry32), so a failure names a body that reproduces. */
function random(seed: number) {
  let state = seed;
  return () => {
    state = (state + 0x6d2b79f5) | 0;
    let t = Math.imul(state ^ (state >>> 15), 1 | state);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

describe('parseForm', () => {
  it('reads the OAuth bodies: names, values, an empty value, a name without a value, repeats', () => {
    expect(plain(parseForm('grant_type=client_credentials&scope=a:read'))).toEqual({
      grant_type: 'client_credentials',
      scope: 'a:read',
    });
    expect(plain(parseForm('token=&token_type_hint'))).toEqual({ token: '', token_type_hint: '' });
    expect(plain(parseForm('resource=a&resource=b&resource=c'))).toEqual({ resource: ['a', 'b', 'c'] });
    expect(plain(parseForm('a=1&&b=2&'))).toEqual({ a: '1', b: '2' });
    expect(plain(parseForm('=v&a=b=c'))).toEqual({ '': 'v', a: 'b=c' });
    expect(plain(parseForm(''))).toEqual({});
  });

  it('decodes what is encoded, as fast-querystring does', () => {
    expect(plain(parseForm('scope=a%3Aread+b%3Awrite&x=%zz'))).toEqual({ scope: 'a:read b:write', x: '%zz' });
  });

  it('has no prototype, so a field named like an Object method is just a field', () => {
    const fields = parseForm('constructor=x&__proto__=y&toString=z');
    expect('toString' in parseForm('a=1')).toBe(false);
    expect('hasOwnProperty' in parseForm('a=1')).toBe(false);
    expect(plain(fields)).toEqual({ constructor: 'x', ['__proto__']: 'y', toString: 'z' });
  });

  it('gives the same fields as fast-querystring for generated bodies, with and without encoding', () => {
    // Heavy on the characters that matter: separators, an encoded byte, a plus, an empty pair.
    const alphabet = [
      'a',
      'b',
      'z',
      '0',
      '.',
      '_',
      '-',
      '=',
      '=',
      '&',
      '&',
      '%',
      '2',
      '0',
      'B',
      '+',
      'é',
      ' ',
    ];
    const next = random(7);
    let plainBodies = 0;
    for (let i = 0; i < 5000; i++) {
      const length = Math.floor(next() * 24);
      let body = '';
      for (let j = 0; j < length; j++) body += alphabet[Math.floor(next() * alphabet.length)];
      if (!body.includes('%') && !body.includes('+')) plainBodies++;
      expect(plain(parseForm(body)), JSON.stringify(body)).toEqual(plain(fastQuerystring(body)));
    }
    // The shortcut itself was exercised, not only the delegation.
    expect(plainBodies).toBeGreaterThan(1000);
  });
});
