import { describe, expect, it } from 'vitest';
import { duplicateMemberError } from '../../src/lib/json-body.js';

/** A member twice in one object is refused, named by its path; nothing else is. */
const fieldOf = (text: string) => duplicateMemberError(JSON.parse(text), text)?.errors?.[0]?.field;

describe('duplicate JSON members', () => {
  it.each([
    ['{"password":"a","password":"b"}', 'body.password'],
    ['{"metadata":{"a":1,"b":{"c":true},"a":2}}', 'body.metadata.a'],
    ['{"a":[{"x":1},{"x":1, "x" : 2}]}', 'body.a.1.x'],
    // The same key once escaped and once not is the same member to JSON.parse.
    ['{"ab":1,"a\\u0062":2}', 'body.ab'],
    ['{"k":"has: colons \\" and quotes:","k":1}', 'body.k'],
  ])('%s → %s', (text, field) => {
    expect(fieldOf(text)).toBe(field);
  });

  it.each([
    '{"password":"a"}',
    '{"a":{"x":1},"b":{"x":2}}',
    '{"a":[{"x":1},{"x":2}],"x":3}',
    '{"s":"a:b:c","t":"\\"x\\":\\"y\\"","u":"{\\"k\\":1,\\"k\\":2}"}',
    '{"url":"https://a.example.test:8443/x","list":["a:1","a:1"]}',
    '{}',
  ])('%s → nothing', (text) => {
    expect(fieldOf(text)).toBeUndefined();
  });
});
