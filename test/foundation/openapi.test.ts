import { Validator } from '@seriousme/openapi-schema-validator';
import type { FastifyInstance } from 'fastify';
import { beforeAll, describe, expect, it } from 'vitest';
import { buildTestApp } from '../support/app.js';

describe('the OpenAPI document', () => {
  let app: FastifyInstance;
  let doc: {
    openapi: string;
    paths: Record<
      string,
      Record<string, { operationId?: string; tags?: string[]; summary?: string; responses?: object }>
    >;
  };
  beforeAll(async () => {
    app = await buildTestApp();
    doc = (await app.inject({ method: 'GET', url: '/openapi.json' })).json();
  });

  it('validates against the OpenAPI 3.1 schema', async () => {
    const validator = new Validator();
    const result = await validator.validate(structuredClone(doc));
    expect(result.errors ?? []).toEqual([]);
    expect(result.valid).toBe(true);
    expect(validator.version).toBe('3.1');
  });

  it('gives every operation a unique operationId, a tag, a summary and its responses', () => {
    const ids = new Set<string>();
    for (const [path, item] of Object.entries(doc.paths)) {
      for (const [method, op] of Object.entries(item)) {
        const where = `${method.toUpperCase()} ${path}`;
        expect(op.operationId, where).toBeTruthy();
        expect(ids.has(op.operationId!), `${where} repeats ${op.operationId}`).toBe(false);
        ids.add(op.operationId!);
        expect(op.tags?.length, where).toBeGreaterThan(0);
        expect(op.summary, where).toBeTruthy();
        expect(Object.keys(op.responses ?? {}).length, where).toBeGreaterThan(0);
      }
    }
    // Every documented route of API.md is there.
    for (const path of [
      '/v1/auth/login',
      '/oauth/token',
      '/v1/api-keys/verify',
      '/v1/clients/{id}/secrets',
      '/v1/authz/check',
    ]) {
      expect(doc.paths[path], path).toBeTruthy();
    }
  });
});
