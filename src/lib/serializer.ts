import fastJsonStringify from 'fast-json-stringify';
import type { FastifySerializerCompiler } from 'fastify/types/schema.js';
import { $ZodType, toJSONSchema } from 'zod/v4/core';
import { isSharedAnswer } from './shared-answer.js';

/**
 * Responses are written by fast-json-stringify from each route's response schema: the zod schema,
 * turned into the JSON Schema the OpenAPI document shows, compiled once per route and status. It
 * writes only the properties the schema lists (an allow-list: a hash or a secret a handler left in
 * an object never leaves) and refuses an answer missing a required one, which the error handler
 * turns into a generic 500. It does this in about half the time of fastify-type-provider-zod's
 * serializer, which parses every answer with zod (copying it) and then runs JSON.stringify over the
 * copy, on the paths other services call on every request.
 */
export const serializerCompiler: FastifySerializerCompiler<unknown> = ({ schema, method, url }) => {
  const zod = zodSchemaOf(schema);
  if (!zod) throw new Error(`${method} ${url}: a response schema must be a zod schema`);
  const stringify = stringifierOf(zod);
  const write = (data: unknown) => {
    try {
      return stringify(data);
    } catch (cause) {
      throw new ResponseSchemaError(`${method} ${url}`, cause);
    }
  };
  // A shared answer (see `sharedAnswer`) is written once per route and status, and its text reused.
  const written = new WeakMap<object, string>();
  return (data) => {
    if (!isSharedAnswer(data)) return write(data);
    let text = written.get(data);
    if (text === undefined) {
      text = write(data);
      written.set(data, text);
    }
    return text;
  };
};

type Stringify = (data: unknown) => string;

/**
 * Compiled writers by zod schema, for the process: a zod schema is immutable, so its writer is the
 * same whichever app or route compiles it. The routes' schemas are module constants, so an app built
 * again in the same process (the test suite builds hundreds, the scripts one each) reuses them instead
 * of compiling every route again, which is most of the time an app takes to get ready.
 */
const stringifiers = new WeakMap<$ZodType, Stringify>();
/**
 * The same by the JSON Schema written: a route that builds its schema when it is registered (`z.null()`
 * for a 204, a framework error described again) has a new zod object per app, but the same shape. The
 * shapes are the routes' own, a few hundred at most, so the map stays small.
 */
const stringifiersByShape = new Map<string, Stringify>();

export function stringifierOf(zod: $ZodType): Stringify {
  let stringify = stringifiers.get(zod);
  if (!stringify) {
    const written = writtenSchemaOf(zod);
    const shape = JSON.stringify(written);
    stringify = stringifiersByShape.get(shape);
    if (!stringify) {
      stringify = fastJsonStringify(written as Parameters<typeof fastJsonStringify>[0]) as Stringify;
      stringifiersByShape.set(shape, stringify);
    }
    stringifiers.set(zod, stringify);
  }
  return stringify;
}

/** The JSON Schema fast-json-stringify writes a response schema's answers by: its shape only. */
export function writtenSchemaOf(zod: $ZodType): unknown {
  const jsonSchema = toJSONSchema(zod, {
    target: 'draft-7',
    io: 'output',
    unrepresentable: 'any',
    cycles: 'ref',
    reused: 'inline',
  });
  return shapeOnly(jsonSchema);
}

/** An answer its route's response schema cannot write (a handler bug): a generic 500, the cause logged. */
export class ResponseSchemaError extends Error {
  constructor(
    readonly route: string,
    cause: unknown,
  ) {
    super(`The answer of ${route} does not match its response schema`, { cause });
    this.name = 'ResponseSchemaError';
  }
}

/**
 * What fast-json-stringify needs of a JSON Schema: the shapes, not the value checks. It picks the
 * branch of a union (`anyOf`, `oneOf`, nullable objects) by validating the value against each with
 * ajv, so a closed branch (zod closes every object: `additionalProperties: false`) refused the very
 * values whose extra fields it would have left out, and the patterns and formats of the branches
 * (a UUID's, twice, in every API-key verification) were tested on every answer for nothing: they
 * change nothing in what is written. Without them the allow-list is the same.
 */
const VALUE_CHECKS = new Set([
  'pattern',
  'format',
  'minLength',
  'maxLength',
  'minimum',
  'maximum',
  'exclusiveMinimum',
  'exclusiveMaximum',
  'multipleOf',
  'minItems',
  'maxItems',
  'uniqueItems',
]);

function shapeOnly(schema: unknown, names = false): unknown {
  if (Array.isArray(schema)) return schema.map((s) => shapeOnly(s));
  if (schema === null || typeof schema !== 'object') return schema;
  const shape: Record<string, unknown> = {};
  for (const [key, value] of Object.entries(schema)) {
    // Under `properties` and `definitions` the keys are names, each holding a schema.
    if (names) {
      shape[key] = shapeOnly(value);
      continue;
    }
    if ((key === 'additionalProperties' && value === false) || VALUE_CHECKS.has(key)) continue;
    shape[key] = shapeOnly(value, key === 'properties' || key === 'definitions');
  }
  return names ? shape : withTypeUnions(shape);
}

/**
 * A union of bare types (`anyOf: [{type: 'string'}, {type: 'null'}]`, what a nullable timestamp is once
 * its `format` is gone) as the one schema it means, `type: ['string', 'null']`: fast-json-stringify
 * writes that by the value's type, where a union is decided by running ajv on the value for each
 * branch.
 */
function withTypeUnions(shape: Record<string, unknown>): Record<string, unknown> {
  const { anyOf, ...rest } = shape;
  if (!Array.isArray(anyOf) || rest.type !== undefined) return shape;
  const types: string[] = [];
  for (const branch of anyOf) {
    const keys = branch !== null && typeof branch === 'object' ? Object.keys(branch) : [];
    const type = (branch as { type?: unknown } | null)?.type;
    if (keys.length !== 1 || typeof type !== 'string' || types.includes(type)) return shape;
    types.push(type);
  }
  return { type: types, ...rest };
}

function zodSchemaOf(schema: unknown): $ZodType | undefined {
  if (schema instanceof $ZodType) return schema;
  // fastify-type-provider-zod also accepts `{ properties: <zod> }`.
  const properties = (schema as { properties?: unknown } | undefined)?.properties;
  return properties instanceof $ZodType ? properties : undefined;
}
