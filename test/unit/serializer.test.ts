import { describe, expect, it } from 'vitest';
import { z } from 'zod';
import {
  ResponseSchemaError,
  serializerCompiler,
  stringifierOf,
  writtenSchemaOf,
} from '../../src/lib/serializer.js';
import { timestamp } from '../../src/modules/shared/shared.schema.js';
import { sharedAnswer } from '../../src/lib/shared-answer.js';

const Answer = z.object({ name: z.string(), scopes: z.array(z.string()), note: z.string().optional() });
const compile = () =>
  serializerCompiler({ schema: Answer, method: 'GET', url: '/t', httpStatus: '200' }) as (
    data: unknown,
  ) => string;

/** An answer whose `name` counts how often it is read, i.e. how often the answer is written. */
function counted(how: 'shared' | 'frozen' | 'plain') {
  const reads = { count: 0 };
  const answer = {
    get name() {
      reads.count++;
      return 'n';
    },
    scopes: ['a:read'],
  };
  const made = how === 'shared' ? sharedAnswer(answer) : how === 'frozen' ? Object.freeze(answer) : answer;
  reads.count = 0; // freezing all the way down reads every property once; only writes are counted
  return { answer: made, reads };
}

describe('serializerCompiler', () => {
  it('compiles a schema once for the process: another route or app with the same schema reuses its writer', () => {
    const Other = z.object({ name: z.string() });
    expect(stringifierOf(Answer)).toBe(stringifierOf(Answer));
    expect(stringifierOf(Other)).not.toBe(stringifierOf(Answer));
    // Each route still names itself when its answer does not fit, and writes only its own fields.
    const first = compile();
    const second = serializerCompiler({ schema: Answer, method: 'POST', url: '/u', httpStatus: '200' }) as (
      data: unknown,
    ) => string;
    expect(first({ name: 'n', scopes: [], extra: 1 })).toBe('{"name":"n","scopes":[]}');
    expect(() => second({ scopes: [] })).toThrow(/POST \/u/);
  });

  it('writes only the listed fields and refuses an answer missing a required one', () => {
    const write = compile();
    expect(JSON.parse(write({ name: 'n', scopes: [], secretHash: 'x' }))).toEqual({ name: 'n', scopes: [] });
    expect(() => write({ scopes: [] })).toThrow(ResponseSchemaError);
  });

  it('writes a shared answer once and reuses its text', () => {
    const write = compile();
    const { answer, reads } = counted('shared');
    const first = write(answer);
    expect(write(answer)).toBe(first);
    expect(write(answer)).toBe(first);
    expect(reads.count).toBe(1);
    expect(JSON.parse(first)).toEqual({ name: 'n', scopes: ['a:read'] });
  });

  it('writes an answer that is not shared anew every time, so a change shows', () => {
    const write = compile();
    const { answer, reads } = counted('plain');
    write(answer);
    (answer as { note?: string }).note = 'changed';
    expect(JSON.parse(write(answer))).toMatchObject({ note: 'changed' });
    expect(reads.count).toBe(2);
  });

  it('writes an answer frozen for another reason anew every time: only shared answers are remembered', () => {
    const write = compile();
    const { answer, reads } = counted('frozen');
    write(answer);
    write(answer);
    expect(reads.count).toBe(2);
  });

  it('freezes a shared answer all the way down, so its remembered text cannot go stale', () => {
    const answer = sharedAnswer({ name: 'n', scopes: ['a:read'], nested: { list: [{ x: 1 }] } });
    expect(Object.isFrozen(answer.scopes)).toBe(true);
    expect(Object.isFrozen(answer.nested.list[0])).toBe(true);
    expect(() => answer.scopes.push('b:write')).toThrow(TypeError);
  });

  it('keeps each route’s text apart: the same shared answer under another schema is written by that one', () => {
    const other = serializerCompiler({
      schema: z.object({ scopes: z.array(z.string()) }),
      method: 'GET',
      url: '/u',
      httpStatus: '200',
    }) as (data: unknown) => string;
    const { answer } = counted('shared');
    expect(JSON.parse(compile()(answer))).toHaveProperty('name');
    expect(JSON.parse(other(answer))).toEqual({ scopes: ['a:read'] });
  });

  it('does not remember a shared answer it refused', () => {
    const write = compile();
    const broken = sharedAnswer({ scopes: [] });
    expect(() => write(broken)).toThrow(ResponseSchemaError);
    expect(() => write(broken)).toThrow(ResponseSchemaError);
  });

  it('writes a nullable timestamp as the nullable string it is: by the value’s type, no validator run per answer', () => {
    // Its `format: date-time` (the document's) makes it a union once the format is gone; written as
    // one, fast-json-stringify would run ajv on the value for each branch, on every answer (/me's user).
    const nullableString = writtenSchemaOf(z.object({ at: z.string().nullable().describe('d') }));
    expect(writtenSchemaOf(z.object({ at: timestamp().nullable().describe('d') }))).toEqual(nullableString);
    expect(JSON.stringify(nullableString)).not.toContain('anyOf');
    // A union of shapes stays a union.
    expect(
      JSON.stringify(writtenSchemaOf(z.object({ a: z.object({ b: z.string() }).nullable() }))),
    ).toContain('anyOf');
    const write = serializerCompiler({
      schema: z.object({ at: timestamp().nullable() }),
      method: 'GET',
      url: '/t',
      httpStatus: '200',
    }) as (data: unknown) => string;
    expect(write({ at: null })).toBe('{"at":null}');
    expect(write({ at: '2030-01-01T00:00:00.000Z' })).toBe('{"at":"2030-01-01T00:00:00.000Z"}');
  });
});
