import { describe, expect, it } from 'vitest';
import { z } from 'zod';
import { ResponseSchemaError, serializerCompiler } from '../../src/lib/serializer.js';

const Answer = z.object({ name: z.string(), scopes: z.array(z.string()), note: z.string().optional() });
const compile = () =>
  serializerCompiler({ schema: Answer, method: 'GET', url: '/t', httpStatus: '200' }) as (
    data: unknown,
  ) => string;

/** An answer whose `name` counts how often it is read, i.e. how often the answer is written. */
function counted(freeze: boolean) {
  const reads = { count: 0 };
  const answer = {
    get name() {
      reads.count++;
      return 'n';
    },
    scopes: ['a:read'],
  };
  return { answer: freeze ? Object.freeze(answer) : answer, reads };
}

describe('serializerCompiler', () => {
  it('writes only the listed fields and refuses an answer missing a required one', () => {
    const write = compile();
    expect(JSON.parse(write({ name: 'n', scopes: [], secretHash: 'x' }))).toEqual({ name: 'n', scopes: [] });
    expect(() => write({ scopes: [] })).toThrow(ResponseSchemaError);
  });

  it('writes a frozen answer once and reuses its text', () => {
    const write = compile();
    const { answer, reads } = counted(true);
    const first = write(answer);
    expect(write(answer)).toBe(first);
    expect(write(answer)).toBe(first);
    expect(reads.count).toBe(1);
    expect(JSON.parse(first)).toEqual({ name: 'n', scopes: ['a:read'] });
  });

  it('writes an answer that is not frozen anew every time, so a change shows', () => {
    const write = compile();
    const { answer, reads } = counted(false);
    write(answer);
    (answer as { note?: string }).note = 'changed';
    expect(JSON.parse(write(answer))).toMatchObject({ note: 'changed' });
    expect(reads.count).toBe(2);
  });

  it('keeps each route’s text apart: the same frozen answer under another schema is written by that one', () => {
    const other = serializerCompiler({
      schema: z.object({ scopes: z.array(z.string()) }),
      method: 'GET',
      url: '/u',
      httpStatus: '200',
    }) as (data: unknown) => string;
    const { answer } = counted(true);
    expect(JSON.parse(compile()(answer))).toHaveProperty('name');
    expect(JSON.parse(other(answer))).toEqual({ scopes: ['a:read'] });
  });

  it('does not remember a frozen answer it refused', () => {
    const write = compile();
    const broken = Object.freeze({ scopes: [] });
    expect(() => write(broken)).toThrow(ResponseSchemaError);
    expect(() => write(broken)).toThrow(ResponseSchemaError);
  });
});
