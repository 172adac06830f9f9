import fastJsonStringify from 'fast-json-stringify';
import type { FastifySerializerCompiler } from 'fastify/types/schema.js';
import { $ZodType, toJSONSchema } from 'zod/v4/core';

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
  const jsonSchema = toJSONSchema(zod, {
    target: 'draft-7',
    io: 'output',
    unrepresentable: 'any',
    cycles: 'ref',
    reused: 'inline',
  });
  const stringify = fastJsonStringify(
    withoutClosedObjects(jsonSchema) as Parameters<typeof fastJsonStringify>[0],
  ) as (data: unknown) => string;
  return (data) => {
    try {
      return stringify(data);
    } catch (cause) {
      throw new ResponseSchemaError(`${method} ${url}`, cause);
    }
  };
};

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
 * zod's output schemas close every object (`additionalProperties: false`). fast-json-stringify writes
 * only the listed properties of an object anyway, but it picks the branch of a union (`anyOf`, `oneOf`,
 * nullable objects) by validating the value against each, and a closed branch refuses the very values
 * whose extra fields it would have left out. Without the closing keyword, the allow-list is the same.
 */
function withoutClosedObjects(schema: unknown): unknown {
  if (Array.isArray(schema)) return schema.map(withoutClosedObjects);
  if (schema === null || typeof schema !== 'object') return schema;
  const open: Record<string, unknown> = {};
  for (const [key, value] of Object.entries(schema)) {
    if (key === 'additionalProperties' && value === false) continue;
    open[key] = withoutClosedObjects(value);
  }
  return open;
}

function zodSchemaOf(schema: unknown): $ZodType | undefined {
  if (schema instanceof $ZodType) return schema;
  // fastify-type-provider-zod also accepts `{ properties: <zod> }`.
  const properties = (schema as { properties?: unknown } | undefined)?.properties;
  return properties instanceof $ZodType ? properties : undefined;
}
